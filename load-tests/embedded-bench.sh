#!/usr/bin/env bash
# Embedded-pipeline benchmark: time per study per stage and peak memory, for `small`
# and `full` studies, with the Python reference (pydicom + scipy) side by side.
# Run with `cargo xtask bench` (it builds and installs what this needs). Long: ~10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/panscreen
PY=.panscreen/venv/bin/python
SMALL=${SMALL_STUDIES:-100}
FULL=${FULL_STUDIES:-6}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/panscreen-bench.XXXXXX)}
"$PY" -m pip install --quiet -r load-tests/requirements-bench.txt
head -c 48 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/key"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; bench dir $WORK"

measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f "$label: wall %e s, peak RSS %M KiB" "$@" > "$WORK/$label.out" 2> "$WORK/$label.err" || { cat "$WORK/$label.err"; exit 1; }
  grep "^$label:" "$WORK/$label.err"
}

for size in small full; do
  n=$SMALL; [ "$size" = full ] && n=$FULL
  measure "synth-$size" $BIN synth --anatomy basic --size $size --studies "$n" --seed 11 --prevalence 0.3 --out "$WORK/$size"
  du -sh "$WORK/$size/studies" | awk -v s=$size '{print "cohort-" s ": " $1 " of DICOM"}'
  measure "run-$size" $BIN run --no-progress --input "$WORK/$size/studies" --out "$WORK/$size-out" --key-file "$WORK/key"
  grep "finished in" "$WORK/run-$size.out"
  "$PY" - "$WORK/$size-out" <<'PYEOF'
import sys, duckdb
out = sys.argv[1]
n, pre, inf = duckdb.execute(f"select count(*), avg(preprocess_ms), avg(infer_ms) from read_parquet('{out}/results/**/*.parquet', hive_partitioning=true)").fetchone()
print(f"per study: preprocess {pre:.0f} ms, infer {inf:.0f} ms (handler wall time, {n} studies)")
PYEOF
  $BIN evaluate --labels "$WORK/$size/labels.parquet" --results "$WORK/$size-out" --key-file "$WORK/key"
  measure "python-reference-$size" "$PY" load-tests/python_reference.py "$WORK/$size/studies"
  cat "$WORK/python-reference-$size.out"
done
