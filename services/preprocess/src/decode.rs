//! One DICOM slice, decoded: its geometry and its pixels in HU.

use std::io::Cursor;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use panscreen_shared::error::StageError;

use crate::hu::{frame_to_hu, PixelFormat};

#[derive(Debug, Clone)]
pub struct DecodedSlice {
    pub position: [f64; 3],
    pub rows: usize,
    pub columns: usize,
    pub hu: Vec<f32>,
}

fn number(object: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    object.element_opt(tag).ok().flatten().and_then(|element| element.to_float64().ok())
}

fn integer(object: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    object.element_opt(tag).ok().flatten().and_then(|element| element.to_int::<i64>().ok())
}

/// Parses a whole Part 10 object and converts its first frame to HU.
pub fn decode_slice(key: &str, bytes: &[u8], fill_hu: f32) -> Result<DecodedSlice, StageError> {
    let unreadable = |detail: String| StageError::permanent("cannot decode a slice", format!("{key}: {detail}"));
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(unreadable("not a DICOM Part 10 file".to_string()));
    }
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(Cursor::new(&bytes[128..]))
        .map_err(|error| unreadable(error.to_string()))?;
    let rows = integer(&object, tags::ROWS).ok_or_else(|| unreadable("Rows is missing".into()))? as usize;
    let columns = integer(&object, tags::COLUMNS).ok_or_else(|| unreadable("Columns is missing".into()))? as usize;
    let position: [f64; 3] = object
        .element_opt(tags::IMAGE_POSITION_PATIENT)
        .ok()
        .flatten()
        .and_then(|element| element.to_multi_float64().ok())
        .and_then(|values| values.try_into().ok())
        .ok_or_else(|| unreadable("ImagePositionPatient is missing".into()))?;
    let format = PixelFormat {
        bits_allocated: integer(&object, tags::BITS_ALLOCATED).unwrap_or(16) as u16,
        bits_stored: integer(&object, tags::BITS_STORED).unwrap_or(16) as u16,
        pixel_representation: integer(&object, tags::PIXEL_REPRESENTATION).unwrap_or(0) as u16,
        rescale_slope: number(&object, tags::RESCALE_SLOPE).unwrap_or(1.0),
        rescale_intercept: number(&object, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        padding_value: integer(&object, tags::PIXEL_PADDING_VALUE).map(|v| v as i32),
    };
    let decoded = object.decode_pixel_data().map_err(|error| unreadable(error.to_string()))?;
    let hu =
        frame_to_hu(decoded.data(), rows * columns, &format, fill_hu).map_err(|error| unreadable(error.to_string()))?;
    Ok(DecodedSlice { position, rows, columns, hu })
}
