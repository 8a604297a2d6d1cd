//! From DICOM header fields to the de-identified study context.
//!
//! Identifiers become keyed pseudonyms; the birth date becomes a five-year age band at
//! the scan; sex is kept; the institution becomes a site and region. Nothing else about
//! the patient leaves ingest.

use panscreen_shared::contracts::{StageTimes, StudyContext};
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::sites::SiteRegistry;
use time::OffsetDateTime;

use crate::header::InstanceHeader;

/// Parses a DICOM DA value (YYYYMMDD).
pub fn parse_da(value: &str) -> Option<(i32, u32, u32)> {
    let digits: String = value.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() != 8 {
        return None;
    }
    let year = digits[0..4].parse().ok()?;
    let month = digits[4..6].parse().ok()?;
    let day = digits[6..8].parse().ok()?;
    ((1..=12).contains(&month) && (1..=31).contains(&day)).then_some((year, month, day))
}

/// Age in whole years at the scan: from PatientAge (AS, e.g. "057Y"), else from the
/// birth date and the study date.
pub fn age_years(patient_age: &str, birth_date: &str, study_date: &str) -> Option<u32> {
    let age = patient_age.trim();
    if age.len() == 4 && age.ends_with('Y') {
        if let Ok(years) = age[..3].parse() {
            return Some(years);
        }
    }
    if age.len() == 4 && (age.ends_with('M') || age.ends_with('W') || age.ends_with('D')) {
        return Some(0);
    }
    let (birth_year, birth_month, birth_day) = parse_da(birth_date)?;
    let (year, month, day) = parse_da(study_date)?;
    let mut years = year - birth_year;
    if (month, day) < (birth_month, birth_day) {
        years -= 1;
    }
    (years >= 0).then_some(years as u32)
}

/// Five-year band, "90+" at the top, "unknown" without an age.
pub fn age_band(age: Option<u32>) -> String {
    match age {
        None => "unknown".to_string(),
        Some(years) if years >= 90 => "90+".to_string(),
        Some(years) => {
            let low = years / 5 * 5;
            format!("{low}-{}", low + 4)
        }
    }
}

fn sex(value: &str) -> String {
    match value {
        "F" | "M" | "O" => value.to_string(),
        _ => "U".to_string(),
    }
}

fn iso_date(value: &str) -> String {
    match parse_da(value) {
        Some((year, month, day)) => format!("{year:04}-{month:02}-{day:02}"),
        None => "unknown".to_string(),
    }
}

/// The de-identified context of a study, from one of its instances.
pub fn study_context(
    campaign: &str,
    instance: &InstanceHeader,
    pseudonymizer: &Pseudonymizer,
    sites: &SiteRegistry,
) -> StudyContext {
    let site = sites.by_institution(&instance.institution_name);
    let site_id = site.map(|s| s.id.clone()).unwrap_or_else(|| "unknown".to_string());
    let issuer = if instance.issuer_of_patient_id.is_empty() {
        site_id.as_str()
    } else {
        &instance.issuer_of_patient_id
    };
    StudyContext {
        campaign: campaign.to_string(),
        study_key: pseudonymizer.study(&instance.study_instance_uid),
        patient_key: pseudonymizer.patient(issuer, &instance.patient_id),
        region_code: site.map(|s| s.region_code.clone()).unwrap_or_else(|| "unknown".to_string()),
        region_name: site.map(|s| s.region_name.clone()).unwrap_or_else(|| "unknown".to_string()),
        province: site.map(|s| s.province.clone()).unwrap_or_else(|| "unknown".to_string()),
        site_id,
        age_band: age_band(age_years(
            &instance.patient_age,
            &instance.patient_birth_date,
            &instance.study_date,
        )),
        sex: sex(&instance.patient_sex),
        scan_date: iso_date(&instance.study_date),
        timings: StageTimes {
            ingested_at: Some(OffsetDateTime::now_utc()),
            ..StageTimes::default()
        },
        generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_from_patient_age_or_dates() {
        assert_eq!(age_years("057Y", "", ""), Some(57));
        assert_eq!(age_years("", "19600615", "20250614"), Some(64));
        assert_eq!(age_years("", "19600615", "20250615"), Some(65));
        assert_eq!(age_years("", "", "20250615"), None);
    }

    #[test]
    fn bands() {
        assert_eq!(age_band(Some(57)), "55-59");
        assert_eq!(age_band(Some(40)), "40-44");
        assert_eq!(age_band(Some(93)), "90+");
        assert_eq!(age_band(None), "unknown");
    }

    #[test]
    fn dates_and_sex() {
        assert_eq!(iso_date("20250301"), "2025-03-01");
        assert_eq!(iso_date("garbage"), "unknown");
        assert_eq!(sex("X"), "U");
    }
}
