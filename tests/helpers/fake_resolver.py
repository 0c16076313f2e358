"""A twisted.names resolver in memory: answers from a dict of zones,
NXDOMAIN for names it does not hold, SERVFAIL for chosen queries, and it
fires at once (no clock, no network)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns, error

BUILDERS = {
    "TXT": (dns.TXT, lambda text: dns.Record_TXT(text.encode())),
    "A": (dns.A, dns.Record_A),
    "AAAA": (dns.AAAA, dns.Record_AAAA),
    "MX": (dns.MX, lambda name: dns.Record_MX(10, name)),
    "PTR": (dns.PTR, dns.Record_PTR),
}


class FakeResolver:
    """Answers from ``zones`` ({name: [(TYPE, value), ...]}); names not in
    it are NXDOMAIN, (name, TYPE) pairs in ``failing`` SERVFAIL."""

    def __init__(self, zones, failing=()):
        self.zones = {name.lower(): entries for name, entries in zones.items()}
        self.failing = set(failing)
        self.queries: list[tuple[str, str]] = []

    def _answer(self, kind, name):
        name = name.lower()
        self.queries.append((name, kind))
        if (name, kind) in self.failing:
            return defer.fail(error.DNSServerError(dns.Message(rCode=dns.ESERVER)))
        if name not in self.zones:
            return defer.fail(error.DNSNameError(dns.Message(rCode=dns.ENAME)))
        code, build = BUILDERS[kind]
        answers = [
            dns.RRHeader(name, code, payload=build(value), ttl=60)
            for entry_kind, value in self.zones[name]
            if entry_kind == kind
        ]
        return defer.succeed((answers, [], []))

    def lookupText(self, name, timeout=None):
        return self._answer("TXT", name)

    def lookupAddress(self, name, timeout=None):
        return self._answer("A", name)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer("AAAA", name)

    def lookupMailExchange(self, name, timeout=None):
        return self._answer("MX", name)

    def lookupPointer(self, name, timeout=None):
        return self._answer("PTR", name)
