//! The tensor format between preprocess and infer: NumPy `.npy` v1.0, little-endian
//! f32 (model inputs) or int16 gzip-compressed (a cascade's fine grid, HU), C order. Anyone can open a stored tensor with `numpy.load`.

use bytes::Bytes;

const MAGIC: &[u8] = b"\x93NUMPY";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NpyError {
    #[error("not a .npy file")]
    NotNpy,
    #[error("unsupported .npy header: {0}")]
    Unsupported(String),
    #[error("tensor data is {actual} bytes, the header says {expected}")]
    Truncated { expected: usize, actual: usize },
}

/// An element type stored in `.npy`: its `descr` and little-endian bytes.
trait Element: Copy {
    const DESCR: &'static str;
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn take(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn take(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Element for i16 {
    const DESCR: &'static str = "<i2";
    const SIZE: usize = 2;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn take(b: &[u8]) -> Self {
        i16::from_le_bytes([b[0], b[1]])
    }
}

impl Element for u8 {
    const DESCR: &'static str = "|u1";
    const SIZE: usize = 1;
    fn put(self, out: &mut Vec<u8>) {
        out.push(self);
    }
    fn take(b: &[u8]) -> Self {
        b[0]
    }
}

fn encode<T: Element>(shape: &[usize], data: &[T]) -> Vec<u8> {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len(), "shape matches data");
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header =
        format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}", T::DESCR);
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * T::SIZE);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for value in data {
        value.put(&mut out);
    }
    out
}

fn decode<T: Element>(bytes: &[u8]) -> Result<(Vec<usize>, Vec<T>), NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::NotNpy);
    }
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes.get(10..10 + header_len).ok_or(NpyError::NotNpy)?;
    let header = std::str::from_utf8(header).map_err(|_| NpyError::NotNpy)?;
    if !header.contains(&format!("'descr': '{}'", T::DESCR))
        || !header.contains("'fortran_order': False")
    {
        return Err(NpyError::Unsupported(header.trim().to_string()));
    }
    let shape_start =
        header.find("'shape': (").ok_or_else(|| NpyError::Unsupported(header.to_string()))? + 10;
    let shape_end =
        header[shape_start..].find(')').ok_or_else(|| NpyError::Unsupported(header.to_string()))?;
    let shape: Vec<usize> = header[shape_start..shape_start + shape_end]
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().map_err(|_| NpyError::Unsupported(header.to_string())))
        .collect::<Result<_, _>>()?;
    let body = &bytes[10 + header_len..];
    let expected = shape.iter().product::<usize>() * T::SIZE;
    if body.len() != expected {
        return Err(NpyError::Truncated { expected, actual: body.len() });
    }
    Ok((shape, body.chunks_exact(T::SIZE).map(T::take).collect()))
}

/// Encodes `data` with `shape` as a `.npy` file.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Bytes {
    Bytes::from(encode(shape, data))
}

/// Decodes a `.npy` file written by [`encode_f32`] (or by numpy, for `<f4` C order).
pub fn decode_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    decode(bytes)
}

/// Int16 `.npy` (HU of a training crop).
pub fn encode_i16(shape: &[usize], data: &[i16]) -> Bytes {
    Bytes::from(encode(shape, data))
}

/// Decodes [`encode_i16`]'s bytes.
pub fn decode_i16(bytes: &[u8]) -> Result<(Vec<usize>, Vec<i16>), NpyError> {
    decode(bytes)
}

/// Unsigned 8-bit `.npy` (voxel labels).
pub fn encode_u8(shape: &[usize], data: &[u8]) -> Bytes {
    Bytes::from(encode(shape, data))
}

/// Decodes [`encode_u8`]'s bytes (or numpy's `|u1`, C order).
pub fn decode_u8(bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), NpyError> {
    decode(bytes)
}

/// HU as int16 `.npy`, gzip-compressed (fast level): the fine grid of a cascade.
/// `numpy.load(gzip.open(path))` reads it.
pub fn encode_i16_gz(shape: &[usize], data: &[i16]) -> Bytes {
    use std::io::Write;
    let raw = encode(shape, data);
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 3),
        flate2::Compression::fast(),
    );
    encoder.write_all(&raw).expect("writing to memory");
    Bytes::from(encoder.finish().expect("writing to memory"))
}

/// Decodes [`encode_i16_gz`]'s bytes.
pub fn decode_i16_gz(bytes: &[u8]) -> Result<(Vec<usize>, Vec<i16>), NpyError> {
    use std::io::Read;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut raw).map_err(|_| NpyError::NotNpy)?;
    decode(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let encoded = encode_f32(&[1, 2, 3, 4], &data);
        assert_eq!((encoded.len() - data.len() * 4) % 64, 0);
        assert_eq!(decode_f32(&encoded).unwrap(), (vec![1, 2, 3, 4], data));
    }

    #[test]
    fn int16_round_trips_through_gzip() {
        let data: Vec<i16> = (0..60).map(|i| i * 37 - 1024).collect();
        let encoded = encode_i16_gz(&[3, 4, 5], &data);
        assert_eq!(&encoded[..2], [0x1f, 0x8b], "gzip magic");
        assert_eq!(decode_i16_gz(&encoded).unwrap(), (vec![3, 4, 5], data));
        assert_eq!(decode_i16_gz(&encode_f32(&[1], &[1.0])), Err(NpyError::NotNpy));
        let f32_in_gzip = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&encode_f32(&[1], &[1.0])).unwrap();
            e.finish().unwrap()
        };
        assert!(matches!(decode_i16_gz(&f32_in_gzip), Err(NpyError::Unsupported(_))));
    }

    #[test]
    fn truncated_is_an_error() {
        let encoded = encode_f32(&[4], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            decode_f32(&encoded[..encoded.len() - 4]),
            Err(NpyError::Truncated { expected: 16, actual: 12 })
        );
        assert_eq!(decode_f32(b"garbage garbage"), Err(NpyError::NotNpy));
    }
}
