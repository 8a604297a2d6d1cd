#!/usr/bin/env python3
"""Compares the exported ONNX files with the JAX networks of train.py on one study.

NOT FOR CLINICAL USE. Needs JAX and onnxruntime (the training environment, not
panscreen's venv); no build or test step runs it. Reads what `panscreen model dataset`
writes (train.py --prepare leaves it in WORK/dataset) and the committed weights.npz.

detect: the middle 32 x 64 x 64 of the first lesion study's fine crop, its tempered lesion
map (logits averaged over architecture.py's mask_pool, padding not counted, divided by
the temperature, through a sigmoid) from onnxruntime against JAX.
locate: that study's whole coarse grid, the pancreas probability, the same way.

Usage: compare_export.py DATASET_DIR
"""

import json
import os
import sys

import numpy as np

import jax
import jax.numpy as jnp
import onnxruntime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from architecture import DETECT, LOCATE  # noqa: E402
from train import cut, tempered_logits, unet  # noqa: E402


def middle(volume, shape):
    """The middle of `volume` in a `shape` array (train.py's cut, -1000 HU outside), as N, C = 1."""
    start = [(n - m) // 2 for n, m in zip(volume.shape, shape)]
    return cut(volume, start, shape, -1000.0)[None, None]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dataset = sys.argv[1]
    stored = np.load(os.path.join(HERE, "weights.npz"))

    def params(stage):
        return {k.split("/", 1)[1]: jnp.asarray(stored[k]) for k in stored.files if k.startswith(stage + "/")}

    rows = [json.loads(line) for line in open(os.path.join(dataset, "dataset.jsonl"))]
    row = next(r for r in rows if r["lesion_present"])
    study = "study-%05d" % row["study_index"]

    fine = middle(np.load(os.path.join(dataset, "fine", study + ".npy")), (32, 64, 64))
    session = onnxruntime.InferenceSession(os.path.join(HERE, "detect.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(["lesion_mask"], {"ct": fine})[0]
    tempered = tempered_logits(params("detect"), DETECT, jnp.asarray(fine), jnp.ones(fine.shape))
    reference = np.asarray(jax.nn.sigmoid(tempered))
    print(f"detect ({study}): largest difference {np.abs(exported - reference).max():.2e}, "
          f"map's highest {exported.max():.4f}")

    coarse = middle(np.load(os.path.join(dataset, "coarse", study + ".npy")), (112, 96, 96))
    session = onnxruntime.InferenceSession(os.path.join(HERE, "locate.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(["pancreas"], {"ct": coarse})[0][:, 1:2]
    reference = np.asarray(jax.nn.sigmoid(unet(params("locate"), LOCATE, jnp.asarray(coarse))))
    print(f"locate ({study}): largest difference {np.abs(exported - reference).max():.2e}, "
          f"voxels above 0.5: {int((exported > 0.5).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
