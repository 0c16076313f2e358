"""The running server: assembled from a Config, started, reloaded, drained.

twistd calls ``privilegedStartService`` as root: only the listeners bind
their ports then.  It drops privileges (``--uid``/``--gid``) and calls
``startService``: from here on files are touched, so the spool and all
made in it belong to the run user, and the config and every file it names
are checked as that user, with one line naming a file it cannot read.

Once the reactor runs, SIGHUP re-reads the config (:meth:`MTAService.reload`)
and SIGTERM drains: the listeners close, transactions in DATA may finish
within ``[limits] shutdown_timeout``, every other session is told
``421 4.3.2``; then the queue and the committer stop and twistd exits 0.
"""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.application import service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta import systemd
from twisted_mta.auth.checker import FirstMatch, UsersFileChecker, cram_md5_warning
from twisted_mta.auth.mechanisms import challengers
from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.config import Config, ConfigError, load_config, parse_hostport
from twisted_mta.directory.resolve import Directory
from twisted_mta.intake.acceptance import MailSystem
from twisted_mta.intake.maildrop import MaildropService
from twisted_mta.intake.policies import NO_POLICIES, PluginError, PolicyChain, load_policies
from twisted_mta.intake.spool import Spool
from twisted_mta.interfaces import PolicyContext
from twisted_mta.metrics import Health, Metrics, MetricsObserver, metrics_site
from twisted_mta.queue.bounces import dsn_reporter
from twisted_mta.queue.flush import FlushListener
from twisted_mta.queue.scheduler import Policy, Scheduler
from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.queue.writer import QueueWriter
from twisted_mta.relay.outgoing import Timeouts
from twisted_mta.relay.resolver import make_resolver
from twisted_mta.relay.router import Router, RouterSettings, SmartHost
from twisted_mta.smtp.factory import MTAFactory
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings, Sessions
from twisted_mta.smtp.proxy import ProxyWrappingFactory
from twisted_mta.smtp.realm import MailRealm
from twisted_mta.smtp.sasl import usable_mechanisms
from twisted_mta.storage.committer import Committer
from twisted_mta.storage.envelope import UnknownMessage
from twisted_mta.storage.maildir import Sharing, may_share
from twisted_mta.tls import Certificate, ServerTLS, TLSError, files_stamp, load_certificate

LISTENERS = ("smtp", "submission", "submissions")
# Certificate renewals are picked up within this many seconds (twice this
# is the contract's 10 s, with room for a slow disk).
CERTIFICATE_POLL = 4.0
# Config parts that bind or name where things are: a reload cannot change them.
_RESTART_ONLY = ("spool", "listen", "proxy.listeners", "delivery", "metrics.listen")

_log = Logger()



class ListenerService(service.Service):
    """Bind one endpoint before privileges are dropped; say where it listens
    once the server is ready to serve it."""

    def __init__(self, kind: str, description: str, factory) -> None:
        self.kind = kind
        self.description = description
        self.factory = factory
        self._port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            endpoint = serverFromString(reactor, self.description)
        except (KeyError, IndexError) as missing:
            # A systemd: endpoint whose socket systemd did not pass.
            raise SystemExit(
                f"twistd mta: cannot listen on {self.description}: no socket {missing}"
                " was passed by systemd (socket activation)"
            ) from None
        result: list = []
        endpoint.listen(self.factory).addBoth(result.append)
        outcome = result[0] if result else None
        if hasattr(outcome, "check"):
            reason = outcome.value
            if isinstance(reason, CannotListenError):
                reason = reason.socketError
            raise SystemExit(f"twistd mta: cannot listen on {self.description}: {reason}")
        self._port = outcome

    @property
    def listening(self) -> bool:
        return self._port is not None and bool(self._port.connected)

    def announce(self) -> None:
        address = self._port.getHost()
        _log.info(
            "listening: {listener} on {host}:{port}",
            listener=self.kind,
            host=address.host,
            port=address.port,
        )

    def stopService(self):
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


@dataclass(frozen=True)
class Intake:
    """What decides on mail and logins; made anew from each config."""

    system: MailSystem
    portal: Portal
    mechanisms: dict


class MTAService(service.MultiService):
    """The whole server: listeners, sessions, queue, relay, committer."""

    def __init__(self, config: Config, checkers: Sequence = ()) -> None:
        super().__init__()
        self.config = config
        self.checkers = tuple(checkers)
        self.committer = Committer(reactor)
        self.spool = Spool(
            config.mail_dir, config.queue_dir, self.committer, sharing=_sharing(config)
        )
        self.store = QueueStore(config.queue_dir)
        self.tls = ServerTLS()
        self.limits = ConnectionLimits(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self.throttle = AuthThrottle(
            config.auth.failure_delay, config.limits.max_auth_failures_per_ip
        )
        self.sessions = Sessions()
        intake = build_intake(config, self.spool, self.checkers)
        self.listeners = service.MultiService()
        self.listeners.setServiceParent(self)
        self.proxies: list[ProxyWrappingFactory] = []
        self.factories = self._listen(config, intake)
        self.queue = service.MultiService()
        self.queue.setServiceParent(self)
        self.maildrop = MaildropService(config.maildrop_dir, intake.system, reactor)
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
        )
        self.router.policies = intake.system.policies
        self.router.setServiceParent(self.queue)
        self.scheduler = Scheduler(
            self.store,
            self.router.deliver,
            dsn_reporter(intake.system, self.store, config.queue.lifetime),
            self.router.destination,
            _queue_policy(config),
            reactor,
            QueueWriter(self.store, self.committer),
        )
        self.scheduler.policies = intake.system.policies
        self.scheduler.setServiceParent(self.queue)
        self.spool.on_queued = self.scheduler.enqueue
        FlushListener(config.queue_dir, self.scheduler, reactor).setServiceParent(self.queue)
        self.monitoring = service.MultiService()
        self.monitoring.setServiceParent(self)
        self._serve_metrics(config)
        self._certificate: Certificate | None = None
        self._refused_stamp = None
        self._certificate_poll = task.LoopingCall(self._check_certificates)
        self._certificate_poll.clock = reactor
        self._old_handlers: dict[int, object] = {}

    def _listen(self, config: Config, intake: Intake) -> dict[str, list[MTAFactory]]:
        factories: dict[str, list[MTAFactory]] = {kind: [] for kind in LISTENERS}
        for kind in LISTENERS:
            settings = _settings(config, kind)
            for description in getattr(config.listen, kind):
                factory = MTAFactory(
                    intake.portal,
                    settings,
                    self.limits,
                    self.tls,
                    intake.mechanisms,
                    self.throttle,
                    self.sessions,
                )
                factories[kind].append(factory)
                wrapped = self._wrap(kind, settings, factory)
                ListenerService(kind, description, wrapped).setServiceParent(self.listeners)
        return factories

    def _serve_metrics(self, config: Config) -> None:
        """``[metrics] listen``: counts, and the health of the listeners and
        the spool, over HTTP; bound with the SMTP ports, before privileges
        are dropped."""
        if not config.metrics.listen:
            return
        kinds = [kind for kind in LISTENERS if getattr(config.listen, kind)]
        metrics = Metrics(self.sessions, kinds, lambda: _queue_state(self.store))
        MetricsObserver(metrics).setServiceParent(self.monitoring)
        site = metrics_site(metrics, Health(self._listeners_down, config.queue_dir))
        for description in config.metrics.listen:
            ListenerService("metrics", description, site).setServiceParent(self.monitoring)

    def _listeners_down(self) -> list[str]:
        return [f"{each.kind} {each.description}" for each in self.listeners if not each.listening]

    def _wrap(self, kind: str, settings: ServerSettings, factory: MTAFactory):
        """TLS around the server for implicit TLS, the PROXY header outside it."""
        if settings.implicit_tls:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        if kind in self.config.proxy.listeners:
            factory = ProxyWrappingFactory(factory, self.config.proxy.trusted, reactor)
            self.proxies.append(factory)
        return factory

    # -- start: after the privilege drop -------------------------------------

    def startService(self) -> None:
        config = _recheck(self.config)
        _check_sharing(config)
        try:
            self.spool.prepare()
        except OSError as error:
            raise SystemExit(
                f"twistd mta: cannot prepare {error.filename or config.queue_dir}:"
                f" {error.strerror}"
            ) from None
        try:
            self._use_certificate(_load_certificate(config))
        except TLSError as error:
            raise SystemExit(f"twistd mta: {error}") from None
        _warn_about_cram_md5(config)
        super().startService()
        self._certificate_poll.start(CERTIFICATE_POLL, now=False)
        reactor.callWhenRunning(self._running)
        _log.info(
            "twisted-mta starting: hostname={hostname} spool={spool} config={config}",
            hostname=config.hostname,
            spool=str(config.spool),
            config=str(config.source or "(defaults)"),
        )

    def _running(self) -> None:
        """The reactor runs: take over HUP and TERM, then say we serve."""
        self._handle_signals()
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

    def reload(self) -> None:
        """Re-read the config and the files it names; keep the running
        config if anything in it does not validate."""
        _tell_systemd(systemd.RELOADING)
        try:
            self._reload()
        finally:
            _tell_systemd(systemd.READY)

    def _reload(self) -> None:
        try:
            config = load_config(self.config.source, {})
            certificate = _load_certificate(config)
        except (ConfigError, TLSError) as error:
            _log.info("reload: {error}; keeping the running config", error=str(error))
            return
        try:
            self._apply(config)
        except PluginError as error:
            _log.info("reload: {error}; keeping the running config", error=str(error))
            return
        self._use_certificate(certificate)
        _warn_about_cram_md5(config)
        unchanged = [name for name in _RESTART_ONLY if _differs(self.config, config, name)]
        self.config = config
        note = f" ({', '.join(unchanged)}: at the next restart)" if unchanged else ""
        _log.info(
            "reload: config {config} re-read{note}",
            config=str(config.source or "(defaults)"),
            note=note,
        )

    def _apply(self, config: Config) -> None:
        intake = build_intake(config, self.spool, self.checkers)
        for kind, factories in self.factories.items():
            for factory in factories:
                factory.reconfigure(intake.portal, _settings(config, kind), intake.mechanisms)
        for proxy in self.proxies:
            proxy.trusted = config.proxy.trusted
        self.limits.max_total = config.limits.max_connections
        self.limits.max_per_ip = config.limits.max_connections_per_ip
        self.throttle.base_delay = config.auth.failure_delay
        self.throttle.max_failures = config.limits.max_auth_failures_per_ip
        self.maildrop.system = intake.system
        self.router.policies = self.scheduler.policies = intake.system.policies
        self.scheduler.policy = _queue_policy(config)
        self.scheduler.report = dsn_reporter(intake.system, self.store, config.queue.lifetime)
        self.router.helo_name = config.hostname
        self.router.settings = _router_settings(config)
        self.router.resolver = make_resolver(self.router.settings.resolvers)

    def _use_certificate(self, certificate: Certificate) -> None:
        self._certificate = certificate
        self._refused_stamp = None
        self.tls.use(certificate.options)

    def _check_certificates(self) -> None:
        """Serve a renewed certificate without a restart."""
        stamp = files_stamp(self._certificate.files)
        if stamp in (self._certificate.stamp, self._refused_stamp):
            return
        try:
            certificate = _load_certificate(self.config)
        except TLSError as error:
            # Half-way through a renewal the pair may not match yet: said
            # once, and tried again when the files change again.
            self._refused_stamp = stamp
            _log.info("tls: {error}; keeping the current certificate", error=str(error))
            return
        self._use_certificate(certificate)
        _log.info("tls: certificate reloaded from {path}", path=str(certificate.files[0]))

    # -- SIGTERM -----------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        """Stop taking connections, drain the sessions, then stop the rest."""
        service.Service.stopService(self)
        for number, handler in self._old_handlers.items():
            signal.signal(number, handler)
        if self._certificate_poll.running:
            self._certificate_poll.stop()
        d = defer.maybeDeferred(self.listeners.stopService)
        d.addCallback(
            lambda _: self.sessions.drain(self.config.limits.shutdown_timeout, reactor)
        )
        d.addCallback(lambda _: self.queue.stopService())
        d.addBoth(self._stop_monitoring)
        d.addBoth(self._stop_committer)
        return d

    def _stop_monitoring(self, result):
        # Last but the committer: the drain shows in /healthz, and what the
        # queue did until it stopped is counted.
        d = defer.maybeDeferred(self.monitoring.stopService)
        return d.addBoth(lambda _: result)

    def _stop_committer(self, result):
        self.committer.stop()
        return result


def build_service(config: Config, checkers: Sequence = ()) -> MTAService:
    """The whole server as one service, ready for twistd; a plugin that
    cannot be made stops it with one line."""
    try:
        return MTAService(config, checkers)
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


def _recheck(config: Config) -> Config:
    """The config and its files, read again as the user we now run as."""
    try:
        return load_config(config.source, {})
    except ConfigError as error:
        raise SystemExit(f"twistd mta: {error}") from None


def _sharing(config: Config) -> Sharing:
    group = config.delivery.group
    return Sharing(None if group is None else group.gid)


def _check_sharing(config: Config) -> None:
    """Stop a start whose maildirs could not be given their group."""
    if not may_share(_sharing(config)):
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


def _load_certificate(config: Config) -> Certificate:
    return load_certificate(
        config.tls.certificate, config.tls.private_key, config.tls_dir, config.hostname
    )


def _differs(old: Config, new: Config, name: str) -> bool:
    path = name.split(".")
    return _value(old, path) != _value(new, path)


def _value(config: Config, path: list[str]):
    value = config
    for name in path:
        value = getattr(value, name)
    return value


def build_intake(config: Config, spool: Spool, checkers: Sequence = ()) -> Intake:
    """The mail system, the cred portal and the AUTH mechanisms of ``config``:
    what decides on mail and logins, for the server and for the tests."""
    directory = Directory(
        frozenset(config.domains.local),
        config.domains.recipient_delimiter,
        config.users.file,
        config.aliases.file,
    )
    system = MailSystem(
        config.hostname,
        directory,
        spool,
        config.relay.networks,
        config.auth.received_user,
        config.limits.max_hops,
        _policies(config),
    )
    portal = _portal(MailRealm(system), directory, config, checkers)
    mechanisms = usable_mechanisms(challengers(config.auth.mechanisms, config.hostname), portal)
    return Intake(system, portal, mechanisms)


def _policies(config: Config) -> PolicyChain:
    """The enabled policy plugins; raises PluginError."""
    plugins = config.plugins
    if not plugins.enabled:
        return NO_POLICIES
    context = PolicyContext(
        reactor=reactor,
        hostname=config.hostname,
        state_dir=config.spool / "plugins",
        resolver=make_resolver(_router_settings(config).resolvers),
        trusted_networks=config.relay.networks,
    )
    return load_policies(plugins.enabled, plugins.options, plugins.timeout, context)


def _portal(realm: MailRealm, directory: Directory, config: Config, extra: Sequence) -> Portal:
    """Anonymous sessions, plus logins checked by the users file and --auth."""
    password_checkers = list(extra)
    if config.users.file is not None:
        password_checkers.insert(0, UsersFileChecker(directory.users))
    checkers = [AllowAnonymousAccess()]
    if password_checkers:
        checkers.append(FirstMatch(password_checkers))
    return Portal(realm, checkers)


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
        resolvers=tuple(parse_hostport(entry, 53) for entry in relay.resolvers),
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


def _settings(config: Config, kind: str) -> ServerSettings:
    limits = config.limits
    return ServerSettings(
        hostname=config.hostname,
        listener=kind,
        max_message_size=limits.max_message_size,
        max_recipients=limits.max_recipients,
        idle_timeout=limits.idle_timeout,
        max_errors=limits.max_errors,
        require_auth=kind != "smtp",
        implicit_tls=kind == "submissions",
        auth_requires_tls=config.auth.require_tls,
        max_auth_failures=limits.max_auth_failures,
        max_hops=limits.max_hops,
        max_junk_commands=limits.max_junk_commands,
        stress_idle_timeout=limits.stress_idle_timeout,
        stress_max_junk_commands=limits.stress_max_junk_commands,
    )
