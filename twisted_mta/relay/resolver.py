"""The DNS resolver of the relay and the policies: twisted.names, quietly,
and one in each process for the same servers.

``twisted.names`` asks each question from a new UDP port (a random source
port, against spoofed answers), and Twisted's UDP port logs two lines for
each: ``DNSDatagramProtocol starting on N`` and ``(UDP Port N Closed)``,
with two more from the protocol; about ten lines per relayed domain.  The
resolver here is given a reactor whose ``listenUDP`` makes ports that say
nothing, so the log holds what happened to the mail, not the sockets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from twisted.internet import udp
from twisted.internet.interfaces import IResolver
from twisted.names import cache, client, dns, hosts, resolve

# One resolver per set of servers and reactor in a process, so that the
# relay and the policies share it, and its cache.
_shared: dict[tuple[Any, tuple[tuple[str, int], ...]], IResolver] = {}


def make_resolver(servers: Sequence[tuple[str, int]], reactor: Any = None) -> IResolver:
    """A twisted.names resolver for ``[(ip, port), ...]``, or the system's.

    With servers given, /etc/resolv.conf is not read at all: those servers
    and /etc/hosts are the only sources.  The resolver for the same servers
    and reactor is the one made before, if any.
    """
    if reactor is None:
        from twisted.internet import reactor
    key = (reactor, tuple(servers))
    if key not in _shared:
        _shared[key] = _build(key[1], reactor)
    return _shared[key]


def _build(servers: Sequence[tuple[str, int]], reactor: Any) -> IResolver:
    # As client.createResolver builds it, with our reactor for the queries.
    resolv_conf = os.devnull if servers else "/etc/resolv.conf"
    asking = client.Resolver(resolv_conf, list(servers) or None, reactor=QuietReactor(reactor))
    return resolve.ResolverChain([hosts.Resolver(b"/etc/hosts"), cache.CacheResolver(), asking])


class QuietReactor:
    """The reactor, but the UDP ports it makes for DNS questions are quiet."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> udp.Port:
        if isinstance(protocol, dns.DNSDatagramProtocol):
            protocol.noisy = False
        quiet = QuietPort(port, protocol, interface, maxPacketSize, self._reactor)
        quiet.startListening()
        return quiet


class QuietPort(udp.Port):
    """A UDP port that does not log its opening and closing."""

    def _bindSocket(self) -> None:
        with _unlogged():
            super()._bindSocket()

    def connectionLost(self, reason: Any = None) -> None:
        with _unlogged():
            super().connectionLost(reason)


class _Silent:
    @staticmethod
    def msg(*message: Any, **fields: Any) -> None:
        """Nothing: the two lines a port writes about itself."""


@contextlib.contextmanager
def _unlogged() -> Iterator[None]:
    # udp.Port logs through its module's ``log`` unconditionally; this runs
    # on the reactor thread, the only one that runs udp.Port's code.
    logged = udp.log
    udp.log = _Silent
    try:
        yield
    finally:
        udp.log = logged
