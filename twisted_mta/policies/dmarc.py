"""Check the From: domain of each message with DMARC (RFC 7489).

The ``message`` hook reads the SPF and DKIM results that the ``spf`` and
``dkim`` plugins gave before it (``MessageInfo.results``, which is why
the factory requires both before it), finds the policy of each From:
domain in DNS and evaluates it with :mod:`twisted_mta.mail.dmarc`.  The
result goes into the server's ``Authentication-Results`` header as
``dmarc=fail (p=reject dis=none) header.from=example.com``, where
``dis=`` is the disposition *applied*: ``none`` unless ``enforce`` made
us act on the policy.

The records are fetched through ``twisted.names`` (the daemon's resolver,
which caches by TTL) rather than a DMARC library, whose blocking lookups
would stall every session: ``_dmarc.<From domain>``, then, when that has
no DMARC record, ``_dmarc.<organizational domain>``.

With ``enforce``, a failing message whose domain asks for ``reject`` is
refused (``550 5.7.1``), and one that asks for ``quarantine`` is taken
with an ``X-Quarantine`` header, the one the ``milter`` plugin writes for
a milter's quarantine, so one Sieve rule files both (we have no hold
queue).  A temporary error is answered ``451 4.7.1`` only when it could
change that outcome.  Without ``enforce`` nothing is ever refused.

Submission, authenticated users, local submission and trusted networks
are never checked.  Options and results: ``docs/plugins/dmarc.md``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error
from zope.interface import implementer

from twisted_mta.interfaces import (
    AuthResult,
    IMailPolicy,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
)
from twisted_mta.mail.dmarc import (
    NONE,
    PASS,
    PERMERROR,
    TEMPERROR,
    Identifier,
    Record,
    RecordError,
    author_domains,
    evaluate,
    is_dmarc,
    organizational_domain,
    parse_record,
    strictly_aligned_pass,
)
from twisted_mta.policies import BuiltinFactory, from_elsewhere

OPTIONS = ("enforce",)
QUARANTINE_HEADER = "X-Quarantine"
QUERY_TIMEOUTS = (1, 3)
# Two lookups per From: domain stay under the default plugin timeout
# (10 s): a dead name server gives temperror rather than 451 4.3.0.
LOOKUP_TIMEOUT = 4.0
_DNS_FAILURES = (error.DomainError, error.ResolverError, defer.TimeoutError, OSError)
# What a message may come to, the strictest last: among several From:
# domains the strictest wins.
_ACTIONS = ("none", "quarantine", "tempfail", "reject")


@dataclass(frozen=True)
class Found:
    """What policy discovery found for a From: domain: the record, and
    whether it is the organizational domain's; or ``error`` (temperror,
    permerror) and why."""

    record: Record | None = None
    organizational: bool = False
    error: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Judgement:
    """One From: domain's result, and what it makes us do with the message."""

    domain: str
    result: AuthResult
    action: str = "none"


class LookupFailed(Exception):
    """A DNS failure (timeout, SERVFAIL): the policy is not known."""


def identifiers(results: Sequence[AuthResult]) -> tuple[Identifier | None, list[Identifier]]:
    """The SPF result (for the MAIL FROM domain, or the HELO name for the
    null sender, RFC 7489 3.1.2) and the DKIM results with their ``d=``."""
    spf = next((result for result in results if result.method == "spf"), None)
    spf_domain = spf and (spf.property("smtp.mailfrom") or spf.property("smtp.helo"))
    dkim = [
        Identifier(result.result, domain)
        for result in results
        if result.method == "dkim" and (domain := result.property("header.d"))
    ]
    return (Identifier(spf.result, spf_domain) if spf and spf_domain else None), dkim


def comment(record: Record, applied: str) -> str:
    """OpenDMARC's comment: the policy and the disposition applied."""
    subdomain = f" sp={record.subdomain_policy}" if record.subdomain_policy else ""
    return f"p={record.policy}{subdomain} dis={applied}"


@implementer(IMailPolicy)
class DMARCPolicy:
    """Evaluates the From: domains of each message received over SMTP."""

    def __init__(
        self,
        context: PolicyContext,
        enforce: bool = False,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.resolver = context.resolver
        self.clock = context.reactor
        self.trusted = tuple(context.trusted_networks)
        self.enforce = enforce
        self.draw = draw

    def message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> defer.Deferred[Verdict] | Verdict | None:
        if not from_elsewhere(session, self.trusted):
            return None
        domains = author_domains(message.headers.get_all("From") or [])
        if domains is None:
            return self._without_author()
        spf, dkim = identifiers(message.results)
        judged = [defer.ensureDeferred(self._judge(domain, spf, dkim)) for domain in domains]
        d = defer.gatherResults(judged, consumeErrors=True)
        d.addCallback(self._verdict)
        return d

    def _without_author(self) -> Verdict:
        """A message without a usable From: address has no domain whose
        policy could apply; with ``enforce`` it is refused (RFC 7489
        6.6.1), since a From: that only looks broken would otherwise slip
        past every ``p=reject``."""
        if self.enforce:
            return Verdict.reject(550, "5.7.1", "Message refused: no usable From: address")
        unusable = AuthResult("dmarc", PERMERROR, reason="no usable From: address")
        return Verdict.proceed(results=[unusable])

    async def _judge(
        self, domain: str, spf: Identifier | None, dkim: list[Identifier]
    ) -> Judgement:
        found = await self._discover(domain)
        properties = (("header.from", domain),)
        if found.error or found.record is None:
            result = AuthResult("dmarc", found.error or NONE, properties, found.reason)
            # Without the record the alignment modes are unknown: only a
            # strictly aligned pass is sure to pass under it.
            unsure = found.error == TEMPERROR and not strictly_aligned_pass(domain, spf, dkim)
            return Judgement(domain, result, "tempfail" if self.enforce and unsure else "none")
        evaluation = evaluate(domain, found.record, found.organizational, spf, dkim, self.draw())
        action = self._action(evaluation.result, evaluation.disposition)
        applied = action if action in ("quarantine", "reject") else "none"
        text = comment(found.record, applied)
        result = AuthResult("dmarc", evaluation.result, properties, comment=text)
        return Judgement(domain, result, action)

    def _action(self, result: str, disposition: str) -> str:
        if not self.enforce or result == PASS or disposition == "none":
            return "none"
        return "tempfail" if result == TEMPERROR else disposition

    async def _discover(self, domain: str) -> Found:
        """The policy record of ``domain`` (RFC 7489 6.6.3)."""
        organizational = organizational_domain(domain)
        try:
            records = await self._records(domain)
            at_organizational = not records and organizational != domain
            if at_organizational:
                records = await self._records(organizational)
        except LookupFailed as failure:
            return Found(error=TEMPERROR, reason=str(failure))
        # None, or more than one, is no policy at all.
        if len(records) != 1:
            return Found()
        try:
            return Found(parse_record(records[0]), at_organizational)
        except RecordError as problem:
            return Found(error=PERMERROR, reason=str(problem))

    async def _records(self, domain: str) -> list[str]:
        """The DMARC records at ``_dmarc.<domain>``; other TXT records there
        are ignored."""
        name = f"_dmarc.{domain}"
        d = self.resolver.lookupText(name, timeout=QUERY_TIMEOUTS)
        d.addTimeout(LOOKUP_TIMEOUT, self.clock)
        try:
            answers, _, _ = await d
        except error.DNSNameError:
            return []
        except _DNS_FAILURES as problem:
            raise LookupFailed(f"DNS TXT {name}: {type(problem).__name__}") from None
        texts = [_text(answer.payload) for answer in answers if answer.type == dns.TXT]
        return [text for text in texts if is_dmarc(text)]

    def _verdict(self, judgements: list[Judgement]) -> Verdict:
        results = [judgement.result for judgement in judgements]
        worst = max(judgements, key=lambda judgement: _ACTIONS.index(judgement.action))
        if worst.action == "reject":
            text = f"Email rejected per DMARC policy for {worst.domain}"
            return Verdict.reject(550, "5.7.1", text)
        if worst.action == "tempfail":
            text = f"DMARC policy of {worst.domain} could not be checked, try again later"
            return Verdict.tempfail(451, "4.7.1", text)
        if worst.action == "quarantine":
            flag = (QUARANTINE_HEADER, f"DMARC policy of {worst.domain}: quarantine")
            return Verdict.proceed([flag], results=results)
        return Verdict.proceed(results=results)


def _text(payload: Any) -> str:
    # A TXT record's strings are one text, joined (RFC 7489 6.6.3 step 1).
    return b"".join(payload.data).decode("ascii", "replace")


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> DMARCPolicy:
    """The policy for ``[plugins.dmarc]``; raises ValueError naming the
    option that is wrong."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(OPTIONS)})")
    enforce = options.get("enforce", False)
    if not isinstance(enforce, bool):
        raise ValueError(f"enforce: expected true or false, not {enforce!r}")
    return DMARCPolicy(context, enforce)


factory = BuiltinFactory(
    "dmarc",
    "Check the From: domain with DMARC on SPF and DKIM results; optionally enforce its policy",
    make_policy,
    requires=("spf", "dkim"),
)
