//! A non-contrast abdominal CT phantom, evaluated in patient coordinates (LPS, mm).
//!
//! Layers from outside in: air, subcutaneous fat, the muscular wall, visceral fat.
//! In the visceral fat sit the spine, aorta, inferior vena cava, liver, spleen, both
//! kidneys, a few bowel gas pockets, and a pancreas: a tube along a curved centreline
//! from the head (patient's right) to the tail at the splenic hilum. A lesion, when
//! present, is a sphere on the pancreatic centreline only 10–30 HU below the pancreas,
//! as on plain CT. Intensities are those of unenhanced CT; noise is added by the caller.

use super::rng::Rng;

/// Ground truth of a lesion.
#[derive(Debug, Clone, PartialEq)]
pub struct Lesion {
    pub center_mm: [f64; 3],
    pub diameter_mm: f64,
    /// HU below the pancreas (positive).
    pub hu_delta: f64,
}

#[derive(Debug, Clone)]
struct Ellipsoid {
    center: [f64; 3],
    semi_axes: [f64; 3],
    hu: f64,
}

impl Ellipsoid {
    fn contains(&self, point: [f64; 3]) -> bool {
        let sum: f64 = (0..3)
            .map(|axis| ((point[axis] - self.center[axis]) / self.semi_axes[axis]).powi(2))
            .sum();
        sum <= 1.0
    }

    fn z_range(&self) -> (f64, f64) {
        (self.center[2] - self.semi_axes[2], self.center[2] + self.semi_axes[2])
    }
}

/// A vertical cylinder (vessels, spine) of circular cross-section.
#[derive(Debug, Clone)]
struct Column {
    center_xy: [f64; 2],
    radius: f64,
    hu: f64,
}

impl Column {
    fn contains(&self, x: f64, y: f64) -> bool {
        let dx = x - self.center_xy[0];
        let dy = y - self.center_xy[1];
        dx * dx + dy * dy <= self.radius * self.radius
    }
}

#[derive(Debug, Clone)]
struct Tube {
    /// Centreline points with the radius at each.
    points: Vec<([f64; 3], f64)>,
    hu: f64,
    bounds_min: [f64; 3],
    bounds_max: [f64; 3],
}

impl Tube {
    fn new(points: Vec<([f64; 3], f64)>, hu: f64) -> Tube {
        let margin = points.iter().map(|(_, r)| *r).fold(0.0, f64::max) + 12.0;
        let mut bounds_min = [f64::MAX; 3];
        let mut bounds_max = [f64::MIN; 3];
        for (point, _) in &points {
            for axis in 0..3 {
                bounds_min[axis] = bounds_min[axis].min(point[axis] - margin);
                bounds_max[axis] = bounds_max[axis].max(point[axis] + margin);
            }
        }
        Tube { points, hu, bounds_min, bounds_max }
    }

    /// Distance from the centreline minus the local radius: negative inside.
    fn signed_distance(&self, point: [f64; 3]) -> f64 {
        if (0..3)
            .any(|axis| point[axis] < self.bounds_min[axis] || point[axis] > self.bounds_max[axis])
        {
            return f64::MAX;
        }
        let mut best = f64::MAX;
        for pair in self.points.windows(2) {
            let ((a, radius_a), (b, radius_b)) = (pair[0], pair[1]);
            let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
            let ap = [point[0] - a[0], point[1] - a[1], point[2] - a[2]];
            let length2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
            let t = ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / length2).clamp(0.0, 1.0);
            let closest = [a[0] + t * ab[0], a[1] + t * ab[1], a[2] + t * ab[2]];
            let distance = ((point[0] - closest[0]).powi(2)
                + (point[1] - closest[1]).powi(2)
                + (point[2] - closest[2]).powi(2))
            .sqrt();
            best = best.min(distance - (radius_a + t * (radius_b - radius_a)));
        }
        best
    }

    /// A point on the centreline at fraction `s` of the segments.
    fn point_at(&self, s: f64) -> [f64; 3] {
        let segments = (self.points.len() - 1) as f64;
        let position = (s.clamp(0.0, 1.0) * segments).min(segments - 1e-9);
        let index = position.floor() as usize;
        let t = position - index as f64;
        let (a, b) = (self.points[index].0, self.points[index + 1].0);
        [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]), a[2] + t * (b[2] - a[2])]
    }
}

/// One synthetic patient's abdomen.
#[derive(Debug, Clone)]
pub struct Phantom {
    body_center: [f64; 2],
    body_semi_axes: [f64; 2],
    subcutaneous_fat_mm: f64,
    wall_mm: f64,
    subcutaneous_fat_hu: f64,
    wall_hu: f64,
    visceral_fat_hu: f64,
    vertebra: Column,
    vertebra_cortex_mm: f64,
    spinal_canal: Column,
    vessels: Vec<Column>,
    organs: Vec<Ellipsoid>,
    gas: Vec<Ellipsoid>,
    pancreas: Tube,
    lesion: Option<Lesion>,
}

const AIR_HU: f64 = -1000.0;
const CORTICAL_BONE_HU: f64 = 700.0;
const CANCELLOUS_BONE_HU: f64 = 220.0;

impl Phantom {
    /// A random abdomen; the pancreas lies near z = 0.
    pub fn random(rng: &mut Rng, with_lesion: bool) -> Phantom {
        let jitter = |rng: &mut Rng, spread: f64| rng.uniform(-spread, spread);
        let body_center = [jitter(rng, 8.0), jitter(rng, 8.0)];
        let body_semi_axes = [rng.uniform(145.0, 170.0), rng.uniform(105.0, 130.0)];
        let [cx, cy] = body_center;
        // Posterior is +y in LPS.
        let spine_y = cy + body_semi_axes[1] * 0.55;
        let vertebra = Column {
            center_xy: [cx, spine_y],
            radius: rng.uniform(18.0, 22.0),
            hu: CANCELLOUS_BONE_HU,
        };
        let spinal_canal = Column { center_xy: [cx, spine_y + 28.0], radius: 8.0, hu: 20.0 };
        let blood_hu = rng.uniform(38.0, 46.0);
        let vessels = vec![
            Column {
                center_xy: [cx + 18.0, spine_y - 32.0],
                radius: rng.uniform(10.0, 13.0),
                hu: blood_hu,
            },
            Column {
                center_xy: [cx - 26.0, spine_y - 30.0],
                radius: rng.uniform(9.0, 12.0),
                hu: blood_hu,
            },
        ];
        let scale = rng.uniform(0.9, 1.1);
        // Patient's right is -x in LPS: the liver sits at -x, the spleen at +x.
        let organs = vec![
            Ellipsoid {
                center: [cx - 90.0 * scale, cy - 5.0, 60.0 + jitter(rng, 6.0)],
                semi_axes: [65.0 * scale, 75.0 * scale, 75.0],
                hu: rng.uniform(52.0, 64.0),
            },
            Ellipsoid {
                center: [cx + 112.0 * scale, cy + 40.0, 40.0 + jitter(rng, 8.0)],
                semi_axes: [30.0, 48.0 * scale, 50.0],
                hu: rng.uniform(44.0, 50.0),
            },
            Ellipsoid {
                center: [cx - 68.0, spine_y + 5.0, -15.0 + jitter(rng, 6.0)],
                semi_axes: [26.0, 28.0, 55.0 * scale],
                hu: rng.uniform(29.0, 35.0),
            },
            Ellipsoid {
                center: [cx + 68.0, spine_y + 5.0, -10.0 + jitter(rng, 6.0)],
                semi_axes: [26.0, 28.0, 55.0 * scale],
                hu: rng.uniform(29.0, 35.0),
            },
        ];
        let gas = (0..rng.range(2, 4))
            .map(|_| Ellipsoid {
                center: [cx + jitter(rng, 60.0), cy - rng.uniform(50.0, 80.0), jitter(rng, 60.0)],
                semi_axes: [rng.uniform(8.0, 18.0), rng.uniform(6.0, 12.0), rng.uniform(8.0, 20.0)],
                hu: -950.0,
            })
            .collect();
        let pancreas_hu = rng.uniform(36.0, 46.0);
        let z0 = jitter(rng, 4.0);
        let pancreas = Tube::new(
            vec![
                ([cx - 30.0, spine_y - 66.0, z0 - 10.0], rng.uniform(15.0, 18.0)),
                ([cx - 5.0, spine_y - 72.0, z0 - 2.0], rng.uniform(12.0, 15.0)),
                ([cx + 35.0, spine_y - 62.0, z0 + 4.0], rng.uniform(12.0, 14.0)),
                ([cx + 70.0, spine_y - 40.0, z0 + 10.0], rng.uniform(10.0, 13.0)),
            ],
            pancreas_hu,
        );
        let lesion = with_lesion.then(|| Lesion {
            center_mm: pancreas.point_at(rng.uniform(0.05, 0.9)),
            diameter_mm: rng.uniform(10.0, 30.0),
            hu_delta: rng.uniform(10.0, 30.0),
        });
        Phantom {
            body_center,
            body_semi_axes,
            subcutaneous_fat_mm: rng.uniform(10.0, 28.0),
            wall_mm: rng.uniform(8.0, 14.0),
            subcutaneous_fat_hu: rng.uniform(-115.0, -95.0),
            wall_hu: rng.uniform(46.0, 56.0),
            visceral_fat_hu: rng.uniform(-105.0, -85.0),
            vertebra,
            vertebra_cortex_mm: 3.0,
            spinal_canal,
            vessels,
            organs,
            gas,
            pancreas,
            lesion,
        }
    }

    pub fn lesion(&self) -> Option<&Lesion> {
        self.lesion.as_ref()
    }

    pub fn pancreas_hu(&self) -> f64 {
        self.pancreas.hu
    }

    /// Noise-free HU at a point.
    pub fn hu_at(&self, point: [f64; 3]) -> f64 {
        let [x, y, _] = point;
        let [a, b] = self.body_semi_axes;
        let (dx, dy) = (x - self.body_center[0], y - self.body_center[1]);
        let radial = |shrink: f64| (dx / (a - shrink)).powi(2) + (dy / (b - shrink)).powi(2);
        if radial(0.0) > 1.0 {
            return AIR_HU;
        }
        if radial(self.subcutaneous_fat_mm) > 1.0 {
            return self.subcutaneous_fat_hu;
        }
        if radial(self.subcutaneous_fat_mm + self.wall_mm) > 1.0 {
            return self.wall_hu;
        }
        if self.vertebra.contains(x, y) {
            let inner = Column {
                radius: self.vertebra.radius - self.vertebra_cortex_mm,
                ..self.vertebra.clone()
            };
            return if inner.contains(x, y) { CANCELLOUS_BONE_HU } else { CORTICAL_BONE_HU };
        }
        if self.spinal_canal.contains(x, y) {
            return self.spinal_canal.hu;
        }
        if let Some(gas) = self.gas.iter().find(|gas| gas.contains(point)) {
            return gas.hu;
        }
        if let Some(vessel) = self.vessels.iter().find(|vessel| vessel.contains(x, y)) {
            return vessel.hu;
        }
        let pancreas_distance = self.pancreas.signed_distance(point);
        if let Some(lesion) = &self.lesion {
            let distance =
                ((0..3).map(|axis| (point[axis] - lesion.center_mm[axis]).powi(2)).sum::<f64>())
                    .sqrt();
            // The lesion may bulge a little beyond the gland, as tumours do.
            if distance <= lesion.diameter_mm / 2.0 && pancreas_distance <= 4.0 {
                return self.pancreas.hu - lesion.hu_delta;
            }
        }
        if pancreas_distance <= 0.0 {
            return self.pancreas.hu;
        }
        if let Some(organ) = self.organs.iter().find(|organ| organ.contains(point)) {
            return organ.hu;
        }
        self.visceral_fat_hu
    }

    /// Organs whose z-range misses the slice are skipped by [`Self::slice_hu`].
    fn relevant_for_slice(&self, z: f64) -> Phantom {
        let mut phantom = self.clone();
        phantom.organs.retain(|organ| {
            let (low, high) = organ.z_range();
            z >= low && z <= high
        });
        phantom.gas.retain(|gas| {
            let (low, high) = gas.z_range();
            z >= low && z <= high
        });
        phantom
    }

    /// Noise-free HU of one axial slice: `rows × columns`, row-major; pixel (r, c) sits
    /// at `origin + c·spacing[1]·x̂ + r·spacing[0]·ŷ`.
    pub fn slice_hu(
        &self,
        origin: [f64; 3],
        pixel_spacing: [f64; 2],
        rows: usize,
        columns: usize,
    ) -> Vec<f32> {
        let axes = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        self.slice_hu_along(origin, axes, pixel_spacing, rows, columns)
    }

    /// The same for an axial slice whose rows run along `axes[0]` and columns along
    /// `axes[1]` (both in the axial plane): pixel (r, c) sits at
    /// `origin + c·spacing[1]·axes[0] + r·spacing[0]·axes[1]`.
    pub fn slice_hu_along(
        &self,
        origin: [f64; 3],
        axes: [[f64; 3]; 2],
        pixel_spacing: [f64; 2],
        rows: usize,
        columns: usize,
    ) -> Vec<f32> {
        let phantom = self.relevant_for_slice(origin[2]);
        let [along_row, along_column] = axes;
        let mut out = Vec::with_capacity(rows * columns);
        for row in 0..rows {
            let down = row as f64 * pixel_spacing[0];
            for column in 0..columns {
                let across = column as f64 * pixel_spacing[1];
                let point: [f64; 3] = std::array::from_fn(|axis| {
                    origin[axis] + across * along_row[axis] + down * along_column[axis]
                });
                out.push(phantom.hu_at([point[0], point[1], origin[2]]) as f32);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lesion_is_darker_than_pancreas_by_its_delta() {
        let mut rng = Rng::new(11);
        let phantom = Phantom::random(&mut rng, true);
        let lesion = phantom.lesion().unwrap().clone();
        let inside = phantom.hu_at(lesion.center_mm);
        assert!((phantom.pancreas_hu() - inside - lesion.hu_delta).abs() < 1e-9);
        assert!((10.0..=30.0).contains(&lesion.hu_delta));
        assert!((10.0..=30.0).contains(&lesion.diameter_mm));
    }

    #[test]
    fn outside_the_body_is_air_and_the_spine_is_bone() {
        let phantom = Phantom::random(&mut Rng::new(5), false);
        assert_eq!(phantom.hu_at([400.0, 0.0, 0.0]), AIR_HU);
        let spine = phantom.vertebra.center_xy;
        assert_eq!(phantom.hu_at([spine[0], spine[1], 0.0]), CANCELLOUS_BONE_HU);
        assert!(phantom.lesion().is_none());
    }
}
