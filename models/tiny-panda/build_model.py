#!/usr/bin/env python3
"""Writes tiny-panda.onnx: a small, hand-designed 3D network for panscreen's pipeline.

NOT FOR CLINICAL USE. It is not trained on patient data and has no clinical
validation. It exists so that the whole pipeline runs end to end with a real ONNX
model, and so that a lesion that is darker than the pancreas around it on plain CT
scores higher than a study without one. A trained PANDA-style model drops in by
shipping its own .onnx and manifest.toml.

Input  `ct`:                 [N, 1, 48, 128, 128] float32, clipped HU (see manifest.toml)
Output `lesion_probability`: [N, 1]               float32 in [0, 1]
Output `lesion_mask`:        [N, 1, 48, 128, 128] float32 in [0, 1]

The network, every weight set here from physical reasoning (voxel 3 x 2.5 x 2.5 mm):
  1. smooth    = Gaussian(ct, sigma = 1 x 1.5 x 1.5 voxels)           (separable Conv)
  2. soft      = sigmoid((smooth + 10) / 5) * sigmoid((100 - smooth) / 10)
                 soft tissue: not fat, not air, not bone
  3. core      = 1 - MaxPool(1 - solid, 5 x 7 x 7), solid = ct in (-30, 150) HU voxel by voxel
                 (erosion: at least 2 slices and 3 voxels away from any fat, air or bone)
  4. context   = Gaussian(ct * soft, sigma 2 x 4 x 4) / Gaussian(soft) (mean HU of nearby soft tissue)
  5. darkness  = relu(context - smooth - DARK_OFFSET)                  (HU below the surrounding tissue)
  6. score     = darkness * core * sigmoid((smooth + 5) / 4) * sigmoid((42 - smooth) / 3)
     score is zeroed within 2 slices and 4 voxels of the border (smoothing runs off there)
     score is also weighted by a soft limit on the anterior-posterior axis (rows past 78,
     36 mm behind the centre of the field of view, count less): a crude stand-in for
     PANDA's first stage, which locates the pancreas; it keeps the kidneys out
  7. lesion_mask        = sigmoid((score - MASK_LEVEL) / MASK_SCALE)
     lesion_probability = sigmoid((max(score) - MASK_LEVEL) / MASK_SCALE)

Usage: build_model.py [--out PATH]   (writes IR version 8, opset 17: ONNX Runtime 1.31 reads it)
"""

import argparse
import hashlib
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from onnx_graph import Graph, hypodense_detector  # noqa: E402  (models/onnx_graph.py)

DEPTH, HEIGHT, WIDTH = 48, 128, 128
DARK_OFFSET = 3.0
MASK_LEVEL, MASK_SCALE = 2.5, 0.5
# Row 63.5 is the centre of the field of view; 2.5 mm per row: row 78 is 36 mm posterior.
POSTERIOR_LIMIT_ROW = 78.0


def build() -> onnx.ModelProto:
    g = Graph()
    # Stage-1 stand-in: the pancreas lies in front of the kidneys. A soft limit on the
    # anterior-posterior axis (rows; +y is posterior in LPS) keeps the search there.
    rows = np.arange(HEIGHT, dtype=np.float64)
    prior = 1.0 / (1.0 + np.exp((rows - POSTERIOR_LIMIT_ROW) / 1.5))
    hypodense_detector(g, (DEPTH, HEIGHT, WIDTH), prior.reshape(1, 1, 1, HEIGHT, 1), DARK_OFFSET, MASK_LEVEL, MASK_SCALE)

    graph = helper.make_graph(
        g.nodes,
        "tiny_panda",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, ["N", 1, DEPTH, HEIGHT, WIDTH])],
        [
            helper.make_tensor_value_info("lesion_probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("lesion_mask", TensorProto.FLOAT, ["N", 1, DEPTH, HEIGHT, WIDTH]),
        ],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="panscreen models/tiny-panda/build_model.py",
        doc_string="tiny-panda: hand-designed demonstration network. NOT FOR CLINICAL USE.",
    )
    model.ir_version = 8  # ONNX Runtime 1.31 reads IR <= 13; recent onnx writes 14 by default
    onnx.checker.check_model(model)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tiny-panda.onnx")
    args = parser.parse_args()
    data = build().SerializeToString(deterministic=True)
    with open(args.out, "wb") as handle:
        handle.write(data)
    print(f"{args.out} sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
