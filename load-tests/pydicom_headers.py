#!/usr/bin/env python3
"""The Python reference for header scanning: pydicom.dcmread(stop_before_pixels=True) on
every file below a folder, in one process, reading the attributes ingest needs.

Usage: pydicom_headers.py FOLDER
Prints files, seconds and files per second."""

import os
import sys
import time

import pydicom

FIELDS = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType",
          "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
          "Rows", "Columns", "ContrastBolusAgent", "PatientID", "PatientBirthDate")


def main():
    paths = [os.path.join(root, name) for root, _, names in os.walk(sys.argv[1]) for name in names]
    started = time.perf_counter()
    read = 0
    for path in paths:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for field in FIELDS:
            dataset.get(field)
        read += 1
    elapsed = time.perf_counter() - started
    print(f"pydicom headers: {read} of {len(paths)} files in {elapsed:.2f} s, {read / elapsed:.0f} files/s")


if __name__ == "__main__":
    main()
