#!/usr/bin/env python3
"""Load scenario for the distributed mode (a benchmark, not a test).

Starts a nats-server (JetStream) and SeaweedFS (S3) on free loopback ports, writes
STUDIES small synthetic studies with `panscreen synth`, uploads them to S3, starts
ingest, preprocess, infer and aggregate as separate `panscreen serve` processes,
submits the prefix, and reports:

- studies per minute, from the submit to the last study in the results;
- per-stage latency p50/p95, from the stage timestamps in the results table
  (preprocess: ingested_at -> preprocessed_at, queue wait included; infer:
  preprocessed_at -> scored_at; aggregate: scored_at -> aggregated_at) and the time in
  each handler (preprocess_ms, infer_ms);
- peak backlog per stage (pending + in flight, from `panscreen status --json` every 2 s);
- peak memory per service (VmHWM from /proc when the run ends).

Run through `cargo xtask load-test` (builds, installs, then runs this), or directly
with the venv's python: STUDIES=1000 python load-tests/distributed_load.py.
COHORT=dir reuses a cohort `panscreen synth --studies STUDIES --seed 7 --prevalence 0.1`
wrote there (and writes it there when missing).
"""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".panscreen" / "venv" / "bin"
PANSCREEN = Path(os.environ.get("PANSCREEN_BIN", ROOT / "target" / "release" / "panscreen"))
STUDIES = int(os.environ.get("STUDIES", "1000"))
PREPROCESS_CONCURRENCY = os.environ.get("PREPROCESS_CONCURRENCY", "2")
BUCKET = "panscreen-load"
CAMPAIGN = "load"
KEY = "load-test-pseudonym-key-0123456789abcdef"


def free_ports(count):
    sockets, ports = [], []
    while len(ports) < count:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port < 50000 and port not in ports:
            ports.append(port)
        sockets.append(s)
    for s in sockets:
        s.close()
    return ports


def wait_for_port(port, what, process, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main():
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    scratch = Path(tempfile.mkdtemp(prefix="panscreen-load-"))
    processes = []
    try:
        nats_port, nats_monitor, master, volume, filer, s3 = free_ports(6)
        nats = subprocess.Popen(
            [VENV_BIN / "nats-server", "-a", "127.0.0.1", "-p", str(nats_port), "-m", str(nats_monitor),
             "-js", "-sd", scratch / "nats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(("nats-server", nats))
        weed = subprocess.Popen(
            [VENV_BIN / "weed", "server", f"-dir={scratch / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-master.port={master}",
             f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
             "-master.volumeSizeLimitMB=1024", "-volume.max=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(("seaweedfs", weed))
        (scratch / "weed").mkdir(exist_ok=True)
        wait_for_port(nats_port, "nats-server", nats)
        wait_for_port(s3, "SeaweedFS S3", weed)
        time.sleep(2)
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{s3}/{BUCKET}", method="PUT"))

        cohort = Path(os.environ["COHORT"]) if os.environ.get("COHORT") else scratch / "cohort"
        if not (cohort / "studies").is_dir():
            started = time.time()
            subprocess.run([PANSCREEN, "synth", "--out", cohort, "--studies", str(STUDIES),
                            "--seed", "7", "--prevalence", "0.1"], check=True, stdout=subprocess.DEVNULL)
            print(f"synthesized {STUDIES} studies in {time.time() - started:.1f} s", flush=True)
        # SeaweedFS without an S3 configuration takes anonymous requests. Plain PUTs:
        # the AWS SDK's anonymous chunked uploads arrive with their chunk framing stored
        # in the object (panscreen then rightly quarantines every file as not DICOM).
        s3fs = pafs.S3FileSystem(anonymous=True, region="us-east-1", endpoint_override=f"127.0.0.1:{s3}",
                                 scheme="http")
        started = time.time()
        files = [p for p in (cohort / "studies").rglob("*") if p.is_file()]

        def put(path):
            key = "incoming/" + path.relative_to(cohort / "studies").as_posix()
            request = urllib.request.Request(f"http://127.0.0.1:{s3}/{BUCKET}/{key}", data=path.read_bytes(),
                                             method="PUT")
            urllib.request.urlopen(request).read()

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(put, files))
        objects = len(files)
        print(f"uploaded {objects} objects in {time.time() - started:.1f} s", flush=True)

        environment = dict(
            os.environ,
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3}", AWS_ACCESS_KEY_ID="panscreen",
            AWS_SECRET_ACCESS_KEY="panscreen-secret", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true",
            PANSCREEN_STORE=f"s3://{BUCKET}", PANSCREEN_NATS_URL=f"nats://127.0.0.1:{nats_port}",
            PANSCREEN_CAMPAIGN=CAMPAIGN, PANSCREEN_PSEUDONYM_KEY=KEY, PANSCREEN_QUIET_SECONDS="5",
            PANSCREEN_RESCAN_SECONDS="5", PANSCREEN_FLUSH_SECONDS="5", PANSCREEN_FLUSH_ROWS="200")
        logs = scratch / "logs"
        logs.mkdir()
        services = {}
        for name, extra in [("ingest", []), ("preprocess", ["--concurrency", PREPROCESS_CONCURRENCY]),
                            ("infer", []), ("aggregate", [])]:
            port = free_ports(1)[0]
            process = subprocess.Popen([PANSCREEN, "serve", name, "--metrics-addr", f"127.0.0.1:{port}", *extra],
                                       env=environment, stdout=subprocess.DEVNULL,
                                       stderr=open(logs / f"{name}.log", "w"), cwd=ROOT)
            processes.append((name, process))
            services[name] = process
            wait_for_port(port, name, process)

        submitted = time.time()
        subprocess.run([PANSCREEN, "submit", "--prefix", "incoming"], env=environment, check=True,
                       stdout=subprocess.DEVNULL)
        peak_backlog = {}
        done = 0
        deadline = submitted + float(os.environ.get("LOAD_TIMEOUT_SECONDS", "3600"))
        while time.time() < deadline:
            status = json.loads(subprocess.run([PANSCREEN, "status", "--json"], env=environment, check=True,
                                               capture_output=True).stdout)
            stages = {s["stage"]: s for s in status["stages"]}
            for stage, s in stages.items():
                peak_backlog[stage] = max(peak_backlog.get(stage, 0), s["pending"] + s["in_flight"])
            done = stages["aggregate"]["processed"]
            if done >= STUDIES:
                break
            time.sleep(2)
        finished = time.time()
        memory = {name: peak_rss_mb(process.pid) for name, process in services.items()}
        for process in services.values():
            process.terminate()
        for process in services.values():
            process.wait(timeout=120)

        results = ds.dataset(f"{BUCKET}/campaigns/{CAMPAIGN}/out/results", filesystem=s3fs, format="parquet",
                             partitioning="hive").to_table()
        keys = results.column("study_key").to_pylist()
        assert len(keys) == len(set(keys)), "a study is in the results twice"

        def seconds(later, earlier):
            delta = pc.subtract(results.column(later), results.column(earlier))
            return [d.total_seconds() for d in delta.to_pylist() if d is not None]

        latencies = {
            "preprocess (ingested -> preprocessed)": seconds("preprocessed_at", "ingested_at"),
            "infer (preprocessed -> scored)": seconds("scored_at", "preprocessed_at"),
            "aggregate (scored -> written)": seconds("aggregated_at", "scored_at"),
            "preprocess handler": [v / 1000 for v in results.column("preprocess_ms").to_pylist() if v is not None],
            "infer handler": [v / 1000 for v in results.column("infer_ms").to_pylist() if v is not None],
        }
        elapsed = finished - submitted
        print()
        print(f"studies in the results: {len(keys)} of {STUDIES} ({objects} objects)")
        print(f"submit to last result: {elapsed:.1f} s = {len(keys) / elapsed * 60:.0f} studies/min")
        print()
        print("| stage latency | p50 | p95 |")
        print("|---|---|---|")
        for name, values in latencies.items():
            print(f"| {name} | {percentile(values, 0.5):.2f} s | {percentile(values, 0.95):.2f} s |")
        print()
        print("| service | peak backlog (pending + in flight) | peak RSS |")
        print("|---|---|---|")
        for name in ["ingest", "preprocess", "infer", "aggregate"]:
            print(f"| {name} | {peak_backlog.get(name, 0)} | {memory[name]:.0f} MB |")
        if len(keys) < STUDIES:
            sys.exit(f"only {len(keys)} of {STUDIES} studies arrived; logs in {logs}")
    finally:
        for _, process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        if os.environ.get("KEEP_SCRATCH") != "1":
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
