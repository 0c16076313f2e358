"""Metrics and health, in memory: what moves each count, what /healthz says."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from tests.helpers.smtp_session import (
    EHLO,
    SETTINGS,
    Client,
    TLSStringTransport,
    open_session,
    our_server,
    recording_portal,
)
from twisted_mta import maillog
from twisted_mta.metrics import Health, Metrics, MetricsObserver, metrics_site
from twisted_mta.queue.store import QueueStore
from twisted_mta.service import _queue_state
from twisted_mta.smtp.limits import Sessions
from twisted_mta.storage.envelope import Envelope

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NOW = 1_000_000.0


def samples(metrics: Metrics) -> Samples:
    """Each sample of the exposition, by name and sorted labels."""
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def sessions() -> Sessions:
    return Sessions()


@pytest.fixture
def metrics(sessions: Sessions) -> Iterator[Metrics]:
    """Metrics of a server with smtp and submissions listeners, counting
    the mail log while the test runs."""
    metrics = Metrics(sessions, ["smtp", "submissions"], lambda: (3, NOW - 120), lambda: NOW)
    observer = MetricsObserver(metrics)
    observer.startService()
    yield metrics
    observer.stopService()


CLIENT = SimpleNamespace(client_ip="192.0.2.7", helo=b"client.example.org", esmtp=True)


def test_the_mail_log_events_move_their_counts(metrics: Metrics) -> None:
    maillog.accepted("Q1", "s@example.org", 100, 2, client_ip="192.0.2.7", listener="smtp")
    maillog.accepted("Q2", "s@example.org", 100, 1, client_ip="192.0.2.7", listener="smtp")
    maillog.reject(CLIENT, "RCPT", 550, "5.1.1", "User unknown", recipient="r@example.test")
    maillog.reject(CLIENT, "END-OF-MESSAGE", 552, "5.3.4", "Message too big")
    maillog.delivery("Q1", "a@example.test", "local", 0.1, "sent", "delivered to maildir")
    maillog.delivery("Q1", "b@example.net", "mx.example.net[192.0.2.9]:25", 1, "deferred", "x")
    maillog.delivery("Q1", "c@example.net", "none", 1, "bounced", "5.1.2 no such domain")
    maillog.auth_failed("192.0.2.7", "PLAIN", "alice")
    found = samples(metrics)
    assert value(found, "twisted_mta_messages_accepted_total", listener="smtp") == 2
    assert value(found, "twisted_mta_messages_accepted_total", listener="submissions") == 0
    assert ("twisted_mta_messages_accepted_total", (("listener", "submissions"),)) in found
    rejected = "twisted_mta_messages_rejected_total"
    assert value(found, rejected, stage="RCPT", code="550") == 1
    assert value(found, rejected, stage="END-OF-MESSAGE", code="552") == 1
    deliveries = "twisted_mta_deliveries_total"
    assert value(found, deliveries, result="sent", kind="local") == 1
    assert value(found, deliveries, result="deferred", kind="relay") == 1
    assert value(found, deliveries, result="bounced", kind="relay") == 1
    assert value(found, "twisted_mta_auth_failures_total", mechanism="PLAIN") == 1


def test_what_is_not_an_outcome_counts_nothing(metrics: Metrics) -> None:
    before = samples(metrics)
    maillog.queued_for_relay("Q1", "b@example.net", 0.01)
    maillog.auth_blocked("192.0.2.7", "PLAIN", "too many failed logins")
    maillog.no_notification("Q1")
    after = samples(metrics)
    assert counted(after) == counted(before)


def counted(found: dict) -> dict:
    """The counters of mail, not the process's CPU, which moves on its own."""
    return {
        key: v
        for key, v in found.items()
        if key[0].endswith("_total") and not key[0].startswith("twisted_mta_process_")
    }


def test_nothing_is_counted_once_the_observer_stops(sessions: Sessions) -> None:
    metrics = Metrics(sessions, ["smtp"], lambda: (0, None))
    observer = MetricsObserver(metrics)
    observer.startService()
    observer.stopService()
    maillog.accepted("Q1", "s@example.org", 100, 1, client_ip="192.0.2.7", listener="smtp")
    assert value(samples(metrics), "twisted_mta_messages_accepted_total", listener="smtp") == 0


def test_the_queue_is_read_when_scraped(metrics: Metrics) -> None:
    found = samples(metrics)
    assert value(found, "twisted_mta_queue_messages") == 3
    assert value(found, "twisted_mta_queue_oldest_seconds") == 120


def test_an_empty_queue_has_no_age(sessions: Sessions) -> None:
    found = samples(Metrics(sessions, ["smtp"], lambda: (0, None)))
    assert value(found, "twisted_mta_queue_messages") == 0
    assert value(found, "twisted_mta_queue_oldest_seconds") == 0


def queue(folder: Path, queue_id: str, arrival: float, envelope: bytes | None = None) -> None:
    sent = Envelope("s@example.org", ("r@example.net",), {"ip": "192.0.2.7"}, "7BIT", False)
    (folder / f"{queue_id}.msg").write_bytes(b"Subject: x\n\nbody\n")
    (folder / f"{queue_id}.env").write_bytes(envelope or sent.to_json(queue_id, 17, arrival))


def test_the_queue_state_is_its_size_and_its_oldest_readable_arrival(tmp_path) -> None:
    assert _queue_state(QueueStore(tmp_path)) == (0, None)
    queue(tmp_path, "0000000000001AAAA", 0.0, envelope=b"not json")
    queue(tmp_path, "0000000000002AAAA", NOW - 60)
    queue(tmp_path, "0000000000003AAAA", NOW)
    assert _queue_state(QueueStore(tmp_path)) == (3, NOW - 60)


def connect(sessions: Sessions, listener: str = "smtp", tls: bool = False) -> Client:
    server = our_server(recording_portal(None), tls)
    server.settings = replace(SETTINGS, listener=listener)
    server.sessions = sessions
    return open_session(server, None, TLSStringTransport() if tls else None)


def lose(client: Client) -> None:
    client.server.connectionLost(Failure(ConnectionDone()))


def test_connections_are_counted_by_listener_open_and_in_total(
    metrics: Metrics, sessions: Sessions
) -> None:
    first, second = connect(sessions), connect(sessions, "submissions")
    lose(first)
    connect(sessions)
    found = samples(metrics)
    assert value(found, "twisted_mta_connections_total", listener="smtp") == 2
    assert value(found, "twisted_mta_connections_total", listener="submissions") == 1
    assert value(found, "twisted_mta_connections_open", listener="smtp") == 1
    assert value(found, "twisted_mta_connections_open", listener="submissions") == 1
    lose(second)
    found = samples(metrics)
    assert value(found, "twisted_mta_connections_open", listener="submissions") == 0


def test_a_starttls_handshake_is_counted_done_or_failed(
    metrics: Metrics, sessions: Sessions
) -> None:
    done, failed, clear = (connect(sessions, tls=True) for _ in range(3))
    for client in (done, failed):
        client.command(EHLO)
        assert client.command(b"STARTTLS").code == 220
    done.server.handshakeCompleted()
    for client in (done, failed, clear):
        lose(client)
    found = samples(metrics)
    assert value(found, "twisted_mta_tls_handshakes_total", listener="smtp") == 1
    assert value(found, "twisted_mta_tls_handshake_failures_total", listener="smtp") == 1


def test_an_implicit_tls_session_that_never_completes_its_handshake_failed(
    metrics: Metrics, sessions: Sessions
) -> None:
    server = our_server(recording_portal(None), True)
    server.settings = replace(SETTINGS, listener="submissions", implicit_tls=True)
    server.sessions = sessions
    server.makeConnection(TLSStringTransport())
    server.connectionLost(Failure(ConnectionDone()))
    found = samples(metrics)
    assert value(found, "twisted_mta_tls_handshake_failures_total", listener="submissions") == 1
    assert value(found, "twisted_mta_tls_handshakes_total", listener="submissions") == 0


def test_no_client_address_is_a_label(metrics: Metrics, sessions: Sessions) -> None:
    connect(sessions).command(b"AUTH PLAIN AGFsaWNlAHdyb25n")
    maillog.reject(CLIENT, "RCPT", 550, "5.1.1", "User unknown", recipient="r@example.test")
    labels = {v for _, pairs in samples(metrics) for _, v in pairs}
    assert not {v for v in labels if "192.0.2" in v or "127.0.0" in v or "@" in v}


# -- /healthz ---------------------------------------------------------------


def test_healthy_while_every_listener_listens_and_the_spool_is_writable(tmp_path) -> None:
    assert Health(lambda: [], tmp_path).problem() is None


def test_a_listener_down_is_named(tmp_path) -> None:
    health = Health(lambda: ["smtp tcp:25"], tmp_path)
    assert health.problem() == "not listening: smtp tcp:25"


def test_a_spool_that_cannot_be_written_is_unhealthy(tmp_path) -> None:
    missing = tmp_path / "queue"
    assert Health(lambda: [], missing).problem() == f"spool not writable: {missing}"


def test_a_full_spool_is_unhealthy(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0))
    assert Health(lambda: [], tmp_path).problem() == f"spool full: {tmp_path}"


# -- HTTP -------------------------------------------------------------------


def get(site: Site, path: bytes) -> tuple[int, bytes, bytes]:
    """Render ``GET path``: its code, its content type, its body."""
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = b"GET"
    request.uri = request.path = path
    body = site.getResourceFor(request).render(request)
    content_type = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
    return request.responseCode or 200, content_type, body


def test_metrics_are_served_in_the_prometheus_text_format(metrics: Metrics, tmp_path) -> None:
    site = metrics_site(metrics, Health(lambda: [], tmp_path))
    code, content_type, body = get(site, b"/metrics")
    assert (code, content_type) == (200, CONTENT_TYPE_LATEST.encode())
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {
        "twisted_mta_connections_open",
        "twisted_mta_connections",
        "twisted_mta_messages_accepted",
        "twisted_mta_messages_rejected",
        "twisted_mta_deliveries",
        "twisted_mta_queue_messages",
        "twisted_mta_queue_oldest_seconds",
        "twisted_mta_auth_failures",
        "twisted_mta_tls_handshakes",
        "twisted_mta_tls_handshake_failures",
    } <= names
    assert all(name.startswith("twisted_mta_") for name in names)


def test_healthz_is_200_ok_or_503_with_the_reason(metrics: Metrics, tmp_path) -> None:
    down: list[str] = []
    site = metrics_site(metrics, Health(lambda: down, tmp_path))
    assert get(site, b"/healthz") == (200, b"text/plain; charset=utf-8", b"ok\n")
    down.append("submission tcp:587")
    code, _, body = get(site, b"/healthz")
    assert (code, body) == (503, b"not listening: submission tcp:587\n")


@pytest.mark.parametrize("path", [b"/", b"/metricsx", b"/healthz/../x", b"/a/b"])
def test_other_paths_are_404(metrics: Metrics, tmp_path, path: bytes) -> None:
    site = metrics_site(metrics, Health(lambda: [], tmp_path))
    assert get(site, path)[0] == 404


def test_requests_are_not_logged(metrics: Metrics, tmp_path: Path) -> None:
    site = metrics_site(metrics, Health(lambda: [], tmp_path))
    assert site.noisy is False
    logged: list[str] = []
    site._logFile = SimpleNamespace(write=logged.append)
    site.log(DummyRequest([b"metrics"]))
    assert logged == []
