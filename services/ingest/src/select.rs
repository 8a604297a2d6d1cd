//! Grouping instances into series, choosing the series to screen, and checking it.
//!
//! The chosen series is an original axial CT image series without contrast agent and
//! with enough slices; among several, the one with the most slices. Its geometry must
//! be consistent: one orientation, one image size, one pixel spacing, and slice
//! positions along the normal that are evenly spaced with no gap and no duplicate.

use std::collections::BTreeMap;

use dicom_dictionary_std::uids;

pub use crate::error::Rejection;
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

    /// The objects of the series, each once (an Enhanced CT object holds many frames).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.instances
            .iter()
            .map(|instance| instance.key.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
    }
}

/// Rules for picking and checking a series.
#[derive(Debug, Clone)]
pub struct SelectionRules {
    pub min_slices: usize,
    /// More slices than this in one series is refused (memory and time are bounded).
    pub max_slices: usize,
    /// Largest allowed deviation of one slice interval from the median, as a fraction.
    pub spacing_tolerance: f64,
    /// Accepted SliceThickness, in mm (inclusive).
    pub slice_thickness_mm: (f64, f64),
    /// Shortest extent along the slice normal, in mm: enough to hold the pancreas.
    pub min_coverage_mm: f64,
    /// Largest angle between the slice normal and the patient's head–foot axis.
    pub max_oblique_degrees: f64,
    /// Largest gantry tilt (declared, or seen in the slice positions).
    pub max_tilt_degrees: f64,
}

impl Default for SelectionRules {
    fn default() -> Self {
        SelectionRules {
            min_slices: 20,
            max_slices: 2000,
            spacing_tolerance: 0.1,
            slice_thickness_mm: (0.5, 5.0),
            min_coverage_mm: 100.0,
            max_oblique_degrees: 10.0,
            max_tilt_degrees: 0.5,
        }
    }
}

/// The series to screen, with its slices sorted along the normal.
#[derive(Debug, Clone)]
pub struct ChosenSeries {
    pub group: SeriesGroup,
    pub reason: String,
    pub slice_spacing_mm: f64,
    /// Every other series of the study (SeriesInstanceUID) and why it was not chosen.
    pub not_chosen: Vec<(String, String)>,
}

/// Groups a study's instances by SeriesInstanceUID.
pub fn group_series(instances: Vec<InstanceHeader>) -> Vec<SeriesGroup> {
    let mut groups: BTreeMap<String, Vec<InstanceHeader>> = BTreeMap::new();
    for instance in instances {
        groups.entry(instance.series_instance_uid.clone()).or_default().push(instance);
    }
    groups
        .into_iter()
        .map(|(series_instance_uid, instances)| SeriesGroup { series_instance_uid, instances })
        .collect()
}

fn is_ct_image(group: &SeriesGroup) -> bool {
    group.modality() == "CT"
        && [uids::CT_IMAGE_STORAGE, uids::ENHANCED_CT_IMAGE_STORAGE]
            .contains(&group.first().sop_class_uid.as_str())
}

/// "series 3 (60 images)": how a person finds the series in a viewer.
fn series_label(group: &SeriesGroup) -> String {
    let number = group
        .first()
        .series_number
        .map(|n| format!("series {n}"))
        .unwrap_or_else(|| "unnumbered series".into());
    let images = group.instances.len();
    format!("{number} ({images} image{})", if images == 1 { "" } else { "s" })
}

fn sop_class_name(uid: &str) -> String {
    use dicom_core::dictionary::UidDictionary;
    dicom_dictionary_std::StandardSopClassDictionary
        .by_uid(uid)
        .map(|e| e.name.to_string())
        .unwrap_or(uid.to_string())
}

/// Extent of the series along its slice normal, in mm.
fn coverage_mm(group: &SeriesGroup) -> f64 {
    let Some(orientation) = group.first().image_orientation else {
        return 0.0;
    };
    let normal = slice_normal(orientation);
    let along: Vec<f64> =
        group.instances.iter().filter_map(|i| i.image_position).map(|p| dot(p, normal)).collect();
    let low = along.iter().copied().fold(f64::INFINITY, f64::min);
    let high = along.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if along.is_empty() {
        0.0
    } else {
        high - low
    }
}

/// Why a series does not fit the screening rules, or None when it does.
fn unfit(group: &SeriesGroup, rules: &SelectionRules) -> Option<String> {
    let first = group.first();
    if group.modality() != "CT" {
        let modality = if group.modality().is_empty() { "none" } else { group.modality() };
        return Some(format!("modality {modality}, not CT"));
    }
    if !is_ct_image(group) {
        return Some(format!("{}, not CT Image Storage", sop_class_name(&first.sop_class_uid)));
    }
    let image_type = &first.image_type;
    let original = image_type.first().map(|v| v == "ORIGINAL").unwrap_or(true);
    let primary = image_type.get(1).map(|v| v == "PRIMARY").unwrap_or(true);
    let axial = image_type.get(2).map(|v| v == "AXIAL").unwrap_or(true);
    if !(original && primary && axial) {
        return Some(format!(
            "image type {} (ORIGINAL\\PRIMARY\\AXIAL needed)",
            image_type.join("\\")
        ));
    }
    if let Some(agent) = &first.contrast_bolus_agent {
        return Some(format!("contrast-enhanced (contrast agent {agent})"));
    }
    let (thinnest, thickest) = rules.slice_thickness_mm;
    if let Some(thickness) = first.slice_thickness {
        if thickness < thinnest || thickness > thickest {
            return Some(format!(
                "slice thickness {thickness} mm, outside {thinnest}–{thickest} mm"
            ));
        }
    }
    let slices = group.instances.len();
    if slices < rules.min_slices {
        return Some(format!("{slices} slices, at least {} needed", rules.min_slices));
    }
    if slices > rules.max_slices {
        return Some(format!("{slices} slices, more than the limit of {}", rules.max_slices));
    }
    let coverage = coverage_mm(group);
    if coverage < rules.min_coverage_mm {
        return Some(format!(
            "covers {coverage:.0} mm along the body, at least {:.0} mm needed for the pancreas",
            rules.min_coverage_mm
        ));
    }
    None
}

/// Picks the series to screen and checks it.
///
/// A series fits when it is CT Image Storage with modality CT, ORIGINAL\\PRIMARY\\AXIAL,
/// without contrast agent, with a slice thickness in range, enough (and not too many)
/// slices, and enough coverage for the pancreas. Among fitting series the one with the
/// most slices is checked first; if its geometry fails, the next one is tried.
pub fn choose_series(
    series: &[SeriesGroup],
    rules: &SelectionRules,
) -> Result<ChosenSeries, Rejection> {
    if !series.iter().any(is_ct_image) {
        let mut found: Vec<String> =
            series.iter().map(|group| group.modality().to_string()).collect();
        found.sort();
        found.dedup();
        let found = found
            .iter()
            .map(|m| if m.is_empty() { "no modality" } else { m.as_str() })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Rejection::new(
            "study has no CT image series to screen",
            format!("modalities found: {found}"),
        ));
    }
    let mut verdicts: Vec<(usize, String)> = Vec::new();
    let mut fitting: Vec<usize> = Vec::new();
    for (index, group) in series.iter().enumerate() {
        match unfit(group, rules) {
            Some(why) => verdicts.push((index, why)),
            None => fitting.push(index),
        }
    }
    if fitting.is_empty() {
        let detail = verdicts
            .iter()
            .map(|(i, why)| format!("{}: {why}", series_label(&series[*i])))
            .collect::<Vec<_>>();
        return Err(Rejection::new("no series fits the screening rules", detail.join("; ")));
    }
    // Most slices first; ties go to the lower series number (the scanner's first reconstruction).
    fitting.sort_by_key(|i| {
        (std::cmp::Reverse(series[*i].instances.len()), series[*i].first().series_number)
    });
    let mut first_failure: Option<Rejection> = None;
    for (rank, index) in fitting.iter().enumerate() {
        let group = &series[*index];
        match check_geometry(group, rules) {
            Ok((sorted, slice_spacing_mm, note)) => {
                let uid = |i: usize| series[i].series_instance_uid.clone();
                let mut not_chosen: Vec<(String, String)> = verdicts
                    .iter()
                    .map(|(i, why)| (uid(*i), format!("{}: {why}", series_label(&series[*i]))))
                    .collect();
                for other in fitting.iter().filter(|other| *other != index) {
                    let tried_before = fitting.iter().position(|f| f == other) < Some(rank);
                    let mut text = format!(
                        "{}: {}",
                        series_label(&series[*other]),
                        if tried_before {
                            "fits, but its geometry failed"
                        } else {
                            "fits, but has fewer slices"
                        }
                    );
                    if let (true, Some(failure)) = (tried_before, &first_failure) {
                        text = format!("{text} ({}: {})", failure.reason, failure.detail);
                    }
                    not_chosen.push((uid(*other), text));
                }
                let thickness = group
                    .first()
                    .slice_thickness
                    .map(|t| format!("{t} mm slices, "))
                    .unwrap_or_default();
                let reason = format!(
                    "{}: original axial non-contrast CT, {thickness}{} slices over {:.0} mm; {} of {} fitting series{}{note}",
                    series_label(group).split(" (").next().unwrap_or_default(),
                    group.instances.len(),
                    coverage_mm(group),
                    if rank == 0 { "the most slices" } else { "the next" },
                    fitting.len(),
                    format_args!(" ({} series in the study)", series.len()),
                );
                not_chosen.sort_by(|a, b| a.1.cmp(&b.1));
                return Ok(ChosenSeries { group: sorted, reason, slice_spacing_mm, not_chosen });
            }
            Err(rejection) => {
                first_failure.get_or_insert(rejection);
            }
        }
    }
    Err(first_failure.expect("at least one fitting series was checked"))
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
fn check_geometry(
    group: &SeriesGroup,
    rules: &SelectionRules,
) -> Result<(SeriesGroup, f64, String), Rejection> {
    let first = group.first();
    let Some(orientation) = first.image_orientation else {
        return Err(Rejection::new(
            "series has no image orientation",
            "ImageOrientationPatient is missing",
        ));
    };
    for instance in &group.instances {
        if instance.rows != first.rows || instance.columns != first.columns {
            return Err(Rejection::new(
                "series mixes image sizes",
                format!(
                    "{}×{} and {}×{}",
                    first.rows, first.columns, instance.rows, instance.columns
                ),
            ));
        }
        let Some(other) = instance.image_orientation else {
            return Err(Rejection::new("series has a slice without image orientation", ""));
        };
        if orientation.iter().zip(other).any(|(a, b)| (a - b).abs() > 1e-3) {
            return Err(Rejection::new("series mixes slice orientations", ""));
        }
        if instance.image_position.is_none() {
            return Err(Rejection::new(
                "series has a slice without image position",
                "ImagePositionPatient is missing",
            ));
        }
        if instance.pixel_spacing != first.pixel_spacing || instance.pixel_spacing.is_none() {
            return Err(Rejection::new("series has missing or mixed pixel spacing", ""));
        }
    }
    let normal = slice_normal(orientation);
    let oblique_degrees = normal[2].abs().clamp(0.0, 1.0).acos().to_degrees();
    if oblique_degrees > rules.max_oblique_degrees {
        return Err(Rejection::new(
            "series is oblique",
            format!(
                "the slices are tilted {oblique_degrees:.1}° from axial; at most {}° is resampled",
                rules.max_oblique_degrees
            ),
        ));
    }
    if let Some(tilt) = first.gantry_tilt.filter(|tilt| tilt.abs() > rules.max_tilt_degrees) {
        return Err(Rejection::new(
            "series was acquired with gantry tilt",
            format!("GantryDetectorTilt is {tilt}°; sheared volumes are not screened"),
        ));
    }
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
    // Slices of a tilted gantry step sideways as well as along the normal.
    let (start, end) = (
        sorted.instances[0].image_position.expect("checked"),
        sorted.instances.last().and_then(|i| i.image_position).expect("checked"),
    );
    let step = [end[0] - start[0], end[1] - start[1], end[2] - start[2]];
    let along = dot(step, normal);
    let sideways = (dot(step, step) - along * along).max(0.0).sqrt();
    let shear_degrees = sideways.atan2(along.abs()).to_degrees();
    if shear_degrees > rules.max_tilt_degrees.max(0.1) {
        return Err(Rejection::new(
            "series was acquired with gantry tilt",
            format!(
                "the slice positions step {shear_degrees:.1}° off the slice normal; sheared volumes are not screened"
            ),
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
        let missing: usize = gaps
            .iter()
            .map(|(_, interval)| ((interval / median).round() as usize).saturating_sub(1))
            .sum();
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
    let note = if oblique_degrees > 0.5 {
        format!("; oblique by {oblique_degrees:.1}°, resampled along its own axes")
    } else {
        String::new()
    };
    Ok((sorted, median, note))
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
            gantry_tilt: None,
            frame_positions: Vec::new(),
            frame: None,
        }
    }

    fn rules() -> SelectionRules {
        SelectionRules { min_slices: 3, min_coverage_mm: 0.0, ..SelectionRules::default() }
    }

    #[test]
    fn sorts_slices_along_the_normal() {
        let series = group_series([5.0, 0.0, 7.5, 2.5].map(|z| instance("s", z)).to_vec());
        let chosen = choose_series(&series, &rules()).unwrap();
        let z: Vec<f64> =
            chosen.group.instances.iter().map(|i| i.image_position.unwrap()[2]).collect();
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
        assert_eq!(
            choose_series(&duplicate, &rules()).unwrap_err().reason,
            "series has duplicate slice positions"
        );
        let uneven = group_series([0.0, 2.5, 5.0, 8.0, 10.5].map(|z| instance("s", z)).to_vec());
        assert_eq!(
            choose_series(&uneven, &rules()).unwrap_err().reason,
            "series has uneven slice spacing"
        );
    }

    #[test]
    fn tilt_seen_in_positions_and_obliquity_are_judged() {
        // No GantryDetectorTilt, but each slice steps 1 mm sideways per 2.5 mm: 21.8°.
        let sheared: Vec<InstanceHeader> = (0..6)
            .map(|i| {
                let mut slice = instance("s", i as f64 * 2.5);
                slice.image_position = Some([0.0, i as f64, i as f64 * 2.5]);
                slice
            })
            .collect();
        let rejection = choose_series(&group_series(sheared), &rules()).unwrap_err();
        assert_eq!(rejection.reason, "series was acquired with gantry tilt");
        assert!(rejection.detail.contains("21.8°"), "{}", rejection.detail);
        // 4° oblique: accepted, resampled along its own axes, and said so.
        let angle = 4f64.to_radians();
        let oblique: Vec<InstanceHeader> = (0..6)
            .map(|i| {
                let mut slice = instance("s", 0.0);
                slice.image_orientation = Some([1.0, 0.0, 0.0, 0.0, angle.cos(), -angle.sin()]);
                let step = i as f64 * 2.5;
                slice.image_position = Some([0.0, angle.sin() * step, angle.cos() * step]);
                slice
            })
            .collect();
        let chosen = choose_series(&group_series(oblique), &rules()).unwrap();
        assert!(chosen.reason.contains("oblique by 4.0°"), "{}", chosen.reason);
        assert!((chosen.slice_spacing_mm - 2.5).abs() < 1e-9);
    }

    #[test]
    fn thickness_coverage_and_slice_limits_explain_themselves() {
        let mut thick: Vec<InstanceHeader> =
            [0.0, 7.5, 15.0, 22.5].map(|z| instance("t", z)).to_vec();
        thick.iter_mut().for_each(|i| i.slice_thickness = Some(7.5));
        let rejection = choose_series(&group_series(thick), &rules()).unwrap_err();
        assert_eq!(rejection.reason, "no series fits the screening rules");
        assert!(
            rejection.detail.contains("slice thickness 7.5 mm, outside 0.5–5 mm"),
            "{}",
            rejection.detail
        );
        let short = group_series([0.0, 2.5, 5.0].map(|z| instance("s", z)).to_vec());
        let strict = SelectionRules { min_coverage_mm: 100.0, ..rules() };
        let rejection = choose_series(&short, &strict).unwrap_err();
        assert!(rejection.detail.contains("covers 5 mm"), "{}", rejection.detail);
        let capped = SelectionRules { max_slices: 2, ..rules() };
        assert!(choose_series(&short, &capped)
            .unwrap_err()
            .detail
            .contains("more than the limit of 2"));
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
        let mut contrast: Vec<InstanceHeader> =
            [0.0, 0.5, 1.0, 1.5, 2.0, 2.5].map(|z| instance("c", z)).to_vec();
        contrast.iter_mut().for_each(|i| i.contrast_bolus_agent = Some("IODINE".into()));
        instances.extend(contrast);
        let chosen = choose_series(&group_series(instances), &rules()).unwrap();
        assert_eq!(chosen.group.series_instance_uid, "b");
        assert!(chosen.reason.contains("the most slices of 2 fitting series"), "{}", chosen.reason);
        assert!(
            chosen.not_chosen.iter().any(|(_, why)| why.contains("contrast agent IODINE")),
            "{:?}",
            chosen.not_chosen
        );
        assert!(
            chosen.not_chosen.iter().any(|(_, why)| why.contains("fewer slices")),
            "{:?}",
            chosen.not_chosen
        );
    }
}
