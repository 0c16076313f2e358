"""Run the real ``twistd -n mta`` in a subprocess for end-to-end tests.

Listeners bind port 0; the daemon logs ``listening: KIND on HOST:PORT`` and
the harness reads those lines from its output, so no port is fixed and no
test sleeps to wait for a server.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

from twisted.logger import eventFromJSON, formatEvent

TWISTD = str(Path(sys.executable).with_name("twistd"))
_LISTENING = re.compile(r"listening: (\w+) on ([\d.:a-f]+):(\d+)")
START_TIMEOUT = 30.0


def base_config(root: Path, *, hostname: str = "mx.example.test", extra: str = "") -> str:
    """A config listening on free loopback ports, spool under ``root``."""
    return f"""
hostname = "{hostname}"
spool = "var"

[listen]
smtp = ["tcp:0:interface=127.0.0.1"]
submission = ["tcp:0:interface=127.0.0.1"]
submissions = ["tcp:0:interface=127.0.0.1"]

[domains]
local = ["example.test", "localhost"]

[users]
file = "users"

[aliases]
file = "aliases"
{extra}
"""


@dataclass
class Daemon:
    """One running server, its folder and its log."""

    root: Path
    config: Path
    process: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def spool(self) -> Path:
        return self.root / "var"

    def start(
        self,
        extra_args: tuple[str, ...] = (),
        twistd_args: tuple[str, ...] = (),
        launcher: tuple[str, ...] = (),
    ) -> "Daemon":
        """Start ``[launcher] twistd [twistd_args] mta --config FILE [extra_args]``."""
        self.ports = {}
        command = [
            *launcher,
            TWISTD, "-n", "--pidfile=", *twistd_args, "mta", "--config", str(self.config), *extra_args
        ]
        self.process = subprocess.Popen(
            command,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read_output, args=(self.process,), daemon=True).start()
        kinds = {"smtp", "submission", "submissions"}
        self.wait_for(lambda: kinds <= self.ports.keys() or self.process.poll() is not None)
        if not kinds <= self.ports.keys():
            self.kill()  # a launcher may still be waiting
            raise RuntimeError("daemon did not start:\n" + "\n".join(self.log[-30:]))
        return self

    def _read_output(self, process: subprocess.Popen) -> None:
        with open(self.root / "daemon.log", "a", encoding="utf-8") as copy:
            for raw in process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith("\x1e"):
                    # A JSON record of twistd --logger twisted_mta.logs.json_lines.
                    event = eventFromJSON(line[1:])
                    self.events.append(event)
                    line = formatEvent(event)
                copy.write(line + "\n")
                copy.flush()
                with self._changed:
                    self.log.append(line)
                    match = _LISTENING.search(line)
                    if match:
                        self.ports[match.group(1)] = int(match.group(3))
                    self._changed.notify_all()
        # Reaped first, so that a waiter woken here sees the process gone.
        process.wait()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, condition, timeout: float = START_TIMEOUT) -> bool:
        """Wait until ``condition()`` holds, woken by each new log line."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> str:
        regex = re.compile(pattern)
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.log if regex.search(line)]
            return bool(found)

        if not self.wait_for(seen, timeout):
            raise AssertionError(f"no log line matching {pattern!r}:\n" + "\n".join(self.log[-20:]))
        return found[-1]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash or power loss of the process."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def smtp(self, listener: str = "smtp", **kwargs) -> smtplib.SMTP:
        if listener == "submissions":
            return smtplib.SMTP_SSL(
                "127.0.0.1", self.ports[listener], context=insecure_context(), timeout=30, **kwargs
            )
        return smtplib.SMTP("127.0.0.1", self.ports[listener], timeout=30, **kwargs)

    def maildir(self, domain: str, local: str) -> Path:
        return self.spool / "mail" / domain / local

    def messages(self, domain: str, local: str) -> list[bytes]:
        new = self.maildir(domain, local) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Whether ``condition`` holds within ``timeout``, for what no log line
    tells (a slot given back, a count scraped, a file gone)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


_LOOPBACK_HOSTS = count(2)


def fresh_client_address() -> str:
    """A loopback address no other client of this test run has used.

    AUTH failures count per client address across connections; a test
    whose clients come from their own address starts with a clean slate.
    """
    number = next(_LOOPBACK_HOSTS)
    return f"127.0.{number // 250}.{number % 250 + 2}"


def insecure_context() -> ssl.SSLContext:
    """A client context that accepts the daemon's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# Tests must never ask the machine's resolver (its DNS server is not on
# loopback): every daemon gets a resolver on 127.0.0.1 unless a test names
# its own.  Port 9 (discard) answers nothing, so lookups fail as temporary.
NO_DNS = 'resolvers = ["127.0.0.1:9"]'


def with_loopback_resolver(extra: str) -> str:
    if "resolvers" in extra:
        return extra
    if "[relay]" in extra:
        return extra.replace("[relay]", f"[relay]\n{NO_DNS}", 1)
    return f"{extra}\n[relay]\n{NO_DNS}\n"


def make_daemon(
    root: Path,
    *,
    users: str = "",
    aliases: str = "",
    extra: str = "",
    hostname: str = "mx.example.test",
) -> Daemon:
    root.mkdir(parents=True, exist_ok=True)
    (root / "users").write_text(users)
    (root / "aliases").write_text(aliases)
    config = root / "mta.toml"
    config.write_text(base_config(root, hostname=hostname, extra=with_loopback_resolver(extra)))
    return Daemon(root, config)


def running_daemon(root: Path, **kwargs) -> Iterator[Daemon]:
    daemon = make_daemon(root, **kwargs).start()
    try:
        yield daemon
    finally:
        daemon.stop()


_QUEUED = re.compile(rb"queued as (\w+)")


def send(daemon: Daemon, sender: str, recipients: list[str], message: bytes) -> str:
    """Send one message whose recipients must all be accepted; its queue id."""
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        assert client.mail(sender)[0] == 250
        for recipient in recipients:
            reply = client.rcpt(recipient)
            assert reply[0] == 250, (recipient, reply)
        code, text = client.data(message)
    assert code == 250, (code, text)
    return queue_id(text)


def queue_id(reply: bytes) -> str:
    """The id in a ``250 2.0.0 Ok: queued as ID`` reply."""
    match = _QUEUED.search(reply)
    assert match, reply
    return match.group(1).decode()


def failed_start(daemon: Daemon) -> tuple[int, list[str]]:
    """Start ``daemon`` expecting it to refuse: its exit code and its
    ``twistd mta:`` lines."""
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mta", "--config", str(daemon.config)],
        cwd=daemon.root, capture_output=True, text=True, timeout=60,
    )
    return result.returncode, [
        line for line in result.stderr.splitlines() if line.startswith("twistd mta:")
    ]


def installed_plugins() -> dict[str, str]:
    """``twistd mta --help-plugins``: each plugin's name and description."""
    result = subprocess.run(
        [TWISTD, "mta", "--help-plugins"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(None, 1) for line in result.stdout.splitlines())
