"""learned-cascade's two networks, as data: train.py (JAX) and build_model.py (ONNX) both
read this, so the network trained is the network exported.

Both are small 3D U-Nets: `stem` brings the input to the first level (`avg_pool`: a
2 x 2 x 2 average, no weights; `conv_pool`: one 3^3 convolution with `stem_channels`
filters and a leaky ReLU at full resolution, then a 2 x 2 x 2 max pool); each `encoder` level
is two 3^3 convolutions with a leaky ReLU, levels joined by 2 x 2 x 2 max pools; each `decoder`
level upsamples by 2 (nearest), concatenates the encoder level's output and applies one
3^3 convolution with a leaky ReLU; a 1^3 `head` gives one logit, upsampled `head_up` times by 2
(nearest) to the input's grid. The input is clipped to WINDOW_HU, shifted by `shift`
and scaled by `scale` inside the network.
"""

WINDOW_HU = (-200.0, 300.0)
# Every convolution but the head is followed by a leaky ReLU of this slope.
LEAK = 0.1

# Stage 1: the 4 mm grid of the whole scan (112 x 96 x 96), working at 8, 16, 32 mm.
LOCATE = {
    "stem": "avg_pool",
    "encoder": [8, 16, 32],
    "decoder": [8, 16],
    "head_up": 1,
    "head_bias": -3.0,
    "shift": 50.0,
    "scale": 0.01,
    "crop": (64, 64, 64),
    "batch": 4,
    "lr": 1e-3,
    "positive_weight": 5.0,
}

# Stage 2: patches of 32 x 64 x 64 at 3 x 2 x 2 mm, working at 6 x 4 x 4 and 12 x 8 x 8 mm
# after one full-resolution layer.
DETECT = {
    "stem": "conv_pool",
    "stem_channels": 8,
    "encoder": [16, 32],
    "decoder": [16],
    "head_up": 1,
    "head_bias": -4.0,
    "shift": 50.0,
    "scale": 0.01,
    "crop": (24, 48, 48),
    "batch": 8,
    "lr": 3e-3,
    "positive_weight": 1.0,
    # A third of the crops centred on a lesion, the rest on the gland (mimics beside it).
    "focus": 0.35,
    # Export only (build_model.py): the lesion map is the logits averaged over 3 x 5 x 5
    # voxels, divided by this, through a sigmoid; float32 then reaches 1.0 only past a
    # pooled logit of about 66 instead of 17, so the most lesion-like studies keep their
    # order instead of tying at 1.0.
    "mask_pool": (3, 5, 5),
    "mask_temperature": 4.0,
    # The crop is shifted so that the gland's median HU (its voxels within range_hu) is
    # median_hu: glands differ by tens of HU between patients and sites, a lesion is a
    # few HU below its own gland. Training takes the gland from the phantom's truth, infer
    # from stage 1 (manifest.toml's input.intensity.reference).
    "reference": {"range_hu": (-30.0, 120.0), "median_hu": 40.0},
}


def shapes(spec):
    """Name -> shape of every weight and bias, in the order the network uses them."""
    out = {}
    channels = 1
    if spec["stem"] == "conv_pool":
        out["stem_w"] = (spec["stem_channels"], 1, 3, 3, 3)
        out["stem_b"] = (spec["stem_channels"],)
        channels = spec["stem_channels"]
    widths = []
    for level, width in enumerate(spec["encoder"]):
        for layer in range(2):
            out[f"enc{level}_{layer}_w"] = (width, channels, 3, 3, 3)
            out[f"enc{level}_{layer}_b"] = (width,)
            channels = width
        widths.append(width)
    assert len(spec["decoder"]) == len(spec["encoder"]) - 1
    for level in reversed(range(len(spec["decoder"]))):
        width = spec["decoder"][level]
        out[f"dec{level}_w"] = (width, channels + widths[level], 3, 3, 3)
        out[f"dec{level}_b"] = (width,)
        channels = width
    out["head_w"] = (1, channels, 1, 1, 1)
    out["head_b"] = (1,)
    return out
