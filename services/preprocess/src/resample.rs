//! Resampling onto the model's grid, one source slice at a time.
//!
//! Each axis is resampled separably: linear interpolation when upsampling, the mean
//! over each target voxel's footprint when downsampling (so noise is averaged, not
//! aliased). The target grid is centred on the scanned volume and axis-aligned with it.
//!
//! Only the slices that carry weight for some target plane are decoded, and at most
//! one is held at a time: memory is one source slice plus the (small) target tensor.

/// Normalized weights of the source samples for each target sample.
/// An empty list means the target lies outside the source: it gets the fill value.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisWeights {
    pub per_target: Vec<Vec<(usize, f32)>>,
}

/// Weights from sorted source positions to target positions (both in mm).
///
/// The source is read as a piecewise-linear signal (linear interpolation between
/// slices, held constant for half a spacing beyond the ends). When the target is
/// coarser than the source, each target sample is the mean of that signal over its
/// own footprint (a box of the target spacing); otherwise it is the signal's value at
/// the target point. Both reproduce linear functions exactly away from the ends.
pub fn axis_weights(
    source: &[f64],
    source_spacing: f64,
    target: &[f64],
    target_spacing: f64,
) -> AxisWeights {
    debug_assert!(source.windows(2).all(|pair| pair[0] < pair[1]), "source positions sorted");
    debug_assert!(source_spacing > 0.0 && target_spacing > 0.0, "spacing > 0");
    let (Some(&first), Some(&last)) = (source.first(), source.last()) else {
        return AxisWeights { per_target: vec![Vec::new(); target.len()] };
    };
    let half_edge = source_spacing / 2.0;
    let widest = source.windows(2).map(|pair| pair[1] - pair[0]).fold(source_spacing, f64::max);
    let box_width = if target_spacing > source_spacing { target_spacing } else { 0.0 };
    let per_target = target
        .iter()
        .map(|&position| {
            if position < first - half_edge || position > last + half_edge {
                return Vec::new();
            }
            let (low, high) = (position - box_width / 2.0, position + box_width / 2.0);
            let start = source.partition_point(|s| *s < low - widest);
            let mut weights: Vec<(usize, f32)> = (start..source.len())
                .take_while(|k| source[*k] <= high + widest)
                .map(|k| {
                    let weight = if box_width > 0.0 {
                        hat_integral(source, k, half_edge, low, high)
                    } else {
                        hat_value(source, k, half_edge, position)
                    };
                    (k, weight)
                })
                .filter(|(_, weight)| *weight > 1e-12)
                .map(|(k, weight)| (k, weight as f32))
                .collect();
            let total: f32 = weights.iter().map(|(_, w)| w).sum();
            if total <= 0.0 {
                return Vec::new();
            }
            weights.iter_mut().for_each(|(_, w)| *w /= total);
            weights
        })
        .collect();
    AxisWeights { per_target }
}

/// The linear-interpolation basis function of node `k`, at `u`.
fn hat_value(nodes: &[f64], k: usize, half_edge: f64, u: f64) -> f64 {
    let node = nodes[k];
    if u <= node {
        match k.checked_sub(1).map(|left| nodes[left]) {
            None => f64::from(u >= node - half_edge),
            Some(left) => ((u - left) / (node - left)).max(0.0),
        }
    } else {
        match nodes.get(k + 1) {
            None => f64::from(u <= node + half_edge),
            Some(&right) => ((right - u) / (right - node)).max(0.0),
        }
    }
}

/// The integral of node `k`'s basis function over [low, high].
fn hat_integral(nodes: &[f64], k: usize, half_edge: f64, low: f64, high: f64) -> f64 {
    let node = nodes[k];
    let overlap = |from: f64, to: f64| (from.max(low), to.min(high));
    let mut total = 0.0;
    match k.checked_sub(1).map(|left| nodes[left]) {
        None => {
            let (a, b) = overlap(node - half_edge, node);
            total += (b - a).max(0.0);
        }
        Some(left) => {
            let (a, b) = overlap(left, node);
            if b > a {
                total += ((b - left).powi(2) - (a - left).powi(2)) / (2.0 * (node - left));
            }
        }
    }
    match nodes.get(k + 1) {
        None => {
            let (a, b) = overlap(node, node + half_edge);
            total += (b - a).max(0.0);
        }
        Some(&right) => {
            let (a, b) = overlap(node, right);
            if b > a {
                total += ((right - a).powi(2) - (right - b).powi(2)) / (2.0 * (right - node));
            }
        }
    }
    total
}

/// `count` target positions `spacing` apart, centred on `center`.
pub fn centred_positions(center: f64, count: usize, spacing: f64) -> Vec<f64> {
    (0..count).map(|i| center + (i as f64 - (count as f64 - 1.0) / 2.0) * spacing).collect()
}

/// One axis's weights as fixed-width windows: target `t` reads the `width` source
/// samples from `starts[t]` with `weights[t * width..][..width]` (zeros where the window
/// is wider than its support). Targets outside the source have no window (`covered` is
/// false) and take the fill value. Built once per grid, read for every slice.
#[derive(Debug, Clone, PartialEq)]
struct Windows {
    width: usize,
    starts: Vec<usize>,
    weights: Vec<f32>,
    covered: Vec<bool>,
}

impl Windows {
    /// `sources`: how many source samples there are; a window never reads past them.
    fn new(axis: &AxisWeights, sources: usize) -> Windows {
        let span = |weights: &[(usize, f32)]| {
            let first = weights.iter().map(|(index, _)| *index).min().unwrap_or(0);
            let last = weights.iter().map(|(index, _)| *index).max().unwrap_or(0);
            (first, last + 1 - first)
        };
        let widest = axis.per_target.iter().map(|w| span(w).1).max().unwrap_or(1).min(sources);
        // Multiples of 4 (the running sums below) that the compiler unrolls.
        let width = [4, 8, 12, 16].into_iter().find(|w| *w >= widest).unwrap_or(widest);
        let width = width.min(sources.max(1));
        let mut windows = Windows {
            width,
            starts: Vec::with_capacity(axis.per_target.len()),
            weights: vec![0.0; axis.per_target.len() * width],
            covered: axis.per_target.iter().map(|w| !w.is_empty()).collect(),
        };
        for (target, per_target) in axis.per_target.iter().enumerate() {
            let (first, _) = span(per_target);
            let start = first.min(sources.saturating_sub(width));
            windows.starts.push(start);
            for &(index, weight) in per_target {
                windows.weights[target * width + index - start] = weight;
            }
        }
        windows
    }

    fn targets(&self) -> usize {
        self.starts.len()
    }

    fn of(&self, target: usize) -> (usize, &[f32]) {
        (self.starts[target], &self.weights[target * self.width..(target + 1) * self.width])
    }
}

/// Resamples source planes onto one target plane: along the columns first (each target
/// row a weighted sum of whole source rows, which vectorizes), then along each row (a
/// short fixed-width dot product per target voxel). Source rows that no target row reads
/// are never touched. Holds its scratch buffer, so a series reuses it slice after slice.
#[derive(Debug, Clone)]
pub struct PlaneResampler {
    rows: Windows,
    columns: Windows,
    fill: f32,
    partial: Vec<f32>,
}

impl PlaneResampler {
    /// For source planes of `source_rows × source_columns`.
    pub fn new(
        row_weights: &AxisWeights,
        column_weights: &AxisWeights,
        source_rows: usize,
        source_columns: usize,
        fill: f32,
    ) -> Self {
        PlaneResampler {
            rows: Windows::new(row_weights, source_rows),
            columns: Windows::new(column_weights, source_columns),
            fill,
            partial: Vec::new(),
        }
    }

    /// Target (rows, columns).
    pub fn target_shape(&self) -> (usize, usize) {
        (self.rows.targets(), self.columns.targets())
    }

    /// Resamples `plane` (`columns` wide, row-major, as declared at [`PlaneResampler::new`])
    /// into `out`, which it resizes.
    pub fn resample_into(&mut self, plane: &[f32], columns: usize, out: &mut Vec<f32>) {
        crate::simd::with_avx2(
            #[inline(always)]
            || self.resample(plane, columns, out),
        );
    }

    #[inline(always)]
    fn resample(&mut self, plane: &[f32], columns: usize, out: &mut Vec<f32>) {
        let (target_rows, target_columns) = self.target_shape();
        // Rows no target row reads are never written, nor read below.
        self.partial.resize(target_rows * columns, 0.0);
        let mut sources: Vec<(f32, &[f32])> = Vec::with_capacity(self.rows.width);
        for (target_row, partial) in self.partial.chunks_exact_mut(columns).enumerate() {
            if !self.rows.covered[target_row] {
                continue;
            }
            let (start, weights) = self.rows.of(target_row);
            let rows =
                plane[start * columns..(start + weights.len()) * columns].chunks_exact(columns);
            sources.clear();
            sources.extend(
                weights
                    .iter()
                    .zip(rows)
                    .filter(|(weight, _)| **weight != 0.0)
                    .map(|(weight, row)| (*weight, row)),
            );
            weighted_rows(&sources, partial);
        }
        out.clear();
        out.resize(target_rows * target_columns, self.fill);
        let width = self.columns.width;
        for (target_row, out_row) in out.chunks_exact_mut(target_columns).enumerate() {
            if !self.rows.covered[target_row] {
                continue;
            }
            let partial = &self.partial[target_row * columns..(target_row + 1) * columns];
            match width {
                4 => columns_pass::<4>(partial, &self.columns, out_row),
                8 => columns_pass::<8>(partial, &self.columns, out_row),
                12 => columns_pass::<12>(partial, &self.columns, out_row),
                16 => columns_pass::<16>(partial, &self.columns, out_row),
                _ => columns_pass_any(partial, &self.columns, out_row),
            }
        }
    }
}

/// `out = Σ weight × row`, in the order given, a block of columns at a time held in
/// registers: each source row is read once and `out` written once. Blocks of 32 columns
/// (four 8-lane vectors) keep four independent additions in flight; one block of 8 waits
/// for each addition before the next. The columns left over go one at a time.
#[inline(always)]
fn weighted_rows(sources: &[(f32, &[f32])], out: &mut [f32]) {
    let done = weighted_blocks::<32>(sources, out, 0);
    let done = weighted_blocks::<8>(sources, out, done);
    weighted_blocks::<1>(sources, out, done);
}

/// [`weighted_rows`] over the whole blocks of `BLOCK` columns from `from`; returns where
/// they end.
#[inline(always)]
fn weighted_blocks<const BLOCK: usize>(
    sources: &[(f32, &[f32])],
    out: &mut [f32],
    from: usize,
) -> usize {
    let blocks = (out.len() - from) / BLOCK;
    for block in 0..blocks {
        let at = from + block * BLOCK;
        let mut sums = [0.0f32; BLOCK];
        for (weight, row) in sources {
            let values: &[f32; BLOCK] = row[at..][..BLOCK].try_into().expect("a whole block");
            for lane in 0..BLOCK {
                sums[lane] += values[lane] * weight;
            }
        }
        out[at..][..BLOCK].copy_from_slice(&sums);
    }
    from + blocks * BLOCK
}

/// One target row along the columns, windows `W` wide.
#[inline(always)]
fn columns_pass<const W: usize>(partial: &[f32], windows: &Windows, out_row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    columns_pass_sse::<W>(partial, windows, out_row);
    #[cfg(not(target_arch = "x86_64"))]
    columns_pass_portable::<W>(partial, windows, out_row);
}

/// [`columns_pass`] in plain Rust: the definition of its sums, and the code elsewhere
/// than on x86-64.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline(always)]
fn columns_pass_portable<const W: usize>(partial: &[f32], windows: &Windows, out_row: &mut [f32]) {
    for (column, value) in out_row.iter_mut().enumerate() {
        if !windows.covered[column] {
            continue;
        }
        let start = windows.starts[column];
        let source: &[f32; W] = partial[start..start + W].try_into().expect("a window is W wide");
        let weights: &[f32; W] =
            windows.weights[column * W..(column + 1) * W].try_into().expect("W weights");
        // Four running sums, not one: without them every add waits for the one before.
        let mut lanes = [0.0f32; 4];
        for k in 0..W {
            lanes[k % 4] += source[k] * weights[k];
        }
        *value = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
    }
}

/// [`columns_pass_portable`]'s sums, the same to the bit, in SSE's 4-lane vectors (every
/// x86-64 CPU has them), four target voxels at a time: each voxel's lane `j` sums its
/// products `j, j + 4, …` in that order, then the four voxels' lanes are interleaved so
/// that one vector of each step holds `lane 0 + lane 2`, the other `lane 1 + lane 3`, and
/// one add makes all four sums. The compiler's own vectorization of the plain loop paired
/// lanes and ran at twice the cost.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn columns_pass_sse<const W: usize>(partial: &[f32], windows: &Windows, out_row: &mut [f32]) {
    use std::arch::x86_64::{
        __m128, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_loadu_ps, _mm_movehl_ps, _mm_movelh_ps,
        _mm_mul_ps, _mm_shuffle_ps, _mm_storeu_ps, _mm_unpackhi_ps, _mm_unpacklo_ps,
    };
    const { assert!(W.is_multiple_of(4) && W > 0) };
    // The four lanes of one voxel's window sum.
    let lanes = |column: usize| -> __m128 {
        let start = windows.starts[column];
        let source: &[f32; W] = partial[start..start + W].try_into().expect("a window is W wide");
        let weights: &[f32; W] =
            windows.weights[column * W..(column + 1) * W].try_into().expect("W weights");
        // SAFETY: SSE is part of every x86-64 CPU; each load reads 4 values from k, and
        // k + 4 ≤ W (k runs over 0, 4, …, W − 4), the length of both arrays.
        unsafe {
            let quarter = |k: usize| {
                _mm_mul_ps(
                    _mm_loadu_ps(source.as_ptr().add(k)),
                    _mm_loadu_ps(weights.as_ptr().add(k)),
                )
            };
            let mut lanes = quarter(0);
            for k in (4..W).step_by(4) {
                lanes = _mm_add_ps(lanes, quarter(k));
            }
            lanes
        }
    };
    let mut column = 0;
    while column < out_row.len() {
        let four = column + 4 <= out_row.len() && windows.covered[column..column + 4] == [true; 4];
        if four {
            let [a, b, c, d] = std::array::from_fn(|k| lanes(column + k));
            let out: &mut [f32; 4] =
                (&mut out_row[column..column + 4]).try_into().expect("4 voxels");
            // SAFETY: SSE is part of every x86-64 CPU; the store writes the 4 values of `out`.
            unsafe {
                let ab = _mm_add_ps(_mm_unpacklo_ps(a, b), _mm_unpackhi_ps(a, b));
                let cd = _mm_add_ps(_mm_unpacklo_ps(c, d), _mm_unpackhi_ps(c, d));
                // (a0 + a2, b0 + b2, c0 + c2, d0 + d2) + (a1 + a3, b1 + b3, c1 + c3, d1 + d3)
                let sums = _mm_add_ps(_mm_movelh_ps(ab, cd), _mm_movehl_ps(cd, ab));
                _mm_storeu_ps(out.as_mut_ptr(), sums);
            }
            column += 4;
            continue;
        }
        if windows.covered[column] {
            let lanes = lanes(column);
            // SAFETY: SSE is part of every x86-64 CPU.
            out_row[column] = unsafe {
                let pairs = _mm_add_ps(lanes, _mm_movehl_ps(lanes, lanes));
                _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs)))
            };
        }
        column += 1;
    }
}

#[inline(always)]
fn columns_pass_any(partial: &[f32], windows: &Windows, out_row: &mut [f32]) {
    for (column, value) in out_row.iter_mut().enumerate() {
        if !windows.covered[column] {
            continue;
        }
        let (start, weights) = windows.of(column);
        *value = partial[start..start + weights.len()]
            .iter()
            .zip(weights)
            .map(|(value, weight)| value * weight)
            .sum();
    }
}

/// Accumulates resampled planes into the target volume along the slice axis.
pub struct SliceAccumulator {
    planes: usize,
    plane_len: usize,
    volume: Vec<f32>,
    /// For each source slice: the target planes it feeds and with what weight.
    contributions: Vec<Vec<(usize, f32)>>,
    covered: Vec<bool>,
    fill: f32,
}

impl SliceAccumulator {
    pub fn new(
        slice_weights: &AxisWeights,
        source_slices: usize,
        plane_len: usize,
        fill: f32,
    ) -> Self {
        let mut contributions = vec![Vec::new(); source_slices];
        for (plane, weights) in slice_weights.per_target.iter().enumerate() {
            for (slice, weight) in weights {
                contributions[*slice].push((plane, *weight));
            }
        }
        let planes = slice_weights.per_target.len();
        SliceAccumulator {
            planes,
            plane_len,
            volume: vec![0.0; planes * plane_len],
            contributions,
            covered: slice_weights.per_target.iter().map(|w| !w.is_empty()).collect(),
            fill,
        }
    }

    /// Source slices worth decoding.
    pub fn needed_slices(&self) -> Vec<usize> {
        (0..self.contributions.len())
            .filter(|slice| !self.contributions[*slice].is_empty())
            .collect()
    }

    /// Whether source slice `slice` carries weight for some target plane.
    pub fn feeds(&self, slice: usize) -> bool {
        !self.contributions[slice].is_empty()
    }

    pub fn add(&mut self, slice: usize, resampled_plane: &[f32]) {
        debug_assert_eq!(resampled_plane.len(), self.plane_len);
        let (volume, plane_len) = (&mut self.volume, self.plane_len);
        crate::simd::with_avx2(
            #[inline(always)]
            || {
                for (plane, weight) in &self.contributions[slice] {
                    let target = &mut volume[plane * plane_len..(plane + 1) * plane_len];
                    for (out, value) in target.iter_mut().zip(resampled_plane) {
                        *out += value * weight;
                    }
                }
            },
        );
    }

    pub fn finish(mut self) -> Vec<f32> {
        for plane in 0..self.planes {
            if !self.covered[plane] {
                self.volume[plane * self.plane_len..(plane + 1) * self.plane_len].fill(self.fill);
            }
        }
        self.volume
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Resamples one source plane (`rows × columns`, row-major) onto the target plane.
    fn resample_plane(
        plane: &[f32],
        columns: usize,
        row_weights: &AxisWeights,
        column_weights: &AxisWeights,
        fill: f32,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        PlaneResampler::new(row_weights, column_weights, plane.len() / columns, columns, fill)
            .resample_into(plane, columns, &mut out);
        out
    }

    fn uniform(count: usize, spacing: f64) -> Vec<f64> {
        (0..count).map(|i| i as f64 * spacing).collect()
    }

    #[test]
    fn weights_sum_to_one_and_outside_is_empty() {
        let weights = axis_weights(&uniform(10, 1.0), 1.0, &[-5.0, 0.0, 4.5, 9.4, 20.0], 2.0);
        assert!(weights.per_target[0].is_empty());
        assert!(weights.per_target[4].is_empty());
        for w in &weights.per_target[1..4] {
            assert!((w.iter().map(|(_, w)| w).sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn upsampling_is_linear_interpolation() {
        let weights = axis_weights(&uniform(3, 2.0), 2.0, &[1.0], 1.0);
        assert_eq!(weights.per_target[0], vec![(0, 0.5), (1, 0.5)]);
    }

    /// An analytic volume f = a·x + b·y + c·z + d is reproduced exactly away from the
    /// edges: the tent kernel is symmetric, so linear functions pass unchanged.
    fn resample_linear(
        a: f32,
        b: f32,
        c: f32,
        d: f32,
        source_spacing: [f64; 3],
        target_spacing: [f64; 3],
    ) -> f32 {
        let (rows, columns, slices) = (60usize, 60usize, 40usize);
        let row_pos = uniform(rows, source_spacing[1]);
        let column_pos = uniform(columns, source_spacing[2]);
        let slice_pos = uniform(slices, source_spacing[0]);
        let centre = |positions: &[f64]| (positions[0] + positions[positions.len() - 1]) / 2.0;
        let (tr, tc, ts) = (6usize, 6usize, 4usize);
        let target_rows = centred_positions(centre(&row_pos), tr, target_spacing[1]);
        let target_columns = centred_positions(centre(&column_pos), tc, target_spacing[2]);
        let target_slices = centred_positions(centre(&slice_pos), ts, target_spacing[0]);
        let rw = axis_weights(&row_pos, source_spacing[1], &target_rows, target_spacing[1]);
        let cw = axis_weights(&column_pos, source_spacing[2], &target_columns, target_spacing[2]);
        let sw = axis_weights(&slice_pos, source_spacing[0], &target_slices, target_spacing[0]);
        let mut accumulator = SliceAccumulator::new(&sw, slices, tr * tc, -1000.0);
        for slice in accumulator.needed_slices() {
            let plane: Vec<f32> = (0..rows * columns)
                .map(|i| {
                    let (r, col) = (i / columns, i % columns);
                    a * column_pos[col] as f32
                        + b * row_pos[r] as f32
                        + c * slice_pos[slice] as f32
                        + d
                })
                .collect();
            accumulator.add(slice, &resample_plane(&plane, columns, &rw, &cw, -1000.0));
        }
        let volume = accumulator.finish();
        let mut worst = 0.0f32;
        for s in 0..ts {
            for r in 0..tr {
                for col in 0..tc {
                    let expected = a * target_columns[col] as f32
                        + b * target_rows[r] as f32
                        + c * target_slices[s] as f32
                        + d;
                    worst = worst.max((volume[(s * tr + r) * tc + col] - expected).abs());
                }
            }
        }
        worst
    }

    #[test]
    fn linear_volume_down_and_upsampled() {
        assert!(resample_linear(1.0, 2.0, 3.0, 40.0, [2.5, 0.7, 0.7], [3.0, 2.5, 2.5]) < 1e-3);
        assert!(resample_linear(-1.0, 0.5, 2.0, -100.0, [5.0, 3.0, 3.0], [1.0, 1.0, 1.0]) < 1e-3);
    }

    #[test]
    fn uncovered_planes_get_the_fill_value() {
        let sw = axis_weights(&uniform(2, 1.0), 1.0, &[0.0, 50.0], 1.0);
        let mut accumulator = SliceAccumulator::new(&sw, 2, 1, -1000.0);
        assert_eq!(accumulator.needed_slices(), vec![0]);
        accumulator.add(0, &[7.0]);
        assert_eq!(accumulator.finish(), vec![7.0, -1000.0]);
    }

    #[test]
    fn downsampling_averages_noise() {
        // Alternating +1/-1 averages to ~0 with the area kernel; plain linear
        // interpolation at sample points would return ±1.
        let source = uniform(64, 0.5);
        let weights = axis_weights(&source, 0.5, &centred_positions(15.75, 4, 2.0), 2.0);
        for w in &weights.per_target {
            let value: f32 = w.iter().map(|(i, w)| if i % 2 == 0 { *w } else { -*w }).sum();
            assert!(value.abs() < 0.2, "{value}");
        }
    }

    /// Each target voxel straight from its definition: the double sum over source rows
    /// and columns of the two weights times the value.
    fn reference(plane: &[f32], columns: usize, rw: &AxisWeights, cw: &AxisWeights) -> Vec<f32> {
        let mut out = Vec::new();
        for row in &rw.per_target {
            for column in &cw.per_target {
                if row.is_empty() || column.is_empty() {
                    out.push(-1000.0);
                    continue;
                }
                let mut sum = 0.0f64;
                for (r, wr) in row {
                    for (c, wc) in column {
                        sum += f64::from(plane[r * columns + c]) * f64::from(*wr * *wc);
                    }
                }
                out.push(sum as f32);
            }
        }
        out
    }

    proptest! {
        /// The windowed, vectorized passes against the definition, on planes of any
        /// size and spacing, grids reaching past the source's edges included.
        #[test]
        fn the_plane_resampler_matches_the_definition(
            rows in 3usize..70, columns in 3usize..70,
            source in prop::array::uniform2(0.3f64..3.0),
            target in prop::array::uniform2(0.3f64..6.0),
            shape in prop::array::uniform2(1usize..40),
            shift in prop::array::uniform2(-20.0f64..20.0),
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let plane: Vec<f32> = (0..rows * columns)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 4000) as f32 - 1500.0
                })
                .collect();
            let row_positions = uniform(rows, source[0]);
            let column_positions = uniform(columns, source[1]);
            let centre = |p: &[f64], s: f64| (p[0] + p[p.len() - 1]) / 2.0 + s;
            let rw = axis_weights(
                &row_positions, source[0],
                &centred_positions(centre(&row_positions, shift[0]), shape[0], target[0]), target[0],
            );
            let cw = axis_weights(
                &column_positions, source[1],
                &centred_positions(centre(&column_positions, shift[1]), shape[1], target[1]), target[1],
            );
            let mut resampler = PlaneResampler::new(&rw, &cw, rows, columns, -1000.0);
            let mut out = Vec::new();
            // Twice through the same resampler: the scratch buffer carries nothing over.
            for _ in 0..2 {
                resampler.resample_into(&plane, columns, &mut out);
                let expected = reference(&plane, columns, &rw, &cw);
                prop_assert_eq!(out.len(), expected.len());
                for (found, expected) in out.iter().zip(&expected) {
                    prop_assert!((found - expected).abs() <= 1e-3 * expected.abs().max(1.0), "{} vs {}", found, expected);
                }
            }
        }

        /// The SSE pass along the columns makes the plain loop's sums to the bit, covered
        /// or not, for every window width.
        #[cfg(target_arch = "x86_64")]
        #[test]
        fn the_sse_pass_along_columns_is_the_plain_one(
            columns in 3usize..90,
            source in 0.3f64..3.0,
            target in 0.3f64..12.0,
            shape in 1usize..40,
            shift in -20.0f64..20.0,
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let partial: Vec<f32> = (0..columns)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 4000) as f32 / 7.0 - 200.0
                })
                .collect();
            let positions = uniform(columns, source);
            let centre = (positions[0] + positions[columns - 1]) / 2.0 + shift;
            let weights =
                axis_weights(&positions, source, &centred_positions(centre, shape, target), target);
            let windows = Windows::new(&weights, columns);
            let (mut sse, mut plain) = (vec![-1000.0; shape], vec![-1000.0; shape]);
            macro_rules! both {
                ($w:literal) => {{
                    columns_pass_sse::<$w>(&partial, &windows, &mut sse);
                    columns_pass_portable::<$w>(&partial, &windows, &mut plain);
                }};
            }
            match windows.width {
                4 => both!(4),
                8 => both!(8),
                12 => both!(12),
                16 => both!(16),
                _ => return Ok(()),
            }
            for (sse, plain) in sse.iter().zip(&plain) {
                prop_assert!(sse == plain, "{} vs {}", sse, plain);
            }
        }

        #[test]
        fn linear_functions_survive_any_spacing(
            a in -5.0f32..5.0, b in -5.0f32..5.0, c in -5.0f32..5.0,
            source in prop::array::uniform3(0.5f64..3.0),
            target in prop::array::uniform3(0.5f64..3.0),
        ) {
            let error = resample_linear(a, b, c, 10.0, source, target);
            prop_assert!(error < 2e-2, "error {}", error);
        }
    }
}
