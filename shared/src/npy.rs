//! The tensor format between preprocess and infer: NumPy `.npy` v1.0, little-endian
//! f32, C order. Anyone can open a stored tensor with `numpy.load`.

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

/// Encodes `data` with `shape` as a `.npy` file.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Bytes {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len(), "shape matches data");
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for value in data {
        out.extend_from_slice(&value.to_le_bytes());
    }
    Bytes::from(out)
}

/// Decodes a `.npy` file written by [`encode_f32`] (or by numpy, for `<f4` C order).
pub fn decode_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::NotNpy);
    }
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes.get(10..10 + header_len).ok_or(NpyError::NotNpy)?;
    let header = std::str::from_utf8(header).map_err(|_| NpyError::NotNpy)?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
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
    let expected = shape.iter().product::<usize>() * 4;
    if body.len() != expected {
        return Err(NpyError::Truncated { expected, actual: body.len() });
    }
    let data = body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((shape, data))
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
    fn truncated_is_an_error() {
        let encoded = encode_f32(&[4], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            decode_f32(&encoded[..encoded.len() - 4]),
            Err(NpyError::Truncated { expected: 16, actual: 12 })
        );
        assert_eq!(decode_f32(b"garbage garbage"), Err(NpyError::NotNpy));
    }
}
