"""Metrics and health over HTTP, against the real daemon: real traffic moves
the exact samples it should."""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.daemon import fresh_client_address, insecure_context, make_daemon, send
from twisted_mta.auth.passwords import hash_password

EXTRA = """
[auth]
failure_delay = "0.05s"

[metrics]
listen = ["tcp:0:interface=127.0.0.1"]
"""
MESSAGE = b"From: s@example.org\r\nSubject: counted\r\n\r\nbody\r\n"
Key = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture(scope="module")
def mta(tmp_path_factory):
    daemon = make_daemon(
        tmp_path_factory.mktemp("metrics"),
        users=f"dave@example.test:{hash_password('plain', 'dave-pw')}\n",
        extra=EXTRA,
    )
    daemon.start()
    yield daemon
    daemon.stop()


def get(mta, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{mta.ports['metrics']}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def scrape(mta) -> dict[Key, float]:
    _, text = get(mta, "/metrics")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def changes(mta, before: dict[Key, float], expected: dict[Key, float]) -> dict[Key, float]:
    """How the samples of ``expected`` moved since ``before``, once they
    have (a closed session is counted when the server sees it close)."""
    deadline = time.monotonic() + 10
    while True:
        now = scrape(mta)
        moved = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in expected}
        if moved == expected or time.monotonic() > deadline:
            return moved
        time.sleep(0.05)


def test_healthz_is_ok_while_the_server_runs(mta) -> None:
    assert get(mta, "/healthz") == (200, "ok\n")


def test_real_traffic_moves_the_counts(mta) -> None:
    before = scrape(mta)
    send(mta, "s@example.org", ["dave@example.test"], MESSAGE)
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("s@example.org")
        assert client.rcpt("nobody@example.test")[0] == 550
    with mta.smtp("submission", source_address=(fresh_client_address(), 0)) as client:
        client.ehlo("client.example.org")
        client.starttls(context=insecure_context())
        client.ehlo("client.example.org")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("dave@example.test", "wrong")
    with socket.create_connection(("127.0.0.1", mta.ports["submissions"])) as raw:
        raw.sendall(b"EHLO not.a.tls.client\r\n")
        raw.recv(100)
    expected = {
        key("twisted_mta_connections_total", listener="smtp"): 2,
        key("twisted_mta_connections_total", listener="submission"): 1,
        key("twisted_mta_connections_total", listener="submissions"): 1,
        key("twisted_mta_connections_open", listener="smtp"): 0,
        key("twisted_mta_messages_accepted_total", listener="smtp"): 1,
        key("twisted_mta_messages_rejected_total", stage="RCPT", code="550"): 1,
        key("twisted_mta_deliveries_total", result="sent", kind="local"): 1,
        key("twisted_mta_auth_failures_total", mechanism="PLAIN"): 1,
        key("twisted_mta_tls_handshakes_total", listener="submission"): 1,
        key("twisted_mta_tls_handshake_failures_total", listener="submission"): 0,
        key("twisted_mta_tls_handshake_failures_total", listener="submissions"): 1,
        key("twisted_mta_queue_messages"): 0,
    }
    assert changes(mta, before, expected) == expected
    assert len(mta.messages("example.test", "dave")) == 1


def test_requests_do_not_reach_the_log(mta) -> None:
    lines = len(mta.log)
    for _ in range(3):
        get(mta, "/metrics")
        get(mta, "/healthz")
    send(mta, "s@example.org", ["dave@example.test"], MESSAGE)
    mta.wait_for_log(r"status=sent")
    assert not [line for line in mta.log[lines:] if "/metrics" in line or "/healthz" in line]


def test_a_message_waiting_for_relay_shows_in_the_queue(mta) -> None:
    """Queued for relay is no delivery yet: the attempt waits for DNS."""
    before = scrape(mta)
    send(mta, "s@example.org", ["far@example.net"], MESSAGE)
    expected = {
        key("twisted_mta_queue_messages"): 1,
        key("twisted_mta_deliveries_total", result="deferred", kind="relay"): 0,
    }
    assert changes(mta, before, expected) == expected
    time.sleep(0.2)
    assert scrape(mta)[key("twisted_mta_queue_oldest_seconds")] >= 0.2
