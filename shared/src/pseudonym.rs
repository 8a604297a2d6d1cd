//! Keyed pseudonyms (HMAC-SHA256).
//!
//! The same identifier under the same key always gives the same pseudonym, so a
//! hospital that holds the key can find its patient for recall; without the key a
//! pseudonym reveals nothing. Each kind of identifier has its own domain, so a study
//! UID and a patient id never collide.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Smallest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Environment variable holding the key (hex or raw text of at least 32 bytes).
pub const KEY_ENV: &str = "PANSCREEN_PSEUDONYM_KEY";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("pseudonym key is {0} bytes, at least {MIN_KEY_BYTES} are needed")]
    TooShort(usize),
    #[error("cannot read pseudonym key file {path}: {source}")]
    Unreadable { path: String, source: std::io::Error },
}

/// Makes pseudonyms under one secret key. The key is never logged or displayed.
#[derive(Clone)]
pub struct Pseudonymizer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer { key: <redacted> }")
    }
}

impl Pseudonymizer {
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, KeyError> {
        let key = key.into();
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(key.len()));
        }
        Ok(Pseudonymizer { key })
    }

    /// Reads a key file: surrounding whitespace is ignored.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read(path)
            .map_err(|source| KeyError::Unreadable { path: path.display().to_string(), source })?;
        let trimmed = String::from_utf8_lossy(&text).trim().as_bytes().to_vec();
        Self::new(trimmed)
    }

    /// A fresh random key for one throwaway run (pseudonyms will not match any other run).
    pub fn ephemeral() -> Self {
        let mut key = Vec::with_capacity(32);
        let mut state = std::collections::hash_map::RandomState::new();
        while key.len() < 32 {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = state.build_hasher();
            hasher.write_usize(key.len());
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos())
                    .unwrap_or(0),
            );
            key.extend_from_slice(&hasher.finish().to_le_bytes());
            state = std::collections::hash_map::RandomState::new();
        }
        Pseudonymizer { key }
    }

    /// Pseudonym of `value` in `domain`: 32 lowercase hex characters (128 bits).
    pub fn pseudonym(&self, domain: &str, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    pub fn study(&self, study_instance_uid: &str) -> String {
        self.pseudonym("study", study_instance_uid)
    }

    pub fn series(&self, series_instance_uid: &str) -> String {
        self.pseudonym("series", series_instance_uid)
    }

    /// Patient pseudonym; the issuer keeps two hospitals' "12345" apart.
    pub fn patient(&self, issuer: &str, patient_id: &str) -> String {
        self.pseudonym("patient", &format!("{issuer}\u{1f}{patient_id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Pseudonymizer {
        Pseudonymizer::new(vec![byte; 32]).unwrap()
    }

    #[test]
    fn stable_under_the_same_key() {
        assert_eq!(key(1).study("1.2.3"), key(1).study("1.2.3"));
        assert_eq!(key(1).study("1.2.3").len(), 32);
    }

    #[test]
    fn keyed_and_domain_separated() {
        assert_ne!(key(1).study("1.2.3"), key(2).study("1.2.3"));
        assert_ne!(key(1).study("1.2.3"), key(1).series("1.2.3"));
        assert_ne!(key(1).patient("A", "1"), key(1).patient("B", "1"));
    }

    #[test]
    fn does_not_contain_the_input() {
        let pseudonym = key(7).patient("HOSP", "123456");
        assert!(!pseudonym.contains("123456"));
    }

    #[test]
    fn rejects_short_keys() {
        assert!(matches!(Pseudonymizer::new(b"short".to_vec()), Err(KeyError::TooShort(5))));
    }

    #[test]
    fn ephemeral_keys_differ() {
        assert_ne!(Pseudonymizer::ephemeral().study("x"), Pseudonymizer::ephemeral().study("x"));
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let text = format!(
            "{:?}",
            Pseudonymizer::new(b"supersecretkeysupersecretkey12345".to_vec()).unwrap()
        );
        assert!(!text.contains("supersecret"));
    }
}
