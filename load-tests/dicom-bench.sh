#!/usr/bin/env bash
# DICOM reading benchmarks, side by side with the Python a radiology lab would use:
#  1. header-only scanning of realistic studies (scouts, phases, reformats, SC, dose SR):
#     `panscreen inspect` against pydicom's dcmread(stop_before_pixels=True);
#  2. the volume path (decode, HU, resample to the model grid) of `full` studies:
#     panscreen's preprocess time per study against pydicom + scipy (python_reference.py,
#     tiny-panda's grid) and SimpleITK's ImageSeriesReader + Resample onto the cascade's
#     stage-1 grid (simpleitk_reference.py) on 512x512x300 studies, both with the volume
#     path alone (examples/volume_path.rs) and inside `panscreen run`;
#  3. peak memory of one 1,000-slice 512×512 series through `panscreen run`.
# Per-core figures pin both sides to one core with taskset. Run by `cargo xtask bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/panscreen
PY=.panscreen/venv/bin/python
WORK=${BENCH_DIR:-$(mktemp -d /tmp/panscreen-dicom-bench.XXXXXX)}
"$PY" -m pip install --quiet -r load-tests/requirements-bench.txt
head -c 48 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/key"
echo "machine: $(nproc) cores; bench dir $WORK"
sync

# 1. Header scanning.
[ -d "$WORK/realistic" ] || $BIN synth --anatomy basic --size full --studies ${HEADER_STUDIES:-4} --seed 5 --realistic-studies --out "$WORK/realistic" > /dev/null
echo "realistic cohort: $(find "$WORK/realistic/studies" -type f | wc -l) files, $(du -sh "$WORK/realistic/studies" | cut -f1)"
cat "$WORK/realistic/studies"/*/*/* > /dev/null  # warm the page cache for both sides
for round in 1 2; do
  taskset -c 0 $BIN inspect --input "$WORK/realistic/studies" > "$WORK/inspect.out"; head -1 "$WORK/inspect.out" | sed "s/^/panscreen inspect, 1 core: /"
  $BIN inspect --input "$WORK/realistic/studies" > "$WORK/inspect.out"; head -1 "$WORK/inspect.out" | sed "s/^/panscreen inspect, $(nproc) cores: /"
  taskset -c 0 "$PY" load-tests/pydicom_headers.py "$WORK/realistic/studies" | sed 's/^/1 core: /'
done

# 2. Volume path. (a) tiny-panda's centred 48x128x128 grid against pydicom + scipy;
# (b) the default cascade's two grids from every slice (stage 1's 4 mm whole-scan grid and
# the fine 3x2x2 mm int16 grid, compressed) against SimpleITK reading the series
# and resampling it onto stage 1's grid alone, on 512x512x300 studies.
[ -d "$WORK/full" ] || $BIN synth --anatomy basic --size full --studies ${FULL_STUDIES:-6} --seed 11 --out "$WORK/full" > /dev/null
cat "$WORK/full/studies"/*/*/* > /dev/null
taskset -c 0 $BIN run --no-progress --preprocess-workers 1 --model models/tiny-panda --input "$WORK/full/studies" --out "$WORK/full-out" --key-file "$WORK/key" --overwrite > /dev/null
"$PY" - "$WORK/full-out" <<'PYEOF'
import sys, duckdb
n, pre = duckdb.execute(f"select count(*), avg(preprocess_ms) from read_parquet('{sys.argv[1]}/results/**/*.parquet', hive_partitioning=true)").fetchone()
print(f"panscreen volume path (tiny-panda grid), 1 core: {pre:.0f} ms/study (decode + HU + resample + store; {n} studies)")
PYEOF
taskset -c 0 "$PY" load-tests/python_reference.py "$WORK/full/studies" | sed 's/^/1 core: /'
# 300 slices 1.25 mm apart: 374 mm scans, inside stage 1's 448 mm field, so both sides
# read every slice (longer scans would let panscreen skip the slices no grid reaches).
[ -d "$WORK/full300" ] || $BIN synth --anatomy basic --size full --studies ${FULL300_STUDIES:-3} --slices 300 --slice-spacing-mm 1.25 --seed 12 --out "$WORK/full300" > /dev/null
cat "$WORK/full300/studies"/*/*/* > /dev/null
# The volume path alone (no infer sharing the core): examples/volume_path.rs, which
# `cargo xtask bench` builds with the same codecs as the binary.
VOLUME=target/release/examples/volume_path
[ -x "$VOLUME" ] || { echo "$VOLUME is missing: run cargo xtask bench, or build it with --example volume_path" >&2; exit 1; }
for round in 1 2; do
  taskset -c 0 $VOLUME "$WORK/full300/studies" models/tiny-panda-cascade 2 | sed 's/^/panscreen volume path, both grids, 1 core: /'
  taskset -c 0 $VOLUME "$WORK/full300/studies" models/tiny-panda-cascade 2 --stage1-only | sed 's/^/panscreen volume path, stage 1 grid only, 1 core: /'
  taskset -c 0 "$PY" load-tests/simpleitk_reference.py "$WORK/full300/studies" | sed 's/^/1 core, stage 1 grid: /'
done
for round in 1 2; do
  /usr/bin/time -f "panscreen run (cascade, both grids), 1 core: wall %e s, peak RSS %M KiB" taskset -c 0 $BIN run --no-progress --preprocess-workers 1 --model models/tiny-panda-cascade --input "$WORK/full300/studies" --out "$WORK/full300-out" --key-file "$WORK/key" --overwrite > /dev/null
  "$PY" - "$WORK/full300-out" <<'PYEOF'
import sys, duckdb
n, pre = duckdb.execute(f"select count(*), avg(preprocess_ms) from read_parquet('{sys.argv[1]}/results/**/*.parquet', hive_partitioning=true)").fetchone()
print(f"panscreen volume path (cascade: both grids, every slice), 1 core: {pre:.0f} ms/study ({n} studies of 512x512x300)")
PYEOF
  taskset -c 0 "$PY" load-tests/simpleitk_reference.py "$WORK/full300/studies" | sed 's/^/1 core, stage 1 grid: /'
done

# 3. Memory on a 1,000-slice 512×512 series (int16 size 500 MiB).
[ -d "$WORK/long" ] || $BIN synth --anatomy basic --size full --studies 1 --slices 1000 --seed 3 --out "$WORK/long" > /dev/null
echo "1,000-slice series: $(find "$WORK/long/studies" -type f | wc -l) files, $(du -sh "$WORK/long/studies" | cut -f1)"
/usr/bin/time -f "panscreen run, 1,000 slices: wall %e s, peak RSS %M KiB" $BIN run --no-progress --preprocess-workers 1 --model models/tiny-panda-cascade \
  --input "$WORK/long/studies" --out "$WORK/long-out" --key-file "$WORK/key" --overwrite > /dev/null
/usr/bin/time -f "python reference, 1,000 slices: wall %e s, peak RSS %M KiB" "$PY" load-tests/python_reference.py "$WORK/long/studies"
