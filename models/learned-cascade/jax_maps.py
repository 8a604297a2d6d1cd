#!/usr/bin/env python3
"""Scores a dataset's studies with stage 2 run in JAX over each whole fine crop.

NOT FOR CLINICAL USE. Needs JAX and scipy (the training environment); no build or test
step runs it. For trying a change to stage 2 on a tuning cohort without exporting it:
each study's fine crop, as `panscreen model dataset` wrote it (`--margin-mm 15` is what
infer's box adds), goes through train.py's `unet` whole, and the study scores the
highest tempered logit (what the exported map's peak is, before its sigmoid). Prints
AUC and sensitivity at the cohort's own 95% specificity cut (optimistic) for issue 9's
gate stratum (lesions >= 10 mm and >= 10 HU) against all lesion-free studies, scored
four ways: the whole crop; within 8 mm of the gland's true voxels (where infer looks,
`lesion_within_mm`, around the gland stage 1 finds); only the gland's true voxels (lesion
included); and only outside them. Then where the false alarms peak and which
gate-stratum lesions are missed.

Usage: jax_maps.py DATASET [--weights weights.npz]
"""

import argparse
import json
import os
import sys

import numpy as np
from scipy import ndimage

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from architecture import DETECT  # noqa: E402
from train import relative, tempered_logits  # noqa: E402


def auc(positives, negatives):
    p, n = np.asarray(positives)[:, None], np.asarray(negatives)[None]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def sensitivity_at_95(positives, negatives):
    cut = np.sort(negatives)[int(0.95 * len(negatives))]
    return float((np.asarray(positives) > cut).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--weights", default=os.path.join(HERE, "weights.npz"))
    args = parser.parse_args()
    stored = np.load(args.weights)
    params = {k.split("/", 1)[1]: jnp.asarray(stored[k]) for k in stored.files if k.startswith("detect/")}
    tempered = jax.jit(lambda ct, ones: tempered_logits(params, DETECT, ct, ones))
    rows = []
    for line in open(os.path.join(args.dataset, "dataset.jsonl")):
        row = json.loads(line)
        name = row["study_dir"]
        ct = np.load(os.path.join(args.dataset, "fine", name + ".npy")).astype(np.float32)
        labels = np.load(os.path.join(args.dataset, "fine", name + ".labels.npy"))
        raw, ct = ct, relative(ct, labels > 0, DETECT["reference"])
        # Padded with air to a multiple of 8 (both pools), at least a patch: few shapes to compile.
        shape = [max(-(-n // 8) * 8, p) for n, p in zip(ct.shape, (32, 64, 64))]
        padded = np.full(shape, -1000.0, np.float32)
        padded[: ct.shape[0], : ct.shape[1], : ct.shape[2]] = ct
        ones = jnp.ones((1, 1, *shape), jnp.float32)
        score = np.asarray(tempered(jnp.asarray(padded[None, None]), ones))[0, 0]
        score = score[: ct.shape[0], : ct.shape[1], : ct.shape[2]]
        gland = labels > 0
        from_gland = ndimage.distance_transform_edt(~gland, sampling=row["fine_spacing_mm"])
        near = np.where(from_gland <= 8.0, score, -np.inf)
        peak = np.unravel_index(near.argmax(), score.shape)
        row.update(
            whole=float(score.max()),
            near=float(near.max()),
            gland=float(score[gland].max()) if gland.any() else float("-inf"),
            outside=float(score[~gland].max()),
            peak_label=int(labels[peak]),
            peak_hu=float(raw[peak]),
            peak_mm_from_gland=float(from_gland[peak]),
        )
        rows.append(row)
    gate = [r for r in rows if r["lesion_present"] and r["lesion_diameter_mm"] >= 10 and r["lesion_hu_below_pancreas"] >= 10]
    negatives = [r for r in rows if not r["lesion_present"]]
    print(f"{len(gate)} gate-stratum lesions, {len(negatives)} lesion-free studies")
    for way in ("whole", "near", "gland", "outside"):
        p, n = [r[way] for r in gate], [r[way] for r in negatives]
        print(f"  {way:8s} AUC {auc(p, n):.3f}  sensitivity at the cohort's 95% specificity {sensitivity_at_95(p, n):.3f}")
    cut = np.sort([r["near"] for r in negatives])[int(0.95 * len(negatives))]
    alarms = [r for r in negatives if r["near"] > cut]
    print("false alarms above the cut (within 8 mm): label, HU, mm from the gland at the peak")
    print("  " + "; ".join(f"{r['peak_label']} {r['peak_hu']:.0f} {r['peak_mm_from_gland']:.0f}" for r in alarms))
    missed = [r for r in gate if r["near"] <= cut]
    print(f"missed gate-stratum lesions (within 8 mm): {len(missed)}; diameter mm, HU below the gland")
    print("  " + "; ".join(f"{r['lesion_diameter_mm']:.0f} {r['lesion_hu_below_pancreas']:.0f}" for r in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
