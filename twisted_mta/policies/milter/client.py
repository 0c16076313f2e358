"""One milter connection: a Twisted protocol that sends commands and
collects the milter's replies, and the conversation of one SMTP
transaction over it, with the replies mapped to verdicts."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import twisted_mta.policies.milter.codec as codec
from twisted_mta.interfaces import ACCEPT, SessionInfo, Verdict

# What we can do with a milter's modifications: headers (added or
# inserted: prepended; changed: logged, not done), quarantine (a header).
ACTIONS = codec.ADDHDRS | codec.CHGHDRS | codec.QUARANTINE_FLAG
# Every step may be left out or left unanswered, and a milter may skip
# the rest of the body; we never send leading spaces nor refused RCPTs.
PROTOCOL = (
    codec.NOCONNECT | codec.NOHELO | codec.NOMAIL | codec.NORCPT | codec.NOBODY
    | codec.NOHDRS | codec.NOEOH | codec.NR_HDR | codec.NOUNKNOWN | codec.NODATA
    | codec.SKIP_FLAG | codec.NR_CONN | codec.NR_HELO | codec.NR_MAIL | codec.NR_RCPT
    | codec.NR_DATA | codec.NR_UNKN | codec.NR_EOH | codec.NR_BODY
)
_FINAL = {
    codec.ACCEPT, codec.CONTINUE, codec.DISCARD, codec.REJECT, codec.TEMPFAIL,
    codec.REPLYCODE, codec.SKIP,
}
_CHANGES = {codec.ADDHEADER, codec.INSHEADER, codec.CHGHEADER, codec.QUARANTINE}
# Read so that a chunk with its LFs made CRLF stays within BODY_CHUNK.
_READ = codec.BODY_CHUNK // 2
_log = Logger()


class MilterError(Exception):
    """The milter could not be reached, broke the protocol, or was late."""


@dataclass(frozen=True)
class Reply:
    code: bytes
    data: bytes = b""
    changes: tuple[codec.HeaderChange | str, ...] = ()


class MilterProtocol(Protocol):
    """Sends commands; a command that wants a reply gets a Deferred of the
    final one, with the modifications that came before it (end of
    message).  No reply within ``timeout`` aborts the connection."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.lost = False
        self._decoder = codec.Decoder()
        self._waiting: defer.Deferred[Reply] | None = None
        self._changes: list[codec.HeaderChange | str] = []
        self._timer: Any = None

    def command(self, *packets: bytes, reply: bool = True) -> defer.Deferred[Reply | None]:
        if self.lost:
            return defer.fail(MilterError("connection to the milter closed"))
        if not reply:
            self.transport.write(b"".join(packets))
            return defer.succeed(None)
        # Waiting before writing: a reply may arrive within write().
        waiting = self._waiting = defer.Deferred(self._cancelled)
        self._arm()
        self.transport.write(b"".join(packets))
        return waiting

    def close(self) -> None:
        """QUIT, politely; the milter closes its end."""
        if not self.lost:
            self.transport.write(codec.packet(codec.QUIT))
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()

    def _cancelled(self, waiting: defer.Deferred) -> None:
        # Given up on (the chain's timeout): this connection is done for.
        self._waiting = None
        self._disarm()
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        try:
            for code, payload in self._decoder.feed(data):
                self._reply(code, payload)
        except codec.ProtocolError as error:
            self._fail(MilterError(f"protocol error: {error}"))

    def _reply(self, code: bytes, payload: bytes) -> None:
        if self._waiting is None:
            raise codec.ProtocolError(f"unexpected reply {code!r}")
        if code == codec.PROGRESS:
            self._arm()
        elif code in _CHANGES:
            self._changes.append(_change(code, payload))
        elif code in _FINAL or code == codec.OPTNEG:
            d, self._waiting = self._waiting, None
            changes, self._changes = tuple(self._changes), []
            self._disarm()
            d.callback(Reply(code, payload, changes))
        else:
            raise codec.ProtocolError(f"reply {code!r} is not supported")

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost = True
        self._fail(MilterError("connection closed by the milter"))

    def _fail(self, error: MilterError) -> None:
        self._disarm()
        d, self._waiting = self._waiting, None
        self.abort()
        if d is not None:
            d.errback(error)

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.clock.callLater(self.timeout, self._late)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _late(self) -> None:
        self._timer = None
        self._fail(MilterError(f"no reply within {self.timeout:g}s"))


def _change(code: bytes, payload: bytes) -> codec.HeaderChange | str:
    if code == codec.QUARANTINE:
        return codec.decode_quarantine(payload)
    return codec.decode_header_change(code, payload)


async def negotiate(protocol: MilterProtocol) -> codec.Negotiated:
    """OPTNEG: version 6, our actions and steps; the milter may want less,
    never more (libmilter refuses a filter that needs more, and says so)."""
    reply = await protocol.command(codec.optneg(ACTIONS, PROTOCOL))
    if reply.code != codec.OPTNEG:
        raise MilterError(f"negotiation answered {reply.code!r}")
    try:
        negotiated = codec.decode_optneg(reply.data)
    except codec.ProtocolError as error:
        raise MilterError(f"negotiation: {error}") from None
    if negotiated.version < 2:
        raise MilterError(f"milter protocol version {negotiated.version} is too old")
    if negotiated.actions & ~ACTIONS or negotiated.protocol & ~PROTOCOL:
        raise MilterError(
            f"the milter wants actions {negotiated.actions:#x} / steps {negotiated.protocol:#x},"
            f" more than offered ({ACTIONS:#x} / {PROTOCOL:#x})"
        )
    return negotiated


@dataclass
class Conversation:
    """One transaction's talk with the milter.  ``answer`` is set once the
    milter has decided for the whole transaction (accept, or a refusal of
    the message); every later step then answers it without asking."""

    protocol: MilterProtocol
    negotiated: codec.Negotiated
    hostname: str
    extra_macros: Mapping[str, str] = field(default_factory=dict)
    answer: Verdict | None = None
    finished: bool = False
    in_message: bool = False

    def _skips(self, flag: int) -> bool:
        return bool(self.negotiated.protocol & flag)

    async def _step(
        self, skip: int, no_reply: int, command: bytes, packet: bytes, macros: Mapping
    ) -> Reply | None:
        if self._skips(skip):
            return None
        sent = [codec.macros(command, _encoded(macros))] if macros else []
        return await self.protocol.command(*sent, packet, reply=not self._skips(no_reply))

    async def connect(self, session: SessionInfo) -> Verdict | None:
        family, port, address = _client(session.client_ip)
        name = f"[{session.client_ip}]" if family != b"U" else "localhost"
        macros = {
            "j": self.hostname, "{daemon_name}": "twisted-mta",
            "{client_addr}": session.client_ip, "{client_name}": name,
            "_": f"{name} [{session.client_ip}]", **self.extra_macros,
        }
        packet = codec.connect(name.encode(), family, port, address)
        reply = await self._step(codec.NOCONNECT, codec.NR_CONN, codec.CONNECT, packet, macros)
        return self._decided(reply, "Command rejected")

    async def helo(self, session: SessionInfo) -> Verdict | None:
        if session.helo is None:
            return None
        macros = {"{tls_version}": session.tls_version, "{cipher}": session.tls_cipher}
        packet = codec.helo(session.helo.encode("utf-8"))
        reply = await self._step(codec.NOHELO, codec.NR_HELO, codec.HELO, packet, macros)
        return self._decided(reply, "Command rejected")

    async def mail(self, session: SessionInfo, sender: str, params: Mapping) -> Verdict | None:
        # For the maildrop, ``user`` is the local sender, not an SMTP login.
        login = session.user if session.listener != "local" else None
        macros = {"{mail_addr}": sender, "{auth_authen}": login}
        packet = codec.mail(sender.encode("utf-8"), _args(params))
        reply = await self._step(codec.NOMAIL, codec.NR_MAIL, codec.MAIL, packet, macros)
        return self._decided(reply, "Command rejected")

    async def rcpt(self, recipient: str, params: Mapping) -> Verdict | None:
        packet = codec.rcpt(recipient.encode("utf-8"), _args(params))
        macros = {"{rcpt_addr}": recipient}
        reply = await self._step(codec.NORCPT, codec.NR_RCPT, codec.RCPT, packet, macros)
        # A refused recipient is only that one: the transaction goes on.
        return self._decided(reply, "Recipient address rejected", ends=False)

    async def message(self, queue_id: str, stream: BinaryIO) -> Verdict | None:
        """Headers as stored (our Received first), EOH, the body with CRLF
        line ends, end of message; the verdict carries the headers the
        milter added."""
        self.in_message = True
        ids = {"i": queue_id}
        packet = codec.packet(codec.DATA)
        reply = await self._step(codec.NODATA, codec.NR_DATA, codec.DATA, packet, ids)
        if not _goes_on(reply):
            return self._decided(reply, "Message content rejected")
        for name, value in _headers(stream):
            packet = codec.header(name, value)
            reply = await self._step(codec.NOHDRS, codec.NR_HDR, codec.HEADER, packet, {})
            if not _goes_on(reply):
                return self._decided(reply, "Message content rejected")
        packet = codec.packet(codec.EOH)
        reply = await self._step(codec.NOEOH, codec.NR_EOH, codec.EOH, packet, ids)
        if not _goes_on(reply):
            return self._decided(reply, "Message content rejected")
        reply = await self._body(stream)
        if not _goes_on(reply):
            return self._decided(reply, "Message content rejected")
        eom = await self.protocol.command(
            codec.macros(codec.BODYEOB, _encoded(ids)), codec.packet(codec.BODYEOB)
        )
        self.in_message = False
        verdict = self._decided(eom, "Message content rejected")
        return _with_changes(verdict, eom.changes)

    async def _body(self, stream: BinaryIO) -> Reply | None:
        while not self._skips(codec.NOBODY):
            chunk = stream.read(_READ)
            if not chunk:
                break
            reply = await self._step(
                codec.NOBODY, codec.NR_BODY, codec.BODY,
                codec.body(chunk.replace(b"\n", b"\r\n")), {},
            )
            if reply is not None and reply.code == codec.SKIP:
                break
            if not _goes_on(reply):
                return reply
        return None

    def _decided(self, reply: Reply | None, refused: str, ends: bool = True) -> Verdict | None:
        verdict = verdict_for(reply, refused)
        if verdict is None:
            return None
        # Accept and discard are for the whole message, even at RCPT.
        if ends or verdict.kind == ACCEPT or reply.code == codec.DISCARD:
            self.answer = verdict
        return verdict

    def close(self) -> None:
        """End the milter's side: ABORT an unfinished message, then QUIT."""
        if self.finished:
            return
        self.finished = True
        if self.in_message and not self.protocol.lost:
            self.protocol.transport.write(codec.packet(codec.ABORT))
        self.protocol.close()


def verdict_for(reply: Reply | None, refused: str) -> Verdict | None:
    """A milter's final reply as a verdict; None goes on."""
    if reply is None or reply.code in (codec.CONTINUE, codec.SKIP):
        return None
    if reply.code == codec.ACCEPT:
        return Verdict.accept()
    if reply.code == codec.REJECT:
        return Verdict.reject(550, "5.7.1", refused)
    if reply.code == codec.TEMPFAIL:
        return Verdict.tempfail(451, "4.7.1", "Service unavailable - try again later")
    if reply.code == codec.DISCARD:
        # We cannot accept a message and deliver it nowhere through the
        # hooks: the sender is told instead of the message being lost.
        return Verdict.reject(550, "5.7.1", "Message discarded")
    try:
        code = codec.decode_replycode(reply.data)
    except codec.ProtocolError as error:
        raise MilterError(str(error)) from None
    refuse = Verdict.reject if code.code >= 500 else Verdict.tempfail
    return refuse(code.code, code.enhanced, code.text)


def _with_changes(verdict: Verdict | None, changes: Iterable) -> Verdict | None:
    """The headers the milter asked for, to prepend: inserted ones (at
    whatever index) on top, then added ones; QUARANTINE as a header."""
    if verdict is not None and verdict.refuses:
        return verdict
    inserted: list[tuple[str, str]] = []
    added: list[tuple[str, str]] = []
    for change in changes:
        if isinstance(change, str):
            added.append(("X-Quarantine", change or "quarantined by milter"))
        elif change.kind == codec.INSHEADER:
            inserted.insert(0, (change.name, change.value))
        elif change.kind == codec.ADDHEADER:
            added.append((change.name, change.value))
        else:
            _warn_once("milter: changing a header (CHGHEADER) is not supported; ignored")
    headers = inserted + added
    if headers:
        return Verdict.proceed(headers)
    return verdict


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # Once per process: a milter that changes headers does it to every message.
    if message not in _warned:
        _warned.add(message)
        _log.warn(message)


def _goes_on(reply: Reply | None) -> bool:
    return reply is None or reply.code == codec.CONTINUE


def _encoded(macros: Mapping[str, str | None]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode("utf-8") for k, v in macros.items() if v is not None}


def _args(params: Mapping[str, str | None]) -> list[bytes]:
    return [(k if v is None else f"{k}={v}").encode("utf-8") for k, v in params.items()]


def _client(ip: str) -> tuple[bytes, int, bytes]:
    """SMFIC_CONNECT's family, port and address; we do not know the
    client's port, and the maildrop's client is no IP address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return b"U", 0, b""
    return (b"4" if address.version == 4 else b"6"), 0, str(address).encode()


def _headers(stream: BinaryIO) -> list[tuple[bytes, bytes]]:
    """The header block as (name, value): the value without the space
    after the colon, its folds kept (LF, as Sendmail and Postfix send).
    Leaves ``stream`` at the first body line."""
    headers: list[list[bytes]] = []
    for line in iter(stream.readline, b""):
        if line in (b"\n", b"\r\n"):
            break
        line = line.rstrip(b"\r\n")
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += b"\n" + line
            continue
        name, _, value = line.partition(b":")
        headers.append([name.rstrip(), value.lstrip(b" \t")])
    return [(name, value) for name, value in headers]
