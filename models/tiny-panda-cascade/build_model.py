#!/usr/bin/env python3
"""Writes locate.onnx and detect.onnx: a hand-designed two-stage cascade for panscreen.

NOT FOR CLINICAL USE. Not trained on patient data, not validated. Its weights are set
by reasoning about the anatomy of panscreen's synthetic phantom (docs/synthetic-data.md),
not learned; it exists so that the cascade's whole path (a coarse whole-scan stage that
finds the pancreas, a box cut from a finer grid, overlapping patches blended back) runs
end to end with real ONNX models, and as the baseline a learned model must beat.

Stage 1, `locate.onnx`, on a coarse grid of the whole scan (4 mm, 112 x 96 x 96 voxels):
  Input  `ct`:       [N, 1, 112, 96, 96] float32, HU clipped to [-200, 300]
  Output `pancreas`: [N, 2, 112, 96, 96] float32 probabilities (background, pancreas)
  1. smooth  = Gaussian(ct, sigma 0.7 voxel)
  2. band    = sigmoid(smooth / 3) * sigmoid((50 - smooth) / 2)  pancreatic HU, a
               hypodense lesion's included (liver and spleen are brighter, fat darker)
  3. core    = 1 - MaxPool(1 - band, 3 x 3 x 3)                         erosion: drops the
               one-voxel shells that partial volume leaves around organs of other HU
  4. bone    = the vertebral body's centre: sigmoid((ct - 150) / 5), eroded 8 mm in-plane
               (steep: soft tissue must add nothing to the box sums below)
  5. behind  = box sums of `bone` over where the pancreas lies from the spine's centre:
               48-100 mm in front of it, from 55 mm to its right to 45 mm to its left,
               and for the tail, 25-100 mm in front, 45-90 mm to its left (separable
               box filters)
  6. big     = large organs of 0-60 HU (spleen, liver, kidneys): eroded by a 28 mm cube,
               which no part of the pancreas holds, then grown by 28 mm each way
  7. pancreas = MaxPool(core * sigmoid((behind - 0.5) / 0.1) * (1 - big), 3 x 3 x 3)
               (the erosion of step 3 grown back)

Stage 2, `detect.onnx`, on patches of the box around the pancreas (3 x 2 x 2 mm,
32 x 64 x 64 voxels; panscreen covers the box with patches that overlap by half):
  Input  `ct`:                 [N, 1, 32, 64, 64] float32, HU clipped to [-200, 300]
  Output `lesion_probability`: [N, 1]
  Output `lesion_mask`:        [N, 1, 32, 64, 64]
  tiny-panda's detector (models/tiny-panda/build_model.py) on the patch, without its
  stand-in for a first stage (a fixed limit on the anterior-posterior axis): a region
  darker than the soft tissue around it, in the range of a hypodense lesion on plain CT,
  away from fat, air and bone.

Usage: build_model.py [--out DIR]   (writes IR version 8, opset 17: ONNX Runtime 1.31 reads it)
"""

import argparse
import hashlib
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from onnx_graph import Graph, hypodense_detector  # noqa: E402  (models/onnx_graph.py)

LOCATE_SHAPE = (112, 96, 96)
LOCATE_MM = 4.0
DETECT_SHAPE = (32, 64, 64)
DARK_OFFSET = 3.0
MASK_LEVEL, MASK_SCALE = 2.5, 0.5


def offset_box(low_mm: float, high_mm: float, voxel_mm: float) -> np.ndarray:
    """A centred 1D kernel (for ONNX Conv, a correlation: out[i] = sum_j w[j] in[i + j - r])
    that sums the input at the voxels the output lies [low, high] mm after."""
    reach = int(math.ceil(max(abs(low_mm), abs(high_mm)) / voxel_mm))
    kernel = np.zeros(2 * reach + 1, dtype=np.float32)
    for j in range(2 * reach + 1):
        # Output i reads input i + (j - reach): the input lies (j - reach) voxels after
        # the output, i.e. the output lies (reach - j) * voxel mm after the input.
        offset = (reach - j) * voxel_mm
        if low_mm <= offset <= high_mm:
            kernel[j] = 1.0
    return kernel


def model(g, name, inputs, outputs, doc):
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="panscreen models/tiny-panda-cascade/build_model.py",
        doc_string=doc,
    )
    proto.ir_version = 8  # ONNX Runtime 1.31 reads IR <= 13; recent onnx writes 14 by default
    onnx.checker.check_model(proto)
    return proto


def build_locate() -> onnx.ModelProto:
    g = Graph()
    smooth = g.gaussian("ct", (0.7, 0.7, 0.7))
    band = g.op("Mul", [g.sigmoid_of(smooth, 0.0, 3.0), g.sigmoid_of(smooth, 50.0, -2.0)], "band")
    one = g.constant(1.0, "one")
    core = g.op("Sub", [one, g.max_pool(g.op("Sub", [one, band]), (3, 3, 3))], "core")
    # The vertebral body's centre: bone eroded in-plane by 8 mm.
    bone = g.sigmoid_of("ct", 150.0, 5.0)
    not_bone = g.op("Sub", [one, bone])
    bone = g.op("Sub", [one, g.op("MaxPool", [not_bone], "erode", kernel_shape=[1, 5, 5], pads=[0, 2, 2, 0, 2, 2], strides=[1, 1, 1])])
    # Large organs of soft-tissue HU (spleen, liver, kidneys): what is left of 0-60 HU
    # after an erosion by a 28 mm cube (12 mm each way), which no part of the pancreas
    # holds (its section is at most 36 mm across; the cube's diagonal is 40 mm), grown by
    # 28 mm each way. The tail of the pancreas touches the spleen, whose HU overlaps its own.
    wide = g.op("Mul", [g.sigmoid_of(smooth, 0.0, 3.0), g.sigmoid_of(smooth, 60.0, -2.0)], "wide")
    big = g.op("Sub", [one, g.max_pool_separable(g.op("Sub", [one, wide]), 7)], "big")
    near_big = g.max_pool_separable(big, 15)
    # Where the pancreas lies from the spine, in the tensor's axes (height +y: toward
    # the back; width +x: toward the patient's left). A voxel is "in front of the
    # spine" when bone lies 45-95 mm behind it: the bone is at larger y, so the output
    # lies (y_out - y_bone) = -95..-45 mm from it.
    regions = [
        # (height mm from the spine's centre, width mm from it)
        ((-100.0, -48.0), (-55.0, 45.0)),  # head and body, clear of the aorta and vena cava
        ((-100.0, -25.0), (45.0, 80.0)),   # the tail bends back toward the spleen
    ]
    behind = None
    for (y_low, y_high), (x_low, x_high) in regions:
        along_y = g.conv_axis(bone, offset_box(y_low, y_high, LOCATE_MM), 1)
        both = g.conv_axis(along_y, offset_box(x_low, x_high, LOCATE_MM), 2)
        behind = both if behind is None else g.op("Add", [behind, both])
    near_spine = g.sigmoid_of(behind, 0.5, 0.1)
    candidate = g.op("Mul", [g.op("Mul", [core, near_spine]), g.op("Sub", [one, near_big])])
    pancreas = g.max_pool(candidate, (3, 3, 3))
    background = g.op("Sub", [one, pancreas])
    g.nodes.append(helper.make_node("Concat", [background, pancreas], ["pancreas"], axis=1))
    shape = ["N", 1, *LOCATE_SHAPE]
    return model(
        g,
        "tiny_panda_locate",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("pancreas", TensorProto.FLOAT, ["N", 2, *LOCATE_SHAPE])],
        "tiny-panda-cascade stage 1 (locate): hand-designed. NOT FOR CLINICAL USE.",
    )


def build_detect() -> onnx.ModelProto:
    g = Graph()
    # Without tiny-panda's front-back limit: the box is around the pancreas already.
    hypodense_detector(g, DETECT_SHAPE, None, DARK_OFFSET, MASK_LEVEL, MASK_SCALE)
    shape = ["N", 1, *DETECT_SHAPE]
    return model(
        g,
        "tiny_panda_detect",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("lesion_probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("lesion_mask", TensorProto.FLOAT, shape),
        ],
        "tiny-panda-cascade stage 2 (detect): hand-designed. NOT FOR CLINICAL USE.",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    for name, proto in (("locate.onnx", build_locate()), ("detect.onnx", build_detect())):
        data = proto.SerializeToString(deterministic=True)
        path = os.path.join(args.out, name)
        with open(path, "wb") as handle:
            handle.write(data)
        print(f"{path} sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
