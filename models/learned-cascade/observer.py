"""How far does the screening phantom let any model go? A channelized Hotelling observer
(CHO), signal known exactly and location known, on each gate-stratum lesion's own study,
then a search over M places. Needs numpy and scipy only; reads what
`panscreen model dataset` writes (fine grids and voxel truth).

For each lesion (>= 10 mm, >= 10 HU below the gland):
  - signal template s: -hu_delta times the lesion's voxel mask (labels == 2) blurred by one
    voxel (edges are blurred in the images too);
  - backgrounds: the lesion's ROI box (its bounding box plus 4 voxels) moved to up to 400
    random places in the same study's gland (the lesion's footprint >= 80% gland there, and
    clear of the lesion), on the image with the lesion; the crop is padded by reflection.
    A lesion whose gland has fewer than 60 such places (mostly the large ones: no room for
    them elsewhere in the gland) is skipped, and counted as found (d' = 8) in the search;
  - channels: s itself, and s filtered by 3-D difference-of-Gaussians bands (so the observer can
    prewhiten the gland texture and noise), plus smooth background channels;
  - d'^2 = dv^T K^-1 dv, dv = U^T s (additive signal), K the channel covariance of backgrounds;
    AUC_SKE = Phi(d'/sqrt 2). Also the non-prewhitening matched filter (NPW) and the region-mean
    observer, and the CHO statistic evaluated on the actual lesion (t_lesion vs background t's).
  - search: a study's score is the largest of M independent lesion-sized places in its gland,
    the lesion's place carrying the lesion's d' (or its measured z); AUC and sensitivity at
    95% specificity against lesion-free studies, for M from 1 to 40; then the sensitivity
    at that cut by diameter (10-15, 15-20, 20-40 mm; measured lesions only).
The known-location, known-signal task is easier than the gate's (where is it, is it there);
the search model is a rough stand-in for the gate's task. Neither is a bound for a
nonlinear observer, but a model that stays well under them has room to improve, and a
gate above them asks more than the phantom's lesions show.
Usage: observer.py DATASET_DIR (see README.md, "How far the phantom lets a model go")."""
import json
import sys
from math import erf, sqrt

import numpy as np
from scipy import ndimage

rng = np.random.default_rng(0)
d = sys.argv[1]
Phi = lambda x: 0.5 * (1 + erf(x / sqrt(2)))
rows, skipped = [], []
for line in open(d + "/dataset.jsonl"):
    s = json.loads(line)
    if not s["lesion_present"] or s["lesion_diameter_mm"] < 10 or s["lesion_hu_below_pancreas"] < 10:
        continue
    n = s["study_dir"]
    v = np.load(f"{d}/fine/{n}.npy").astype(np.float64)
    l = np.load(f"{d}/fine/{n}.labels.npy")
    # Room for boxes at the crop's edge: the crop is padded by reflection, labelled background.
    pad = 12
    v = np.pad(v, pad, mode="reflect")
    l = np.pad(l, pad, mode="constant")
    les = l == 2
    if les.sum() < 8:
        skipped.append((n, "fewer than 8 lesion voxels", int(les.sum())))
        continue
    spacing = np.array(s["fine_spacing_mm"])
    # ROI: the lesion's box plus 4 voxels each side.
    L = np.argwhere(les)
    lo, hi = L.min(0) - 4, L.max(0) + 5
    if (lo < 0).any() or (hi > np.array(v.shape)).any():
        skipped.append((n, "box outside", 0))
        continue
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = les[box].astype(np.float64)
    delta = s["lesion_hu_below_pancreas"]
    template = -delta * ndimage.gaussian_filter(mask, 1.0)
    sig = lambda mm: mm / spacing
    channels = [template]
    for a, b in ((0.5, 1.5), (1.5, 3.0), (3.0, 6.0), (6.0, 12.0)):
        band = ndimage.gaussian_filter(template, sig(a)) - ndimage.gaussian_filter(template, sig(b))
        channels.append(band)
    centre = np.zeros_like(mask)
    centre[tuple(np.array(mask.shape) // 2)] = 1
    for a in (2.0, 5.0, 10.0):
        channels.append(ndimage.gaussian_filter(centre, sig(a)))
    U = np.stack([c.ravel() / np.linalg.norm(c) for c in channels], 1)
    # Backgrounds: the box shifted so the lesion footprint lands in gland, away from the lesion.
    gland = np.argwhere(l == 1)
    c0 = L.mean(0).round().astype(int)
    near = ndimage.binary_dilation(les, iterations=3)
    samples = []
    for _ in range(3000):
        t = gland[rng.integers(len(gland))] - c0
        a, b = lo + t, hi + t
        if (a < 0).any() or (b > np.array(v.shape)).any():
            continue
        shifted = tuple(slice(x, y) for x, y in zip(a, b))
        if (l[shifted][mask > 0] == 1).mean() < 0.8 or near[shifted].any():
            continue
        samples.append(v[shifted].ravel())
        if len(samples) >= 400:
            break
    if len(samples) < 60:
        skipped.append((n, "too few background places", len(samples)))
        continue
    G = np.array(samples)
    V = G @ U
    K = np.cov(V, rowvar=False)
    dv = U.T @ template.ravel()
    w = np.linalg.solve(K, dv)
    d_cho = sqrt(dv @ w)
    # NPW: the template itself, against background variability.
    t_bg = G @ template.ravel()
    d_npw = (template.ravel() @ template.ravel()) / t_bg.std()
    # Region mean.
    m_bg = G[:, mask.ravel() > 0].mean(1)
    d_mean = delta * ndimage.gaussian_filter(mask, 1.0)[mask > 0].mean() / m_bg.std()
    # The CHO statistic on the actual lesion image against its backgrounds.
    t_all = V @ w
    t_lesion = (v[box].ravel() @ U) @ w
    z_actual = (t_lesion - t_all.mean()) / t_all.std()
    rows.append((s["lesion_diameter_mm"], delta, d_cho, d_npw, d_mean, z_actual, len(samples)))

r = np.array(rows)
print(f"{len(r)} gate-stratum lesions in {d}; skipped {len(skipped)}: {skipped}")
print(f"background samples per lesion: median {np.median(r[:, 6]):.0f}, min {r[:, 6].min():.0f}")
for name, col in (("CHO (SKE, prewhitening)", 2), ("NPW matched filter", 3), ("region mean", 4)):
    z = r[:, col]
    aucs = np.array([Phi(x / sqrt(2)) for x in z])
    print(f"{name:26s} median d' {np.median(z):5.2f}  mean AUC {aucs.mean():.3f}  AUC>=0.95 for {np.mean(aucs >= 0.95):.2f}")
z = r[:, 5]
print(f"{'CHO on the actual lesion':26s} median z {np.median(z):5.2f}  mean Phi(z/sqrt2) {np.mean([Phi(x / sqrt(2)) for x in z]):.3f}")
for lo_, hi_ in ((10, 20), (20, 41)):
    m = (r[:, 0] >= lo_) & (r[:, 0] < hi_)
    if m.any():
        aucs = np.array([Phi(x / sqrt(2)) for x in r[m, 2]])
        print(f"  {lo_}-{hi_} mm: n={m.sum()}, CHO median d' {np.median(r[m, 2]):.2f}, mean AUC {aucs.mean():.3f}")

# Search: a study's score is the largest of M independent lesion-sized places in its gland
# (the lesion's place carries d'); lesions skipped above are taken as found (d' = 8).
def search_auc(dprimes, M, n=20000):
    g = np.random.default_rng(1)
    neg = g.standard_normal((n, M)).max(1)
    pos = []
    for dp in dprimes:
        k = n // len(dprimes)
        pos.append(np.maximum(g.standard_normal(k) + dp, g.standard_normal((k, M - 1)).max(1) if M > 1 else -np.inf))
    pos = np.concatenate(pos)
    # AUC by ranks
    allv = np.concatenate([neg, pos]); ranks = allv.argsort().argsort() + 1
    auc = (ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    return auc, (pos > np.quantile(neg, 0.95)).mean()
dps = np.concatenate([r[:, 2], np.full(len(skipped), 8.0)])
for M in (1, 5, 10, 20, 40):
    auc, sens = search_auc(dps, M)
    print(f"search among M={M:2d} places: gate AUC {auc:.3f}, sensitivity at specificity 0.95 {sens:.3f}")
# The same, with each lesion's measured CHO z on its actual image in place of the additive d'.
dps = np.concatenate([r[:, 5], np.full(len(skipped), 8.0)])
for M in (1, 5, 10, 20, 40):
    auc, sens = search_auc(dps, M)
    print(f"measured z, search among M={M:2d}: gate AUC {auc:.3f}, sensitivity at specificity 0.95 {sens:.3f}")

# Per diameter band: sensitivity at the search's 95% specificity cut (the cut is set by
# lesion-free studies alone, so it is the same for every band).
def band_sens(dprimes, M, n=200000):
    g = np.random.default_rng(2)
    cut = np.quantile(g.standard_normal((n, M)).max(1), 0.95)
    found = []
    for dp in dprimes:
        k = 4000
        pos = np.maximum(g.standard_normal(k) + dp, g.standard_normal((k, M - 1)).max(1) if M > 1 else -np.inf)
        found.append((pos > cut).mean())
    return np.mean(found)
for col, label in ((2, "additive d'"), (5, "measured z")):
    for lo_, hi_ in ((10, 15), (15, 20), (20, 41)):
        m = (r[:, 0] >= lo_) & (r[:, 0] < hi_)
        if not m.any():
            continue
        sens = [band_sens(r[m, col], M) for M in (1, 5, 10, 20, 40)]
        print(f"{label}, {lo_}-{hi_} mm (n={m.sum()}): sensitivity at spec 0.95 for M=1,5,10,20,40: " + ", ".join(f"{s:.3f}" for s in sens))
