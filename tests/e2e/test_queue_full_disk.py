"""A full disk under the queue: bookkeeping goes on in memory, cleanly.

The queue lives on a small tmpfs (root only; skipped otherwise).  Once it
is full, a delivery attempt's results cannot be written: the daemon says
so in one line, keeps the backoff in memory (no retry storm), leaves no
temporary files, and writes everything once there is room again.  The
queue command answers with one line instead of a traceback.
"""

from __future__ import annotations

import errno
import re
import subprocess
import time
from pathlib import Path

from tests.helpers.daemon import make_daemon, send
from tests.helpers.queue_command import CLI, UNROUTABLE
from tests.helpers.tmpfs import tmpfs

# The same unreachable smart host, retried after 1 s and doubling, so the
# backoff shows within seconds.
EXTRA = UNROUTABLE.replace('"1h"', '"1s"').replace('"2h"', '"1h"')


def fill(folder: Path) -> Path:
    """Write into ``folder`` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"x" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def queue_command(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "queue", *args, "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=60,
    )


def test_a_full_queue_disk_keeps_the_backoff_and_leaves_no_litter(tmp_path):
    daemon = make_daemon(tmp_path / "mta", extra=EXTRA)
    with tmpfs(daemon.spool / "queue") as queue:
        daemon.start()
        try:
            queue_id = send(daemon, "s@example.org", ["friend@remote.example"], b"Subject: x\r\n\r\nx\r\n")
            deferred = re.compile(rf"id={queue_id} .*status=deferred \(4\.4\.1 ")
            attempts_seen: list[float] = []

            def wait_for_attempt(number: int) -> None:
                assert daemon.wait_for(
                    lambda: sum(bool(deferred.search(line)) for line in daemon.log) >= number, 30
                ), "\n".join(daemon.log[-20:])
                attempts_seen.append(time.monotonic())

            wait_for_attempt(1)  # written: attempts 1, due again in 1 s
            filler = fill(queue)
            wait_for_attempt(2)  # not written: in memory, due again in 2 s
            daemon.wait_for_log(rf"id={queue_id} queue file not updated \(No space left on device\)")
            wait_for_attempt(3)
            gap = attempts_seen[2] - attempts_seen[1]
            print(f"gap between the 2nd and 3rd attempt on a full disk: {gap:.2f}s")
            assert gap > 1.5, "retried without backoff"

            flushed = queue_command(daemon, "flush")
            assert flushed.returncode == 1
            assert flushed.stderr.strip().endswith("No space left on device")
            assert "Traceback" not in flushed.stderr and len(flushed.stderr.splitlines()) == 1

            filler.unlink()
            assert queue_command(daemon, "flush").returncode == 0
            wait_for_attempt(4)
            listed = queue_command(daemon, "list")
            assert "after 4 attempt(s)" in listed.stdout or "after 5 attempt(s)" in listed.stdout, listed.stdout
            assert not [p.name for p in queue.iterdir() if p.name.endswith(".tmp")]
            assert "Traceback" not in "\n".join(daemon.log)
        finally:
            daemon.stop()
