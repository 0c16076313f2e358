"""Tools for the relay's end-to-end tests (``test_e2e_relay.py``).

* :class:`DNSServer`: ``tests/dns_server.py`` in a subprocess, serving a
  zone given as a dict, on a free port of 127.0.0.1;
* :class:`FailingDNS`: a name server in a thread that answers SERVFAIL
  where asked to;
* :class:`CaptureGroup`: capture SMTP servers on one port shared by several
  loopback addresses (``[relay] mx_port`` is one number for every MX);
* :func:`relay_config`: the ``[relay]`` and ``[queue]`` tables of a test
  daemon, with tiny retry times;
* readers of the daemon's log, its queue envelopes and the DSNs it sends,
  and :func:`submit`, which sends a message the way a user would.

Everything runs on loopback addresses: the daemon never asks the machine's
resolver, and no test talks to anything outside 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Self

from twisted.names import dns

from tests.helpers.capture import Behaviour, CaptureServer, Session, Transaction
from tests.helpers.daemon import Daemon, insecure_context, queue_id

HERE = Path(__file__).parent
CLI = str(Path(sys.executable).with_name("twisted-mta"))
DOWN = "127.0.0.9"  # an address nothing listens on, in every test
WAIT = 20.0
_LINK_ATTEMPTS = 20


# -- DNS


class DNSServer:
    """``dns_server.py`` serving ``zones`` ({name: [[TYPE, ...], ...]})."""

    def __init__(self, directory: Path, zones: Mapping[str, list]) -> None:
        self.path = Path(directory) / "zones.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(zones))
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        # The server takes a free UDP port, then TCP on the same number,
        # which may be taken: then it exits, and another try is made.
        for _ in range(_LINK_ATTEMPTS):
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "dns_server.py"), str(self.path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            first = self.process.stdout.readline().decode()
            if first.startswith("port "):
                self.port = int(first.split()[1])
                return self
            errors = self.process.communicate(timeout=10)[1].decode()
        raise RuntimeError(f"DNS server did not start: {errors[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class FailingDNS:
    """A DNS server in a thread that answers SERVFAIL to ``failing``
    ((name, TYPE) pairs), NXDOMAIN to names it does not know, and the A
    records of ``addresses`` (other types of a known name: no data).

    ``dns_server.py`` serves zones, but cannot fail the way a broken or
    overloaded name server does."""

    def __init__(self, failing: Iterable[tuple[str, str]], addresses: Mapping[str, str]) -> None:
        self.failing = {(name.lower(), kind) for name, kind in failing}
        self.addresses = {name.lower(): address for name, address in addresses.items()}
        self.queries: list[tuple[str, str]] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._socket.close()
        self._thread.join(5)

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._socket.recvfrom(4096)
            except OSError:
                return
            with contextlib.suppress(Exception):  # a bad query gets no answer
                self._socket.sendto(self._answer(data), peer)

    def _answer(self, data: bytes) -> bytes:
        query = dns.Message()
        query.fromStr(data)
        [question] = query.queries
        name = question.name.name.decode().lower()
        kind = dns.QUERY_TYPES.get(question.type, str(question.type))
        self.queries.append((name, kind))
        reply = dns.Message(id=query.id, answer=1, auth=1, rCode=dns.OK)
        reply.queries = query.queries
        if (name, kind) in self.failing:
            reply.rCode = dns.ESERVER
        elif name not in self.addresses:
            reply.rCode = dns.ENAME
        elif kind == "A":
            record = dns.Record_A(self.addresses[name], 60)
            reply.answers = [dns.RRHeader(name, dns.A, payload=record, ttl=60, auth=True)]
        return reply.toStr()


# -- capture servers


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound (some containers have no IPv6)."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


def _free_on(host: str, port: int) -> bool:
    """Nothing listens on ``host:port`` (so a connection there is refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError:
        return False
    return True


class CaptureGroup:
    """One capture server per address, all on one port, none on ``down``."""

    def __init__(
        self, behaviours: Mapping[str, Behaviour], down: Iterable[str] = (DOWN,)
    ) -> None:
        self.behaviours = dict(behaviours)
        self.down = tuple(down)
        self.servers: dict[str, CaptureServer] = {}
        self.port = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def __getitem__(self, host: str) -> CaptureServer:
        return self.servers[host]

    def start(self) -> Self:
        for _ in range(_LINK_ATTEMPTS):
            if self._start_once():
                return self
        raise RuntimeError("no port free on every capture address")

    def _start_once(self) -> bool:
        port = 0
        try:
            for host, behaviour in self.behaviours.items():
                server = CaptureServer(behaviour, host=host, port=port).start()
                self.servers[host] = server
                port = server.port
        except OSError:
            self.stop()
            return False
        if not all(_free_on(host, port) for host in self.down):
            self.stop()
            return False
        self.port = port
        return True

    def stop(self) -> None:
        servers, self.servers = self.servers, {}
        for server in servers.values():
            server.stop()

    def transactions_for(self, recipient: str) -> list[Transaction]:
        """Completed transactions (any final reply) naming ``recipient``."""
        return [
            t
            for server in self.servers.values()
            for t in server.transactions
            if recipient in t.recipients
        ]

    def sessions_for(self, recipient: str) -> list[Session]:
        """Sessions in which ``recipient`` was given in a RCPT command."""
        return [
            s
            for server in self.servers.values()
            for s in list(server.sessions)
            if any(c.verb == "RCPT" and f"<{recipient}>" in c.line for c in s.commands)
        ]


def change_behaviour(server: CaptureServer, **changes) -> None:
    """From the next connection on, ``server`` behaves as changed."""
    server.behaviour = replace(server.behaviour, **changes)


def wait_until(condition: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    """Poll a condition on something that logs nothing (a capture server)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


# -- configuration


def toml_string(value: str | Path) -> str:
    return json.dumps(str(value))


def relay_config(
    *,
    resolver: str | None = None,
    mx_port: int | None = None,
    smarthost: str = "",
    smarthost_tls: str = "starttls",
    ca_file: Path | None = None,
    user: str = "",
    password_file: Path | None = None,
    retry_min: str = "1s",
    retry_max: str = "2s",
    lifetime: str = "1h",
    delay_warning: str | None = None,
    extra: str = "",
) -> str:
    """``[relay]`` and ``[queue]`` for a test daemon (``make_daemon(extra=)``)."""
    relay = [
        "[relay]",
        f"smarthost = {toml_string(smarthost)}",
        f"smarthost_tls = {toml_string(smarthost_tls)}",
        f"smarthost_user = {toml_string(user)}",
    ]
    if resolver is not None:
        relay.append(f"resolvers = [{toml_string(resolver)}]")
    if mx_port is not None:
        relay.append(f"mx_port = {mx_port}")
    if ca_file is not None:
        relay.append(f"ca_file = {toml_string(ca_file)}")
    if password_file is not None:
        relay.append(f"smarthost_password_file = {toml_string(password_file)}")
    queue = [
        "[queue]",
        f"retry_min = {toml_string(retry_min)}",
        f"retry_max = {toml_string(retry_max)}",
        f"lifetime = {toml_string(lifetime)}",
    ]
    if delay_warning is not None:
        queue.append(f"delay_warning = {toml_string(delay_warning)}")
    return "\n".join([*relay, "", *queue, "", extra]) + "\n"


# -- submitting mail


def submit(
    daemon: Daemon,
    sender: str,
    recipients: Iterable[str],
    message: bytes,
    *,
    login: tuple[str, str] | None = None,
    mail_options: Iterable[str] = (),
) -> str:
    """Send one message whose recipients must all be accepted; its id.

    With ``login`` on the submission listener after STARTTLS and AUTH,
    else from 127.0.0.1 (a trusted network) on the smtp listener.
    """
    client = daemon.smtp("submission" if login else "smtp")
    with client:
        client.ehlo("client.example.org")
        if login:
            client.starttls(context=insecure_context())
            client.ehlo("client.example.org")
            client.login(*login)
        code, text = client.mail(sender, list(mail_options))
        assert code == 250, (code, text)
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, (recipient, code, text)
        code, text = client.data(message)
    assert code == 250, (code, text)
    return queue_id(text)


def message(marker: str, sender: str = "alice@example.test", body: str = "hello\n") -> bytes:
    """A small message with ``marker`` in its Subject and Message-ID (CRLF)."""
    text = (
        f"From: <{sender}>\n"
        f"Subject: relay test {marker}\n"
        f"Message-ID: <{marker}@client.example.org>\n"
        "\n"
        f"{body}"
    )
    return text.replace("\n", "\r\n").encode()


# -- the log


def attempt_pattern(queue_id: str, address: str, status: str) -> str:
    """A delivery attempt's log line (not the "queued for relay" one)."""
    return (
        rf"id={queue_id} to=<{re.escape(address)}> relay=\S+ delay=[\d.]+ "
        rf"status={status} \((?!queued for relay)"
    )


def wait_attempt(daemon: Daemon, queue_id: str, address: str, status: str) -> str:
    return daemon.wait_for_log(attempt_pattern(queue_id, address, status), WAIT)


def attempts(daemon: Daemon, queue_id: str, address: str, status: str = r"\w+") -> list[str]:
    pattern = re.compile(attempt_pattern(queue_id, address, status))
    return [line for line in list(daemon.log) if pattern.search(line)]


def wait_notification(daemon: Daemon, queue_id: str, kind: str = "non-delivery") -> str:
    """The id of the DSN sent about message ``queue_id``."""
    line = daemon.wait_for_log(rf"id={queue_id} sender {kind} notification: \w+", WAIT)
    return line.rsplit(" ", 1)[1]


def wait_gone(daemon: Daemon, queue_id: str) -> None:
    """Wait until the message left the queue."""
    envelope = daemon.spool / "queue" / f"{queue_id}.env"
    wait_until(lambda: not envelope.exists(), what=f"{queue_id} to leave the queue")


def wait_queue_empty(daemon: Daemon, timeout: float = WAIT) -> None:
    queue = daemon.spool / "queue"
    wait_until(lambda: not list(queue.glob("*.env")), timeout, "an empty queue")


# -- the queue


def envelope(daemon: Daemon, queue_id: str) -> dict | None:
    path = daemon.spool / "queue" / f"{queue_id}.env"
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def queue_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    command = [CLI, "queue", *args, "--config", str(daemon.config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# -- delivery status notifications


@dataclass
class DSN:
    """A notification as a mail reader sees it (parsed by ``email``)."""

    raw: bytes
    message: EmailMessage
    per_message: dict[str, str]
    recipients: list[dict[str, str]]
    original_headers: str

    def recipient(self, address: str) -> dict[str, str]:
        [found] = [r for r in self.recipients if r["Final-Recipient"].endswith(f"; {address}")]
        return found


def parse_dsn(raw: bytes) -> DSN:
    """Check the RFC 3464 / RFC 6522 structure and return its fields."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report", parsed.get_content_type()
    assert parsed.get_param("report-type") == "delivery-status"
    assert not parsed.defects, parsed.defects
    parts = list(parsed.iter_parts())
    kinds = [part.get_content_type() for part in parts]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"], kinds
    blocks = parts[1].get_payload()
    per_message, *recipients = [dict(block.items()) for block in blocks]
    return DSN(raw, parsed, per_message, recipients, parts[2].get_content())


def notifications(daemon: Daemon, domain: str, local: str, about: str) -> list[bytes]:
    """Stored DSNs in a local mailbox about message ``about``."""
    marker = f"X-Twisted-MTA-Queue-ID: {about}".encode()
    return [m for m in daemon.messages(domain, local) if marker in m]


def single_dsn(daemon: Daemon, domain: str, local: str, about: str) -> DSN:
    [raw] = notifications(daemon, domain, local, about)
    return parse_dsn(raw)
