"""What serves SMTP: listeners, their sessions, the intake, TLS.

The main process is such a server, with the queue besides
(:class:`twisted_mta.service.MTAService`); so is each worker process when
there are several (:mod:`twisted_mta.workers`).  What they share is here:
the factories of the listeners and what they are given (portal,
mechanisms, throttle, sessions), the certificate and its renewals, the
reload of all that from a config re-read, and the drain of the sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.application import service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta.auth.checker import FirstMatch, UsersFileChecker
from twisted_mta.auth.mechanisms import challengers
from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.config import Config, ConfigError, load_config, parse_hostport
from twisted_mta.directory.resolve import Directory
from twisted_mta.intake.acceptance import MailSystem
from twisted_mta.intake.policies import NO_POLICIES, PluginError, PolicyChain, load_policies
from twisted_mta.intake.spool import Spool
from twisted_mta.interfaces import NO_PEERS, IPolicyPeers, PolicyContext
from twisted_mta.relay.resolver import make_resolver
from twisted_mta.smtp.factory import MTAFactory
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings, Sessions
from twisted_mta.smtp.proxy import ProxyWrappingFactory
from twisted_mta.smtp.realm import MailRealm
from twisted_mta.smtp.sasl import usable_mechanisms
from twisted_mta.storage.committer import Committer
from twisted_mta.storage.maildir import Sharing
from twisted_mta.tls import Certificate, ServerTLS, TLSError, files_stamp, load_certificate

LISTENERS = ("smtp", "submission", "submissions")
# Certificate renewals are picked up within this many seconds (twice this
# is the contract's 10 s, with room for a slow disk).
CERTIFICATE_POLL = 4.0

_log = Logger()


class PortService(service.Service):
    """A service that owns one listening port, once it has one: stopping
    the service stops listening."""

    port = None

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class ListenerService(PortService):
    """Bind one endpoint before privileges are dropped; say where it listens
    once the server is ready to serve it."""

    def __init__(self, kind: str, description: str, factory) -> None:
        self.kind = kind
        self.description = description
        self.factory = factory

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
        self.port = outcome

    @property
    def listening(self) -> bool:
        return self.port is not None and bool(self.port.connected)

    def announce(self) -> None:
        address = self.port.getHost()
        _log.info(
            "listening: {listener} on {host}:{port}",
            listener=self.kind,
            host=address.host,
            port=address.port,
        )


@dataclass(frozen=True)
class Intake:
    """What decides on mail and logins; made anew from each config."""

    system: MailSystem
    portal: Portal
    mechanisms: dict


class SMTPService(service.MultiService):
    """Listeners and their sessions, the intake behind them, their TLS.

    Each listener is added by the subclass (``add_listener``), bound or
    given, and with the connection limits it counts against.
    """

    # Whether it watches the certificate's files itself (a worker is told).
    watches_certificate = True
    # The other processes running the same policies: none for one process.
    peers: IPolicyPeers = NO_PEERS

    def __init__(
        self, config: Config, checkers: Sequence = (), sessions: Sessions | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.checkers = tuple(checkers)
        self.sessions = sessions if sessions is not None else Sessions()
        self.committer = Committer(reactor)
        self.spool = Spool(
            config.mail_dir, config.queue_dir, self.committer, sharing=spool_sharing(config)
        )
        self.tls = ServerTLS()
        self.throttle = AuthThrottle(
            config.auth.failure_delay, config.limits.max_auth_failures_per_ip
        )
        self.intake = build_intake(config, self.spool, self.checkers, self.peers)
        self.listeners = service.MultiService()
        self.listeners.setServiceParent(self)
        self.proxies: list[ProxyWrappingFactory] = []
        self.factories: dict[str, list[MTAFactory]] = {kind: [] for kind in LISTENERS}
        self._certificate: Certificate | None = None
        self._refused_stamp = None
        self._certificate_poll = task.LoopingCall(self._check_certificates)
        self._certificate_poll.clock = reactor

    def add_listener(
        self,
        kind: str,
        limits: ConnectionLimits,
        listener: Callable[[object], service.IService],
    ) -> None:
        """Serve ``kind`` on ``listener(factory)``: a service that listens
        with the factory it is given."""
        settings = listener_settings(self.config, kind)
        factory = MTAFactory(
            self.intake.portal,
            settings,
            limits,
            self.tls,
            self.intake.mechanisms,
            self.throttle,
            self.sessions,
        )
        self.factories[kind].append(factory)
        listener(self._wrap(kind, settings, factory)).setServiceParent(self.listeners)

    def _wrap(self, kind: str, settings: ServerSettings, factory: MTAFactory):
        """TLS around the server for implicit TLS, the PROXY header outside it."""
        if settings.implicit_tls:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        if kind in self.config.proxy.listeners:
            factory = ProxyWrappingFactory(factory, self.config.proxy.trusted, reactor)
            self.proxies.append(factory)
        return factory

    def startService(self) -> None:
        try:
            self._use_certificate(configured_certificate(self.config))
        except TLSError as error:
            raise SystemExit(f"twistd mta: {error}") from None
        super().startService()
        if self.watches_certificate:
            self._certificate_poll.start(CERTIFICATE_POLL, now=False)

    # -- SIGHUP --------------------------------------------------------------

    def reread(self) -> Config | None:
        """Re-read the config and the files it names and serve by them; None,
        and the running config kept, if anything in it does not validate."""
        try:
            config = load_config(self.config.source, {})
            certificate = configured_certificate(config)
        except (ConfigError, TLSError) as error:
            _log.info("reload: {error}; keeping the running config", error=str(error))
            return None
        try:
            self._apply(config)
        except PluginError as error:
            _log.info("reload: {error}; keeping the running config", error=str(error))
            return None
        self._use_certificate(certificate)
        self.config = config
        return config

    def _apply(self, config: Config) -> None:
        """Serve new connections by ``config``; raises PluginError."""
        self.intake = build_intake(config, self.spool, self.checkers, self.peers)
        for kind, factories in self.factories.items():
            for factory in factories:
                factory.reconfigure(
                    self.intake.portal, listener_settings(config, kind), self.intake.mechanisms
                )
        for proxy in self.proxies:
            proxy.trusted = config.proxy.trusted
        self.throttle.base_delay = config.auth.failure_delay
        self.throttle.max_failures = config.limits.max_auth_failures_per_ip

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
            certificate = configured_certificate(self.config)
        except TLSError as error:
            # Half-way through a renewal the pair may not match yet: said
            # once, and tried again when the files change again.
            self._refused_stamp = stamp
            _log.info("tls: {error}; keeping the current certificate", error=str(error))
            return
        self._use_certificate(certificate)
        self.certificate_renewed(certificate)

    def certificate_renewed(self, certificate: Certificate) -> None:
        _log.info("tls: certificate reloaded from {path}", path=str(certificate.files[0]))

    def renew_certificate(self) -> None:
        """Serve the certificate on disk now (a worker, told of a renewal)."""
        try:
            self._use_certificate(configured_certificate(self.config))
        except TLSError as error:
            _log.info("tls: {error}; keeping the current certificate", error=str(error))

    # -- SIGTERM -------------------------------------------------------------

    def stop_listening(self) -> defer.Deferred:
        """Take no more connections (the first step of every stop)."""
        service.Service.stopService(self)
        if self._certificate_poll.running:
            self._certificate_poll.stop()
        return defer.maybeDeferred(self.listeners.stopService)

    def drain(self, _=None) -> defer.Deferred:
        """Let the sessions finish within ``shutdown_timeout``, then cut them."""
        return self.sessions.drain(self.config.limits.shutdown_timeout, reactor)

    def stop_committer(self, result):
        self.committer.stop()
        return result


def recheck_config(config: Config) -> Config:
    """The config and its files, read again as the user we now run as."""
    try:
        return load_config(config.source, {})
    except ConfigError as error:
        raise SystemExit(f"twistd mta: {error}") from None


def spool_sharing(config: Config) -> Sharing:
    group = config.delivery.group
    return Sharing(None if group is None else group.gid)


def configured_certificate(config: Config) -> Certificate:
    return load_certificate(
        config.tls.certificate, config.tls.private_key, config.tls_dir, config.hostname
    )


def resolver_addresses(config: Config) -> tuple[tuple[str, int], ...]:
    return tuple(parse_hostport(entry, 53) for entry in config.relay.resolvers)


def build_intake(
    config: Config, spool: Spool, checkers: Sequence = (), peers: IPolicyPeers = NO_PEERS
) -> Intake:
    """The mail system, the cred portal and the AUTH mechanisms of ``config``:
    what decides on mail and logins, for the server and for the tests;
    ``peers`` are the other processes running the same policies."""
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
        _policies(config, peers),
    )
    portal = _portal(MailRealm(system), directory, config, checkers)
    mechanisms = usable_mechanisms(challengers(config.auth.mechanisms, config.hostname), portal)
    return Intake(system, portal, mechanisms)


def _policies(config: Config, peers: IPolicyPeers) -> PolicyChain:
    """The enabled policy plugins; raises PluginError."""
    plugins = config.plugins
    if not plugins.enabled:
        return NO_POLICIES
    context = PolicyContext(
        reactor=reactor,
        hostname=config.hostname,
        state_dir=config.spool / "plugins",
        resolver=make_resolver(resolver_addresses(config)),
        trusted_networks=config.relay.networks,
        peers=peers,
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


def listener_settings(config: Config, kind: str) -> ServerSettings:
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
