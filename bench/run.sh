#!/bin/bash
# twisted-mta side by side with Postfix and aiosmtpd (the anchors' method).
#
#   bash bench/run.sh              # setup, servers, load, idle, report, stop, clean
#   REPS=1 bash bench/run.sh       # quick pass (~8 min; REPS=3 ~20 min)
#   bash bench/run.sh stop         # stop every server this script starts
#   bash bench/run.sh clean        # remove $BENCH_ROOT/trash (can be tens of GB)
#
# Environment (defaults):
#   BENCH_ROOT=/var/tmp/bench      maildirs, pid files, logs, trash, results
#   BENCH_ANCHORS=/work/shared/bench-anchors
#   MTA_VENV=/tmp/venv             venv with twisted-mta (made + pip install -e if absent)
#   MTA_PORT=2535                  twisted-mta's SMTP listener on 127.0.0.1
#   REPS=3                         repetitions, interleaved server by server
#   SERVERS="postfix twisted-mta aiosmtpd"
#   SCENARIOS="1k-s1=1024:2000:1 ..."     NAME=SIZE:COUNT:SESSIONS[:d]
#   IDLE=1 IDLE_COUNT=5000 HOLD=20 RATE=500   idle-connection test
#   CLEAN=1                        delete $BENCH_ROOT/trash at the end
#   MTA_EXTRA=""                   TOML appended to twisted-mta's bench config
#   OUT=$BENCH_ROOT/results/<date>  where load.jsonl, idle.jsonl, report.md go
#
# Everything listens on and talks to 127.0.0.1 only.  Never unlinks during a
# measurement (see shared/bench-anchors/README.md: ext4 without a journal).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
export BENCH_ROOT=${BENCH_ROOT:-/var/tmp/bench}
export BENCH_ANCHORS=${BENCH_ANCHORS:-$(cd "$REPO/../shared/bench-anchors" 2>/dev/null && pwd || echo /work/shared/bench-anchors)}
export MTA_PORT=${MTA_PORT:-2535}
MTA_VENV=${MTA_VENV:-/tmp/venv}
REPS=${REPS:-3}
SERVERS=${SERVERS:-"postfix twisted-mta aiosmtpd"}
SCENARIOS=${SCENARIOS:-"1k-s1=1024:2000:1 1k-s10=1024:2000:10 1k-s50=1024:2000:50
 1k-s1-d=1024:2000:1:d 1k-s10-d=1024:2000:10:d 1k-s50-d=1024:2000:50:d
 100k-s10=102400:1000:10 10m-s1=10485760:10:1"}
IDLE=${IDLE:-1}
IDLE_COUNT=${IDLE_COUNT:-5000}
HOLD=${HOLD:-20}
RATE=${RATE:-500}
CLEAN=${CLEAN:-1}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$BENCH_ROOT/results/$STAMP}

RUN_DIR=$BENCH_ROOT/run
LOG_DIR=$BENCH_ROOT/log
MTA_SPOOL=$BENCH_ROOT/maildir/twisted-mta
MTA_CONF=$RUN_DIR/mta-bench.toml
MTA_PID=$RUN_DIR/twisted-mta.pid
PY=/usr/bin/python3

log() { echo "== $(date +%H:%M:%S) $*"; }

wait_port() {   # wait until something listens on 127.0.0.1:$1
    for _ in $(seq 150); do
        ss -ltn "sport = :$1" | grep -q LISTEN && return 0
        sleep 0.1
    done
    echo "nothing listening on 127.0.0.1:$1" >&2
    return 1
}

# ------------------------------------------------------------------ setup
setup() {
    log "setup: Debian postfix (smtp-source), aiosmtpd venv, Postfix on 127.0.0.1:2525"
    bash "$BENCH_ANCHORS/setup.sh" >"$LOG_DIR/setup.log" 2>&1 || {
        cat "$LOG_DIR/setup.log" >&2; exit 1; }
    if [ ! -x "$MTA_VENV/bin/twistd" ]; then
        log "setup: venv $MTA_VENV with twisted-mta (editable)"
        python3 -m venv "$MTA_VENV"
        "$MTA_VENV/bin/pip" install -q -e "$REPO"
    fi
    "$MTA_VENV/bin/python" -c 'import twisted_mta' 
    # The bench config with spool and users file made absolute.
    sed -e "s|^spool = .*|spool = \"$MTA_SPOOL\"|" \
        -e "s|^file = \"users\"|file = \"$BENCH_DIR/users\"|" \
        -e "s|tcp:2535:|tcp:$MTA_PORT:|" \
        "$BENCH_DIR/mta-bench.toml" >"$MTA_CONF"
    # MTA_EXTRA: TOML appended to the bench config (e.g. [plugins] to enable).
    if [ -n "${MTA_EXTRA:-}" ]; then printf '\n%s\n' "$MTA_EXTRA" >>"$MTA_CONF"; fi
    "$MTA_VENV/bin/twisted-mta" check-config --config "$MTA_CONF" >/dev/null
}

# ------------------------------------------------------------------ servers
start_mta() {
    mkdir -p "$MTA_SPOOL"
    if [ -f "$MTA_PID" ] && kill -0 "$(cat "$MTA_PID")" 2>/dev/null; then return 0; fi
    rm -f "$MTA_PID"
    "$MTA_VENV/bin/twistd" -n --pidfile "$MTA_PID" --logfile "$LOG_DIR/twisted-mta.log" \
        mta --config "$MTA_CONF" >"$LOG_DIR/twisted-mta.out" 2>&1 &
    wait_port "$MTA_PORT"
    for _ in $(seq 50); do [ -s "$MTA_PID" ] && break; sleep 0.1; done
    echo "started twisted-mta (pid $(cat "$MTA_PID"))"
}

stop_mta() {
    local pid
    pid=$(cat "$MTA_PID" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped twisted-mta (pid $pid)"
    fi
    rm -f "$MTA_PID"
}

start_server() {
    case "$1" in
    twisted-mta) start_mta ;;
    *) bash "$BENCH_ANCHORS/servers.sh" start "$1" ;;
    esac
}

stop_server() {
    case "$1" in
    twisted-mta) stop_mta ;;
    *) bash "$BENCH_ANCHORS/servers.sh" stop "$1" ;;
    esac
}

stop_all() {
    for s in $SERVERS; do stop_server "$s" || true; done
}

port_of() {
    case "$1" in
    postfix) echo 2525 ;; twisted-mta) echo "$MTA_PORT" ;; aiosmtpd) echo 2527 ;;
    aiosmtpd-thread) echo 2528 ;; twisted) echo 2526 ;; twisted-fsync) echo 2529 ;;
    *) echo "unknown server $1" >&2; return 1 ;;
    esac
}

pid_of() {
    case "$1" in
    twisted-mta) cat "$MTA_PID" ;;
    *) bash "$BENCH_ANCHORS/servers.sh" pid "$1" ;;
    esac
}

smoke() {   # one message to each server; creates the maildirs
    local s
    for s in $SERVERS; do
        smtp-source -m 1 -l 1024 -f sender@example.org -t user@example.test \
            -M client.test "127.0.0.1:$(port_of "$s")" || {
            echo "smoke test: $s refused a message" >&2; exit 1; }
    done
    sleep 2   # Postfix delivers asynchronously
}

# ------------------------------------------------------------------ idle
idle_one() {  # server
    local s=$1 pid
    case "$s" in
    postfix) postfix reload >/dev/null 2>&1; sleep 3 ;;   # cold smtpd pool
    *) stop_server "$s" >/dev/null; start_server "$s" >/dev/null; sleep 1 ;;
    esac
    pid=$(pid_of "$s")
    log "idle: $s, $IDLE_COUNT connections at $RATE/s, held ${HOLD}s"
    "$PY" "$BENCH_ANCHORS/idle_conns.py" --label "$s-$IDLE_COUNT" --port "$(port_of "$s")" \
        --pid "$pid" --count "$IDLE_COUNT" --hold "$HOLD" --rate "$RATE" >>"$OUT/idle.jsonl"
    sleep 3
}

clean() {
    if [ -d "$BENCH_ROOT/trash" ]; then
        log "clean: removing $BENCH_ROOT/trash ($(du -sh "$BENCH_ROOT/trash" 2>/dev/null | cut -f1))"
        rm -rf "$BENCH_ROOT/trash"
        echo "  (let the disk rest a few minutes before measuring anything file-heavy)"
    fi
}

# ------------------------------------------------------------------ main
mkdir -p "$RUN_DIR" "$LOG_DIR"
ulimit -n "$(ulimit -Hn)"   # 5000 idle client + 5000 server sockets
case "${1:-all}" in
stop) stop_all; exit 0 ;;
clean) clean; exit 0 ;;
all) ;;
*) echo "usage: run.sh [all|stop|clean]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
setup
trap 'stop_all' EXIT
guard_tx() { awk -F'[: ]+' '$2!="lo" && NF>10 {s+=$12} END {print s+0}' /proc/net/dev; }
TX0=$(guard_tx)

log "servers: $SERVERS"
postfix status >/dev/null 2>&1 && postfix reload >/dev/null 2>&1 || true
for s in $SERVERS; do start_server "$s"; done
smoke
{
    echo "date: $(date -Is)"; echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty tree)')"
    echo "twisted_mta sources: $(cd "$REPO" && find twisted_mta -name '*.py' | sort | xargs cat | sha256sum | cut -c1-12) ($(git -C "$REPO" status --short -- twisted_mta | wc -l) files differ from git)"
    echo "reps: $REPS servers: $SERVERS"; echo "scenarios: $(echo $SCENARIOS)"
    echo "kernel: $(uname -r) cpus: $(nproc)"
    "$MTA_VENV/bin/python" -c 'import sys, twisted; print("python", sys.version.split()[0], "twisted", twisted.__version__)'
} >"$OUT/meta.txt"

log "load: $REPS rep(s); results in $OUT/load.jsonl"
scen_args=()
for sc in $SCENARIOS; do scen_args+=(--scenario "$sc"); done
"$PY" "$BENCH_DIR/bench.py" load --reps "$REPS" --servers "$(echo $SERVERS | tr ' ' ,)" \
    "${scen_args[@]}" --out "$OUT/load.jsonl"

if [ "$IDLE" = 1 ]; then
    for s in $SERVERS; do idle_one "$s"; done
fi

log "stopping servers"
stop_all
trap - EXIT
TX1=$(guard_tx)
echo "non-loopback TX packets during the run (machine-wide): $((TX1 - TX0))" | tee -a "$OUT/meta.txt"
"$PY" "$BENCH_DIR/bench.py" report --results "$OUT" --date "$(date '+%Y-%m-%d %H:%M') $(cat "$OUT/meta.txt" | sed -n 2p)" >"$OUT/report.md"
log "report: $OUT/report.md"
cat "$OUT/report.md"
if [ "$CLEAN" = 1 ]; then clean; fi
