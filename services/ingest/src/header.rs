//! Reading one object's DICOM header, never its pixel data.
//!
//! Only the first `header_bytes` of an object are fetched, and more only when the header
//! is longer ([`crate::read_header`]). The parser stops at Pixel Data. A separate check
//! reads the Pixel Data element's declared length from the raw bytes and compares it with
//! the object size, so a truncated file is caught here, before any decoding.

use std::io::Cursor;

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use panscreen_dicom::{LengthProblem, Walked};

pub use crate::error::HeaderProblem;

/// The header fields ingest uses. Patient identifiers are read only to be pseudonymized.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceHeader {
    pub key: String,
    pub size: u64,
    pub transfer_syntax: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub modality: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub patient_age: String,
    pub study_date: String,
    pub institution_name: String,
    pub series_number: Option<i32>,
    pub instance_number: Option<i32>,
    pub image_type: Vec<String>,
    pub image_position: Option<[f64; 3]>,
    pub image_orientation: Option<[f64; 6]>,
    pub pixel_spacing: Option<[f64; 2]>,
    pub slice_thickness: Option<f64>,
    pub rows: u32,
    pub columns: u32,
    pub bits_allocated: u32,
    pub number_of_frames: u32,
    pub contrast_bolus_agent: Option<String>,
    /// GantryDetectorTilt in degrees, when the header has it.
    pub gantry_tilt: Option<f64>,
    /// Enhanced CT: ImagePositionPatient of every frame (empty for a single-frame image).
    pub frame_positions: Vec<[f64; 3]>,
    /// Which frame of a multi-frame object this instance stands for (after
    /// [`InstanceHeader::frames`]).
    pub frame: Option<u32>,
}

impl InstanceHeader {
    /// One instance per frame for an Enhanced CT object (same key, its frame's position);
    /// a single-frame image as it is.
    pub fn frames(self) -> Vec<InstanceHeader> {
        if self.frame_positions.is_empty() {
            return vec![self];
        }
        let positions = self.frame_positions.clone();
        positions
            .into_iter()
            .enumerate()
            .map(|(index, position)| InstanceHeader {
                image_position: Some(position),
                frame: Some(index as u32),
                frame_positions: Vec::new(),
                ..self.clone()
            })
            .collect()
    }

    /// Bytes the pixel data will take once decoded (all frames).
    pub fn decoded_bytes(&self) -> u64 {
        self.rows as u64
            * self.columns as u64
            * (self.bits_allocated.max(8) as u64 / 8)
            * self.number_of_frames as u64
    }
}

/// Does this look like a DICOM Part 10 file (preamble + "DICM")?
pub fn has_dicom_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 132 && &bytes[128..132] == b"DICM"
}

/// Parses the header in `bytes` (a prefix of the object, or all of it).
pub fn parse(key: &str, size: u64, bytes: &[u8]) -> Result<InstanceHeader, HeaderProblem> {
    if !has_dicom_magic(bytes) {
        let what = if size < 132 {
            format!("{size} bytes, too short for a DICOM preamble")
        } else {
            "no DICM marker at byte 128".to_string()
        };
        return Err(HeaderProblem::NotDicom(what));
    }
    // The parser allocates a value's declared length before reading it: refuse lengths
    // the object cannot hold first.
    let walked =
        panscreen_dicom::check_declared_lengths(bytes, size).map_err(|problem| match problem {
            LengthProblem::Cut(detail) => HeaderProblem::Truncated(detail),
            LengthProblem::Inflates(detail) => HeaderProblem::Inflates(detail),
            LengthProblem::Corrupt(detail) => HeaderProblem::Invalid(detail),
        })?;
    // A panic in the parser on a malformed file is that file's problem, not ingest's.
    let parsed = std::panic::catch_unwind(|| {
        OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .read_preamble(ReadPreamble::Never)
            .from_reader(Cursor::new(&bytes[128..]))
    })
    .map_err(|_| HeaderProblem::Invalid("the DICOM parser failed on this file".to_string()))?;
    let object = parsed.map_err(|error| classify_parse_error(size, bytes.len() as u64, &error))?;
    if let Some(name) = non_image_sop_class(&object) {
        return Err(HeaderProblem::NonImage(name));
    }
    check_pixel_data(&object, size, walked)?;
    header_from_object(key, size, &object)
}

/// The SOP class name of an object whose class the standard names and which is not an
/// image storage class (a dose report, a presentation state, a PDF…).
fn non_image_sop_class(object: &DefaultDicomObject) -> Option<String> {
    use dicom_core::dictionary::UidDictionary;
    let uid =
        object.get(tags::SOP_CLASS_UID)?.to_str().ok()?.trim_end_matches('\0').trim().to_string();
    let entry = dicom_dictionary_std::StandardSopClassDictionary.by_uid(&uid)?;
    (!entry.name.contains("Image Storage")).then(|| entry.name.to_string())
}

/// A parse error on a prefix may only mean the header is longer than the prefix: the
/// parser ran out of bytes when an `UnexpectedEof` I/O error is among its causes.
fn classify_parse_error(
    size: u64,
    available: u64,
    error: &(dyn std::error::Error + 'static),
) -> HeaderProblem {
    let message = error.to_string();
    let mut cause = Some(error);
    let mut ran_out = false;
    while let Some(current) = cause {
        ran_out |= current
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof);
        cause = current.source();
    }
    if ran_out && available >= size {
        HeaderProblem::Truncated(format!("the header ends early ({size} bytes): {message}"))
    } else if ran_out {
        HeaderProblem::NeedsMoreBytes(format!("need more than {available} bytes: {message}"))
    } else {
        HeaderProblem::Invalid(message)
    }
}

/// Is a prefix-parse failure one that more bytes could cure?
pub fn needs_more_bytes(problem: &HeaderProblem) -> bool {
    matches!(problem, HeaderProblem::NeedsMoreBytes(_))
}

/// An image must have Pixel Data. The declared-length walk said where it is (and has
/// already refused one that runs past the end of the object as truncated); an object
/// walked to its end without meeting it is truncated before its pixels.
fn check_pixel_data(
    object: &DefaultDicomObject,
    size: u64,
    walked: Walked,
) -> Result<(), HeaderProblem> {
    let transfer_syntax = object.meta().transfer_syntax().trim_end_matches('\0');
    if transfer_syntax == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN {
        return Ok(()); // inside the compressed stream; checked when decoded
    }
    if walked.pixel_data.is_none() && walked.whole {
        return Err(HeaderProblem::Truncated(format!("no Pixel Data element in {size} bytes")));
    }
    // Met, or beyond the prefix read (the decoder reads the rest).
    Ok(())
}

fn header_from_object(
    key: &str,
    size: u64,
    object: &DefaultDicomObject,
) -> Result<InstanceHeader, HeaderProblem> {
    let text = |tag: Tag| -> String {
        object
            .get(tag)
            .and_then(|element| {
                element.to_str().ok().map(|value| value.trim().trim_end_matches('\0').to_string())
            })
            .unwrap_or_default()
    };
    let floats = |tag: Tag| -> Option<Vec<f64>> {
        object.get(tag).and_then(|element| element.to_multi_float64().ok())
    };
    let integer = |tag: Tag| -> Option<i64> {
        object.get(tag).and_then(|element| element.to_int::<i64>().ok())
    };
    let required = |tag: Tag, name: &str| -> Result<String, HeaderProblem> {
        let value = text(tag);
        if value.is_empty() {
            return Err(HeaderProblem::Invalid(format!("{name} is missing")));
        }
        Ok(value)
    };
    // Enhanced CT keeps geometry and rescale in functional groups, one position per frame.
    let enhanced = panscreen_dicom::has_functional_groups(object);
    let frames = panscreen_dicom::number_of_frames(object);
    let frame_positions = if enhanced {
        if frames > 20_000 {
            return Err(HeaderProblem::Invalid(format!("{frames} frames; at most 20000 are read")));
        }
        (0..frames as usize)
            .map(|frame| panscreen_dicom::frame_position(object, frame))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                HeaderProblem::Invalid("a frame has no PlanePositionSequence".to_string())
            })?
    } else {
        Vec::new()
    };
    let measures = |tag: Tag| {
        panscreen_dicom::frame_floats(object, 0, panscreen_dicom::groups::PIXEL_MEASURES, tag)
    };
    let contrast_sequence = object
        .get(panscreen_dicom::groups::CONTRAST_BOLUS_AGENT_SEQUENCE)
        .and_then(|element| element.items().map(|items| !items.is_empty()))
        .unwrap_or(false);
    let image_type = text(tags::IMAGE_TYPE)
        .split('\\')
        .map(|part| part.trim().to_uppercase())
        .filter(|p| !p.is_empty())
        .collect();
    Ok(InstanceHeader {
        key: key.to_string(),
        size,
        transfer_syntax: object.meta().transfer_syntax().trim_end_matches('\0').to_string(),
        sop_class_uid: required(tags::SOP_CLASS_UID, "SOPClassUID")?,
        sop_instance_uid: required(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
        study_instance_uid: required(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
        series_instance_uid: required(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
        modality: text(tags::MODALITY).to_uppercase(),
        patient_id: text(tags::PATIENT_ID),
        issuer_of_patient_id: text(tags::ISSUER_OF_PATIENT_ID),
        patient_birth_date: text(tags::PATIENT_BIRTH_DATE),
        patient_sex: text(tags::PATIENT_SEX).to_uppercase(),
        patient_age: text(tags::PATIENT_AGE),
        study_date: text(tags::STUDY_DATE),
        institution_name: text(tags::INSTITUTION_NAME),
        series_number: integer(tags::SERIES_NUMBER).map(|v| v as i32),
        instance_number: integer(tags::INSTANCE_NUMBER).map(|v| v as i32),
        image_type,
        image_position: match frame_positions.first() {
            Some(first) => Some(*first),
            None => floats(tags::IMAGE_POSITION_PATIENT).and_then(|v| v.try_into().ok()),
        },
        image_orientation: panscreen_dicom::frame_orientation(object, 0),
        pixel_spacing: measures(tags::PIXEL_SPACING).and_then(|v| v.try_into().ok()),
        slice_thickness: measures(tags::SLICE_THICKNESS).and_then(|v| v.first().copied()),
        rows: integer(tags::ROWS).unwrap_or(0) as u32,
        columns: integer(tags::COLUMNS).unwrap_or(0) as u32,
        bits_allocated: integer(tags::BITS_ALLOCATED).unwrap_or(0) as u32,
        number_of_frames: integer(tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as u32,
        contrast_bolus_agent: Some(text(tags::CONTRAST_BOLUS_AGENT))
            .filter(|value| !value.is_empty())
            .or_else(|| contrast_sequence.then(|| "(Contrast/Bolus Agent Sequence)".to_string())),
        gantry_tilt: floats(tags::GANTRY_DETECTOR_TILT).and_then(|v| v.first().copied()),
        frame_positions,
        frame: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_files_are_not_dicom() {
        let problem = parse("notes.txt", 11, b"hello world").unwrap_err();
        assert_eq!(problem.reason(), "not a DICOM file");
        assert!(problem.detail().contains("too short"));
        let mut long = vec![b'x'; 300];
        long[0] = 0;
        assert_eq!(parse("x.bin", 300, &long).unwrap_err().reason(), "not a DICOM file");
    }
}
