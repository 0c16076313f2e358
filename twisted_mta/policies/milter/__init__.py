"""``milter``: ask a Sendmail milter (OpenDKIM, rspamd, ClamAV's...) about
every message, over the milter protocol, as Postfix's ``smtpd_milters``.

We wrote our own client: there is no maintained milter client for Twisted
(pymilter and its kin are the milter side, with threads), and the protocol
is small.  :mod:`.codec` is the wire format, :mod:`.client` one
connection and one transaction's conversation; here is the policy, which
ties the separate hook calls of a transaction to one milter connection.

The MAIL hook opens the connection and sends CONNECT, HELO and MAIL (a
refusal there refuses the sender); the connection then waits for the
transaction's first RCPT, found by the session and the sender (two
transactions with the same session and sender have said the same to their
milters, so either connection serves either).  From then on it is kept by
the transaction's queue id, until the end of the message, which QUITs it.
A connection left idle for ``IDLE`` seconds (a transaction that ended
before its message: RSET, a refusal, a client gone) is closed; should its
transaction come back, a new connection replays CONNECT, HELO, MAIL (with
no ESMTP arguments) and the recipients so far.  See ``docs/plugins/milter.md``.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.interfaces import (
    IMailPolicy,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
)
from twisted_mta.policies.milter.client import Conversation, MilterError, MilterProtocol, negotiate

__all__ = ["MilterError", "MilterPolicy", "Settings", "make_policy"]

IDLE = 120.0
DEFAULT_ACTIONS = ("tempfail", "accept")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m)?")
_log = Logger()


@dataclass(frozen=True)
class Settings:
    endpoint: str
    timeout: float = 30.0
    default_action: str = "tempfail"
    macros: Mapping[str, str] = field(default_factory=dict)


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> MilterPolicy:
    """The policy from ``[plugins.milter]``; ValueError names a bad option."""
    known = {"socket", "timeout", "default_action", "macros"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    timeout = _seconds(options.get("timeout", 30), "timeout")
    if "socket" not in options:
        raise ValueError("socket: required, as inet:PORT@HOST, tcp:HOST:PORT or unix:/PATH")
    action = options.get("default_action", "tempfail")
    if action not in DEFAULT_ACTIONS:
        raise ValueError(f"default_action: must be one of {', '.join(DEFAULT_ACTIONS)}")
    macros = options.get("macros", {})
    if not isinstance(macros, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in macros.items()
    ):
        raise ValueError("macros: expected a table of names and text values")
    settings = Settings(endpoint_for(options["socket"], timeout), timeout, action, dict(macros))
    return MilterPolicy(settings, context.reactor, context.hostname)


def endpoint_for(socket: Any, timeout: float) -> str:
    """A Twisted client endpoint string for a Postfix-style milter socket:
    ``inet:PORT@HOST``, ``unix:/PATH`` (or ``local:``), or ``tcp:HOST:PORT``."""
    if not isinstance(socket, str):
        raise ValueError("socket: expected text")
    kind, _, rest = socket.partition(":")
    if kind in ("unix", "local") and rest:
        return f"unix:path={_quoted(rest)}:timeout={timeout:g}"
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
    elif kind == "tcp":
        host, _, port = rest.rpartition(":")
    else:
        host = port = ""
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"socket: {socket!r} is not inet:PORT@HOST, tcp:HOST:PORT or unix:/PATH")
    return f"tcp:host={_quoted(host)}:port={port}:timeout={timeout:g}"


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _seconds(value: Any, key: str) -> float:
    """30, 2.5, "30s", "500ms" or "1m"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"{key}: expected seconds or a duration such as \"30s\"")
        unit = {"ms": 0.001, "m": 60.0}.get(match.group(2), 1.0)
        seconds = float(match.group(1)) * unit
    if seconds <= 0:
        raise ValueError(f"{key}: must be more than zero")
    return seconds


@dataclass(eq=False)
class _Held:
    """A conversation between two hooks, and the timer that ends it."""

    conversation: Conversation
    key: tuple
    timer: Any = None


@implementer(IMailPolicy)
class MilterPolicy:
    """The hooks: MAIL, RCPT and the message (CONNECT and HELO are sent
    with MAIL, on the transaction's own connection)."""

    def __init__(self, settings: Settings, reactor: Any, hostname: str) -> None:
        self.settings = settings
        self.reactor = reactor
        self.hostname = hostname
        self._held: dict[tuple, list[_Held]] = {}

    def mail_from(
        self, session: SessionInfo, sender: str, params: Mapping[str, str]
    ) -> defer.Deferred[Verdict | None]:
        return self._run("mail_from", self._mail_from(session, sender, params))

    def rcpt_to(
        self,
        session: SessionInfo,
        transaction: TransactionInfo,
        recipient: str,
        params: Mapping[str, str],
    ) -> defer.Deferred[Verdict | None]:
        return self._run("rcpt_to", self._rcpt_to(session, transaction, recipient, params))

    def message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> defer.Deferred[Verdict | None]:
        return self._run("message", self._message(session, transaction, message))

    def held(self) -> int:
        """How many milter conversations wait between hooks."""
        return sum(len(queue) for queue in self._held.values())

    async def _mail_from(
        self, session: SessionInfo, sender: str, params: Mapping[str, str]
    ) -> Verdict | None:
        conversation = await self._start(session, sender, params)
        answer = conversation.answer
        if answer is not None and answer.refuses:
            conversation.close()
        else:
            self._hold(conversation, ("mail", session, sender))
        return answer

    async def _rcpt_to(
        self,
        session: SessionInfo,
        transaction: TransactionInfo,
        recipient: str,
        params: Mapping[str, str],
    ) -> Verdict | None:
        conversation = await self._claim(session, transaction, replay_recipients=False)
        try:
            verdict = conversation.answer or await conversation.rcpt(recipient, params)
        except BaseException:
            conversation.close()
            raise
        self._hold(conversation, ("queue", transaction.queue_id))
        return verdict

    async def _message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> Verdict | None:
        conversation = await self._claim(session, transaction, replay_recipients=True)
        try:
            if conversation.answer is not None:
                return conversation.answer
            with message.open() as stream:
                return await conversation.message(transaction.queue_id, stream)
        finally:
            conversation.close()

    async def _claim(
        self, session: SessionInfo, transaction: TransactionInfo, replay_recipients: bool
    ) -> Conversation:
        """The transaction's conversation: kept by queue id, or waiting
        since MAIL, or a new one that replays what the transaction did."""
        held = self._take(("queue", transaction.queue_id)) or self._take(
            ("mail", session, transaction.sender)
        )
        if held is not None:
            kept = held.conversation
            # A milter that closed its end while we waited (a restart) is
            # asked again, over a new connection.
            if kept.answer is not None or not kept.protocol.lost:
                return kept
        conversation = await self._start(session, transaction.sender, {})
        if replay_recipients:
            try:
                for recipient in transaction.recipients:
                    if conversation.answer is None:
                        await conversation.rcpt(recipient, {})
            except BaseException:
                conversation.close()
                raise
        return conversation

    async def _start(
        self, session: SessionInfo, sender: str, params: Mapping[str, str]
    ) -> Conversation:
        """A new connection, negotiated, through CONNECT, HELO and MAIL."""
        milter = MilterProtocol(self.reactor, self.settings.timeout)
        endpoint = clientFromString(self.reactor, self.settings.endpoint)
        try:
            await connectProtocol(endpoint, milter)
        except Exception as error:
            raise MilterError(f"cannot connect: {error}") from None
        try:
            negotiated = await negotiate(milter)
        except BaseException:
            milter.abort()
            raise
        conversation = Conversation(milter, negotiated, self.hostname, self.settings.macros)
        try:
            for step in (conversation.connect, conversation.helo):
                if conversation.answer is None:
                    await step(session)
            if conversation.answer is None:
                await conversation.mail(session, sender, params)
        except BaseException:
            conversation.close()
            raise
        return conversation

    def _hold(self, conversation: Conversation, key: tuple) -> None:
        # A decided transaction needs no milter any more, only its answer.
        if conversation.answer is not None:
            conversation.close()
        held = _Held(conversation, key)
        held.timer = self.reactor.callLater(IDLE, self._release, held)
        self._held.setdefault(key, []).append(held)

    def _take(self, key: tuple) -> _Held | None:
        waiting = self._held.get(key)
        if not waiting:
            return None
        held = waiting.pop(0)
        if not waiting:
            del self._held[key]
        if held.timer.active():
            held.timer.cancel()
        return held

    def _release(self, held: _Held) -> None:
        waiting = self._held.get(held.key, [])
        if held in waiting:
            waiting.remove(held)
            if not waiting:
                del self._held[held.key]
        held.conversation.close()

    def _run(self, hook: str, work: Coroutine) -> defer.Deferred[Verdict | None]:
        d = defer.ensureDeferred(work)
        if self.settings.default_action == "accept":
            d.addErrback(self._pass_over, hook)
        return d

    def _pass_over(self, failure: Any, hook: str) -> None:
        failure.trap(MilterError)
        _log.warn(
            "milter: {hook}: {error}; passed over (default_action = accept)",
            hook=hook,
            error=failure.value,
        )
        return None
