"""An SMTP session with a relay host: open, send messages, close.

Twisted's ``ESMTPSender`` cannot relay safely (audit 4.5): it dot-stuffs
each 16 KiB chunk on its own and never the first line (C1, C2), forwards
bare CR (C3), ignores SIZE, 8BITMIME, SMTPUTF8 and PIPELINING (C4, C5),
has no opportunistic TLS and authenticates in clear when STARTTLS is
stripped (C6), retries at once (C7) and waits forever (C8).  This is our
own client, on a plain ``Protocol``: this module says what to send and
what the replies mean; :mod:`twisted_mta.relay.wire` and
:mod:`twisted_mta.relay.body` put it on the wire, and
:mod:`twisted_mta.relay.outgoing` holds what goes in and comes out.

API
---
::

    session = await open_session(reactor, target, helo_name, timeouts)
    result = await session.send(outgoing)      # as often as needed
    await session.close()                      # QUIT
    result = await deliver(reactor, target, helo_name, outgoing, timeouts)

* :func:`open_session` fires with a :class:`RelaySession` from the first
  address whose server greets and completes EHLO (HELO if EHLO gets a
  5xx), STARTTLS and AUTH; or fails with a :class:`RelayError` carrying a
  status: temporary (``4.4.1`` no connection, ``4.4.2`` timeout or lost
  connection, ``4.7.x`` TLS or AUTH trouble) or permanent (a 5xx greeting
  or HELO).  Its ``remote`` is None when no connection was made.
* :meth:`RelaySession.send` fires with an :class:`AttemptResult`, one
  :class:`RecipientResult` per recipient in order, and never fails.  One
  message at a time; after the first, each transaction starts with RSET.
  ``session.usable`` says whether the connection can carry another one.
* :meth:`RelaySession.close` sends QUIT and fires once the connection is
  closed (or abandoned after a timeout); it never fails.
* :func:`deliver` is open + send + close; failures to open become results.
* Cancelling what :func:`open_session`, :meth:`RelaySession.send` or
  :func:`deliver` returned drops the connection (it fails with
  ``CancelledError``).
* The reactor given is the one everything runs on, TLS included, so tests
  can drive a reactor of their own.

Rules
-----
* Smart host (``"starttls"``, ``"implicit"``): nothing but EHLO and
  STARTTLS before verified TLS; STARTTLS missing or refused, or a
  certificate that does not verify, is a temporary ``4.7.x``.  AUTH (PLAIN,
  else LOGIN) only inside TLS, or in clear when the mode is ``"none"``;
  a failed AUTH is temporary (``4.7.8``), like Postfix's soft bounce.
* MX host (``"may"``): STARTTLS when offered, unverified; a refused
  STARTTLS continues in clear; a failed handshake is retried once on the
  same address without TLS.
* Before MAIL: the message's size against the server's SIZE (``5.3.4``);
  an internationalised message needs SMTPUTF8 (``5.6.7`` for non-ASCII
  addresses, else ``5.6.9``).  Nothing is sent then.
* 8-bit content to a server without 8BITMIME goes as a quoted-printable
  copy (:mod:`twisted_mta.relay.sevenbit`, RFC 6152), as Postfix does;
  its size is checked again.  A DKIM-signed message, or one with 8-bit
  header fields (unless it goes with SMTPUTF8), cannot be converted and
  fails with ``5.6.3``, before MAIL.
* With PIPELINING, MAIL, every RCPT and DATA go in one write (RFC 2920).
* Per recipient: its RCPT reply if that was not 2xx, else the reply to
  DATA or to the final dot.  A connection lost or a timeout leaves every
  undecided recipient temporary ``4.4.2``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorThreads

from twisted_mta import maillog
from twisted_mta.mail.sevenbit import Unconvertible
from twisted_mta.relay.body import Prefixed
from twisted_mta.relay.connect import (
    connect_tcp,
    describe,
    opportunistic_tls,
    try_in_order,
    verified_tls,
)
from twisted_mta.relay.outgoing import (
    AttemptResult,
    Outgoing,
    RecipientResult,
    RelayError,
    RelayTarget,
    Timeouts,
    TLSFailed,
    permanent,
    temporary,
)
from twisted_mta.relay.sevenbit import seven_bit_copy
from twisted_mta.relay.wire import SENDING_BODY, ConnectionFactory, LinkError, Reply, SMTPConnection

_AFTER_BODY = "sending end of data -- message may be sent more than once"

__all__ = ["RelaySession", "deliver", "open_session"]


def open_session(
    reactor: IReactorTCP, target: RelayTarget, helo_name: str, timeouts: Timeouts = Timeouts()
) -> Deferred[RelaySession]:
    """A ready session on the first address that takes one; see the module
    docstring.  Fails with :class:`RelayError` only."""
    attempt = partial(_open_at, reactor, target, helo_name.encode("idna"), timeouts)
    return Deferred.fromCoroutine(try_in_order(target.addresses, attempt, target.tls == "may"))


def deliver(
    reactor: IReactorTCP,
    target: RelayTarget,
    helo_name: str,
    outgoing: Outgoing,
    timeouts: Timeouts = Timeouts(),
) -> Deferred[AttemptResult]:
    """One attempt for one message on a connection of its own; never fails."""
    return Deferred.fromCoroutine(_deliver(reactor, target, helo_name, outgoing, timeouts))


async def _deliver(
    reactor: IReactorTCP,
    target: RelayTarget,
    helo_name: str,
    outgoing: Outgoing,
    timeouts: Timeouts,
) -> AttemptResult:
    try:
        session = await open_session(reactor, target, helo_name, timeouts)
    except RelayError as error:
        return AttemptResult(error.remote, tuple(_result(error, a) for a in outgoing.recipients))
    try:
        return await session.send(outgoing)
    finally:
        await session.close()


async def _open_at(
    reactor: IReactorTCP,
    target: RelayTarget,
    helo: bytes,
    timeouts: Timeouts,
    address: str,
    tls_allowed: bool,
) -> RelaySession:
    remote = describe(target.name, address, target.port)
    implicit = verified_tls(target.name, target.ca_file) if target.tls == "implicit" else None
    factory = ConnectionFactory(reactor, timeouts, implicit)
    connection = await connect_tcp(
        reactor, address, target.port, factory, timeouts.connect, remote
    )
    opening = _Opening(connection, target, remote, helo)
    try:
        features = await opening.run(tls_allowed)
    except LinkError as error:
        await connection.abort()
        raise _link_failure(error, remote, opening.stage) from None
    except RelayError:
        await connection.quit()
        raise
    except CancelledError:
        await connection.abort()
        raise
    return RelaySession(reactor, connection, remote, features)


class _Opening:
    """Greeting, EHLO/HELO, STARTTLS, EHLO again, AUTH."""

    def __init__(
        self, connection: SMTPConnection, target: RelayTarget, remote: str, helo: bytes
    ) -> None:
        self._connection = connection
        self._target = target
        self._remote = remote
        self._helo = helo
        self.stage = "receiving the initial server greeting"

    async def run(self, tls_allowed: bool) -> dict[str, str]:
        greeting = await self._connection.greeting
        if not greeting.positive:
            raise greeting.error("greeting", self._remote)
        features = await self._hello()
        if self._wants_starttls(features, tls_allowed):
            features = await self._starttls(features)
        if self._target.username is not None:
            await self._authenticate(features)
        return features

    def _wants_starttls(self, features: dict[str, str], tls_allowed: bool) -> bool:
        mode = self._target.tls
        if mode == "starttls":
            if "STARTTLS" not in features:
                text = f"TLS is required, but was not offered by host {self._remote}"
                raise TLSFailed(454, "4.7.4", text, remote=self._remote)
            return True
        return mode == "may" and tls_allowed and "STARTTLS" in features

    async def _hello(self) -> dict[str, str]:
        self.stage = "performing the EHLO handshake"
        reply = await self._connection.command(b"EHLO " + self._helo)
        if reply.positive:
            return _features(reply)
        if reply.code // 100 == 5:
            self.stage = "performing the HELO handshake"
            reply = await self._connection.command(b"HELO " + self._helo)
            if reply.positive:
                return {}
            raise reply.error("HELO", self._remote)
        raise reply.error("EHLO", self._remote)

    async def _starttls(self, features: dict[str, str]) -> dict[str, str]:
        self.stage = "performing the STARTTLS handshake"
        reply = await self._connection.command(b"STARTTLS")
        if reply.code != 220:
            if self._target.tls == "may":
                return features
            raise TLSFailed(454, "4.7.4", str(reply), "STARTTLS", self._remote)
        if self._target.tls == "may":
            creator = opportunistic_tls()
        else:
            creator = verified_tls(self._target.name, self._target.ca_file)
        await self._connection.start_tls(creator)
        return await self._hello()

    async def _authenticate(self, features: dict[str, str]) -> None:
        remote = self._remote
        if self._connection.tls is None and self._target.tls != "none":
            raise temporary("4.7.4", f"not authenticating to {remote} without TLS", remote)
        self.stage = "authenticating"
        mechanisms = features.get("AUTH", "").upper().split()
        user = self._target.username.encode()
        password = self._target.password.encode()
        if "PLAIN" in mechanisms:
            plain = _b64(b"\0" + user + b"\0" + password)
            reply = await self._connection.command(b"AUTH PLAIN " + plain)
        elif "LOGIN" in mechanisms:
            reply = await self._login(user, password)
        else:
            text = f"{remote} offers no AUTH mechanism we use (PLAIN, LOGIN)"
            raise temporary("4.7.4", text, remote)
        if reply.code != 235:
            raise RelayError(454, "4.7.8", str(reply), "AUTH", self._remote)

    async def _login(self, user: bytes, password: bytes) -> Reply:
        reply = await self._connection.command(b"AUTH LOGIN")
        for secret in (user, password):
            if reply.code != 334:
                break
            reply = await self._connection.command(_b64(secret))
        return reply


class RelaySession:
    """An open, greeted (and maybe encrypted and authenticated) connection."""

    def __init__(
        self,
        reactor: IReactorThreads,
        connection: SMTPConnection,
        remote: str,
        features: dict[str, str],
    ) -> None:
        self._reactor = reactor
        self._connection = connection
        self._features = features
        self._busy = False
        self._used = False
        self.remote = remote

    @property
    def usable(self) -> bool:
        """Whether another message can go over this connection."""
        return self._connection.usable

    @property
    def tls(self) -> str | None:
        """E.g. "TLSv1.3 with TLS_AES_256_GCM_SHA384"; None in clear."""
        return self._connection.tls

    def send(self, outgoing: Outgoing) -> Deferred[AttemptResult]:
        """One transaction; fires with a result per recipient, never fails."""
        if self._busy:
            raise RuntimeError("one message at a time on a session")
        return Deferred.fromCoroutine(self._send(outgoing))

    def close(self) -> Deferred[None]:
        return self._connection.quit()

    async def _send(self, outgoing: Outgoing) -> AttemptResult:
        self._busy = True
        transaction = _Transaction(outgoing.recipients)
        try:
            await self._transaction(outgoing, transaction)
        except RelayError as error:
            transaction.settle(error)
        except LinkError as error:
            stage = transaction.stage
            if stage == SENDING_BODY and self._connection.body_sent:
                stage = _AFTER_BODY
            transaction.settle(_link_failure(error, self.remote, stage))
        finally:
            self._busy = False
        return AttemptResult(self.remote, transaction.results())

    async def _transaction(self, outgoing: Outgoing, transaction: _Transaction) -> None:
        if not self._connection.usable:
            raise temporary("4.4.2", f"connection to {self.remote} is closed", self.remote)
        self._check_extensions(outgoing)
        sender = _address_bytes(outgoing.sender)
        if sender is None:
            text = f"bad sender address syntax: {outgoing.sender!r}"
            raise permanent("5.1.7", text, self.remote)
        transaction.refuse_bad_addresses()
        if not transaction.sendable:
            return
        outgoing, file = await self._prepared(outgoing)
        with file:
            if self._used:
                await self._reset(transaction)
            self._used = True
            if await self._envelope(outgoing, sender, transaction):
                transaction.stage = SENDING_BODY
                body = Prefixed(outgoing.prefix, file) if outgoing.prefix else file
                reply = await self._connection.send_body(body)
                transaction.decide_accepted(reply, "end of DATA")

    def _check_extensions(self, outgoing: Outgoing) -> None:
        """Refuse, before MAIL, what this server cannot take."""
        self._check_size(outgoing)
        if self._needs_smtputf8(outgoing) and "SMTPUTF8" not in self._features:
            status = "5.6.7" if not _all_ascii(outgoing) else "5.6.9"
            text = f"SMTPUTF8 is required, but was not offered by host {self.remote}"
            raise permanent(status, text, self.remote)

    def _check_size(self, outgoing: Outgoing) -> None:
        limit = self._features.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < outgoing.size:
            text = (
                f"message size {outgoing.size} exceeds size limit {limit}"
                f" of server {self.remote}"
            )
            raise permanent("5.3.4", text, self.remote)

    async def _prepared(self, outgoing: Outgoing) -> tuple[Outgoing, BinaryIO]:
        """The message as this server takes it, and the file to send.

        The queue file itself, unless the message is 8-bit and the server
        has no 8BITMIME: then a 7-bit copy, made at each attempt.
        """
        if not outgoing.eight_bit or "8BITMIME" in self._features:
            return outgoing, _open_queue_file(outgoing.path)
        remote = self.remote
        try:
            copy = await seven_bit_copy(self._reactor, outgoing, self._needs_smtputf8(outgoing))
        except Unconvertible as error:
            text = f"8BITMIME is required, but was not offered by host {remote}; {error}"
            raise permanent("5.6.3", text, remote) from None
        maillog.converted(outgoing.queue_id, remote)
        size = copy.seek(0, os.SEEK_END)
        copy.seek(0)
        converted = replace(outgoing, size=size, eight_bit=False, prefix=b"")
        try:
            self._check_size(converted)
        except RelayError:
            copy.close()
            raise
        return converted, copy

    @staticmethod
    def _needs_smtputf8(outgoing: Outgoing) -> bool:
        return outgoing.smtputf8 or not _all_ascii(outgoing)

    async def _reset(self, transaction: _Transaction) -> None:
        transaction.stage = "sending RSET"
        reply = await self._connection.command(b"RSET")
        if not reply.positive:
            self._connection.abort()
            raise temporary("4.4.2", f"{self.remote} refused RSET: {reply}", self.remote)

    def _mail_command(self, outgoing: Outgoing, sender: bytes) -> bytes:
        command = b"MAIL FROM:<" + sender + b">"
        if "SIZE" in self._features:
            command += b" SIZE=%d" % outgoing.size
        if outgoing.eight_bit:
            command += b" BODY=8BITMIME"
        if self._needs_smtputf8(outgoing):
            command += b" SMTPUTF8"
        return command

    async def _envelope(
        self, outgoing: Outgoing, sender: bytes, transaction: _Transaction
    ) -> bool:
        """MAIL, RCPT, DATA; True when the body should follow."""
        mail = self._mail_command(outgoing, sender)
        rcpts = [b"RCPT TO:<" + address + b">" for address in transaction.sendable.values()]
        transaction.stage = "sending MAIL FROM"
        if "PIPELINING" in self._features:
            replies = await self._connection.send_commands([mail, *rcpts, b"DATA"])
            return await self._judge(transaction, replies[0], replies[1:-1], replies[-1])
        reply = await self._connection.command(mail)
        if not reply.positive:
            return await self._judge(transaction, reply, [], None)
        transaction.stage = "sending RCPT TO"
        rcpt_replies = [await self._connection.command(rcpt) for rcpt in rcpts]
        data_reply = None
        if any(r.positive for r in rcpt_replies):
            transaction.stage = "sending DATA"
            data_reply = await self._connection.command(b"DATA")
        return await self._judge(transaction, reply, rcpt_replies, data_reply)

    async def _judge(
        self,
        transaction: _Transaction,
        mail: Reply,
        rcpts: Sequence[Reply],
        data: Reply | None,
    ) -> bool:
        """Per-recipient verdicts from the envelope's replies."""
        if not mail.positive:
            transaction.decide_all(mail, "MAIL FROM")
        else:
            transaction.decide_rcpts(rcpts)
        if data is None:
            return False
        if data.code == 354 and not transaction.accepted:
            # RFC 2920 3.1: a server that took DATA after refusing every
            # recipient gets an empty message, which it cannot deliver.
            transaction.stage = "sending end of data"
            await self._connection.command(b".")
            return False
        if data.code != 354:
            transaction.decide_accepted(data, "DATA")
            return False
        return True


class _Transaction:
    """Per-recipient bookkeeping for one message on one session."""

    def __init__(self, recipients: Sequence[str]) -> None:
        self._recipients = tuple(recipients)
        self._results: list[RecipientResult | None] = [None] * len(recipients)
        self.sendable: dict[int, bytes] = {}
        self.accepted: list[int] = []
        self.stage = "starting the transaction"

    def refuse_bad_addresses(self) -> None:
        for index, address in enumerate(self._recipients):
            encoded = _address_bytes(address)
            if encoded is None:
                text = f"bad recipient address syntax: {address!r}"
                self._results[index] = RecipientResult(address, 553, "5.1.3", text)
            else:
                self.sendable[index] = encoded

    def decide_rcpts(self, replies: Sequence[Reply]) -> None:
        for index, reply in zip(self.sendable, replies):
            if reply.positive:
                self.accepted.append(index)
            else:
                self._results[index] = reply.verdict(self._recipients[index], "RCPT TO")

    def decide_all(self, reply: Reply, command: str) -> None:
        for index in self.sendable:
            self._results[index] = reply.verdict(self._recipients[index], command)

    def decide_accepted(self, reply: Reply, command: str) -> None:
        for index in self.accepted:
            self._results[index] = reply.verdict(self._recipients[index], command)

    def settle(self, error: RelayError) -> None:
        """``error`` for every recipient still undecided."""
        for index, result in enumerate(self._results):
            if result is None:
                self._results[index] = _result(error, self._recipients[index])

    def results(self) -> tuple[RecipientResult, ...]:
        decided = tuple(result for result in self._results if result is not None)
        assert len(decided) == len(self._recipients), "a recipient was left undecided"
        return decided


def _result(error: RelayError, address: str) -> RecipientResult:
    return RecipientResult(address, error.code, error.status, error.text, error.in_reply_to)


def _link_failure(error: LinkError, remote: str, stage: str) -> RelayError:
    """A broken connection as a temporary failure, worded like Postfix."""
    if error.during_handshake:
        return TLSFailed(454, "4.7.5", f"{error.what} with {remote}", remote=remote)
    if error.what == "timed out":
        text = f"conversation with {remote} timed out while {stage}"
    else:
        text = f"{error.what} with {remote} while {stage}"
    return RelayError(421, "4.4.2", text, remote=remote)


def _features(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters."""
    features = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.partition(" ")
        features[keyword.upper()] = parameters
    return features


def _address_bytes(address: str) -> bytes | None:
    """The address for a MAIL or RCPT command, or None if it cannot go
    on the wire (controls would let it inject commands)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        return None
    return address.encode("utf-8")


def _open_queue_file(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise temporary("4.3.0", f"cannot open the queue file: {error.strerror}") from None


def _all_ascii(outgoing: Outgoing) -> bool:
    return all(address.isascii() for address in (outgoing.sender, *outgoing.recipients))


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)
