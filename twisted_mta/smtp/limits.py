"""What all sessions share: listener settings, connection limits, the drain.

* ``ServerSettings``: what every connection of one listener is allowed
  (message size, recipients, errors, idle time, junk commands, AUTH);
* ``ConnectionLimits``: connections open, in total and per client address,
  and Postfix's stress mode: while the connections near their limit,
  sessions get less time and less chatter;
* ``Sessions``: the open sessions of every listener, so that a shutdown can
  let them finish and cut those that do not, and their tallies per listener
  (connections made, TLS handshakes done and failed), read by the metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger

# Above this share of max_connections, the server is under stress.
STRESS_SHARE = 0.8

_log = Logger()



@dataclass(frozen=True)
class ServerSettings:
    """What every connection of one listener shares."""

    hostname: str
    listener: str
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    max_errors: int
    require_auth: bool = False
    implicit_tls: bool = False
    auth_requires_tls: bool = True
    max_auth_failures: int = 3
    max_hops: int = 0
    max_junk_commands: int = 100
    stress_idle_timeout: float = 10.0
    stress_max_junk_commands: int = 3


@dataclass
class ConnectionLimits:
    """Counts open connections, in total and per client address.

    It also tells whether the server is under stress: more than
    ``STRESS_SHARE`` of ``max_total`` connections open.  ``unused`` are
    slots counted but held by no connection (free slots leased to worker
    processes): they count against the limits, not towards stress.  Sessions then use
    their stress limits, as Postfix's smtpd does, so that connections that
    make no progress give way to clients that have mail to send.
    """

    max_total: int
    max_per_ip: int
    total: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    stressed: bool = False
    unused: int = 0
    # Told each start and end of stress (the workers learn of it so).
    on_stress: Callable[[bool], None] | None = None

    def acquire(self, ip: str) -> bool:
        if self.total >= self.max_total or self.per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self._check_stress()
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        remaining = self.per_ip[ip] - 1
        if remaining:
            self.per_ip[ip] = remaining
        else:
            del self.per_ip[ip]
        self._check_stress()

    def set_unused(self, unused: int) -> None:
        self.unused = unused
        self._check_stress()

    def _check_stress(self) -> None:
        """Follow the stress state; its start and end are logged once."""
        stressed = self.total - self.unused > STRESS_SHARE * self.max_total
        if stressed == self.stressed:
            return
        self.stressed = stressed
        state = "on" if stressed else "off"
        _log.info(
            "stress mode {state}: {total} of {max_total} connections open",
            state=state,
            total=self.total - self.unused,
            max_total=self.max_total,
        )
        if self.on_stress is not None:
            self.on_stress(stressed)


class Drainable(Protocol):
    """An open session, as ``Sessions`` sees it."""

    transport: ITCPTransport
    settings: ServerSettings

    def shut_down(self) -> None:
        """Finish what is under way, then close."""


class Sessions:
    """The open sessions of every listener, so that a shutdown can drain them.

    The tallies are plain counters by listener kind, kept whether or not
    metrics are served: one increment per connection or handshake.
    """

    def __init__(self) -> None:
        self.closing = False
        self._open: set[Drainable] = set()
        self._drained: list[defer.Deferred] = []
        self.connections: Counter[str] = Counter()
        self.tls_handshakes: Counter[str] = Counter()
        self.tls_failures: Counter[str] = Counter()

    def add(self, server: Drainable) -> None:
        self._open.add(server)
        self.connections[server.settings.listener] += 1

    def handshake_completed(self, listener: str) -> None:
        self.tls_handshakes[listener] += 1

    def handshake_failed(self, listener: str) -> None:
        self.tls_failures[listener] += 1

    def open_by_listener(self) -> Counter[str]:
        """The sessions open now, by listener kind."""
        return Counter(server.settings.listener for server in self._open)

    def remove(self, server: Drainable) -> None:
        self._open.discard(server)
        if not self._open:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self, timeout: float, clock: IReactorTime) -> defer.Deferred:
        """Ask every session to finish; fires once all are gone.

        Sessions still open after ``timeout`` (a transfer in DATA that does
        not end) are cut; what they were sending was never acknowledged.
        """
        self.closing = True
        for server in list(self._open):
            server.shut_down()
        if not self._open:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        cut = clock.callLater(timeout, self._cut_all)
        return d.addBoth(_cancel_and_pass, cut)

    def _cut_all(self) -> None:
        _log.info("shutdown: {count} session(s) did not finish in time, cut", count=len(self._open))
        for server in list(self._open):
            server.transport.abortConnection()


def _cancel_and_pass(result, call):
    if call.active():
        call.cancel()
    return result
