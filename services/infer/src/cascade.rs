//! A two-stage cascade as infer runs it: the pancreas stage 1 found → the box stage 2
//! sees ([`locate`], or why the study is not assessable) → the patches that cover it,
//! run in batches from every study → their outputs blended back into one map
//! ([`detect_crops`]), kept near the pancreas ([`keep_near`]).
//!
//! As nnU-Net predicts: patches overlap by a fraction of their size, each patch's
//! output is weighted by a Gaussian centred on it (its centre is where it sees the most
//! context), and mirrored copies of a patch may be averaged (test-time augmentation).

use panscreen_shared::contracts::TensorGeometry;
use panscreen_shared::manifest::ModelManifest;

use crate::model::{Model, ModelError};

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

/// The crop's extent in patient coordinates (mm): the lowest and highest of its eight
/// corner voxels' centres along each axis (a box around an oblique grid's crop). What
/// infer's `debug` log states, to compare with where a lesion is.
pub fn crop_extent_mm(fine: &TensorGeometry, start: [i64; 3], size: [usize; 3]) -> [[f64; 3]; 2] {
    let crop = sub_geometry(fine, start, size);
    (0..8usize)
        .map(|corner| {
            crop.to_patient(std::array::from_fn(|axis| {
                if corner >> axis & 1 == 1 {
                    size[axis].saturating_sub(1) as f64
                } else {
                    0.0
                }
            }))
        })
        .fold(EMPTY_BOX, widened)
}

/// The box that holds nothing yet, for [`widened`].
const EMPTY_BOX: [[f64; 3]; 2] = [[f64::MAX; 3], [f64::MIN; 3]];

/// The box `[low, high]` grown to hold `point`.
fn widened([low, high]: [[f64; 3]; 2], point: [f64; 3]) -> [[f64; 3]; 2] {
    [std::array::from_fn(|i| low[i].min(point[i])), std::array::from_fn(|i| high[i].max(point[i]))]
}

/// A study stage 1 judged assessable: where its pancreas is, and the crop stage 2 sees.
pub(crate) struct Located {
    /// Index of the study in the batch.
    pub study: usize,
    pub pancreas_volume_mm3: f64,
    /// The pancreas's box in patient coordinates (lowest, highest x, y, z), mm: the
    /// outer faces of stage 1's region.
    pub pancreas_extent_mm: [[f64; 3]; 2],
    /// The crop in the fine grid: where it starts (may lie outside) and its size.
    pub crop_start: [i64; 3],
    pub crop_size: [usize; 3],
    /// With `lesion_within_mm`: the stage-1 voxels near enough to the pancreas.
    pub near_pancreas: Option<Vec<bool>>,
    /// The stage-1 voxels of the pancreas.
    pub pancreas: Vec<bool>,
}

impl Located {
    /// The pancreas's extent along the patient's x axis (right → left), mm.
    pub fn pancreas_x_mm(&self) -> [f64; 2] {
        [self.pancreas_extent_mm[0][0], self.pancreas_extent_mm[1][0]]
    }

    /// States, at `debug` level, stage 1's pancreas box and the crop stage 2 sees, in
    /// patient mm to a tenth: where to look when a known lesion was not flagged.
    pub fn log(&self, study_key: &str, fine: &TensorGeometry) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let tenths = |box_mm: [[f64; 3]; 2]| {
            box_mm.map(|corner| corner.map(|mm| (mm * 10.0).round() / 10.0))
        };
        let [crop_low, crop_high] = tenths(crop_extent_mm(fine, self.crop_start, self.crop_size));
        let [pancreas_low, pancreas_high] = tenths(self.pancreas_extent_mm);
        tracing::debug!(
            study = %study_key,
            pancreas_mm3 = self.pancreas_volume_mm3.round(),
            pancreas_low_mm = ?pancreas_low,
            pancreas_high_mm = ?pancreas_high,
            crop_low_mm = ?crop_low,
            crop_high_mm = ?crop_high,
            "pancreas located: stage 1's box, and the crop stage 2 sees (patient x, y, z)"
        );
    }
}

/// Names of the tensor's sides, for the reason a pancreas runs off the scan.
const EDGES: [&str; 3] = [
    "the scan's first or last slice",
    "the front or back of the image",
    "the right or left side of the image",
];

/// Stage 1's pancreas map → the crop stage 2 sees, or why there is none.
/// `coarse` is stage 1's grid (the map's), `fine` the whole scan on stage 2's.
pub(crate) fn locate(
    manifest: &ModelManifest,
    study: usize,
    coarse: &TensorGeometry,
    fine: &TensorGeometry,
    map: &[f32],
) -> Result<Located, String> {
    let locate = manifest.locate.as_ref().expect("a cascade");
    let rule = &locate.box_rule;
    let shape = locate.input.volume_shape();
    let Some(region) = largest_region(map, shape, rule.threshold as f32) else {
        return Err(format!(
            "no pancreas found: no voxel of the locate stage's map reaches {}",
            rule.threshold
        ));
    };
    let pancreas_volume_mm3 = region.voxels as f64 * coarse.voxel_volume_mm3();
    if pancreas_volume_mm3 < rule.min_volume_mm3 {
        return Err(format!(
            "no pancreas found: the largest region the locate stage found is {:.0} mm³, under \
             the {:.0} mm³ a pancreas needs",
            pancreas_volume_mm3, rule.min_volume_mm3
        ));
    }
    let fine_shape = [fine.shape[2], fine.shape[3], fine.shape[4]];
    let centre: [f64; 3] =
        std::array::from_fn(|axis| (region.min[axis] + region.max[axis]) as f64 / 2.0);
    // The pancreas runs off the scan when a voxel beyond its region (and `edge_mm`
    // further), on any side, lies outside stage 1's grid or outside the scanned
    // volume (the fine grid).
    for axis in 0..3 {
        let reach = 1.0 + rule.edge_mm / coarse.spacing_mm[axis];
        for beyond in [region.min[axis] as f64 - reach, region.max[axis] as f64 + reach] {
            let mut point = centre;
            point[axis] = beyond;
            let in_grid = beyond >= 0.0 && beyond <= (shape[axis] - 1) as f64;
            let in_scan = to_index(fine, coarse.to_patient(point))[axis];
            if !in_grid || in_scan < -0.5 || in_scan > fine_shape[axis] as f64 - 0.5 {
                return Err(format!("the pancreas runs off the scan: it reaches {}", EDGES[axis]));
            }
        }
    }
    // The box, in the fine grid's indices: the region's outer faces (half a coarse
    // voxel beyond its outermost centres).
    let corners: Vec<[f64; 3]> = (0..8)
        .map(|corner: usize| {
            let point: [f64; 3] = std::array::from_fn(|axis| {
                if corner >> axis & 1 == 1 {
                    region.max[axis] as f64 + 0.5
                } else {
                    region.min[axis] as f64 - 0.5
                }
            });
            coarse.to_patient(point)
        })
        .collect();
    let pancreas_extent_mm = corners.iter().copied().fold(EMPTY_BOX, widened);
    let in_fine: Vec<[f64; 3]> = corners.iter().map(|point| to_index(fine, *point)).collect();
    let patch = manifest.input.volume_shape();
    let mut crop_start = [0i64; 3];
    let mut crop_size = [0usize; 3];
    for axis in 0..3 {
        let low = in_fine.iter().map(|p| p[axis]).fold(f64::MAX, f64::min);
        let high = in_fine.iter().map(|p| p[axis]).fold(f64::MIN, f64::max);
        let spacing = fine.spacing_mm[axis];
        let wanted = match (rule.fixed_size_mm, &manifest.input.sliding_window) {
            (Some(fixed), _) => fixed[axis] / spacing,
            // One patch only: the patch, centred on the pancreas.
            (None, None) => patch[axis] as f64,
            (None, Some(_)) => {
                let boxed = high - low + 2.0 * rule.margin_mm[axis] / spacing;
                let least = rule.min_size_mm.map_or(0.0, |min| min[axis] / spacing);
                boxed.max(least).max(patch[axis] as f64)
            }
        };
        let size = (wanted.round() as usize).max(1);
        crop_size[axis] = size;
        crop_start[axis] = ((low + high) / 2.0 - (size as f64 - 1.0) / 2.0).round() as i64;
    }
    let near_pancreas = rule.lesion_within_mm.map(|mm| {
        let reach = coarse.spacing_mm.map(|spacing| (mm / spacing).ceil() as usize);
        grown(&region.members, shape, reach)
    });
    let mut pancreas = vec![false; map.len()];
    for member in &region.members {
        pancreas[*member] = true;
    }
    Ok(Located {
        study,
        pancreas_volume_mm3,
        pancreas_extent_mm,
        crop_start,
        crop_size,
        near_pancreas,
        pancreas,
    })
}

/// The median HU of the pancreas stage 1 found, on the fine grid: the voxels of the crop
/// whose nearest stage-1 voxel (on `coarse` of `shape`) is in `pancreas`, and whose value
/// lies within `range_hu`. The middle value, or the mean of the two middle ones, as
/// numpy's `median`. None when no voxel counts.
pub(crate) fn pancreas_median(
    hu: &[i16],
    fine: &TensorGeometry,
    crop: ([i64; 3], [usize; 3]),
    pancreas: &[bool],
    coarse: &TensorGeometry,
    shape: [usize; 3],
    range_hu: [f64; 2],
) -> Option<f64> {
    let fine_shape = [fine.shape[2], fine.shape[3], fine.shape[4]];
    let (start, size) = crop;
    let low = range_hu[0].ceil().max(f64::from(i16::MIN)) as i32;
    let high = range_hu[1].floor().min(f64::from(i16::MAX)) as i32;
    let mut counts = vec![0u64; (high - low + 1).max(0) as usize];
    let within = |axis: usize| {
        let first = start[axis].clamp(0, fine_shape[axis] as i64) as usize;
        let last = (start[axis] + size[axis] as i64).clamp(0, fine_shape[axis] as i64) as usize;
        first..last
    };
    for z in within(0) {
        for y in within(1) {
            for x in within(2) {
                let value = i32::from(hu[(z * fine_shape[1] + y) * fine_shape[2] + x]);
                if value < low || value > high {
                    continue;
                }
                let point = fine.to_patient([z as f64, y as f64, x as f64]);
                if nearest_voxel(coarse, shape, point).is_some_and(|at| pancreas[at]) {
                    counts[(value - low) as usize] += 1;
                }
            }
        }
    }
    let total: u64 = counts.iter().sum();
    // The value of rank `k` (from 0) among those counted.
    let ranked = |k: u64| {
        let mut seen = 0;
        counts.iter().position(|count| {
            seen += count;
            seen > k
        })
    };
    let value = |k: u64| ranked(k).map(|at| f64::from(low + at as i32));
    match total {
        0 => None,
        n if n % 2 == 1 => value(n / 2),
        n => Some((value(n / 2 - 1)? + value(n / 2)?) / 2.0),
    }
}

/// The flat index of the voxel of `grid` (of `shape`) nearest to a patient point, if the
/// point lies within the grid.
fn nearest_voxel(grid: &TensorGeometry, shape: [usize; 3], point: [f64; 3]) -> Option<usize> {
    let nearest = to_index(grid, point).map(|i| i.round());
    (0..3).all(|axis| nearest[axis] >= 0.0 && nearest[axis] < shape[axis] as f64).then(|| {
        (nearest[0] as usize * shape[1] + nearest[1] as usize) * shape[2] + nearest[2] as usize
    })
}

/// Clears the voxels of a crop's lesion `map` (on `crop`) that lie outside `near` (on
/// the stage-1 grid `coarse` of `shape`); returns the highest voxel left.
pub(crate) fn keep_near(
    map: &mut [f32],
    crop: &TensorGeometry,
    near: &[bool],
    coarse: &TensorGeometry,
    shape: [usize; 3],
) -> f32 {
    let (height, width) = (crop.shape[3], crop.shape[4]);
    let mut highest = 0.0f32;
    for (at, value) in map.iter_mut().enumerate() {
        let index = [at / (height * width), at / width % height, at % width];
        let point = crop.to_patient(index.map(|i| i as f64));
        if nearest_voxel(coarse, shape, point).is_some_and(|at| near[at]) {
            highest = highest.max(*value);
        } else {
            *value = 0.0;
        }
    }
    highest
}

/// Stage 2 over each crop: its patches (every mirroring of each), `batch` at a time
/// from any crop, blended back with Gaussian weights. Returns each crop's score (the
/// highest patch probability, or the highest blended lesion voxel when the model has
/// no probability output) and its blended lesion map.
pub(crate) fn detect_crops(
    model: &mut Model,
    crops: &[([i64; 3], [usize; 3])],
    fines: &[Vec<i16>],
    fine_shapes: &[[usize; 3]],
    shifts: &[f32],
    batch: usize,
) -> Result<Vec<(f32, Vec<f32>)>, ModelError> {
    let manifest = model.manifest.clone();
    let patch = manifest.volume_shape();
    let intensity = &manifest.input.intensity;
    let window = manifest.input.sliding_window.clone();
    let (overlap, sigma_scale, axes) = window
        .as_ref()
        .map_or((0.0, 0.125, Vec::new()), |w| (w.overlap, w.sigma_scale, w.mirror_axes.clone()));
    let weights = gaussian(patch, sigma_scale);
    let mirrorings = mirrorings(&axes);
    let fill = intensity.fill_hu.round() as i16;
    // Each crop shifted by its reference (the fill, outside the scan, too, as training
    // shifts the grid before cutting from it) and normalized.
    let normalized: Vec<Vec<f32>> = crops
        .iter()
        .zip(fines.iter().zip(fine_shapes))
        .zip(shifts)
        .map(|(((start, size), (hu, shape)), shift)| {
            cut(hu, *shape, *start, *size, fill)
                .into_iter()
                .map(|v| intensity.normalize(f32::from(v) + shift))
                .collect()
        })
        .collect();
    // Every (crop, patch start, mirroring) to run.
    let mut jobs: Vec<(usize, [usize; 3], usize)> = Vec::new();
    for (crop, (_, size)) in crops.iter().enumerate() {
        let starts: Vec<Vec<usize>> =
            (0..3).map(|axis| steps(size[axis], patch[axis], overlap)).collect();
        for z in &starts[0] {
            for y in &starts[1] {
                for x in &starts[2] {
                    for mirroring in 0..mirrorings.len() {
                        jobs.push((crop, [*z, *y, *x], mirroring));
                    }
                }
            }
        }
    }
    let mut sums: Vec<(Vec<f32>, Vec<f32>)> = crops
        .iter()
        .map(|(_, size)| (vec![0.0; size.iter().product()], vec![0.0; size.iter().product()]))
        .collect();
    // Per crop, per patch start: the probabilities of its mirrorings, averaged later.
    let mut patch_scores: Vec<std::collections::BTreeMap<[usize; 3], Vec<f32>>> =
        vec![Default::default(); crops.len()];
    for chunk in jobs.chunks(batch) {
        let inputs: Vec<Vec<f32>> = chunk
            .iter()
            .map(|(crop, start, mirroring)| {
                let size = crops[*crop].1;
                let block = cut(
                    &normalized[*crop],
                    size,
                    start.map(|s| s as i64),
                    patch,
                    intensity.normalize(fill as f32),
                );
                mirror(&block, patch, &mirrorings[*mirroring])
            })
            .collect();
        let output = model.run(&inputs)?;
        let per_patch: usize = patch.iter().product();
        for (index, (crop, start, mirroring)) in chunk.iter().enumerate() {
            patch_scores[*crop].entry(*start).or_default().push(output.probabilities[index]);
            if let Some(mask) = output.mask.as_ref().and_then(|mask| mask.as_slice()) {
                let values = mirror(
                    &mask[index * per_patch..(index + 1) * per_patch],
                    patch,
                    &mirrorings[*mirroring],
                );
                let (sum, weight) = &mut sums[*crop];
                blend(sum, weight, crops[*crop].1, *start, patch, &values, &weights);
            }
        }
    }
    let has_probability = manifest.outputs.probability.is_some();
    Ok(sums
        .into_iter()
        .zip(patch_scores)
        .map(|((sum, weight), scores)| {
            let map: Vec<f32> =
                sum.iter().zip(&weight).map(|(s, w)| if *w > 0.0 { s / w } else { 0.0 }).collect();
            let score = if has_probability || map.is_empty() {
                scores
                    .values()
                    .map(|each| each.iter().sum::<f32>() / each.len() as f32)
                    .fold(0.0f32, f32::max)
            } else {
                map.iter().copied().fold(0.0f32, f32::max)
            };
            (score, map)
        })
        .collect())
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

    /// The shipped cascade's rule (4 mm stage-1 grid of 112 × 96 × 96, margin 15 mm, at
    /// least 3 ml, edge 10 mm, lesions within 8 mm; patches of 32 × 64 × 64 at 3 × 2 × 2
    /// mm) on a scan from z = 160 to 319 mm: stage 1's planes 40 to 79.
    fn shipped() -> (ModelManifest, TensorGeometry, TensorGeometry) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let manifest = ModelManifest::load(&root.join("models/tiny-panda-cascade")).unwrap();
        let axes = |shape: Vec<usize>, spacing_mm: [f64; 3], origin_mm: [f64; 3]| TensorGeometry {
            shape,
            spacing_mm,
            origin_mm,
            row_direction: [1.0, 0.0, 0.0],
            column_direction: [0.0, 1.0, 0.0],
            slice_direction: [0.0, 0.0, 1.0],
        };
        let coarse = axes(vec![1, 1, 112, 96, 96], [4.0; 3], [0.0; 3]);
        let fine = axes(vec![1, 1, 54, 190, 190], [3.0, 2.0, 2.0], [0.0, 0.0, 160.0]);
        (manifest, coarse, fine)
    }

    /// A map of stage 1's grid with the block `[low, high]` (inclusive) at 0.9.
    fn block(low: [usize; 3], high: [usize; 3]) -> Vec<f32> {
        let mut map = vec![0.0f32; 112 * 96 * 96];
        for z in low[0]..=high[0] {
            for y in low[1]..=high[1] {
                for x in low[2]..=high[2] {
                    map[(z * 96 + y) * 96 + x] = 0.9;
                }
            }
        }
        map
    }

    #[test]
    fn the_box_is_the_pancreas_plus_its_margin_and_never_less_than_a_patch() {
        let (manifest, coarse, fine) = shipped();
        let found =
            locate(&manifest, 3, &coarse, &fine, &block([55, 40, 30], [62, 50, 60])).unwrap();
        assert_eq!(found.study, 3);
        assert_eq!(found.pancreas_volume_mm3, (8 * 11 * 31) as f64 * 64.0);
        // Width: voxel faces 29.5 to 60.5 (118 to 242 mm, fine 59 to 121) plus 15 mm on
        // each side: 77 voxels, more than a patch. Depth and height: a patch (32, 64).
        assert_eq!(found.crop_size, [32, 64, 77]);
        // Each crop centred on the region's box: depth, faces at 218 and 250 mm (fine
        // 19.3 to 30.0), 24.7 − 15.5 → 9; height, fine 79 to 101, 90 − 31.5 → 59 (a
        // half rounds up); width, 59 to 121, 90 − 38 → 52.
        assert_eq!(found.crop_start, [9, 59, 52]);
        assert_eq!(found.pancreas_x_mm(), [118.0, 242.0]);
        // The region's outer faces in patient x (width), y (height), z (depth).
        assert_eq!(found.pancreas_extent_mm, [[118.0, 158.0, 218.0], [242.0, 202.0, 250.0]]);
        let near = found.near_pancreas.unwrap();
        // 8 mm: two stage-1 voxels beyond the region, not three.
        assert!(near[(55 * 96 + 40) * 96 + 28] && !near[(55 * 96 + 40) * 96 + 27]);
    }

    #[test]
    fn the_reference_is_the_median_of_stage_one_s_pancreas_within_its_range() {
        let (manifest, coarse, fine) = shipped();
        let found =
            locate(&manifest, 0, &coarse, &fine, &block([55, 40, 30], [62, 50, 60])).unwrap();
        let shape = [112, 96, 96];
        let fine_shape = [54, 190, 190];
        // The gland at 30 HU, fat at -100 around it; the crop's other voxels at 60 HU.
        let mut hu = vec![60i16; fine_shape.iter().product()];
        let mut in_gland = 0;
        for z in 0..fine_shape[0] {
            for y in 0..fine_shape[1] {
                for x in 0..fine_shape[2] {
                    let point = fine.to_patient([z as f64, y as f64, x as f64]);
                    let at = (z * fine_shape[1] + y) * fine_shape[2] + x;
                    if nearest_voxel(&coarse, shape, point).is_some_and(|near| found.pancreas[near])
                    {
                        hu[at] = if in_gland % 10 == 0 { -100 } else { 30 };
                        in_gland += 1;
                    }
                }
            }
        }
        let crop = (found.crop_start, found.crop_size);
        let median = |hu: &[i16], range| {
            pancreas_median(hu, &fine, crop, &found.pancreas, &coarse, shape, range)
        };
        // The fat is outside the range; nothing outside the pancreas counts.
        assert_eq!(median(&hu, [-30.0, 120.0]), Some(30.0));
        // Counted, the fat does not move a median of nine parts in ten.
        assert_eq!(median(&hu, [-1000.0, 120.0]), Some(30.0));
        // An even count takes the mean of the middle two, as numpy does: the gland's
        // values split half at 20 and half at 41.
        let mut gland: Vec<usize> = (0..hu.len()).filter(|at| hu[*at] == 30).collect();
        if gland.len() % 2 == 1 {
            hu[gland.pop().unwrap()] = -100;
        }
        for (rank, at) in gland.iter().enumerate() {
            hu[*at] = if rank % 2 == 0 { 20 } else { 41 };
        }
        assert_eq!(median(&hu, [-30.0, 120.0]), Some(30.5));
        // No pancreas voxel within the range: no reference.
        assert_eq!(median(&hu, [100.0, 120.0]), None);
    }

    #[test]
    fn a_pancreas_too_small_or_at_the_scan_s_end_is_not_assessable() {
        let (manifest, coarse, fine) = shipped();
        let reason = |map: Vec<f32>| locate(&manifest, 0, &coarse, &fine, &map).err();
        assert_eq!(
            reason(vec![0.0; 112 * 96 * 96]).unwrap(),
            "no pancreas found: no voxel of the locate stage's map reaches 0.5"
        );
        let small = reason(block([60, 40, 40], [61, 41, 41])).unwrap();
        assert!(small.contains("512 mm³, under the 3000 mm³"), "{small}");
        // Ending at plane 76: 3.5 planes beyond (4 mm + 10 mm) is 318 mm, inside the scan.
        assert!(reason(block([60, 40, 30], [76, 50, 60])).is_none());
        // Ending at plane 77: 322 mm, past the scan's last slice (319 mm).
        assert_eq!(
            reason(block([60, 40, 30], [77, 50, 60])).unwrap(),
            "the pancreas runs off the scan: it reaches the scan's first or last slice"
        );
        // At the side of stage 1's grid.
        let side = reason(block([60, 40, 0], [66, 50, 20])).unwrap();
        assert!(side.ends_with("the right or left side of the image"), "{side}");
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
    fn a_crop_s_extent_is_its_outer_voxel_centres_in_patient_mm_whatever_the_axes_sign() {
        let fine = TensorGeometry {
            shape: vec![1, 1, 40, 50, 60],
            spacing_mm: [2.0, 1.0, 1.5],
            origin_mm: [-10.0, 20.0, 100.0],
            row_direction: [1.0, 0.0, 0.0],
            // The image's rows run towards the patient's front, its slices feet-first.
            column_direction: [0.0, -1.0, 0.0],
            slice_direction: [0.0, 0.0, -1.0],
        };
        let [low, high] = crop_extent_mm(&fine, [5, -2, 10], [10, 20, 30]);
        // x: columns 10..=39 at 1.5 mm; y: rows -2..=17 going to -y; z: slices 5..=14 to -z.
        assert_eq!(low, [-10.0 + 15.0, 20.0 - 17.0, 100.0 - 28.0]);
        assert_eq!(high, [-10.0 + 39.0 * 1.5, 20.0 + 2.0, 100.0 - 10.0]);
        // Rows turned in the axial plane (3-4-5): the box holds all four in-plane corners.
        let oblique = TensorGeometry {
            spacing_mm: [1.0; 3],
            origin_mm: [0.0; 3],
            row_direction: [0.6, 0.8, 0.0],
            column_direction: [-0.8, 0.6, 0.0],
            slice_direction: [0.0, 0.0, 1.0],
            ..fine
        };
        let [low, high] = crop_extent_mm(&oblique, [0, 0, 0], [1, 11, 11]);
        // Corners (x, y): (0, 0), (6, 8) along the rows, (-8, 6) down the columns, (-2, 14).
        assert!(low.iter().zip([-8.0, 0.0, 0.0]).all(|(a, b)| (a - b).abs() < 1e-9), "{low:?}");
        assert!(high.iter().zip([6.0, 14.0, 0.0]).all(|(a, b)| (a - b).abs() < 1e-9), "{high:?}");
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
