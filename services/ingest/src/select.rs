//! Grouping instances into series, choosing the series to screen, and checking it.
//!
//! The chosen series is an original axial CT image series without contrast agent and
//! with enough slices; among several, the one with the most slices. Its geometry must
//! be consistent: one orientation, one image size, one pixel spacing, and slice
//! positions along the normal that are evenly spaced with no gap and no duplicate.

use std::collections::BTreeMap;

use dicom_dictionary_std::uids;

use crate::header::InstanceHeader;

/// Instances of one series, in no particular order.
#[derive(Debug, Clone)]
pub struct SeriesGroup {
    pub series_instance_uid: String,
    pub instances: Vec<InstanceHeader>,
}

impl SeriesGroup {
    fn first(&self) -> &InstanceHeader {
        &self.instances[0]
    }

    pub fn modality(&self) -> &str {
        &self.first().modality
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.instances.iter().map(|instance| instance.key.as_str())
    }
}

/// Rules for picking and checking a series.
#[derive(Debug, Clone)]
pub struct SelectionRules {
    pub min_slices: usize,
    /// Largest allowed deviation of one slice interval from the median, as a fraction.
    pub spacing_tolerance: f64,
}

impl Default for SelectionRules {
    fn default() -> Self {
        SelectionRules { min_slices: 20, spacing_tolerance: 0.1 }
    }
}

/// The series to screen, with its slices sorted along the normal.
#[derive(Debug, Clone)]
pub struct ChosenSeries {
    pub group: SeriesGroup,
    pub reason: String,
    pub slice_spacing_mm: f64,
}

/// Why a study cannot be screened.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: String,
    pub detail: String,
}

impl Rejection {
    fn new(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Rejection { reason: reason.into(), detail: detail.into() }
    }
}

/// Groups a study's instances by SeriesInstanceUID.
pub fn group_series(instances: Vec<InstanceHeader>) -> Vec<SeriesGroup> {
    let mut groups: BTreeMap<String, Vec<InstanceHeader>> = BTreeMap::new();
    for instance in instances {
        groups.entry(instance.series_instance_uid.clone()).or_default().push(instance);
    }
    groups.into_iter().map(|(series_instance_uid, instances)| SeriesGroup { series_instance_uid, instances }).collect()
}

fn is_ct_image(group: &SeriesGroup) -> bool {
    group.modality() == "CT" && group.first().sop_class_uid == uids::CT_IMAGE_STORAGE
}

fn is_original_axial(group: &SeriesGroup) -> bool {
    let image_type = &group.first().image_type;
    let original = image_type.first().map(|v| v == "ORIGINAL").unwrap_or(true);
    let axial = image_type.get(2).map(|v| v == "AXIAL").unwrap_or(true);
    original && axial
}

/// Picks the series to screen and checks it.
pub fn choose_series(series: &[SeriesGroup], rules: &SelectionRules) -> Result<ChosenSeries, Rejection> {
    let ct: Vec<&SeriesGroup> = series.iter().filter(|group| is_ct_image(group)).collect();
    if ct.is_empty() {
        let mut found: Vec<String> = series.iter().map(|group| group.modality().to_string()).collect();
        found.sort();
        found.dedup();
        let found =
            found.iter().map(|m| if m.is_empty() { "no modality" } else { m.as_str() }).collect::<Vec<_>>().join(", ");
        return Err(Rejection::new("study has no CT image series to screen", format!("modalities found: {found}")));
    }
    let plain: Vec<&SeriesGroup> =
        ct.iter().copied().filter(|group| group.first().contrast_bolus_agent.is_none()).collect();
    if plain.is_empty() {
        return Err(Rejection::new(
            "study has only contrast-enhanced CT series",
            format!("{} CT series, all with a contrast agent", ct.len()),
        ));
    }
    let axial: Vec<&SeriesGroup> = plain.iter().copied().filter(|group| is_original_axial(group)).collect();
    if axial.is_empty() {
        return Err(Rejection::new(
            "study has no original axial non-contrast CT series",
            format!("{} non-contrast CT series, none ORIGINAL/AXIAL", plain.len()),
        ));
    }
    let best = axial.iter().copied().max_by_key(|group| group.instances.len()).expect("not empty");
    if best.instances.len() < rules.min_slices {
        return Err(Rejection::new(
            "series has too few slices to screen",
            format!("{} slices, at least {} needed", best.instances.len(), rules.min_slices),
        ));
    }
    let (sorted, slice_spacing_mm) = check_geometry(best, rules)?;
    let reason = format!(
        "original axial non-contrast CT with the most slices ({} of {} series; {} slices)",
        series.iter().position(|g| g.series_instance_uid == best.series_instance_uid).map(|i| i + 1).unwrap_or(0),
        series.len(),
        best.instances.len()
    );
    Ok(ChosenSeries { group: sorted, reason, slice_spacing_mm })
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Unit normal of an ImageOrientationPatient (row × column).
pub fn slice_normal(orientation: [f64; 6]) -> [f64; 3] {
    let row = [orientation[0], orientation[1], orientation[2]];
    let column = [orientation[3], orientation[4], orientation[5]];
    let normal = cross(row, column);
    let length = dot(normal, normal).sqrt();
    [normal[0] / length, normal[1] / length, normal[2] / length]
}

/// Sorts the slices along the normal and checks spacing; returns the median interval.
fn check_geometry(group: &SeriesGroup, rules: &SelectionRules) -> Result<(SeriesGroup, f64), Rejection> {
    let first = group.first();
    let Some(orientation) = first.image_orientation else {
        return Err(Rejection::new("series has no image orientation", "ImageOrientationPatient is missing"));
    };
    for instance in &group.instances {
        if instance.rows != first.rows || instance.columns != first.columns {
            return Err(Rejection::new(
                "series mixes image sizes",
                format!("{}×{} and {}×{}", first.rows, first.columns, instance.rows, instance.columns),
            ));
        }
        let Some(other) = instance.image_orientation else {
            return Err(Rejection::new("series has a slice without image orientation", ""));
        };
        if orientation.iter().zip(other).any(|(a, b)| (a - b).abs() > 1e-3) {
            return Err(Rejection::new("series mixes slice orientations", ""));
        }
        if instance.image_position.is_none() {
            return Err(Rejection::new("series has a slice without image position", "ImagePositionPatient is missing"));
        }
        if instance.pixel_spacing != first.pixel_spacing || instance.pixel_spacing.is_none() {
            return Err(Rejection::new("series has missing or mixed pixel spacing", ""));
        }
    }
    let normal = slice_normal(orientation);
    let mut sorted = group.clone();
    sorted.instances.sort_by(|a, b| {
        let da = dot(a.image_position.expect("checked"), normal);
        let db = dot(b.image_position.expect("checked"), normal);
        da.total_cmp(&db)
    });
    let positions: Vec<f64> =
        sorted.instances.iter().map(|i| dot(i.image_position.expect("checked"), normal)).collect();
    let mut intervals: Vec<f64> = positions.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let duplicates = intervals.iter().filter(|interval| **interval < 1e-3).count();
    if duplicates > 0 {
        return Err(Rejection::new(
            "series has duplicate slice positions",
            format!("{duplicates} duplicate positions"),
        ));
    }
    let mut ordered = intervals.clone();
    ordered.sort_by(f64::total_cmp);
    let median = ordered[ordered.len() / 2];
    debug_assert!(median > 0.0, "spacing > 0 after the duplicate check");
    let gaps: Vec<(usize, f64)> = intervals
        .iter()
        .enumerate()
        .filter(|(_, interval)| **interval > median * 1.5)
        .map(|(index, interval)| (index, *interval))
        .collect();
    if !gaps.is_empty() {
        let missing: usize =
            gaps.iter().map(|(_, interval)| ((interval / median).round() as usize).saturating_sub(1)).sum();
        let (index, interval) = gaps[0];
        return Err(Rejection::new(
            "series has missing slices",
            format!(
                "{missing} slice(s) missing: a {interval:.2} mm gap after slice {} of {} where the spacing is {median:.2} mm",
                index + 1,
                positions.len()
            ),
        ));
    }
    intervals.retain(|interval| ((interval - median) / median).abs() > rules.spacing_tolerance);
    if let Some(bad) = intervals.first() {
        return Err(Rejection::new(
            "series has uneven slice spacing",
            format!(
                "an interval of {bad:.2} mm where the median is {median:.2} mm (over {:.0}% off)",
                rules.spacing_tolerance * 100.0
            ),
        ));
    }
    Ok((sorted, median))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn instance(series: &str, z: f64) -> InstanceHeader {
        InstanceHeader {
            key: format!("{series}/{z}.dcm"),
            size: 1000,
            transfer_syntax: uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
            sop_class_uid: uids::CT_IMAGE_STORAGE.into(),
            sop_instance_uid: format!("1.{z}"),
            study_instance_uid: "1.2".into(),
            series_instance_uid: series.into(),
            modality: "CT".into(),
            patient_id: "P".into(),
            issuer_of_patient_id: String::new(),
            patient_birth_date: String::new(),
            patient_sex: "F".into(),
            patient_age: String::new(),
            study_date: "20250101".into(),
            institution_name: String::new(),
            series_number: Some(1),
            instance_number: None,
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            image_position: Some([0.0, 0.0, z]),
            image_orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            pixel_spacing: Some([0.7, 0.7]),
            slice_thickness: Some(2.5),
            rows: 4,
            columns: 4,
            bits_allocated: 16,
            number_of_frames: 1,
            contrast_bolus_agent: None,
        }
    }

    fn rules() -> SelectionRules {
        SelectionRules { min_slices: 3, spacing_tolerance: 0.1 }
    }

    #[test]
    fn sorts_slices_along_the_normal() {
        let series = group_series([5.0, 0.0, 7.5, 2.5].map(|z| instance("s", z)).to_vec());
        let chosen = choose_series(&series, &rules()).unwrap();
        let z: Vec<f64> = chosen.group.instances.iter().map(|i| i.image_position.unwrap()[2]).collect();
        assert_eq!(z, [0.0, 2.5, 5.0, 7.5]);
        assert_eq!(chosen.slice_spacing_mm, 2.5);
    }

    #[test]
    fn a_missing_slice_is_rejected_with_the_count() {
        let series = group_series([0.0, 2.5, 5.0, 10.0, 12.5].map(|z| instance("s", z)).to_vec());
        let rejection = choose_series(&series, &rules()).unwrap_err();
        assert_eq!(rejection.reason, "series has missing slices");
        assert!(rejection.detail.starts_with("1 slice(s) missing"), "{}", rejection.detail);
    }

    #[test]
    fn duplicates_and_uneven_spacing_are_rejected() {
        let duplicate = group_series([0.0, 2.5, 2.5, 5.0].map(|z| instance("s", z)).to_vec());
        assert_eq!(choose_series(&duplicate, &rules()).unwrap_err().reason, "series has duplicate slice positions");
        let uneven = group_series([0.0, 2.5, 5.0, 8.0, 10.5].map(|z| instance("s", z)).to_vec());
        assert_eq!(choose_series(&uneven, &rules()).unwrap_err().reason, "series has uneven slice spacing");
    }

    #[test]
    fn non_ct_studies_are_rejected_naming_what_was_found() {
        let mut mr = instance("s", 0.0);
        mr.modality = "MR".into();
        let rejection = choose_series(&group_series(vec![mr]), &rules()).unwrap_err();
        assert_eq!(rejection.reason, "study has no CT image series to screen");
        assert_eq!(rejection.detail, "modalities found: MR");
    }

    #[test]
    fn picks_the_plain_series_with_most_slices() {
        let mut instances: Vec<InstanceHeader> = [0.0, 2.5, 5.0].map(|z| instance("a", z)).to_vec();
        instances.extend([0.0, 1.0, 2.0, 3.0].map(|z| instance("b", z)));
        let mut contrast: Vec<InstanceHeader> = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5].map(|z| instance("c", z)).to_vec();
        contrast.iter_mut().for_each(|i| i.contrast_bolus_agent = Some("IODINE".into()));
        instances.extend(contrast);
        let chosen = choose_series(&group_series(instances), &rules()).unwrap();
        assert_eq!(chosen.group.series_instance_uid, "b");
        assert!(chosen.reason.contains("2 of 3 series"), "{}", chosen.reason);
    }
}
