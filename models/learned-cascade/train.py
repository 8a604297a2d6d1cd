#!/usr/bin/env python3
"""Trains learned-cascade's two networks on the screening phantom; writes weights.npz.

NOT FOR CLINICAL USE. Trained on synthetic CT only (docs/synthetic-data.md).

The data are what a run gives the model: `panscreen synth --anatomy screening` draws a
cohort and `panscreen model dataset` passes it through the production ingest and
preprocess, with the phantom's voxel truth on both grids (docs/models.md). `--prepare`
runs both, twice: a screening cohort of 400 (half with a lesion), and 200 studies with a
lesion of 9-16 mm, the first such of a cohort of lesions only (small lesions were where
the model fell short of the observer; README.md). Then, on CPU with JAX, fixed seeds
throughout:

  stage 1, locate: a small 3D U-Net on the 4 mm grid of the whole scan (pooled to 8 mm
    inside, three levels), trained on 64^3 crops for pancreas (gland and lesion) vs the
    rest, with binary cross-entropy and soft Dice;
  stage 2, detect: a small 3D U-Net on 3 x 2 x 2 mm patches of the box around the
    pancreas (one full-resolution layer, then 6 x 4 x 4 mm and 12 x 8 x 8 mm levels),
    trained on 24 x 48 x 48 crops, a third of them centred on a lesion and the rest on
    the gland (where the mimics are), for lesion vs the rest, with cross-entropy and
    soft Dice; each study's fine grid first shifted so that its gland's median is 40 HU
    (architecture.py's reference; infer takes the gland stage 1 finds).

The networks are described once, in architecture.py, and written as JAX here and as ONNX
operators in build_model.py; the two were compared on dataset tensors (README.md).

Usage:
  train.py --prepare --panscreen target/release/panscreen --work /tmp/lc   # data, then train
  train.py --dataset /tmp/lc/dataset,/tmp/lc/small-lesion-dataset [--out models/learned-cascade/weights.npz]
  train.py --dataset D --time-steps 20                                      # time 20 steps, write nothing
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from architecture import DETECT, LEAK, LOCATE, WINDOW_HU, shapes  # noqa: E402  (shared with build_model.py)

# The diameters (mm) of the lesions added to the training data (low inclusive).
SMALL_LESION_MM = (9.0, 16.0)

# --------------------------------------------------------------------------- networks


def conv(x, w, b):
    """3D convolution, 'same' zero padding, stride 1; NCDHW, OIDHW."""
    pad = [(k // 2, k // 2) for k in w.shape[2:]]
    y = lax.conv_general_dilated(x, w, (1, 1, 1), pad, dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
    return y + b.reshape(1, -1, 1, 1, 1)


def max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2, 2), (1, 1, 2, 2, 2), "VALID")


def avg_pool(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2, 2), (1, 1, 2, 2, 2), "VALID") / 8.0


def up(x):
    """Nearest-neighbour upsampling by 2 (ONNX Resize: nearest, asymmetric, floor)."""
    return jnp.repeat(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3), 2, axis=4)


def act(x):
    """Leaky ReLU: a unit pushed below zero early in training still learns."""
    return jnp.where(x >= 0, x, LEAK * x)


def unet(params, spec, ct):
    """The shared U-Net of both stages (see architecture.py): returns logits."""
    x = (jnp.clip(ct, *WINDOW_HU) - spec["shift"]) * spec["scale"]
    if spec["stem"] == "avg_pool":
        x = avg_pool(x)
    else:
        x = max_pool(act(conv(x, params["stem_w"], params["stem_b"])))
    skips = []
    for level, _ in enumerate(spec["encoder"]):
        for layer in range(2):
            name = f"enc{level}_{layer}"
            x = act(conv(x, params[name + "_w"], params[name + "_b"]))
        if level < len(spec["encoder"]) - 1:
            skips.append(x)
            x = max_pool(x)
    for level in reversed(range(len(spec["decoder"]))):
        x = jnp.concatenate([up(x), skips[level]], axis=1)
        name = f"dec{level}"
        x = act(conv(x, params[name + "_w"], params[name + "_b"]))
    logits = conv(x, params["head_w"], params["head_b"])
    for _ in range(spec["head_up"]):
        logits = up(logits)
    return logits


def tempered_logits(params, spec, ct, ones):
    """Stage 2's exported score before its sigmoid (build_model.py): the logits averaged
    over `mask_pool` voxels (padding not counted; `ones` is an array of ones shaped like
    `ct`, passed in so that XLA does not fold the count as a constant), divided by
    `mask_temperature`."""
    logits = unet(params, spec, ct)
    window = (1, 1, *spec["mask_pool"])
    pads = [(0, 0), (0, 0)] + [(k // 2, k // 2) for k in spec["mask_pool"]]
    total = lax.reduce_window(logits, 0.0, lax.add, window, (1, 1, 1, 1, 1), pads)
    count = lax.reduce_window(ones, 0.0, lax.add, window, (1, 1, 1, 1, 1), pads)
    return total / count / spec["mask_temperature"]


def init(spec, key):
    """He-normal weights, zero biases; the shapes architecture.py lists."""
    params = {}
    for name, shape in sorted(shapes(spec).items()):
        key, sub = jax.random.split(key)
        if name.endswith("_w"):
            fan_in = int(np.prod(shape[1:]))
            params[name] = jax.random.normal(sub, shape) * np.sqrt(2.0 / fan_in)
        else:
            params[name] = jnp.zeros(shape)
    # The head starts at the prior of a rare class, so the first steps are not spent on it.
    params["head_b"] = jnp.full(params["head_b"].shape, spec["head_bias"])
    return params


# --------------------------------------------------------------------------- losses


def loss_fn(params, spec, ct, target, positive_weight):
    logits = unet(params, spec, ct)
    probability = jax.nn.sigmoid(logits)
    bce = positive_weight * target * jax.nn.softplus(-logits) + (1 - target) * jax.nn.softplus(logits)
    intersection = jnp.sum(probability * target)
    dice = 1.0 - (2.0 * intersection + 1.0) / (jnp.sum(probability) + jnp.sum(target) + 1.0)
    return jnp.mean(bce) + dice


def adam(params, grads, state, step, lr):
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = state
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    t = step + 1
    params = jax.tree_util.tree_map(
        lambda p, m, v: p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps), params, m, v
    )
    return params, (m, v)


def make_step(spec, positive_weight):
    grad = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state, ct, target, index, lr):
        loss, grads = grad(params, spec, ct, target, positive_weight)
        params, state = adam(params, grads, state, index, lr)
        return params, state, loss

    return step


# --------------------------------------------------------------------------- data


def load(datasets):
    """The studies of each dataset in turn, each dataset's in study order."""
    return [study for dataset in datasets for study in load_one(dataset)]


def load_one(dataset):
    studies = [json.loads(line) for line in open(os.path.join(dataset, "dataset.jsonl"))]
    studies.sort(key=lambda s: s["study_dir"])
    for study in studies:
        name = study["study_dir"]
        study["coarse"] = np.load(os.path.join(dataset, "coarse", name + ".npy"))
        study["coarse_labels"] = np.load(os.path.join(dataset, "coarse", name + ".labels.npy"))
        study["fine"] = np.load(os.path.join(dataset, "fine", name + ".npy"))
        study["fine_labels"] = np.load(os.path.join(dataset, "fine", name + ".labels.npy"))
        study["fine"] = relative(study["fine"], study["fine_labels"] > 0, DETECT["reference"])
    return studies


def relative(fine, gland, reference):
    """The fine grid shifted so that the median of the `gland` voxels within the
    reference's range is its `median_hu` (numpy's median, as infer takes it)."""
    low, high = reference["range_hu"]
    values = fine[gland]
    values = values[(values >= low) & (values <= high)]
    median = float(np.median(values)) if values.size else reference["median_hu"]
    return fine.astype(np.float32) + np.float32(reference["median_hu"] - median)


def cut(volume, start, size, fill):
    """volume[start:start+size] with `fill` where the box leaves the volume."""
    out = np.full(size, fill, dtype=np.float32)
    src = [slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, volume.shape)]
    dst = [slice(a.start - s, a.stop - s) for a, s in zip(src, start)]
    out[tuple(dst)] = volume[tuple(src)]
    return out


def sample(rng, studies, batch, size, volume_key, labels_key, positive, focus_p, fill, anchor=None):
    """`batch` crops of `size`: with probability `focus_p` centred near a voxel of
    `positive` labels (when the study has one), else near a voxel of `anchor` labels
    (when given: where the model will be asked, and where the mimics are), else
    anywhere in the volume."""
    cts, targets = [], []
    for _ in range(batch):
        study = studies[rng.integers(len(studies))]
        volume, labels = study[volume_key], study[labels_key]
        wanted = np.isin(labels, positive)
        jitter = [rng.integers(-(k // 4), k // 4 + 1) for k in size]
        if rng.random() < focus_p and wanted.any():
            voxels = np.argwhere(wanted)
            centre = voxels[rng.integers(len(voxels))] + jitter
        elif anchor is not None:
            voxels = np.argwhere(np.isin(labels, anchor))
            centre = voxels[rng.integers(len(voxels))] + jitter
        else:
            centre = [rng.integers(0, n) for n in volume.shape]
        start = [int(c) - k // 2 for c, k in zip(centre, size)]
        cts.append(cut(volume.astype(np.float32), start, size, fill))
        targets.append(cut(wanted.astype(np.float32), start, size, 0.0))
    return np.stack(cts)[:, None], np.stack(targets)[:, None]


# --------------------------------------------------------------------------- training


def train(spec, studies, steps, batch, crop, volume_key, labels_key, positive, focus_p, fill, seed, lr_max, positive_weight, label, time_only=False, anchor=None):
    rng = np.random.default_rng(seed)
    params = init(spec, jax.random.PRNGKey(seed))
    state = (jax.tree_util.tree_map(jnp.zeros_like, params), jax.tree_util.tree_map(jnp.zeros_like, params))
    step = make_step(spec, positive_weight)
    started = time.time()
    losses = []
    for index in range(steps):
        lr = lr_max * 0.5 * (1 + np.cos(np.pi * index / steps)) if index > 20 else lr_max * (index + 1) / 21
        ct, target = sample(rng, studies, batch, crop, volume_key, labels_key, positive, focus_p, fill, anchor)
        params, state, loss = step(params, state, jnp.asarray(ct), jnp.asarray(target), index, lr)
        losses.append(float(loss))
        if index == 0:
            compiled = time.time()
        if (index + 1) % 50 == 0 or index + 1 == steps:
            print(f"{label} step {index + 1}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - started:.0f} s)", flush=True)
    per_step = (time.time() - compiled) / max(1, steps - 1)
    print(f"{label}: {per_step:.2f} s a step after compiling ({compiled - started:.0f} s)", flush=True)
    if time_only:
        return None
    return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}


def synth(panscreen, cohort, studies, seed, prevalence, *extra):
    subprocess.run([panscreen, "synth", "--out", cohort, "--studies", str(studies), "--seed", str(seed),
                    "--prevalence", str(prevalence), "--anatomy", "screening", *extra],
                   check=True, stdout=subprocess.DEVNULL)


def dataset_of(panscreen, cohort, dataset):
    subprocess.run([panscreen, "model", "dataset", "--cohort", cohort, "--model", HERE, "--out", dataset],
                   check=True, stdout=subprocess.DEVNULL)


def first_studies(cohort, subset, count):
    """A cohort of the first `count` studies (by index) of `cohort`: their folders
    linked, their rows of labels.parquet."""
    import pyarrow.parquet as pq

    labels = pq.read_table(os.path.join(cohort, "labels.parquet")).sort_by("study_index")
    if labels.num_rows < count:
        sys.exit(f"{cohort} holds {labels.num_rows} studies; {count} wanted (draw more)")
    chosen = labels.slice(0, count)
    os.makedirs(os.path.join(subset, "studies"))
    for name in chosen["study_dir"].to_pylist():
        os.symlink(os.path.join(cohort, "studies", name), os.path.join(subset, "studies", name))
    pq.write_table(chosen, os.path.join(subset, "labels.parquet"))
    shutil.copy(os.path.join(cohort, "cohort.json"), subset)


def prepare(panscreen, work, args):
    """The recipe's data, through the production ingest and preprocess: a screening
    cohort, and studies with a small lesion (9-16 mm, where the model's gap was) drawn
    from a cohort of lesions only. The DICOM is removed once the tensors are written."""
    base, extra = os.path.join(work, "cohort"), os.path.join(work, "small-lesion-cohort")
    datasets = [os.path.join(work, "dataset")]
    synth(panscreen, base, args.studies, args.cohort_seed, 0.5)
    dataset_of(panscreen, base, datasets[0])
    shutil.rmtree(os.path.join(base, "studies"))
    if args.small_lesion_studies:
        datasets.append(os.path.join(work, "small-lesion-dataset"))
        low, high = SMALL_LESION_MM
        synth(panscreen, extra, args.small_lesion_draw, args.small_lesion_seed, 1.0, "--only-lesions-mm", f"{low}..{high}")
        subset = os.path.join(work, "small-lesion-subset")
        first_studies(extra, subset, args.small_lesion_studies)
        dataset_of(panscreen, subset, datasets[1])
        shutil.rmtree(os.path.join(extra, "studies"))
        shutil.rmtree(os.path.join(subset, "studies"))
    return datasets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="dataset directories, comma-separated (studies taken in this order)")
    parser.add_argument("--prepare", action="store_true", help="draw the cohort and write the dataset first")
    parser.add_argument("--panscreen", default="panscreen")
    parser.add_argument("--work", default="/tmp/learned-cascade")
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--cohort-seed", type=int, default=101)
    parser.add_argument("--small-lesion-studies", type=int, default=200, help="studies with a small lesion added (0: none)")
    parser.add_argument("--small-lesion-draw", type=int, default=1200, help="drawn for them: a cohort of lesions only, of which those of 9-16 mm are written")
    parser.add_argument("--small-lesion-seed", type=int, default=111)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--locate-steps", type=int, default=700)
    parser.add_argument("--detect-steps", type=int, default=2000)
    parser.add_argument("--time-steps", type=int, help="time this many steps of each stage; write nothing")
    parser.add_argument("--stages", default="locate,detect", help="train only these (the others' weights are left out)")
    parser.add_argument("--out", default=os.path.join(HERE, "weights.npz"))
    args = parser.parse_args()
    started = time.time()
    if args.prepare:
        datasets = prepare(args.panscreen, args.work, args)
    elif args.dataset:
        datasets = args.dataset.split(",")
    else:
        parser.error("give --dataset or --prepare")
    studies = load(datasets)
    print(f"{len(studies)} studies loaded ({time.time() - started:.0f} s)", flush=True)
    timing = args.time_steps is not None
    locate_steps = args.time_steps or args.locate_steps
    detect_steps = args.time_steps or args.detect_steps
    weights = {}
    stages = args.stages.split(",")
    if "locate" in stages:
        locate = train(LOCATE, studies, locate_steps, LOCATE["batch"], LOCATE["crop"], "coarse", "coarse_labels",
                       (1, 2), 0.7, WINDOW_HU[0], args.seed, LOCATE["lr"], LOCATE["positive_weight"], "locate", timing)
        weights.update({f"locate/{k}": v for k, v in (locate or {}).items()})
    if "detect" in stages:
        detect = train(DETECT, studies, detect_steps, DETECT["batch"], DETECT["crop"], "fine", "fine_labels", (2,),
                       DETECT["focus"], -1000.0, args.seed + 1, DETECT["lr"], DETECT["positive_weight"], "detect", timing,
                       anchor=(1, 2))
        weights.update({f"detect/{k}": v for k, v in (detect or {}).items()})
    if timing:
        return 0
    np.savez(args.out, **dict(sorted(weights.items())))
    print(f"wrote {args.out} ({sum(v.size for v in weights.values())} weights) in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
