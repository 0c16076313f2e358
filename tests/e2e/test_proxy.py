"""PROXY protocol listeners against the real daemon, and behind a real HAProxy.

The daemon's smtp and submissions listeners take PROXY headers from
127.0.0.1, which is also in the default ``[relay] networks``: so a header
naming 203.0.113.9 must make that address the client everywhere, or the
server is an open relay.  Headers are written by hand (v2 with
``struct``); the HAProxy tests run ``haproxy`` with ``send-proxy`` and
``send-proxy-v2`` and a client bound to 127.0.0.9.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import struct
import subprocess
import time

import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import Daemon, insecure_context, make_daemon
from tests.helpers.raw import EHLO, HOSTNAME, MAIL, Raw, delivered, new_marker

PROXIED = """
[proxy]
listeners = ["smtp", "submissions"]
trusted = ["127.0.0.1/32"]
"""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HAPROXY = shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def v1(source: str, destination: str = "192.0.2.25") -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} 40000 25\r\n".encode()


def v2(source: str, destination: str = "192.0.2.25") -> bytes:
    """A v2 PROXY command over TCP (IPv4 or IPv6, as *source* is)."""
    family, code = (socket.AF_INET6, 0x21) if ":" in source else (socket.AF_INET, 0x11)
    addresses = socket.inet_pton(family, source) + socket.inet_pton(family, destination)
    body = addresses + struct.pack("!HH", 40000, 25)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, code, len(body)) + body


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """A daemon whose smtp and submissions listeners are behind a proxy."""
    root = tmp_path_factory.mktemp("proxied")
    daemon = make_daemon(root, users=USERS, aliases=ALIASES, extra=PROXIED)
    daemon.start()
    yield daemon
    daemon.stop()


def proxied_session(
    daemon: Daemon, header: bytes, listener: str = "smtp", proxy: str | None = None
) -> Raw:
    """A connection (from *proxy*) that sent *header* and read the greeting."""
    raw = Raw(daemon.ports[listener], proxy)
    raw.send(header)
    if listener == "submissions":
        raw.starttls()
    greeting = raw.reply()
    assert (greeting.code, greeting.text) == (220, HOSTNAME + b" ESMTP")
    return raw


def closed_in_silence(raw: Raw) -> bool:
    """Whether the server closes without sending a byte."""
    received = b""
    try:
        while data := raw.sock.recv(4096):
            received += data
    except ConnectionResetError:  # closed with our bytes unread
        pass
    return received == b""


def send_to_alice(raw: Raw, marker: bytes) -> None:
    raw.start_data()
    raw.expect(b"Subject: " + marker + b"\r\n\r\nproxied\r\n.", 250)
    raw.expect(b"QUIT", 221)


# -- the header's address is the client ----------------------------------------


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (v1("203.0.113.9"), "203.0.113.9"),
        (v2("198.51.100.7"), "198.51.100.7"),
        (v1("2001:db8::77", "2001:db8::25"), "2001:db8::77"),
        (v2("2001:db8::7", "2001:db8::25"), "2001:db8::7"),
    ],
    ids=["v1", "v2", "v1-ipv6", "v2-ipv6"],
)
def test_the_header_address_is_the_client(proxied, header, client):
    marker = new_marker()
    with proxied_session(proxied, header) as raw:
        reply = raw.expect(EHLO, 250)
        assert reply.lines[0] == HOSTNAME + f" Hello [{client}]".encode()
        send_to_alice(raw, marker)
    [stored] = delivered(proxied, marker)
    assert f"Received: from client.example.org ([{client}])".encode() in stored
    proxied.wait_for_log(rf"nrcpt=1 client=unknown\[{client}\] listener=smtp")


def test_a_header_address_outside_relay_networks_may_not_relay(proxied):
    """The proxy (127.0.0.1) may relay; the client it speaks for may not."""
    with proxied_session(proxied, v1("203.0.113.9")) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        raw.expect(b"RCPT TO:<friend@remote.example>", 554, b"5.7.1")
    with proxied_session(proxied, v2("127.0.0.5")) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        raw.expect(b"RCPT TO:<friend@remote.example>", 250)


def test_starttls_behind_the_proxy(proxied):
    marker = new_marker()
    with proxied_session(proxied, v2("203.0.113.9")) as raw:
        raw.expect(EHLO, 250)
        raw.expect(b"STARTTLS", 220, b"2.0.0")
        raw.starttls()
        send_to_alice(raw, marker)
    [stored] = delivered(proxied, marker)
    assert b"Received: from client.example.org ([203.0.113.9])" in stored
    assert b" with ESMTPS id " in stored


def test_submissions_reads_the_header_before_tls(proxied):
    with proxied_session(proxied, v1("203.0.113.9"), "submissions") as raw:
        reply = raw.expect(EHLO, 250)
        assert reply.lines[0] == HOSTNAME + b" Hello [203.0.113.9]"
        assert any(line.startswith(b"AUTH ") for line in reply.lines)


def test_a_listener_not_named_takes_no_header(proxied):
    with proxied.smtp("submission") as client:
        assert client.ehlo("client.example.org")[0] == 250


def test_the_proxy_health_check_is_the_proxy_itself(proxied):
    """v2 LOCAL: the connection is the proxy's own."""
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    with proxied_session(proxied, local) as raw:
        assert raw.expect(EHLO, 250).lines[0] == HOSTNAME + b" Hello [127.0.0.1]"


# -- what is closed without a banner -------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"EHLO client.example.org\r\n", b"PROXY TCP4 203.0.113.9 nowhere 1 25\r\n"],
    ids=["smtp", "bad-header"],
)
def test_no_header_is_closed_without_a_banner(proxied, data):
    with Raw(proxied.ports["smtp"]) as raw:
        raw.send(data)
        assert closed_in_silence(raw)
    proxied.wait_for_log(r"proxy: connection from \[127\.0\.0\.1\] closed: ")


def test_an_untrusted_proxy_is_closed_without_a_banner(start_mta):
    daemon = start_mta(extra=PROXIED.replace("127.0.0.1/32", "127.0.0.2/32"))
    with Raw(daemon.ports["smtp"]) as raw:
        raw.send(v1("203.0.113.9"))
        assert closed_in_silence(raw)
    daemon.wait_for_log(r"proxy: connection from untrusted \[127\.0\.0\.1\] refused")
    with proxied_session(daemon, v1("203.0.113.9"), proxy="127.0.0.2") as raw:
        assert raw.expect(EHLO, 250).lines[0] == HOSTNAME + b" Hello [203.0.113.9]"


def test_connections_per_ip_count_the_header_address(start_mta):
    daemon = start_mta(extra=PROXIED + "[limits]\nmax_connections_per_ip = 1\n")
    with proxied_session(daemon, v1("203.0.113.9")) as first:
        with Raw(daemon.ports["smtp"]) as second:
            second.send(v2("203.0.113.9"))
            reply = second.reply()
            assert (reply.code, reply.text) == (
                421, b"4.7.0 mx.example.test Too many connections, try later")
            assert second.at_eof()
        with proxied_session(daemon, v1("203.0.113.10")) as other:
            other.expect(b"NOOP", 250)
        first.expect(b"NOOP", 250)


# -- behind a real HAProxy -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(port: int, process: subprocess.Popen) -> None:
    """HAProxy says nothing when ready: try to connect, for a bounded while."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"haproxy is not listening on {port}")


@pytest.fixture
def haproxy(tmp_path):
    """Start ``haproxy`` in front of a port: ``haproxy(backend_port, option)``."""
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    processes = []

    def start(backend_port: int, send_proxy: str) -> int:
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(f"""
global
    maxconn 64

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp_in
    bind 127.0.0.1:{port}
    default_backend mta

backend mta
    server mta 127.0.0.1:{backend_port} {send_proxy}
""")
        with (tmp_path / "haproxy.log").open("w") as output:
            process = subprocess.Popen(
                [HAPROXY, "-f", str(config), "-db"], stdout=output, stderr=subprocess.STDOUT
            )
        processes.append(process)
        wait_until_listening(port, process)
        return port

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_the_client_is_the_client(start_mta, haproxy, send_proxy):
    daemon = start_mta(users=USERS, extra=PROXIED)
    port = haproxy(daemon.ports["smtp"], send_proxy)
    marker = new_marker()
    with smtplib.SMTP(
        "127.0.0.1", port, "client.example.org", timeout=30, source_address=("127.0.0.9", 0)
    ) as client:
        code, text = client.ehlo()
        assert code == 250 and text.startswith(b"mx.example.test Hello [127.0.0.9]")
        client.starttls(context=insecure_context())
        message = b"Subject: " + marker + b"\r\n\r\nthrough haproxy\r\n"
        assert client.sendmail("sender@example.org", ["alice@example.test"], message) == {}
    [stored] = delivered(daemon, marker)
    assert b"Received: from client.example.org ([127.0.0.9])" in stored
    daemon.wait_for_log(r"nrcpt=1 client=unknown\[127\.0\.0\.9\] listener=smtp")
    assert not any("client=unknown[127.0.0.1]" in line for line in daemon.log)
