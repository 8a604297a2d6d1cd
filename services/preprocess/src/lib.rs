//! preprocess: decodes the chosen series, converts it to HU, resamples it onto the
//! grid the model's manifest asks for, normalizes it, and stores the tensor.
//!
//! - [`hu`]: stored values to Hounsfield units.
//! - [`resample`]: separable, memory-bounded resampling onto the model grid.
//! - [`orientation`]: one patient orientation for every tensor (prone, feet-first and
//!   side-lying scans turned onto the supine head-first axes).
//! - [`decode`]: one DICOM slice to HU.
//! - [`simd`]: the hot loops compiled for AVX2 too, chosen at run time.
//! - [`gdcm_helper`]: JPEG-LS and 12-bit JPEG frames decoded by GDCM in a helper process.
//! - [`error`]: why a study cannot be preprocessed, one variant per quarantine reason.
//! - [`config`]: the stage's settings; [`service`]: the stage as it runs.
//!
//! [`PreprocessHandler`] is the stage: one `StudyIngested` in, one `StudyPreprocessed`
//! out (or a classified error). It holds at most one decoded slice at a time (and the
//! parsed object it came from: for an Enhanced CT object, all its frames, still encoded).

pub mod config;
pub mod decode;
pub mod error;
pub mod gdcm_helper;
pub mod hu;
pub mod orientation;
pub mod resample;
pub mod service;
mod simd;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use panscreen_shared::contracts::{
    subjects, SliceRef, Stage, StoredGrid, StudyIngested, StudyPreprocessed, TensorGeometry,
};
use panscreen_shared::error::StageError;
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::npy;
use panscreen_shared::store::{unique_suffix, Store};
use panscreen_shared::worker::{Handler, Outcome};
use time::OffsetDateTime;
use tracing::info;

use crate::decode::DecodeLimits;
pub use crate::error::PreprocessError;
use crate::resample::{axis_weights, centred_positions, PlaneResampler, SliceAccumulator};

/// Keeps glibc's allocator from returning a study's large buffers to the kernel the
/// moment they are freed, so that the next study reuses them instead of faulting in (and
/// zeroing) fresh pages. Call once, at the start of a process that preprocesses.
///
/// By default glibc maps each allocation over its dynamic threshold (128 KiB, rising to
/// the largest block freed) with `mmap` of its own and gives the heap's top back above
/// twice that. A study's grids (the fine grid alone is 20 MiB as f32), each slice's file
/// (512 KiB) and the compressor's buffers were mapped afresh for every study: in
/// `examples/volume_path` on 512×512×300 studies, about 11,000 page faults a study and a
/// tenth of its time. With blocks under 32 MiB taken from the heap and the heap trimmed
/// only above 64 MiB free, about 2,700. What stays mapped is about the largest study's
/// working set: the example's peak RSS did not move (97–114 MiB against 100–118), a whole
/// `panscreen run` of three such studies went from 270–276 to 300–315 MiB. Elsewhere than
/// glibc on Linux this does nothing, nor when `GLIBC_TUNABLES` sets any of malloc's
/// parameters (an operator's own choice stands).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::var_os("GLIBC_TUNABLES")
            .is_some_and(|tunables| tunables.to_string_lossy().contains("glibc.malloc."));
        if tuned {
            return;
        }
        // SAFETY: mallopt only sets parameters of glibc's malloc, under its own lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

/// Folder of a study's grids in the work store, one per pass (a requeued study's
/// generation gets its own): `tensors/<study>` or `tensors/<study>.g<generation>`.
pub fn tensor_folder(study_key: &str, generation: u32) -> String {
    match generation {
        0 => format!("tensors/{study_key}"),
        generation => format!("tensors/{study_key}.g{generation}"),
    }
}

/// Key of a study's stage-1 (or only) tensor, written by one attempt.
pub fn tensor_key(folder: &str, attempt: &str) -> String {
    format!("{folder}/{attempt}.npy")
}

/// Key of a cascade's fine grid (the whole scan in HU on stage 2's grid).
pub fn fine_grid_key(folder: &str, attempt: &str) -> String {
    format!("{folder}/{attempt}.fine.npy.zst")
}

/// Deletes the tensors of `done` studies left in the work store (kept with `--keep-work`,
/// or left by a worker that died between writing and deleting); returns how many.
pub async fn sweep_tensors(
    work: &Store,
    done: &std::collections::HashSet<String>,
) -> Result<usize, panscreen_shared::store::StoreError> {
    let mut swept = 0;
    for object in work.list("tensors").await? {
        let name = object.key.trim_start_matches("tensors/");
        let study = name.split(['/', '.']).next().unwrap_or(name);
        if done.contains(study) {
            work.delete_if_present(&object.key).await?;
            swept += 1;
        }
    }
    Ok(swept)
}

pub struct PreprocessHandler {
    pub campaign: String,
    pub input: Store,
    pub work: Store,
    pub manifest: Arc<ModelManifest>,
    /// Slices fetched ahead of the decoder.
    pub fetch_ahead: usize,
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit(v: [f64; 3]) -> [f64; 3] {
    let length = dot(v, v).sqrt();
    [v[0] / length, v[1] / length, v[2] / length]
}

/// Patient coordinates of the model grid's voxel (0, 0, 0): the first pixel of the first
/// slice (`first_position`), moved along the series' row, column and slice directions by
/// how far the grid's first column, row and slice lie from that pixel (`offsets`, mm).
fn grid_origin(first_position: [f64; 3], directions: [[f64; 3]; 3], offsets: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|axis| {
        first_position[axis] + (0..3).map(|d| offsets[d] * directions[d][axis]).sum::<f64>()
    })
}

/// One grid a study is resampled onto: where its samples lie along the series' axes,
/// the weights that carry each source sample to them, and the planes accumulated so far.
struct Grid {
    spacing: [f64; 3],
    shape: [usize; 3],
    slice_positions: Vec<f64>,
    row_positions: Vec<f64>,
    column_positions: Vec<f64>,
    resampler: PlaneResampler,
    accumulator: SliceAccumulator,
}

/// What each slice's blocking step takes and hands back, so that a series allocates its
/// buffers once: a resampler per grid, the decoded slice's HU, and each grid's plane.
struct SliceWork {
    resamplers: Vec<PlaneResampler>,
    hu: Vec<f32>,
    planes: Vec<Vec<f32>>,
}

/// How the series lies: its axes, the positions of its samples, and how the tensor's
/// axes lie on them.
struct SeriesFrame {
    row_direction: [f64; 3],
    column_direction: [f64; 3],
    slice_direction: [f64; 3],
    first_position: [f64; 3],
    slice_positions: Vec<f64>,
    row_positions: Vec<f64>,
    column_positions: Vec<f64>,
    pixel_spacing: [f64; 2],
    slice_spacing: f64,
    placement: orientation::Placement,
}

impl SeriesFrame {
    fn new(study: &StudyIngested) -> Result<SeriesFrame, PreprocessError> {
        let row_direction = unit([
            study.image_orientation[0],
            study.image_orientation[1],
            study.image_orientation[2],
        ]);
        let column_direction = unit([
            study.image_orientation[3],
            study.image_orientation[4],
            study.image_orientation[5],
        ]);
        let slice_direction = unit(cross(row_direction, column_direction));
        let Some(first) = study.slices.first() else {
            return Err(PreprocessError::NoSlices);
        };
        let slice_positions: Vec<f64> =
            study.slices.iter().map(|s| dot(s.position_mm, slice_direction)).collect();
        if slice_positions.windows(2).any(|pair| pair[1] <= pair[0]) {
            return Err(PreprocessError::Unsorted);
        }
        let pixel_spacing = study.series.pixel_spacing_mm;
        let (rows, columns) = (study.series.rows as usize, study.series.columns as usize);
        Ok(SeriesFrame {
            row_direction,
            column_direction,
            slice_direction,
            first_position: first.position_mm,
            slice_positions,
            row_positions: (0..rows).map(|i| i as f64 * pixel_spacing[0]).collect(),
            column_positions: (0..columns).map(|j| j as f64 * pixel_spacing[1]).collect(),
            pixel_spacing,
            slice_spacing: study.series.slice_spacing_mm,
            // The tensor's axes lie along the patient's, whichever way the series runs:
            // its width and height come from the image's columns and rows, or, for a
            // series with rows and columns swapped, the other way round (`orientation`).
            placement: orientation::placement(row_direction, column_direction, slice_direction),
        })
    }

    /// A grid of `spacing` (depth, height, width) centred on the scanned volume, of
    /// `shape`, or, when `shape` is `None`, as large as the scanned volume.
    fn grid(&self, spacing: [f64; 3], shape: Option<[usize; 3]>, fill: f32) -> Grid {
        let placement = self.placement;
        let [depth_reversed, height_reversed, width_reversed] = placement.reversed;
        let [dz, dy, dx] = spacing;
        // Along the series' rows (the row index) and columns (the column index).
        let extent = |positions: &[f64]| positions[positions.len() - 1] - positions[0];
        let cover = |positions: &[f64], step: f64| (extent(positions) / step).floor() as usize + 1;
        let ((row_step, row_reversed, row_axis), (column_step, column_reversed, column_axis)) =
            if placement.transposed {
                ((dx, width_reversed, 2), (dy, height_reversed, 1))
            } else {
                ((dy, height_reversed, 1), (dx, width_reversed, 2))
            };
        let shape = shape.unwrap_or_else(|| {
            let mut covered = [cover(&self.slice_positions, dz), 0, 0];
            covered[row_axis] = cover(&self.row_positions, row_step);
            covered[column_axis] = cover(&self.column_positions, column_step);
            covered
        });
        let centre = |positions: &[f64]| (positions[0] + positions[positions.len() - 1]) / 2.0;
        let slice_positions = orientation::ordered(
            centred_positions(centre(&self.slice_positions), shape[0], dz),
            depth_reversed,
        );
        let row_positions = orientation::ordered(
            centred_positions(centre(&self.row_positions), shape[row_axis], row_step),
            row_reversed,
        );
        let column_positions = orientation::ordered(
            centred_positions(centre(&self.column_positions), shape[column_axis], column_step),
            column_reversed,
        );
        let slice_weights =
            axis_weights(&self.slice_positions, self.slice_spacing, &slice_positions, dz);
        let resampler = PlaneResampler::new(
            &axis_weights(&self.row_positions, self.pixel_spacing[0], &row_positions, row_step),
            &axis_weights(
                &self.column_positions,
                self.pixel_spacing[1],
                &column_positions,
                column_step,
            ),
            self.row_positions.len(),
            self.column_positions.len(),
            fill,
        );
        let accumulator = SliceAccumulator::new(
            &slice_weights,
            self.slice_positions.len(),
            shape[1] * shape[2],
            fill,
        );
        Grid {
            spacing,
            shape,
            slice_positions,
            row_positions,
            column_positions,
            resampler,
            accumulator,
        }
    }

    /// Where a finished grid lies in the patient.
    fn geometry(&self, grid: &Grid) -> TensorGeometry {
        let placement = self.placement;
        let [depth_reversed, height_reversed, width_reversed] = placement.reversed;
        // Voxel (0, 0, 0) where the first target positions meet, in the series' axes.
        let offsets = [
            grid.column_positions[0],
            grid.row_positions[0],
            grid.slice_positions[0] - self.slice_positions[0],
        ];
        let directions = [self.row_direction, self.column_direction, self.slice_direction];
        let signed = |direction: [f64; 3], reversed: bool| {
            if reversed {
                direction.map(|v| -v)
            } else {
                direction
            }
        };
        let (width_from, height_from) = if placement.transposed {
            (self.column_direction, self.row_direction)
        } else {
            (self.row_direction, self.column_direction)
        };
        let [depth, height, width] = grid.shape;
        TensorGeometry {
            shape: vec![1, 1, depth, height, width],
            spacing_mm: grid.spacing,
            origin_mm: grid_origin(self.first_position, directions, offsets),
            row_direction: signed(width_from, width_reversed),
            column_direction: signed(height_from, height_reversed),
            slice_direction: signed(self.slice_direction, depth_reversed),
        }
    }
}

/// The grids of one study, as preprocess made them: the model's input (stage 1's for a
/// cascade, normalized) and, for a cascade, the whole scan on stage 2's grid in HU.
pub struct Grids {
    pub tensor: (TensorGeometry, Vec<f32>),
    pub fine: Option<(TensorGeometry, Vec<f32>)>,
}

impl PreprocessHandler {
    /// Decodes, resamples and normalizes; returns the tensor and where it sits.
    pub async fn build_tensor(
        &self,
        study: &StudyIngested,
    ) -> Result<(TensorGeometry, Vec<f32>), PreprocessError> {
        Ok(self.build_grids(study).await?.tensor)
    }

    /// Decodes every slice a grid needs once, and resamples it onto each grid.
    pub async fn build_grids(&self, study: &StudyIngested) -> Result<Grids, PreprocessError> {
        let manifest = &self.manifest;
        let frame = SeriesFrame::new(study)?;
        let first = manifest.first_input();
        let mut grids = vec![frame.grid(
            first.spacing_mm,
            Some(first.volume_shape()),
            first.intensity.fill_hu as f32,
        )];
        if manifest.locate.is_some() {
            grids.push(frame.grid(
                manifest.input.spacing_mm,
                None,
                manifest.input.intensity.fill_hu as f32,
            ));
        }
        let (rows, columns) = (study.series.rows as usize, study.series.columns as usize);
        let mut needed: Vec<usize> =
            grids.iter().flat_map(|grid| grid.accumulator.needed_slices()).collect();
        needed.sort_unstable();
        needed.dedup();
        let mut work = SliceWork {
            resamplers: grids.iter().map(|grid| grid.resampler.clone()).collect(),
            hu: Vec::new(),
            planes: vec![Vec::new(); grids.len()],
        };

        // Objects are fetched once: the frames of an Enhanced CT object share its key.
        let mut previous_key: Option<String> = None;
        let plan: Vec<(usize, SliceRef, bool)> = needed
            .into_iter()
            .map(|index| {
                let slice = study.slices[index].clone();
                let fetch = previous_key.as_deref() != Some(slice.key.as_str());
                previous_key = Some(slice.key.clone());
                (index, slice, fetch)
            })
            .collect();
        let mut fetched = futures::stream::iter(plan.into_iter().map(|(index, slice, fetch)| {
            let input = self.input.clone();
            async move {
                let bytes = if fetch { Some(input.get(&slice.key).await) } else { None };
                (index, slice, bytes)
            }
        }))
        .buffered(self.fetch_ahead.max(1));
        let mut current: Option<Arc<decode::Opened>> = None;
        let decode_fill = first.intensity.fill_hu as f32;
        while let Some((index, slice, bytes)) = fetched.next().await {
            let bytes = bytes.transpose()?;
            let transposed = frame.placement.transposed;
            let reuse = current.clone();
            let (object, done) =
                tokio::task::spawn_blocking(move || -> Result<_, PreprocessError> {
                    let object = match bytes {
                        Some(bytes) => Arc::new(decode::open_in_place(
                            &slice.key,
                            bytes,
                            &DecodeLimits::default(),
                        )?),
                        None => reuse.expect("the object of an earlier frame"),
                    };
                    let decoded = decode::decode_opened(
                        &slice.key,
                        &object,
                        slice.frame,
                        decode_fill,
                        std::mem::take(&mut work.hu),
                    )?;
                    if decoded.rows != rows || decoded.columns != columns {
                        return Err(PreprocessError::SliceSize {
                            key: slice.key.clone(),
                            rows: decoded.rows,
                            columns: decoded.columns,
                            series_rows: rows,
                            series_columns: columns,
                        });
                    }
                    if decoded
                        .position
                        .iter()
                        .zip(slice.position_mm)
                        .any(|(a, b)| (a - b).abs() > 1e-3)
                    {
                        return Err(PreprocessError::PositionChanged { key: slice.key.clone() });
                    }
                    for (resampler, plane) in work.resamplers.iter_mut().zip(&mut work.planes) {
                        resampler.resample_into(&decoded.hu, columns, plane);
                        if transposed {
                            let (rows, columns) = resampler.target_shape();
                            *plane = orientation::transpose(plane, rows, columns);
                        }
                    }
                    work.hu = decoded.hu;
                    Ok((object, work))
                })
                .await
                .map_err(|error| PreprocessError::TaskFailed(error.to_string()))??;
            work = done;
            current = Some(object);
            for (grid, plane) in grids.iter_mut().zip(&work.planes) {
                if grid.accumulator.feeds(index) {
                    grid.accumulator.add(index, plane);
                }
            }
        }
        let mut grids = grids.into_iter();
        let tensor = grids.next().expect("the model's grid");
        let geometry = frame.geometry(&tensor);
        let mut volume = tensor.accumulator.finish();
        for value in volume.iter_mut() {
            *value = first.intensity.normalize(*value);
        }
        let fine = grids.next().map(|fine| (frame.geometry(&fine), fine.accumulator.finish()));
        Ok(Grids { tensor: (geometry, volume), fine })
    }

    async fn handle_one(&self, payload: Bytes) -> Result<Outcome, StageError> {
        let started = Instant::now();
        let mut study: StudyIngested = serde_json::from_slice(&payload)
            .map_err(|error| PreprocessError::BadMessage(error.to_string()))?;
        let Grids { tensor: (geometry, volume), fine } = self.build_grids(&study).await?;
        let folder = tensor_folder(&study.context.study_key, study.context.generation);
        // Named apart from any other attempt at this study: a redelivered attempt never
        // overwrites what an earlier one published a reference to, and one whose output the
        // queue drops as a duplicate deletes exactly what it wrote.
        let attempt = unique_suffix();
        let key = tensor_key(&folder, &attempt);
        // Rounding and compressing the fine grid takes tens of milliseconds: off the async
        // workers, and before anything is stored, so that a failure leaves nothing behind.
        let fine = match fine {
            Some((geometry, hu)) => {
                let shape = geometry.shape.clone();
                let range = hu::fine_grid_range(&self.manifest.input.intensity);
                let encoded =
                    tokio::task::spawn_blocking(move || hu::encode_fine_grid(&shape, &hu, range))
                        .await
                        .map_err(|error| PreprocessError::TaskFailed(error.to_string()))?;
                Some((geometry, encoded))
            }
            None => None,
        };
        self.work.put(&key, npy::encode_f32(&geometry.shape, &volume)).await?;
        let fine_grid = match fine {
            Some((geometry, encoded)) => {
                let fine_key = fine_grid_key(&folder, &attempt);
                if let Err(error) = self.work.put(&fine_key, encoded).await {
                    // The next attempt writes both afresh; this one's tensor would be
                    // referenced by nothing.
                    let _ = self.work.delete_if_present(&key).await;
                    return Err(error.into());
                }
                Some(StoredGrid { key: fine_key, geometry })
            }
            None => None,
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        study.context.timings.preprocessed_at = Some(OffsetDateTime::now_utc());
        study.context.timings.preprocess_ms = Some(elapsed_ms);
        info!(study = %study.context.study_key, elapsed_ms, "tensor stored");
        let message = StudyPreprocessed {
            context: study.context,
            series: study.series,
            tensor_key: key,
            geometry,
            model_name: self.manifest.name.clone(),
            fine_grid,
        };
        Ok(Outcome::Publish {
            subject: subjects::preprocessed(&self.campaign),
            message_id: message.context.message_id(Stage::Preprocess),
            payload: Bytes::from(serde_json::to_vec(&message).expect("contracts serialize")),
        })
    }
}

#[async_trait]
impl Handler for PreprocessHandler {
    fn stage(&self) -> Stage {
        Stage::Preprocess
    }

    async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
        let mut results = Vec::with_capacity(payloads.len());
        for payload in payloads {
            results.push(self.handle_one(payload).await);
        }
        results
    }

    /// An earlier attempt at this study published first; this attempt's grids are
    /// referenced by nothing.
    async fn superseded(&self, output: &Bytes) {
        let Ok(message) = serde_json::from_slice::<StudyPreprocessed>(output) else { return };
        let fine = message.fine_grid.as_ref().map(|fine| &fine.key);
        for key in std::iter::once(&message.tensor_key).chain(fine) {
            if let Err(error) = self.work.delete_if_present(key).await {
                tracing::warn!(kind = ?error.kind(), "deleting a superseded attempt's grid failed; it stays in the work store");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 512×512 series at 0.7 mm, 60 slices 2.5 mm apart, onto a 64³ grid at 3 mm:
    /// the grid is centred on the scanned volume, so its centre voxel is the scan's
    /// centre, whichever way the rows and columns run in the patient.
    #[test]
    fn the_grid_origin_puts_the_grid_centre_on_the_scan_centre() {
        let (rows, spacing, slices, slice_spacing, size, grid) = (512, 0.7, 60, 2.5, 64, 3.0);
        let half_plane = (rows as f64 - 1.0) * spacing / 2.0; // 178.85 mm
        let in_plane = centred_positions(half_plane, size, grid);
        for (first_pixel, row, column) in [
            // Supine, head first: rows run to the patient's left, columns to the back.
            ([-179.65, -179.65, -100.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
            // Rows and columns reversed (a scanner that stores the image turned 180°).
            ([179.65, 179.65, -100.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]),
        ] {
            let slice = unit(cross(row, column));
            let positions: Vec<f64> =
                (0..slices).map(|k| dot(first_pixel, slice) + k as f64 * slice_spacing).collect();
            let centre = (positions[0] + positions[slices - 1]) / 2.0;
            let along = centred_positions(centre, size, grid);
            let origin = grid_origin(
                first_pixel,
                [row, column, slice],
                [in_plane[0], in_plane[0], along[0] - positions[0]],
            );
            let geometry = TensorGeometry {
                shape: vec![1, 1, size, size, size],
                spacing_mm: [grid; 3],
                origin_mm: origin,
                row_direction: row,
                column_direction: column,
                slice_direction: slice,
            };
            let middle = (size as f64 - 1.0) / 2.0;
            let scan_centre: [f64; 3] = std::array::from_fn(|axis| {
                first_pixel[axis]
                    + half_plane * (row[axis] + column[axis])
                    + (slices as f64 - 1.0) * slice_spacing / 2.0 * slice[axis]
            });
            let found = geometry.to_patient([middle; 3]);
            for axis in 0..3 {
                assert!(
                    (found[axis] - scan_centre[axis]).abs() < 1e-9,
                    "{found:?} vs {scan_centre:?}"
                );
            }
        }
        // The numbers of the first case, worked by hand: 178.85 − 94.5 = 84.35 mm in.
        let origin = grid_origin(
            [-179.65, -179.65, -100.0],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [84.35, 84.35, -20.75],
        );
        let expected = [-95.3, -95.3, -120.75];
        assert!(origin.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-9), "{origin:?}");
    }
}
