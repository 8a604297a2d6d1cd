"""The small graph builder the hand-designed models' build_model.py scripts share.

Node and initializer names are a prefix and a running number, so a script that builds
the same graph writes the same bytes (`cargo xtask test` checks that it does).
"""

import math

import numpy as np
from onnx import helper, numpy_helper


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

    def conv_axis(self, x, kernel, axis):
        """A 1D kernel along one axis (0 depth, 1 height, 2 width), centred, zero padding."""
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        weight = self.constant(np.asarray(kernel, dtype=np.float32).reshape(shape), "w")
        pads = [0, 0, 0, 0, 0, 0]
        pads[axis] = pads[axis + 3] = len(kernel) // 2
        return self.op("Conv", [x, weight], "conv", pads=pads, kernel_shape=shape[2:])

    def max_pool_separable(self, x, size):
        """A cubic max pool of `size` voxels, as three 1D pools."""
        for axis in range(3):
            kernel = [1, 1, 1]
            kernel[axis] = size
            pads = [0, 0, 0, 0, 0, 0]
            pads[axis] = pads[axis + 3] = size // 2
            x = self.op("MaxPool", [x], "pool", kernel_shape=kernel, pads=pads, strides=[1, 1, 1])
        return x

    def max_pool(self, x, size):
        pads = [s // 2 for s in size] * 2
        return self.op("MaxPool", [x], "pool", kernel_shape=list(size), pads=pads, strides=[1, 1, 1])


def hypodense_detector(g, shape, prior=None, dark_offset=3.0, level=2.5, scale=0.5):
    """tiny-panda's detector on `ct` of `shape` (depth, height, width), HU: how much
    darker than the soft tissue around it each voxel is, in the HU range of a hypodense
    lesion on plain CT, away from fat, air and bone; optionally weighted by `prior`
    (an array broadcast over the volume). Appends the outputs `lesion_mask` and
    `lesion_probability` (sigmoid((peak - level) / scale))."""
    depth, height, width = shape
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
    darkness = g.op("Relu", [g.op("Sub", [g.op("Sub", [context, smooth]), g.constant(dark_offset)])], "darkness")
    lesion_range = g.op("Mul", [g.sigmoid_of(smooth, -5.0, 4.0), g.sigmoid_of(smooth, 42.0, -3.0)])
    if prior is None:
        raw_score = g.op("Mul", [g.op("Mul", [darkness, core]), lesion_range])
    else:
        prior_map = g.constant(prior, "prior")
        raw_score = g.op("Mul", [g.op("Mul", [g.op("Mul", [darkness, core]), lesion_range]), prior_map])
    # Zero a border where the smoothing ran off the volume (2 slices, 4 voxels in-plane).
    border = [2, 4, 4]
    starts = g.int_constant(border)
    ends = g.int_constant([depth - border[0], height - border[1], width - border[2]])
    axes = g.int_constant([2, 3, 4])
    inner = g.op("Slice", [raw_score, starts, ends, axes])
    pads = g.int_constant([0, 0] + border + [0, 0] + border)
    score = g.op("Pad", [inner, pads], "score")
    g.nodes.append(
        helper.make_node("Sigmoid", [g.op("Div", [g.op("Sub", [score, g.constant(level)]), g.constant(scale)])], ["lesion_mask"])
    )
    peak = g.op("ReduceMax", [score], "peak", axes=[1, 2, 3, 4], keepdims=1)
    flat = g.op("Flatten", [peak], axis=1)
    logit = g.op("Div", [g.op("Sub", [flat, g.constant(level)]), g.constant(scale)])
    g.nodes.append(helper.make_node("Sigmoid", [logit], ["lesion_probability"]))
