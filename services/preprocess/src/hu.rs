//! Stored pixel values to Hounsfield units.
//!
//! HU = stored × RescaleSlope + RescaleIntercept, where the stored value is read with
//! BitsAllocated bits, masked to BitsStored, and sign-extended when PixelRepresentation
//! is 1. Pixel padding values (outside the reconstruction circle) become `fill_hu`.

use panscreen_shared::manifest::IntensitySpec;

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
    let mut hu = Vec::new();
    frame_to_hu_into(raw, pixels, format, fill_hu, &mut hu)?;
    Ok(hu)
}

/// [`frame_to_hu`] into `hu` (cleared first), so a series reuses one buffer. The loops
/// have no branch per sample, so the compiler vectorizes them (`Rescale::all`).
pub fn frame_to_hu_into(
    raw: &[u8],
    pixels: usize,
    format: &PixelFormat,
    fill_hu: f32,
    hu: &mut Vec<f32>,
) -> Result<(), HuError> {
    format.check()?;
    let bytes_per_sample = format.bits_allocated as usize / 8;
    let expected = pixels * bytes_per_sample;
    if raw.len() < expected {
        return Err(HuError::Length { expected, actual: raw.len() });
    }
    let slope = format.rescale_slope as f32;
    let intercept = format.rescale_intercept as f32;
    let padding = format.padding_value;
    // Every sample is written below: no need to clear what an earlier slice left.
    hu.resize(pixels, 0.0);
    let raw = &raw[..expected];
    let convert =
        Rescale { shift: 32 - u32::from(format.bits_stored), slope, intercept, padding, fill_hu };
    let (words, signed) = (bytes_per_sample == 2, format.pixel_representation == 1);
    crate::simd::with_avx2(
        #[inline(always)]
        || convert.all(raw, words, signed, hu),
    );
    Ok(())
}

/// HU rounded to whole units (half away from zero) and saturated to int16.
pub fn to_int16(hu: &[f32]) -> Vec<i16> {
    let mut out = vec![0; hu.len()];
    to_int16_into(hu, &mut out);
    out
}

/// [`to_int16`] into `out`, which is as long as `hu`.
pub fn to_int16_into(hu: &[f32], out: &mut [i16]) {
    to_int16_within(hu, out, [-32768.0, 32767.0]);
}

/// HU rounded to whole units and clamped to `range` (whole HU within int16), into `out`.
pub fn to_int16_within(hu: &[f32], out: &mut [i16], range: [f32; 2]) {
    assert_eq!(hu.len(), out.len(), "one int16 per HU value");
    let [low, high] = range;
    assert!(
        low.fract() == 0.0
            && high.fract() == 0.0
            && -32768.0 <= low
            && low <= high
            && high <= 32767.0,
        "whole HU within int16, not {range:?}"
    );
    #[inline(always)]
    fn round(hu: &[f32], out: &mut [i16], low: f32, high: f32) {
        for (out, value) in out.iter_mut().zip(hu) {
            // NaN (never made from stored values) is 0, as `as` would make it; everything
            // else is clamped into range, so the unchecked conversion vectorizes.
            let rounded = value.round();
            let clamped = if rounded.is_nan() { 0.0 } else { rounded.clamp(low, high) };
            // SAFETY: `clamped` is finite and within i16, so within i32.
            *out = unsafe { clamped.to_int_unchecked::<i32>() } as i16;
        }
    }
    // With AVX2, rounding is an instruction.
    crate::simd::with_avx2(
        #[inline(always)]
        || round(hu, out, low, high),
    )
}

/// The HU a cascade's fine grid keeps: what stage 2's `intensity` can tell apart, in
/// whole HU. Stage 2 clips its input to its window first (after its reference shift, if
/// it has one, which widens the range by the largest shift), so a value beyond is stored
/// as the range's edge: the model is given the same numbers, and the air around the body
/// and the lungs become runs that compress faster and smaller.
pub fn fine_grid_range(intensity: &IntensitySpec) -> [f32; 2] {
    let [low, high] = intensity.window_hu;
    let [least, most] = intensity.reference.map_or([0.0, 0.0], |r| r.shifts());
    let whole = |v: f64| v.clamp(-32768.0, 32767.0) as f32;
    [whole((low - most.max(0.0)).floor()), whole((high - least.min(0.0)).ceil())]
}

/// The fine grid as preprocess stores it: HU rounded to int16 and clamped to `range`
/// ([`fine_grid_range`]) in the format of [`panscreen_shared::npy::encode_fine_grid`],
/// rounded a piece at a time.
pub fn encode_fine_grid(shape: &[usize], hu: &[f32], range: [f32; 2]) -> bytes::Bytes {
    panscreen_shared::npy::encode_fine_grid(shape, |start, chunk| {
        to_int16_within(&hu[start..][..chunk.len()], chunk, range)
    })
}

/// Stored samples to HU. A stored value is the low `bits_stored` bits, shifted up to the
/// top of 32 and back: arithmetically (sign-extending) when signed, logically when not.
struct Rescale {
    shift: u32,
    slope: f32,
    intercept: f32,
    /// PixelPaddingValue as a stored value, if the header has one.
    padding: Option<i32>,
    fill_hu: f32,
}

impl Rescale {
    /// `MASKED`: BitsStored is less than the sample's width, so the bits above it are
    /// cleared (or the sign extended from its top bit); otherwise the sample is taken whole.
    /// `PADDED`: the header has a padding value, and samples equal to it become `fill_hu`.
    #[inline(always)]
    fn one<const SIGNED: bool, const MASKED: bool, const PADDED: bool>(
        &self,
        sample: u32,
        width: u32,
    ) -> f32 {
        let shift = if MASKED { self.shift } else { 32 - width };
        let stored = if SIGNED {
            ((sample << shift) as i32) >> shift
        } else {
            ((sample << shift) >> shift) as i32
        };
        let value = stored as f32 * self.slope + self.intercept;
        match self.padding {
            Some(padding) if PADDED && stored == padding => self.fill_hu,
            _ => value,
        }
    }

    /// One loop per kind of sample, each without a branch per sample (masking and sign
    /// extension are two shifts, by a constant where the sample is taken whole; padding a
    /// select, left out where there is none), so the compiler vectorizes each. The most
    /// common CT format, 16 bits stored of 16 with no padding value, becomes a widening
    /// load, a conversion, a multiply and an add.
    #[inline(always)]
    fn all(&self, raw: &[u8], words: bool, signed: bool, hu: &mut [f32]) {
        let masked = self.shift != 32 - if words { 16 } else { 8 };
        macro_rules! by_kind {
            ($samples:ident) => {
                match (signed, masked, self.padding.is_some()) {
                    (true, true, true) => self.$samples::<true, true, true>(raw, hu),
                    (true, true, false) => self.$samples::<true, true, false>(raw, hu),
                    (true, false, true) => self.$samples::<true, false, true>(raw, hu),
                    (true, false, false) => self.$samples::<true, false, false>(raw, hu),
                    (false, true, true) => self.$samples::<false, true, true>(raw, hu),
                    (false, true, false) => self.$samples::<false, true, false>(raw, hu),
                    (false, false, true) => self.$samples::<false, false, true>(raw, hu),
                    (false, false, false) => self.$samples::<false, false, false>(raw, hu),
                }
            };
        }
        if words {
            by_kind!(words)
        } else {
            by_kind!(bytes)
        }
    }

    #[inline(always)]
    fn words<const SIGNED: bool, const MASKED: bool, const PADDED: bool>(
        &self,
        raw: &[u8],
        hu: &mut [f32],
    ) {
        for (out, pair) in hu.iter_mut().zip(raw.chunks_exact(2)) {
            let sample = u32::from(u16::from_le_bytes([pair[0], pair[1]]));
            *out = self.one::<SIGNED, MASKED, PADDED>(sample, 16);
        }
    }

    #[inline(always)]
    fn bytes<const SIGNED: bool, const MASKED: bool, const PADDED: bool>(
        &self,
        raw: &[u8],
        hu: &mut [f32],
    ) {
        for (out, byte) in hu.iter_mut().zip(raw) {
            *out = self.one::<SIGNED, MASKED, PADDED>(u32::from(*byte), 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use panscreen_shared::manifest::{Normalization, ReferenceSpec};
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

    #[test]
    fn int16_rounds_half_away_from_zero_and_saturates() {
        let hu = [-1000.4, -0.5, 0.49999997, 0.5, 2.5, 40.6, 1e9, -1e9];
        assert_eq!(to_int16(&hu), [-1000, -1, 0, 1, 3, 41, 32767, -32768]);
        let odd = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -32768.6, 32767.4];
        assert_eq!(to_int16(&odd), [0, 32767, -32768, -32768, 32767]);
        // Long enough for the vector loop, against the scalar rule.
        let many: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 180.5).collect();
        let expected: Vec<i16> = many.iter().map(|v| v.round() as i16).collect();
        assert_eq!(to_int16(&many), expected);
    }

    #[test]
    fn the_stored_fine_grid_is_the_rounded_grid_piece_by_piece() {
        // Several of the encoder's 32 Ki pieces and a part of one, values past int16 too.
        let shape = [1, 1, 7, 101, 97];
        let hu: Vec<f32> =
            (0..7 * 101 * 97).map(|i| ((i * 7919) % 80_001) as f32 - 40_000.5).collect();
        let encoded = encode_fine_grid(&shape, &hu, [-32768.0, 32767.0]);
        let (decoded_shape, decoded) = panscreen_shared::npy::decode_fine_grid(&encoded).unwrap();
        assert_eq!(decoded_shape, shape);
        assert_eq!(decoded, to_int16(&hu));
        assert!(decoded.contains(&i16::MIN) && decoded.contains(&i16::MAX));
    }

    #[test]
    fn the_fine_grid_keeps_stage_two_s_window_and_the_model_sees_the_same_input() {
        let spec = |window_hu: [f64; 2], reference: Option<ReferenceSpec>| IntensitySpec {
            window_hu,
            normalize: Normalization::None,
            fill_hu: -1000.0,
            reference,
        };
        let range = fine_grid_range(&spec([-200.0, 300.0], None));
        assert_eq!(range, [-200.0, 300.0]);
        // A window that is not whole HU (nnU-Net's percentiles) widens to whole HU.
        assert_eq!(fine_grid_range(&spec([-958.3, 271.2], None)), [-959.0, 272.0]);
        assert_eq!(fine_grid_range(&spec([-1e6, 1e6], None)), [-32768.0, 32767.0]);
        let gland = ReferenceSpec { range_hu: [-30.0, 120.0], median_hu: 40.0 };
        assert_eq!(fine_grid_range(&spec([-200.0, 300.0], Some(gland))), [-270.0, 380.0]);
        let hu: Vec<f32> = (0..5000).map(|i| i as f32 * 0.61 - 1500.3).collect();
        let mut stored = vec![0; hu.len()];
        to_int16_within(&hu, &mut stored, range);
        assert_eq!((stored.iter().min(), stored.iter().max()), (Some(&-200), Some(&300)));
        // Shifted (by any shift the reference can make) and clipped to the window, as
        // stage 2 does first: the same numbers either way.
        for (window_hu, reference) in
            [([-958.3, 271.2], None), ([-200.0, 300.0], None), ([-200.0, 300.0], Some(gland))]
        {
            let intensity = spec(window_hu, reference);
            to_int16_within(&hu, &mut stored, fine_grid_range(&intensity));
            let [least, most] = reference.map_or([0.0, 0.0], |r| r.shifts());
            for shift in [least, 0.0, most].into_iter().chain(reference.map(|_| 13.5)) {
                let seen = |v: i16| (f64::from(v) + shift).clamp(window_hu[0], window_hu[1]);
                for (whole, kept) in to_int16(&hu).iter().zip(&stored) {
                    assert_eq!(seen(*whole), seen(*kept), "shift {shift}");
                }
            }
        }
    }

    proptest! {
        /// The vectorized loops against the rule written out sample by sample
        /// ([`PixelFormat::stored_value`]), for any bit depth, sign and padding value or
        /// none.
        #[test]
        fn the_vector_loop_matches_the_rule(
            raw in prop::collection::vec(any::<u16>(), 1..300),
            bits_stored in 1u16..=16,
            signed in any::<bool>(),
            slope in 0.1f64..4.0,
            intercept in -2048.0f64..2048.0,
            padding_at in any::<prop::sample::Index>(),
            padded in any::<bool>(),
        ) {
            let mut f = format(bits_stored, signed, slope, intercept);
            f.padding_value = padded.then(|| f.stored_value(raw[padding_at.index(raw.len())]));
            let hu = frame_to_hu(&bytes(&raw), raw.len(), &f, -1000.0).unwrap();
            for (found, sample) in hu.iter().zip(&raw) {
                let stored = f.stored_value(*sample);
                let expected = if Some(stored) == f.padding_value {
                    -1000.0
                } else {
                    stored as f32 * slope as f32 + intercept as f32
                };
                prop_assert_eq!(found.to_bits(), expected.to_bits());
            }
        }

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
