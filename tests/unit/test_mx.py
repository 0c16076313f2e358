"""MX routing decisions, against an in-memory resolver."""

import random

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError

from twisted_mta.relay.mx import MXHost, RouteError, host_addresses, mx_hosts, order_mx


def rr(name, payload):
    return dns.RRHeader(name=name, type=payload.TYPE, payload=payload, ttl=60)


class FakeResolver:
    def __init__(self, zone):
        self.zone = zone

    def _lookup(self, name, record_type):
        entry = self.zone.get((name, record_type))
        if isinstance(entry, Exception):
            return defer.fail(entry)
        if entry is None:
            return defer.fail(DNSNameError(name)) if not any(k[0] == name for k in self.zone) else defer.succeed(([], [], []))
        return defer.succeed((entry, [], []))

    def lookupMailExchange(self, name):
        return self._lookup(name, "MX")

    def lookupAddress(self, name):
        return self._lookup(name, "A")

    def lookupIPV6Address(self, name):
        return self._lookup(name, "AAAA")


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_mx_by_preference():
    zone = {("a.test", "MX"): [rr("a.test", dns.Record_MX(20, "backup.a.test")), rr("a.test", dns.Record_MX(10, "mx.a.test"))]}
    assert [h.name for h in result(mx_hosts(FakeResolver(zone), "a.test"))] == ["mx.a.test", "backup.a.test"]


def test_equal_preference_shuffled():
    hosts = [MXHost(10, f"mx{i}") for i in range(6)] + [MXHost(5, "first")]
    orders = {tuple(h.name for h in order_mx(hosts, random.Random(seed))) for seed in range(20)}
    assert all(order[0] == "first" for order in orders)
    assert len(orders) > 1


def test_no_mx_falls_back_to_domain():
    assert result(mx_hosts(FakeResolver({}), "nx.test")) == [MXHost(0, "nx.test")]
    zone = {("a.test", "A"): [rr("a.test", dns.Record_A("192.0.2.1"))]}
    assert result(mx_hosts(FakeResolver(zone), "a.test")) == [MXHost(0, "a.test")]


def test_null_mx_is_permanent():
    zone = {("null.test", "MX"): [rr("null.test", dns.Record_MX(0, ""))]}
    failure = result(mx_hosts(FakeResolver(zone), "null.test"))
    assert failure.check(RouteError) and failure.value.permanent and failure.value.status == "5.1.10"


def test_servfail_is_temporary():
    zone = {("a.test", "MX"): DNSServerError("a.test")}
    failure = result(mx_hosts(FakeResolver(zone), "a.test"))
    assert failure.check(RouteError) and not failure.value.permanent


def test_cname_followed_with_bound():
    chain = [rr("a.test", dns.Record_CNAME("b.test")), rr("b.test", dns.Record_MX(10, "mx.b.test"))]
    assert [h.name for h in result(mx_hosts(FakeResolver({("a.test", "MX"): chain}), "a.test"))] == ["mx.b.test"]
    loop = [rr("a.test", dns.Record_CNAME("b.test")), rr("b.test", dns.Record_CNAME("a.test"))]
    assert result(mx_hosts(FakeResolver({("a.test", "MX"): loop}), "a.test")).check(RouteError)


def test_addresses_v6_then_v4():
    zone = {
        ("mx.test", "A"): [rr("mx.test", dns.Record_A("192.0.2.1")), rr("mx.test", dns.Record_A("192.0.2.2"))],
        ("mx.test", "AAAA"): [rr("mx.test", dns.Record_AAAA("2001:db8::1"))],
    }
    assert result(host_addresses(FakeResolver(zone), "mx.test")) == ["2001:db8::1", "192.0.2.1", "192.0.2.2"]
    only6 = {("v6.test", "AAAA"): [rr("v6.test", dns.Record_AAAA("2001:db8::2"))]}
    assert result(host_addresses(FakeResolver(only6), "v6.test")) == ["2001:db8::2"]
    assert result(host_addresses(FakeResolver({}), "[192.0.2.9]")) == ["192.0.2.9"]
