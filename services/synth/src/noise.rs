//! Image noise and blur of the screening phantom, in the plane of each slice.
//!
//! CT noise is not white: filtered back-projection's ramp filter takes the power out of
//! the lowest frequencies and the reconstruction kernel rolls off the highest, so noise
//! comes in grains a few pixels wide, which a detector tuned on white noise mistakes for
//! structure, while regions a lesion wide average it away. [`CtNoise`] draws noise with
//! that spectrum and the wanted standard deviation; [`blur`] is the scanner's limited
//! resolution on the noise-free image.

use crate::rng::Rng;

/// A normalized Gaussian kernel of standard deviation `sigma` (pixels), ±3σ wide.
fn kernel(sigma: f64) -> Vec<f64> {
    let half = (3.0 * sigma).ceil().max(1.0) as i64;
    let weights: Vec<f64> =
        (-half..=half).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// Separable convolution of a `rows × columns` image (edges repeat the border pixel).
fn convolve(image: &[f64], rows: usize, columns: usize, kernel: &[f64]) -> Vec<f64> {
    let half = (kernel.len() / 2) as i64;
    let mut across = vec![0.0; image.len()];
    for row in 0..rows {
        let line = &image[row * columns..(row + 1) * columns];
        for column in 0..columns {
            across[row * columns + column] = kernel
                .iter()
                .enumerate()
                .map(|(k, w)| {
                    let c = (column as i64 + k as i64 - half).clamp(0, columns as i64 - 1);
                    w * line[c as usize]
                })
                .sum();
        }
    }
    let mut out = vec![0.0; image.len()];
    for row in 0..rows {
        for column in 0..columns {
            out[row * columns + column] = kernel
                .iter()
                .enumerate()
                .map(|(k, w)| {
                    let r = (row as i64 + k as i64 - half).clamp(0, rows as i64 - 1);
                    w * across[r as usize * columns + column]
                })
                .sum();
        }
    }
    out
}

/// `image` blurred by a Gaussian of `sigma` pixels.
pub fn blur(image: &[f32], rows: usize, columns: usize, sigma: f64) -> Vec<f32> {
    let wide: Vec<f64> = image.iter().map(|v| *v as f64).collect();
    convolve(&wide, rows, columns, &kernel(sigma)).into_iter().map(|v| v as f32).collect()
}

/// Noise with the spectrum filtered back-projection gives CT: the ramp filter's |f| (no
/// power at zero frequency, little at a lesion's scale) times the square of the
/// kernel's roll-off, a Gaussian of `kernel_px` pixels. The spectrum is worked out once
/// per image size and kernel; [`CtNoise::draw`] makes each slice's noise from it.
///
/// Smoothed white noise scaled back to σ would peak at zero frequency instead, and put
/// 2.5–10 times this noise's power into the 10 mm regions a detector weighs.
pub struct CtNoise {
    rows: usize,
    columns: usize,
    /// Side of the square, periodic canvas the noise is drawn on (a power of two).
    n: usize,
    /// |A(f)| of each frequency bin, row-major on the canvas.
    amplitudes: Vec<f64>,
    /// Σ|A(f)|²: the variance of the real part of Σ A(f) z(f) e^{iθ} for standard complex z.
    power: f64,
    /// e^(−2πik/n) for k < n/2.
    twiddles: Vec<(f64, f64)>,
}

impl CtNoise {
    pub fn new(rows: usize, columns: usize, kernel_px: f64) -> CtNoise {
        let n = rows.max(columns).next_power_of_two();
        let frequency =
            |i: usize| (if i < n / 2 { i as f64 } else { i as f64 - n as f64 }) / n as f64;
        let roll_off = -2.0 * std::f64::consts::PI.powi(2) * kernel_px * kernel_px;
        let amplitudes: Vec<f64> = (0..n * n)
            .map(|i| {
                let f2 = frequency(i / n).powi(2) + frequency(i % n).powi(2);
                f2.sqrt().sqrt() * (roll_off * f2).exp()
            })
            .collect();
        let power = amplitudes.iter().map(|amplitude| amplitude * amplitude).sum();
        CtNoise { rows, columns, n, amplitudes, power, twiddles: twiddles(n) }
    }

    /// One slice of noise of standard deviation `sigma_hu`, `rows × columns`, row-major.
    pub fn draw(&self, rng: &mut Rng, sigma_hu: f64) -> Vec<f32> {
        let n = self.n;
        let mut spectrum: Vec<(f64, f64)> = self
            .amplitudes
            .iter()
            .map(|amplitude| (amplitude * rng.normal(), amplitude * rng.normal()))
            .collect();
        fft_2d(&mut spectrum, n, &self.twiddles);
        let scale = if self.power > 0.0 { sigma_hu / self.power.sqrt() } else { 0.0 };
        (0..self.rows)
            .flat_map(|row| (0..self.columns).map(move |column| row * n + column))
            .map(|i| (spectrum[i].0 * scale) as f32)
            .collect()
    }
}

/// e^(−2πik/n) for k < n/2: what [`fft`] multiplies by.
fn twiddles(n: usize) -> Vec<(f64, f64)> {
    (0..n / 2)
        .map(|k| {
            let (sin, cos) = (-2.0 * std::f64::consts::PI * k as f64 / n as f64).sin_cos();
            (cos, sin)
        })
        .collect()
}

/// In-place 2D transform of an `n × n` row-major array, `n` a power of two (the sign of
/// the exponent does not matter to noise).
fn fft_2d(data: &mut [(f64, f64)], n: usize, twiddles: &[(f64, f64)]) {
    for row in data.chunks_exact_mut(n) {
        fft(row, twiddles);
    }
    let mut column = vec![(0.0, 0.0); n];
    for c in 0..n {
        for (r, value) in column.iter_mut().enumerate() {
            *value = data[r * n + c];
        }
        fft(&mut column, twiddles);
        for (r, value) in column.iter().enumerate() {
            data[r * n + c] = *value;
        }
    }
}

/// Iterative radix-2 Cooley–Tukey transform; `data.len()` is a power of two and
/// `twiddles[k]` is e^(−2πik/len) for k < len/2.
fn fft(data: &mut [(f64, f64)], twiddles: &[(f64, f64)]) {
    let n = data.len();
    let mut j = 0;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            data.swap(i, j);
        }
    }
    let mut half = 1;
    while half < n {
        let stride = n / (2 * half);
        for start in (0..n).step_by(2 * half) {
            for k in 0..half {
                let (cos, sin) = twiddles[k * stride];
                let (a, b) = (data[start + k], data[start + k + half]);
                let twisted = (b.0 * cos - b.1 * sin, b.0 * sin + b.1 * cos);
                data[start + k] = (a.0 + twisted.0, a.1 + twisted.1);
                data[start + k + half] = (a.0 - twisted.0, a.1 - twisted.1);
            }
        }
        half <<= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Correlation of horizontal neighbours `lag` pixels apart.
    fn correlation(noise: &[f32], columns: usize, lag: usize) -> f64 {
        let (mut products, mut squares) = (0.0, 0.0);
        for row in noise.chunks_exact(columns) {
            for column in 0..columns - lag {
                products += row[column] as f64 * row[column + lag] as f64;
            }
            squares += row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        }
        let rows = (noise.len() / columns) as f64;
        products / (rows * (columns - lag) as f64) / (squares / noise.len() as f64)
    }

    #[test]
    fn ct_noise_has_the_asked_spread_and_the_kernels_grain() {
        let (rows, columns) = (128, 100);
        let noise = CtNoise::new(rows, columns, 1.2).draw(&mut Rng::new(3), 20.0);
        assert_eq!(noise.len(), rows * columns);
        let n = noise.len() as f64;
        let sd = (noise.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n).sqrt();
        assert!((sd - 20.0).abs() < 1.5, "sd {sd}");
        // Σ|A(f)|² cos(2πf) / Σ|A(f)|² for |A|² = |f| exp(−4π²σ²f²), σ = 1.2 px: 0.766.
        let neighbours = correlation(&noise, columns, 1);
        assert!((neighbours - 0.766).abs() < 0.05, "neighbour correlation {neighbours}");
    }

    #[test]
    fn ct_noise_has_no_power_at_zero_frequency() {
        // On an uncropped canvas the mean is the zero-frequency term: none.
        let noise = CtNoise::new(128, 128, 0.5).draw(&mut Rng::new(5), 20.0);
        let mean = noise.iter().map(|v| *v as f64).sum::<f64>() / noise.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        // The ramp's mark: pixels two apart disagree (−0.10 expected), which smoothed
        // white noise never does.
        let two_apart = correlation(&noise, 128, 2);
        assert!(two_apart < -0.05, "correlation two pixels apart {two_apart}");
    }

    #[test]
    fn the_transform_agrees_with_the_definition() {
        let input: Vec<(f64, f64)> =
            (0..16).map(|i| ((i as f64).sin(), (i * i % 7) as f64)).collect();
        let mut fast = vec![(0.0, 0.0); 16 * 16];
        fast[..16].copy_from_slice(&input);
        fft_2d(&mut fast, 16, &twiddles(16));
        for k in 0..16 {
            let (mut re, mut im) = (0.0, 0.0);
            for (j, (a, b)) in input.iter().enumerate() {
                let (sin, cos) = (-2.0 * std::f64::consts::PI * (j * k) as f64 / 16.0).sin_cos();
                re += a * cos - b * sin;
                im += a * sin + b * cos;
            }
            // Only row 0 holds data, so every row of the 2D transform is its 1D transform.
            for row in 0..16 {
                let (r, i) = fast[row * 16 + k];
                assert!((r - re).abs() < 1e-9 && (i - im).abs() < 1e-9, "bin {k} row {row}");
            }
        }
    }

    #[test]
    fn blur_keeps_a_flat_image_and_softens_an_edge() {
        let (rows, columns) = (8, 16);
        let flat = vec![40.0f32; rows * columns];
        assert!(blur(&flat, rows, columns, 1.0).iter().all(|v| (v - 40.0).abs() < 1e-4));
        let edge: Vec<f32> =
            (0..rows * columns).map(|i| if i % columns < 8 { 0.0 } else { 100.0 }).collect();
        let soft = blur(&edge, rows, columns, 1.0);
        let (left, right) = (soft[7], soft[8]);
        assert!(left > 10.0 && left < 50.0 && right > 50.0 && right < 90.0, "{left} {right}");
    }
}
