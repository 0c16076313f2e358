"""Where to send mail for a domain: MX routing through ``twisted.names``.

Twisted's ``MXCalculator`` returns one MX per attempt, never tries the
backups, falls back through an ANY query, treats a null MX as a host name
and connects over IPv4 only (audit 5.3).  This module answers the whole
route at once:

* MX records in preference order, shuffled within equal preference;
* no MX at all (NXDOMAIN of the MX query, or an answer without MX records)
  means the domain itself, by its A and AAAA records (RFC 5321 5.1);
* a null MX (RFC 7505: one MX of preference 0 and exchange ".") is a
  permanent failure, 5.1.10;
* CNAME chains in answers are followed, at most ``MAX_CNAME`` links;
* each host's AAAA and A addresses, IPv6 first.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError

MAX_CNAME = 8


class RouteError(Exception):
    """No route now (``permanent`` false) or never (true)."""

    def __init__(self, permanent: bool, status: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.status = status
        self.text = text


@dataclass(frozen=True)
class MXHost:
    preference: int
    name: str


def _follow(answers, name: str, record_type: int) -> tuple[list, str]:
    """Records of ``record_type`` for ``name`` through the CNAMEs in
    ``answers``, and the name the chain ended at (to ask again when the
    answer stopped at a CNAME)."""
    wanted = _name(name)
    for _ in range(MAX_CNAME + 1):
        found = [r.payload for r in answers if r.type == record_type and _name(r.name) == wanted]
        if found:
            return found, wanted
        aliases = [
            _name(r.payload.name)
            for r in answers
            if r.type == dns.CNAME and _name(r.name) == wanted
        ]
        if not aliases:
            return [], wanted
        wanted = aliases[0]
    raise RouteError(False, "4.4.3", f"CNAME chain too long for {name}")


def _name(value) -> str:
    if isinstance(value, dns.Name):
        value = value.name.decode("ascii", "replace")
    return value.lower().rstrip(".")


@defer.inlineCallbacks
def _lookup(lookup, name: str, record_type: int):
    """Records of ``record_type`` for ``name``, following CNAMEs across
    queries too, at most ``MAX_CNAME`` names in all."""
    for _ in range(MAX_CNAME):
        answers, _, _ = yield lookup(name)
        records, final = _follow(answers, name, record_type)
        if records or final == _name(name):
            return records
        name = final
    raise RouteError(False, "4.4.3", f"CNAME chain too long for {name}")


def order_mx(hosts: list[MXHost], rng: random.Random | None = None) -> list[MXHost]:
    """Sort by preference, shuffling hosts of equal preference."""
    rng = rng or random
    keyed = [(host.preference, rng.random(), host) for host in hosts]
    return [host for _, _, host in sorted(keyed, key=lambda item: item[:2])]


@defer.inlineCallbacks
def mx_hosts(resolver, domain: str):
    """The MX hosts to try for ``domain``, best first."""
    if _is_address_literal(domain):
        return [MXHost(0, domain)]
    try:
        records = yield _lookup(resolver.lookupMailExchange, domain, dns.MX)
    except DNSNameError:
        return [MXHost(0, domain)]
    except (DomainError, defer.TimeoutError) as error:
        reason = error.__class__.__name__
        raise RouteError(False, "4.4.3", f"MX lookup for {domain} failed: {reason}") from None
    if not records:
        return [MXHost(0, domain)]
    exchanges = [(r.preference, _name(r.name)) for r in records]
    if any(not name for _, name in exchanges):
        raise RouteError(True, "5.1.10", f"Domain {domain} does not accept mail (null MX)")
    return order_mx([MXHost(preference, name) for preference, name in exchanges])


@defer.inlineCallbacks
def host_addresses(resolver, host: str):
    """The IPv6 then IPv4 addresses of ``host``; [] if it has none."""
    if _is_address_literal(host):
        return [host.strip("[]").removeprefix("IPv6:").removeprefix("ipv6:")]
    results = yield defer.DeferredList(
        [
            _lookup(resolver.lookupIPV6Address, host, dns.AAAA),
            _lookup(resolver.lookupAddress, host, dns.A),
        ],
        consumeErrors=True,
    )
    addresses: list[str] = []
    failures = []
    for succeeded, value in results:
        if not succeeded:
            failures.append(value)
            continue
        addresses.extend(_address_text(record) for record in value)
    if not addresses and failures and not all(f.check(DNSNameError) for f in failures):
        raise RouteError(False, "4.4.3", f"address lookup for {host} failed")
    return addresses


def _address_text(record) -> str:
    family = socket.AF_INET6 if isinstance(record, dns.Record_AAAA) else socket.AF_INET
    return socket.inet_ntop(family, record.address)


def _is_address_literal(name: str) -> bool:
    text = name.strip("[]")
    text = text[5:] if text.lower().startswith("ipv6:") else text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
