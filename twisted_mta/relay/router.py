"""From a queued message's recipients to delivery attempts.

Recipients of one domain go in one transaction.  With a smart host set,
everything goes there (TLS as its mode says, AUTH with its user);
otherwise to the domain's MX hosts in order, each over all of its
addresses, with opportunistic TLS on ``mx_port``.  A host that cannot be
reached, or refuses the session, passes the turn to the next one; the
first that takes the session gives the per-recipient results.  Names are
resolved by the resolver it is given (:mod:`twisted_mta.relay.resolver`).

The router takes its own settings, :class:`RouterSettings` (with a
:class:`SmartHost`): the service builds them from ``[relay]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from twisted.application import service
from twisted.internet import defer

from twisted_mta.intake.policies import (
    NO_POLICIES,
    PolicyChain,
    header_lines,
    message_info,
)
from twisted_mta.intake.policies import Outcome as PolicyOutcome
from twisted_mta.queue.outcomes import Outcome, envelope_info
from twisted_mta.queue.store import QueueStore
from twisted_mta.relay.mx import RouteError, host_addresses, mx_hosts
from twisted_mta.relay.outgoing import Outgoing, RelayError, RelayTarget, Timeouts, TLSMode
from twisted_mta.relay.pool import IdleSessions
from twisted_mta.relay.session import open_session
from twisted_mta.storage.envelope import QueuedMessage, RecipientState


@dataclass(frozen=True)
class SmartHost:
    """The one host all mail goes to, and how.

    ``tls`` is ``"starttls"``, ``"implicit"`` or ``"none"``; ``ca_file``
    adds trust anchors for its certificate.  With ``user`` set, AUTH uses
    the first line of ``password_file`` as the password, read at each
    attempt.
    """

    host: str
    port: int = 25
    tls: TLSMode = "starttls"
    ca_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class RouterSettings:
    """Through ``smarthost`` if set, else to the MX hosts on ``mx_port``.

    ``resolvers`` are the ``(ip, port)`` of the name servers to ask, for
    :func:`~twisted_mta.relay.resolver.make_resolver`; none means the system's.
    """

    smarthost: SmartHost | None = None
    mx_port: int = 25
    resolvers: tuple[tuple[str, int], ...] = ()


@dataclass
class Router(service.Service):
    reactor: object
    resolver: object
    helo_name: str
    settings: RouterSettings
    store: QueueStore
    timeouts: Timeouts = Timeouts()
    policies: PolicyChain = NO_POLICIES
    # As many attempts as the scheduler runs to one destination at once.
    per_destination: int = 5
    _idle: IdleSessions = field(init=False)

    def __post_init__(self) -> None:
        self._idle = IdleSessions(self.reactor, self.per_destination)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self._idle.close_all()

    def _outbound(
        self, message: QueuedMessage, addresses: tuple[str, ...], path: Path, size: int
    ) -> defer.Deferred[PolicyOutcome]:
        """Ask the policies' ``outbound`` hooks (a signature) before an attempt."""
        if not self.policies.has("outbound"):
            return defer.succeed(PolicyOutcome())
        envelope = replace(envelope_info(message), recipients=addresses)
        return self.policies.run(
            "outbound", envelope, message_info(lambda: open(path, "rb"), size)
        )

    def destination(self, address: str) -> str:
        """The key grouping recipients into one transaction."""
        smarthost = self.settings.smarthost
        if smarthost is not None:
            return f"[smarthost] {smarthost.host}:{smarthost.port}"
        return address.rpartition("@")[2].lower()

    def deliver(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> defer.Deferred[list[Outcome]]:
        return defer.Deferred.fromCoroutine(self._deliver(message, recipients))

    async def _deliver(self, message: QueuedMessage, recipients) -> list[Outcome]:
        addresses = tuple(r.address for r in recipients)
        path = self.store.data_path(message.id)
        size = _size(path)
        outcome = await self._outbound(message, addresses, path, size)
        refusal = outcome.refusal
        if refusal is not None:
            text = f"{refusal.code} {refusal.enhanced} {refusal.text}"
            permanent = refusal.code >= 500
            return [Outcome(a, False, permanent, refusal.enhanced, text) for a in addresses]
        prefix = header_lines(outcome.headers)
        outgoing = Outgoing(
            sender=message.sender,
            recipients=addresses,
            path=path,
            size=size + len(prefix),
            eight_bit=message.body == "8BITMIME",
            smtputf8=message.smtputf8,
            prefix=prefix,
            queue_id=message.id,
        )
        key = self.destination(addresses[0])
        cached = self._idle.check_out(key)
        if cached is not None:
            return await self._send(key, cached, outgoing)
        try:
            targets = await self._targets(addresses[0].rpartition("@")[2])
        except RouteError as error:
            return [Outcome(a, False, error.permanent, error.status, error.text) for a in addresses]
        failure = RelayError(451, "4.4.1", "no host to deliver to")
        for target in targets:
            if not target.addresses:
                failure = RelayError(451, "4.4.4", f"{target.name}: no address found")
                continue
            try:
                session = await open_session(self.reactor, target, self.helo_name, self.timeouts)
            except RelayError as error:
                failure = error
                continue
            return await self._send(key, session, outgoing)
        return [
            Outcome(a, False, failure.permanent, failure.status, failure.text, failure.remote)
            for a in addresses
        ]

    async def _send(self, key: str, session, outgoing: Outgoing) -> list[Outcome]:
        """One message on ``session``, which is then kept for the next one
        to the same destination while it stays usable.  A session that gave
        a temporary failure is not kept: the next try gets a fresh one."""
        result = None
        try:
            result = await session.send(outgoing)
        finally:
            if self.running and result is not None and not any(map(_temporary, result.results)):
                self._idle.check_in(key, session)
            else:
                session.close()
        return [
            Outcome(r.address, r.delivered, r.permanent, r.status, r.text, result.remote)
            for r in result.results
        ]

    async def _targets(self, domain: str) -> list[RelayTarget]:
        smarthost = self.settings.smarthost
        if smarthost is not None:
            return [await self._smarthost(smarthost)]
        hosts = await mx_hosts(self.resolver, domain)
        targets = []
        lookup_failure = None
        for host in hosts:
            try:
                found = await host_addresses(self.resolver, host.name)
            except RouteError as error:
                # A name server failing now says nothing about tomorrow.
                lookup_failure, found = error, []
            targets.append(RelayTarget(host.name, tuple(found), self.settings.mx_port, "may"))
        if not any(t.addresses for t in targets):
            if lookup_failure is not None:
                raise lookup_failure
            if len(hosts) == 1 and hosts[0].name == domain:
                raise RouteError(True, "5.1.2", f"Host or domain name not found: {domain}")
        return targets

    async def _smarthost(self, smarthost: SmartHost) -> RelayTarget:
        found = await host_addresses(self.resolver, smarthost.host)
        user = smarthost.user
        password = None if user is None else _first_line(smarthost.password_file)
        if user is not None and password is None:
            raise RouteError(False, "4.7.8", "smart host password file is missing or empty")
        return RelayTarget(
            smarthost.host,
            tuple(found),
            smarthost.port,
            smarthost.tls,
            smarthost.ca_file,
            user,
            password,
        )


def _temporary(result) -> bool:
    return not (result.delivered or result.permanent)


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _first_line(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return lines[0] if lines else None
