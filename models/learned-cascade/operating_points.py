#!/usr/bin/env python3
"""Chooses learned-cascade's operating points on a validation cohort of its own.

For each target specificity, the lowest threshold whose specificity on the cohort's
lesion-free studies reaches it (the highest sensitivity that target allows); prints
each point's threshold, sensitivity and specificity with their counts, overall and
for lesions >= 10 mm and >= 10 HU (issue 9's gate stratum). Studies judged not
assessable are counted apart, never as negatives.

Usage (needs duckdb, in panscreen's venv):
  panscreen synth --out val --size small --studies 1000 --seed 202 --prevalence 0.2 --anatomy screening
  panscreen run --input val/studies --out val-out --model models/learned-cascade --key-file K
  operating_points.py --labels val/labels.parquet --results val-out --key-file K [--target 0.95 0.99]
"""

import argparse
import hashlib
import hmac
import sys

import duckdb


def study_key(key: bytes, uid: str) -> str:
    """panscreen's pseudonym of a StudyInstanceUID (shared/src/pseudonym.rs)."""
    return hmac.new(key, b"study\0" + uid.encode(), hashlib.sha256).digest()[:16].hex()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--target", type=float, nargs="+", default=[0.97, 0.99])
    args = parser.parse_args()
    key = open(args.key_file, "rb").read().decode("utf-8", "replace").strip().encode()
    labels = duckdb.sql(
        f"select study_instance_uid, lesion_present, lesion_diameter_mm, lesion_hu_below_pancreas "
        f"from '{args.labels}'"
    ).fetchall()
    results = dict(
        duckdb.sql(
            f"select study_key, raw_score from read_parquet('{args.results}/results/**/*.parquet')"
        ).fetchall()
    )
    scored, unassessed = [], 0
    for uid, lesion, diameter, contrast in labels:
        score = results.get(study_key(key, uid))
        if score is None:
            unassessed += 1
            continue
        gate = bool(lesion) and diameter >= 10 and contrast >= 10
        scored.append((score, bool(lesion), gate))
    negatives = sorted(score for score, lesion, _ in scored if not lesion)
    print(f"{len(scored)} scored, {unassessed} not scored; {len(negatives)} lesion-free")
    for target in args.target:
        # The lowest cut that leaves at most (1 - target) of the lesion-free above it.
        allowed = int((1 - target) * len(negatives))
        threshold = negatives[len(negatives) - allowed - 1] if allowed < len(negatives) else 0.0
        threshold = float(threshold) + 1e-6

        def rate(rows):
            hits = sum(score > threshold for score, *_ in rows)
            return f"{hits}/{len(rows)} = {hits / max(1, len(rows)):.3f}"

        positives = [row for row in scored if row[1]]
        gate = [row for row in scored if row[2]]
        specificity = sum(score <= threshold for score in negatives)
        print(
            f"target specificity {target}: threshold {threshold:.6f}; specificity "
            f"{specificity}/{len(negatives)} = {specificity / len(negatives):.3f}; sensitivity "
            f"{rate(positives)}; lesions >= 10 mm and >= 10 HU {rate(gate)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
