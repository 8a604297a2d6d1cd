//! DICOM objects to HU, frame by frame.
//!
//! Every transfer syntax that hospitals send is decoded here: implicit and explicit VR
//! little endian, explicit big endian and deflated (native); RLE lossless; JPEG baseline,
//! and lossless (Rust); JPEG extended 12-bit and JPEG-LS lossless and near-lossless (GDCM);
//! JPEG 2000 lossless and lossy (OpenJPEG's Rust port). A classic CT Image is one frame; an Enhanced CT
//! object has many, each with its position in the per-frame functional groups.
//!
//! Before anything is inflated or decoded, the size it will have is checked against
//! [`DecodeLimits`], so a deflate bomb or a header declaring a gigapixel frame is refused
//! without allocating it.

use std::io::{Cursor, Read};

use bytes::Bytes;

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use panscreen_dicom::{frame_position, frame_rescale, number_of_frames, Walked};

use crate::error::PreprocessError;
use crate::gdcm_helper;
use crate::hu::{frame_to_hu_into, PixelFormat};

/// Upper bounds on what one object may expand to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// Largest decoded pixel data (all frames) or inflated data set, in bytes.
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_decoded_bytes: 2 << 30 }
    }
}

#[derive(Debug, Clone)]
pub struct DecodedSlice {
    pub position: [f64; 3],
    pub rows: usize,
    pub columns: usize,
    pub hu: Vec<f32>,
}

fn integer(object: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    object.get(tag).and_then(|element| element.to_int::<i64>().ok())
}

fn unreadable(key: &str, detail: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::undecodable(key, detail)
}

/// Runs third-party parsing or decoding so that a panic on a malformed file (the fuzz
/// test found one in the RLE decoder) becomes this file's error, not the worker's crash.
fn contain_panic<T>(key: &str, work: impl FnOnce() -> T) -> Result<T, PreprocessError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        PreprocessError::DecoderFailed { key: key.to_string(), detail: message.to_string() }
    })
}

/// Bytes of a deflated data set once inflated, counting no further than `cap + 1`.
fn inflated_size(deflated: &[u8], cap: u64) -> std::io::Result<u64> {
    let decoder = flate2::read::DeflateDecoder::new(deflated);
    std::io::copy(&mut decoder.take(cap + 1), &mut std::io::sink())
}

/// Parses a whole Part 10 object (pixel data included, not yet decoded).
pub fn open(
    key: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<DefaultDicomObject, PreprocessError> {
    check_before_parsing(key, bytes, limits)?;
    let object = parse(key, bytes, None)?;
    check_decoded_size(key, &object, limits)?;
    Ok(object)
}

/// An object ready to decode. When its pixel data is native little endian (what CT
/// scanners write), only the header is parsed and the pixels are read where they lie in
/// the file; anything else is parsed whole, as [`open`] does.
pub struct Opened {
    pub object: DefaultDicomObject,
    /// All frames' pixel bytes, when read in place.
    native_pixels: Option<Bytes>,
}

impl Opened {
    /// Whether the pixels are read in place (the header alone was parsed).
    pub fn in_place(&self) -> bool {
        self.native_pixels.is_some()
    }
}

/// [`open`], reading native pixel data in place: it is neither copied into the object
/// nor copied again by the decoder. With [`decode_opened`] it gives the same HU as
/// [`open`] then [`decode_frame`], and refuses the same objects for the same image
/// attributes; display attributes the pixel decoder also checks (window, VOI LUT) are not
/// looked at. The fuzz test compares the two on every case.
pub fn open_in_place(
    key: &str,
    bytes: Bytes,
    limits: &DecodeLimits,
) -> Result<Opened, PreprocessError> {
    let walked = check_before_parsing(key, &bytes, limits)?;
    // Encapsulated pixel data (undefined length) and a deflated data set (no offsets)
    // cannot be read in place: those are parsed once, whole.
    let may_be_native = walked.whole && walked.pixel_data.is_some_and(|at| at.length.is_some());
    if let Some(header) =
        may_be_native.then(|| parse(key, &bytes, Some(tags::PIXEL_DATA)).ok()).flatten()
    {
        if let Some(range) = native_pixel_range(&walked, &header).filter(|r| r.end <= bytes.len()) {
            check_decoded_size(key, &header, limits)?;
            return Ok(Opened { object: header, native_pixels: Some(bytes.slice(range)) });
        }
    }
    let object = parse(key, &bytes, None)?;
    check_decoded_size(key, &object, limits)?;
    Ok(Opened { object, native_pixels: None })
}

/// The implicit and explicit VR little endian transfer syntaxes (deflated and big endian
/// are parsed whole).
const NATIVE_LITTLE_ENDIAN: [&str; 2] = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"];

/// The byte range of the frames in the pixel data of a native little-endian object:
/// where the element walk found the top-level (7FE0,0010) (it walks elements, so a
/// vendor's blob or an icon image's own Pixel Data cannot pass for it), holding exactly
/// the bytes the image attributes imply (one more to make an odd count even). `None`
/// otherwise, and the object is parsed whole.
fn native_pixel_range(
    walked: &Walked,
    header: &DefaultDicomObject,
) -> Option<std::ops::Range<usize>> {
    let syntax = header.meta().transfer_syntax().trim_end_matches('\0');
    if !walked.whole || !NATIVE_LITTLE_ENDIAN.contains(&syntax) {
        return None;
    }
    let at = walked.pixel_data?;
    let attribute = |tag| integer(header, tag).filter(|value| *value > 0);
    let rows = attribute(tags::ROWS)? as u64;
    let columns = attribute(tags::COLUMNS)? as u64;
    let bytes_per_sample = match attribute(tags::BITS_ALLOCATED)? {
        8 => 1,
        16 => 2,
        _ => return None,
    };
    let samples = integer(header, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1) as u64;
    let pixels = rows * columns * samples * bytes_per_sample * u64::from(number_of_frames(header));
    if at.length? != pixels + (pixels & 1) {
        return None;
    }
    let start = usize::try_from(at.offset).ok()?;
    Some(start..start.checked_add(usize::try_from(pixels).ok()?)?)
}

/// What is checked before a parser sees the bytes: the Part 10 preamble, a deflated
/// data set's inflated size, and the declared lengths.
/// Returns what the walk of the declared lengths met.
fn check_before_parsing(
    key: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<Walked, PreprocessError> {
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" {
        return Err(unreadable(key, "not a DICOM Part 10 file"));
    }
    // The meta group starts with its own length: (0002,0000) UL.
    let group_length =
        u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]) as usize;
    let meta_end = 144usize.saturating_add(group_length).min(bytes.len());
    let deflated = bytes[132..meta_end]
        .windows(uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN.len())
        .any(|window| window == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN.as_bytes());
    if deflated {
        let size =
            inflated_size(&bytes[meta_end..], limits.max_decoded_bytes).map_err(|error| {
                unreadable(key, format!("the deflated data set is corrupt: {error}"))
            })?;
        if size > limits.max_decoded_bytes {
            return Err(PreprocessError::TooLarge {
                key: key.to_string(),
                detail: format!(
                    "the deflated data set inflates to over {} bytes",
                    limits.max_decoded_bytes
                ),
            });
        }
    }
    panscreen_dicom::check_declared_lengths(bytes, bytes.len() as u64)
        .map_err(|error| unreadable(key, error))
}

/// Parses the object after its preamble, up to `until` (exclusive) or whole.
fn parse(
    key: &str,
    bytes: &[u8],
    until: Option<Tag>,
) -> Result<DefaultDicomObject, PreprocessError> {
    contain_panic(key, || {
        let options = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
        let options = match until {
            Some(tag) => options.read_until(tag),
            None => options,
        };
        options.from_reader(Cursor::new(&bytes[128..]))
    })?
    .map_err(|error| unreadable(key, error))
}

/// Refuses an object whose frames would decode to more than the limit.
fn check_decoded_size(
    key: &str,
    object: &DefaultDicomObject,
    limits: &DecodeLimits,
) -> Result<(), PreprocessError> {
    let rows = integer(object, tags::ROWS).unwrap_or(0).max(0) as u64;
    let columns = integer(object, tags::COLUMNS).unwrap_or(0).max(0) as u64;
    let bits = integer(object, tags::BITS_ALLOCATED).unwrap_or(16).max(8) as u64;
    let samples = integer(object, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1) as u64;
    let decoded = rows * columns * samples * bits / 8 * number_of_frames(object) as u64;
    if decoded > limits.max_decoded_bytes {
        return Err(PreprocessError::TooLarge {
            key: key.to_string(),
            detail: format!(
                "{rows}×{columns}×{} frames would decode to {decoded} bytes, the limit is {}",
                number_of_frames(object),
                limits.max_decoded_bytes
            ),
        });
    }
    Ok(())
}

/// Decodes frame `frame` (0-based) of an opened object to HU.
pub fn decode_frame(
    key: &str,
    object: &DefaultDicomObject,
    frame: u32,
    fill_hu: f32,
) -> Result<DecodedSlice, PreprocessError> {
    decode(key, object, None, frame, fill_hu, Vec::new())
}

/// Decodes frame `frame` of an [`Opened`] object, writing the HU into `buffer` (a
/// previous slice's, handed back), so a series of equal slices allocates it once.
pub fn decode_opened(
    key: &str,
    opened: &Opened,
    frame: u32,
    fill_hu: f32,
    buffer: Vec<f32>,
) -> Result<DecodedSlice, PreprocessError> {
    decode(key, &opened.object, opened.native_pixels.as_deref(), frame, fill_hu, buffer)
}

/// `native_pixels`: all frames' bytes of native little-endian pixel data read in place,
/// or `None` to take them from the object.
fn decode(
    key: &str,
    object: &DefaultDicomObject,
    native_pixels: Option<&[u8]>,
    frame: u32,
    fill_hu: f32,
    mut buffer: Vec<f32>,
) -> Result<DecodedSlice, PreprocessError> {
    let frames = number_of_frames(object);
    if frame >= frames {
        return Err(unreadable(
            key,
            format!("frame {} asked for, the object has {frames}", frame + 1),
        ));
    }
    let rows =
        integer(object, tags::ROWS).ok_or_else(|| unreadable(key, "Rows is missing"))? as usize;
    let columns = integer(object, tags::COLUMNS)
        .ok_or_else(|| unreadable(key, "Columns is missing"))? as usize;
    let position = frame_position(object, frame as usize)
        .ok_or_else(|| unreadable(key, "ImagePositionPatient is missing"))?;
    let (rescale_slope, rescale_intercept) = frame_rescale(object, frame as usize);
    let padding_value = integer(object, tags::PIXEL_PADDING_VALUE).map(|v| v as i32);
    if integer(object, tags::SAMPLES_PER_PIXEL).unwrap_or(1) != 1 {
        return Err(unreadable(key, "more than one sample per pixel; CT is monochrome"));
    }
    let transfer_syntax = object.meta().transfer_syntax().trim_end_matches('\0');
    // A compressed frame is read once and checked against the header before any decoder
    // sizes its buffers by it.
    let jpeg_2000 = transfer_syntax.starts_with("1.2.840.10008.1.2.4.9");
    let rle = transfer_syntax == "1.2.840.10008.1.2.5";
    let jpeg = JPEG_FAMILY.contains(&transfer_syntax);
    let compressed =
        if jpeg || rle || jpeg_2000 { frame_fragments(key, object, frame)? } else { Vec::new() };
    if jpeg {
        check_jpeg_size(key, &compressed, rows, columns)?;
    } else if rle {
        check_rle_header(key, &compressed)?;
    } else if jpeg_2000 {
        check_j2k_size(key, &compressed, rows, columns)?;
    }
    let gdcm_syntax = gdcm_helper::syntax_code(transfer_syntax);
    if let (Some(code), false) = (gdcm_syntax, gdcm_helper::WITH_GDCM) {
        return Err(PreprocessError::CodecLeftOut {
            key: key.to_string(),
            syntax: format!("{} ({transfer_syntax})", gdcm_helper::syntax_name(code)),
        });
    }
    let hu = if let Some(pixels) = native_pixels {
        // Read in place, the image attributes are required as the decoder requires
        // them; display attributes (window, VOI LUT) are not looked at.
        let required = |tag, name| {
            integer(object, tag).ok_or_else(|| unreadable(key, format!("{name} is missing")))
        };
        required(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?;
        required(tags::HIGH_BIT, "HighBit")?;
        if object.get(tags::PHOTOMETRIC_INTERPRETATION).is_none() {
            return Err(unreadable(key, "PhotometricInterpretation is missing"));
        }
        let pixel_representation = required(tags::PIXEL_REPRESENTATION, "PixelRepresentation")?;
        if !(0..=1).contains(&pixel_representation) {
            return Err(unreadable(
                key,
                format!("PixelRepresentation is {pixel_representation}; 0 (unsigned) or 1 (signed) expected"),
            ));
        }
        let format = PixelFormat {
            bits_allocated: required(tags::BITS_ALLOCATED, "BitsAllocated")? as u16,
            bits_stored: required(tags::BITS_STORED, "BitsStored")?.clamp(0, 64) as u16,
            pixel_representation: pixel_representation as u16,
            rescale_slope,
            rescale_intercept,
            padding_value,
        };
        let frame_length = rows * columns * usize::from(format.bits_allocated / 8);
        let start = frame as usize * frame_length;
        let frame_bytes = pixels.get(start..start + frame_length).unwrap_or(&[]);
        frame_to_hu_into(frame_bytes, rows * columns, &format, fill_hu, &mut buffer)
    } else if let Some(gdcm_syntax) = gdcm_syntax {
        let format = PixelFormat {
            bits_allocated: integer(object, tags::BITS_ALLOCATED).unwrap_or(16) as u16,
            bits_stored: integer(object, tags::BITS_STORED).unwrap_or(12) as u16,
            pixel_representation: integer(object, tags::PIXEL_REPRESENTATION).unwrap_or(0) as u16,
            rescale_slope,
            rescale_intercept,
            padding_value,
        };
        let pixels = decode_with_gdcm(key, &compressed, rows, columns, &format, gdcm_syntax)?;
        frame_to_hu_into(&pixels, rows * columns, &format, fill_hu, &mut buffer)
    } else {
        let decoded = contain_panic(key, || object.decode_pixel_data_frame(frame))?
            .map_err(|error| unreadable(key, error))?;
        // The decoder's own description: a JPEG baseline frame comes out 8-bit, whatever the header says.
        let format = PixelFormat {
            bits_allocated: decoded.bits_allocated(),
            bits_stored: decoded.bits_stored(),
            pixel_representation: decoded.pixel_representation() as u16,
            rescale_slope,
            rescale_intercept,
            padding_value,
        };
        frame_to_hu_into(decoded.data(), rows * columns, &format, fill_hu, &mut buffer)
    };
    hu.map_err(|error| unreadable(key, error))?;
    Ok(DecodedSlice { position, rows, columns, hu: buffer })
}

/// An RLE frame starts with a 64-byte header: the number of segments (1 to 15) and
/// their offsets, which must lie inside the frame (the decoder sizes a table by it).
fn check_rle_header(key: &str, frame: &[u8]) -> Result<(), PreprocessError> {
    let word = |index: usize| {
        frame
            .get(index * 4..index * 4 + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let segments = word(0).ok_or_else(|| unreadable(key, "the RLE header is cut short"))?;
    if !(1..=15).contains(&segments) {
        return Err(unreadable(
            key,
            format!("the RLE header declares {segments} segments (1 to 15 allowed)"),
        ));
    }
    for index in 1..=segments {
        let offset = word(index).ok_or_else(|| unreadable(key, "the RLE header is cut short"))?;
        if offset < 64 || offset > frame.len() {
            return Err(unreadable(
                key,
                format!("RLE segment {index} starts at {offset}, outside the frame"),
            ));
        }
    }
    Ok(())
}

/// JPEG baseline, extended, lossless (process 14 and SV1), JPEG-LS lossless and near-lossless.
const JPEG_FAMILY: [&str; 6] = [
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
];

/// The JPEG (or JPEG-LS) frame header must describe the image the DICOM header
/// describes: a decoder sizes its buffers from it (a corrupt one asked for 17 GB).
fn check_jpeg_size(
    key: &str,
    stream: &[u8],
    rows: usize,
    columns: usize,
) -> Result<(), PreprocessError> {
    let mut at = 2; // after SOI
    if stream.get(..2) != Some(&[0xff, 0xd8]) {
        return Err(unreadable(key, "the JPEG stream does not start with SOI"));
    }
    while let Some(&[0xff, marker, high, low]) =
        stream.get(at..at + 4).map(|s| [s[0], s[1], s[2], s[3]]).as_ref()
    {
        if marker == 0xff {
            at += 1; // fill byte
            continue;
        }
        let length = u16::from_be_bytes([high, low]) as usize;
        let frame_header = matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc)
            || marker == 0xf7;
        if frame_header {
            let header = stream
                .get(at + 4..at + 10)
                .ok_or_else(|| unreadable(key, "the JPEG frame header is cut short"))?;
            let (height, width, components) = (
                u16::from_be_bytes([header[1], header[2]]) as usize,
                u16::from_be_bytes([header[3], header[4]]) as usize,
                header[5],
            );
            if (height, width, components) != (rows, columns, 1) {
                return Err(unreadable(
                    key,
                    format!("the JPEG stream describes {width}×{height}×{components}, the header {columns}×{rows}×1"),
                ));
            }
            return Ok(());
        }
        at += 2 + length;
    }
    Err(unreadable(key, "no JPEG frame header before the image data"))
}

/// The JPEG 2000 codestream must describe the image the header describes: one component
/// of Columns × Rows. A corrupt SIZ marker would otherwise size the decoder's buffers.
fn check_j2k_size(
    key: &str,
    codestream: &[u8],
    rows: usize,
    columns: usize,
) -> Result<(), PreprocessError> {
    let siz = codestream
        .windows(4)
        .take(4096)
        .position(|window| window == [0xff, 0x4f, 0xff, 0x51])
        .map(|start| start + 4)
        .ok_or_else(|| unreadable(key, "no JPEG 2000 SIZ marker at the start of the codestream"))?;
    let field = |offset: usize| -> Option<u64> {
        codestream
            .get(siz + offset..siz + offset + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let parsed = (|| {
        let (x, y, x0, y0) = (field(4)?, field(8)?, field(12)?, field(16)?);
        let (tile_x, tile_y) = (field(20)?, field(24)?);
        let components =
            codestream.get(siz + 36..siz + 38).map(|b| u16::from_be_bytes([b[0], b[1]]))?;
        Some((x.checked_sub(x0)?, y.checked_sub(y0)?, tile_x, tile_y, components))
    })();
    match parsed {
        Some((width, height, tile_x, tile_y, 1))
            if width == columns as u64
                && height == rows as u64
                && tile_x * tile_y <= width.max(1) * height.max(1) * 4 =>
        {
            Ok(())
        }
        Some((width, height, _, _, components)) => Err(unreadable(
            key,
            format!("the JPEG 2000 codestream describes {width}×{height}×{components}, the header {columns}×{rows}×1"),
        )),
        None => Err(unreadable(key, "the JPEG 2000 SIZ marker is cut short")),
    }
}

/// Transfer syntaxes GDCM decodes: JPEG Extended (Process 2 & 4, 12-bit lossy JPEG) and
/// JPEG-LS lossless and near-lossless.
/// The compressed bytes of one frame: one fragment per frame, or all fragments of a
/// single-frame object.
fn frame_fragments(
    key: &str,
    object: &DefaultDicomObject,
    frame: u32,
) -> Result<Vec<u8>, PreprocessError> {
    let element = object.element(tags::PIXEL_DATA).map_err(|_| unreadable(key, "no Pixel Data"))?;
    let fragments = element
        .fragments()
        .ok_or_else(|| unreadable(key, "compressed Pixel Data is not encapsulated"))?;
    let frames = number_of_frames(object);
    if frames == 1 {
        return Ok(fragments.iter().flatten().copied().collect());
    }
    if fragments.len() != frames as usize {
        return Err(unreadable(key, format!("{} fragments for {frames} frames", fragments.len())));
    }
    Ok(fragments[frame as usize].clone())
}

/// Decodes a JPEG-LS or 12-bit JPEG frame with GDCM, in a helper process
/// ([`crate::gdcm_helper`]): GDCM's C++ exceptions on corrupt streams would abort this
/// process.
fn decode_with_gdcm(
    key: &str,
    compressed: &[u8],
    rows: usize,
    columns: usize,
    format: &PixelFormat,
    transfer_syntax: u8,
) -> Result<Vec<u8>, PreprocessError> {
    let spec = gdcm_helper::FrameSpec {
        transfer_syntax,
        rows: rows as u32,
        columns: columns as u32,
        bits_allocated: format.bits_allocated,
        bits_stored: format.bits_stored,
        pixel_representation: format.pixel_representation,
    };
    gdcm_helper::decode(&spec, compressed).map_err(|error| match error {
        gdcm_helper::HelperError::Refused(message) => unreadable(key, message),
        gdcm_helper::HelperError::Crashed(message) => {
            PreprocessError::DecoderFailed { key: key.to_string(), detail: message }
        }
        gdcm_helper::HelperError::Unavailable(message) => {
            PreprocessError::HelperUnavailable(message)
        }
    })
}

/// Parses a single-frame object and converts it to HU.
pub fn decode_slice(
    key: &str,
    bytes: &[u8],
    fill_hu: f32,
) -> Result<DecodedSlice, PreprocessError> {
    let object = open(key, bytes, &DecodeLimits::default())?;
    decode_frame(key, &object, 0, fill_hu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_deflate_bomb_is_measured_without_being_kept() {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 100_000, "64 MiB of zeros deflate to {} bytes", bomb.len());
        assert_eq!(inflated_size(&bomb, 1 << 20).unwrap(), (1 << 20) + 1);
        assert_eq!(inflated_size(&bomb, 1 << 30).unwrap(), 64 << 20);
    }

    #[test]
    fn short_input_is_not_dicom() {
        let error = decode_slice("x.dcm", b"DICM", -1000.0).unwrap_err();
        assert!(error.to_string().contains("not a DICOM Part 10 file"), "{error}");
    }
}
