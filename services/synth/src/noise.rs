//! Image noise and blur of the screening phantom, in the plane of each slice.
//!
//! CT noise is not white: the reconstruction kernel correlates neighbouring pixels, so
//! noise comes in grains a few pixels wide, which a detector tuned on white noise
//! mistakes for structure. [`correlated`] smooths white noise with a Gaussian and scales
//! it back to the wanted standard deviation; [`blur`] is the scanner's limited
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

/// Noise of standard deviation `sigma_hu` whose grains are Gaussian-smoothed white noise
/// of `correlation` pixels.
pub fn correlated(
    rng: &mut Rng,
    rows: usize,
    columns: usize,
    correlation: f64,
    sigma_hu: f64,
) -> Vec<f32> {
    let white: Vec<f64> = (0..rows * columns).map(|_| rng.normal()).collect();
    let kernel = kernel(correlation);
    // Smoothing white noise of unit variance leaves variance Σw² per axis.
    let kept: f64 = kernel.iter().map(|w| w * w).sum::<f64>();
    let scale = sigma_hu / kept;
    convolve(&white, rows, columns, &kernel).into_iter().map(|v| (v * scale) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlated_noise_has_the_asked_spread_and_neighbours_that_agree() {
        let (rows, columns) = (128, 128);
        let noise = correlated(&mut Rng::new(3), rows, columns, 1.2, 20.0);
        let n = noise.len() as f64;
        let mean = noise.iter().map(|v| *v as f64).sum::<f64>() / n;
        let sd = (noise.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((sd - 20.0).abs() < 1.5, "sd {sd}");
        // Correlation of horizontal neighbours: 0 for white noise; exp(-1/(4σ²)) ≈ 0.84
        // for σ = 1.2 px.
        let mut products = 0.0;
        for row in 0..rows {
            for column in 0..columns - 1 {
                let i = row * columns + column;
                products += (noise[i] as f64 - mean) * (noise[i + 1] as f64 - mean);
            }
        }
        let correlation = products / (rows * (columns - 1)) as f64 / (sd * sd);
        assert!((correlation - 0.84).abs() < 0.05, "neighbour correlation {correlation}");
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
