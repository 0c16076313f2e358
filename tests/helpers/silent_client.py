"""A TLS client that completes the handshake and then goes silent.

It runs TLS over memory BIOs on a plain socket, so the test sees the TCP
connection itself: it never answers the server's close_notify, and
``wait_for_close`` tells when the server really closed the TCP connection,
not just the TLS session.
"""

from __future__ import annotations

import socket
import ssl
import time

TIMEOUT = 10.0


class SilentTLSClient:
    def __init__(self, port: int, *, implicit: bool = True, preamble: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.sendall(preamble)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._plain = b""
        if implicit:
            self.start_tls()
            self.banner = self.read_reply()
        else:
            self.banner = self.read_reply()
            self.command(b"EHLO client.example.org")
            assert self.command(b"STARTTLS").startswith(b"220 ")
            self.start_tls()

    def start_tls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self._tls = context.wrap_bio(self._incoming, self._outgoing)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
        self._flush()

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.read_reply()

    def send(self, data: bytes) -> None:
        if self._tls is None:
            self.sock.sendall(data)
        else:
            self._tls.write(data)
            self._flush()

    def read_reply(self) -> bytes:
        """One whole (possibly multi-line) reply."""
        while True:
            lines = self._plain.split(b"\r\n")
            for index, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    reply = b"\r\n".join(lines[: index + 1])
                    self._plain = b"\r\n".join(lines[index + 1 :])
                    return reply
            self._plain += self._read_some()

    def _read_some(self) -> bytes:
        if self._tls is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            return data
        while True:
            try:
                return self._tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
            except ssl.SSLZeroReturnError:
                raise ConnectionError("close_notify") from None

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self._incoming.write(data)

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def wait_for_close(self, timeout: float = TIMEOUT) -> float:
        """Seconds until the server closes the TCP connection (EOF or reset).

        Whatever arrives meanwhile (a close_notify) is read and ignored,
        never answered.
        """
        started = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SilentTLSClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
