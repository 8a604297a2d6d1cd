#!/usr/bin/env python3
"""Chooses learned-cascade's operating points on validation cohorts of its own.

For each target specificity, the lowest threshold whose specificity on the cohort's
lesion-free studies reaches it (the highest sensitivity that target allows); prints
each point's threshold, sensitivity and specificity with their counts, overall and
for lesions >= 10 mm and >= 10 HU (issue 9's gate stratum). Studies judged not
assessable are counted apart, never as negatives.

With --lower-bound, the lowest threshold whose specificity's 95% Wilson lower bound
reaches the target instead: a point stated as "specificity >= 0.95" then holds on new
cohorts more often than one whose estimate merely touches 0.95, which lands below it
about half the time (at the cost of some sensitivity).

With --calibrate, it also fits the manifest's Platt calibration on the same cohort: a
logistic regression of "this study has a lesion" on logit(raw score), by maximum
likelihood (Newton's method; panscreen's `Calibration::apply` is its inverse link). The
calibrated probability is then the share of studies with a lesion among those scoring
alike, in a cohort with this one's prevalence. It prints the [calibration] table and each
threshold mapped through it: the mapping only rises, so every study is flagged as before.

Several validation cohorts are pooled: give --labels and --results once per cohort, in
the same order (each cohort's labels are matched only with its own results).

Usage (needs duckdb, in panscreen's venv):
  panscreen synth --out val --size small --studies 1000 --seed 202 --prevalence 0.2 --anatomy screening
  panscreen run --input val/studies --out val-out --model models/learned-cascade --key-file K
  operating_points.py --labels val/labels.parquet --results val-out [--labels L2 --results R2 ...]
      --key-file K [--target 0.95 0.99] [--calibrate] [--lower-bound]
"""

import argparse
import hashlib
import hmac
import math
import os
import sys

import duckdb


def study_key(key: bytes, uid: str) -> str:
    """panscreen's pseudonym of a StudyInstanceUID (shared/src/pseudonym.rs)."""
    return hmac.new(key, b"study\0" + uid.encode(), hashlib.sha256).digest()[:16].hex()


def logit(score: float) -> float:
    """As panscreen's `Calibration::apply` takes it (shared/src/manifest.rs)."""
    score = min(max(score, 1e-7), 1.0 - 1e-7)
    return math.log(score / (1.0 - score))


def platt(scored) -> tuple:
    """(a, b) maximising the likelihood of sigmoid(a * logit(score) + b) for the lesion
    labels; Newton's method from a = 1, b = 0."""
    xs = [logit(score) for score, *_ in scored]
    ys = [1.0 if lesion else 0.0 for _, lesion, _ in scored]
    a, b = 1.0, 0.0
    for _ in range(100):
        ga = gb = haa = hab = hbb = 0.0
        for x, y in zip(xs, ys):
            p = 1.0 / (1.0 + math.exp(-(a * x + b)))
            w = p * (1.0 - p)
            ga += (y - p) * x
            gb += y - p
            haa += w * x * x
            hab += w * x
            hbb += w
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) < 1e-12 and abs(db) < 1e-12:
            return a, b
    raise SystemExit("the calibration did not converge")


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple:
    """The Wilson score interval of hits/n (95% by default)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def calibrated(a: float, b: float, score: float) -> float:
    return 1.0 / (1.0 + math.exp(-(a * logit(score) + b)))


def read_cohort(key: bytes, labels_path: str, results_path: str) -> tuple:
    """One cohort's (score, lesion, in the gate stratum) rows, and how many studies have no
    score (not assessable or quarantined). A study in the labels twice is an error."""
    # Paths are bound, not written into the SQL: a folder may be named "Müller's #2".
    labels = duckdb.execute(
        "select study_instance_uid, lesion_present, lesion_diameter_mm, lesion_hu_below_pancreas "
        "from read_parquet(?)",
        [labels_path],
    ).fetchall()
    if len({uid for uid, *_ in labels}) != len(labels):
        raise SystemExit(f"{labels_path}: a study_instance_uid appears more than once")
    results = dict(
        duckdb.execute(
            "select study_key, raw_score from read_parquet(?)",
            [os.path.join(results_path, "results", "**", "*.parquet")],
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
    return scored, unassessed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, action="append", help="a cohort's labels.parquet; once per cohort")
    parser.add_argument("--results", required=True, action="append", help="that cohort's run output; once per cohort")
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--target", type=float, nargs="+", default=[0.97, 0.99])
    parser.add_argument("--calibrate", action="store_true", help="fit and print a Platt calibration too")
    parser.add_argument(
        "--lower-bound", action="store_true", help="the specificity's 95%% Wilson lower bound meets the target"
    )
    args = parser.parse_args()
    if len(args.labels) != len(args.results):
        parser.error(f"{len(args.labels)} --labels but {len(args.results)} --results: give one of each per cohort")
    key = open(args.key_file, "rb").read().decode("utf-8", "replace").strip().encode()
    scored, unassessed = [], 0
    for labels_path, results_path in zip(args.labels, args.results):
        try:
            cohort_scored, cohort_unassessed = read_cohort(key, labels_path, results_path)
        except duckdb.Error as error:  # a missing or unreadable file: say which, no traceback
            raise SystemExit(f"operating_points.py: {error}")
        lesions = sum(lesion for _, lesion, _ in cohort_scored)
        print(f"{labels_path}: {len(cohort_scored)} scored ({lesions} with a lesion), {cohort_unassessed} not scored")
        scored += cohort_scored
        unassessed += cohort_unassessed
    negatives = sorted(score for score, lesion, _ in scored if not lesion)
    print(f"{len(scored)} scored, {unassessed} not scored; {len(negatives)} lesion-free")
    if args.calibrate:
        a, b = platt(scored)
        mean = sum(calibrated(a, b, score) for score, *_ in scored) / len(scored)
        share = sum(lesion for _, lesion, _ in scored) / len(scored)
        print(f'[calibration]\nkind = "platt"\na = {a:.6f}\nb = {b:.6f}\nprevalence = {share:.6g}')
        print(f"mean calibrated probability {mean:.4f}; share of scored studies with a lesion {share:.4f}")
    for target in args.target:
        # The lowest cut that leaves at most `allowed` of the lesion-free above it: (1 -
        # target) of them, or with --lower-bound the most whose interval still reaches it.
        allowed = math.floor((1 - target) * len(negatives) + 1e-9)
        if args.lower_bound:
            n = len(negatives)
            while allowed > 0 and wilson(n - allowed, n)[0] < target:
                allowed -= 1
        threshold = negatives[len(negatives) - allowed - 1] if allowed < len(negatives) else 0.0
        threshold = float(threshold) + 1e-6

        def rate(rows):
            hits = sum(score > threshold for score, *_ in rows)
            return f"{hits}/{len(rows)} = {hits / max(1, len(rows)):.3f}"

        positives = [row for row in scored if row[1]]
        gate = [row for row in scored if row[2]]
        specificity = sum(score <= threshold for score in negatives)
        low, high = wilson(specificity, len(negatives))
        if args.calibrate:
            print(f"target specificity {target}: raw threshold {threshold:.6f} is calibrated "
                  f"{calibrated(a, b, threshold):.9f}")
        print(
            f"target specificity {target}: threshold {threshold:.6f}; specificity "
            f"{specificity}/{len(negatives)} = {specificity / len(negatives):.3f} "
            f"(95% CI {low:.3f}-{high:.3f}); sensitivity "
            f"{rate(positives)}; lesions >= 10 mm and >= 10 HU {rate(gate)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
