//! The site registry: which hospital belongs to which region.
//!
//! Ingest matches a study's InstitutionName (0008,0080) to a site. A built-in registry
//! serves the synthetic cohorts; a campaign passes its own as TOML:
//!
//! ```toml
//! [[site]]
//! id = "NB-H01"
//! institution_name = "Haishu District People's Hospital"
//! region_code = "330203"
//! region_name = "Haishu"
//! province = "Zhejiang"
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub id: String,
    pub institution_name: String,
    pub region_code: String,
    pub region_name: String,
    pub province: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRegistry {
    #[serde(rename = "site")]
    pub sites: Vec<Site>,
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("cannot read site registry {path}: {source}")]
    Unreadable { path: String, source: std::io::Error },
    #[error("site registry {path} is not valid: {detail}")]
    Invalid { path: String, detail: String },
}

impl SiteRegistry {
    /// The registry used when none is given: six hospitals in four districts.
    pub fn builtin() -> SiteRegistry {
        let site = |id: &str, name: &str, code: &str, region: &str| Site {
            id: id.to_string(),
            institution_name: name.to_string(),
            region_code: code.to_string(),
            region_name: region.to_string(),
            province: "Zhejiang".to_string(),
        };
        SiteRegistry {
            sites: vec![
                site("NB-H01", "Haishu District People's Hospital", "330203", "Haishu"),
                site("NB-H02", "Haishu Community Health Centre", "330203", "Haishu"),
                site("NB-J01", "Jiangbei District Hospital", "330205", "Jiangbei"),
                site("NB-Y01", "Yinzhou Second Hospital", "330212", "Yinzhou"),
                site("NB-Y02", "Yinzhou Traditional Medicine Hospital", "330212", "Yinzhou"),
                site("NB-B01", "Beilun People's Hospital", "330206", "Beilun"),
            ],
        }
    }

    pub fn load(path: &Path) -> Result<SiteRegistry, SiteError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SiteError::Unreadable { path: display.clone(), source })?;
        let registry: SiteRegistry = toml::from_str(&text).map_err(|error| SiteError::Invalid {
            path: display.clone(),
            detail: error.message().to_string(),
        })?;
        if registry.sites.is_empty() {
            return Err(SiteError::Invalid {
                path: display,
                detail: "no [[site]] entries".to_string(),
            });
        }
        Ok(registry)
    }

    /// The site whose institution name matches (case and surrounding space ignored).
    pub fn by_institution(&self, institution_name: &str) -> Option<&Site> {
        let wanted = institution_name.trim();
        self.sites.iter().find(|site| site.institution_name.eq_ignore_ascii_case(wanted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_matches_by_institution() {
        let registry = SiteRegistry::builtin();
        assert_eq!(
            registry.by_institution(" jiangbei district hospital ").unwrap().region_code,
            "330205"
        );
        assert!(registry.by_institution("Elsewhere").is_none());
    }

    #[test]
    fn loads_from_toml() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("sites.toml");
        std::fs::write(&path, toml::to_string(&SiteRegistry::builtin()).unwrap()).unwrap();
        assert_eq!(SiteRegistry::load(&path).unwrap(), SiteRegistry::builtin());
    }
}
