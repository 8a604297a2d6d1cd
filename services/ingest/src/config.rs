//! The ingest stage's settings: plain structs the CLI fills from its flags.

use std::time::Duration;

use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::sites::SiteRegistry;

use crate::select::SelectionRules;
use crate::watch::Completion;

/// Settings of the ingest stage.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub campaign: String,
    /// Only objects under this key prefix are read ("" for all).
    pub prefix: String,
    /// Bytes fetched first for a header; more, four times as far each time, only while the
    /// header is longer.
    pub header_bytes: u64,
    /// Objects read at once.
    pub concurrency: usize,
    pub rules: SelectionRules,
    /// Objects larger than this are quarantined unread.
    pub max_object_bytes: u64,
    /// Objects whose pixel data would decode to more than this are quarantined.
    pub max_decoded_bytes: u64,
}

impl IngestConfig {
    pub fn new(campaign: &str) -> Self {
        IngestConfig {
            campaign: campaign.to_string(),
            prefix: String::new(),
            header_bytes: 64 * 1024,
            concurrency: 16,
            rules: SelectionRules::default(),
            max_object_bytes: 1 << 30,
            max_decoded_bytes: 2 << 30,
        }
    }
}

/// What the service needs besides its queue and stores.
pub struct IngestServiceConfig {
    pub ingest: IngestConfig,
    /// Prefixes watched from the start (`--watch`); submitted ones are added as they come.
    pub watch: Vec<String>,
    pub completion: Completion,
    /// How often every watched prefix is listed again.
    pub rescan: Duration,
    pub pseudonymizer: Pseudonymizer,
    pub sites: SiteRegistry,
}
