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
    /// Where along the gland: "head", "body" or "tail".
    pub location: &'static str,
    /// Width of the blurred rim over which the contrast fades (0: a sharp edge).
    pub edge_mm: f64,
    /// Relative bumps of the outline (0: a sphere).
    pub irregularity: f64,
    /// A dilated main duct runs from the lesion towards the tail.
    pub duct_dilated: bool,
}

/// Which gland part a fraction `s` of the centreline (0 head … 1 tail) falls in.
pub fn location_at(s: f64) -> &'static str {
    if s < 0.3 {
        "head"
    } else if s < 0.7 {
        "body"
    } else {
        "tail"
    }
}

/// What lies at a point: its noise-free HU and its voxel truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tissue {
    pub hu: f64,
    pub label: u8,
}

/// Voxel truth: background, pancreas (the gland, its duct), lesion.
pub const BACKGROUND: u8 = 0;
pub const PANCREAS: u8 = 1;
pub const LESION: u8 = 2;

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

    /// The radius at fraction `s` of the segments.
    fn radius_at(&self, s: f64) -> f64 {
        let segments = (self.points.len() - 1) as f64;
        let position = (s.clamp(0.0, 1.0) * segments).min(segments - 1e-9);
        let index = position.floor() as usize;
        let t = position - index as f64;
        self.points[index].1 + t * (self.points[index + 1].1 - self.points[index].1)
    }

    /// The fraction of the centreline nearest to `point` (to a hundredth).
    fn nearest_fraction(&self, point: [f64; 3]) -> f64 {
        (0..=100)
            .map(|step| step as f64 / 100.0)
            .min_by(|a, b| {
                let distance = |s: f64| {
                    let p = self.point_at(s);
                    (0..3).map(|axis| (p[axis] - point[axis]).powi(2)).sum::<f64>()
                };
                distance(*a).total_cmp(&distance(*b))
            })
            .unwrap_or(0.0)
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
    /// The screening phantom's additions (`None` in the basic one).
    extra: Option<Box<Extra>>,
}

/// What the screening phantom adds: mimics, bowel, a textured lobulated gland, an
/// irregular lesion with a blurred rim and perhaps a dilated duct.
#[derive(Debug, Clone)]
struct Extra {
    /// Fluid-filled or soft structures checked before the organs: gallbladder, cysts.
    fluid: Vec<Ellipsoid>,
    /// The common bile duct, down through the gland's head.
    bile_duct: Tube,
    /// Tubes beside or behind the gland: duodenum, splenic vein.
    tubes: Vec<Tube>,
    /// Small-bowel loops and colon, filling the fat the patient lacks.
    bowel: Vec<Ellipsoid>,
    /// Texture of the gland: amplitude (HU) and wave numbers (rad/mm) with phases.
    texture_hu: f64,
    waves: [[f64; 4]; 3],
    /// Lobulation of the gland's edge (mm) and its waves.
    lobulation_mm: f64,
    lobes: [[f64; 4]; 3],
    /// Unit directions and relative amplitudes of the lesion's bumps.
    bumps: Vec<([f64; 3], f64)>,
    /// A dilated duct (inside the gland, upstream of the lesion).
    duct: Option<Tube>,
    /// How far a lesion may bulge beyond the gland (mm).
    bulge_mm: f64,
}

/// Draws of the screening phantom recorded in `labels.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyTruth {
    pub semi_axes_mm: [f64; 2],
    /// 0 (almost no visceral fat) … 1 (abundant).
    pub visceral_fat: f64,
    pub pancreas_hu: f64,
    /// The pancreas' extent along the head–foot axis (LPS z, mm).
    pub pancreas_z_mm: [f64; 2],
}

const AIR_HU: f64 = -1000.0;
const CORTICAL_BONE_HU: f64 = 700.0;
const CANCELLOUS_BONE_HU: f64 = 220.0;

impl Extra {
    /// A smooth field in [-1, 1] from three products of waves.
    fn field(waves: &[[f64; 4]; 3], point: [f64; 3]) -> f64 {
        waves
            .iter()
            .map(|[kx, ky, kz, phase]| {
                (kx * point[0] + phase).sin()
                    * (ky * point[1] + 2.0 * phase).sin()
                    * (kz * point[2] + 3.0 * phase).sin()
            })
            .sum::<f64>()
            / 3.0
    }

    fn texture(&self, point: [f64; 3]) -> f64 {
        self.texture_hu * Self::field(&self.waves, point)
    }

    /// How far the gland's edge stands out of its tube here (mm, either sign).
    fn lobulation(&self, point: [f64; 3]) -> f64 {
        self.lobulation_mm * 2.0 * Self::field(&self.lobes, point)
    }

    /// The lesion's outline along `offset` (at `distance` from its centre).
    fn lesion_radius(&self, lesion: &Lesion, offset: [f64; 3], distance: f64) -> f64 {
        let radius = lesion.diameter_mm / 2.0;
        if distance == 0.0 || self.bumps.is_empty() {
            return radius;
        }
        let bumps: f64 = self
            .bumps
            .iter()
            .map(|(direction, amplitude)| {
                let cosine =
                    (0..3).map(|axis| direction[axis] * offset[axis]).sum::<f64>() / distance;
                // cos² has mean 1/3 over the sphere: bumps and dents, the volume kept.
                amplitude * (cosine * cosine - 1.0 / 3.0) * 3.0
            })
            .sum();
        radius * (1.0 + lesion.irregularity * bumps).max(0.3)
    }
}

fn unit_vector(rng: &mut Rng) -> [f64; 3] {
    loop {
        let v = [rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)];
        let length = v.iter().map(|c| c * c).sum::<f64>().sqrt();
        if (0.1..=1.0).contains(&length) {
            return v.map(|c| c / length);
        }
    }
}

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
        let lesion = with_lesion.then(|| {
            let s = rng.uniform(0.05, 0.9);
            Lesion {
                center_mm: pancreas.point_at(s),
                diameter_mm: rng.uniform(10.0, 30.0),
                hu_delta: rng.uniform(10.0, 30.0),
                location: location_at(s),
                edge_mm: 0.0,
                irregularity: 0.0,
                duct_dilated: false,
            }
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
            extra: None,
        }
    }

    /// The screening phantom: a body of any build, organs scaled with it, mimics of a
    /// lesion in every study (gallbladder, fluid-filled duodenum and stomach, bile duct,
    /// simple cysts), bowel where fat is scarce, a curved lobulated textured gland with
    /// the splenic vein behind it, and a lesion of any size, contrast and place with an
    /// irregular blurred outline and sometimes a dilated duct upstream. The pancreas
    /// lies around z = 0 (within about ±45 mm).
    pub fn screening(rng: &mut Rng, with_lesion: bool) -> (Phantom, BodyTruth) {
        let jitter = |rng: &mut Rng, spread: f64| rng.uniform(-spread, spread);
        let a = rng.uniform(120.0, 200.0);
        let b = (a * rng.uniform(0.68, 0.85)).clamp(90.0, 160.0);
        let body_semi_axes = [a, b];
        let body_center = [jitter(rng, 6.0), jitter(rng, 6.0)];
        let [cx, cy] = body_center;
        // Organs scale with the body; 160 × 115 mm is the basic phantom's build.
        let (sx, sy) = (a / 160.0, b / 115.0);
        let visceral_fat = rng.uniform(0.0, 1.0);
        let subcutaneous_fat_mm = 4.0 + rng.uniform(0.3, 1.0) * 30.0 * (a - 100.0) / 100.0;
        let spine_y = cy + b * 0.55;
        let vertebra = Column {
            center_xy: [cx, spine_y],
            radius: rng.uniform(17.0, 23.0),
            hu: CANCELLOUS_BONE_HU,
        };
        let spinal_canal = Column { center_xy: [cx, spine_y + 28.0], radius: 8.0, hu: 20.0 };
        let blood_hu = rng.uniform(35.0, 48.0);
        let vessels = vec![
            Column {
                center_xy: [cx + 16.0, spine_y - 31.0],
                radius: rng.uniform(9.0, 14.0),
                hu: blood_hu,
            },
            Column {
                center_xy: [cx - 26.0 * sx, spine_y - 29.0],
                radius: rng.uniform(8.0, 13.0),
                hu: blood_hu,
            },
        ];
        let z0 = jitter(rng, 12.0);
        let liver_hu = rng.uniform(45.0, 68.0);
        let organs = vec![
            Ellipsoid {
                center: [cx - 90.0 * sx, cy - 5.0 * sy, z0 + 60.0 + jitter(rng, 10.0)],
                semi_axes: [65.0 * sx, 75.0 * sy, rng.uniform(65.0, 90.0)],
                hu: liver_hu,
            },
            Ellipsoid {
                center: [cx + 110.0 * sx, cy + 40.0 * sy, z0 + 40.0 + jitter(rng, 10.0)],
                semi_axes: [30.0 * sx, 48.0 * sy, rng.uniform(40.0, 60.0)],
                hu: rng.uniform(40.0, 52.0),
            },
            Ellipsoid {
                center: [cx - 68.0 * sx, spine_y + 5.0, z0 - 15.0 + jitter(rng, 10.0)],
                semi_axes: [26.0 * sx, 28.0 * sy, 55.0],
                hu: rng.uniform(27.0, 38.0),
            },
            Ellipsoid {
                center: [cx + 68.0 * sx, spine_y + 5.0, z0 - 10.0 + jitter(rng, 10.0)],
                semi_axes: [26.0 * sx, 28.0 * sy, 55.0],
                hu: rng.uniform(27.0, 38.0),
            },
        ];
        // The stomach, left and in front, full of fluid; sometimes air on top.
        let stomach = Ellipsoid {
            center: [cx + 55.0 * sx, cy - 40.0 * sy, z0 + 50.0 + jitter(rng, 10.0)],
            semi_axes: [
                rng.uniform(30.0, 50.0) * sx,
                rng.uniform(25.0, 38.0) * sy,
                rng.uniform(35.0, 55.0),
            ],
            hu: rng.uniform(5.0, 30.0),
        };
        let mut gas: Vec<Ellipsoid> = (0..rng.range(1, 4))
            .map(|_| Ellipsoid {
                center: [
                    cx + jitter(rng, 70.0 * sx),
                    cy - rng.uniform(40.0, 85.0) * sy,
                    z0 + rng.uniform(-140.0, 10.0),
                ],
                semi_axes: [rng.uniform(8.0, 18.0), rng.uniform(6.0, 12.0), rng.uniform(8.0, 20.0)],
                hu: -950.0,
            })
            .collect();
        if rng.chance(0.5) {
            gas.push(Ellipsoid {
                center: [
                    stomach.center[0],
                    stomach.center[1] - stomach.semi_axes[1] * 0.7,
                    stomach.center[2],
                ],
                semi_axes: [
                    stomach.semi_axes[0] * 0.6,
                    stomach.semi_axes[1] * 0.35,
                    stomach.semi_axes[2] * 0.5,
                ],
                hu: -950.0,
            });
        }
        // The gland: head right of the spine, in the duodenum's curve; neck in front of
        // the vessels; body across; tail up to the splenic hilum.
        let pancreas_hu = rng.uniform(25.0, 55.0);
        let point = |rng: &mut Rng, x: f64, y: f64, z: f64, radius: (f64, f64)| {
            (
                [
                    cx + x * sx + jitter(rng, 8.0),
                    spine_y + y * sy + jitter(rng, 8.0),
                    z0 + z + jitter(rng, 6.0),
                ],
                rng.uniform(radius.0, radius.1),
            )
        };
        let rise = rng.uniform(-5.0, 25.0);
        let centreline = vec![
            point(rng, -38.0, -62.0, -14.0, (13.0, 20.0)),
            point(rng, -10.0, -76.0, -3.0, (8.0, 12.0)),
            point(rng, 28.0, -70.0, 0.2 * rise, (9.0, 14.0)),
            point(rng, 62.0, -50.0, 0.6 * rise, (8.0, 13.0)),
            point(rng, 86.0, -26.0, rise, (5.0, 9.0)),
        ];
        let pancreas = Tube::new(centreline.clone(), pancreas_hu);
        let waves = |rng: &mut Rng, shortest_mm: f64, longest_mm: f64| -> [[f64; 4]; 3] {
            std::array::from_fn(|_| {
                let k =
                    |rng: &mut Rng| std::f64::consts::TAU / rng.uniform(shortest_mm, longest_mm);
                [k(rng), k(rng), k(rng), rng.uniform(0.0, std::f64::consts::TAU)]
            })
        };
        let texture_waves = waves(rng, 5.0, 14.0);
        let lobes = waves(rng, 8.0, 22.0);
        // The splenic vein behind the body and tail.
        let splenic_vein = Tube::new(
            centreline[2..].iter().map(|(p, r)| ([p[0], p[1] + r + 4.0, p[2]], 4.5)).collect(),
            blood_hu,
        );
        let head = centreline[0].0;
        // The duodenum's C around the head, fluid-filled or collapsed.
        let duodenum_radius = rng.uniform(8.0, 14.0);
        let around = centreline[0].1 + duodenum_radius + 3.0;
        let duodenum = Tube::new(
            vec![
                ([head[0] + 15.0, head[1] - around, head[2] + 30.0], duodenum_radius),
                ([head[0] - 0.6 * around, head[1] - 0.8 * around, head[2] + 15.0], duodenum_radius),
                ([head[0] - around, head[1], head[2] - 5.0], duodenum_radius),
                (
                    [head[0] - 0.5 * around, head[1] + 0.3 * around, head[2] - around - 10.0],
                    duodenum_radius,
                ),
                (
                    [head[0] + 40.0, head[1] + 0.2 * around, head[2] - around - 15.0],
                    duodenum_radius,
                ),
            ],
            rng.uniform(5.0, 40.0),
        );
        // The bile duct down from the liver's hilum through the back of the head.
        let bile_duct_radius = rng.uniform(2.5, 6.0);
        let bile_duct = Tube::new(
            vec![
                ([head[0] - 12.0, head[1] + 10.0, head[2] + 60.0], bile_duct_radius),
                (
                    [head[0] - 4.0, head[1] + 0.5 * centreline[0].1, head[2] + 15.0],
                    bile_duct_radius,
                ),
                (
                    [head[0] + 2.0, head[1] + 0.4 * centreline[0].1, head[2] - 12.0],
                    bile_duct_radius * 0.8,
                ),
            ],
            rng.uniform(0.0, 20.0),
        );
        let gallbladder = Ellipsoid {
            center: [
                head[0] - rng.uniform(25.0, 45.0) * sx,
                head[1] - rng.uniform(20.0, 40.0) * sy,
                head[2] + rng.uniform(10.0, 45.0),
            ],
            semi_axes: [rng.uniform(10.0, 22.0), rng.uniform(10.0, 22.0), rng.uniform(20.0, 40.0)],
            hu: rng.uniform(0.0, 25.0),
        };
        let mut fluid = vec![gallbladder, stomach];
        // Simple cysts in the liver and kidneys.
        for _ in 0..rng.range(1, 3) {
            let organ = &organs[if rng.chance(0.5) { 0 } else { 2 + rng.range(0, 1) as usize }];
            let radius = rng.uniform(2.5, 12.5);
            let offset: [f64; 3] =
                std::array::from_fn(|axis| organ.semi_axes[axis] * rng.uniform(-0.5, 0.5));
            fluid.push(Ellipsoid {
                center: std::array::from_fn(|axis| organ.center[axis] + offset[axis]),
                semi_axes: [radius; 3],
                hu: rng.uniform(-5.0, 15.0),
            });
        }
        // Bowel fills what fat there is not: many loops in a lean patient.
        let loops = 3 + ((1.0 - visceral_fat) * 16.0).round() as i64;
        let bowel = (0..loops)
            .map(|_| Ellipsoid {
                center: [
                    cx + jitter(rng, 0.65 * a),
                    rng.uniform(cy - 0.7 * b, spine_y - 35.0),
                    z0 + rng.uniform(-160.0, 15.0),
                ],
                semi_axes: [
                    rng.uniform(10.0, 24.0),
                    rng.uniform(9.0, 20.0),
                    rng.uniform(10.0, 30.0),
                ],
                hu: if rng.chance(0.6) { rng.uniform(25.0, 45.0) } else { rng.uniform(5.0, 20.0) },
            })
            .collect();
        let lesion = with_lesion.then(|| {
            let s = rng.uniform(0.02, 0.95);
            let centre = pancreas.point_at(s);
            let radius = pancreas.radius_at(s);
            let offset = unit_vector(rng).map(|c| c * radius * rng.uniform(0.0, 0.5));
            Lesion {
                center_mm: std::array::from_fn(|axis| centre[axis] + offset[axis]),
                diameter_mm: rng.uniform(5.0, 40.0),
                hu_delta: rng.uniform(5.0, 30.0),
                location: location_at(s),
                edge_mm: rng.uniform(0.5, 4.0),
                irregularity: rng.uniform(0.0, 0.3),
                duct_dilated: s < 0.75 && rng.chance(0.4),
            }
        });
        let bumps = (0..3).map(|_| (unit_vector(rng), rng.uniform(0.3, 1.0))).collect();
        let duct = lesion.as_ref().filter(|lesion| lesion.duct_dilated).map(|lesion| {
            let from = pancreas.nearest_fraction(lesion.center_mm);
            let radius = rng.uniform(1.5, 3.5);
            let steps = 8;
            Tube::new(
                (0..=steps)
                    .map(|step| {
                        let s = from + (0.95 - from) * step as f64 / steps as f64;
                        (pancreas.point_at(s), radius * (1.0 - 0.4 * step as f64 / steps as f64))
                    })
                    .collect(),
                rng.uniform(5.0, 20.0),
            )
        });
        let bulge_mm = lesion.as_ref().map_or(4.0, |lesion| 4.0 + 0.2 * lesion.diameter_mm);
        let z_range = centreline.iter().fold([f64::MAX, f64::MIN], |[low, high], (p, r)| {
            [low.min(p[2] - r), high.max(p[2] + r)]
        });
        let extra = Extra {
            fluid,
            bile_duct,
            tubes: vec![duodenum, splenic_vein],
            bowel,
            texture_hu: rng.uniform(2.0, 9.0),
            waves: texture_waves,
            lobulation_mm: rng.uniform(0.5, 2.0),
            lobes,
            bumps,
            duct,
            bulge_mm,
        };
        let phantom = Phantom {
            body_center,
            body_semi_axes,
            subcutaneous_fat_mm,
            wall_mm: rng.uniform(6.0, 14.0),
            subcutaneous_fat_hu: rng.uniform(-120.0, -90.0),
            wall_hu: rng.uniform(40.0, 60.0),
            visceral_fat_hu: rng.uniform(-110.0, -80.0),
            vertebra,
            vertebra_cortex_mm: 3.0,
            spinal_canal,
            vessels,
            organs,
            gas,
            pancreas,
            lesion,
            extra: Some(Box::new(extra)),
        };
        let truth = BodyTruth {
            semi_axes_mm: body_semi_axes,
            visceral_fat,
            pancreas_hu,
            pancreas_z_mm: z_range,
        };
        (phantom, truth)
    }

    pub fn lesion(&self) -> Option<&Lesion> {
        self.lesion.as_ref()
    }

    pub fn pancreas_hu(&self) -> f64 {
        self.pancreas.hu
    }

    /// Noise-free HU at a point.
    pub fn hu_at(&self, point: [f64; 3]) -> f64 {
        self.tissue_at(point).hu
    }

    /// Voxel truth at a point: [`BACKGROUND`], [`PANCREAS`] or [`LESION`].
    pub fn label_at(&self, point: [f64; 3]) -> u8 {
        self.tissue_at(point).label
    }

    /// Noise-free HU and truth at a point. One function for both, so the truth is the
    /// image's: what is drawn over the gland (the bile duct in the head) is not gland.
    pub fn tissue_at(&self, point: [f64; 3]) -> Tissue {
        let other = |hu: f64| Tissue { hu, label: BACKGROUND };
        let [x, y, _] = point;
        let [a, b] = self.body_semi_axes;
        let (dx, dy) = (x - self.body_center[0], y - self.body_center[1]);
        let radial = |shrink: f64| (dx / (a - shrink)).powi(2) + (dy / (b - shrink)).powi(2);
        if radial(0.0) > 1.0 {
            return other(AIR_HU);
        }
        if radial(self.subcutaneous_fat_mm) > 1.0 {
            return other(self.subcutaneous_fat_hu);
        }
        if radial(self.subcutaneous_fat_mm + self.wall_mm) > 1.0 {
            return other(self.wall_hu);
        }
        if self.vertebra.contains(x, y) {
            let inner = Column {
                radius: self.vertebra.radius - self.vertebra_cortex_mm,
                ..self.vertebra.clone()
            };
            return other(if inner.contains(x, y) { CANCELLOUS_BONE_HU } else { CORTICAL_BONE_HU });
        }
        if self.spinal_canal.contains(x, y) {
            return other(self.spinal_canal.hu);
        }
        if let Some(gas) = self.gas.iter().find(|gas| gas.contains(point)) {
            return other(gas.hu);
        }
        if let Some(vessel) = self.vessels.iter().find(|vessel| vessel.contains(x, y)) {
            return other(vessel.hu);
        }
        let Some(extra) = &self.extra else { return self.basic_tissue(point) };
        // The bile duct runs through the head: drawn over the gland, and not gland.
        if extra.bile_duct.signed_distance(point) <= 0.0 {
            return other(extra.bile_duct.hu);
        }
        let gland_distance = self.pancreas.signed_distance(point) - extra.lobulation(point);
        if let Some(lesion) = &self.lesion {
            if gland_distance <= extra.bulge_mm {
                let offset: [f64; 3] =
                    std::array::from_fn(|axis| point[axis] - lesion.center_mm[axis]);
                let distance = offset.iter().map(|v| v * v).sum::<f64>().sqrt();
                let radius = extra.lesion_radius(lesion, offset, distance);
                if distance <= radius + lesion.edge_mm / 2.0 {
                    // The contrast fades linearly across the rim, half of it at the outline.
                    let fade = if lesion.edge_mm > 0.0 {
                        ((radius + lesion.edge_mm / 2.0 - distance) / lesion.edge_mm)
                            .clamp(0.0, 1.0)
                    } else {
                        1.0
                    };
                    let around = if gland_distance <= 0.0 {
                        self.pancreas.hu + extra.texture(point)
                    } else {
                        self.visceral_fat_hu
                    };
                    let inside = self.pancreas.hu - lesion.hu_delta;
                    let label = if distance <= radius {
                        LESION
                    } else if gland_distance <= 0.0 {
                        PANCREAS
                    } else {
                        BACKGROUND
                    };
                    return Tissue { hu: around + (inside - around) * fade, label };
                }
            }
        }
        if gland_distance <= 0.0 {
            if let Some(duct) = &extra.duct {
                if duct.signed_distance(point) <= 0.0 {
                    return Tissue { hu: duct.hu, label: PANCREAS };
                }
            }
            return Tissue { hu: self.pancreas.hu + extra.texture(point), label: PANCREAS };
        }
        if let Some(tube) = extra.tubes.iter().find(|tube| tube.signed_distance(point) <= 0.0) {
            return other(tube.hu);
        }
        if let Some(fluid) = extra.fluid.iter().find(|fluid| fluid.contains(point)) {
            return other(fluid.hu);
        }
        if let Some(organ) = self.organs.iter().find(|organ| organ.contains(point)) {
            return other(organ.hu);
        }
        if let Some(loop_) = extra.bowel.iter().find(|loop_| loop_.contains(point)) {
            return other(loop_.hu);
        }
        other(self.visceral_fat_hu)
    }

    /// The basic phantom: a smooth tube, a round sharp lesion.
    fn basic_tissue(&self, point: [f64; 3]) -> Tissue {
        let pancreas_distance = self.pancreas.signed_distance(point);
        if let Some(lesion) = &self.lesion {
            let distance =
                ((0..3).map(|axis| (point[axis] - lesion.center_mm[axis]).powi(2)).sum::<f64>())
                    .sqrt();
            // The lesion may bulge a little beyond the gland, as tumours do.
            if distance <= lesion.diameter_mm / 2.0 && pancreas_distance <= 4.0 {
                return Tissue { hu: self.pancreas.hu - lesion.hu_delta, label: LESION };
            }
        }
        if pancreas_distance <= 0.0 {
            return Tissue { hu: self.pancreas.hu, label: PANCREAS };
        }
        if let Some(organ) = self.organs.iter().find(|organ| organ.contains(point)) {
            return Tissue { hu: organ.hu, label: BACKGROUND };
        }
        Tissue { hu: self.visceral_fat_hu, label: BACKGROUND }
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
        if let Some(extra) = &mut phantom.extra {
            let near = |shape: &Ellipsoid| {
                let (low, high) = shape.z_range();
                z >= low && z <= high
            };
            extra.fluid.retain(near);
            extra.bowel.retain(near);
        }
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

    /// Voxels of `label` in a box around `centre` (half-width `half` mm) at `step` mm.
    fn count(phantom: &Phantom, centre: [f64; 3], half: f64, step: f64, label: u8) -> usize {
        let n = (2.0 * half / step) as i64;
        let mut found = 0;
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let point = [
                        centre[0] - half + (i as f64 + 0.5) * step,
                        centre[1] - half + (j as f64 + 0.5) * step,
                        centre[2] - half + (k as f64 + 0.5) * step,
                    ];
                    found += usize::from(phantom.label_at(point) == label);
                }
            }
        }
        found
    }

    #[test]
    fn the_screening_lesion_is_its_truth_whatever_its_outline() {
        let mut checked = 0;
        for seed in 0..40 {
            let (phantom, body) = Phantom::screening(&mut Rng::new(seed), true);
            let lesion = phantom.lesion().unwrap().clone();
            assert!((5.0..=40.0).contains(&lesion.diameter_mm));
            assert!((5.0..=30.0).contains(&lesion.hu_delta));
            assert!((25.0..=55.0).contains(&body.pancreas_hu));
            let centre = phantom.tissue_at(lesion.center_mm);
            // The bile duct may cross a lesion in the head; elsewhere the centre is lesion.
            if centre.label != LESION {
                continue;
            }
            checked += 1;
            assert!(centre.hu < body.pancreas_hu - lesion.hu_delta + 9.0 + 1e-9, "{centre:?}");
            // Its volume is about a sphere's of its diameter (the bumps keep the volume,
            // the gland may clip it): within 0.6–1.6 of it.
            let step = 1.0;
            let voxels = count(&phantom, lesion.center_mm, lesion.diameter_mm, step, LESION);
            let sphere = std::f64::consts::PI / 6.0 * lesion.diameter_mm.powi(3);
            let ratio = voxels as f64 * step.powi(3) / sphere;
            assert!((0.6..=1.6).contains(&ratio), "seed {seed}: lesion volume {ratio} of a sphere");
        }
        assert!(checked >= 30, "only {checked} of 40 lesion centres were lesion");
    }

    #[test]
    fn every_screening_study_holds_mimics_beside_a_gland_of_realistic_size() {
        for seed in 0..20 {
            let (phantom, body) = Phantom::screening(&mut Rng::new(1000 + seed), false);
            assert!(phantom.lesion().is_none());
            let extra = phantom.extra.as_ref().unwrap();
            // Gallbladder and stomach, and one to three cysts; duodenum and splenic vein.
            assert!((3..=5).contains(&extra.fluid.len()));
            assert_eq!(extra.tubes.len(), 2);
            // Fluid mimics are 0–30 HU, where lesions are.
            assert!(extra.fluid.iter().all(|fluid| (-5.0..=30.0).contains(&fluid.hu)));
            // A normal gland: 40–120 ml.
            let [low, high] = body.pancreas_z_mm;
            let centre = phantom.pancreas.point_at(0.5);
            let step = 2.0;
            let voxels =
                count(&phantom, [centre[0], centre[1], (low + high) / 2.0], 120.0, step, PANCREAS);
            let millilitres = voxels as f64 * step.powi(3) / 1000.0;
            assert!((40.0..=120.0).contains(&millilitres), "seed {seed}: gland {millilitres} ml");
            assert!(high - low < 100.0 && low > -80.0 && high < 80.0, "{low}..{high}");
        }
    }

    #[test]
    fn the_screening_phantom_is_the_same_for_the_same_seed() {
        let (one, _) = Phantom::screening(&mut Rng::new(77), true);
        let (two, _) = Phantom::screening(&mut Rng::new(77), true);
        let points =
            (0..200).map(|i| [i as f64 - 100.0, (i * 7 % 150) as f64 - 75.0, (i % 40) as f64]);
        for point in points {
            assert_eq!(one.tissue_at(point), two.tissue_at(point));
        }
        assert_eq!(one.lesion(), two.lesion());
    }
}
