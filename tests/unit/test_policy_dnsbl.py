"""The dnsbl policy in memory: a fake resolver and a fake clock."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error
from twisted.plugin import IPlugin

from twisted_mta.interfaces import (
    IMailPolicy,
    IMailPolicyFactory,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
)
from twisted_mta.policies.dnsbl import (
    LOOKUP_TIMEOUT,
    MAX_CACHED,
    NEGATIVE_TTL,
    default_listed,
    factory,
    query_name,
)

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48"))
TRANSACTION = TransactionInfo("Q1", "sender@remote.example", ())


class FakeResolver:
    """Answers A queries from ``records``; ``nxdomain`` (with the SOA
    ``soa`` if given), ``servfail`` or ``hang`` names fail so."""

    def __init__(self, records=None, *, soa=None, servfail=(), hang=()):
        self.records = dict(records or {})
        self.soa = soa
        self.servfail = set(servfail)
        self.hang = set(hang)
        self.queries: list[str] = []

    def lookupAddress(self, name, timeout=None):
        self.queries.append(name)
        if name in self.hang:
            return defer.Deferred()
        message = dns.Message(rCode=dns.ENAME)
        if self.soa is not None:
            ttl, minimum = self.soa
            record = dns.Record_SOA(mname="ns.test", rname="root.test", minimum=minimum)
            message.authority = [dns.RRHeader("bl.test", dns.SOA, payload=record, ttl=ttl)]
        if name in self.servfail:
            return defer.fail(error.DNSServerError(message))
        if name not in self.records:
            return defer.fail(error.DNSNameError(message))
        answers = [
            dns.RRHeader(name, dns.A, payload=dns.Record_A(address), ttl=ttl)
            for address, ttl in self.records[name]
        ]
        return defer.succeed((answers, [], []))


def make(options, resolver, clock=None):
    clock = clock or task.Clock()
    context = PolicyContext(
        reactor=clock,
        hostname="mx.example.test",
        state_dir=Path("/nonexistent"),
        resolver=resolver,
        trusted_networks=TRUSTED,
    )
    return factory.policy(options, context)


def client(ip, listener="smtp", user=None):
    return SessionInfo(client_ip=ip, listener=listener, user=user)


def answer(policy, session):
    """The verdict of the policy's hook for its stage, fired at once."""
    if hasattr(policy, "connect"):
        result = policy.connect(session)
    else:
        result = policy.rcpt_to(session, TRANSACTION, "rcpt@example.test", {})
    if not isinstance(result, defer.Deferred):
        return result
    fired = []
    result.addBoth(fired.append)
    assert fired, "the hook did not answer"
    return fired[0]


LISTED = {"2.2.0.192.bl.test": [("127.0.0.2", 300)]}


def test_the_factory_is_a_plugin_named_dnsbl():
    assert IPlugin.providedBy(factory) and IMailPolicyFactory.providedBy(factory)
    assert factory.name == "dnsbl" and "\n" not in factory.description
    assert IMailPolicy.providedBy(make({"zones": ["bl.test"]}, FakeResolver()))


@pytest.mark.parametrize(
    "ip, name",
    [
        ("192.0.2.99", "99.2.0.192.bl.test"),
        ("::ffff:192.0.2.99", "99.2.0.192.bl.test"),
        (
            "2001:db8:1:2:3:4:567:89ab",
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test",
        ),
    ],
)
def test_query_names_reverse_octets_and_nibbles(ip, name):
    assert query_name(ip, "bl.test") == name


def test_the_rfc_5782_test_addresses():
    # RFC 5782 5: 127.0.0.2 is listed, 127.0.0.1 is not asked about at all.
    assert query_name("127.0.0.2", "bl.test") == "2.0.0.127.bl.test"
    assert query_name("::FFFF:7F00:2", "bl.test") == "2.0.0.127.bl.test"


@pytest.mark.parametrize(
    "answer, listed",
    [("127.0.0.2", True), ("127.0.1.4", True), ("127.255.255.254", False), ("10.0.0.2", False)],
)
def test_default_answers_are_127_8_but_the_error_codes(answer, listed):
    assert default_listed(answer) is listed


def test_a_listed_client_is_refused_at_rcpt_by_default():
    policy = make({"zones": ["bl.test"]}, FakeResolver(LISTED))
    verdict = answer(policy, client("192.0.2.2"))
    assert not hasattr(policy, "connect")
    assert (verdict.kind, verdict.code, verdict.enhanced) == ("reject", 554, "5.7.1")
    assert verdict.text == "Service unavailable; Client host [192.0.2.2] blocked using bl.test"


def test_at_connect_the_refusal_is_for_the_greeting():
    policy = make({"zones": ["bl.test"], "stage": "connect"}, FakeResolver(LISTED))
    assert not hasattr(policy, "rcpt_to")
    assert answer(policy, client("192.0.2.2")).code == 554
    assert answer(policy, client("192.0.2.3")) is None


def test_an_unlisted_client_goes_on():
    policy = make({"zones": ["bl.test"]}, FakeResolver(LISTED))
    assert answer(policy, client("192.0.2.3")) is None


def test_ipv6_clients_are_looked_up_by_nibbles():
    name = query_name("2001:db8::5", "bl.test")
    resolver = FakeResolver({name: [("127.0.0.4", 60)]})
    verdict = answer(make({"zones": ["bl.test"]}, resolver), client("2001:db8::5"))
    assert verdict.text.endswith("Client host [2001:db8::5] blocked using bl.test")


def test_the_first_listing_zone_in_configured_order_is_named():
    records = {"2.2.0.192.one.test": [("127.0.0.2", 60)], "2.2.0.192.two.test": [("127.0.0.3", 60)]}
    resolver = FakeResolver(records)
    policy = make({"zones": ["none.test", "two.test", "one.test"]}, resolver)
    assert answer(policy, client("192.0.2.2")).text.endswith("blocked using two.test")
    assert len(resolver.queries) == 3


def test_answers_restricts_which_answers_list():
    resolver = FakeResolver({"2.2.0.192.bl.test": [("127.0.0.10", 60)]})
    policy = make({"zones": ["bl.test"], "answers": ["127.0.0.2", "127.0.0.4"]}, resolver)
    assert answer(policy, client("192.0.2.2")) is None
    resolver.records["3.2.0.192.bl.test"] = [("127.0.0.10", 60), ("127.0.0.4", 60)]
    assert answer(policy, client("192.0.2.3")).code == 554


def test_an_error_code_answer_is_no_listing():
    resolver = FakeResolver({"2.2.0.192.bl.test": [("127.255.255.254", 60)]})
    assert answer(make({"zones": ["bl.test"]}, resolver), client("192.0.2.2")) is None


@pytest.mark.parametrize(
    "session",
    [
        client("10.1.2.3"),
        client("::ffff:10.1.2.3"),
        client("2001:db8:1::7"),
        client("192.0.2.2", listener="submission", user="alice@example.test"),
        client("127.0.0.1", listener="local", user="alice"),
    ],
)
def test_trusted_authenticated_and_local_clients_are_not_looked_up(session):
    resolver = FakeResolver({query_name(session.client_ip, "bl.test"): [("127.0.0.2", 60)]})
    assert answer(make({"zones": ["bl.test"]}, resolver), session) is None
    assert resolver.queries == []


def test_a_listing_is_cached_for_its_ttl():
    clock = task.Clock()
    resolver = FakeResolver(LISTED)
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    assert answer(policy, client("192.0.2.2")).code == 554
    clock.advance(299)
    assert answer(policy, client("192.0.2.2")).code == 554
    assert resolver.queries == ["2.2.0.192.bl.test"]
    clock.advance(1)
    del resolver.records["2.2.0.192.bl.test"]
    assert answer(policy, client("192.0.2.2")) is None
    assert len(resolver.queries) == 2


def test_no_such_name_is_cached_for_a_fixed_time_without_a_soa():
    clock = task.Clock()
    resolver = FakeResolver()
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    assert answer(policy, client("192.0.2.2")) is None
    clock.advance(NEGATIVE_TTL - 1)
    assert answer(policy, client("192.0.2.2")) is None
    assert len(resolver.queries) == 1
    clock.advance(1)
    answer(policy, client("192.0.2.2"))
    assert len(resolver.queries) == 2


def test_no_such_name_is_cached_for_the_soa_minimum():
    clock = task.Clock()
    resolver = FakeResolver(soa=(900, 10))
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    answer(policy, client("192.0.2.2"))
    clock.advance(9)
    answer(policy, client("192.0.2.2"))
    assert len(resolver.queries) == 1
    clock.advance(1)
    answer(policy, client("192.0.2.2"))
    assert len(resolver.queries) == 2


def test_an_answer_that_lists_nobody_is_cached_for_its_ttl():
    clock = task.Clock()
    resolver = FakeResolver({"2.2.0.192.bl.test": [("127.255.255.254", 600)]})
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    answer(policy, client("192.0.2.2"))
    clock.advance(599)
    answer(policy, client("192.0.2.2"))
    assert len(resolver.queries) == 1


def test_no_such_name_without_the_message_is_cached_for_the_fixed_time():
    class Bare(FakeResolver):
        def lookupAddress(self, name, timeout=None):
            self.queries.append(name)
            return defer.fail(error.DNSNameError())

    clock = task.Clock()
    resolver = Bare()
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    assert answer(policy, client("192.0.2.2")) is None
    clock.advance(NEGATIVE_TTL - 1)
    answer(policy, client("192.0.2.2"))
    assert len(resolver.queries) == 1


def test_a_failing_zone_lists_nobody_and_is_logged_once(logged):
    resolver = FakeResolver(LISTED, servfail={"2.2.0.192.bad.test", "3.2.0.192.bad.test"})
    policy = make({"zones": ["bad.test", "bl.test"]}, resolver)
    assert answer(policy, client("192.0.2.3")) is None
    assert answer(policy, client("192.0.2.2")).text.endswith("blocked using bl.test")
    assert answer(policy, client("192.0.2.3")) is None
    failures = [line for line in logged if "dnsbl: lookups in bad.test fail" in line]
    assert failures == [
        "dnsbl: lookups in bad.test fail (DNSServerError); its listings are ignored"
        " until it answers again"
    ]
    # Failures are not cached: the zone is asked again.
    assert resolver.queries.count("3.2.0.192.bad.test") == 2
    resolver.servfail.clear()
    answer(policy, client("192.0.2.3"))
    assert "dnsbl: bad.test answers again" in logged


def test_a_zone_that_never_answers_times_out_as_not_listed(logged):
    clock = task.Clock()
    resolver = FakeResolver(hang={"2.2.0.192.bl.test"})
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    d = policy.rcpt_to(client("192.0.2.2"), TRANSACTION, "rcpt@example.test", {})
    fired = []
    d.addBoth(fired.append)
    clock.advance(LOOKUP_TIMEOUT - 0.1)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]
    assert any("dnsbl: lookups in bl.test fail (no answer)" in line for line in logged)


def test_the_cache_is_bounded():
    clock = task.Clock()
    resolver = FakeResolver()
    policy = make({"zones": ["bl.test"]}, resolver, clock)
    for n in range(MAX_CACHED + 5):
        answer(policy, client(str(ipaddress.IPv4Address(0x0A000000 + n + 2**24))))
    cache = policy.blocklists._cache
    assert len(cache) == MAX_CACHED
    # The oldest were dropped: the first client is asked about again.
    answer(policy, client("11.0.0.0"))
    assert resolver.queries.count("0.0.0.11.bl.test") == 2


@pytest.mark.parametrize(
    "options, problem",
    [
        ({}, "zones: expected a non-empty list of DNS zone names"),
        ({"zones": []}, "zones: expected a non-empty list"),
        ({"zones": "bl.test"}, "zones: expected a non-empty list"),
        ({"zones": ["bad zone"]}, "zones: expected a non-empty list of DNS zone names, not"),
        ({"zones": ["bl.test"], "stage": "data"}, "stage: must be one of connect, rcpt"),
        ({"zones": ["bl.test"], "answers": ["127.0.0.300"]}, "answers: expected a list of IPv4"),
        ({"zones": ["bl.test"], "answers": [2]}, "answers: expected a list of IPv4"),
        ({"zones": ["bl.test"], "zone": "x"}, "zone: unknown option (known: zones, stage,"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, problem):
    with pytest.raises(ValueError) as caught:
        make(options, FakeResolver())
    assert str(caught.value).startswith(problem)
