"""The running server: assembled from a Config, started, reloaded, drained.

twistd calls ``privilegedStartService`` as root: only the listeners bind
their ports then.  It drops privileges (``--uid``/``--gid``) and calls
``startService``: from here on files are touched, so the spool and all
made in it belong to the run user, and the config and every file it names
are checked as that user, with one line naming a file it cannot read.

With ``[limits] workers`` above 1 the listeners are served by worker
processes, spawned once the reactor runs (after the drop, so as the run
user), each given every listening socket (:mod:`twisted_mta.workers`);
this process then keeps the queue, the relay, the maildrop and the
metrics, and no longer accepts connections itself.

Once the reactor runs, SIGHUP re-reads the config (:meth:`MTAService.reload`),
in the workers too, and SIGTERM drains: the listeners close, transactions
in DATA may finish within ``[limits] shutdown_timeout``, every other
session is told ``421 4.3.2`` (the workers do the same, and end); then the
queue and the committer stop and twistd exits 0.
"""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Sequence
from functools import partial

from twisted.application import service
from twisted.internet import defer, reactor
from twisted.logger import Logger

from twisted_mta import systemd
from twisted_mta.auth.checker import cram_md5_warning
from twisted_mta.config import Config, parse_hostport
from twisted_mta.front import (
    LISTENERS,
    ListenerService,
    SMTPService,
    recheck_config,
    resolver_addresses,
    spool_sharing,
)
from twisted_mta.intake.maildrop import MaildropService
from twisted_mta.intake.policies import PluginError
from twisted_mta.metrics import Health, Metrics, MetricsObserver, metrics_site
from twisted_mta.queue.bounces import dsn_reporter
from twisted_mta.queue.flush import FlushListener
from twisted_mta.queue.outcomes import Policy
from twisted_mta.queue.scheduler import Scheduler
from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.queue.writer import QueueWriter
from twisted_mta.relay.outgoing import Timeouts
from twisted_mta.relay.resolver import make_resolver
from twisted_mta.relay.router import Router, RouterSettings, SmartHost
from twisted_mta.smtp.limits import ConnectionLimits
from twisted_mta.storage.envelope import UnknownMessage
from twisted_mta.storage.maildir import may_share
from twisted_mta.tls import Certificate
from twisted_mta.workers.supervisor import ListeningSocket, WorkerPool

# Config parts that bind or name where things are: a reload cannot change them.
_RESTART_ONLY = (
    "spool", "listen", "proxy.listeners", "delivery", "metrics.listen", "limits.workers"
)

_log = Logger()


class MTAService(SMTPService):
    """The whole server: listeners, sessions, queue, relay, committer; and
    the workers that serve the listeners instead, if there are any."""

    def __init__(
        self, config: Config, checkers: Sequence = (), auth: Sequence[str] = ()
    ) -> None:
        super().__init__(config, checkers)
        self.store = QueueStore(config.queue_dir)
        self.limits = ConnectionLimits(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        for kind in LISTENERS:
            for description in getattr(config.listen, kind):
                self.add_listener(kind, self.limits, partial(ListenerService, kind, description))
        self.queue = service.MultiService()
        self.queue.setServiceParent(self)
        self.maildrop = MaildropService(config.maildrop_dir, self.intake.system, reactor)
        self.maildrop.setServiceParent(self.queue)
        relay_settings = _router_settings(config)
        resolver = make_resolver(relay_settings.resolvers)
        self.router = Router(
            reactor,
            resolver,
            config.hostname,
            relay_settings,
            self.store,
            timeouts=relay_timeouts(config),
            per_destination=_queue_policy(config).per_destination,
        )
        self.router.policies = self.intake.system.policies
        self.router.setServiceParent(self.queue)
        self.scheduler = Scheduler(
            self.store,
            self.router.deliver,
            dsn_reporter(self.intake.system, self.store, config.queue.lifetime),
            self.router.destination,
            _queue_policy(config),
            reactor,
            QueueWriter(self.store, self.committer),
        )
        self.scheduler.policies = self.intake.system.policies
        self.scheduler.setServiceParent(self.queue)
        self.spool.on_queued = self.scheduler.enqueue
        FlushListener(config.queue_dir, self.scheduler, reactor).setServiceParent(self.queue)
        self.workers = self._workers(config, auth)
        self.monitoring = service.MultiService()
        self.monitoring.setServiceParent(self)
        self._serve_metrics(config)
        self._old_handlers: dict[int, object] = {}

    def _workers(self, config: Config, auth: Sequence[str]) -> WorkerPool | None:
        """The worker processes of ``[limits] workers``; None for one process.

        A worker's queue entries are tried at once, and the whole queue
        when one ends: it may have written a message it did not tell of.
        """
        if config.limits.workers == 1:
            return None
        arguments = [f"--auth={description}" for description in auth]
        if config.source is not None:
            arguments.append(f"--config={config.source}")
        return WorkerPool(
            config.limits.workers,
            arguments,
            self.limits,
            queued=self.scheduler.enqueue,
            lost=self.scheduler.rescan,
            clock=reactor,
        )

    def _serve_metrics(self, config: Config) -> None:
        """``[metrics] listen``: counts, and the health of the listeners and
        the spool, over HTTP; bound with the SMTP ports, before privileges
        are dropped.  With workers, their sessions are counted here from
        what they tell."""
        if not config.metrics.listen:
            return
        kinds = [kind for kind in LISTENERS if getattr(config.listen, kind)]
        sessions = self.sessions if self.workers is None else self.workers.tallies
        metrics = Metrics(sessions, kinds, lambda: _queue_state(self.store))
        MetricsObserver(metrics).setServiceParent(self.monitoring)
        site = metrics_site(metrics, Health(self._listeners_down, config.queue_dir))
        for description in config.metrics.listen:
            ListenerService("metrics", description, site).setServiceParent(self.monitoring)

    def _listeners_down(self) -> list[str]:
        return [f"{each.kind} {each.description}" for each in self.listeners if not each.listening]

    # -- start: after the privilege drop -------------------------------------

    def startService(self) -> None:
        config = recheck_config(self.config)
        _check_sharing(config)
        try:
            self.spool.prepare()
        except OSError as error:
            raise SystemExit(
                f"twistd mta: cannot prepare {error.filename or config.queue_dir}:"
                f" {error.strerror}"
            ) from None
        _warn_about_cram_md5(config)
        super().startService()
        if self.workers is not None:
            # Bound here, served by the workers: this process accepts none.
            for listener in self.listeners:
                listener.port.stopReading()
        reactor.callWhenRunning(self._running)
        _log.info(
            "twisted-mta starting: hostname={hostname} spool={spool} config={config}",
            hostname=config.hostname,
            spool=str(config.spool),
            config=str(config.source or "(defaults)"),
        )

    def _running(self) -> None:
        """The reactor runs: take over HUP and TERM, start the workers, then
        say we serve once they all do."""
        self._handle_signals()
        if self.workers is None:
            self._serving()
            return
        sockets = [
            ListeningSocket(listener.kind, listener.port.fileno(), listener.port.addressFamily)
            for listener in self.listeners
        ]
        self.workers.start(sockets).addCallback(lambda _: self._serving())

    def _serving(self) -> None:
        # The metrics first: a "listening: smtp" line tells they are up too.
        for listener in self.monitoring:
            if isinstance(listener, ListenerService):
                listener.announce()
        for listener in self.listeners:
            listener.announce()
        count = len(list(self.listeners))
        _tell_systemd(systemd.READY, systemd.status(f"serving on {count} listener(s)"))

    def _handle_signals(self) -> None:
        """Ours replace the reactor's, installed as it started."""
        handlers = ((signal.SIGHUP, self._on_sighup), (signal.SIGTERM, self._on_sigterm))
        for number, handler in handlers:
            self._old_handlers[number] = signal.signal(number, handler)

    def _on_sighup(self, number, frame) -> None:
        reactor.callFromThread(self.reload)

    def _on_sigterm(self, number, frame) -> None:
        # Not the reactor's handler: that one makes twistd end by the signal,
        # and a drained shutdown is a clean exit.
        reactor.callFromThread(self._terminate)

    def _terminate(self) -> None:
        _log.info("SIGTERM: shutting down")
        _tell_systemd(systemd.STOPPING, systemd.status("draining sessions"))
        reactor.stop()

    # -- SIGHUP ------------------------------------------------------------------

    def reload(self) -> defer.Deferred:
        """Re-read the config and the files it names, here and in the
        workers; keep the running config if anything in it does not
        validate.  Fires once all have re-read it."""
        _tell_systemd(systemd.RELOADING)
        d = defer.maybeDeferred(self._reload)
        d.addBoth(lambda _: _tell_systemd(systemd.READY))
        return d

    def _reload(self) -> defer.Deferred | None:
        old = self.config
        config = self.reread()
        if config is None:
            return None
        _warn_about_cram_md5(config)
        unchanged = [name for name in _RESTART_ONLY if _differs(old, config, name)]
        note = f" ({', '.join(unchanged)}: at the next restart)" if unchanged else ""
        d = defer.succeed(None) if self.workers is None else self.workers.reload()
        d.addCallback(
            lambda _: _log.info(
                "reload: config {config} re-read{note}",
                config=str(config.source or "(defaults)"),
                note=note,
            )
        )
        return d

    def certificate_renewed(self, certificate: Certificate) -> None:
        """Logged once the workers serve it too."""
        if self.workers is None:
            super().certificate_renewed(certificate)
            return
        d = self.workers.renew_certificate()
        d.addCallback(lambda _: super(MTAService, self).certificate_renewed(certificate))

    def _apply(self, config: Config) -> None:
        super()._apply(config)
        self.limits.max_total = config.limits.max_connections
        self.limits.max_per_ip = config.limits.max_connections_per_ip
        self.maildrop.system = self.intake.system
        self.router.policies = self.scheduler.policies = self.intake.system.policies
        self.scheduler.policy = _queue_policy(config)
        self.scheduler.report = dsn_reporter(self.intake.system, self.store, config.queue.lifetime)
        self.router.helo_name = config.hostname
        self.router.settings = _router_settings(config)
        self.router.resolver = make_resolver(self.router.settings.resolvers)

    # -- SIGTERM -----------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        """Stop taking connections, drain the sessions (the workers'
        first), then stop the rest."""
        for number, handler in self._old_handlers.items():
            signal.signal(number, handler)
        d = self.stop_listening()
        if self.workers is not None:
            d.addCallback(lambda _: self.workers.stop(self.config.limits.shutdown_timeout))
        d.addCallback(self.drain)
        d.addCallback(lambda _: self.queue.stopService())
        d.addBoth(self._stop_monitoring)
        d.addBoth(self.stop_committer)
        return d

    def _stop_monitoring(self, result):
        # Last but the committer: the drain shows in /healthz, and what the
        # queue did until it stopped is counted.
        d = defer.maybeDeferred(self.monitoring.stopService)
        return d.addBoth(lambda _: result)


def build_service(
    config: Config, checkers: Sequence = (), auth: Sequence[str] = ()
) -> MTAService:
    """The whole server as one service, ready for twistd; a plugin that
    cannot be made stops it with one line.  ``auth``: the ``--auth``
    descriptions of ``checkers``, for the workers to make their own."""
    try:
        return MTAService(config, checkers, auth)
    except PluginError as error:
        raise SystemExit(f"twistd mta: {error}") from None


def _tell_systemd(*states: str) -> None:
    try:
        systemd.notify(*states)
    except OSError as error:
        _log.info(
            "systemd: cannot notify $NOTIFY_SOCKET: {reason}",
            reason=error.strerror or str(error),
        )


def _check_sharing(config: Config) -> None:
    """Stop a start whose maildirs could not be given their group."""
    if not may_share(spool_sharing(config)):
        raise SystemExit(
            f"twistd mta: delivery.group: {_run_user()} is not a member of group"
            f" {config.delivery.group}, so it cannot give the maildirs that group"
        )


def _run_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _warn_about_cram_md5(config: Config) -> None:
    warning = cram_md5_warning(config.auth.mechanisms, config.users.file)
    if warning:
        _log.info("{warning}", warning=warning)


def _differs(old: Config, new: Config, name: str) -> bool:
    path = name.split(".")
    return _value(old, path) != _value(new, path)


def _value(config: Config, path: list[str]):
    value = config
    for name in path:
        value = getattr(value, name)
    return value


def _queue_state(store: QueueStore) -> tuple[int, float | None]:
    """The queue's size and its oldest message's arrival, for the metrics.

    Read from the folder at each scrape (one listing, one envelope): the
    scheduler's memory knows due times, not arrivals.  Queue ids sort
    oldest first.
    """
    ids = store.ids()
    for queue_id in ids:
        try:
            return len(ids), store.load(queue_id).arrival
        except (UnknownMessage, CorruptMessage):
            continue
    return len(ids), None


def _queue_policy(config: Config) -> Policy:
    return Policy(
        retry_min=config.queue.retry_min,
        retry_max=config.queue.retry_max,
        lifetime=config.queue.lifetime,
        delay_warning=config.queue.delay_warning,
    )


def _router_settings(config: Config) -> RouterSettings:
    relay = config.relay
    smarthost = None
    if relay.smarthost:
        host, port = parse_hostport(relay.smarthost, 25)
        smarthost = SmartHost(
            host=host,
            port=port,
            tls=relay.smarthost_tls,
            ca_file=relay.ca_file,
            user=relay.smarthost_user or None,
            password_file=relay.smarthost_password_file,
        )
    return RouterSettings(
        smarthost=smarthost,
        mx_port=relay.mx_port,
        resolvers=resolver_addresses(config),
    )


def relay_timeouts(config: Config) -> Timeouts:
    """The relay client's timeouts from ``[relay]``; a body block keeps its
    RFC 5321 three minutes, which only a stalled link reaches."""
    relay = config.relay
    return Timeouts(
        connect=relay.connect_timeout,
        command=relay.command_timeout,
        data_end=relay.data_timeout,
    )
