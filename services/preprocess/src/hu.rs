//! Stored pixel values to Hounsfield units.
//!
//! HU = stored × RescaleSlope + RescaleIntercept, where the stored value is read with
//! BitsAllocated bits, masked to BitsStored, and sign-extended when PixelRepresentation
//! is 1. Pixel padding values (outside the reconstruction circle) become `fill_hu`.

/// How the stored values of one frame are laid out and rescaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelFormat {
    pub bits_allocated: u16,
    pub bits_stored: u16,
    /// 0 unsigned, 1 two's complement.
    pub pixel_representation: u16,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    /// PixelPaddingValue, as a stored value, if the header has one.
    pub padding_value: Option<i32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HuError {
    #[error("BitsAllocated {0} is not supported for CT (8 or 16 expected)")]
    BitsAllocated(u16),
    #[error("BitsStored {stored} does not fit BitsAllocated {allocated}")]
    BitsStored { stored: u16, allocated: u16 },
    #[error("pixel data has {actual} bytes, {expected} expected for one frame")]
    Length { expected: usize, actual: usize },
    #[error("RescaleSlope is {0}, it must be a positive number")]
    Slope(f64),
}

impl PixelFormat {
    fn check(&self) -> Result<(), HuError> {
        if self.bits_allocated != 8 && self.bits_allocated != 16 {
            return Err(HuError::BitsAllocated(self.bits_allocated));
        }
        if self.bits_stored == 0 || self.bits_stored > self.bits_allocated {
            return Err(HuError::BitsStored {
                stored: self.bits_stored,
                allocated: self.bits_allocated,
            });
        }
        if !(self.rescale_slope.is_finite() && self.rescale_slope > 0.0) {
            return Err(HuError::Slope(self.rescale_slope));
        }
        Ok(())
    }

    /// The stored value of a raw sample: masked to BitsStored, sign-extended if signed.
    pub fn stored_value(&self, raw: u16) -> i32 {
        let mask = if self.bits_stored >= 16 { 0xffff } else { (1u32 << self.bits_stored) - 1 };
        let value = raw as u32 & mask;
        if self.pixel_representation == 1 && value & (1 << (self.bits_stored - 1)) != 0 {
            value as i32 - (1i32 << self.bits_stored)
        } else {
            value as i32
        }
    }
}

/// Converts one little-endian frame of `pixels` samples to HU.
pub fn frame_to_hu(
    raw: &[u8],
    pixels: usize,
    format: &PixelFormat,
    fill_hu: f32,
) -> Result<Vec<f32>, HuError> {
    format.check()?;
    let bytes_per_sample = format.bits_allocated as usize / 8;
    let expected = pixels * bytes_per_sample;
    if raw.len() < expected {
        return Err(HuError::Length { expected, actual: raw.len() });
    }
    let slope = format.rescale_slope as f32;
    let intercept = format.rescale_intercept as f32;
    let convert = |sample: u16| {
        let stored = format.stored_value(sample);
        if Some(stored) == format.padding_value {
            fill_hu
        } else {
            stored as f32 * slope + intercept
        }
    };
    let hu = if bytes_per_sample == 2 {
        raw[..expected]
            .chunks_exact(2)
            .map(|pair| convert(u16::from_le_bytes([pair[0], pair[1]])))
            .collect()
    } else {
        raw[..expected].iter().map(|byte| convert(*byte as u16)).collect()
    };
    Ok(hu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn format(bits_stored: u16, signed: bool, slope: f64, intercept: f64) -> PixelFormat {
        PixelFormat {
            bits_allocated: 16,
            bits_stored,
            pixel_representation: u16::from(signed),
            rescale_slope: slope,
            rescale_intercept: intercept,
            padding_value: None,
        }
    }

    fn bytes(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn unsigned_with_intercept() {
        let hu =
            frame_to_hu(&bytes(&[0, 1024, 1064]), 3, &format(12, false, 1.0, -1024.0), -1000.0)
                .unwrap();
        assert_eq!(hu, [-1024.0, 0.0, 40.0]);
    }

    #[test]
    fn signed_twelve_bits_ignores_high_bits() {
        // 0xF000 carries garbage above bit 11; 0x0FFF is -1 in 12-bit two's complement.
        let hu =
            frame_to_hu(&bytes(&[0x0fff, 0xf000 | 0x0010]), 2, &format(12, true, 1.0, 0.0), 0.0)
                .unwrap();
        assert_eq!(hu, [-1.0, 16.0]);
    }

    #[test]
    fn slope_and_padding() {
        let mut f = format(16, true, 0.5, -10.0);
        f.padding_value = Some(-2000);
        let hu = frame_to_hu(&bytes(&[100, (-2000i16) as u16]), 2, &f, -1000.0).unwrap();
        assert_eq!(hu, [40.0, -1000.0]);
    }

    #[test]
    fn bad_formats_are_errors() {
        assert_eq!(
            frame_to_hu(&bytes(&[1]), 2, &format(12, false, 1.0, 0.0), 0.0),
            Err(HuError::Length { expected: 4, actual: 2 })
        );
        assert_eq!(
            frame_to_hu(&bytes(&[1]), 1, &format(12, false, 0.0, 0.0), 0.0),
            Err(HuError::Slope(0.0))
        );
    }

    proptest! {
        #[test]
        fn signed_sixteen_bit_round_trips(value in any::<i16>(), slope in 0.1f64..4.0, intercept in -2048.0f64..2048.0) {
            let hu = frame_to_hu(&bytes(&[value as u16]), 1, &format(16, true, slope, intercept), 0.0).unwrap()[0];
            let expected = value as f64 * slope + intercept;
            prop_assert!((hu as f64 - expected).abs() <= 1e-3 * expected.abs().max(1.0));
        }

        #[test]
        fn unsigned_twelve_bit_is_within_range(raw in any::<u16>()) {
            let hu = frame_to_hu(&bytes(&[raw]), 1, &format(12, false, 1.0, -1024.0), 0.0).unwrap()[0];
            prop_assert!((-1024.0..=3071.0).contains(&hu));
        }
    }
}
