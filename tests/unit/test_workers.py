"""The main process and its workers, in memory: a ``WorkerPool`` on a
reactor that spawns no process, each worker's ``MainChannel`` connected
to the pool's end of its channel, and the AMP commands between them."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.smtp.limits import ConnectionLimits
from twisted_mta.workers.commands import Serving
from twisted_mta.workers.leases import SWEEP_INTERVAL, TALLY_DELAY, RemoteLimits
from twisted_mta.workers.ledger import LEASE
from twisted_mta.workers.supervisor import (
    FIRST_BACKOFF,
    KILL_GRACE,
    ListeningSocket,
    WorkerPool,
    reemit,
)
from twisted_mta.workers.worker import MainChannel, ReportingSessions

SOCKETS = [ListeningSocket("smtp", 7, socket.AF_INET), ListeningSocket("submission", 8, 2)]


class FakeProcess:
    def __init__(self, pid: int, protocol) -> None:
        self.pid = pid
        self.protocol = protocol
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Reactor(MemoryReactorClock):
    """Spawns nothing; connects each control channel to a ``MainChannel``."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.arguments: list[list[str]] = []
        self.channels: list[MainChannel] = []
        self.pumps: list[iosim.IOPump] = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **_):
        process = FakeProcess(1000 + len(self.processes), protocol)
        self.processes.append(process)
        self.arguments.append(args)
        return process

    def adoptStreamConnection(self, fd, family, factory):
        control = factory.buildProtocol(None)
        channel, _, pump = iosim.connectedServerAndClient(
            lambda: control, lambda: MainChannel(lambda: None)
        )
        self.channels.append(channel)
        self.pumps.append(pump)

    def flush(self) -> None:
        """Until no channel has anything left to carry."""
        while any([pump.flush() for pump in self.pumps]):
            pass


class Group:
    """A pool of two workers, started."""

    def __init__(self, max_total: int = 10, max_per_ip: int = 2) -> None:
        self.reactor = Reactor()
        self.queued: list[str] = []
        self.rescans = 0
        self.pool = WorkerPool(
            2,
            ["--config=/etc/mta.toml"],
            ConnectionLimits(max_total, max_per_ip),
            queued=self.queued.append,
            lost=self._rescan,
            clock=self.reactor,
        )
        self.serving = self.ask_later(self.pool.start(SOCKETS))

    def _rescan(self) -> None:
        self.rescans += 1

    @property
    def channels(self) -> list[MainChannel]:
        return self.reactor.channels

    def ask_later(self, d: defer.Deferred) -> list:
        results: list = []
        d.addBoth(results.append)
        return results

    def ask(self, answer: defer.Deferred | object):
        """The answer, once the channels have carried what it needs."""
        results = self.ask_later(defer.maybeDeferred(lambda: answer))
        self.reactor.flush()
        [result] = results
        return result

    def end(self, index: int, reason: Exception) -> None:
        self.reactor.processes[index].protocol.processEnded(Failure(reason))


def test_each_worker_is_given_every_listening_socket():
    group = Group()
    assert len(group.reactor.processes) == 2
    for arguments in group.reactor.arguments:
        assert arguments[1:3] == ["-m", "twisted_mta.workers"]
        assert "--listener=smtp:4:2" in arguments and "--listener=submission:5:2" in arguments
        assert "--config=/etc/mta.toml" in arguments


def test_the_pool_serves_once_every_worker_does():
    group = Group()
    group.channels[0].callRemote(Serving, pid=1000)
    group.reactor.flush()
    assert group.serving == []
    group.channels[1].callRemote(Serving, pid=1001)
    group.reactor.flush()
    assert group.serving == [None]


def limits_of(group: Group) -> list[RemoteLimits]:
    return [RemoteLimits(channel, group.reactor) for channel in group.channels]


def test_connection_slots_are_counted_over_all_workers():
    group = Group(max_per_ip=2)
    first, second = limits_of(group)
    assert group.ask(first.acquire("192.0.2.1")) is True
    assert group.ask(second.acquire("192.0.2.1")) is True
    assert group.ask(first.acquire("192.0.2.1")) is False
    assert group.ask(second.acquire("192.0.2.9")) is True
    assert group.pool.limits.total == 3
    second.release("192.0.2.1")
    group.reactor.flush()
    assert group.pool.limits.total == 2
    assert group.ask(first.acquire("192.0.2.1")) is True


def test_far_from_the_limits_a_worker_is_lent_free_slots():
    group = Group(max_total=100, max_per_ip=20)
    [limits, _] = limits_of(group)
    assert group.ask(limits.acquire("192.0.2.1")) is True
    assert group.pool.limits.per_ip == {"192.0.2.1": LEASE}
    # The next ones are served at once, without asking.
    assert [limits.acquire("192.0.2.1") for _ in range(LEASE - 1)] == [True] * (LEASE - 1)
    assert isinstance(limits.acquire("192.0.2.1"), defer.Deferred)


def test_free_slots_are_kept_while_used_and_given_back_once_idle():
    group = Group(max_total=100, max_per_ip=20)
    [limits, _] = limits_of(group)
    limits.start()
    group.ask(limits.acquire("192.0.2.1"))
    limits.release("192.0.2.1")
    group.reactor.flush()
    assert group.pool.limits.per_ip == {"192.0.2.1": LEASE}
    assert limits.acquire("192.0.2.1") is True
    limits.release("192.0.2.1")
    group.reactor.advance(SWEEP_INTERVAL)  # used since the last sweep: kept
    group.reactor.flush()
    assert group.pool.limits.total == LEASE
    group.reactor.advance(SWEEP_INTERVAL)
    group.reactor.flush()
    assert group.pool.limits.total == 0 and group.pool.limits.per_ip == {}


def test_a_client_is_refused_only_when_its_open_connections_reach_the_limit():
    """Free slots another worker holds are reclaimed for a connection."""
    group = Group(max_total=100, max_per_ip=8)
    first, second = limits_of(group)
    assert group.ask(first.acquire("192.0.2.1")) is True
    assert group.pool.limits.per_ip["192.0.2.1"] == LEASE  # one used, the rest free
    assert [group.ask(second.acquire("192.0.2.1")) for _ in range(7)] == [True] * 7
    assert group.ask(second.acquire("192.0.2.1")) is False
    assert group.pool.limits.per_ip["192.0.2.1"] == 8
    assert first.acquire("192.0.2.1") is not True  # its free slots were taken back


def test_free_slots_of_other_addresses_are_reclaimed_at_the_total_limit():
    group = Group(max_total=8, max_per_ip=8)
    first, second = limits_of(group)
    assert group.ask(first.acquire("192.0.2.1")) is True
    for number in range(2, 9):
        assert group.ask(second.acquire(f"192.0.2.{number}")) is True
    assert group.ask(second.acquire("192.0.2.99")) is False
    assert group.pool.limits.total == 8 and group.pool.limits.per_ip["192.0.2.1"] == 1


def test_free_slots_count_against_the_limits_but_not_towards_stress():
    group = Group(max_total=10, max_per_ip=10)
    first, second = limits_of(group)
    assert group.ask(first.acquire("192.0.2.1")) is True  # 1 in use, 3 free
    group.reactor.advance(TALLY_DELAY)
    group.reactor.flush()
    for number in range(2, 8):
        assert group.ask(second.acquire(f"192.0.2.{number}")) is True
    assert group.pool.limits.total == 10  # 7 in use: not above 80 %
    assert not group.pool.limits.stressed and not second.stressed
    # The limit is reached: the free slots are taken back first.
    assert group.ask(second.acquire("192.0.2.8")) is True
    assert group.pool.limits.total == 8 and not group.pool.limits.stressed
    assert group.ask(second.acquire("192.0.2.9")) is True
    group.reactor.flush()
    assert group.pool.limits.stressed and first.stressed and second.stressed


def test_the_stress_state_is_told_to_every_worker():
    group = Group(max_total=2)
    first, second = limits_of(group)
    group.ask(first.acquire("192.0.2.1"))
    assert not second.stressed
    group.ask(first.acquire("192.0.2.2"))
    group.reactor.flush()
    assert first.stressed and second.stressed  # 2 of 2 open: above 80 %
    first.release("192.0.2.2")
    group.reactor.flush()
    assert not first.stressed and not second.stressed


class Session:
    settings = SimpleNamespace(listener="smtp")


def test_connections_of_every_worker_are_tallied_for_the_metrics():
    group = Group()
    first, second = (ReportingSessions(channel, group.reactor) for channel in group.channels)
    servers = [Session() for _ in range(3)]
    first.add(servers[0])
    first.add(servers[1])
    second.add(servers[2])
    first.remove(servers[0])
    group.reactor.advance(TALLY_DELAY)
    group.reactor.flush()
    tallies = group.pool.tallies
    assert tallies.connections == {"smtp": 3} and tallies.open_by_listener() == {"smtp": 2}
    second.remove(servers[2])
    group.reactor.advance(TALLY_DELAY)
    group.reactor.flush()
    assert tallies.connections == {"smtp": 3} and tallies.open_by_listener() == {"smtp": 1}
    group.end(0, ProcessTerminated(signal=9))
    assert tallies.open_by_listener() == {}


def test_a_queued_message_is_told_to_the_main_process():
    group = Group()
    group.channels[1].queued("661DB04450F8A7A30")
    group.reactor.flush()
    assert group.queued == ["661DB04450F8A7A30"]


def test_an_auth_failure_is_counted_by_every_other_worker():
    group = Group()
    throttles = [AuthThrottle(base_delay=1.0) for _ in group.channels]
    for channel, throttle in zip(group.channels, throttles):
        channel.throttle = throttle
        throttle.on_failure = channel.auth_failed
    throttles[0].begin("192.0.2.1", 100.0)
    throttles[0].checked("192.0.2.1", True, 100.0)
    group.reactor.flush()
    assert throttles[1].recent_failures("192.0.2.1", 101.0) == 1
    # Counted once where it was found, not told back.
    assert throttles[0].recent_failures("192.0.2.1", 101.0) == 1
    assert throttles[1].delay(throttles[1].recent_failures("192.0.2.1", 101.0) + 1) == 2.0


def test_what_a_policy_tells_its_peers_reaches_every_other_worker():
    group = Group()
    heard: list[list[str]] = [[], []]
    for channel, payloads in zip(group.channels, heard):
        channel.peers.listen("ratelimit", payloads.append)
    group.channels[0].peers.tell("ratelimit", "client 192.0.2.7")
    group.reactor.flush()
    assert heard == [[], ["client 192.0.2.7"]]
    group.channels[1].peers.tell("other-topic", "x")
    group.reactor.flush()
    assert heard == [[], ["client 192.0.2.7"]]


def test_tls_handshakes_of_the_workers_are_counted_by_the_main_process():
    group = Group()
    sessions = ReportingSessions(group.channels[0], group.reactor)
    sessions.handshake_completed("submission")
    sessions.handshake_failed("smtp")
    group.reactor.flush()
    tallies = group.pool.tallies
    assert tallies.tls_handshakes == {"submission": 1} and tallies.tls_failures == {"smtp": 1}
    assert sessions.tls_handshakes == {"submission": 1}


def test_a_reload_fires_once_every_worker_has_reread_the_config():
    group = Group()
    reread: list[int] = []
    for number, channel in enumerate(group.channels):
        channel.reread = lambda number=number: reread.append(number)
    group.ask(group.pool.reload())
    assert sorted(reread) == [0, 1]


def test_a_worker_that_ends_gives_its_slots_back_and_is_restarted():
    group = Group(max_total=100, max_per_ip=20)
    assert group.ask(limits_of(group)[0].acquire("192.0.2.1")) is True
    group.end(0, ProcessTerminated(signal=9))
    assert group.pool.limits.total == 0  # the free ones too
    assert group.rescans == 1  # what it queued but did not tell is found
    group.reactor.advance(FIRST_BACKOFF)
    assert len(group.reactor.processes) == 3
    # Dead again at once: the next start waits twice as long.
    group.end(2, ProcessTerminated(exitCode=1))
    group.reactor.advance(FIRST_BACKOFF)
    assert len(group.reactor.processes) == 3
    group.reactor.advance(FIRST_BACKOFF)
    assert len(group.reactor.processes) == 4


def test_stop_terminates_every_worker_and_fires_once_all_ended():
    group = Group()
    stopped = group.ask_later(group.pool.stop(30.0))
    assert [process.signals for process in group.reactor.processes] == [["TERM"], ["TERM"]]
    group.end(0, ProcessDone(0))
    assert stopped == []
    group.end(1, ProcessDone(0))
    assert stopped == [[None, None]]
    assert len(group.reactor.processes) == 2  # none restarted
    assert group.reactor.getDelayedCalls() == []


def test_a_worker_that_does_not_end_is_killed():
    group = Group()
    group.pool.stop(30.0)
    group.end(0, ProcessDone(0))
    group.reactor.advance(30.0 + KILL_GRACE)
    assert group.reactor.processes[1].signals == ["TERM", "KILL"]


def test_a_workers_event_is_logged_again_with_its_text_and_fields():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        event = {
            "log_format": "id={queue_id} accepted",
            "queue_id": "ABC",
            "mail_event": "accepted",
            "log_level": LogLevel.info,
            "log_namespace": "twisted_mta.maillog",
            "log_time": 1.0,
        }
        reemit(eventAsJSON(event).encode(), "worker-2")
        reemit(b"Traceback (most recent call last):", "worker-2")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    first, second = seen
    assert formatEvent(first) == "id=ABC accepted"
    assert first["mail_event"] == "accepted" and first["log_system"] == "worker-2"
    assert formatEvent(second) == "Traceback (most recent call last):"
    assert second["log_system"] == "worker-2"
