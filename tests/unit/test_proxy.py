"""The PROXY protocol wrapper in memory: header first, then the server.

Connections are ``StringTransport``s whose peer is the proxy; time is a
``task.Clock``.  Headers are built byte by byte here, v2 with ``struct``.
Most tests wrap a protocol that records what reaches it; the last ones wrap
our real ``MTAServer``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings
from twisted_mta.smtp.proxy import HEADER_TIMEOUT, ProxyWrappingFactory, is_trusted
from twisted_mta.smtp.server import MTAServer

PROXY = "127.0.0.1"
TRUSTED = (ipaddress.ip_network("127.0.0.0/30"), ipaddress.ip_network("2001:db8::/64"))
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PROXY, V2_LOCAL = 0x21, 0x20
V2_TCP4, V2_TCP6, V2_UDP4, V2_UNIX, V2_UNSPEC = 0x11, 0x21, 0x12, 0x31, 0x00
SETTINGS = ServerSettings(
    hostname="mx.example.test",
    listener="smtp",
    max_message_size=1 << 20,
    max_recipients=100,
    idle_timeout=300.0,
    max_errors=100,
)


def v1(source: str = "203.0.113.9", destination: str = "192.0.2.25", family: str = "TCP4",
       ports: tuple[object, object] = (40000, 25)) -> bytes:
    return f"PROXY {family} {source} {destination} {ports[0]} {ports[1]}\r\n".encode()


def v2(source: str = "203.0.113.9", destination: str = "192.0.2.25", *,
       command: int = V2_PROXY, family: int = V2_TCP4, tlvs: bytes = b"") -> bytes:
    """A v2 header; ``tlvs`` are extra bytes after the addresses."""
    if family in (V2_TCP4, V2_UDP4):
        addresses = socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(
            socket.AF_INET, destination) + struct.pack("!HH", 40000, 25)
    elif family == V2_TCP6:
        addresses = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(
            socket.AF_INET6, destination) + struct.pack("!HH", 40000, 25)
    elif family == V2_UNIX:
        addresses = source.encode().ljust(108, b"\0") + destination.encode().ljust(108, b"\0")
    else:
        addresses = b""
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


class Recorder(Protocol):
    """Records what reaches the wrapped protocol, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def connectionMade(self) -> None:
        self.events.append(("connected", self.transport.getPeer(), self.transport.getHost()))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason) -> None:
        self.events.append(("lost",))


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A TCP transport that can start TLS, as far as a server can tell."""

    tls_context = None

    def startTLS(self, contextFactory, normal=True) -> None:
        self.tls_context = contextFactory


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


def open_connection(factory: ProxyWrappingFactory, peer: str = PROXY, transport=None):
    """The wrapper for a new TCP connection from *peer*, and its transport."""
    cls = IPv6Address if ":" in peer else IPv4Address
    address = cls("TCP", peer, 51234)
    wrapper = factory.buildProtocol(address)
    transport = transport or StringTransport(peerAddress=address)
    transport.peerAddr = address
    wrapper.makeConnection(transport)
    return wrapper, transport


@pytest.fixture
def recorded(clock):
    """Open connections to a wrapped Recorder: (wrapper, transport, recorder)."""
    factory = ProxyWrappingFactory(Factory.forProtocol(Recorder), TRUSTED, clock)

    def connect(peer: str = PROXY):
        wrapper, transport = open_connection(factory, peer)
        return wrapper, transport, wrapper.wrappedProtocol

    return connect


def assert_closed_in_silence(transport: StringTransport, recorder: Recorder) -> None:
    assert transport.disconnecting
    assert transport.value() == b""
    assert recorder.events == []


# -- headers that start a session ----------------------------------------------


@pytest.mark.parametrize(
    ("header", "peer", "host"),
    [
        (v1(), IPv4Address("TCP", "203.0.113.9", 40000), IPv4Address("TCP", "192.0.2.25", 25)),
        (v1("2001:DB8:0::9", "2001:db8::25", "TCP6"),
         IPv6Address("TCP", "2001:db8::9", 40000), IPv6Address("TCP", "2001:db8::25", 25)),
        (v1("::ffff:203.0.113.9", "::ffff:192.0.2.25", "TCP6"),
         IPv4Address("TCP", "203.0.113.9", 40000), IPv4Address("TCP", "192.0.2.25", 25)),
        (v2(), IPv4Address("TCP", "203.0.113.9", 40000), IPv4Address("TCP", "192.0.2.25", 25)),
        (v2("2001:db8::9", "2001:db8::25", family=V2_TCP6),
         IPv6Address("TCP", "2001:db8::9", 40000), IPv6Address("TCP", "2001:db8::25", 25)),
        # HAProxy may add TLVs (ALPN, authority, unique id ...) after the addresses.
        (v2(tlvs=b"\x01\x00\x04smtp\x04\x00\x02xx"),
         IPv4Address("TCP", "203.0.113.9", 40000), IPv4Address("TCP", "192.0.2.25", 25)),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v1-tcp6-mapped", "v2-tcp4", "v2-tcp6", "v2-tlvs"],
)
def test_the_header_gives_the_peer_and_host(recorded, header, peer, host):
    wrapper, transport, recorder = recorded()
    wrapper.dataReceived(header)
    assert recorder.events == [("connected", peer, host)]
    assert wrapper.getPeer() == peer
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        v2(command=V2_LOCAL, family=V2_UNSPEC),
        v2(command=V2_LOCAL),  # addresses, which LOCAL says to ignore
        v2(family=V2_UNSPEC),
    ],
    ids=["v1-unknown", "v1-unknown-addresses", "v2-local", "v2-local-addresses", "v2-unspec"],
)
def test_a_header_without_a_client_leaves_the_proxy_as_peer(recorded, header):
    """Health checks and the like: the proxy's own connection."""
    wrapper, transport, recorder = recorded()
    wrapper.dataReceived(header)
    [(event, peer, host)] = recorder.events
    assert event == "connected"
    assert peer == transport.getPeer() == IPv4Address("TCP", PROXY, 51234)
    assert host == transport.getHost()


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_a_header_split_into_single_bytes(recorded, header):
    wrapper, transport, recorder = recorded()
    for index in range(len(header) - 1):
        wrapper.dataReceived(header[index : index + 1])
    assert recorder.events == []
    assert not transport.disconnecting
    wrapper.dataReceived(header[-1:] + b"EHLO")
    assert [event[0] for event in recorder.events] == ["connected", "data"]
    assert recorder.events[1] == ("data", b"EHLO")


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_bytes_behind_the_header_follow_the_connection(recorded, header):
    wrapper, _, recorder = recorded()
    wrapper.dataReceived(header + b"EHLO client.example.org\r\nQUIT\r\n")
    wrapper.dataReceived(b"NOOP\r\n")
    assert [event[0] for event in recorder.events] == ["connected", "data", "data"]
    assert recorder.events[0][1] == IPv4Address("TCP", "203.0.113.9", 40000)
    assert recorder.events[1:] == [
        ("data", b"EHLO client.example.org\r\nQUIT\r\n"),
        ("data", b"NOOP\r\n"),
    ]


class Closer(Recorder):
    """Closes at once, as the server does past its connection limits."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.loseConnection()


def test_bytes_behind_the_header_are_dropped_once_the_protocol_has_closed(clock):
    factory = ProxyWrappingFactory(Factory.forProtocol(Closer), TRUSTED, clock)
    wrapper, transport = open_connection(factory)
    wrapper.dataReceived(v1() + b"QUIT\r\n")
    assert [event[0] for event in wrapper.wrappedProtocol.events] == ["connected"]
    assert transport.disconnecting


# -- what is closed without a word ----------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example.org\r\n",
        b"\r\n",
        b"GET / HTTP/1.0\r\n",
        b"PROXYTCP4",
        b"PROXY TCP5 203.0.113.9 192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 203.0.113.9 192.0.2.25 40000\r\n",
        v1("203.0.113.999"),
        v1("2001:db8::9", family="TCP4"),
        v1("203.0.113.9", "192.0.2.25", "TCP6"),
        v1(ports=("port", 25)),
        v1(ports=(70000, 25)),
        b"PROXY TCP4 \xff 192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # the v1 line is at most 107 bytes
        V2_SIGNATURE + b"\x11\x11\x00\x0c",  # version 1 in v2's form
        V2_SIGNATURE + b"\x22\x11\x00\x00",  # command 2
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # addresses cut short
        V2_SIGNATURE[:8] + b"EHLO x\r\n",
        v2(family=V2_UDP4),
        v2("/run/client.sock", "/run/mta.sock", family=V2_UNIX),
    ],
)
def test_anything_but_a_header_closes_without_a_banner(recorded, logged, data):
    wrapper, transport, recorder = recorded()
    wrapper.dataReceived(data)
    wrapper.dataReceived(v1())  # too late: nothing more is read
    assert_closed_in_silence(transport, recorder)
    [line] = [line for line in logged if line.startswith("proxy:")]
    assert line.startswith(f"proxy: connection from [{PROXY}] closed: ")


def test_plain_smtp_is_refused_at_its_first_byte(recorded, logged):
    wrapper, transport, recorder = recorded()
    wrapper.dataReceived(b"E")
    assert_closed_in_silence(transport, recorder)
    assert f"proxy: connection from [{PROXY}] closed: no PROXY header" in logged


@pytest.mark.parametrize("peer", ["127.0.0.4", "192.0.2.1", "2001:db8:1::1", "::ffff:10.0.0.1"])
def test_an_untrusted_peer_is_refused_before_any_protocol(clock, logged, peer):
    built = []
    wrapped = Factory.forProtocol(Recorder)
    wrapped.buildProtocol = built.append
    factory = ProxyWrappingFactory(wrapped, TRUSTED, clock)
    address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 51234)
    assert factory.buildProtocol(address) is None
    assert built == []
    assert logged == [f"proxy: connection from untrusted [{peer}] refused"]


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        (IPv4Address("TCP", "127.0.0.3", 1), True),
        (IPv6Address("TCP", "::ffff:127.0.0.2", 1), True),
        (IPv6Address("TCP", "2001:db8::5", 1), True),
        (IPv4Address("TCP", "127.0.0.4", 1), False),
        (IPv6Address("TCP", "::1", 1), False),
        (UNIXAddress(b"/run/mta.sock"), False),
    ],
)
def test_is_trusted(peer, trusted):
    assert is_trusted(peer, TRUSTED) is trusted


def test_a_header_must_be_complete_within_the_timeout(recorded, clock, logged):
    wrapper, transport, recorder = recorded()
    wrapper.dataReceived(v1()[:20])
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert_closed_in_silence(transport, recorder)
    assert logged == [
        f"proxy: connection from [{PROXY}] closed: no complete PROXY header within 10s"
    ]


def test_the_timeout_ends_with_the_header(recorded, clock):
    wrapper, transport, recorder = recorded()
    wrapper.dataReceived(v2())
    assert clock.getDelayedCalls() == []
    clock.advance(HEADER_TIMEOUT * 2)
    assert not transport.disconnecting


def test_a_connection_lost_before_its_header_is_not_reported(recorded, clock):
    """The wrapped protocol never saw a connection: no connectionLost either."""
    wrapper, _, recorder = recorded()
    wrapper.dataReceived(v1()[:10])
    wrapper.connectionLost(None)
    assert recorder.events == []
    assert clock.getDelayedCalls() == []
    assert wrapper.factory.protocols == {}


def test_a_connection_lost_after_its_header_is_reported(recorded):
    wrapper, _, recorder = recorded()
    wrapper.dataReceived(v1())
    wrapper.connectionLost(None)
    assert [event[0] for event in recorder.events] == ["connected", "lost"]
    assert wrapper.factory.protocols == {}


# -- our SMTP server behind the wrapper -----------------------------------------


class ServerFactory(Factory):
    """MTAServers sharing limits, timed by the test's clock."""

    def __init__(self, clock: task.Clock, limits: ConnectionLimits, context=None) -> None:
        self.clock = clock
        self.limits = limits
        self.context = context

    def buildProtocol(self, addr) -> MTAServer:
        server = MTAServer(SETTINGS, self.limits, {}, self.context, clock=self.clock)
        server.callLater = self.clock.callLater
        return server


@pytest.fixture
def limits() -> ConnectionLimits:
    return ConnectionLimits(max_total=10, max_per_ip=1)


@pytest.fixture
def smtp(clock, limits):
    """Open connections to MTAServers (STARTTLS offered) behind the wrapper."""
    factory = ProxyWrappingFactory(ServerFactory(clock, limits, object()), TRUSTED, clock)

    def connect(header: bytes = v1()):
        wrapper, transport = open_connection(factory, transport=TLSStringTransport())
        wrapper.dataReceived(header)
        return wrapper.wrappedProtocol, transport

    return connect


def test_the_banner_follows_the_header(clock, limits):
    factory = ProxyWrappingFactory(ServerFactory(clock, limits), TRUSTED, clock)
    wrapper, transport = open_connection(factory)
    wrapper.dataReceived(v1()[:-1])
    assert transport.value() == b""
    assert wrapper.wrappedProtocol.session is None
    wrapper.dataReceived(b"\n")
    assert transport.value() == b"220 mx.example.test ESMTP\r\n"
    assert wrapper.wrappedProtocol.session.client_ip == "203.0.113.9"


def test_commands_in_the_header_packet_are_answered_for_the_header_address(smtp):
    server, transport = smtp(v2() + b"EHLO client.example.org\r\nNOOP\r\n")
    lines = transport.value().split(b"\r\n")
    assert lines[0] == b"220 mx.example.test ESMTP"
    assert lines[1] == b"250-mx.example.test Hello [203.0.113.9]"
    assert lines[-2] == b"250 2.0.0 Ok"
    assert server.session.client_ip == "203.0.113.9"


def test_connection_limits_count_the_header_address(smtp, limits):
    smtp(v1("203.0.113.9"))
    _, refused = smtp(v1("203.0.113.9"))
    _, other = smtp(v1("203.0.113.10"))
    assert refused.value() == b"421 4.7.0 mx.example.test Too many connections, try later\r\n"
    assert refused.disconnecting
    assert other.value() == b"220 mx.example.test ESMTP\r\n"
    assert limits.per_ip == {"203.0.113.9": 1, "203.0.113.10": 1}


def test_starttls_producer_and_closing_reach_the_real_transport(smtp):
    server, transport = smtp(v1() + b"EHLO client.example.org\r\n")
    assert ITLSTransport.providedBy(server.transport)
    assert transport.value().endswith(b"250 STARTTLS\r\n")
    assert transport.producer is server and transport.streaming
    server.dataReceived(b"STARTTLS\r\n")
    assert transport.tls_context is server.ctx
    assert transport.value().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    server.dataReceived(b"QUIT\r\n")
    assert transport.disconnecting
    server.transport.abortConnection()
    assert transport.disconnected
