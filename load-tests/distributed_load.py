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
COHORT=dir reuses a cohort `panscreen synth --studies STUDIES --seed 7 --prevalence 0.1 --anatomy basic`
wrote there (and writes it there when missing).

CHAOS=1 (`cargo xtask chaos`) adds faults while the campaign runs: a `kill -9` of a
random service (ingest and aggregate included) every 30 s, restarted at once as
Kubernetes would; one nats-server restart; one 10 s and one 5-minute cut of the store
(a TCP proxy in front of SeaweedFS refuses and resets connections); and 5 poison
objects among the studies. It then checks that every study is in the results exactly
once, that each poison object has its quarantine row, that the accounting adds up to
every object uploaded, and that every service exits 0 on SIGTERM; and reports the wall
time, studies/min, the kills and the redeliveries.
"""

import concurrent.futures
import json
import os
import random
import signal
import threading
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
CHAOS = os.environ.get("CHAOS") == "1"
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


class CuttableProxy:
    """A TCP proxy on a free loopback port in front of `target`; `cut(seconds)` refuses
    and resets every connection for that long, as a network partition would."""

    def __init__(self, target):
        self.port = free_ports(1)[0]
        self.target = target
        self.open = []
        self.lock = threading.Lock()
        self.listener = None
        self.listen()

    def listen(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self.listener = listener
        threading.Thread(target=self.accept, args=(listener,), daemon=True).start()

    def accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self.pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self, seconds):
        self.listener.close()
        with self.lock:
            for connection in self.open:
                try:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    connection.close()
                except OSError:
                    pass
            self.open = []
        time.sleep(seconds)
        self.listen()


def poison_objects(cohort):
    """Five objects that cannot be screened, as (key, bytes, expected quarantine reason)."""
    a_slice = next(p for p in (cohort / "studies").rglob("*.dcm")).read_bytes()
    garbage = bytearray(random.Random(5).randbytes(4000))
    garbage[128:132] = b"DICM"
    return [
        ("incoming/poison/notes.txt", b"exported by the night shift", "not a DICOM file"),
        ("incoming/poison/empty.dcm", b"", "empty file"),
        ("incoming/poison/truncated.dcm", a_slice[:1000], "DICOM file is truncated"),
        ("incoming/poison/garbage.dcm", bytes(garbage), None),
        ("incoming/poison/report.pdf", b"%PDF-1.4 not an image", "not a DICOM file"),
    ]


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
                            "--seed", "7", "--prevalence", "0.1", "--anatomy", "basic"], check=True, stdout=subprocess.DEVNULL)
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
        poison = poison_objects(cohort) if CHAOS else []
        for key, body, _ in poison:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{s3}/{BUCKET}/{key}", data=body,
                                                          method="PUT")).read()
        objects += len(poison)
        proxy = CuttableProxy(s3) if CHAOS else None
        endpoint = proxy.port if proxy else s3
        print(f"uploaded {objects} objects in {time.time() - started:.1f} s", flush=True)

        environment = dict(
            os.environ,
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{endpoint}", AWS_ACCESS_KEY_ID="panscreen",
            AWS_SECRET_ACCESS_KEY="panscreen-secret", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true",
            PANSCREEN_STORE=f"s3://{BUCKET}", PANSCREEN_NATS_URL=f"nats://127.0.0.1:{nats_port}",
            PANSCREEN_CAMPAIGN=CAMPAIGN, PANSCREEN_PSEUDONYM_KEY=KEY, PANSCREEN_QUIET_SECONDS="5",
            PANSCREEN_RESCAN_SECONDS="5", PANSCREEN_FLUSH_SECONDS="5", PANSCREEN_FLUSH_ROWS="200")
        logs = scratch / "logs"
        logs.mkdir()
        services = {}
        extras = {"ingest": [], "preprocess": ["--concurrency", PREPROCESS_CONCURRENCY], "infer": [], "aggregate": []}

        def start(name):
            port = free_ports(1)[0]
            process = subprocess.Popen([PANSCREEN, "serve", name, "--metrics-addr", f"127.0.0.1:{port}",
                                        *extras[name]],
                                       env=environment, stdout=subprocess.DEVNULL,
                                       stderr=open(logs / f"{name}.log", "a"), cwd=ROOT)
            processes.append((name, process))
            services[name] = process
            wait_for_port(port, name, process)

        for name in extras:
            start(name)

        submitted = time.time()
        subprocess.run([PANSCREEN, "submit", "--prefix", "incoming"], env=environment, check=True,
                       stdout=subprocess.DEVNULL)
        peak_backlog = {}
        done = 0
        deadline = submitted + float(os.environ.get("LOAD_TIMEOUT_SECONDS", "3600"))
        faults = []
        if CHAOS:
            chaos = random.Random(int(os.environ.get("CHAOS_SEED", "1")))
            # (seconds after submit, what): kills every 30 s; the other faults between them.
            plan = [(30 * i, "kill") for i in range(1, 100)]
            plan += [(45, "nats"), (75, "cut 10"), (135, "cut 300")]
            plan.sort()
            nats_args = nats.args

            def run_faults():
                nonlocal nats
                for at, what in plan:
                    while time.time() < submitted + at:
                        if stop_faults.is_set():
                            return
                        time.sleep(0.2)
                    if stop_faults.is_set():
                        return
                    if what == "kill":
                        name = chaos.choice(list(services))
                        services[name].send_signal(signal.SIGKILL)
                        services[name].wait()
                        faults.append((round(time.time() - submitted), f"kill -9 {name}"))
                        start(name)
                    elif what == "nats":
                        nats.kill()
                        nats.wait()
                        time.sleep(2)
                        nats = subprocess.Popen(nats_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        processes.append(("nats-server", nats))
                        faults.append((round(time.time() - submitted), "nats-server restarted (2 s down)"))
                    else:
                        # In a thread of its own: the kills go on during the cut.
                        seconds = int(what.split()[1])
                        faults.append((round(time.time() - submitted), f"store cut for {seconds} s"))
                        threading.Thread(target=proxy.cut, args=(seconds,), daemon=True).start()

            stop_faults = threading.Event()
            fault_thread = threading.Thread(target=run_faults, daemon=True)
            fault_thread.start()
        while time.time() < deadline:
            answer = subprocess.run([PANSCREEN, "status", "--json"], env=environment, capture_output=True)
            if answer.returncode != 0:  # NATS restarting
                time.sleep(2)
                continue
            status = json.loads(answer.stdout)
            stages = {s["stage"]: s for s in status["stages"]}
            for stage, s in stages.items():
                peak_backlog[stage] = max(peak_backlog.get(stage, 0), s["pending"] + s["in_flight"])
            done = stages["aggregate"]["processed"]
            # The counters of a killed instance lose its last seconds: when nothing is
            # waiting anywhere, count the results themselves.
            idle = all(s["pending"] + s["in_flight"] == 0 for s in stages.values()) and \
                not stages["ingest"].get("waiting_studies")
            if done >= STUDIES or (CHAOS and idle):
                try:
                    done = ds.dataset(f"{BUCKET}/campaigns/{CAMPAIGN}/out/results", filesystem=s3fs,
                                      format="parquet", partitioning="hive").count_rows()
                except OSError:
                    done = 0
                if done >= STUDIES:
                    break
            time.sleep(2)
        finished = time.time()
        if CHAOS:
            stop_faults.set()
            fault_thread.join()
            # Let late redeliveries and the quarantine records of the poison settle.
            time.sleep(20)
        memory = {name: peak_rss_mb(process.pid) for name, process in services.items()}
        for process in services.values():
            process.terminate()
        exits = {name: process.wait(timeout=120) for name, process in services.items()}

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
        if CHAOS:
            quarantine = ds.dataset(f"{BUCKET}/campaigns/{CAMPAIGN}/out/quarantine", filesystem=s3fs,
                                    format="parquet").to_table().to_pylist()
            accounting = ds.dataset(f"{BUCKET}/campaigns/{CAMPAIGN}/out/accounting", filesystem=s3fs,
                                    format="parquet").to_table().to_pylist()
            accounted = sum(row["objects"] for row in accounting)
            redelivered = sum(log.read_text(errors="replace").count("redelivered message")
                              for log in logs.glob("*.log"))
            held = sum(log.read_text(errors="replace").count("outage: holding the work")
                       for log in logs.glob("*.log"))
            print()
            print(f"faults ({len(faults)}):")
            for at, what in faults:
                print(f"  t+{at:>4} s  {what}")
            print(f"kills: {sum(1 for _, what in faults if what.startswith('kill'))}; "
                  f"redelivered messages: {redelivered}; outage holds logged: {held}")
            print(f"quarantine rows: {len(quarantine)}; accounting: {accounted} of {objects} objects")
            print(f"exit codes on SIGTERM: {exits}")
            problems = []
            by_input = {row["input"]: row["reason"] for row in quarantine}
            for key, _, reason in poison:
                if key not in by_input:
                    problems.append(f"{key} has no quarantine row")
                elif reason and by_input[key] != reason:
                    problems.append(f"{key}: {by_input[key]}, expected {reason}")
            if len(quarantine) != len(poison):
                problems.append(f"{len(quarantine)} quarantine rows for {len(poison)} poison objects: "
                                f"{[(r['input'], r['reason']) for r in quarantine]}")
            if accounted != objects:
                problems.append(f"accounting adds up to {accounted}, {objects} objects were uploaded")
            if any(code != 0 for code in exits.values()):
                problems.append(f"exit codes {exits}")
            if problems:
                sys.exit("chaos run failed:\n" + "\n".join(problems) + f"\nlogs in {logs}")
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
