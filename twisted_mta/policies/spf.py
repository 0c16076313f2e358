"""Check the envelope sender with SPF (RFC 7208) and record the result.

At MAIL FROM on the ``smtp`` listener, the sender's domain is checked
with :func:`twisted_mta.mail.spf.check_host` (the HELO name, as
``postmaster@HELO``, for the null sender).  A ``fail`` is refused only
with ``reject_fail``, a ``temperror`` deferred only with
``temperror_defer``; every result is remembered so that the ``message``
hook prepends a ``Received-SPF`` header (RFC 7208 section 9.1) and gives
the result for the server's ``Authentication-Results`` header.

``mail_from`` has no transaction yet, so the result is kept under
(client address, HELO, sender) in a bounded dict, and ``message`` finds
it with the transaction's sender.  A result pushed out of that dict by a
flood of other senders gives a message without the header.

DNS answers are cached by TTL in the resolver itself (the ``twisted.names``
cache that ``[relay] resolvers`` sets up), so nothing is cached here.

Submission, authenticated users, local submission and trusted networks
are never checked.  Options and replies: ``docs/plugins/spf.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from twisted_mta.interfaces import (
    AuthResult,
    IMailPolicy,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
    client_address,
)
from twisted_mta.mail.spf import FAIL, NONE, PASS, TEMPERROR, check_host
from twisted_mta.policies import BuiltinFactory, from_elsewhere

OPTIONS = ("reject_fail", "temperror_defer")
# Well under the default plugin timeout (10 s): a dead name server gives
# temperror rather than the plugin's 451 4.3.0.
CHECK_TIMEOUT = 8.0
MAX_REMEMBERED = 10000
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
Key = tuple[str, str, str]
Checked = tuple[str, str]


def identity(sender: str, helo: str | None) -> tuple[str, str]:
    """The domain to check and the sender to check it for: the HELO name
    as ``postmaster@HELO`` for the null sender (RFC 7208 2.4)."""
    if not sender:
        name = helo or ""
        return name, f"postmaster@{name}"
    return sender.rpartition("@")[2], sender


def received_spf(result: str, explanation: str, hostname: str, key: Key) -> str:
    """A ``Received-SPF`` value (RFC 7208 9.1)."""
    client_ip, helo, sender = key
    comment = _comment(result, explanation, hostname, client_ip, sender, helo)
    fields = [
        f"client-ip={client_ip}",
        f"envelope-from={_quoted(sender)}",
        f"helo={_quoted(helo)}",
        f"receiver={hostname}",
        f"identity={'mailfrom' if sender else 'helo'}",
    ]
    return f"{result} ({comment}) " + "; ".join(fields) + ";"


def auth_result(result: str, sender: str, helo: str) -> AuthResult:
    """The SPF result for ``Authentication-Results`` (RFC 8601): the
    domain checked, of the sender or, for ``<>``, the HELO name."""
    if sender:
        return AuthResult("spf", result, (("smtp.mailfrom", sender.rpartition("@")[2]),))
    return AuthResult("spf", result, (("smtp.helo", helo),))


def _comment(
    result: str, explanation: str, hostname: str, ip: str, sender: str, helo: str
) -> str:
    who = f"domain of {sender}" if sender else f"domain of postmaster@{helo}"
    text = {
        PASS: f"{who} designates {ip} as permitted sender",
        FAIL: f"{who} does not designate {ip} as permitted sender",
        NONE: f"{who} does not publish SPF",
    }.get(result, f"{who}: {explanation}")
    return f"{hostname}: " + re.sub(r"[()\\\r\n]", "", text)


def _quoted(value: str) -> str:
    if value and _DOT_ATOM.fullmatch(value):
        return value
    return '"' + re.sub(r'["\\\r\n]', "", value) + '"'


@implementer(IMailPolicy)
class SPFPolicy:
    """Checks each sender at MAIL FROM; adds ``Received-SPF`` to its message."""

    def __init__(
        self,
        context: PolicyContext,
        reject_fail: bool = False,
        temperror_defer: bool = False,
    ) -> None:
        self.resolver = context.resolver
        self.clock = context.reactor
        self.hostname = context.hostname
        self.trusted = tuple(context.trusted_networks)
        self.reject_fail = reject_fail
        self.temperror_defer = temperror_defer
        self._results: dict[Key, Checked] = {}

    def mail_from(
        self, session: SessionInfo, sender: str, params: Mapping[str, str]
    ) -> defer.Deferred[Verdict | None] | None:
        if not from_elsewhere(session, self.trusted):
            return None
        key = (session.client_ip, session.helo or "", sender)
        domain, checked_sender = identity(sender, session.helo)
        ip = str(client_address(session.client_ip))
        d = check_host(ip, domain, checked_sender, session.helo or "", self.resolver)
        d.addTimeout(CHECK_TIMEOUT, self.clock, lambda *_: (TEMPERROR, "DNS lookups timed out"))
        d.addCallback(self._checked, key)
        return d

    def message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> Verdict | None:
        if not from_elsewhere(session, self.trusted):
            return None
        key = (session.client_ip, session.helo or "", transaction.sender)
        found = self._results.get(key)
        if found is None:
            return None
        value = received_spf(*found, self.hostname, key)
        result = auth_result(found[0], transaction.sender, session.helo or "")
        return Verdict.proceed([("Received-SPF", value)], results=[result])

    def result_for(self, session: SessionInfo, sender: str) -> Checked | None:
        """The remembered ``(result, explanation)`` for a sender of ``session``."""
        return self._results.get((session.client_ip, session.helo or "", sender))

    def _checked(self, checked: Checked, key: Key) -> Verdict | None:
        self._remember(key, checked)
        result, explanation = checked
        if result == FAIL and self.reject_fail:
            return Verdict.reject(550, "5.7.23", f"SPF fail: {_comment_text(key, explanation)}")
        if result == TEMPERROR and self.temperror_defer:
            return Verdict.tempfail(451, "4.7.24", f"SPF temporary error: {explanation}")
        return None

    def _remember(self, key: Key, checked: Checked) -> None:
        self._results.pop(key, None)
        self._results[key] = checked
        if len(self._results) > MAX_REMEMBERED:
            del self._results[next(iter(self._results))]


def _comment_text(key: Key, explanation: str) -> str:
    client_ip, helo, sender = key
    who = sender or f"postmaster@{helo}"
    return f"{who} does not designate {client_ip} as permitted sender ({explanation})"


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> SPFPolicy:
    """The policy for ``[plugins.spf]``; raises ValueError naming the
    option that is wrong."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(OPTIONS)})")
    flags = {key: _boolean(options.get(key, False), key) for key in OPTIONS}
    return SPFPolicy(context, **flags)


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, not {value!r}")
    return value


factory = BuiltinFactory(
    "spf",
    "Check the envelope sender with SPF; add Received-SPF; optionally refuse fail",
    make_policy,
)

