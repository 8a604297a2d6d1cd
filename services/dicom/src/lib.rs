//! DICOM at the byte and attribute level, for the two stages that read DICOM (ingest
//! and preprocess); `shared` carries no DICOM dependency.
//!
//! - [`lengths`]: the declared-length walk that runs before any parser allocates (a
//!   flipped bit in a length field must not make a parser ask for gigabytes), with
//!   deflated data sets inflated under a cap; it also says where Pixel Data is.
//! - [`enhanced`]: per-frame attribute look-ups, for classic CT images and Enhanced CT
//!   (functional groups) alike.
//!
//! Tags, UIDs and transfer syntaxes come from dicom-rs' dictionary, not literals.

pub mod enhanced;
pub mod lengths;

pub use enhanced::{
    frame_attribute, frame_floats, frame_orientation, frame_position, frame_rescale, groups,
    has_functional_groups, number_of_frames,
};
pub use lengths::{check_declared_lengths, LengthProblem, PixelDataAt, Walked, DEFLATED_MAX_BYTES};
