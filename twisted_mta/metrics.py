"""Metrics and health over HTTP: Prometheus text at ``/metrics``, and
``/healthz`` for a load balancer or a supervisor.

How the counts are taken:

* What the mail log tells (messages accepted and refused, deliveries, AUTH
  failures) is counted by a ``twisted.logger`` observer of its events,
  named by their ``mail_event`` field (see :mod:`twisted_mta.maillog`).
  The log line is already the one place where each of these is told, with
  the fields a count needs, so the SMTP, intake and queue code knows
  nothing of metrics, and with ``[metrics]`` off no observer runs at all.
* What has no log line (connections, TLS handshakes) the sessions tally
  themselves, one counter increment each, metrics on or off
  (:class:`twisted_mta.smtp.limits.Sessions`), read at scrape time: a log
  line per connection only to count it would double the log.
* What is a state, not an event (connections open, the queue), is read at
  scrape time: nothing is done for it on the path of a message.

Every metric lives on a registry of its own, not prometheus_client's
global one, so that two servers in one process (the tests) do not meet.
Labels are bounded: listener kinds, refusal stages, reply codes, delivery
results, AUTH mechanisms; never a client address or a mail address.

``/healthz`` answers ``200 ok`` while every SMTP listener is listening and
the queue folder is writable with room left, else ``503`` and the reason,
in one line.  The check is two system calls (``access`` and ``statvfs``),
cheap enough for every request: no file is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from twisted.application import service
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

PREFIX = "twisted_mta"
# The queue's size, and when its oldest message arrived (None: it is empty).
QueueState = Callable[[], tuple[int, float | None]]


class SessionTallies(Protocol):
    """What the sessions count, by listener kind."""

    connections: Mapping[str, int]
    tls_handshakes: Mapping[str, int]
    tls_failures: Mapping[str, int]

    def open_by_listener(self) -> Mapping[str, int]:
        """The sessions open now."""


class Metrics:
    """The metric families of one server, on a registry of their own."""

    def __init__(
        self,
        sessions: SessionTallies,
        listeners: Sequence[str],
        queue: QueueState,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry()
        self._accepted = Counter(
            f"{PREFIX}_messages_accepted",
            "Messages accepted, by listener kind.",
            ["listener"],
            registry=self.registry,
        )
        self._rejected = Counter(
            f"{PREFIX}_messages_rejected",
            "Connections, commands and messages refused, by stage and reply code.",
            ["stage", "code"],
            registry=self.registry,
        )
        self._deliveries = Counter(
            f"{PREFIX}_deliveries",
            "Delivery outcomes per recipient: sent, deferred or bounced; local or relay.",
            ["result", "kind"],
            registry=self.registry,
        )
        self._auth_failures = Counter(
            f"{PREFIX}_auth_failures",
            "AUTH attempts with a wrong password, by mechanism.",
            ["mechanism"],
            registry=self.registry,
        )
        for listener in listeners:
            self._accepted.labels(listener)
        self.registry.register(_StateCollector(sessions, listeners, queue, clock))
        ProcessCollector(namespace=PREFIX, registry=self.registry)
        self._counts: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "accepted": self._count_accepted,
            "reject": self._count_reject,
            "delivery": self._count_delivery,
            "auth_failed": self._count_auth_failure,
        }

    def observe(self, event: Mapping[str, Any]) -> None:
        """A ``twisted.logger`` observer: counts the mail log's events."""
        count = self._counts.get(event.get("mail_event"))
        if count is not None:
            count(event)

    def exposition(self) -> bytes:
        """Every metric, in the Prometheus text format."""
        return generate_latest(self.registry)

    def _count_accepted(self, event: Mapping[str, Any]) -> None:
        self._accepted.labels(event["listener"]).inc()

    def _count_reject(self, event: Mapping[str, Any]) -> None:
        self._rejected.labels(event["stage"], str(event["code"])).inc()

    def _count_delivery(self, event: Mapping[str, Any]) -> None:
        kind = "local" if event["relay"] == "local" else "relay"
        self._deliveries.labels(event["status"], kind).inc()

    def _count_auth_failure(self, event: Mapping[str, Any]) -> None:
        self._auth_failures.labels(event["mechanism"]).inc()


class _StateCollector:
    """What is read when scraped: the sessions' tallies and the queue."""

    def __init__(
        self,
        sessions: SessionTallies,
        listeners: Sequence[str],
        queue: QueueState,
        clock: Callable[[], float],
    ) -> None:
        self._sessions = sessions
        self._listeners = tuple(listeners)
        self._queue = queue
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        sessions = self._sessions
        yield self._by_listener(
            GaugeMetricFamily,
            "connections_open",
            "SMTP connections open, by listener kind.",
            sessions.open_by_listener(),
        )
        yield self._by_listener(
            CounterMetricFamily,
            "connections",
            "SMTP connections made, by listener kind.",
            sessions.connections,
        )
        yield self._by_listener(
            CounterMetricFamily,
            "tls_handshakes",
            "TLS handshakes completed (implicit TLS or STARTTLS), by listener kind.",
            sessions.tls_handshakes,
        )
        yield self._by_listener(
            CounterMetricFamily,
            "tls_handshake_failures",
            "TLS sessions closed before their handshake completed, by listener kind.",
            sessions.tls_failures,
        )
        size, oldest = self._queue()
        yield GaugeMetricFamily(f"{PREFIX}_queue_messages", "Messages in the queue.", size)
        age = 0.0 if oldest is None else max(self._clock() - oldest, 0.0)
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_seconds",
            "Age of the oldest message in the queue; 0 when it is empty.",
            age,
        )

    def _by_listener(
        self, family: type, name: str, documentation: str, values: Mapping[str, int]
    ) -> Metric:
        """One sample per listener kind, those configured shown from 0."""
        metric = family(f"{PREFIX}_{name}", documentation, labels=["listener"])
        for listener in sorted({*self._listeners, *values}):
            metric.add_metric([listener], values.get(listener, 0))
        return metric


class Health:
    """Whether the server can take mail: its listeners, and its spool."""

    def __init__(self, listeners_down: Callable[[], Iterable[str]], spool: Path) -> None:
        self._listeners_down = listeners_down
        self._spool = spool

    def problem(self) -> str | None:
        """What is wrong, in one line; None when all is well."""
        down = list(self._listeners_down())
        if down:
            return f"not listening: {', '.join(down)}"
        if not os.access(self._spool, os.W_OK):
            return f"spool not writable: {self._spool}"
        if os.statvfs(self._spool).f_bavail == 0:
            return f"spool full: {self._spool}"
        return None


class MetricsObserver(service.Service):
    """Counts the mail log's events while the server runs."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.metrics.observe)

    def stopService(self) -> None:
        super().stopService()
        globalLogPublisher.removeObserver(self.metrics.observe)


def metrics_site(metrics: Metrics, health: Health) -> server.Site:
    """``/metrics`` and ``/healthz``; any other path is 404."""
    root = _NotFound()
    root.putChild(b"metrics", _MetricsPage(metrics))
    root.putChild(b"healthz", _HealthPage(health))
    return _QuietSite(root)


class _QuietSite(server.Site):
    # A scrape every 15 seconds would flood the mail log: no access log,
    # and no "Starting factory" lines.
    noisy = False

    def log(self, request: server.Request) -> None:
        pass


class _NotFound(resource.Resource):
    """404, for itself and every path below it."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return self

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class _Page(resource.Resource):
    """A page with nothing below it."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return _NotFound()


class _MetricsPage(_Page):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.exposition()


class _HealthPage(_Page):
    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        problem = self._health.problem()
        if problem is None:
            return b"ok\n"
        request.setResponseCode(503)
        return problem.encode("utf-8", "replace") + b"\n"
