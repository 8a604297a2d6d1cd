//! Exports as hospitals make them: folders named after the patient in Chinese, `平扫/`
//! and `增强/`, `Müller/` and `Möller #3/`, `IM#12` file names, 200-character names, a
//! file name that is not UTF-8, a broken link, files that are not DICOM, an empty file,
//! and a study of 2,000 slices whose message is larger than NATS takes. No run and no
//! pass stops; every object ends screened, quarantined or ignored with its reason.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use bytes::Bytes;
use futures::StreamExt;
use panscreen_ingest::watch::{Completion, Watcher};
use panscreen_ingest::IngestConfig;
use panscreen_preprocess::PreprocessError;
use panscreen_shared::contracts::{subjects, QuarantineRecord, StudyIngested};
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::queue::jetstream::{JetStreamQueue, JetStreamSettings, NatsConfig};
use panscreen_shared::queue::large::{self, LargePayloads};
use panscreen_shared::queue::Queue;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::Store;
use panscreen_synth::{encode_slice, SeriesHeader, Slice};
use panscreen_tests::servers::{NatsServer, SeaweedFs};
use panscreen_tests::{files_below, odd_case_header, query_tables, run_embedded, series_files};

const KEY: &str = "messy-inputs-key-0123456789abcdef0123";

/// The two series of a study that both carry contrast (so none fits the rules).
fn contrast_only_study(study: u32) -> [SeriesHeader; 2] {
    let mut plain = odd_case_header(study, "PLAIN ABDOMEN");
    plain.contrast_agent = Some("IOHEXOL 350".into());
    let mut venous = odd_case_header(study, "ABDOMEN PV");
    venous.contrast_agent = Some("IOHEXOL 350".into());
    venous.series_instance_uid = format!("2.25.88{study}");
    venous.series_number = 3;
    [plain, venous]
}

fn along_z(i: usize) -> [f64; 3] {
    [-180.0, -180.0, i as f64 * 2.5]
}

/// Every odd case as (key, bytes): two good studies, the contrast-only study in a folder
/// named after its patient, and three objects that are not images.
fn odd_objects() -> Vec<(String, Vec<u8>)> {
    let mut objects = Vec::new();
    let long = "x".repeat(190);
    let good = [
        (
            odd_case_header(11, "ABDOMEN"),
            Box::new(|i: usize| format!("Müller/平扫/IM#{i}")) as Box<dyn Fn(usize) -> String>,
        ),
        (
            odd_case_header(12, "ABDOMEN"),
            Box::new(move |i: usize| format!("Möller #3/CT 0001/{long}-{i:03}.dcm")),
        ),
    ];
    for (header, name) in good {
        objects.extend(series_files(&header, along_z, name));
    }
    let [plain, venous] = contrast_only_study(13);
    objects.extend(series_files(&plain, along_z, |i| format!("病人甲/平扫/IM_{i:04}.dcm")));
    objects.extend(series_files(&venous, along_z, |i| format!("病人甲/增强/IM_{i:04}.dcm")));
    objects.push(("notes.txt".into(), b"scanned on the new machine, see ward".to_vec()));
    objects.push(("病人甲/report.pdf".into(), b"%PDF-1.4 not dicom".to_vec()));
    objects.push(("empty.dcm".into(), Vec::new()));
    objects
}

#[test]
fn an_embedded_run_over_every_odd_name_screens_the_good_and_names_the_rest() {
    let scratch = tempfile::tempdir().unwrap();
    let input = scratch.path().join("export");
    for (key, bytes) in odd_objects() {
        let path = input.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    // A name in a legacy code page (Latin-1 "Müller", not UTF-8), and a link to nowhere.
    std::fs::write(input.join(OsStr::from_bytes(b"M\xfcller.dcm")), b"Latin-1 named").unwrap();
    std::os::unix::fs::symlink(input.join("gone"), input.join("dangling.dcm")).unwrap();
    let listed = files_below(&input).len();
    assert_eq!(listed, 205);

    let out = scratch.path().join("out");
    let run = run_embedded(&input, &out, &scratch.path().join("key"), KEY);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let tables = query_tables(
        &out,
        &[
            ("results", "select count(*) from read_parquet('OUT/results/**/*.parquet')"),
            (
                "quarantine",
                "select reason, input, len(inputs), inputs from read_parquet('OUT/quarantine/**/*.parquet') \
                 order by reason, input",
            ),
            (
                "accounting",
                "select outcome, sum(objects), max(objects_listed) from read_parquet('OUT/accounting/*.parquet') \
                 group by all order by all",
            ),
        ],
    );
    assert_eq!(tables["results"][0][0], 2, "both good studies screened: {tables}");
    let quarantine = tables["quarantine"].as_array().unwrap();
    let rows: Vec<(&str, &str, u64)> = quarantine
        .iter()
        .map(|r| (r[0].as_str().unwrap(), r[1].as_str().unwrap(), r[2].as_u64().unwrap()))
        .collect();
    assert_eq!(
        rows,
        [
            ("empty file", "empty.dcm", 1),
            ("no series fits the screening rules", "病人甲/", 100),
            ("not a DICOM file", "notes.txt", 1),
            ("not a DICOM file", "病人甲/report.pdf", 1),
            ("object cannot be read by its name", "M\\xfcller.dcm", 1),
            ("object cannot be read by its name", "dangling.dcm", 1),
        ],
        "{tables}"
    );
    // Every file of the quarantined study can be found from its row.
    let study_keys: Vec<&str> =
        quarantine[1][3].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    for folder in ["病人甲/平扫/", "病人甲/增强/"] {
        assert_eq!(study_keys.iter().filter(|k| k.starts_with(folder)).count(), 50, "{folder}");
    }
    let accounting = tables["accounting"].as_array().unwrap();
    let total: u64 = accounting.iter().map(|r| r[1].as_u64().unwrap()).sum();
    assert_eq!(total as usize, listed, "{accounting:?}");
    assert!(accounting.iter().all(|r| r[2].as_u64().unwrap() as usize == listed), "{accounting:?}");
    let screened = accounting.iter().find(|r| r[0] == "screened").unwrap();
    assert_eq!(screened[1], 100);

    // No identifier in any table; no folder name (here, the patient's) in any log line.
    for file in files_below(&out) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).to_string();
        for secret in ["ODD^CASE", "ODD0000", "ACCODD", "19550505"] {
            assert!(!text.contains(secret), "{secret} in {}", file.display());
        }
        if file.extension() == Some(OsStr::new("jsonl")) {
            assert!(
                !text.contains("病人甲") && !text.contains("Müller"),
                "a folder name in {}",
                file.display()
            );
        }
    }
    assert!(!stderr.contains("病人甲") && !stderr.contains("Müller"), "{stderr}");
}

/// VmHWM of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_pass_on_s3_and_jetstream_takes_every_odd_case_and_a_message_too_large_for_nats()
{
    let (nats, seaweed) = (NatsServer::start(), SeaweedFs::start());
    seaweed.create_bucket("messy");
    let root = Store::open_s3_with("s3://messy", &seaweed.s3_options()).unwrap();

    let mut objects = odd_objects();
    // 2,000 slices under 500-byte keys: its message is over a megabyte.
    let mut big = odd_case_header(14, "ABDOMEN THIN");
    big.slice_thickness = 1.0;
    let folder = format!("{}/{}", "Ω".repeat(100), "长".repeat(80));
    let hu = vec![0.0f32; 64 * 64];
    for index in 0..2000usize {
        let uid = format!("{}.{index}", big.series_instance_uid);
        let position = [-180.0, -180.0, index as f64];
        let slice =
            Slice { sop_instance_uid: &uid, instance_number: index as i32 + 1, position, hu: &hu };
        objects.push((
            format!("{folder}/{}-{index:05}.dcm", "s".repeat(40)),
            encode_slice(&big, &slice).unwrap(),
        ));
    }
    // A key object_store cannot read (a control character), written as another client would.
    seaweed.put_raw("messy", b"incoming/\xe5\xb9\xb3\xe6\x89\xab/IM\x01.dcm", b"DICM?");
    let count = objects.len() + 1;
    futures::stream::iter(objects)
        .map(|(key, bytes)| {
            let root = root.clone();
            async move { root.put(&format!("incoming/{key}"), Bytes::from(bytes)).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let nats_config = NatsConfig { url: nats.url(), ..NatsConfig::default() };
    let jetstream = std::sync::Arc::new(
        JetStreamQueue::connect(&nats_config, "messy", JetStreamSettings::default()).await.unwrap(),
    );
    let queue = LargePayloads::new(
        jetstream.clone(),
        root.sub("campaigns/messy/messages"),
        large::DEFAULT_LIMIT,
    );
    let mut preprocess =
        queue.subscribe(&subjects::ingested("messy"), "panscreen-preprocess").await.unwrap();
    let mut quarantine =
        queue.subscribe(&subjects::quarantine("messy"), "panscreen-aggregate").await.unwrap();

    let open_watcher = |state: &str| {
        Watcher::open(
            root.clone(),
            root.sub(state),
            IngestConfig::new("messy"),
            Completion { quiet: std::time::Duration::ZERO, marker: "_COMPLETE".to_string() },
            Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap(),
            SiteRegistry::builtin(),
        )
    };
    let mut watcher = open_watcher("campaigns/messy/ingest").await.unwrap();
    let prefixes = vec!["incoming".to_string()];
    let pass = watcher.pass(&queue, &prefixes).await.expect("a pass over odd inputs completes");
    assert_eq!(pass.listed, count);
    assert!(pass.decided.balanced(), "{:?}", pass.decided.accounting());
    assert_eq!(pass.decided.studies.len(), 3);
    let mut reasons: Vec<&str> =
        pass.decided.quarantined.iter().map(|q| q.reason.as_str()).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "empty file",
            "no series fits the screening rules",
            "not a DICOM file",
            "not a DICOM file",
            "object cannot be read by its name"
        ]
    );

    assert_eq!(root.list("campaigns/messy/messages").await.unwrap().len(), 1);

    // An ingest that lost its state scans again within the duplicate window: the same
    // messages under the same ids, which the queue drops. The repeat's copy of the large
    // one is deleted; the copy the queued reference names stays.
    let mut again = open_watcher("campaigns/messy/ingest-state-lost").await.unwrap();
    let repeat = again.pass(&queue, &prefixes).await.expect("a second scan completes");
    assert_eq!(repeat.decided.studies.len(), 3);
    assert_eq!(
        root.list("campaigns/messy/messages").await.unwrap().len(),
        1,
        "one copy, the queued message's"
    );

    // The large study arrives whole, though NATS would refuse its message as it is.
    let (mut slices, mut largest) = (Vec::new(), Bytes::new());
    for _ in 0..3 {
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(30), preprocess.next())
            .await
            .expect("a study message within 30 s")
            .unwrap()
            .unwrap();
        let study: StudyIngested = serde_json::from_slice(&delivery.payload).unwrap();
        if study.slices.len() == 2000 {
            largest = delivery.payload.clone();
        }
        slices.push(study.slices.len());
        delivery.ack().await.unwrap();
    }
    slices.sort();
    assert_eq!(slices, [50, 50, 2000]);
    assert!(
        root.list("campaigns/messy/messages").await.unwrap().is_empty(),
        "references deleted once acked"
    );

    // The quarantined study's record lists all 100 keys.
    let mut records = Vec::new();
    for _ in 0..5 {
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(30), quarantine.next())
            .await
            .expect("a quarantine record within 30 s")
            .unwrap()
            .unwrap();
        records.push(serde_json::from_slice::<QuarantineRecord>(&delivery.payload).unwrap());
        delivery.ack().await.unwrap();
    }
    let unreadable =
        records.iter().find(|r| r.reason == "object cannot be read by its name").unwrap();
    assert_eq!(unreadable.input, "incoming/平扫/IM\\x01.dcm");
    assert!(unreadable.detail.contains("control character"), "{}", unreadable.detail);
    let study = records.iter().find(|r| r.reason == "no series fits the screening rules").unwrap();
    assert_eq!(study.input, "incoming/病人甲/");
    assert_eq!(study.inputs.len(), 100);

    // The next pass, and a restarted ingest, handle nothing again.
    assert_eq!(watcher.pass(&queue, &prefixes).await.unwrap().decided.objects_listed, 0);
    assert_eq!(
        open_watcher("campaigns/messy/ingest")
            .await
            .unwrap()
            .pass(&queue, &prefixes)
            .await
            .unwrap()
            .decided
            .objects_listed,
        0
    );
    assert!(peak_rss() < 512 << 20, "peak RSS {} MiB", peak_rss() >> 20);
    // Last, as NATS may drop a connection that sends too much: the message as it is.
    assert!(largest.len() > 1 << 20, "{} bytes", largest.len());
    let refused = jetstream.publish(&subjects::ingested("messy"), "raw", largest.clone()).await;
    assert!(refused.is_err(), "NATS took a {} byte message", largest.len());
}

/// A JPEG-LS slice whose corruption crashes GDCM (found by flipping bits near the end of
/// its compressed stream), and how the crash was reported.
fn gdcm_crashing_slice(encoded: &[u8]) -> (Vec<u8>, String) {
    panscreen_preprocess::gdcm_helper::set_program(panscreen_tests::binary());
    for back in 16..encoded.len().min(4000) {
        for bit in [7u8, 3] {
            let mut corrupt = encoded.to_vec();
            let at = encoded.len() - back;
            corrupt[at] ^= 1 << bit;
            if let Err(PreprocessError::DecoderFailed { detail, .. }) =
                panscreen_preprocess::decode::decode_slice("probe.dcm", &corrupt, -1000.0)
            {
                if detail.contains("GDCM helper died") {
                    return (corrupt, detail);
                }
            }
        }
    }
    panic!("no single bit flip near the end of the JPEG-LS stream crashed GDCM");
}

#[test]
fn a_jpeg_ls_slice_that_crashes_gdcm_quarantines_its_study_and_the_run_goes_on() {
    let scratch = tempfile::tempdir().unwrap();
    let input = scratch.path().join("input");
    let plain = scratch.path().join("plain");
    panscreen_tests::write_series(&input.join("good"), &odd_case_header(21, "ABDOMEN"), along_z);
    panscreen_tests::write_series(&plain, &odd_case_header(22, "ABDOMEN"), along_z);
    std::fs::create_dir_all(input.join("jpegls")).unwrap();
    for file in files_below(&plain) {
        let out = input.join("jpegls").join(file.file_name().unwrap());
        let status =
            std::process::Command::new("gdcmconv").arg("--jpegls").arg(&file).arg(&out).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "gdcmconv --jpegls failed; run `cargo xtask dicom-tools`"
        );
    }
    let victim = input.join("jpegls/slice 25.dcm");
    let (corrupt, crash) = gdcm_crashing_slice(&std::fs::read(&victim).unwrap());
    eprintln!("the corrupt slice: {crash}");
    std::fs::write(&victim, corrupt).unwrap();

    let out = scratch.path().join("out");
    run_embedded(&input, &out, &scratch.path().join("key"), KEY);
    let tables = query_tables(
        &out,
        &[
            ("results", "select count(*) from read_parquet('OUT/results/**/*.parquet')"),
            ("quarantine", "select stage, reason, detail, attempts from read_parquet('OUT/quarantine/**/*.parquet')"),
        ],
    );
    assert_eq!(tables["results"][0][0], 1, "the good study is screened: {tables}");
    let quarantine = tables["quarantine"].as_array().unwrap();
    assert_eq!(quarantine.len(), 1, "{tables}");
    let row = &quarantine[0];
    assert_eq!(
        (row[0].as_str().unwrap(), row[1].as_str().unwrap()),
        ("preprocess", "the decoder failed on this file")
    );
    assert!(row[2].as_str().unwrap().contains("GDCM helper died"), "{row}");
    assert_eq!(row[3], 1, "quarantined on its first attempt: {row}");
}

/// A header longer than the prefix ingest reads first (a vendor's 100 KB private
/// element before Pixel Data): the prefix asks for more bytes, and the whole object
/// parses; the same object cut inside that element is truncated, not "more bytes needed".
#[test]
fn a_header_longer_than_the_first_read_is_read_whole() {
    use panscreen_ingest::header::{needs_more_bytes, parse};
    let bytes = long_header_slice(16);
    let size = bytes.len() as u64;

    let prefix = parse("long.dcm", size, &bytes[..64 * 1024]).unwrap_err();
    assert!(needs_more_bytes(&prefix), "{prefix:?}");
    let whole = parse("long.dcm", size, &bytes).unwrap();
    assert_eq!(whole.sop_instance_uid, "1.2.3.21.1");

    let cut = &bytes[..64 * 1024];
    let problem = parse("cut.dcm", cut.len() as u64, cut).unwrap_err();
    assert!(!needs_more_bytes(&problem));
    assert_eq!(problem.reason(), "DICOM file is truncated", "{problem:?}");
}

/// A `size` × `size` slice with a vendor's 100 KB private element before Pixel Data.
fn long_header_slice(size: u16) -> Vec<u8> {
    let header = SeriesHeader { rows: size, columns: size, ..odd_case_header(21, "ABDOMEN") };
    let hu = vec![0.0f32; usize::from(size) * usize::from(size)];
    let slice = Slice {
        sop_instance_uid: "1.2.3.21.1",
        instance_number: 1,
        position: [0.0, 0.0, 0.0],
        hu: &hu,
    };
    let plain = encode_slice(&header, &slice).unwrap();
    let pixel_data = plain.windows(4).rposition(|w| w == [0xe0, 0x7f, 0x10, 0x00]).unwrap();
    let mut bytes = plain[..pixel_data].to_vec();
    bytes.extend_from_slice(&[0x29, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
    bytes.extend_from_slice(&(100_000u32).to_le_bytes());
    bytes.extend(std::iter::repeat_n(0x5a, 100_000));
    bytes.extend_from_slice(&plain[pixel_data..]);
    bytes
}

/// Ingest reads such a header from S3 by range reads that grow, not by fetching the
/// object: 64 KiB, then up to 256 KiB of a 612 KB object whose pixels start near 101 KB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_header_on_s3_costs_range_reads_not_the_whole_object() {
    let seaweed = SeaweedFs::start();
    seaweed.create_bucket("long");
    let store = Store::open_s3_with("s3://long", &seaweed.s3_options()).unwrap();
    let bytes = long_header_slice(512);
    let size = bytes.len() as u64;
    assert!(size > 600_000, "{size}");
    store.put("平扫/Müller #1/long.dcm", Bytes::from(bytes)).await.unwrap();

    let read = panscreen_ingest::read_header(&store, "平扫/Müller #1/long.dcm", size, 64 * 1024)
        .await
        .unwrap();
    let header = read.parsed.unwrap();
    assert_eq!((header.sop_instance_uid.as_str(), header.rows), ("1.2.3.21.1", 512));
    assert_eq!(read.bytes_read, 256 * 1024, "of {size} bytes");

    // A first read past the end of a small object is cut to its size.
    let small = long_header_slice(16);
    store.put("small.dcm", Bytes::from(small.clone())).await.unwrap();
    let read = panscreen_ingest::read_header(&store, "small.dcm", small.len() as u64, 64 * 1024)
        .await
        .unwrap();
    assert!(read.parsed.is_ok(), "{:?}", read.parsed);
    assert_eq!(read.bytes_read, small.len() as u64);
}
