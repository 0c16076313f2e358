"""Relay throughput: accept -> queue -> smart host, twisted-mta beside Postfix.

    python3 bench/relay.py [--reps 3] [--scenario relay-1k-s10=1024:2000:10]

Both relay everything for remote.test to Postfix's smtp-sink on
127.0.0.1:2599 (the anchors' "sink", started by their servers.sh): Postfix
through its transport map (the anchors' "postfix-relay"), twisted-mta as a
smart host (`smarthost = "127.0.0.1:2599"`, `smarthost_tls = "none"`).
"Relayed" means every message was logged `status=sent` to the sink; the
time runs from the first connection of smtp-source to the last such line.
Postfix runs through the anchors' bench_load.py unchanged; twisted-mta's
runs are measured here the same way (wall time, server CPU from /proc).
Needs `bash bench/run.sh` to have set things up once (Postfix, smtp-source).
Standard library only; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (sets up the anchors' import path)

bench_load = bench.import_bench_load()

MTA_VENV = os.environ.get("MTA_VENV", "/tmp/venv")
RELAY_PORT = int(os.environ.get("MTA_RELAY_PORT", "2537"))
SENT = re.compile(rb"to=<[^>]*@remote\.test> relay=127\.0\.0\.1\[127\.0\.0\.1\]:2599 .*status=sent")
CONFIG = """
hostname = "bench.localdomain"
spool = "{spool}"
[listen]
smtp = ["tcp:{port}:interface=127.0.0.1"]
submission = []
submissions = []
[domains]
local = ["example.test"]
[relay]
networks = ["127.0.0.0/8"]
smarthost = "127.0.0.1:2599"
smarthost_tls = "none"
[limits]
max_connections = 20000
max_connections_per_ip = 20000
"""


def start_mta(root: str):
    config = os.path.join(root, "relay.toml")
    with open(config, "w") as out:
        out.write(CONFIG.format(spool=os.path.join(root, "spool"), port=RELAY_PORT))
    log_path = os.path.join(root, "twistd.log")
    process = bench.start_twistd(MTA_VENV, config, log_path, root)
    deadline = time.time() + 30
    while time.time() < deadline:
        if os.path.exists(log_path) and b"listening: smtp" in open(log_path, "rb").read():
            return process, log_path
        time.sleep(0.1)
    process.kill()
    raise SystemExit("twisted-mta did not start")


def sent_lines(log_path: str, offset: int) -> int:
    with open(log_path, "rb") as log:
        log.seek(offset)
        return len(SENT.findall(log.read()))


def run_mta(process, log_path: str, scenario) -> dict:
    name, size, count, sessions, _ = scenario
    bench_load.settle()
    waited = bench_load.wait_quiet({os.getpid(), process.pid, bench_load.server_pid("sink")})
    offset = os.path.getsize(log_path)
    cpu0 = bench_load.tree_cpu_s(process.pid)
    started = time.perf_counter()
    smtp_source = subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
         "-f", bench_load.SENDER, "-t", bench_load.SINK_RCPT, "-M", "client.test",
         f"127.0.0.1:{RELAY_PORT}"],
        capture_output=True,
    )
    accepted = time.perf_counter() - started
    relayed = 0
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        relayed = sent_lines(log_path, offset)
        if relayed >= count:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    cpu = bench_load.tree_cpu_s(process.pid) - cpu0
    return {
        "server": "twisted-mta-relay", "scenario": name, "count": count, "size": size,
        "ok": smtp_source.returncode == 0 and relayed == count, "delivered": relayed,
        "accepted_per_s": round(count / accepted, 1),
        "delivered_per_s": round(count / elapsed, 1),
        "server_cpu_s": round(cpu, 2), "waited_quiet_s": waited,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scenario", action="append", default=[])
    parser.add_argument("--out", default=os.path.join(bench_load.BENCH_ROOT, "relay.jsonl"))
    args = parser.parse_args()
    scenarios = [bench_load.parse_scenario(s) for s in args.scenario or [
        "relay-1k-s1=1024:2000:1", "relay-1k-s10=1024:2000:10", "relay-1k-s50=1024:2000:50"]]
    root = tempfile.mkdtemp(prefix="mta-relay-", dir=bench_load.BENCH_ROOT)
    process, log_path = start_mta(root)
    records = []
    try:
        for rep in range(1, args.reps + 1):
            for scenario in scenarios:
                for record in (
                    bench_load.run_one("postfix-relay", scenario, rep, 600),
                    run_mta(process, log_path, scenario),
                ):
                    records.append(record)
                    print(json.dumps(record), flush=True)
    finally:
        process.terminate()
        process.wait()
    with open(args.out, "a") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    print_table(records)


def print_table(records: list[dict]) -> None:
    print("\n| scenario | postfix relayed/s | twisted-mta relayed/s | ratio | twisted-mta CPU ms/msg |")
    print("|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(r["scenario"] for r in records):
        def median(server, key):
            values = sorted(r[key] for r in records if r["scenario"] == name and r["server"] == server)
            return values[len(values) // 2]
        postfix = median("postfix-relay", "delivered_per_s")
        mta = median("twisted-mta-relay", "delivered_per_s")
        cpu = median("twisted-mta-relay", "server_cpu_s") * 1000 / records[0]["count"]
        print(f"| {name} | {postfix:.0f} | {mta:.0f} | {mta / postfix:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
