"""Idle relay sessions kept by destination, on a fake clock."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from twisted_mta.relay.pool import IDLE_SECONDS, IdleSessions


class Session:
    def __init__(self, name: str) -> None:
        self.name = name
        self.usable = True
        self.closed = False

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def test_a_session_is_reused_for_the_same_destination_only():
    pool = IdleSessions(Clock(), per_destination=5)
    session = Session("a")
    pool.check_in("smarthost", session)
    assert pool.check_out("example.org") is None
    assert pool.check_out("smarthost") is session
    assert pool.check_out("smarthost") is None
    assert not session.closed


def test_as_many_as_run_at_once_are_kept_and_more_are_closed():
    pool = IdleSessions(Clock(), per_destination=2)
    sessions = [Session(str(number)) for number in range(3)]
    for session in sessions:
        pool.check_in("smarthost", session)
    assert [session.closed for session in sessions] == [False, False, True]
    assert {pool.check_out("smarthost"), pool.check_out("smarthost")} == set(sessions[:2])


def test_an_idle_session_is_closed_after_its_time():
    clock = Clock()
    pool = IdleSessions(clock, per_destination=5)
    first, second = Session("first"), Session("second")
    pool.check_in("smarthost", first)
    clock.advance(IDLE_SECONDS / 2)
    pool.check_in("smarthost", second)
    clock.advance(IDLE_SECONDS / 2)
    assert first.closed and not second.closed
    assert pool.check_out("smarthost") is second
    clock.advance(IDLE_SECONDS)
    assert not second.closed  # in use: no longer the pool's
    assert clock.getDelayedCalls() == []


def test_a_session_that_cannot_carry_another_message_is_closed_not_kept():
    pool = IdleSessions(Clock(), per_destination=5)
    broken = Session("broken")
    broken.usable = False
    pool.check_in("smarthost", broken)
    assert broken.closed and pool.check_out("smarthost") is None
    dropped = Session("dropped")
    pool.check_in("smarthost", dropped)
    dropped.usable = False  # the server closed it while idle
    assert pool.check_out("smarthost") is None and dropped.closed


def test_closing_all_quits_every_idle_session():
    clock = Clock()
    pool = IdleSessions(clock, per_destination=5)
    sessions = [Session("a"), Session("b")]
    pool.check_in("one", sessions[0])
    pool.check_in("two", sessions[1])
    pool.close_all()
    assert all(session.closed for session in sessions)
    assert clock.getDelayedCalls() == []
