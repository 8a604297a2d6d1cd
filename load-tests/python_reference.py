#!/usr/bin/env python3
"""The Python reference for panscreen's volume path, per study: read every slice with
pydicom, sort along the slice normal, convert to HU, resample to the model grid
(3.0 x 2.5 x 2.5 mm, linear, scipy.ndimage.zoom), and crop 48 x 128 x 128 at the
centre. This is what a radiology lab would write with pydicom + scipy.

Usage: python_reference.py STUDIES_DIR [--limit N]
Prints seconds per study and the peak RSS of this process."""

import argparse
import os
import resource
import sys
import time

import numpy as np
import pydicom
from scipy import ndimage

TARGET_SPACING = (3.0, 2.5, 2.5)
SHAPE = (48, 128, 128)


def load_volume(series_dir):
    slices = [pydicom.dcmread(os.path.join(series_dir, name)) for name in os.listdir(series_dir)]
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    slices.sort(key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, dtype=float))))
    volume = np.stack([s.pixel_array.astype(np.float32) * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])
    positions = [float(np.dot(normal, np.array(s.ImagePositionPatient, dtype=float))) for s in slices]
    spacing = (float(np.median(np.diff(positions))), float(slices[0].PixelSpacing[0]), float(slices[0].PixelSpacing[1]))
    return volume, spacing


def preprocess(volume, spacing):
    zoom = [s / t for s, t in zip(spacing, TARGET_SPACING)]
    resampled = ndimage.zoom(volume, zoom, order=1)
    out = np.full(SHAPE, -1000.0, dtype=np.float32)
    starts = [(have - want) // 2 for have, want in zip(resampled.shape, SHAPE)]
    src = tuple(slice(max(s, 0), max(s, 0) + min(h, w)) for s, h, w in zip(starts, resampled.shape, SHAPE))
    dst = tuple(slice(max(-s, 0), max(-s, 0) + min(h, w)) for s, h, w in zip(starts, resampled.shape, SHAPE))
    out[dst] = resampled[src]
    return np.clip(out, -200.0, 300.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("studies")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    series_dirs = sorted(
        os.path.join(root, d) for root, dirs, _ in os.walk(args.studies) for d in dirs if d.startswith("series-")
    )[: args.limit]
    started = time.perf_counter()
    for series_dir in series_dirs:
        preprocess(*load_volume(series_dir))
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"python reference: {len(series_dirs)} studies in {elapsed:.2f} s, {elapsed / len(series_dirs):.3f} s/study, peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
