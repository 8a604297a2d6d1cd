//! Attribute look-ups that ingest and preprocess both make, for single-frame images and
//! for multi-frame Enhanced CT alike.
//!
//! An Enhanced CT object keeps per-frame attributes in functional groups: a frame's own
//! item of PerFrameFunctionalGroupsSequence first, then the SharedFunctionalGroupsSequence.
//! A classic CT Image has them at the top level. [`frame_attribute`] looks in that order.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;

/// Functional group macros (sequence tags) and the attributes panscreen reads from them,
/// under the names this crate's callers use (values from the standard's dictionary).
pub mod groups {
    use dicom_core::Tag;
    use dicom_dictionary_std::tags;
    /// Plane Position (Patient): ImagePositionPatient.
    pub const PLANE_POSITION: Tag = tags::PLANE_POSITION_SEQUENCE;
    /// Plane Orientation (Patient): ImageOrientationPatient.
    pub const PLANE_ORIENTATION: Tag = tags::PLANE_ORIENTATION_SEQUENCE;
    /// Pixel Measures: PixelSpacing, SliceThickness.
    pub const PIXEL_MEASURES: Tag = tags::PIXEL_MEASURES_SEQUENCE;
    /// Pixel Value Transformation: RescaleIntercept, RescaleSlope.
    pub const PIXEL_VALUE_TRANSFORMATION: Tag = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
    /// CT Image Frame Type: FrameType (the Enhanced CT counterpart of ImageType).
    pub const CT_IMAGE_FRAME_TYPE: Tag = tags::CT_IMAGE_FRAME_TYPE_SEQUENCE;
    pub const FRAME_TYPE: Tag = tags::FRAME_TYPE;
    /// Contrast/Bolus Usage (per frame) and the Enhanced Contrast/Bolus agent sequence.
    pub const CONTRAST_BOLUS_USAGE: Tag = tags::CONTRAST_BOLUS_USAGE_SEQUENCE;
    pub const CONTRAST_BOLUS_AGENT_SEQUENCE: Tag = tags::CONTRAST_BOLUS_AGENT_SEQUENCE;
}

/// `get`, not `element_opt`: the latter captures a backtrace for every absent element
/// (clippy.toml disallows it).
fn element(object: &InMemDicomObject, tag: Tag) -> Option<&InMemElement> {
    object.get(tag)
}

/// The first item of sequence `group` in `object`, if any.
fn first_item(object: &InMemDicomObject, group: Tag) -> Option<&InMemDicomObject> {
    element(object, group)?.items()?.first()
}

/// `attribute` for frame `frame` (0-based): in the frame's functional group `group`, then
/// in the shared functional group, then at the top level.
pub fn frame_attribute(
    object: &InMemDicomObject,
    frame: usize,
    group: Tag,
    attribute: Tag,
) -> Option<&InMemElement> {
    let per_frame = element(object, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|sequence| sequence.items())
        .and_then(|items| items.get(frame))
        .and_then(|item| first_item(item, group))
        .and_then(|macro_item| element(macro_item, attribute));
    per_frame
        .or_else(|| {
            first_item(object, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
                .and_then(|shared| first_item(shared, group))
                .and_then(|macro_item| element(macro_item, attribute))
        })
        .or_else(|| element(object, attribute))
}

/// Numbers of `attribute` for a frame, if present and numeric.
pub fn frame_floats(
    object: &InMemDicomObject,
    frame: usize,
    group: Tag,
    attribute: Tag,
) -> Option<Vec<f64>> {
    frame_attribute(object, frame, group, attribute)
        .and_then(|element| element.to_multi_float64().ok())
}

/// ImagePositionPatient of a frame.
pub fn frame_position(object: &InMemDicomObject, frame: usize) -> Option<[f64; 3]> {
    frame_floats(object, frame, groups::PLANE_POSITION, tags::IMAGE_POSITION_PATIENT)?
        .try_into()
        .ok()
}

/// ImageOrientationPatient of a frame.
pub fn frame_orientation(object: &InMemDicomObject, frame: usize) -> Option<[f64; 6]> {
    frame_floats(object, frame, groups::PLANE_ORIENTATION, tags::IMAGE_ORIENTATION_PATIENT)?
        .try_into()
        .ok()
}

/// (RescaleSlope, RescaleIntercept) of a frame; (1, 0) when absent.
pub fn frame_rescale(object: &InMemDicomObject, frame: usize) -> (f64, f64) {
    let first = |tag| {
        frame_floats(object, frame, groups::PIXEL_VALUE_TRANSFORMATION, tag)
            .and_then(|v| v.first().copied())
    };
    (first(tags::RESCALE_SLOPE).unwrap_or(1.0), first(tags::RESCALE_INTERCEPT).unwrap_or(0.0))
}

/// NumberOfFrames, at least 1.
pub fn number_of_frames(object: &InMemDicomObject) -> u32 {
    element(object, tags::NUMBER_OF_FRAMES)
        .and_then(|e| e.to_int::<i64>().ok())
        .unwrap_or(1)
        .clamp(1, u32::MAX as i64) as u32
}

/// Is this an Enhanced CT (or other multi-frame functional-group) object?
pub fn has_functional_groups(object: &InMemDicomObject) -> bool {
    element(object, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).is_some()
        || element(object, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).is_some()
}
