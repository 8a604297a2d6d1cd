//! The declared-length walk: before any parser allocates, every element's declared
//! length is checked against what is left of the object.

use dicom_dictionary_std::uids;

/// VRs whose explicit-VR header has a 16-bit length; every other VR, an unknown one
/// included (a parser reads it as UN), has two reserved bytes and a 32-bit length.
const SHORT_VRS: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];

/// What [`check_declared_lengths`] found wrong, by what it means for the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LengthProblem {
    /// The object ends inside a value (Pixel Data or another element): a transfer cut
    /// short rather than a corrupt file.
    #[error("{0}")]
    Cut(String),
    /// A deflated data set that inflates beyond [`DEFLATED_MAX_BYTES`].
    #[error("{0}")]
    Inflates(String),
    /// A length no object of this size could hold, or a corrupt deflate stream.
    #[error("{0}")]
    Corrupt(String),
}

/// What the walk met: where Pixel Data is, and whether every element was walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Walked {
    /// The top-level Pixel Data element (the last one met: an icon image's own Pixel
    /// Data sits in a sequence before it), as read from its header.
    pub pixel_data: Option<PixelDataAt>,
    /// The walk went element by element to the end of the object (not only of a prefix,
    /// and not stopped by bytes it could not read as an element). Only then does "no
    /// Pixel Data" mean the object has none.
    pub whole: bool,
}

/// Where a Pixel Data value starts (byte offset in the object) and the length its
/// header declares (`None`: undefined, encapsulated fragments follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelDataAt {
    pub offset: u64,
    pub length: Option<u64>,
}

const TRUNCATED_PIXEL_DATA: &str = "Pixel Data is cut short";
const FILE_ENDS_INSIDE: &str = "the file ends inside";

/// A value running at most this far past the end of the object is taken for a cut
/// (a truncated transfer), further for a corrupt length.
const CUT_SHORT_BYTES: u64 = 16 << 20;

/// Checks, before a parser allocates anything, that no element of a Part 10 object
/// declares a value longer than what is left of the object (`size` bytes in all; `bytes`
/// may be only a prefix, and the walk stops where it ends). Without this, one flipped
/// bit in a length field makes the parser allocate gigabytes.
///
/// Walks the file meta group and a data set in implicit or explicit VR, little or big
/// endian, descending into sequences and items, past Pixel Data to the end. A deflated data set
/// is inflated first, never beyond [`DEFLATED_MAX_BYTES`] (a deflate bomb is refused
/// as [`LengthProblem::Inflates`]), and its inflated bytes are walked the same way.
///
/// On the way it notes where Pixel Data is ([`Walked`]): the one place that finds it, by
/// walking elements rather than searching for its tag's bytes (which pixel values or a
/// vendor's blob can hold). For a deflated data set the offsets would be in the inflated
/// stream, so none is given.
pub fn check_declared_lengths(bytes: &[u8], size: u64) -> Result<Walked, LengthProblem> {
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" {
        return Ok(Walked::default()); // not Part 10; the parser says so itself
    }
    let meta_length = u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]) as u64;
    if 144 + meta_length > size {
        return Err(LengthProblem::Corrupt(format!(
            "the file meta group declares {meta_length} bytes, more than the file holds"
        )));
    }
    // The meta group is read as dicom-object reads it: element after element, whatever
    // their group, until its declared length is used up (a stray (0003,xxxx) element
    // inside it belongs to it; the data set starts after the element that crosses it).
    let mut meta_end = 144;
    let mut transfer_syntax = String::new();
    while (meta_end as u64) < 144 + meta_length {
        let Some(header) = bytes.get(meta_end..meta_end + 8) else { break };
        let (length, value_at) = if SHORT_VRS.contains(&&[header[4], header[5]]) {
            (u16::from_le_bytes([header[6], header[7]]) as u64, meta_end + 8)
        } else {
            let Some(long) = bytes.get(meta_end + 8..meta_end + 12) else {
                return Ok(Walked::default());
            };
            (u32::from_le_bytes([long[0], long[1], long[2], long[3]]) as u64, meta_end + 12)
        };
        if length > size.saturating_sub(value_at as u64) {
            return Err(LengthProblem::Corrupt(format!(
                "a file meta element at byte {meta_end} declares {length} bytes, more than the file holds"
            )));
        }
        if header[..4] == [0x02, 0x00, 0x10, 0x00] {
            let value = bytes.get(value_at..value_at + length as usize).unwrap_or_default();
            transfer_syntax =
                String::from_utf8_lossy(value).trim_end_matches(['\0', ' ']).to_string();
        }
        meta_end = value_at + length as usize;
    }
    let syntax = transfer_syntax.as_str();
    if meta_end >= bytes.len() {
        return Ok(Walked::default());
    }
    if syntax == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN {
        check_deflated(&bytes[meta_end..], bytes.len() as u64 >= size)?;
        return Ok(Walked::default());
    }
    let (implicit, big_endian) = if syntax == uids::IMPLICIT_VR_LITTLE_ENDIAN {
        (true, false)
    } else if syntax == {
        // Retired from the standard, still found in archives.
        #[allow(deprecated)]
        uids::EXPLICIT_VR_BIG_ENDIAN
    } {
        (false, true)
    } else {
        (false, false)
    };
    walk(bytes, meta_end, bytes.len(), size, implicit, big_endian)
}

/// A deflated data set may inflate to at most this many bytes (a CT slice inflates to
/// about half a megabyte; an Enhanced CT series to a few hundred).
pub const DEFLATED_MAX_BYTES: u64 = 2 << 30;

/// Inflated bytes kept in memory for the walk: the attributes before Pixel Data always
/// fit; a walk that reaches the end of these without meeting Pixel Data stops there.
const DEFLATED_WALK_BYTES: u64 = 64 << 20;

const INFLATES_BEYOND_LIMIT: &str = "the deflated data set inflates beyond the limit";

/// Inflates `deflated` as far as it goes, up to `cap` bytes into `sink`; returns how many
/// bytes came out and whether the stream ended cleanly before the cap.
fn inflate_into(deflated: &[u8], cap: u64, sink: &mut impl std::io::Write) -> (u64, bool) {
    use std::io::Read;
    let mut decoder = flate2::read::DeflateDecoder::new(deflated).take(cap + 1);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match decoder.read(&mut buffer) {
            Ok(0) => return (total, total <= cap),
            Ok(read) => {
                total += read as u64;
                if sink.write_all(&buffer[..read]).is_err() {
                    return (total, false);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (total, false),
        }
    }
}

/// The declared-length walk over a deflated data set (explicit VR little endian once
/// inflated). `whole` says whether `deflated` runs to the end of the object.
fn check_deflated(deflated: &[u8], whole: bool) -> Result<(), LengthProblem> {
    let (total, ended) = inflate_into(deflated, DEFLATED_MAX_BYTES, &mut std::io::sink());
    if total > DEFLATED_MAX_BYTES {
        return Err(LengthProblem::Inflates(format!(
            "{INFLATES_BEYOND_LIMIT}: over {DEFLATED_MAX_BYTES} bytes"
        )));
    }
    if whole && !ended {
        return Err(LengthProblem::Corrupt(format!(
            "the deflated data set is corrupt after {total} inflated bytes"
        )));
    }
    let mut head = Vec::new();
    inflate_into(deflated, DEFLATED_WALK_BYTES.min(total), &mut head);
    // A prefix of the object: the inflated size is unknown, so the limit bounds lengths.
    let size = if ended { total } else { DEFLATED_MAX_BYTES };
    walk(&head, 0, head.len(), size, false, false).map(|_| ())
}

fn walk(
    bytes: &[u8],
    start: usize,
    end: usize,
    size: u64,
    implicit: bool,
    big_endian: bool,
) -> Result<Walked, LengthProblem> {
    let u16_at = |at: usize| -> Option<u16> {
        let b = bytes.get(at..at + 2)?;
        Some(if big_endian {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        let array = [b[0], b[1], b[2], b[3]];
        Some(if big_endian { u32::from_be_bytes(array) } else { u32::from_le_bytes(array) })
    };
    let fits = |at: usize, length: u32, value_at: usize| -> Result<(), LengthProblem> {
        if length as u64 > size.saturating_sub(value_at as u64) {
            let (group, element) = (u16_at(at).unwrap_or(0), u16_at(at + 2).unwrap_or(0));
            let missing = value_at as u64 + length as u64 - size;
            // A value that runs a little past the end: the file was cut there. One that
            // runs far past it: a corrupt length.
            if missing <= CUT_SHORT_BYTES {
                return Err(LengthProblem::Cut(format!(
                    "{FILE_ENDS_INSIDE} element ({group:04X},{element:04X}) at byte {at}: its value needs \
                     {missing} bytes more than the file has"
                )));
            }
            return Err(LengthProblem::Corrupt(format!(
                "element ({group:04X},{element:04X}) at byte {at} declares {length} bytes, more than the file holds"
            )));
        }
        Ok(())
    };
    // Fragments: items of raw bytes after the Pixel Data header, up to the delimiter.
    // Returns where the walk goes on (after the delimiter), or None where it cannot.
    let fragments = |mut at: usize| -> Result<Option<usize>, LengthProblem> {
        while at + 8 <= end {
            let (Some(0xFFFE), Some(element), Some(length)) =
                (u16_at(at), u16_at(at + 2), u32_at(at + 4))
            else {
                return Ok(None);
            };
            if element == 0xE0DD {
                return Ok(Some(at + 8));
            }
            if element != 0xE000 || length == u32::MAX {
                return Ok(None);
            }
            fits(at, length, at + 8)?;
            at += 8 + length as usize;
        }
        Ok(None)
    };
    let mut pixel_data = None;
    // Stopped at bytes that cannot be read as an element: the rest is unknown.
    let stopped = |pixel_data| Ok(Walked { pixel_data, whole: false });
    let mut at = start;
    while at + 8 <= end {
        let (Some(group), Some(element)) = (u16_at(at), u16_at(at + 2)) else {
            return stopped(pixel_data);
        };
        let remaining = |value_at: usize| size.saturating_sub(value_at as u64);
        if group == 0xFFFE {
            // Item or delimiter: tag and a 32-bit length, no VR. Items are walked into.
            let Some(length) = u32_at(at + 4) else { return stopped(pixel_data) };
            if element == 0xE000 && length != u32::MAX && length as u64 > remaining(at + 8) {
                return Err(LengthProblem::Corrupt(format!(
                    "an item at byte {at} declares {length} bytes, more than the file holds"
                )));
            }
            at += 8;
            continue;
        }
        let (length, value_at, sequence) = if implicit {
            let Some(length) = u32_at(at + 4) else { return stopped(pixel_data) };
            (length, at + 8, length == u32::MAX)
        } else {
            let vr = [bytes[at + 4], bytes[at + 5]];
            if !SHORT_VRS.contains(&&vr) {
                let Some(length) = u32_at(at + 8) else { return stopped(pixel_data) };
                (length, at + 12, &vr == b"SQ" || length == u32::MAX)
            } else {
                let Some(length) = u16_at(at + 6) else { return stopped(pixel_data) };
                (length as u32, at + 8, false)
            }
        };
        if (group, element) == (0x7FE0, 0x0010) {
            // Pixel Data: one value, or encapsulated fragments (items of raw bytes). What
            // follows it (padding, vendor elements, garbage) is walked too: a parser that
            // reads the whole object reads those lengths as well.
            pixel_data = Some(PixelDataAt {
                offset: value_at as u64,
                length: (length != u32::MAX).then_some(length as u64),
            });
            if length != u32::MAX && length as u64 > size.saturating_sub(value_at as u64) {
                return Err(LengthProblem::Cut(format!(
                    "{TRUNCATED_PIXEL_DATA}: it declares {length} bytes but the file has only {} after it",
                    size.saturating_sub(value_at as u64)
                )));
            }
            if length != u32::MAX {
                at = value_at + length as usize;
                continue;
            }
            match fragments(value_at)? {
                Some(after) => {
                    at = after;
                    continue;
                }
                None => return stopped(pixel_data),
            }
        }
        if length == u32::MAX {
            at = value_at; // undefined length: a sequence, walked into
            continue;
        }
        fits(at, length, value_at)?;
        at = if sequence { value_at } else { value_at + length as usize };
    }
    // Fewer than 8 bytes left: the end of what was given; of the object if that is all.
    Ok(Walked { pixel_data, whole: end as u64 >= size })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part10(dataset: &[u8]) -> Vec<u8> {
        part10_in(b"1.2.840.10008.1.2.1\0", dataset)
    }

    fn part10_in(uid: &[u8], dataset: &[u8]) -> Vec<u8> {
        let mut meta = Vec::new();
        meta.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        meta.extend_from_slice(&(uid.len() as u16).to_le_bytes());
        meta.extend_from_slice(uid);
        let mut bytes = vec![0u8; 128];
        bytes.extend_from_slice(b"DICM");
        bytes.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(dataset);
        bytes
    }

    /// (0010,0010) PN "DOE^J ", explicit VR little endian.
    fn patient_name() -> Vec<u8> {
        let mut element = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 6, 0];
        element.extend_from_slice(b"DOE^J ");
        element
    }

    #[test]
    fn a_length_beyond_the_file_is_refused_before_parsing() {
        // (0010,0010) PN "DOE^J" then (0008,0060) CS with a corrupt length.
        let mut dataset = patient_name();
        let good = part10(&dataset);
        assert!(check_declared_lengths(&good, good.len() as u64).is_ok());
        dataset.extend_from_slice(&[0x08, 0x00, 0x00, 0x11, b'O', b'B', 0, 0]);
        dataset.extend_from_slice(&0x4000_0000u32.to_le_bytes());
        let bad = part10(&dataset);
        let error = check_declared_lengths(&bad, bad.len() as u64).unwrap_err();
        assert!(
            matches!(&error, LengthProblem::Corrupt(text) if text.contains("(0008,1100)") && text.contains("1073741824 bytes")),
            "{error}"
        );
        // A prefix of a large object: the same length is plausible, so it passes.
        assert!(check_declared_lengths(&bad, 2 << 30).is_ok());
        // A file cut inside a value is truncated, not corrupt.
        let cut = &good[..good.len() - 3];
        let error = check_declared_lengths(cut, cut.len() as u64).unwrap_err();
        assert!(
            matches!(&error, LengthProblem::Cut(text) if text.starts_with(FILE_ENDS_INSIDE) && text.contains("(0010,0010)")),
            "{error}"
        );
    }

    /// (7FE0,0010) OW with `value` (explicit VR little endian).
    fn pixel_data_element(value: &[u8]) -> Vec<u8> {
        let mut element = vec![0xe0, 0x7f, 0x10, 0x00, b'O', b'W', 0, 0];
        element.extend_from_slice(&(value.len() as u32).to_le_bytes());
        element.extend_from_slice(value);
        element
    }

    #[test]
    fn the_walk_finds_pixel_data_by_its_element_not_by_its_bytes() {
        let mut dataset = patient_name();
        let header_end = part10(&dataset).len() as u64;
        // Pixel values that hold the bytes of a Pixel Data header (a search for the tag
        // from the end, as the old finder did, lands on them).
        let mut pixels = vec![0u8; 64];
        pixels[20..32].copy_from_slice(&[0xe0, 0x7f, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0]);
        dataset.extend_from_slice(&pixel_data_element(&pixels));
        let bytes = part10(&dataset);
        let walked = check_declared_lengths(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(
            walked,
            Walked {
                pixel_data: Some(PixelDataAt { offset: header_end + 12, length: Some(64) }),
                whole: true
            }
        );
        // A prefix that stops inside Pixel Data still says where it is, but not whole.
        let prefix = &bytes[..bytes.len() - 10];
        let walked = check_declared_lengths(prefix, bytes.len() as u64).unwrap();
        assert_eq!(
            walked.pixel_data,
            Some(PixelDataAt { offset: header_end + 12, length: Some(64) })
        );
        assert!(!walked.whole);
    }

    #[test]
    fn an_icon_image_s_pixel_data_is_not_the_image_s() {
        // (0088,0200) Icon Image Sequence, undefined length, one item holding Pixel Data.
        let mut dataset = vec![0x88, 0x00, 0x00, 0x02, b'S', b'Q', 0, 0, 0xff, 0xff, 0xff, 0xff];
        dataset.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff]);
        dataset.extend_from_slice(&pixel_data_element(&[1; 16]));
        dataset.extend_from_slice(&[0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0]);
        dataset.extend_from_slice(&[0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0]);
        // The image's own Pixel Data: encapsulated (undefined length), one empty offset
        // table and one fragment, then the delimiter.
        let image_at = part10(&dataset).len() as u64 + 12;
        dataset
            .extend_from_slice(&[0xe0, 0x7f, 0x10, 0x00, b'O', b'B', 0, 0, 0xff, 0xff, 0xff, 0xff]);
        dataset.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0, 0, 0, 0]);
        dataset.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 4, 0, 0, 0, 9, 9, 9, 9]);
        dataset.extend_from_slice(&[0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0]);
        let bytes = part10(&dataset);
        let walked = check_declared_lengths(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(walked.pixel_data, Some(PixelDataAt { offset: image_at, length: None }));
        assert!(walked.whole);
    }

    #[test]
    fn an_object_without_pixel_data_says_so_only_when_walked_whole() {
        let dataset = patient_name();
        let bytes = part10(&dataset);
        let walked = check_declared_lengths(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(walked, Walked { pixel_data: None, whole: true });
        let walked = check_declared_lengths(&bytes, bytes.len() as u64 + 1000).unwrap();
        assert_eq!(walked, Walked { pixel_data: None, whole: false });
    }

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    const DEFLATED_UID: &[u8] = b"1.2.840.10008.1.2.1.99\0\0";

    #[test]
    fn a_deflated_data_set_is_inflated_with_a_cap_and_walked() {
        let mut dataset = patient_name();
        let good = part10_in(DEFLATED_UID, &deflate(&dataset));
        assert!(check_declared_lengths(&good, good.len() as u64).is_ok());
        // The same lie as above, inside the compressed stream.
        dataset.extend_from_slice(&[0x08, 0x00, 0x00, 0x11, b'O', b'B', 0, 0]);
        dataset.extend_from_slice(&0x4000_0000u32.to_le_bytes());
        let bad = part10_in(DEFLATED_UID, &deflate(&dataset));
        let error = check_declared_lengths(&bad, bad.len() as u64).unwrap_err();
        assert!(
            matches!(&error, LengthProblem::Corrupt(text) if text.contains("(0008,1100)") && text.contains("1073741824 bytes")),
            "{error}"
        );
        // A corrupt stream in a whole file, and a prefix of one, which is fine.
        let mut corrupt = good.clone();
        let last = corrupt.len() - 3;
        corrupt.truncate(last);
        assert!(check_declared_lengths(&corrupt, corrupt.len() as u64)
            .unwrap_err()
            .to_string()
            .contains("corrupt"));
        assert!(check_declared_lengths(&corrupt, good.len() as u64).is_ok());
    }

    #[test]
    fn a_deflate_bomb_is_refused_without_being_kept() {
        // Only the first few bytes of a 2 GiB + 1 stream of zeros: a real bomb is the
        // same compressed pattern repeated; the check counts without keeping it.
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(DEFLATED_MAX_BYTES >> 20) + 1 {
            std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        }
        let bomb = part10_in(DEFLATED_UID, &encoder.finish().unwrap());
        assert!(bomb.len() < 4 << 20, "{} bytes", bomb.len());
        let error = check_declared_lengths(&bomb, bomb.len() as u64).unwrap_err();
        assert!(
            matches!(&error, LengthProblem::Inflates(text) if text.starts_with(INFLATES_BEYOND_LIMIT)),
            "{error}"
        );
    }
}
