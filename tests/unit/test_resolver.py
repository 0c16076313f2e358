"""One resolver per set of name servers in a process."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from twisted_mta.relay.resolver import make_resolver

SERVERS = [("192.0.2.53", 5353)]


def test_the_relay_and_the_policies_share_one_resolver_for_the_same_servers():
    first = make_resolver(SERVERS)
    assert make_resolver(list(SERVERS)) is first
    assert make_resolver([("192.0.2.54", 53)]) is not first


def test_a_resolver_on_a_reactor_of_its_own_is_made_anew():
    reactor = MemoryReactorClock()
    assert make_resolver(SERVERS, reactor) is not make_resolver(SERVERS, reactor)
    assert make_resolver(SERVERS, reactor) is not make_resolver(SERVERS)
