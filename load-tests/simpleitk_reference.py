#!/usr/bin/env python3
"""SimpleITK's volume path, per study, as an imaging lab would write it: read the
series with ImageSeriesReader (GDCM underneath; it sorts the slices and applies the
rescale), then Resample onto the same grid as panscreen's first model (by default the
cascade's stage 1: 112 x 96 x 96 at 4 mm, the whole scan; `--grid 48,128,128 --spacing
3,2.5,2.5` for tiny-panda's), centred on the scanned volume, linear interpolation, fill
-1000 HU, and clip to the window. Linear interpolation does not average over a target
voxel's footprint when downsampling, as panscreen does; it is the cheaper operation.

Usage: simpleitk_reference.py STUDIES_DIR [--limit N] [--grid D,H,W] [--spacing D,H,W]
Prints seconds per study and the peak RSS of this process."""

import argparse
import os
import resource
import sys
import time

import numpy as np
import SimpleITK as sitk

TARGET_SPACING = (4.0, 4.0, 4.0)  # x, y, z (SimpleITK's order)
SIZE = (96, 96, 112)


def volume_path(series_dir):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(series_dir))
    image = reader.Execute()
    # The grid's centre on the scanned volume's centre, its axes along the image's.
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    half = np.array([(n - 1) / 2 * s for n, s in zip(SIZE, TARGET_SPACING)])
    origin = np.array(centre) - direction @ half
    resampled = sitk.Resample(
        image,
        SIZE,
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        TARGET_SPACING,
        image.GetDirection(),
        -1000.0,
        sitk.sitkFloat32,
    )
    return np.clip(sitk.GetArrayViewFromImage(resampled), -200.0, 300.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("studies")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--grid", default="112,96,96", help="depth,height,width voxels")
    parser.add_argument("--spacing", default="4,4,4", help="depth,height,width mm")
    args = parser.parse_args()
    global SIZE, TARGET_SPACING
    SIZE = tuple(int(v) for v in reversed(args.grid.split(",")))
    TARGET_SPACING = tuple(float(v) for v in reversed(args.spacing.split(",")))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    series_dirs = sorted(
        os.path.join(root, d) for root, dirs, _ in os.walk(args.studies) for d in dirs if d.startswith("series-")
    )[: args.limit]
    started = time.perf_counter()
    for series_dir in series_dirs:
        volume = volume_path(series_dir)
        assert volume.shape == SIZE[::-1], volume.shape
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"SimpleITK reference: {len(series_dirs)} studies in {elapsed:.2f} s, {elapsed / len(series_dirs):.3f} s/study, peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
