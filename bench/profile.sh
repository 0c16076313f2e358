#!/bin/bash
# Where does twisted-mta spend its time?  Profiles a separate instance
# (127.0.0.1:$PROF_PORT, spool $BENCH_ROOT/maildir/twisted-mta-prof) under
#   1k : smtp-source 2000 x 1 KB, 10 sessions (a connection per message)
#   10m: smtp-source 10 x 10 MB, 1 session
# three times, one after the other, each on a fresh instance:
#   threads: no profiler; CPU (user/system) per thread from /proc: the
#           reactor thread vs the committer thread -> threads-LOAD.txt
#   py-spy --gil (sampling the thread that holds the GIL, i.e. Python CPU,
#           little overhead): self and inclusive shares -> pyspy-LOAD.txt
#   cProfile (twistd --profiler=cprofile, reactor thread only, ~2x overhead):
#           call counts and per-call costs -> cprofile-LOAD.txt
# Run it with nothing else measuring (it loads the 2 cores).  Needs run.sh's
# setup (smtp-source, rendered config) to have run once.
#
#   bash bench/profile.sh            # both loads
#   LOADS=10m bash bench/profile.sh
#   PROF_OUT=/var/tmp/bench/profile   (default $BENCH_ROOT/profile/<date>)
#   MTA_SRC=/path/to/other/checkout   profile that tree instead (PYTHONPATH),
#                                     e.g. a scratch copy with a patch to try
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export BENCH_ROOT=${BENCH_ROOT:-/var/tmp/bench}
MTA_VENV=${MTA_VENV:-/tmp/venv}
PROF_PORT=${PROF_PORT:-2536}
LOADS=${LOADS:-"1k 10m"}
PROF_OUT=${PROF_OUT:-$BENCH_ROOT/profile/$(date +%Y%m%d-%H%M%S)}
SPOOL=$BENCH_ROOT/maildir/twisted-mta-prof
RUN_DIR=$BENCH_ROOT/run
CONF=$RUN_DIR/mta-prof.toml
PID_FILE=$RUN_DIR/twisted-mta-prof.pid
mkdir -p "$PROF_OUT" "$RUN_DIR" "$BENCH_ROOT/trash"
ulimit -n "$(ulimit -Hn)"

[ -x "$MTA_VENV/bin/py-spy" ] || "$MTA_VENV/bin/pip" install -q py-spy
sed -e "s|^spool = .*|spool = \"$SPOOL\"|" \
    -e "s|^file = \"users\"|file = \"$BENCH_DIR/users\"|" \
    -e "s|tcp:2535:|tcp:$PROF_PORT:|" \
    "$BENCH_DIR/mta-bench.toml" >"$CONF"

wait_port() {
    for _ in $(seq 150); do
        ss -ltn "sport = :$1" | grep -q LISTEN && return 0; sleep 0.1
    done; echo "nothing on $1" >&2; return 1
}

PID=""
stop_mta() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill "$PID"; wait "$PID" 2>/dev/null || true
    fi
    PID=""
}
trap stop_mta EXIT

start_mta() {  # extra twistd options...
    rm -f "$PID_FILE"
    PYTHONPATH=${MTA_SRC:-} "$MTA_VENV/bin/twistd" -n --pidfile "$PID_FILE" --logfile "$PROF_OUT/twistd.log" "$@" \
        mta --config "$CONF" >>"$PROF_OUT/twistd.out" 2>&1 &
    PID=$!
    wait_port "$PROF_PORT"
}

load_cmd() {  # 1k | 10m
    local args=(-s 10 -m 2000 -l 1024)
    [ "$1" = 10m ] && args=(-s 1 -m 10 -l 10485760)
    echo smtp-source "${args[@]}" -f sender@example.org -t user@example.test -M client.test \
        "127.0.0.1:$PROF_PORT"
}
load() { $(load_cmd "$1"); }
settle() {  # flush dirty pages and wait for an idle disk, like bench_load.py
    python3 -c "import sys; sys.path.insert(0, '$BENCH_DIR'); import bench; bl = bench.import_bench_load(); bl.settle(); bl.wait_quiet({$PID}, max_wait=120)"
}
count_of() { [ "$1" = 10m ] && echo 10 || echo 2000; }

warm() {  # one message: creates the maildir, imports everything
    smtp-source -m 1 -l 1024 -f sender@example.org -t user@example.test -M client.test \
        "127.0.0.1:$PROF_PORT"
}

aside() {  # move the profiling maildir away (no unlinks)
    [ -d "$SPOOL/mail" ] && mv "$SPOOL/mail" "$BENCH_ROOT/trash/prof-mail.$(date +%s%N)" || true
}

echo "source: ${MTA_SRC:-$(cd "$BENCH_DIR/.." && pwd) (git $(git -C "$BENCH_DIR/.." rev-parse --short HEAD), $(git -C "$BENCH_DIR/.." status --short -- twisted_mta | wc -l) files changed)}" | tee "$PROF_OUT/source.txt"
for l in $LOADS; do
    aside
    echo "== CPU per thread, $l (no profiler)"
    start_mta
    warm
    settle
    python3 "$BENCH_DIR/bench.py" threads "$PID" "$(count_of "$l")" -- $(load_cmd "$l") \
        | tee "$PROF_OUT/threads-$l.txt"
    stop_mta

    aside
    echo "== py-spy --gil, $l"
    start_mta
    warm
    "$MTA_VENV/bin/py-spy" record --pid "$PID" --rate 500 --format raw --threads --gil \
        --output "$PROF_OUT/pyspy-$l.raw" >"$PROF_OUT/pyspy-$l.log" 2>&1 &
    SPY=$!
    settle
    t0=$(date +%s.%N)
    load "$l"
    t1=$(date +%s.%N)
    kill -INT "$SPY"; wait "$SPY" || true
    echo "   load took $(echo "$t1 - $t0" | bc) s under py-spy"
    stop_mta
    python3 "$BENCH_DIR/bench.py" pyspy "$PROF_OUT/pyspy-$l.raw" >"$PROF_OUT/pyspy-$l.txt"
    sed -n '1,45p' "$PROF_OUT/pyspy-$l.txt"

    aside
    echo "== cProfile (reactor thread), $l"
    start_mta --profile="$PROF_OUT/cprofile-$l.prof" --profiler=cprofile --savestats
    warm
    settle
    load "$l"
    stop_mta
    "$MTA_VENV/bin/python" - "$PROF_OUT/cprofile-$l.prof" >"$PROF_OUT/cprofile-$l.txt" <<'EOF'
import pstats, sys
s = pstats.Stats(sys.argv[1])
s.sort_stats("tottime").print_stats(30)
s.sort_stats("cumulative").print_stats(40)
EOF
    grep -vE '^\s*$' "$PROF_OUT/cprofile-$l.txt" | sed -n '1,40p'
done
aside
echo "profiles in $PROF_OUT"
