#!/usr/bin/env python3
"""Writes locate.onnx and detect.onnx from weights.npz: learned-cascade for panscreen.

NOT FOR CLINICAL USE. Trained on synthetic CT only (train.py, docs/synthetic-data.md).

Needs numpy and onnx only (no training framework): the networks of architecture.py,
written as ONNX operators with the trained weights, IR version 8 and opset 17 (ONNX
Runtime 1.31 reads IR <= 13). Node and initializer names are fixed, so the same weights
give the same bytes; `cargo xtask test` checks the committed files against a fresh build.

Stage 1, `locate.onnx`:
  Input  `ct`:       [N, 1, 112, 96, 96] float32, HU (4 mm grid of the whole scan)
  Output `pancreas`: [N, 2, 112, 96, 96] float32 probabilities (background, pancreas)
Stage 2, `detect.onnx`:
  Input  `ct`:                 [N, 1, 32, 64, 64] float32, HU (3 x 2 x 2 mm patch)
  Output `lesion_mask`:        [N, 1, 32, 64, 64] lesion score per voxel: the logits
                               averaged over 3 x 5 x 5 voxels, / 4, through a sigmoid
  Output `lesion_probability`: [N, 1] the patch's highest voxel

Usage: build_model.py [--weights weights.npz] [--out DIR]
"""

import argparse
import hashlib
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from architecture import DETECT, LEAK, LOCATE, WINDOW_HU, shapes  # noqa: E402

LOCATE_SHAPE = (112, 96, 96)
DETECT_SHAPE = (32, 64, 64)


class Builder:
    def __init__(self, prefix, weights):
        self.prefix, self.weights = prefix, weights
        self.nodes, self.initializers, self.counter = [], [], 0

    def name(self, kind):
        self.counter += 1
        return f"{kind}_{self.counter}"

    def constant(self, value, dtype=np.float32):
        name = self.name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, name, shape):
        value = self.weights[f"{self.prefix}/{name}"]
        assert value.shape == tuple(shape), f"{self.prefix}/{name}: {value.shape} != {shape}"
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), f"{self.prefix}_{name}"))
        return f"{self.prefix}_{name}"

    def op(self, op_type, inputs, output=None, **attributes):
        output = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def conv(self, x, name, shape, relu=True):
        kernel = list(shape[2:])
        pads = [k // 2 for k in kernel] * 2
        y = self.op("Conv", [x, self.weight(name + "_w", shape), self.weight(name + "_b", shape[:1])],
                    kernel_shape=kernel, pads=pads)
        return self.op("LeakyRelu", [y], alpha=LEAK) if relu else y

    def pool(self, x, kind):
        return self.op(kind, [x], kernel_shape=[2, 2, 2], strides=[2, 2, 2])

    def up(self, x):
        scales = self.constant([1.0, 1.0, 2.0, 2.0, 2.0])
        return self.op("Resize", [x, "", scales], mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def unet(b, spec):
    """The network of architecture.py on input `ct`; returns the logits' name."""
    sizes = shapes(spec)
    low, high = b.constant(WINDOW_HU[0]), b.constant(WINDOW_HU[1])
    x = b.op("Clip", ["ct", low, high])
    x = b.op("Mul", [b.op("Sub", [x, b.constant(spec["shift"])]), b.constant(spec["scale"])])
    if spec["stem"] == "avg_pool":
        x = b.pool(x, "AveragePool")
    else:
        x = b.pool(b.conv(x, "stem", sizes["stem_w"]), "MaxPool")
    skips = []
    for level in range(len(spec["encoder"])):
        for layer in range(2):
            name = f"enc{level}_{layer}"
            x = b.conv(x, name, sizes[name + "_w"])
        if level < len(spec["encoder"]) - 1:
            skips.append(x)
            x = b.pool(x, "MaxPool")
    for level in reversed(range(len(spec["decoder"]))):
        x = b.op("Concat", [b.up(x), skips[level]], axis=1)
        x = b.conv(x, f"dec{level}", sizes[f"dec{level}_w"])
    logits = b.conv(x, "head", sizes["head_w"], relu=False)
    for _ in range(spec["head_up"]):
        logits = b.up(logits)
    return logits


def model(b, name, inputs, outputs, doc):
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="panscreen models/learned-cascade/build_model.py",
        doc_string=doc,
    )
    proto.ir_version = 8  # ONNX Runtime 1.31 reads IR <= 13; recent onnx writes 14 by default
    onnx.checker.check_model(proto)
    return proto


def build_locate(weights):
    b = Builder("locate", weights)
    pancreas = b.op("Sigmoid", [unet(b, LOCATE)])
    background = b.op("Sub", [b.constant(1.0), pancreas])
    b.op("Concat", [background, pancreas], output="pancreas", axis=1)
    shape = ["N", 1, *LOCATE_SHAPE]
    return model(
        b,
        "learned_cascade_locate",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("pancreas", TensorProto.FLOAT, ["N", 2, *LOCATE_SHAPE])],
        "learned-cascade stage 1 (locate): trained on synthetic CT. NOT FOR CLINICAL USE.",
    )


def build_detect(weights):
    b = Builder("detect", weights)
    # The logits are averaged over 9 x 10 x 10 mm (3 x 5 x 5 voxels), so a lone voxel the
    # network calls lesion weighs less than a lesion-sized group, then tempered (see
    # architecture.py) and squashed.
    pool = list(DETECT["mask_pool"])
    pooled = b.op("AveragePool", [unet(b, DETECT)], kernel_shape=pool, pads=[k // 2 for k in pool] * 2,
                  strides=[1, 1, 1])
    tempered = b.op("Mul", [pooled, b.constant(1.0 / DETECT["mask_temperature"])])
    b.op("Sigmoid", [tempered], output="lesion_mask")
    peak = b.op("ReduceMax", ["lesion_mask"], axes=[1, 2, 3, 4], keepdims=1)
    b.op("Flatten", [peak], output="lesion_probability", axis=1)
    shape = ["N", 1, *DETECT_SHAPE]
    return model(
        b,
        "learned_cascade_detect",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("lesion_probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("lesion_mask", TensorProto.FLOAT, shape),
        ],
        "learned-cascade stage 2 (detect): trained on synthetic CT. NOT FOR CLINICAL USE.",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=os.path.join(HERE, "weights.npz"))
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args()
    with np.load(args.weights) as stored:
        weights = {name: stored[name] for name in stored.files}
    for name, proto in (("locate.onnx", build_locate(weights)), ("detect.onnx", build_detect(weights))):
        data = proto.SerializeToString(deterministic=True)
        path = os.path.join(args.out, name)
        with open(path, "wb") as handle:
            handle.write(data)
        print(f"{path} sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
