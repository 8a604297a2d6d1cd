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
     lesion_probability = sigmoid((max(score) - PROBABILITY_LEVEL) / PROBABILITY_SCALE)

Usage: build_model.py [--out PATH]   (writes IR version 8, opset 17: ONNX Runtime 1.31 reads it)
"""

import argparse
import hashlib
import math
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEPTH, HEIGHT, WIDTH = 48, 128, 128
DARK_OFFSET = 3.0
MASK_LEVEL, MASK_SCALE = 2.5, 0.5
PROBABILITY_LEVEL, PROBABILITY_SCALE = 2.5, 0.5
# Row 63.5 is the centre of the field of view; 2.5 mm per row: row 78 is 36 mm posterior.
POSTERIOR_LIMIT_ROW = 78.0


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


class Graph:
    def __init__(self):
        self.nodes, self.initializers, self.counter = [], [], 0

    def name(self, prefix):
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def constant(self, value, prefix="c"):
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def int_constant(self, values):
        name = self.name("i")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type, inputs, prefix=None, **attributes):
        output = self.name(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def gaussian(self, x, sigmas):
        """Separable Gaussian smoothing over (depth, height, width), zero padding."""
        for axis, sigma in enumerate(sigmas):
            kernel = gaussian_kernel(sigma)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = len(kernel)
            weight = self.constant(kernel.reshape(shape), "gauss_w")
            pads = [0, 0, 0, 0, 0, 0]
            pads[axis] = pads[axis + 3] = len(kernel) // 2
            x = self.op("Conv", [x, weight], "gauss", pads=pads, kernel_shape=shape[2:])
        return x

    def sigmoid_of(self, x, offset, scale):
        """sigmoid((x - offset) / scale); a negative scale flips it."""
        shifted = self.op("Sub", [x, self.constant(offset)])
        return self.op("Sigmoid", [self.op("Div", [shifted, self.constant(scale)])])


def build() -> onnx.ModelProto:
    g = Graph()
    smooth = g.gaussian("ct", (1.0, 1.5, 1.5))
    soft = g.op("Mul", [g.sigmoid_of(smooth, -10.0, 5.0), g.sigmoid_of(smooth, 100.0, -10.0)], "soft")
    # Fat and bone judged voxel by voxel (unsmoothed), so thin fat planes between
    # organs are not blurred into something lesion-like.
    solid = g.op("Mul", [g.sigmoid_of("ct", -30.0, 5.0), g.sigmoid_of("ct", 150.0, -10.0)], "solid")
    one = g.constant(1.0, "one")
    not_soft = g.op("Sub", [one, solid])
    eroded = g.op("MaxPool", [not_soft], "erode", kernel_shape=[5, 7, 7], pads=[2, 3, 3, 2, 3, 3], strides=[1, 1, 1])
    core = g.op("Sub", [one, eroded], "core")
    weighted = g.gaussian(g.op("Mul", ["ct", soft]), (2.0, 4.0, 4.0))
    weights = g.gaussian(soft, (2.0, 4.0, 4.0))
    context = g.op("Div", [weighted, g.op("Add", [weights, g.constant(1e-3)])], "context")
    darkness = g.op("Relu", [g.op("Sub", [g.op("Sub", [context, smooth]), g.constant(DARK_OFFSET)])], "darkness")
    lesion_range = g.op("Mul", [g.sigmoid_of(smooth, -5.0, 4.0), g.sigmoid_of(smooth, 42.0, -3.0)])
    # Stage-1 stand-in: the pancreas lies in front of the kidneys. A soft limit on the
    # anterior-posterior axis (rows; +y is posterior in LPS) keeps the search there.
    rows = np.arange(HEIGHT, dtype=np.float64)
    prior = 1.0 / (1.0 + np.exp((rows - POSTERIOR_LIMIT_ROW) / 1.5))
    prior_map = g.constant(prior.reshape(1, 1, 1, HEIGHT, 1), "prior")
    raw_score = g.op("Mul", [g.op("Mul", [g.op("Mul", [darkness, core]), lesion_range]), prior_map])
    # Zero a border where the smoothing ran off the volume (2 slices, 4 voxels in-plane).
    border = [2, 4, 4]
    starts = g.int_constant(border)
    ends = g.int_constant([DEPTH - border[0], HEIGHT - border[1], WIDTH - border[2]])
    axes = g.int_constant([2, 3, 4])
    inner = g.op("Slice", [raw_score, starts, ends, axes])
    pads = g.int_constant([0, 0] + border + [0, 0] + border)
    score = g.op("Pad", [inner, pads], "score")
    g.nodes.append(
        helper.make_node("Sigmoid", [g.op("Div", [g.op("Sub", [score, g.constant(MASK_LEVEL)]), g.constant(MASK_SCALE)])], ["lesion_mask"])
    )
    peak = g.op("ReduceMax", [score], "peak", axes=[1, 2, 3, 4], keepdims=1)
    flat = g.op("Flatten", [peak], axis=1)
    logit = g.op("Div", [g.op("Sub", [flat, g.constant(PROBABILITY_LEVEL)]), g.constant(PROBABILITY_SCALE)])
    g.nodes.append(helper.make_node("Sigmoid", [logit], ["lesion_probability"]))

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
