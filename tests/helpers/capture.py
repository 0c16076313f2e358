"""A capture SMTP server for tests: it records, it misbehaves on request.

It runs in background threads with blocking sockets (no Twisted, so it
shares nothing with the code under test), one thread per connection,
bound to ``127.0.0.x`` on a free port::

    with CaptureServer(Behaviour(starttls=True, rcpt_replies={"x@y": "550 5.1.1 no"})) as server:
        ...                                   # point the client at server.host, server.port
        [session] = server.sessions
        session.verbs()                       # ["EHLO", "STARTTLS", "EHLO", "MAIL", ...]
        session.transactions[0].message       # what the client meant to send

Options can also be given as keywords: ``CaptureServer(starttls=True)``;
``host`` and ``port`` choose where it listens (``port`` 0: a free one).
What a client has had a reply to is recorded by the time it sees the
reply, so tests read the records once the client is done.

It records every command line (with the read it arrived in, so that
pipelining shows as several commands in one read, and whether TLS was
on), every byte the client sent (after TLS decryption) and, per
transaction, the raw DATA as on the wire (dot-stuffed, CRLF; the final
``.`` line excluded), its size and SHA-256.

:class:`Behaviour` selects what the server offers (STARTTLS, implicit
TLS, PIPELINING, SIZE, 8BITMIME, SMTPUTF8, AUTH) and how it misbehaves:
a given greeting, a fixed reply to any command (EHLO refused, to force
HELO), per-recipient replies, 451 to the first N messages, a given reply
to the final dot, a drop in the middle of the DATA (after an early
reply, if asked), a hang at any step (``hang_at``: ``"greeting"``, a
command verb, ``"BODY"`` after the 354 with a small receive window,
``"DOT"`` before the final reply), a "TLS" that closes instead of
handshaking.

:class:`TestCA` issues certificates for names and IP addresses, so that
verified TLS can be tested with a ``ca_file``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import itertools
import socket
import ssl
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTNAME = "mx.test"
TERMINATOR = b"\r\n.\r\n"
SOCKET_TIMEOUT = 30.0
_SERVER_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])


@dataclass(frozen=True)
class CertKey:
    """PEM files of a certificate (chain) and its private key."""

    certificate: Path
    key: Path


class TestCA:
    """A certificate authority in ``directory``; ``path`` is its PEM."""

    __test__ = False  # not a pytest test class
    _serials = itertools.count(1)

    def __init__(self, directory: Path, name: str = "twisted-mta test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = _builder(self._name, self._name, self._key.public_key())
        self.certificate = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(signs_certificates=True), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.path = self._unique("ca.pem")
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str) -> CertKey:
        """A server certificate for DNS names and IP addresses (as SANs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        certificate = (
            _builder(subject, self._name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(signs_certificates=False), critical=True)
            .add_extension(_SERVER_AUTH, critical=False)
            .add_extension(x509.SubjectAlternativeName(map(_general_name, names)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        paths = CertKey(self._unique("cert.pem"), self._unique("key.pem"))
        paths.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        paths.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return paths

    def _unique(self, suffix: str) -> Path:
        return self.directory / f"{next(self._serials)}-{suffix}"


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class Behaviour:
    """What the server offers and how it misbehaves (all off by default)."""

    greeting: str = f"220 {HOSTNAME} ESMTP capture"
    replies: Mapping[str, str] = field(default_factory=dict)  # verb -> fixed reply
    starttls: bool = False
    implicit_tls: bool = False
    certificate: CertKey | None = None  # None: from a CA nobody trusts
    tls_break: bool = False  # answer 220 to STARTTLS, then close
    pipelining: bool = True
    size: int | None = None  # advertise SIZE n (and enforce it)
    eightbitmime: bool = True
    smtputf8: bool = True
    auth: tuple[str, str] | None = None  # required (user, password)
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    auth_needs_tls: bool = True  # AUTH offered only inside TLS
    rcpt_replies: Mapping[str, str] = field(default_factory=dict)
    defer_first: int = 0  # 451 to the final dot of the first N messages
    data_end_reply: str | None = None
    drop_in_data: int | None = None  # close after this many DATA bytes
    drop_reply: str | None = None  # said before dropping; then read until closed
    hang_at: str | None = None
    store_data: bool = True  # False: keep only size and SHA-256 of DATA


@dataclass(frozen=True)
class Command:
    """A command line as received (without its CRLF)."""

    line: str
    read: int  # which read the line completed in
    tls: bool

    @property
    def verb(self) -> str:
        return self.line.split(" ", 1)[0].split(":", 1)[0].upper()


@dataclass
class Transaction:
    """A message that reached its final dot (whatever the reply)."""

    sender: str
    parameters: tuple[str, ...]
    recipients: list[str] = field(default_factory=list)
    data: bytes | None = None
    size: int = 0
    sha256: str = ""
    reply: str = ""

    @property
    def message(self) -> bytes:
        """The message as the client meant it: unstuffed, LF line ends."""
        assert self.data is not None, "DATA was not stored"
        lines = self.data.split(b"\r\n")
        return b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@dataclass
class Session:
    """One connection; ``ended`` is set once the server is done with it."""

    peer: str
    commands: list[Command] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    transactions: list[Transaction] = field(default_factory=list)
    tls: bool = False
    tls_error: str | None = None
    authenticated: str | None = None
    auth_mechanism: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    def verbs(self, tls: bool | None = None) -> list[str]:
        """Command verbs, optionally only those sent in clear or in TLS."""
        return [c.verb for c in self.commands if tls is None or c.tls == tls]


class CaptureServer:
    """The server; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self, behaviour: Behaviour | None = None, host: str = "127.0.0.1", port: int = 0, **changes
    ) -> None:
        self.behaviour = replace(behaviour or Behaviour(), **changes)
        self.host = host
        self.port = port
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._messages = 0
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._tempdir: tempfile.TemporaryDirectory | None = None
        self._tls: ssl.SSLContext | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def transactions(self) -> list[Transaction]:
        return [t for s in self.sessions for t in s.transactions]

    def start(self) -> Self:
        if self.behaviour.starttls or self.behaviour.implicit_tls:
            self._tls = self._tls_context()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        for thread in list(self._threads):
            thread.join(5)
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def _next_message_deferred(self) -> bool:
        """Count a message; True while the first ``defer_first`` last."""
        with self._lock:
            self._messages += 1
            return self._messages <= self.behaviour.defer_first

    def _hang(self) -> None:
        """Answer nothing until the server stops."""
        self._stopping.wait()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _tls_context(self) -> ssl.SSLContext:
        pair = self.behaviour.certificate
        if pair is None:
            self._tempdir = tempfile.TemporaryDirectory()
            pair = TestCA(Path(self._tempdir.name)).issue(HOSTNAME)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.certificate, pair.key)
        return context

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            sock.settimeout(SOCKET_TIMEOUT)
            if self.behaviour.hang_at == "BODY":
                # A small, fixed window, so that a client's writes stall soon.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self._track(sock)
            session = Session(f"{peer[0]}:{peer[1]}")
            with self._lock:
                self.sessions.append(session)
            self._spawn(_Conversation(self, sock, session).run)

    def _spawn(self, target) -> None:
        thread = threading.Thread(target=target, daemon=True)
        self._threads.append(thread)
        thread.start()


def _shutdown(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Hangup(Exception):
    """End the conversation: hung up, dropped or closed by the client."""


class _Conversation:
    """One connection, served by one thread."""

    def __init__(self, server: CaptureServer, sock: socket.socket, session: Session) -> None:
        self.server = server
        self.behaviour = server.behaviour
        self.sock = sock
        self.session = session
        self.buffer = b""
        self.reads = 0
        self.recording = True
        self.transaction: Transaction | None = None
        self.refusing = False

    def run(self) -> None:
        try:
            self._converse()
        except (_Hangup, OSError):
            pass
        finally:
            self.sock.close()
            self.session.ended.set()

    def _converse(self) -> None:
        if self.behaviour.implicit_tls:
            self._wrap()
        self._hang_if("greeting")
        self._send(self.behaviour.greeting)
        if self.behaviour.greeting.startswith("421"):
            return
        self.refusing = not self.behaviour.greeting.startswith("220")
        while True:
            line = self._readline()
            command = Command(line, self.reads, self.session.tls)
            self.session.commands.append(command)
            self._hang_if(command.verb)
            if not self._dispatch(command.verb, line):
                return

    def _dispatch(self, verb: str, line: str) -> bool:
        """Answer one command; False ends the conversation."""
        if verb == "QUIT":
            self._send("221 2.0.0 bye")
            return False
        if self.refusing:
            self._send("503 5.5.1 not accepting mail")
            return True
        if verb in self.behaviour.replies:
            self._send(self.behaviour.replies[verb])
            return True
        handler = getattr(self, f"_do_{verb.lower()}", None)
        if handler is None:
            self._send("500 5.5.2 unknown command")
            return True
        return handler(line) is not False

    # -- commands

    def _do_ehlo(self, line: str) -> None:
        self._send_lines("250", [HOSTNAME, *self._extensions()])

    def _extensions(self) -> list[str]:
        b = self.behaviour
        offers = ["ENHANCEDSTATUSCODES"]
        if b.pipelining:
            offers.append("PIPELINING")
        if b.size is not None:
            offers.append(f"SIZE {b.size}")
        if b.eightbitmime:
            offers.append("8BITMIME")
        if b.smtputf8:
            offers.append("SMTPUTF8")
        if b.starttls and not self.session.tls:
            offers.append("STARTTLS")
        if b.auth is not None and (self.session.tls or not b.auth_needs_tls):
            offers.append("AUTH " + " ".join(b.auth_mechanisms))
        return offers

    def _do_helo(self, line: str) -> None:
        self._send(f"250 {HOSTNAME}")

    def _do_noop(self, line: str) -> None:
        self._send("250 2.0.0 OK")

    def _do_rset(self, line: str) -> None:
        self.transaction = None
        self._send("250 2.0.0 OK")

    def _do_starttls(self, line: str) -> bool:
        if not self.behaviour.starttls or self.session.tls:
            self._send("502 5.5.1 no STARTTLS here")
            return True
        self._send("220 2.0.0 ready to start TLS")
        if self.behaviour.tls_break:
            return False
        self.buffer = b""  # what came in clear after STARTTLS is discarded
        self._wrap()
        self.transaction = None
        self.session.authenticated = None
        return True

    def _do_auth(self, line: str) -> None:
        words = line.split()
        mechanism = words[1].upper() if len(words) > 1 else ""
        if self.behaviour.auth is None or mechanism not in self.behaviour.auth_mechanisms:
            self._send("504 5.5.4 unrecognized authentication type")
            return
        initial = words[2] if len(words) > 2 else None
        if mechanism == "PLAIN":
            response = _b64decode(initial if initial is not None else self._challenge(""))
            _, user, password = (response.split("\0") + ["", ""])[:3]
        else:
            user = _b64decode(initial if initial is not None else self._challenge("VXNlcm5hbWU6"))
            password = _b64decode(self._challenge("UGFzc3dvcmQ6"))
        if (user, password) != self.behaviour.auth:
            self._send("535 5.7.8 authentication failed")
            return
        self.session.authenticated = user
        self.session.auth_mechanism = mechanism
        self._send("235 2.7.0 authenticated")

    def _challenge(self, prompt: str) -> str:
        self._send(f"334 {prompt}")
        return self._readline()

    def _do_mail(self, line: str) -> None:
        if self.behaviour.auth is not None and self.session.authenticated is None:
            self._send("530 5.7.0 authentication required")
            return
        address, parameters = _path_and_parameters(line)
        problem = self._parameter_problem(parameters)
        if problem:
            self._send(problem)
            return
        self.transaction = Transaction(address, parameters)
        self._send("250 2.1.0 OK")

    def _parameter_problem(self, parameters: tuple[str, ...]) -> str | None:
        b = self.behaviour
        offered = {
            "SIZE": b.size is not None,
            "BODY": b.eightbitmime,
            "SMTPUTF8": b.smtputf8,
        }
        for parameter in parameters:
            name, _, value = parameter.upper().partition("=")
            if not offered.get(name):
                return f"555 5.5.4 unsupported parameter {parameter}"
            if name == "SIZE" and b.size and int(value) > b.size:
                return "552 5.3.4 message too big"
        return None

    def _do_rcpt(self, line: str) -> None:
        if self.transaction is None:
            self._send("503 5.5.1 need MAIL first")
            return
        address, _ = _path_and_parameters(line)
        reply = self.behaviour.rcpt_replies.get(address, "250 2.1.5 OK")
        if reply.startswith("2"):
            self.transaction.recipients.append(address)
        self._send(reply)

    def _do_data(self, line: str) -> None:
        transaction = self.transaction
        if transaction is None or not transaction.recipients:
            self._send("554 5.5.1 no valid recipients")
            return
        self._send("354 go ahead")
        self._hang_if("BODY")
        self._read_data(transaction)
        self._hang_if("DOT")
        transaction.reply = self._final_reply(transaction)
        self.session.transactions.append(transaction)
        self.transaction = None
        self._send(transaction.reply)

    def _final_reply(self, transaction: Transaction) -> str:
        b = self.behaviour
        if b.size and transaction.size > b.size:
            return "552 5.3.4 message too big"
        if self.server._next_message_deferred():
            return "451 4.3.0 try again later"
        return b.data_end_reply or f"250 2.0.0 queued as {len(self.server.transactions) + 1}"

    # -- DATA

    def _read_data(self, transaction: Transaction) -> None:
        """Read up to the final ".", recording the data before it."""
        kept = bytearray() if self.behaviour.store_data else None
        digest = hashlib.sha256()
        pending = b"\r\n"  # the line end of DATA: an empty message is ".\r\n"
        virtual = 2  # leading bytes of ``pending`` that are not data
        self.recording = self.behaviour.store_data
        while True:
            pending += self._take()
            end = pending.find(TERMINATOR)
            # Keep back what could be the start of a terminator.
            commit = end + 2 if end >= 0 else max(len(pending) - len(TERMINATOR) + 1, 0)
            if commit > virtual:
                piece = pending[virtual:commit]
                digest.update(piece)
                transaction.size += len(piece)
                if kept is not None:
                    kept += piece
                self._drop_if_due(transaction.size)
            if end >= 0:
                self.buffer = pending[end + len(TERMINATOR) :]
                break
            pending = pending[commit:]
            virtual = max(0, virtual - commit)
        self.recording = True
        transaction.data = bytes(kept) if kept is not None else None
        transaction.sha256 = digest.hexdigest()

    def _drop_if_due(self, size: int) -> None:
        limit = self.behaviour.drop_in_data
        if limit is None or size < limit:
            return
        if self.behaviour.drop_reply is not None:
            self._send(self.behaviour.drop_reply)
            while True:  # until the client hangs up
                self._recv()
        raise _Hangup("dropped in DATA")

    def _take(self) -> bytes:
        """What is buffered, else the next read."""
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        return self._recv()

    # -- I/O

    def _wrap(self) -> None:
        try:
            self.sock = self.server._tls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self.session.tls_error = str(error)
            raise _Hangup("TLS handshake failed") from None
        self.server._track(self.sock)
        self.session.tls = True

    def _hang_if(self, step: str) -> None:
        if self.behaviour.hang_at == step:
            self.server._hang()
            raise _Hangup("hung")

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 18)
        if not data:
            raise _Hangup("closed by the client")
        self.reads += 1
        if self.recording:
            self.session.received += data
        return data

    def _readline(self) -> str:
        while b"\n" not in self.buffer:
            self.buffer += self._recv()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.removesuffix(b"\r").decode("utf-8", "surrogateescape")

    def _send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def _send_lines(self, code: str, lines: list[str]) -> None:
        text = "".join(f"{code}-{line}\r\n" for line in lines[:-1]) + f"{code} {lines[-1]}\r\n"
        self.sock.sendall(text.encode())


def _path_and_parameters(line: str) -> tuple[str, tuple[str, ...]]:
    """``MAIL FROM:<a@b> X=Y`` -> ("a@b", ("X=Y",))."""
    _, _, rest = line.partition(":")
    path, _, parameters = rest.strip().partition(">")
    return path.removeprefix("<"), tuple(parameters.split())


def _b64decode(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except ValueError:
        return ""
