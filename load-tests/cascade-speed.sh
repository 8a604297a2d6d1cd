#!/usr/bin/env bash
# Speed of a cascade (issue 9's check): the whole run per `small` study on one core, and
# studies/s at batch 1, 2, 4 and 8 on every core. One cohort per phantom, page cache warm.
# Run by `cargo xtask bench` after embedded-bench.sh; alone:
#   MODELS="learned-cascade tiny-panda-cascade" bash load-tests/cascade-speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/panscreen
PY=.panscreen/venv/bin/python
STUDIES=${CASCADE_STUDIES:-40}
MODELS=${MODELS:-learned-cascade tiny-panda-cascade}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/panscreen-cascade.XXXXXX)}
head -c 48 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/key"
echo "machine: $(nproc) cores; bench dir $WORK"

stage_times() { # results directory -> mean preprocess and infer ms per study
  "$PY" - "$1" <<'PYEOF'
import sys, duckdb
n, pre, inf = duckdb.execute(f"select count(*), avg(preprocess_ms), avg(infer_ms) from read_parquet('{sys.argv[1]}/results/**/*.parquet', hive_partitioning=true)").fetchone()
print(f"preprocess {pre:.0f} ms, infer {inf:.0f} ms per study ({n} studies)")
PYEOF
}

for anatomy in basic screening; do
  cohort="$WORK/$anatomy"
  [ -d "$cohort" ] || $BIN synth --anatomy "$anatomy" --studies "$STUDIES" --seed 31 --prevalence 0.3 --out "$cohort" > /dev/null
  cat "$cohort/studies"/*/*/* > /dev/null
  for model in $MODELS; do
    for round in 1 2; do
      out="$WORK/out-$anatomy-$model"
      /usr/bin/time -f "$anatomy, $model, 1 core, round $round: wall %e s, peak RSS %M KiB" \
        taskset -c 0 $BIN run --no-progress --overwrite --preprocess-workers 1 --infer-threads 1 --batch-size 1 \
        --model "models/$model" --input "$cohort/studies" --out "$out" --key-file "$WORK/key" > /dev/null
      stage_times "$out"
    done
    for batch in 1 2 4 8; do
      out="$WORK/out-$anatomy-$model-b$batch"
      /usr/bin/time -f "$anatomy, $model, $(nproc) cores, batch $batch: wall %e s, peak RSS %M KiB" \
        $BIN run --no-progress --overwrite --batch-size "$batch" \
        --model "models/$model" --input "$cohort/studies" --out "$out" --key-file "$WORK/key" > /dev/null
      stage_times "$out"
    done
  done
done
