//! Where Pixel Data starts in a Part 10 object and how long it says it is.

/// Byte offset of the Pixel Data value and its declared length (None when undefined).
pub fn find_pixel_data(
    bytes: &[u8],
    big_endian: bool,
    implicit: bool,
) -> Option<(u64, Option<u64>)> {
    let tag: [u8; 4] = if big_endian { [0x7f, 0xe0, 0x00, 0x10] } else { [0xe0, 0x7f, 0x10, 0x00] };
    let read_u32 = |slice: &[u8]| {
        let array = [slice[0], slice[1], slice[2], slice[3]];
        if big_endian {
            u32::from_be_bytes(array)
        } else {
            u32::from_le_bytes(array)
        }
    };
    // Search from the end of the file meta group so values earlier cannot match.
    let start = 132;
    let position = bytes.get(start..)?.windows(4).rposition(|window| window == tag)? + start;
    let (length, value_offset) = if implicit {
        (read_u32(bytes.get(position + 4..position + 8)?), position + 8)
    } else {
        let vr = bytes.get(position + 4..position + 6)?;
        if vr != b"OW" && vr != b"OB" {
            return None;
        }
        (read_u32(bytes.get(position + 8..position + 12)?), position + 12)
    };
    let length = (length != u32::MAX).then_some(length as u64);
    Some((value_offset as u64, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_explicit_little_endian_pixel_data() {
        let mut bytes = vec![0u8; 132];
        bytes.extend_from_slice(&[0xe0, 0x7f, 0x10, 0x00, b'O', b'W', 0, 0]);
        bytes.extend_from_slice(&100u32.to_le_bytes());
        assert_eq!(find_pixel_data(&bytes, false, false), Some((144, Some(100))));
        bytes.truncate(132 + 8);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_pixel_data(&bytes, false, false), Some((144, None)));
    }
}
