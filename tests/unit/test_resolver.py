"""One resolver per set of name servers (and reactor) in a process."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from twisted_mta.relay.resolver import make_resolver

SERVERS = [("192.0.2.53", 5353)]


def test_the_relay_and_the_policies_share_one_resolver_for_the_same_servers():
    reactor = MemoryReactorClock()
    first = make_resolver(SERVERS, reactor)
    assert make_resolver(list(SERVERS), reactor) is first
    assert make_resolver([("192.0.2.54", 53)], reactor) is not first
    assert make_resolver(SERVERS, MemoryReactorClock()) is not first
