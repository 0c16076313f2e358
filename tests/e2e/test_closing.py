"""Every close the server decides closes the TCP connection within 2 s,
on TLS too, with a client that never answers close_notify."""

from __future__ import annotations

import base64

import pytest

from tests.helpers.silent_client import SilentTLSClient

CLOSED_WITHIN = 2.0
USERS = "alice@example.test:{PLAIN}alice-secret\n"


def plain_login(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A daemon with a 1 s idle timeout and two AUTH tries a connection."""
    from tests.helpers.daemon import make_daemon

    extra = "[limits]\nidle_timeout = 1\nmax_auth_failures = 2\n[auth]\nfailure_delay = 0\n"
    daemon = make_daemon(tmp_path_factory.mktemp("closing"), users=USERS, extra=extra)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("listener", ["submissions", "submission"])
def test_quit_closes_a_tls_session(quick, listener):
    with SilentTLSClient(quick.ports[listener], implicit=listener == "submissions") as client:
        client.command(b"EHLO client.example.org")
        assert client.command(b"QUIT").startswith(b"221 2.0.0")
        assert client.wait_for_close() < CLOSED_WITHIN


def test_idle_timeout_closes_a_silent_tls_session(quick):
    with SilentTLSClient(quick.ports["submissions"]) as client:
        client.command(b"EHLO client.example.org")
        assert client.read_reply().startswith(b"421 4.4.2")
        assert client.wait_for_close() < CLOSED_WITHIN


def test_last_auth_failure_closes_a_tls_session(quick):
    with SilentTLSClient(quick.ports["submissions"]) as client:
        client.command(b"EHLO client.example.org")
        assert client.command(plain_login("alice@example.test", "wrong")).startswith(b"535")
        client.send(plain_login("alice@example.test", "wrong") + b"\r\n")
        assert client.read_reply().startswith(b"535 5.7.8")
        assert client.read_reply().startswith(b"421 4.7.0")
        assert client.wait_for_close() < CLOSED_WITHIN


def test_silent_tls_clients_cannot_exhaust_max_connections(start_mta):
    extra = "[limits]\nidle_timeout = 1\nmax_connections = 3\n"
    daemon = start_mta(users=USERS, extra=extra)
    port = daemon.ports["submissions"]
    clients = [SilentTLSClient(port) for _ in range(3)]
    try:
        for client in clients:
            assert client.banner.startswith(b"220 ")
        for client in clients:
            assert client.read_reply().startswith(b"421 4.4.2")
            assert client.wait_for_close() < CLOSED_WITHIN
        with SilentTLSClient(port) as latecomer:
            assert latecomer.banner.startswith(b"220 mx.example.test ESMTP")
    finally:
        for client in clients:
            client.close()


def test_too_many_connections_closes_a_silent_tls_client(start_mta):
    daemon = start_mta(users=USERS, extra="[limits]\nmax_connections = 1\n")
    port = daemon.ports["submissions"]
    with SilentTLSClient(port) as first, SilentTLSClient(port) as second:
        assert first.banner.startswith(b"220 ")
        assert second.banner.startswith(b"421 4.7.0")
        assert second.wait_for_close() < CLOSED_WITHIN


def test_quit_closes_a_tls_session_behind_a_proxy_header(start_mta):
    extra = '[proxy]\nlisteners = ["smtp"]\ntrusted = ["127.0.0.1/32"]\n'
    daemon = start_mta(users=USERS, extra=extra)
    header = b"PROXY TCP4 203.0.113.9 127.0.0.1 5000 25\r\n"
    with SilentTLSClient(daemon.ports["smtp"], implicit=False, preamble=header) as client:
        assert b"[203.0.113.9]" in client.command(b"EHLO client.example.org")
        assert client.command(b"QUIT").startswith(b"221 2.0.0")
        assert client.wait_for_close() < CLOSED_WITHIN
