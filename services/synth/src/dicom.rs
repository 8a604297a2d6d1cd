//! Writes one synthetic slice as a CT Image Storage file, Explicit VR Little Endian.

use dicom_core::smallvec::SmallVec;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

/// What is the same for every slice of a series.
#[derive(Debug, Clone)]
pub struct SeriesHeader {
    pub patient_name: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub patient_age: String,
    pub accession_number: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub frame_of_reference_uid: String,
    pub study_date: String,
    pub study_time: String,
    pub institution_name: String,
    pub modality: String,
    pub series_number: i32,
    pub series_description: String,
    pub rows: u16,
    pub columns: u16,
    pub pixel_spacing: [f64; 2],
    pub slice_thickness: f64,
    /// Unsigned with intercept -1024, or signed with intercept 0, as scanners differ.
    pub signed_pixels: bool,
    pub bits_stored: u16,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    /// PixelPaddingValue (a stored value): pixels outside the reconstruction circle.
    pub padding_value: Option<i32>,
    /// CT Image Storage for the series to screen; Secondary Capture for a screenshot.
    pub sop_class_uid: String,
    /// ImageType, e.g. ORIGINAL\\PRIMARY\\AXIAL or ORIGINAL\\PRIMARY\\LOCALIZER.
    pub image_type: Vec<String>,
    /// ImageOrientationPatient (row, then column direction cosines).
    pub orientation: [f64; 6],
    /// ContrastBolusAgent of a contrast-enhanced phase.
    pub contrast_agent: Option<String>,
    /// GantryDetectorTilt in degrees (0 on most scanners).
    pub gantry_tilt: f64,
    /// PatientPosition: HFS (head first, supine), HFP (prone), FFS (feet first)…
    pub patient_position: String,
}

impl SeriesHeader {
    /// A plain original axial CT series (64×64, 2.5 mm slices, unsigned 12 bits) of a
    /// made-up patient (`TEST^PATIENT`, `PID0001`, `ACC1`, born 1960-01-01). A test
    /// states only what it changes: `SeriesHeader { rows: 32, ..SeriesHeader::plain_ct() }`.
    pub fn plain_ct() -> SeriesHeader {
        let (sop_class_uid, image_type, orientation) = Self::axial_ct();
        SeriesHeader {
            patient_name: "TEST^PATIENT".into(),
            patient_id: "PID0001".into(),
            issuer_of_patient_id: "NB-J01".into(),
            patient_birth_date: "19600101".into(),
            patient_sex: "F".into(),
            patient_age: "065Y".into(),
            accession_number: "ACC1".into(),
            study_instance_uid: "2.25.1".into(),
            series_instance_uid: "2.25.2".into(),
            frame_of_reference_uid: "2.25.3".into(),
            study_date: "20250101".into(),
            study_time: "101010".into(),
            institution_name: "Jiangbei District Hospital".into(),
            modality: "CT".into(),
            series_number: 2,
            series_description: "ABD 2.5mm".into(),
            rows: 64,
            columns: 64,
            pixel_spacing: [0.7, 0.7],
            slice_thickness: 2.5,
            signed_pixels: false,
            bits_stored: 12,
            rescale_slope: 1.0,
            rescale_intercept: -1024.0,
            padding_value: None,
            sop_class_uid,
            image_type,
            orientation,
            contrast_agent: None,
            gantry_tilt: 0.0,
            patient_position: "HFS".into(),
        }
    }

    /// The ImageType, orientation and SOP class of a plain original axial CT series.
    pub fn axial_ct() -> (String, Vec<String>, [f64; 6]) {
        (
            uids::CT_IMAGE_STORAGE.to_string(),
            ["ORIGINAL", "PRIMARY", "AXIAL"].map(String::from).to_vec(),
            [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        )
    }
}

/// One slice: its identity, position and noisy HU.
pub struct Slice<'a> {
    pub sop_instance_uid: &'a str,
    pub instance_number: i32,
    pub position: [f64; 3],
    pub hu: &'a [f32],
}

/// Formats a decimal string (VR DS, at most 16 characters).
pub fn ds(value: f64) -> String {
    for decimals in (0..=6).rev() {
        let text = format!("{value:.decimals$}");
        let text = if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        };
        if text.len() <= 16 {
            return text;
        }
    }
    format!("{value:.0}")
}

fn text(tag: dicom_core::Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn multi(tag: dicom_core::Tag, vr: VR, values: &[String]) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::Strs(values.iter().cloned().collect()))
}

fn u16_value(tag: dicom_core::Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

/// Stored pixel values for `hu` under the header's rescale and pixel representation.
pub fn stored_values(header: &SeriesHeader, hu: &[f32]) -> Vec<u16> {
    let max_unsigned = ((1u32 << header.bits_stored) - 1) as f64;
    let (low, high) = if header.signed_pixels {
        (-(max_unsigned + 1.0) / 2.0, (max_unsigned - 1.0) / 2.0)
    } else {
        (0.0, max_unsigned)
    };
    hu.iter()
        .map(|value| {
            let stored = ((*value as f64 - header.rescale_intercept) / header.rescale_slope)
                .round()
                .clamp(low, high);
            if header.signed_pixels {
                stored as i16 as u16
            } else {
                stored as u16
            }
        })
        .collect()
}

/// Encodes one slice as a DICOM Part 10 file.
pub fn encode_slice(header: &SeriesHeader, slice: &Slice<'_>) -> anyhow::Result<Vec<u8>> {
    let mut object = InMemDicomObject::new_empty();
    let put = |object: &mut InMemDicomObject, element| {
        object.put(element);
    };
    put(&mut object, text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"));
    put(&mut object, multi(tags::IMAGE_TYPE, VR::CS, &header.image_type));
    put(&mut object, text(tags::SOP_CLASS_UID, VR::UI, &header.sop_class_uid));
    put(&mut object, text(tags::SOP_INSTANCE_UID, VR::UI, slice.sop_instance_uid));
    put(&mut object, text(tags::STUDY_DATE, VR::DA, &header.study_date));
    put(&mut object, text(tags::SERIES_DATE, VR::DA, &header.study_date));
    put(&mut object, text(tags::STUDY_TIME, VR::TM, &header.study_time));
    put(&mut object, text(tags::ACCESSION_NUMBER, VR::SH, &header.accession_number));
    put(&mut object, text(tags::MODALITY, VR::CS, &header.modality));
    put(&mut object, text(tags::MANUFACTURER, VR::LO, "panscreen synth"));
    put(&mut object, text(tags::INSTITUTION_NAME, VR::LO, &header.institution_name));
    put(&mut object, text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""));
    put(&mut object, text(tags::STUDY_DESCRIPTION, VR::LO, "CT ABDOMEN WITHOUT CONTRAST"));
    put(&mut object, text(tags::SERIES_DESCRIPTION, VR::LO, &header.series_description));
    put(&mut object, text(tags::PATIENT_NAME, VR::PN, &header.patient_name));
    put(&mut object, text(tags::PATIENT_ID, VR::LO, &header.patient_id));
    put(&mut object, text(tags::ISSUER_OF_PATIENT_ID, VR::LO, &header.issuer_of_patient_id));
    put(&mut object, text(tags::PATIENT_BIRTH_DATE, VR::DA, &header.patient_birth_date));
    put(&mut object, text(tags::PATIENT_SEX, VR::CS, &header.patient_sex));
    put(&mut object, text(tags::PATIENT_AGE, VR::AS, &header.patient_age));
    put(&mut object, text(tags::BODY_PART_EXAMINED, VR::CS, "ABDOMEN"));
    put(&mut object, text(tags::SLICE_THICKNESS, VR::DS, &ds(header.slice_thickness)));
    put(&mut object, text(tags::KVP, VR::DS, "120"));
    put(&mut object, text(tags::PATIENT_POSITION, VR::CS, "FFS"));
    put(&mut object, text(tags::STUDY_INSTANCE_UID, VR::UI, &header.study_instance_uid));
    put(&mut object, text(tags::SERIES_INSTANCE_UID, VR::UI, &header.series_instance_uid));
    put(&mut object, text(tags::STUDY_ID, VR::SH, "1"));
    put(
        &mut object,
        DataElement::new(
            tags::SERIES_NUMBER,
            VR::IS,
            PrimitiveValue::from(header.series_number.to_string()),
        ),
    );
    put(
        &mut object,
        DataElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from(slice.instance_number.to_string()),
        ),
    );
    put(&mut object, multi(tags::IMAGE_POSITION_PATIENT, VR::DS, &slice.position.map(ds)));
    put(&mut object, multi(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &header.orientation.map(ds)));
    put(&mut object, text(tags::PATIENT_POSITION, VR::CS, &header.patient_position));
    if let Some(agent) = &header.contrast_agent {
        put(&mut object, text(tags::CONTRAST_BOLUS_AGENT, VR::LO, agent));
        put(&mut object, text(tags::CONTRAST_BOLUS_ROUTE, VR::LO, "IV"));
    }
    if header.gantry_tilt != 0.0 {
        put(&mut object, text(tags::GANTRY_DETECTOR_TILT, VR::DS, &ds(header.gantry_tilt)));
    }
    put(&mut object, text(tags::FRAME_OF_REFERENCE_UID, VR::UI, &header.frame_of_reference_uid));
    put(&mut object, text(tags::SLICE_LOCATION, VR::DS, &ds(slice.position[2])));
    put(&mut object, u16_value(tags::SAMPLES_PER_PIXEL, 1));
    put(&mut object, text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
    put(&mut object, u16_value(tags::ROWS, header.rows));
    put(&mut object, u16_value(tags::COLUMNS, header.columns));
    put(&mut object, multi(tags::PIXEL_SPACING, VR::DS, &header.pixel_spacing.map(ds)));
    put(&mut object, u16_value(tags::BITS_ALLOCATED, 16));
    put(&mut object, u16_value(tags::BITS_STORED, header.bits_stored));
    put(&mut object, u16_value(tags::HIGH_BIT, header.bits_stored - 1));
    put(&mut object, u16_value(tags::PIXEL_REPRESENTATION, u16::from(header.signed_pixels)));
    put(&mut object, text(tags::WINDOW_CENTER, VR::DS, "40"));
    put(&mut object, text(tags::WINDOW_WIDTH, VR::DS, "400"));
    put(&mut object, text(tags::RESCALE_INTERCEPT, VR::DS, &ds(header.rescale_intercept)));
    put(&mut object, text(tags::RESCALE_SLOPE, VR::DS, &ds(header.rescale_slope)));
    put(&mut object, text(tags::RESCALE_TYPE, VR::LO, "HU"));
    if let Some(padding) = header.padding_value {
        let value = if header.signed_pixels {
            DataElement::new(
                tags::PIXEL_PADDING_VALUE,
                VR::SS,
                PrimitiveValue::from(padding as i16),
            )
        } else {
            DataElement::new(
                tags::PIXEL_PADDING_VALUE,
                VR::US,
                PrimitiveValue::from(padding as u16),
            )
        };
        put(&mut object, value);
    }
    let pixels: SmallVec<[u16; 2]> = stored_values(header, slice.hu).into_iter().collect();
    put(&mut object, DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels)));

    part10(object, slice.hu.len() * 2 + 4096)
}

/// A data set as a Part 10 file, Explicit VR Little Endian, with synth's meta header.
fn part10(object: InMemDicomObject, capacity: usize) -> anyhow::Result<Vec<u8>> {
    let file = object.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .implementation_class_uid("2.25.137038128445412413927304766385618823463")
            .implementation_version_name("PANSCREEN_SYNTH"),
    )?;
    let mut bytes = Vec::with_capacity(capacity);
    file.write_all(&mut bytes)?;
    Ok(bytes)
}

/// Encodes a whole series as one Enhanced CT Image Storage object: one frame per slice,
/// each frame's position in the per-frame functional groups; orientation, spacing,
/// thickness, rescale and frame type in the shared ones.
pub fn encode_enhanced_ct(
    header: &SeriesHeader,
    sop_instance_uid: &str,
    slices: &[Slice<'_>],
) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(!slices.is_empty(), "an Enhanced CT object needs at least one frame");
    let item = |elements: Vec<DataElement<InMemDicomObject>>| {
        InMemDicomObject::from_element_iter(elements)
    };
    let shared = item(vec![
        sequence(
            dicom_core::Tag(0x0028, 0x9110),
            vec![item(vec![
                multi(tags::PIXEL_SPACING, VR::DS, &header.pixel_spacing.map(ds)),
                text(tags::SLICE_THICKNESS, VR::DS, &ds(header.slice_thickness)),
            ])],
        ),
        sequence(
            dicom_core::Tag(0x0020, 0x9116),
            vec![item(vec![multi(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                &header.orientation.map(ds),
            )])],
        ),
        sequence(
            dicom_core::Tag(0x0028, 0x9145),
            vec![item(vec![
                text(tags::RESCALE_INTERCEPT, VR::DS, &ds(header.rescale_intercept)),
                text(tags::RESCALE_SLOPE, VR::DS, &ds(header.rescale_slope)),
                text(tags::RESCALE_TYPE, VR::LO, "HU"),
            ])],
        ),
        sequence(
            dicom_core::Tag(0x0018, 0x9329),
            vec![item(vec![multi(dicom_core::Tag(0x0008, 0x9007), VR::CS, &header.image_type)])],
        ),
    ]);
    let per_frame: Vec<InMemDicomObject> = slices
        .iter()
        .map(|slice| {
            item(vec![sequence(
                dicom_core::Tag(0x0020, 0x9113),
                vec![item(vec![multi(
                    tags::IMAGE_POSITION_PATIENT,
                    VR::DS,
                    &slice.position.map(ds),
                )])],
            )])
        })
        .collect();
    let mut enhanced = header.clone();
    enhanced.sop_class_uid = uids::ENHANCED_CT_IMAGE_STORAGE.to_string();
    let first = Slice {
        sop_instance_uid,
        instance_number: 1,
        position: slices[0].position,
        hu: slices[0].hu,
    };
    let bytes = encode_slice(&enhanced, &first)?;
    let mut object = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(std::io::Cursor::new(&bytes[128..]))?;
    // The classic per-slice attributes live in the functional groups instead.
    for tag in [
        tags::IMAGE_POSITION_PATIENT,
        tags::IMAGE_ORIENTATION_PATIENT,
        tags::PIXEL_SPACING,
        tags::SLICE_THICKNESS,
        tags::SLICE_LOCATION,
        tags::RESCALE_INTERCEPT,
        tags::RESCALE_SLOPE,
        tags::RESCALE_TYPE,
    ] {
        object.remove_element(tag);
    }
    object.put(text(tags::NUMBER_OF_FRAMES, VR::IS, &slices.len().to_string()));
    object.put(sequence(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));
    object.put(sequence(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
    let pixels: SmallVec<[u16; 2]> =
        slices.iter().flat_map(|slice| stored_values(header, slice.hu)).collect();
    object.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels)));
    let mut out = Vec::new();
    object.write_all(&mut out)?;
    Ok(out)
}

fn code_item(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::CODE_VALUE, VR::SH, value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        text(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

fn sequence(tag: dicom_core::Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, dicom_core::value::DataSetSequence::from(items))
}

/// An X-Ray Radiation Dose SR, as CT scanners write beside the images: no pixel data.
pub fn encode_dose_report(
    header: &SeriesHeader,
    sop_instance_uid: &str,
    dlp_mgy_cm: f64,
) -> anyhow::Result<Vec<u8>> {
    const DOSE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.67";
    let dlp = InMemDicomObject::from_element_iter([
        text(tags::RELATIONSHIP_TYPE, VR::CS, "CONTAINS"),
        text(tags::VALUE_TYPE, VR::CS, "NUM"),
        sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![code_item("113838", "DCM", "DLP")]),
        sequence(
            tags::MEASURED_VALUE_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(tags::NUMERIC_VALUE, VR::DS, &ds(dlp_mgy_cm)),
                sequence(
                    tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
                    vec![code_item("mGy.cm", "UCUM", "mGy.cm")],
                ),
            ])],
        ),
    ]);
    let object = InMemDicomObject::from_element_iter([
        text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        text(tags::SOP_CLASS_UID, VR::UI, DOSE_SR),
        text(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid),
        text(tags::STUDY_DATE, VR::DA, &header.study_date),
        text(tags::STUDY_TIME, VR::TM, &header.study_time),
        text(tags::ACCESSION_NUMBER, VR::SH, &header.accession_number),
        text(tags::MODALITY, VR::CS, "SR"),
        text(tags::MANUFACTURER, VR::LO, "panscreen synth"),
        text(tags::INSTITUTION_NAME, VR::LO, &header.institution_name),
        text(tags::PATIENT_NAME, VR::PN, &header.patient_name),
        text(tags::PATIENT_ID, VR::LO, &header.patient_id),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, &header.patient_birth_date),
        text(tags::PATIENT_SEX, VR::CS, &header.patient_sex),
        text(tags::STUDY_INSTANCE_UID, VR::UI, &header.study_instance_uid),
        text(tags::SERIES_INSTANCE_UID, VR::UI, &header.series_instance_uid),
        DataElement::new(
            tags::SERIES_NUMBER,
            VR::IS,
            PrimitiveValue::from(header.series_number.to_string()),
        ),
        text(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        sequence(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code_item("113701", "DCM", "X-Ray Radiation Dose Report")],
        ),
        text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        text(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        text(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        sequence(tags::CONTENT_SEQUENCE, vec![dlp]),
    ]);
    part10(object, 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        assert_eq!(ds(1.5), "1.5");
        assert_eq!(ds(-1024.0), "-1024");
        assert_eq!(ds(0.703125), "0.703125");
        assert!(ds(-123456.123456789).len() <= 16);
    }

    #[test]
    fn stored_values_invert_the_rescale() {
        let mut header = test_header();
        header.signed_pixels = false;
        header.rescale_intercept = -1024.0;
        assert_eq!(stored_values(&header, &[-1024.0, 0.0, 40.4]), vec![0, 1024, 1064]);
        header.signed_pixels = true;
        header.rescale_intercept = 0.0;
        assert_eq!(stored_values(&header, &[-1000.0])[0] as i16, -1000);
    }

    pub(crate) fn test_header() -> SeriesHeader {
        SeriesHeader {
            issuer_of_patient_id: "HOSP".into(),
            institution_name: "Somewhere".into(),
            rows: 2,
            columns: 2,
            ..SeriesHeader::plain_ct()
        }
    }
}
