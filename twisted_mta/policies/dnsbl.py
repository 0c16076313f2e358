"""Refuse clients whose address is listed in DNS blocklists (RFC 5782).

Most spam comes from hosts that blocklist operators already know; asking
their zones costs one DNS query per client and zone, and the answers are
cached for their TTL, so a busy client is asked about once.  The lookups
go through the daemon's ``twisted.names`` resolver and never block.  A
zone that cannot be asked (timeout, SERVFAIL) lists nobody: a broken
blocklist must not stop the mail, so it is logged once and passed over.

Trusted networks, authenticated users and local submission are never
looked up: they are our own clients, whatever a blocklist says of their
address.  Options and replies are described in ``docs/plugins/dnsbl.md``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error
from zope.interface import implementer

from twisted_mta.interfaces import (
    IMailPolicy,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
    address_in,
    client_address,
)
from twisted_mta.policies import BuiltinFactory

STAGES = ("connect", "rcpt")
OPTIONS = ("zones", "stage", "answers")
# How long "not listed" is remembered when the zone's SOA does not say.
NEGATIVE_TTL = 60.0
# Query retries (seconds each), and a bound on the whole lookup: well under
# the plugin timeout, so a dead name server means "not listed", not 451.
QUERY_TIMEOUTS = (1, 3)
LOOKUP_TIMEOUT = 5.0
# Bounds the cache under a flood of distinct clients.
MAX_CACHED = 10000
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# RFC 5782 2.1: 127.0.0.0/8 answers mean "listed"; Spamhaus and others
# answer 127.255.255.x to say the query itself was refused.
_LISTED = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_log = Logger()
# A listing: the zone, and the answers it gave.
Found = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class Listing:
    """What one zone says of one address: the A answers it listed it with
    (none: not listed), until when that holds."""

    answers: tuple[str, ...]
    expires: float


def query_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone``: reversed octets for IPv4,
    reversed nibbles for IPv6 (RFC 5782 2.1, 2.4)."""
    address = client_address(ip)
    if address is None:
        raise ValueError(f"not an IP address: {ip!r}")
    if address.version == 4:
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join([*labels, zone])


def default_listed(answer: str) -> bool:
    """A listing answer when ``answers`` is not given."""
    address = ipaddress.IPv4Address(answer)
    return address in _LISTED and address not in _ERROR_CODES


class Blocklists:
    """Looks addresses up in the zones, with a cache shared by all sessions."""

    def __init__(
        self,
        zones: Sequence[str],
        resolver: Any,
        clock: Any,
        answers: Iterable[str] | None = None,
    ) -> None:
        self.zones = tuple(zones)
        self.resolver = resolver
        self.clock = clock
        self.accepted = None if answers is None else frozenset(answers)
        self._cache: dict[str, Listing] = {}
        self._failing: set[str] = set()

    def listed(self, ip: str) -> defer.Deferred[Found | None]:
        """Fires with the first zone (in configured order) that lists
        ``ip`` and its answers, or None."""
        lookups = [self._lookup(query_name(ip, zone), zone) for zone in self.zones]
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addCallback(self._first_listing)
        return d

    def _first_listing(self, results: list[tuple[str, ...]]) -> Found | None:
        for zone, answers in zip(self.zones, results):
            if answers:
                return zone, answers
        return None

    def _lookup(self, name: str, zone: str) -> defer.Deferred[tuple[str, ...]]:
        now = self.clock.seconds()
        cached = self._cache.get(name)
        if cached is not None and cached.expires > now:
            return defer.succeed(cached.answers)
        d = self.resolver.lookupAddress(name, timeout=QUERY_TIMEOUTS)
        d.addTimeout(LOOKUP_TIMEOUT, self.clock)
        d.addCallbacks(
            self._answered, self._no_answer, callbackArgs=(name, zone), errbackArgs=(name, zone)
        )
        return d

    def _answered(self, result: tuple[list, list, list], name: str, zone: str) -> tuple[str, ...]:
        answers, authority, _ = result
        records = [r for r in answers if r.type == dns.A]
        listing = tuple(r.payload.dottedQuad() for r in records if self._listing(r))
        ttl = min(r.ttl for r in records) if records else _negative_ttl(authority)
        self._recovered(zone)
        self._remember(name, listing, ttl)
        return listing

    def _listing(self, record: dns.RRHeader) -> bool:
        answer = record.payload.dottedQuad()
        return answer in self.accepted if self.accepted is not None else default_listed(answer)

    def _no_answer(self, failure, name: str, zone: str) -> tuple[str, ...]:
        if failure.check(error.DNSNameError):
            self._recovered(zone)
            self._remember(name, (), _negative_ttl(_authority(failure.value)))
            return ()
        # Logged once until the zone answers again: a dead blocklist would
        # otherwise log every connection.
        if zone not in self._failing:
            self._failing.add(zone)
            _log.warn(
                "dnsbl: lookups in {zone} fail ({reason}); its listings are ignored"
                " until it answers again",
                zone=zone,
                reason=_describe(failure),
            )
        return ()

    def _recovered(self, zone: str) -> None:
        if zone in self._failing:
            self._failing.discard(zone)
            _log.info("dnsbl: {zone} answers again", zone=zone)

    def _remember(self, name: str, answers: tuple[str, ...], ttl: float) -> None:
        if ttl <= 0:
            return
        # Re-inserted last, so that the first entry is the oldest one.
        self._cache.pop(name, None)
        self._cache[name] = Listing(answers, self.clock.seconds() + ttl)
        if len(self._cache) > MAX_CACHED:
            del self._cache[next(iter(self._cache))]


def _negative_ttl(authority: Sequence[dns.RRHeader]) -> float:
    """RFC 2308 5: a "no such name" is remembered for the lesser of the
    SOA's TTL and its minimum field."""
    for record in authority:
        if record.type == dns.SOA:
            return float(min(record.ttl, record.payload.minimum))
    return NEGATIVE_TTL


def _authority(problem: error.DNSNameError) -> Sequence[dns.RRHeader]:
    """The authority section of the answer that said "no such name", if
    the resolver kept it (twisted.names passes the message along)."""
    message = problem.args[0] if problem.args else None
    return getattr(message, "authority", ())


def _describe(failure) -> str:
    if failure.check(defer.TimeoutError, error.DNSQueryTimeoutError):
        return "no answer"
    return type(failure.value).__name__


class _Checks:
    """Whether a session's client is exempt, and the refusal if listed."""

    def __init__(self, blocklists: Blocklists, trusted: Sequence[Any]) -> None:
        self.blocklists = blocklists
        self.trusted = tuple(trusted)

    def check(self, session: SessionInfo) -> defer.Deferred[Verdict | None] | None:
        if self._exempt(session):
            return None
        d = self.blocklists.listed(session.client_ip)
        d.addCallback(self._verdict, session.client_ip)
        return d

    def _exempt(self, session: SessionInfo) -> bool:
        if session.listener == "local" or session.user is not None:
            return True
        if client_address(session.client_ip) is None:
            return True  # not an IP client (no address to look up)
        return address_in(session.client_ip, self.trusted)

    @staticmethod
    def _verdict(found, ip: str) -> Verdict | None:
        if found is None:
            return None
        zone, _ = found
        text = f"Service unavailable; Client host [{ip}] blocked using {zone}"
        return Verdict.reject(554, "5.7.1", text)


@implementer(IMailPolicy)
class ConnectBlocklist(_Checks):
    """``stage = "connect"``: a listed client gets a 554 greeting."""

    def connect(self, session: SessionInfo) -> defer.Deferred[Verdict | None] | None:
        return self.check(session)


@implementer(IMailPolicy)
class RcptBlocklist(_Checks):
    """``stage = "rcpt"``: each recipient of a listed client is refused,
    so the client's HELO and sender are logged with the refusal."""

    def rcpt_to(
        self,
        session: SessionInfo,
        transaction: TransactionInfo,
        recipient: str,
        params: Mapping[str, str],
    ) -> defer.Deferred[Verdict | None] | None:
        return self.check(session)


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> _Checks:
    """The policy for ``[plugins.dnsbl]``; raises ValueError naming the
    option that is wrong."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(OPTIONS)})")
    zones = _zones(options.get("zones"))
    stage = options.get("stage", "rcpt")
    if stage not in STAGES:
        raise ValueError(f"stage: must be one of {', '.join(STAGES)}, not {stage!r}")
    answers = _answers(options["answers"]) if "answers" in options else None
    blocklists = Blocklists(zones, context.resolver, context.reactor, answers)
    kind = ConnectBlocklist if stage == "connect" else RcptBlocklist
    return kind(blocklists, context.trusted_networks)


def _zones(value: Any) -> tuple[str, ...]:
    problem = "zones: expected a non-empty list of DNS zone names"
    if not isinstance(value, list) or not value:
        raise ValueError(problem)
    zones = []
    for zone in value:
        name = zone.lower().rstrip(".") if isinstance(zone, str) else ""
        if not name or not all(_LABEL.fullmatch(label) for label in name.split(".")):
            raise ValueError(f"{problem}, not {zone!r}")
        zones.append(name)
    return tuple(zones)


def _answers(value: Any) -> tuple[str, ...]:
    problem = 'answers: expected a list of IPv4 addresses like "127.0.0.2"'
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ValueError(problem)
    try:
        return tuple(str(ipaddress.IPv4Address(answer)) for answer in value)
    except ValueError:
        raise ValueError(f"{problem}, not {value!r}") from None


factory = BuiltinFactory(
    "dnsbl",
    "Refuse clients whose IP address is listed in the DNS blocklists in 'zones'",
    make_policy,
)
