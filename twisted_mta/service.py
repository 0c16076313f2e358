"""Assemble the running server from a Config: listeners, portal, spool."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application import service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import log

from twisted_mta.auth.checker import FirstMatch, UsersFileChecker
from twisted_mta.auth.mechanisms import challengers
from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.config import Config
from twisted_mta.delivery.directory import Directory
from twisted_mta.queue.committer import Committer
from twisted_mta.queue.inject import dsn_reporter
from twisted_mta.queue.maildrop import MaildropService
from twisted_mta.queue.runner import FlushListener
from twisted_mta.queue.scheduler import Policy, Scheduler
from twisted_mta.queue.store import QueueStore
from twisted_mta.queue.spool import Spool
from twisted_mta.relay.router import Router, make_resolver
from twisted_mta.smtp.policy import MailRealm, MailSystem
from twisted_mta.smtp.proxy import ProxyWrappingFactory
from twisted_mta.smtp.sasl import usable_mechanisms
from twisted_mta.smtp.server import ConnectionLimits, MTAFactory, ServerSettings
from twisted_mta.tls import TLSError, server_context

LISTENERS = ("smtp", "submission", "submissions")


class ListenerService(service.Service):
    """Bind one endpoint before privileges are dropped; log where it listens."""

    def __init__(self, kind: str, description: str, factory) -> None:
        self.kind = kind
        self.description = description
        self.factory = factory
        self._port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = serverFromString(reactor, self.description)
        result: list = []
        endpoint.listen(self.factory).addBoth(result.append)
        outcome = result[0] if result else None
        if hasattr(outcome, "check"):
            reason = outcome.value
            if isinstance(reason, CannotListenError):
                reason = reason.socketError
            raise SystemExit(f"twistd mta: cannot listen on {self.description}: {reason}")
        self._port = outcome
        address = outcome.getHost()
        log.msg(f"listening: {self.kind} on {address.host}:{address.port}")

    def stopService(self):
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


class CommitterService(service.Service):
    def __init__(self, committer: Committer) -> None:
        self.committer = committer

    def stopService(self) -> None:
        super().stopService()
        self.committer.stop()


def build_service(config: Config, checkers: Sequence = ()) -> service.MultiService:
    """The whole server as one service, ready for twistd."""
    top = service.MultiService()
    committer = Committer(reactor)
    CommitterService(committer).setServiceParent(top)
    spool = Spool(config.mail_dir, config.queue_dir, committer)
    try:
        spool.prepare()
    except OSError as error:
        raise SystemExit(
            f"twistd mta: cannot prepare {error.filename or config.queue_dir}: {error.strerror}"
        ) from None
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
    )
    MaildropService(config.maildrop_dir, system, reactor).setServiceParent(top)
    scheduler = _scheduler(config, system, top)
    scheduler.setServiceParent(top)
    spool.on_queued = scheduler.enqueue
    FlushListener(config.queue_dir, scheduler, reactor).setServiceParent(top)
    portal = _portal(MailRealm(system), directory, config, checkers)
    mechanisms = usable_mechanisms(challengers(config.auth.mechanisms, config.hostname), portal)
    throttle = AuthThrottle(config.auth.failure_delay)
    try:
        context = server_context(
            config.tls.certificate, config.tls.private_key, config.tls_dir, config.hostname
        )
    except TLSError as error:
        raise SystemExit(f"twistd mta: {error}") from None
    limits = ConnectionLimits(
        config.limits.max_connections, config.limits.max_connections_per_ip
    )
    for kind in LISTENERS:
        settings = _settings(config, kind)
        for description in getattr(config.listen, kind):
            factory = MTAFactory(portal, settings, limits, context, mechanisms, throttle)
            if settings.implicit_tls:
                factory = TLSMemoryBIOFactory(context, False, factory)
            if kind in config.proxy.listeners:
                factory = ProxyWrappingFactory(factory, config.proxy.trusted, reactor)
            ListenerService(kind, description, factory).setServiceParent(top)
    log.msg(
        f"twisted-mta starting: hostname={config.hostname} spool={config.spool} "
        f"config={config.source or '(defaults)'}"
    )
    return top


def _scheduler(config: Config, system: MailSystem, parent: service.MultiService) -> Scheduler:
    store = QueueStore(config.queue_dir)
    router = Router(
        reactor, make_resolver(config.relay.resolvers), config.hostname, config.relay, store
    )
    router.setServiceParent(parent)
    policy = Policy(
        retry_min=config.queue.retry_min,
        retry_max=config.queue.retry_max,
        lifetime=config.queue.lifetime,
        delay_warning=config.queue.delay_warning,
    )
    report = dsn_reporter(system, store, config.queue.lifetime)
    return Scheduler(store, router.deliver, report, router.destination, policy, reactor)


def _portal(realm: MailRealm, directory: Directory, config: Config, extra: Sequence) -> Portal:
    """Anonymous sessions, plus logins checked by the users file and --auth."""
    password_checkers = list(extra)
    if config.users.file is not None:
        password_checkers.insert(0, UsersFileChecker(directory.users))
    checkers = [AllowAnonymousAccess()]
    if password_checkers:
        checkers.append(FirstMatch(password_checkers))
    return Portal(realm, checkers)


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
    )
