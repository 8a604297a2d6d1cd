//! The Kubernetes manifests in deploy/k8s: valid against the Kubernetes API schemas
//! (kubernetes-validate, strict), and in step with the code: every PANSCREEN_ variable
//! they set is a flag `panscreen serve` knows, and the KEDA triggers name the stream
//! and consumers panscreen creates for the configured campaign.

use std::process::Command;

use panscreen_shared::contracts::{topology, Stage};
use panscreen_shared::queue::jetstream::{consumer_name, stream_name};
use panscreen_tests::{panscreen, workspace_root};

fn manifest(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("deploy/k8s").join(name)).unwrap()
}

#[test]
fn manifests_pass_strict_schema_validation() {
    let validator = workspace_root().join(".panscreen/venv/bin/kubernetes-validate");
    assert!(
        validator.is_file(),
        "run `cargo xtask setup-python` (tests/requirements.txt has kubernetes-validate)"
    );
    // The KEDA ScaledObjects and the Kustomization have no schema in Kubernetes itself.
    let files = [
        "namespace",
        "config",
        "setup-job",
        "ingest",
        "preprocess",
        "infer",
        "aggregate",
        "compact-cronjob",
    ];
    let output = Command::new(validator)
        .current_dir(workspace_root().join("deploy/k8s"))
        .arg("--strict")
        .args(files.map(|f| format!("{f}.yaml")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert_eq!(text.matches(" passed for resource ").count(), files.len(), "{text}");
}

#[test]
fn manifests_use_only_flags_the_services_know() {
    let help = panscreen(&["serve".as_ref(), "ingest".as_ref(), "--help".as_ref()]);
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let config = manifest("config.yaml");
    let variables: Vec<&str> = config
        .lines()
        .filter_map(|line| line.trim().split(':').next())
        .filter(|name| name.starts_with("PANSCREEN_"))
        .collect();
    assert!(variables.len() > 10, "{variables:?}");
    for variable in variables {
        assert!(
            help.contains(&format!("env: {variable}=")),
            "{variable} is not a `panscreen serve` setting"
        );
    }
}

#[test]
fn keda_triggers_name_the_campaigns_stream_and_consumers() {
    let config = manifest("config.yaml");
    let campaign = config
        .lines()
        .find_map(|line| line.trim().strip_prefix("PANSCREEN_CAMPAIGN:"))
        .map(|value| value.trim().trim_matches('"').to_string())
        .expect("config.yaml sets the campaign");
    let scaling = manifest("scaling.yaml");
    assert_eq!(
        scaling.matches(&format!("stream: \"{}\"", stream_name(&campaign))).count(),
        2,
        "{scaling}"
    );
    // The worker stages KEDA scales, on the subject and consumer the topology gives them.
    for stage in [Stage::Preprocess, Stage::Infer] {
        let name = consumer_name(&topology::consumer(stage), &topology::input(stage, &campaign));
        assert!(
            scaling.contains(&format!("consumer: \"{name}\"")),
            "{name} missing from scaling.yaml"
        );
    }
}
