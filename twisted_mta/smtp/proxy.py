"""PROXY protocol (HAProxy v1 and v2) in front of a listener's factory.

Our own wrapper, because Twisted's (``haproxy:`` endpoints,
``HAProxyProtocolWrapper``) connects the wrapped protocol as soon as the
TCP connection opens: the server greets before the header has arrived and
reads ``getPeer()`` while it is still the proxy's address, so relay
networks, connection limits and logs see the proxy, not the client; and it
takes a header from any source, so anyone may claim any address.  Here:

* a connection from outside the trusted networks is closed at once, before
  any protocol is built;
* the wrapped protocol is connected only once a whole, valid header has
  been read, so its greeting follows the header and ``getPeer()`` is the
  client's address from the first call on; bytes that came with the header
  are passed on after that;
* a connection that sends something else, or no complete header within
  ``HEADER_TIMEOUT`` seconds, is closed without a word.

From Twisted we reuse ``ProtocolWrapper`` and ``WrappingFactory`` (relaying
to the transport, and copying its interfaces onto the wrapper so that
STARTTLS still finds ``ITLSTransport``) and the header parsers
``V1Parser`` and ``V2Parser`` with their ``ProxyInfo`` results.
``twisted.protocols.haproxy`` exports only ``proxyEndpoint``, so the
parsers, ``ProxyInfo`` and ``InvalidProxyHeader`` come from its private
modules (``_v1parser``, ``_v2parser``, ``_info``, ``_exceptions``);
``tests/test_proxy.py`` pins what we rely on.  The addresses the parsers
return are checked again here (Twisted's v1 parser takes any text as an
address), and the short v1 ``PROXY UNKNOWN`` line, which Twisted's
parser refuses, is taken.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet import address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TCPAddress = address.IPv4Address | address.IPv6Address

HEADER_TIMEOUT = 10.0
_V1_SIGNATURE = V1Parser.PROXYSTR + b" "
# Signature, version and command, family and transport, length.
_V2_FIXED_PART = len(V2Parser.PREFIX) + 4
_V2_VERSION = 0x20

_log = Logger()



def is_trusted(peer: IAddress, networks: Sequence[Network]) -> bool:
    """Whether *peer* is an IP address in *networks* (v4-mapped as IPv4)."""
    ip = _ip_address(getattr(peer, "host", ""))
    return ip is not None and any(ip in network for network in networks)


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def _unmapped(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _host(peer: IAddress) -> str:
    return getattr(peer, "host", None) or str(peer)


class _V1Parser(V1Parser):
    """Twisted's, but taking the short ``PROXY UNKNOWN`` line too.

    The specification allows ``UNKNOWN`` with or without addresses after
    it; Twisted's parser refuses it without.
    """

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if line == _V1_SIGNATURE + cls.UNKNOWN_PROTO:
            return ProxyInfo(line, None, None)
        return super().parse(line)


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection: the PROXY header first, then the wrapped protocol."""

    factory: ProxyWrappingFactory

    def __init__(self, factory: ProxyWrappingFactory, wrappedProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._start = b""  # read before the header's version is known
        self._parser: _V1Parser | V2Parser | None = None
        self._deadline: IDelayedCall | None = None
        self._session_started = False
        self._source: TCPAddress | None = None
        self._destination: TCPAddress | None = None

    def makeConnection(self, transport) -> None:
        """Like ``ProtocolWrapper``'s, but the wrapped protocol must wait."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        clock = self.factory.clock
        self._deadline = clock.callLater(self.factory.timeout, self._header_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._session_started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        try:
            info, rest = self._feed(data)
            if info is None:
                return
            addresses = _client_addresses(info)
        except InvalidProxyHeader as error:
            self._refuse(str(error) or "bad PROXY header")
            return
        self._start_session(addresses, rest)

    def _feed(self, data: bytes) -> tuple[ProxyInfo | None, bytes]:
        """The header once complete (else None), and the bytes after it."""
        if self._parser is None:
            self._start += data
            self._parser = _parser_for(self._start)
            if self._parser is None:
                return None, b""
            data, self._start = self._start, b""
        try:
            info, rest = self._parser.feed(data)
        except ValueError:  # Twisted's v1 parser lets int() and decode() errors out
            raise InvalidProxyHeader() from None
        return info, rest or b""

    def _start_session(
        self, addresses: tuple[TCPAddress, TCPAddress] | None, rest: bytes
    ) -> None:
        self._cancel_deadline()
        if addresses is not None:
            self._source, self._destination = addresses
        self._session_started = True
        self.wrappedProtocol.makeConnection(self)
        # The wrapped protocol may have closed in connectionMade (too many
        # connections); a transport would not deliver anything after that.
        if rest and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def _refuse(self, reason: str) -> None:
        self._cancel_deadline()
        peer = _host(self.transport.getPeer())
        _log.info("proxy: connection from [{peer}] closed: {reason}", peer=peer, reason=reason)
        self.loseConnection()

    def _header_timed_out(self) -> None:
        self._deadline = None
        self._refuse(f"no complete PROXY header within {self.factory.timeout:g}s")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            deadline, self._deadline = self._deadline, None
            deadline.cancel()

    # -- the transport, as the wrapped protocol sees it ------------------

    def getPeer(self) -> IAddress:
        if self._source is None:
            return self.transport.getPeer()
        return self._source

    def getHost(self) -> IAddress:
        if self._destination is None:
            return self.transport.getHost()
        return self._destination

    def handshakeCompleted(self) -> None:
        # STARTTLS behind a proxy: the TLS layer wraps this wrapper, so the
        # session hears of its handshake through it.
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def abortConnection(self) -> None:
        # Marked like loseConnection, so that _start_session sees it.
        self.disconnecting = 1
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        if self._session_started:
            super().connectionLost(reason)
            return
        # The wrapped protocol never saw a connection, so it hears of no loss.
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol = None


class ProxyWrappingFactory(WrappingFactory):
    """Wraps a listener's factory: trusted proxies only, header first.

    Put it outermost, around a TLS wrapper too, since the proxy sends the
    header before any TLS.  *clock* times the header's deadline.
    """

    protocol = ProxyProtocolWrapper
    noisy = False

    def __init__(
        self,
        wrapped_factory: IProtocolFactory,
        trusted: Sequence[Network],
        clock: IReactorTime,
        timeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrapped_factory)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: IAddress) -> ProxyProtocolWrapper | None:
        if not is_trusted(addr, self.trusted):
            _log.info(
                "proxy: connection from untrusted [{client_ip}] refused",
                client_ip=_host(addr),
            )
            return None  # the port closes the socket, nothing is sent
        return super().buildProtocol(addr)


def _parser_for(start: bytes) -> _V1Parser | V2Parser | None:
    """The parser for a header beginning with *start*, as Twisted chooses.

    None while *start* is too short to tell; raises ``InvalidProxyHeader``
    as soon as it cannot begin a header (a client speaking SMTP first).
    Twisted's v2 parser needs the whole fixed part in its first feed.
    """
    if start.startswith(_V1_SIGNATURE):
        return _V1Parser()
    prefix = V2Parser.PREFIX
    if len(start) >= _V2_FIXED_PART and start.startswith(prefix):
        if start[len(prefix)] & 0xF0 != _V2_VERSION:
            raise InvalidProxyHeader("unknown PROXY protocol version")
        return V2Parser()
    if _V1_SIGNATURE.startswith(start) or prefix.startswith(start[: len(prefix)]):
        return None
    raise InvalidProxyHeader("no PROXY header")


def _client_addresses(info: ProxyInfo) -> tuple[TCPAddress, TCPAddress] | None:
    """The header's source and destination, checked.

    None when the header names none: v1 ``UNKNOWN`` and v2 ``LOCAL`` (the
    proxy's own connections, health checks) or family ``UNSPEC``.  The
    protocol then says to use the connection's own addresses.
    """
    if info.source is None:
        return None
    if not isinstance(info.source, TCPAddress) or info.source.type != "TCP":
        raise InvalidProxyHeader(f"PROXY header for {info.source}, not TCP")
    return _checked(info.source), _checked(info.destination)


def _checked(given: TCPAddress) -> TCPAddress:
    """*given* with its address normalised; IPv4-mapped IPv6 as IPv4."""
    family = 4 if isinstance(given, address.IPv4Address) else 6
    try:
        ip = ipaddress.ip_address(given.host)
    except ValueError:
        ip = None
    if ip is None or ip.version != family or not 0 <= given.port <= 0xFFFF:
        problem = f"bad address {given.host!r} port {given.port} in PROXY header"
        raise InvalidProxyHeader(problem)
    ip = _unmapped(ip)
    cls = address.IPv4Address if ip.version == 4 else address.IPv6Address
    return cls("TCP", str(ip), given.port)
