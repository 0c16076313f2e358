"""An SMTP client that sends exactly the bytes it is given, over a plain
socket, and parses the replies; markers that let tests sharing a daemon
find their own messages."""

from __future__ import annotations

import socket
import uuid

from tests.helpers.daemon import Daemon, insecure_context
from tests.helpers.replies import Reply

HOSTNAME = b"mx.example.test"
TIMEOUT = 10.0
EHLO = b"EHLO client.example.org"
MAIL = b"MAIL FROM:<sender@example.org>"


class Raw:
    """SMTP over a plain socket: bytes out as given, replies in as parsed."""

    def __init__(self, port: int, source: str | None = None) -> None:
        address = (source, 0) if source else None
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT, address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc_info) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unterminated: {self._pending!r}")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:])
            if line[3:4] == b" ":
                return Reply(int(line[:3]), lines)
            assert line[3:4] == b"-", line

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def command(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.reply()

    def expect(self, line: bytes, code: int, enhanced: bytes | None = None) -> Reply:
        reply = self.command(line)
        assert reply.code == code, (line, reply)
        if enhanced is not None:
            assert reply.text.startswith(enhanced + b" "), (line, reply)
        return reply

    def at_eof(self) -> bool:
        """Whether the server has closed, once all it sent has been read."""
        return not self._pending and self.sock.recv(1) == b""

    def starttls(self) -> None:
        assert not self._pending
        self.sock = insecure_context().wrap_socket(self.sock)

    def start_data(self, *recipients: bytes, mail: bytes = MAIL) -> None:
        """EHLO, MAIL, RCPT for each recipient (default alice), DATA."""
        self.expect(EHLO, 250)
        self.expect(mail, 250)
        for recipient in recipients or [b"alice@example.test"]:
            self.expect(b"RCPT TO:<" + recipient + b">", 250)
        self.expect(b"DATA", 354)


def connect(daemon: Daemon, listener: str = "smtp", source: str | None = None) -> Raw:
    raw = Raw(daemon.ports[listener], source)
    greeting = raw.reply()
    assert (greeting.code, greeting.text) == (220, HOSTNAME + b" ESMTP")
    return raw


def new_marker() -> bytes:
    return uuid.uuid4().hex.encode()


def delivered(daemon: Daemon, marker: bytes, local: str = "alice") -> list[bytes]:
    return [m for m in daemon.messages("example.test", local) if marker in m]
