//! The geometry of a two-stage cascade: the pancreas stage 1 found → the box stage 2
//! sees → the patches that cover it → their outputs blended back into one map.
//!
//! As nnU-Net predicts: patches overlap by a fraction of their size, each patch's
//! output is weighted by a Gaussian centred on it (its centre is where it sees the most
//! context), and mirrored copies of a patch may be averaged (test-time augmentation).

use panscreen_shared::contracts::TensorGeometry;

/// The largest connected region of a stage-1 map at or above a threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Voxels in the region.
    pub voxels: usize,
    /// Bounding box, inclusive, (depth, height, width) indices.
    pub min: [usize; 3],
    pub max: [usize; 3],
    /// The region's voxels (flat indices).
    pub members: Vec<usize>,
}

/// The largest 6-connected region of voxels `>= threshold` in a `shape` volume.
pub fn largest_region(map: &[f32], shape: [usize; 3], threshold: f32) -> Option<Region> {
    let [depth, height, width] = shape;
    debug_assert_eq!(map.len(), depth * height * width);
    let mut seen = vec![false; map.len()];
    let mut best: Option<Region> = None;
    let mut stack = Vec::new();
    for start in 0..map.len() {
        if seen[start] || map[start] < threshold {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut region =
            Region { voxels: 0, min: [usize::MAX; 3], max: [0; 3], members: Vec::new() };
        while let Some(at) = stack.pop() {
            let index = [at / (height * width), at / width % height, at % width];
            region.voxels += 1;
            region.members.push(at);
            for (axis, at) in index.iter().enumerate() {
                region.min[axis] = region.min[axis].min(*at);
                region.max[axis] = region.max[axis].max(*at);
            }
            let strides = [height * width, width, 1];
            for axis in 0..3 {
                let neighbours = [
                    index[axis].checked_sub(1).map(|_| at - strides[axis]),
                    (index[axis] + 1 < shape[axis]).then(|| at + strides[axis]),
                ];
                for next in neighbours.into_iter().flatten() {
                    if !seen[next] && map[next] >= threshold {
                        seen[next] = true;
                        stack.push(next);
                    }
                }
            }
        }
        if best.as_ref().is_none_or(|b| region.voxels > b.voxels) {
            best = Some(region);
        }
    }
    best
}

/// The voxels of a `shape` volume within `reach` voxels (a box, per axis) of `members`.
pub fn grown(members: &[usize], shape: [usize; 3], reach: [usize; 3]) -> Vec<bool> {
    let [depth, height, width] = shape;
    let mut inside = vec![false; depth * height * width];
    for at in members {
        inside[*at] = true;
    }
    // Separably, one axis at a time: a box grows as three segments do.
    let strides = [height * width, width, 1];
    for axis in 0..3 {
        if reach[axis] == 0 {
            continue;
        }
        let before = inside.clone();
        for (at, was) in before.iter().enumerate() {
            if !*was {
                continue;
            }
            let index = at / strides[axis] % shape[axis];
            let low = index.saturating_sub(reach[axis]);
            let high = (index + reach[axis]).min(shape[axis] - 1);
            for step in low..=high {
                inside[at - index * strides[axis] + step * strides[axis]] = true;
            }
        }
    }
    inside
}

/// Start indices of patches of `patch` voxels covering `size` voxels along one axis,
/// neighbours sharing at least `overlap` of a patch, spread evenly (nnU-Net's steps).
pub fn steps(size: usize, patch: usize, overlap: f64) -> Vec<usize> {
    if size <= patch {
        return vec![0];
    }
    let stride = (patch as f64 * (1.0 - overlap)).max(1.0);
    let count = ((size - patch) as f64 / stride).ceil() as usize + 1;
    let span = (size - patch) as f64;
    (0..count).map(|i| (span * i as f64 / (count - 1) as f64).round() as usize).collect()
}

/// A Gaussian over a patch, 1 at its centre, σ = `sigma_scale` × the patch along each
/// axis; no weight is below the smallest positive one (nnU-Net's importance map), so
/// every voxel a patch covers counts.
pub fn gaussian(patch: [usize; 3], sigma_scale: f64) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let centre = (n as f64 - 1.0) / 2.0;
        let sigma = (n as f64 * sigma_scale).max(1e-6);
        (0..n).map(|i| (-0.5 * ((i as f64 - centre) / sigma).powi(2)).exp()).collect()
    };
    let (z, y, x) = (axis(patch[0]), axis(patch[1]), axis(patch[2]));
    let mut weights = Vec::with_capacity(patch.iter().product());
    for a in &z {
        for b in &y {
            for c in &x {
                weights.push((a * b * c) as f32);
            }
        }
    }
    let smallest = weights.iter().copied().filter(|w| *w > 0.0).fold(f32::MAX, f32::min);
    weights.iter_mut().for_each(|w| *w = w.max(smallest));
    weights
}

/// Reverses a `shape` volume along each axis in `axes` (its own inverse).
pub fn mirror(volume: &[f32], shape: [usize; 3], axes: &[usize]) -> Vec<f32> {
    if axes.is_empty() {
        return volume.to_vec();
    }
    let [depth, height, width] = shape;
    let flip = |axis: usize, i: usize, n: usize| if axes.contains(&axis) { n - 1 - i } else { i };
    let mut out = vec![0.0; volume.len()];
    for z in 0..depth {
        for y in 0..height {
            for x in 0..width {
                let from =
                    (flip(0, z, depth) * height + flip(1, y, height)) * width + flip(2, x, width);
                out[(z * height + y) * width + x] = volume[from];
            }
        }
    }
    out
}

/// Every subset of `axes`: the mirrorings test-time augmentation runs (the empty one,
/// the patch as it is, first).
pub fn mirrorings(axes: &[usize]) -> Vec<Vec<usize>> {
    (0..1usize << axes.len())
        .map(|mask| {
            axes.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, a)| *a).collect()
        })
        .collect()
}

/// The block of `size` voxels starting at `start` (which may lie outside) of a `shape`
/// volume, `fill` where it does.
pub fn cut<T: Copy>(
    volume: &[T],
    shape: [usize; 3],
    start: [i64; 3],
    size: [usize; 3],
    fill: T,
) -> Vec<T> {
    let [depth, height, width] = shape;
    let mut out = vec![fill; size.iter().product()];
    for z in 0..size[0] {
        let source_z = start[0] + z as i64;
        if source_z < 0 || source_z >= depth as i64 {
            continue;
        }
        for y in 0..size[1] {
            let source_y = start[1] + y as i64;
            if source_y < 0 || source_y >= height as i64 {
                continue;
            }
            for x in 0..size[2] {
                let source_x = start[2] + x as i64;
                if source_x < 0 || source_x >= width as i64 {
                    continue;
                }
                out[(z * size[1] + y) * size[2] + x] =
                    volume[((source_z as usize * height + source_y as usize) * width)
                        + source_x as usize];
            }
        }
    }
    out
}

/// Adds a patch's output, weighted, into the map of the crop it was cut from.
pub fn blend(
    sum: &mut [f32],
    weight: &mut [f32],
    crop: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
    values: &[f32],
    weights: &[f32],
) {
    for z in 0..patch[0] {
        for y in 0..patch[1] {
            let from = (z * patch[1] + y) * patch[2];
            let to = ((start[0] + z) * crop[1] + start[1] + y) * crop[2] + start[2];
            for x in 0..patch[2] {
                sum[to + x] += values[from + x] * weights[from + x];
                weight[to + x] += weights[from + x];
            }
        }
    }
}

/// The geometry of a block cut from `grid` at `start`.
pub fn sub_geometry(grid: &TensorGeometry, start: [i64; 3], size: [usize; 3]) -> TensorGeometry {
    TensorGeometry {
        shape: vec![1, 1, size[0], size[1], size[2]],
        origin_mm: grid.to_patient(start.map(|s| s as f64)),
        ..grid.clone()
    }
}

/// The (fractional) index of a patient point in `grid`.
pub fn to_index(grid: &TensorGeometry, point: [f64; 3]) -> [f64; 3] {
    let offset: [f64; 3] = std::array::from_fn(|axis| point[axis] - grid.origin_mm[axis]);
    let along = |direction: [f64; 3], spacing: f64| {
        direction.iter().zip(offset).map(|(d, o)| d * o).sum::<f64>() / spacing
    };
    let [dz, dy, dx] = grid.spacing_mm;
    [
        along(grid.slice_direction, dz),
        along(grid.column_direction, dy),
        along(grid.row_direction, dx),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_region_wins_and_diagonals_do_not_connect() {
        let shape = [2, 4, 4];
        let mut map = vec![0.0f32; 32];
        // A region of four voxels and one of two.
        for at in [0, 1, 16] {
            map[at] = 0.9;
        }
        map[5] = 0.9; // (0, 1, 1): shares a face with (0, 0, 1)
        map[15] = 0.8;
        map[31] = 0.7;
        let region = largest_region(&map, shape, 0.5).unwrap();
        assert_eq!(region.voxels, 4);
        assert_eq!((region.min, region.max), ([0, 0, 0], [1, 1, 1]));
        map[10] = 0.9; // (0, 2, 2): diagonal only
        assert_eq!(largest_region(&map, shape, 0.5).unwrap().voxels, 4);
        assert!(largest_region(&map, shape, 0.95).is_none());
    }

    #[test]
    fn a_region_grows_by_a_box() {
        let shape = [1, 3, 5];
        let inside = grown(&[7], shape, [1, 0, 1]);
        let expected = [
            false, false, false, false, false, //
            false, true, true, true, false, //
            false, false, false, false, false,
        ];
        assert_eq!(inside, expected);
        let everywhere = grown(&[0], shape, [0, 2, 4]);
        assert!(everywhere.iter().all(|v| *v));
    }

    #[test]
    fn steps_cover_the_crop_with_the_overlap_asked() {
        assert_eq!(steps(64, 64, 0.5), vec![0]);
        assert_eq!(steps(40, 64, 0.5), vec![0]);
        // nnU-Net's own example: 128 voxels, patch 64, step 0.5: 0, 32, 64.
        assert_eq!(steps(128, 64, 0.5), vec![0, 32, 64]);
        // 100 voxels: ceil(36 / 32) + 1 = 3 patches at 0, 18, 36.
        assert_eq!(steps(100, 64, 0.5), vec![0, 18, 36]);
        for (size, patch, overlap) in [(97, 32, 0.5), (300, 48, 0.25), (65, 64, 0.0)] {
            let starts = steps(size, patch, overlap);
            assert_eq!(starts[0], 0);
            assert_eq!(
                starts[starts.len() - 1] + patch,
                size,
                "the last patch ends at the crop's end"
            );
            assert!(starts
                .windows(2)
                .all(|w| w[1] - w[0] <= (patch as f64 * (1.0 - overlap)) as usize));
        }
    }

    #[test]
    fn gaussian_peaks_at_the_centre_and_never_reaches_zero() {
        let weights = gaussian([5, 8, 8], 0.125);
        let at = |z: usize, y: usize, x: usize| weights[(z * 8 + y) * 8 + x];
        let peak = weights.iter().copied().fold(0.0f32, f32::max);
        // The centre falls between voxels 3 and 4 of an even axis: e^(-1/8) on each.
        assert_eq!(at(2, 3, 3), peak);
        assert!((peak - (-0.25f32).exp()).abs() < 1e-6, "{peak}");
        assert_eq!(at(2, 3, 3), at(2, 4, 4), "symmetric about the centre");
        assert!(at(0, 0, 0) > 0.0 && at(0, 0, 0) < at(1, 1, 1));
    }

    #[test]
    fn mirroring_twice_is_the_identity_and_all_flip_sets_are_listed() {
        let volume: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let flipped = mirror(&volume, [2, 3, 4], &[0, 2]);
        // Slice 0, row 0, column 0 of the flipped volume is slice 1, row 0, column 3.
        assert_eq!(flipped[0], volume[12 + 3]);
        assert_eq!(mirror(&flipped, [2, 3, 4], &[0, 2]), volume);
        assert_eq!(mirrorings(&[0, 2]), vec![vec![], vec![0], vec![2], vec![0, 2]]);
        assert_eq!(mirrorings(&[]), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn a_cut_outside_the_volume_is_filled() {
        let volume: Vec<i16> = (0..27).collect();
        let block = cut(&volume, [3, 3, 3], [-1, 1, 1], [2, 2, 3], -1000);
        // Slice -1 is outside; of slice 0, rows 1 and 2, columns 1 to 3 (3 is outside).
        assert_eq!(block, vec![-1000, -1000, -1000, -1000, -1000, -1000, 4, 5, -1000, 7, 8, -1000]);
    }

    #[test]
    fn blending_two_overlapping_patches_weights_each_voxel() {
        let (crop, patch) = ([1, 1, 3], [1, 1, 2]);
        let (mut sum, mut weight) = (vec![0.0; 3], vec![0.0; 3]);
        blend(&mut sum, &mut weight, crop, [0, 0, 0], patch, &[1.0, 1.0], &[1.0, 3.0]);
        blend(&mut sum, &mut weight, crop, [0, 0, 1], patch, &[0.0, 0.0], &[1.0, 1.0]);
        let blended: Vec<f32> = sum.iter().zip(&weight).map(|(s, w)| s / w).collect();
        assert_eq!(blended, vec![1.0, 0.75, 0.0]);
    }

    #[test]
    fn a_point_maps_back_to_its_index() {
        let grid = TensorGeometry {
            shape: vec![1, 1, 10, 10, 10],
            spacing_mm: [3.0, 2.0, 1.5],
            origin_mm: [10.0, -20.0, 5.0],
            row_direction: [-1.0, 0.0, 0.0],
            column_direction: [0.0, 1.0, 0.0],
            slice_direction: [0.0, 0.0, -1.0],
        };
        let index = [2.5, 4.0, 7.0];
        let back = to_index(&grid, grid.to_patient(index));
        assert!(back.iter().zip(index).all(|(a, b)| (a - b).abs() < 1e-9), "{back:?}");
        let block = sub_geometry(&grid, [1, 2, 3], [4, 4, 4]);
        assert_eq!(block.to_patient([0.0; 3]), grid.to_patient([1.0, 2.0, 3.0]));
    }
}
