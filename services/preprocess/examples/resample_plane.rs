//! One source plane through the resampling alone, for `docs/benchmarks.md`: a 512×512
//! plane at 0.7 mm onto a cascade's two in-plane grids (180² at 2 mm, the fine grid; 96²
//! at 4 mm, stage 1's), the way preprocess resamples each slice.
//!
//! Usage: `cargo run --release -p panscreen-preprocess --example resample_plane`, under
//! `taskset -c 0` for one core. Prints the best of 20 runs of 100 planes for each grid,
//! and a hash of the output's bits, so that two builds can be checked for the same sums.

use std::time::Instant;

use panscreen_preprocess::resample::{axis_weights, centred_positions, PlaneResampler};

fn main() {
    const SIZE: usize = 512;
    const PIXEL_MM: f64 = 0.7;
    let source: Vec<f64> = (0..SIZE).map(|i| i as f64 * PIXEL_MM).collect();
    let centre = (SIZE as f64 - 1.0) * PIXEL_MM / 2.0;
    // Values spread over CT's range, the same every run.
    let plane: Vec<f32> =
        (0..SIZE * SIZE).map(|i| (i.wrapping_mul(2_654_435_761) % 2000) as f32 - 1000.0).collect();
    for (spacing, count) in [(2.0, 180), (4.0, 96)] {
        let weights =
            axis_weights(&source, PIXEL_MM, &centred_positions(centre, count, spacing), spacing);
        let mut resampler = PlaneResampler::new(&weights, &weights, SIZE, SIZE, -1024.0);
        let mut out = Vec::new();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let started = Instant::now();
            for _ in 0..100 {
                resampler.resample_into(&plane, SIZE, &mut out);
            }
            best = best.min(started.elapsed().as_secs_f64() * 1e6 / 100.0);
        }
        let hash = out.iter().fold(0u64, |hash, value| {
            hash.wrapping_mul(31).wrapping_add(u64::from(value.to_bits()))
        });
        println!("{spacing} mm grid ({count}²): {best:.1} µs a plane, output hash {hash:016x}");
    }
}
