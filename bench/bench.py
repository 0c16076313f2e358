"""twisted-mta benchmark driver: the anchors' bench_load.py with one more server.

Subcommands:

  python3 bench.py load --servers postfix,twisted-mta,aiosmtpd --reps 3 \
      --scenario 1k-s10=1024:2000:10 --out RESULTS/load.jsonl
        Runs shared/bench-anchors/bench_load.py (imported, not copied) with
        "twisted-mta" added to its SERVERS table.  Same options as
        bench_load.py; every run is quiet-gated and checked (files in new/ ==
        messages sent) exactly as for the anchors.

  python3 bench.py report --results RESULTS [--date TEXT]
        Markdown: the summary table (messages/s, MB/s, server CPU ms/msg,
        peak RSS, ratio to Postfix), the targets (met or not), the idle-
        connection table and the anchors' detailed per-run table.

  python3 bench.py pyspy FILE.raw
        Self-time and inclusive shares per function from a py-spy
        `record --format raw` file (bench/profile.sh uses it).

  python3 bench.py threads PID MESSAGES -- smtp-source ...
        CPU per thread (user/system ms per message) of PID while the command
        runs: reactor thread vs the committer (bench/profile.sh uses it).

Environment: BENCH_ROOT (default /var/tmp/bench), BENCH_ANCHORS (default
/work/shared/bench-anchors), MTA_PORT (default 2535).  Standard library
only (run it with /usr/bin/python3, like the anchors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHORS = os.environ.get(
    "BENCH_ANCHORS",
    os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench-anchors")),
)
if not os.path.isdir(ANCHORS):
    ANCHORS = "/work/shared/bench-anchors"
os.environ.setdefault("BENCH_ROOT", "/var/tmp/bench")
MTA_PORT = int(os.environ.get("MTA_PORT", "2535"))

# Where twisted-mta delivers user@example.test, relative to bench_load's
# MAILDIR_ROOT ($BENCH_ROOT/maildir): the bench config puts the spool at
# $BENCH_ROOT/maildir/twisted-mta and local mail goes to
# {spool}/mail/{domain}/{local}/.
MTA_MAILDIR = "twisted-mta/mail/example.test/user"

SERVER_ORDER = ["postfix", "twisted-mta", "aiosmtpd", "aiosmtpd-thread", "twisted",
                "twisted-fsync", "sink"]

# Targets from the issue: (scenario, metric, minimum ratio to Postfix).
TARGETS = [
    ("1k-s10", "delivered_per_s", 2.0, "1 KB x 10 sessions: messages/s >= 2.0x Postfix"),
    ("1k-s10-d", "delivered_per_s", 2.0, "1 KB x 10 reused sessions: messages/s >= 2.0x Postfix"),
    ("1k-s1", "delivered_per_s", 1.0, "1 KB x 1 session: messages/s >= 1.0x Postfix"),
    ("100k-s10", "delivered_per_s", 1.3, "100 KB x 10 sessions: messages/s >= 1.3x Postfix"),
    ("10m-s1", "MB_per_s", 1.2, "10 MB x 1 session: MB/s >= 1.2x Postfix"),
]
IDLE_TARGET_KB_EACH = 3.0
IDLE_TARGET_COUNT = 5000


def start_twistd(venv: str, config: str, log_path: str, cwd: str) -> subprocess.Popen:
    """``twistd -n mta --config CONFIG`` from ``venv``, its log appended to
    ``log_path`` through standard output, not --logfile: twistd's log file
    rotates at 1 MB, and the counts read the log from an offset."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [os.path.join(venv, "bin", "twistd"), "-n", "--pidfile=", "--logfile=-",
             "mta", "--config", config],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
        )


def import_bench_load():
    sys.path.insert(0, ANCHORS)
    import bench_load  # the anchors' script, unchanged

    bench_load.SERVERS["twisted-mta"] = (MTA_PORT, MTA_MAILDIR)
    return bench_load


def cmd_load(argv):
    bench_load = import_bench_load()
    sys.argv = ["bench_load.py", *argv]
    bench_load.main()


# ------------------------------------------------------------------ report
def load_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_attempts(rows):
    """Per (scenario, server, rep): the last attempt (earlier ones were
    re-run because other processes disturbed them)."""
    last = {}
    for r in rows:
        last[(r["scenario"], r["server"], r["rep"])] = r
    return last


def medians(rows):
    """{(scenario, server): summary} over the reps."""
    groups = {}
    for (scen, server, _), r in last_attempts(rows).items():
        groups.setdefault((scen, server), []).append(r)
    out = {}
    for key, rs in groups.items():
        n = rs[0]["count"]
        dl = [r["delivered_per_s"] for r in rs]
        med = statistics.median(dl)
        out[key] = {
            "reps": len(rs),
            "ok": sum(1 for r in rs if r["ok"]),
            "delivered_per_s": med,
            "spread": (max(dl) - min(dl)) / med * 100 if med else 0.0,
            "MB_per_s": statistics.median(r["MB_per_s"] for r in rs),
            "cpu_ms": statistics.median(r["server_cpu_s"] for r in rs) / n * 1000,
            "client_cpu_ms": statistics.median(r["client_cpu_s"] for r in rs) / n * 1000,
            "rss_mb": max(r["peak_rss_kb"] for r in rs) / 1024,
            "pss_mb": max(r.get("peak_pss_kb", 0) for r in rs) / 1024,
            "procs": max(r["peak_procs"] for r in rs),
            "foreign": max(r.get("foreign_user_cpu_s", 0) for r in rs),
            "contaminated": sum(1 for r in rs if r.get("contaminated")),
            "create_us": max((r.get("create_us") or 0) for r in rs),
            "tx": sum(r.get("eth_tx_pkts", 0) for r in rs),
        }
    return out


def scenario_order(rows):
    order = []
    for r in rows:
        if r["scenario"] not in order:
            order.append(r["scenario"])
    return order


def describe(rows, scen):
    r = next(x for x in rows if x["scenario"] == scen)
    size = r["size"]
    size_txt = ("%d MB" % (size // 1048576) if size >= 1048576
                else "%d KB" % (size // 1024) if size >= 1024 else "%d B" % size)
    return "%s x %d, %d session%s%s" % (
        size_txt, r["count"], r["sessions"], "" if r["sessions"] == 1 else "s",
        ", reused (-d)" if r["reuse"] else "")


def summary_table(rows):
    med = medians(rows)
    servers = [s for s in SERVER_ORDER if any(k[1] == s for k in med)]
    servers += sorted({k[1] for k in med} - set(servers))
    out = [("| scenario | server | ok | delivered msg/s | spread | MB/s | server CPU ms/msg "
            "| peak RSS MB (PSS) | procs | ratio to Postfix (msg/s) |"),
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scen in scenario_order(rows):
        pf = med.get((scen, "postfix"))
        for s in servers:
            m = med.get((scen, s))
            if not m:
                continue
            ratio = ("**%.2f**" % (m["delivered_per_s"] / pf["delivered_per_s"])
                     if pf and s != "postfix" and pf["delivered_per_s"] else "")
            out.append("| %s | %s | %d/%d | %.0f | %.0f%% | %.1f | %.2f | %.0f (%.0f) | %d | %s |" % (
                scen, s, m["ok"], m["reps"], m["delivered_per_s"], m["spread"], m["MB_per_s"],
                m["cpu_ms"], m["rss_mb"], m["pss_mb"], m["procs"], ratio))
    return "\n".join(out) + "\n"


def matrix(rows):
    med = medians(rows)
    scens = scenario_order(rows)
    servers = [s for s in SERVER_ORDER if any(k[1] == s for k in med)]
    out = ["| server | " + " | ".join(scens) + " |", "|---|" + "---:|" * len(scens)]
    for s in servers:
        cells = []
        for sc in scens:
            m = med.get((sc, s))
            cells.append("%.0f" % m["delivered_per_s"] if m else "")
        out.append("| %s | %s |" % (s, " | ".join(cells)))
    if "postfix" in servers and "twisted-mta" in servers:
        cells = []
        for sc in scens:
            a, b = med.get((sc, "twisted-mta")), med.get((sc, "postfix"))
            cells.append("%.2f" % (a["delivered_per_s"] / b["delivered_per_s"]) if a and b else "")
        out.append("| **twisted-mta / postfix** | %s |" % " | ".join(cells))
    return "\n".join(out) + "\n"


def idle_rows(results):
    return load_jsonl(os.path.join(results, "idle.jsonl"))


def idle_table(idle):
    out = [("| server | asked | got banner | open at end | RSS before -> during MB "
            "| growth RSS MB | growth PSS MB | kB/conn (RSS) | procs | listen overflows |"),
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in idle:
        b, d = r["mem_before"], r["mem_during"]
        out.append("| %s | %d | %d | %d | %.1f -> %.1f | %.1f | %.1f | %s | %d | %s |" % (
            r["label"], r["requested"], r["ever_got_banner"], r["open_with_banner_at_end"],
            b["rss_kb"] / 1024, d["rss_kb"] / 1024, (d["rss_kb"] - b["rss_kb"]) / 1024,
            (d["pss_kb"] - b["pss_kb"]) / 1024, r["rss_kb_per_open_conn"], d["procs"],
            r.get("kernel", {}).get("ListenOverflows", "?")))
    return "\n".join(out) + "\n"


def targets(rows, idle):
    med = medians(rows)
    out = ["| target | twisted-mta | Postfix | ratio | met? |", "|---|---:|---:|---:|---|"]
    verdicts = []
    for scen, metric, need, text in TARGETS:
        a, b = med.get((scen, "twisted-mta")), med.get((scen, "postfix"))
        if not a or not b:
            out.append("| %s | n/a | n/a | | not measured |" % text)
            continue
        ratio = a[metric] / b[metric] if b[metric] else float("inf")
        unit = "msg/s" if metric == "delivered_per_s" else "MB/s"
        met = ratio >= need and a["ok"] == a["reps"]
        verdicts.append(met)
        out.append("| %s | %.1f %s | %.1f %s | %.2f | %s |" % (
            text, a[metric], unit, b[metric], unit, ratio, "**yes**" if met else "**NO**"))
    mine = [r for r in idle if r["label"].startswith("twisted-mta")
            and r["requested"] >= IDLE_TARGET_COUNT]
    if mine:
        r = mine[-1]
        growth_kb = r["mem_during"]["rss_kb"] - r["mem_before"]["rss_kb"]
        held = r["open_with_banner_at_end"]
        each = growth_kb / max(held, 1)
        met = each <= IDLE_TARGET_KB_EACH and held >= IDLE_TARGET_COUNT
        out.append("| %d idle sessions, all held, <= %.0f kB each (RSS growth) "
                   "| %d held, +%.1f MB, %.1f kB each | | | %s |"
                   % (IDLE_TARGET_COUNT, IDLE_TARGET_KB_EACH, held, growth_kb / 1024, each,
                      "**yes**" if met else "**NO**"))
    else:
        out.append("| %d idle sessions, <= %.0f kB each | not measured | | | |"
                   % (IDLE_TARGET_COUNT, IDLE_TARGET_KB_EACH))
    return "\n".join(out) + "\n"


def detail_table(rows):
    """The anchors' report.py table, with twisted-mta in its server order."""
    sys.path.insert(0, ANCHORS)
    import report  # the anchors' report.py

    report.SERVER_ORDER = SERVER_ORDER
    return report.load_table(rows, "Per-scenario details (anchors' report.py format)")


def cmd_report(argv):
    ap = argparse.ArgumentParser(prog="bench.py report")
    ap.add_argument("--results", required=True)
    ap.add_argument("--date", default="")
    args = ap.parse_args(argv)
    rows = load_jsonl(os.path.join(args.results, "load.jsonl"))
    idle = idle_rows(args.results)
    parts = []
    if args.date:
        parts.append("Run: %s\n" % args.date)
    if rows:
        parts.append("### Delivered messages/s (median of reps)\n\n" + matrix(rows))
        parts.append("Scenarios: " + "; ".join(
            "`%s` = %s" % (s, describe(rows, s)) for s in scenario_order(rows)) + ".\n")
        parts.append("### Per scenario and server\n\n" + summary_table(rows))
    parts.append("### Targets\n\n" + targets(rows, idle))
    if idle:
        parts.append("### Idle connections (idle_conns.py)\n\n" + idle_table(idle))
    if rows:
        bad = [r for r in rows if not r["ok"]]
        cont = sum(1 for r in last_attempts(rows).values() if r.get("contaminated"))
        tx = sum(r.get("eth_tx_pkts", 0) for r in rows)
        parts.append("Runs: %d (incl. re-runs), failed checks: %d, kept runs still disturbed "
                     "by other processes: %d, non-loopback TX packets (machine-wide): %d, "
                     "file-creation probe max %.0f us.\n" % (
                         len(rows), len(bad), cont, tx,
                         max((r.get("create_us") or 0) for r in rows)))
        parts.append(detail_table(rows))
    print("\n".join(parts))


# ------------------------------------------------------------------ py-spy
def _frame_name(frame):
    """'func (path/to/file.py:123)' -> 'func (file.py)'; thread frames as is."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return "%s (%s)" % (name, short) if where else name


def cmd_pyspy(argv):
    """Summarise a py-spy --format raw (collapsed stacks) file."""
    ap = argparse.ArgumentParser(prog="bench.py pyspy")
    ap.add_argument("raw")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    total = 0
    threads, own, incl, modules = {}, {}, {}, {}
    with open(args.raw) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            total += n
            thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
            if thread != "?":
                frames = frames[1:]
            threads[thread] = threads.get(thread, 0) + n
            names = [_frame_name(fr) for fr in frames]
            if names:
                own[names[-1]] = own.get(names[-1], 0) + n
                leaf_file = frames[-1].partition(" (")[2].rsplit(":", 1)[0]
                mod = ("twisted_mta" if "twisted_mta" in leaf_file
                       else "twisted" if "/twisted/" in leaf_file
                       else "stdlib/other")
                modules[mod] = modules.get(mod, 0) + n
            for name in set(names):
                incl[name] = incl.get(name, 0) + n
    if not total:
        print("no samples")
        return

    def pct(v):
        return 100.0 * v / total

    print("samples: %d\n" % total)
    print("By thread:")
    for k, v in sorted(threads.items(), key=lambda kv: -kv[1]):
        print("  %5.1f%%  %s" % (pct(v), k))
    print("\nSelf time by code the leaf frame is in:")
    for k, v in sorted(modules.items(), key=lambda kv: -kv[1]):
        print("  %5.1f%%  %s" % (pct(v), k))
    print("\nSelf time (leaf frame), top %d:" % args.top)
    for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:args.top]:
        print("  %5.1f%%  %s" % (pct(v), k))
    print("\nInclusive time (function on the stack), top %d:" % (args.top + 10))
    for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:args.top + 10]:
        print("  %5.1f%%  %s" % (pct(v), k))


# ------------------------------------------------------------------ threads
def _task_cpu(pid):
    """{tid: (utime_s, stime_s)} for every thread of pid."""
    clk = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()
        out[int(tid)] = (int(rest[11]) / clk, int(rest[12]) / clk)
    return out


def cmd_threads(argv):
    """CPU per thread (user / system) of PID while a command runs:
    bench.py threads PID MESSAGES -- smtp-source ..."""
    import time

    pid, count = int(argv[0]), int(argv[1])
    cmd = argv[argv.index("--") + 1:]
    before = _task_cpu(pid)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    time.sleep(0.2)
    after = _task_cpu(pid)
    print("wall %.2f s, %d messages, %.0f msg/s" % (wall, count, count / wall))
    print("%-10s %12s %12s %12s   (ms per message)" % ("thread", "user", "system", "total"))
    tot_u = tot_s = 0.0
    for tid in sorted(after):
        u0, s0 = before.get(tid, (0.0, 0.0))
        u, s = after[tid][0] - u0, after[tid][1] - s0
        if u + s == 0:
            continue
        tot_u, tot_s = tot_u + u, tot_s + s
        name = "main" if tid == pid else "tid %d" % tid
        print("%-10s %12.3f %12.3f %12.3f" % (name, u / count * 1e3, s / count * 1e3,
                                               (u + s) / count * 1e3))
    print("%-10s %12.3f %12.3f %12.3f" % ("all", tot_u / count * 1e3, tot_s / count * 1e3,
                                           (tot_u + tot_s) / count * 1e3))


def main():
    cmds = {"load": cmd_load, "report": cmd_report, "pyspy": cmd_pyspy,
            "threads": cmd_threads}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmds[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
