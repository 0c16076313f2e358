"""Scale-out: two twisted-mta nodes behind HAProxy, beside one node alone.

    python3 bench/scaleout.py [--reps 3] [--scenario 1k-s10=1024:2000:10] [--out DIR]

Starts two twisted-mta nodes (127.0.0.11:2545 and 127.0.0.12:2545), each
with its own spool and the settings of bench/mta-bench.toml (local domain
example.test, user@example.test), whose smtp listener takes the PROXY
protocol from 127.0.0.2 only; a real HAProxy in TCP mode on 127.0.0.1:2540
that spreads connections over them round-robin, from 127.0.0.2, with
`send-proxy-v2`; and a third node on 127.0.0.1:2546 without a proxy, for
comparison.  Then, per repetition and scenario, interleaved:

  * "twisted-mta-2-nodes": smtp-source against HAProxy.  Delivered = the
    files in both nodes' new/; the time runs until the last one is there.
    Both nodes must have received a share, and every "accepted" log line
    must name the client (smtp-source, on 127.0.0.1), never HAProxy
    (127.0.0.2).
  * "twisted-mta-1-node": the same load against the third node directly.
  * Postfix through the anchors' bench_load.py, if it is running (the
    anchors' `servers.sh start postfix`, 127.0.0.1:2525).

smtp-source cannot choose its source address, so before the load one
message is sent through HAProxy from each of 127.0.0.21-24 (smtplib), and
each of those addresses must show up as the client in a node's log.

Every run is quiet-gated like the anchors' (sync, quiet disk, other
processes quiet), and new/ is moved to the trash, never unlinked.  Output:
JSON lines (appended) and a Markdown table in $BENCH_ROOT/results/<date>/
scaleout.jsonl and scaleout.md.  Root; loopback addresses only; standard
library only.  MTA_VENV (default /tmp/venv) is the twisted-mta to run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (sets up the anchors' import path)

bench_load = bench.import_bench_load()

MTA_VENV = os.environ.get("MTA_VENV", "/tmp/venv")
HAPROXY = shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
FRONTEND = ("127.0.0.1", 2540)
PROXY_SOURCE = "127.0.0.2"  # HAProxy's address towards the nodes: the one trusted
NODES = [("node1", "127.0.0.11", 2545), ("node2", "127.0.0.12", 2545)]
SINGLE = ("single", "127.0.0.1", 2546)
TWO, ONE = "twisted-mta-2-nodes", "twisted-mta-1-node"  # the runs' "server" names
CLIENT = "127.0.0.1"  # smtp-source's address: it cannot bind another one
PROBE_SOURCES = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"]
PROBE_MESSAGE = b"Subject: probe\r\n\r\nThrough HAProxy.\r\n"
MAILDIR = os.path.join("mail", "example.test", "user")
ACCEPTED = re.compile(rb"nrcpt=\d+ client=[^\s\[]*\[([^\]]+)\] listener=smtp")
PROXY = f"""
[proxy]
listeners = ["smtp"]
trusted = ["{PROXY_SOURCE}/32"]
"""
HAPROXY_CFG = """
global
    maxconn 4096
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m

frontend smtp_in
    bind {frontend}
    default_backend nodes

backend nodes
    balance roundrobin
    source {source}
{servers}
"""


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log_path: str
    maildir: str

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def clients(self, offset: int) -> collections.Counter:
        """Client addresses of the messages accepted since *offset*."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return collections.Counter(ip.decode() for ip in ACCEPTED.findall(log.read()))

    def delivered(self) -> int:
        return bench_load.count_files(os.path.join(self.maildir, "new"))


# ------------------------------------------------------------------ servers
def render_config(root: str, address: str, port: int, proxied: bool) -> str:
    """bench/mta-bench.toml with this node's spool, users file and listener."""
    with open(os.path.join(HERE, "mta-bench.toml")) as template:
        text = template.read()
    text = re.sub(r'(?m)^spool = .*$', f'spool = "{os.path.join(root, "spool")}"', text)
    text = re.sub(r'(?m)^file = "users"$', f'file = "{os.path.join(HERE, "users")}"', text)
    text = re.sub(r'(?m)^smtp = .*$', f'smtp = ["tcp:{port}:interface={address}"]', text)
    config = os.path.join(root, "mta.toml")
    with open(config, "w") as out:
        out.write(text + (PROXY if proxied else ""))
    return config


def start_node(parent: str, name: str, address: str, port: int, proxied: bool) -> Node:
    root = os.path.join(parent, name)
    os.mkdir(root)
    config = render_config(root, address, port, proxied)
    log_path = os.path.join(root, "twistd.log")
    process = bench.start_twistd(MTA_VENV, config, log_path, root)
    return Node(name, process, log_path, os.path.join(root, "spool", MAILDIR))


def wait_for_node(node: Node) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and node.process.poll() is None:
        if os.path.exists(node.log_path) and b"listening: smtp" in open(node.log_path, "rb").read():
            return
        time.sleep(0.1)
    raise SystemExit(f"twisted-mta {node.name} did not start: see {node.log_path}")


def start_haproxy(parent: str) -> subprocess.Popen:
    servers = "\n".join(
        f"    server {name} {address}:{port} send-proxy-v2" for name, address, port in NODES)
    config = os.path.join(parent, "haproxy.cfg")
    with open(config, "w") as out:
        out.write(HAPROXY_CFG.format(
            frontend="%s:%d" % FRONTEND, source=PROXY_SOURCE, servers=servers))
    with open(os.path.join(parent, "haproxy.log"), "w") as output:
        return subprocess.Popen(
            [HAPROXY, "-f", config, "-db"], stdout=output, stderr=subprocess.STDOUT)


def wait_for_haproxy(process: subprocess.Popen, parent: str) -> None:
    deadline = time.time() + 10
    while time.time() < deadline and process.poll() is None:
        try:  # HAProxy says nothing when ready
            socket.create_connection(FRONTEND, 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"haproxy did not start: see {parent}/haproxy.log")


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=30)


def postfix_running() -> bool:
    return subprocess.run(["postfix", "status"], capture_output=True).returncode == 0


# ------------------------------------------------------------------ checks
def probe_sources(nodes: list[Node]) -> dict:
    """One message through HAProxy from each probe address: each must be
    the client in exactly one node's log."""
    offsets = {node.name: node.log_size() for node in nodes}
    for source in PROBE_SOURCES:
        with smtplib.SMTP(*FRONTEND, "client.test", timeout=30,
                          source_address=(source, 0)) as client:
            client.sendmail(bench_load.SENDER, [bench_load.RCPT], PROBE_MESSAGE)
    deadline = time.time() + 10
    while True:
        seen = {node.name: sorted(node.clients(offsets[node.name])) for node in nodes}
        found = sorted(ip for ips in seen.values() for ip in ips)
        if found == PROBE_SOURCES or time.time() > deadline:
            break
        time.sleep(0.1)
    return {"check": "client addresses through haproxy", "sent_from": PROBE_SOURCES,
            "seen": seen, "ok": found == PROBE_SOURCES and all(seen.values())}


# ------------------------------------------------------------------ one run
def run_load(label: str, scenario, rep: int, port: int, nodes: list[Node],
             helpers: list[subprocess.Popen]) -> dict:
    """smtp-source to 127.0.0.1:*port*; delivered = files in the nodes' new/."""
    name, size, count, sessions, reuse = scenario
    for node in nodes:
        bench_load.fresh_new_dir(node.maildir, f"scaleout.{label}.{node.name}.{name}.r{rep}."
                                               f"{time.time_ns()}")
    pids = [node.process.pid for node in nodes] + [helper.pid for helper in helpers]
    bench_load.settle()
    waited = bench_load.wait_quiet({os.getpid(), *pids})
    offsets = {node.name: node.log_size() for node in nodes}
    cpu0 = {pid: bench_load.tree_cpu_s(pid) for pid in pids}
    snap0 = bench_load.cpu_by_pid()
    command = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
               "-f", bench_load.SENDER, "-t", bench_load.RCPT, "-M", "client.test",
               *(["-d"] if reuse else []), f"127.0.0.1:{port}"]
    started = time.perf_counter()
    smtp_source = subprocess.run(command, capture_output=True, timeout=600)
    accepted = time.perf_counter() - started
    deadline = time.perf_counter() + 60
    while sum(node.delivered() for node in nodes) < count and time.perf_counter() < deadline:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    cpu = {pid: bench_load.tree_cpu_s(pid) - cpu0[pid] for pid in pids}
    foreign, _ = bench_load.foreign_cpu_s(snap0, bench_load.cpu_by_pid(), {os.getpid(), *pids})
    by_node = {node.name: node.delivered() for node in nodes}
    clients = wait_for_log_lines(nodes, offsets, by_node)
    addresses = set().union(*clients.values())
    return {
        "server": label, "scenario": name, "rep": rep, "size": size, "count": count,
        "sessions": sessions, "reuse": reuse, "rc": smtp_source.returncode,
        "delivered": sum(by_node.values()), "delivered_by_node": by_node,
        "clients_by_node": clients,
        "ok": (smtp_source.returncode == 0 and sum(by_node.values()) == count
               and all(by_node.values()) and addresses == {CLIENT}),
        "accept_s": round(accepted, 3), "deliver_s": round(elapsed, 3),
        "accepted_per_s": round(count / accepted, 1),
        "delivered_per_s": round(count / elapsed, 1),
        "MB_per_s": round(count * size / 1e6 / elapsed, 2),
        "server_cpu_s": round(sum(cpu[node.process.pid] for node in nodes), 2),
        "haproxy_cpu_s": round(sum(cpu[helper.pid] for helper in helpers), 2),
        "foreign_user_cpu_s": round(foreign, 2), "waited_quiet_s": waited,
        "err": smtp_source.stderr.decode(errors="replace")[-300:].strip(),
        "time": time.strftime("%H:%M:%S"),
    }


def wait_for_log_lines(nodes: list[Node], offsets: dict, by_node: dict) -> dict:
    """Client addresses per node, once each node has logged its deliveries
    (the "accepted" line comes after the 250)."""
    deadline = time.time() + 10
    while True:
        clients = {node.name: dict(node.clients(offsets[node.name])) for node in nodes}
        logged = {name: sum(counts.values()) for name, counts in clients.items()}
        if all(logged[name] >= by_node[name] for name in by_node) or time.time() > deadline:
            return clients
        time.sleep(0.1)


def run_postfix(scenario, rep: int) -> dict:
    record = bench_load.run_one("postfix", scenario, rep, 600)
    return {key: record[key] for key in (
        "server", "scenario", "rep", "size", "count", "sessions", "reuse", "rc", "delivered",
        "ok", "accept_s", "deliver_s", "accepted_per_s", "delivered_per_s", "MB_per_s",
        "server_cpu_s", "foreign_user_cpu_s", "waited_quiet_s", "err", "time")}


# ------------------------------------------------------------------ report
def table(records: list[dict], probe: dict) -> str:
    def median(name, server, key):
        values = [r[key] for r in records if r["scenario"] == name and r["server"] == server]
        return statistics.median(values) if values else None

    lines = [
        "| scenario | 2 nodes + HAProxy msg/s | node1 / node2 (all reps) | 1 node msg/s | ratio | "
        "Postfix msg/s | ratio | nodes CPU ms/msg | HAProxy CPU ms/msg | client addresses | ok |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in dict.fromkeys(r["scenario"] for r in records):
        runs = [r for r in records if r["scenario"] == name]
        scaled = [r for r in runs if r["server"] == TWO]
        count = runs[0]["count"]
        two = median(name, TWO, "delivered_per_s")
        one = median(name, ONE, "delivered_per_s")
        postfix = median(name, "postfix", "delivered_per_s")
        shares = " / ".join(
            str(sum(r["delivered_by_node"][node] for r in scaled)) for node, _, _ in NODES)
        addresses = sorted({ip for r in scaled for c in r["clients_by_node"].values() for ip in c})
        lines.append(
            f"| {name} | {two:.0f} | {shares} | {one:.0f} | {two / one:.2f} | "
            + (f"{postfix:.0f} | {two / postfix:.2f} | " if postfix else "- | - | ")
            + f"{median(name, TWO, 'server_cpu_s') * 1000 / count:.2f} | "
            f"{median(name, TWO, 'haproxy_cpu_s') * 1000 / count:.2f} | "
            f"{', '.join(addresses)} | {sum(r['ok'] for r in runs)}/{len(runs)} |")
    seen = "; ".join(f"{node}: {', '.join(ips)}" for node, ips in probe["seen"].items())
    lines += ["", f"Client addresses through HAProxy: sent from {', '.join(probe['sent_from'])}; "
                  f"logged by {seen} ({'ok' if probe['ok'] else 'WRONG'})."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scenario", action="append", default=[],
                        help="NAME=SIZE:COUNT:SESSIONS[:d] (default 1k-s10 and 1k-s10-d)")
    parser.add_argument("--out", default=os.path.join(
        bench_load.BENCH_ROOT, "results", time.strftime("%Y-%m-%d")))
    args = parser.parse_args()
    if HAPROXY is None:
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    scenarios = [bench_load.parse_scenario(s) for s in args.scenario or [
        "1k-s10=1024:2000:10", "1k-s10-d=1024:2000:10:d"]]
    with_postfix = postfix_running()
    root = tempfile.mkdtemp(prefix="mta-scaleout-", dir=bench_load.BENCH_ROOT)
    nodes = [start_node(root, *node, proxied=True) for node in NODES]
    single = start_node(root, *SINGLE, proxied=False)
    haproxy = start_haproxy(root)
    records = []
    try:
        for node in [*nodes, single]:
            wait_for_node(node)
        wait_for_haproxy(haproxy, root)
        probe = probe_sources(nodes)
        print(json.dumps(probe), flush=True)
        for rep in range(1, args.reps + 1):
            for scenario in scenarios:
                runs = [run_load(TWO, scenario, rep, FRONTEND[1], nodes, [haproxy]),
                        run_load(ONE, scenario, rep, SINGLE[2], [single], [])]
                if with_postfix:
                    runs.append(run_postfix(scenario, rep))
                for record in runs:
                    records.append(record)
                    print(json.dumps(record), flush=True)
    finally:
        stop([haproxy, *(node.process for node in nodes), single.process])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaleout.jsonl"), "a") as out:
        for record in [probe, *records]:
            out.write(json.dumps(record) + "\n")
    report = table(records, probe)
    with open(os.path.join(args.out, "scaleout.md"), "w") as out:
        out.write(report)
    print("\n" + report + f"\n(results in {args.out}; nodes' spools and logs in {root})")


if __name__ == "__main__":
    main()
