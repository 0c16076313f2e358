"""The AUTH throttle in memory: delays, the block, the share of checks, the
pool and withdrawn checks, on a ``task.Clock``."""

from collections import deque

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from twisted_mta.auth.throttle import (
    CHECKS,
    MAX_DELAY,
    PER_ADDRESS,
    WINDOW,
    AuthThrottle,
    Refusal,
)

IP = "192.0.2.1"


def test_delay_doubles_and_is_capped():
    throttle = AuthThrottle(base_delay=1.0)
    assert [throttle.delay(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert throttle.delay(50) == MAX_DELAY


def fail(throttle: AuthThrottle, ip: str, now: float) -> float:
    throttle.begin(ip, now)
    delay = throttle.checked(ip, True, now)
    throttle.end(ip)
    return delay


def test_each_failure_counts_for_the_window_across_connections():
    throttle = AuthThrottle(base_delay=1.0)
    fail(throttle, IP, now=100.0)
    fail(throttle, IP, now=200.0)
    assert throttle.recent_failures(IP, now=300.0) == 2
    assert throttle.recent_failures("192.0.2.2", now=300.0) == 0
    assert throttle.recent_failures(IP, now=100.0 + WINDOW) == 1
    assert throttle.recent_failures(IP, now=200.0 + WINDOW) == 0


def test_a_success_keeps_the_failures_and_waits_like_a_failure():
    throttle = AuthThrottle(base_delay=1.0)
    assert fail(throttle, IP, now=0.0) == 1.0
    assert fail(throttle, IP, now=1.0) == 2.0
    throttle.begin(IP, 2.0)
    assert throttle.checked(IP, False, 2.0) == 4.0
    throttle.end(IP)
    assert throttle.recent_failures(IP, now=3.0) == 2
    assert fail(throttle, IP, now=3.0) == 4.0


def test_a_clean_address_gets_a_success_at_once():
    throttle = AuthThrottle(base_delay=1.0)
    throttle.begin(IP, 0.0)
    assert throttle.checked(IP, False, 0.0) == 0.0
    throttle.end(IP)
    assert throttle.refusal(IP, 0.0) is None


def test_the_connections_own_failures_count_too():
    throttle = AuthThrottle(base_delay=1.0)
    throttle.begin(IP, 0.0)
    assert throttle.checked(IP, True, 0.0, session_failures=3) == 8.0


def test_blocked_after_max_failures_until_they_age():
    throttle = AuthThrottle(base_delay=1.0, max_failures=3)
    for second in range(3):
        assert throttle.refusal(IP, second) is None
        fail(throttle, IP, now=second)
    assert throttle.refusal(IP, 10.0) is Refusal.BLOCKED
    assert throttle.refusal("192.0.2.2", 10.0) is None
    assert throttle.refusal(IP, WINDOW) is None


def test_a_block_is_news_once_until_the_next_failure():
    throttle = AuthThrottle(base_delay=1.0, max_failures=1)
    fail(throttle, IP, now=0.0)
    assert [throttle.block_is_news(IP) for _ in range(3)] == [True, False, False]
    fail(throttle, IP, now=WINDOW)
    assert throttle.block_is_news(IP)


def test_checks_under_way_count_towards_the_block():
    throttle = AuthThrottle(base_delay=1.0, max_failures=3)
    fail(throttle, IP, now=0.0)
    fail(throttle, IP, now=0.0)
    throttle.begin(IP, 1.0)
    assert throttle.refusal(IP, 1.0) is Refusal.BLOCKED
    throttle.checked(IP, False, 1.0)
    assert throttle.refusal(IP, 1.0) is None


def test_an_address_that_failed_has_at_most_its_share_of_attempts():
    throttle = AuthThrottle(base_delay=1.0)
    fail(throttle, IP, now=0.0)
    for _ in range(PER_ADDRESS):
        throttle.begin(IP, 0.0)
    assert throttle.refusal(IP, 0.0) is Refusal.BUSY
    throttle.checked(IP, False, 0.0)
    assert throttle.refusal(IP, 0.0) is Refusal.BUSY, "held until its answer is due"
    throttle.end(IP)
    assert throttle.refusal(IP, 0.0) is None


# -- attempts: the pool, the answer delay, withdrawal ----------------------


class Checks:
    """Password checks that finish when the test says so."""

    def __init__(self) -> None:
        self.started: deque[defer.Deferred] = deque()

    def check(self) -> defer.Deferred:
        d = defer.Deferred()
        self.started.append(d)
        return d

    def finish(self, result=None) -> None:
        self.started.popleft().callback(result)

    def refuse(self) -> None:
        self.started.popleft().errback(UnauthorizedLogin())


def withdraw(d: defer.Deferred) -> None:
    """The client hangs up: the session cancels its attempt and forgets it."""
    d.addErrback(lambda failure: failure.trap(defer.CancelledError))
    d.cancel()


def outcomes(d: defer.Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_a_failure_is_answered_after_its_delay_and_a_success_after_the_same():
    clock, checks = task.Clock(), Checks()
    throttle = AuthThrottle(base_delay=1.0)
    failure = outcomes(throttle.attempt(IP, checks.check, clock))
    checks.refuse()
    assert failure == []
    clock.advance(1.0)
    assert failure[0].check(UnauthorizedLogin)
    success = outcomes(throttle.attempt(IP, checks.check, clock))
    checks.finish("avatar")
    clock.advance(1.99)
    assert success == []
    clock.advance(0.01)
    assert success == ["avatar"]


def test_at_most_CHECKS_run_at_once_and_the_rest_wait_in_turn():
    clock, checks = task.Clock(), Checks()
    throttle = AuthThrottle(base_delay=1.0)
    answers = [outcomes(throttle.attempt(f"192.0.2.{n}", checks.check, clock)) for n in range(5)]
    assert len(checks.started) == CHECKS
    checks.finish("a")
    clock.advance(0)
    assert answers[0] == ["a"]
    assert len(checks.started) == CHECKS


def test_an_address_without_failures_may_log_in_many_at_once():
    throttle = AuthThrottle(base_delay=1.0)
    for _ in range(PER_ADDRESS * 3):
        throttle.begin(IP, 0.0)
    assert throttle.refusal(IP, 0.0) is None


def test_a_waiting_check_withdrawn_never_runs_and_frees_its_place():
    clock, checks = task.Clock(), Checks()
    throttle = AuthThrottle(base_delay=1.0)
    fail(throttle, IP, now=0.0)
    for n in range(CHECKS):
        throttle.attempt(f"192.0.2.{n + 10}", checks.check, clock)
    waiting = throttle.attempt(IP, checks.check, clock)
    assert throttle.refusal(IP, 0.0) is None
    throttle.attempt(IP, checks.check, clock)
    assert throttle.refusal(IP, 0.0) is Refusal.BUSY
    withdraw(waiting)
    assert throttle.refusal(IP, 0.0) is None
    for _ in range(CHECKS):
        checks.finish()
    assert len(checks.started) == 1, "only the attempt still wanted ran"


def test_a_started_check_withdrawn_still_counts_and_holds_its_place():
    clock, checks = task.Clock(), Checks()
    throttle = AuthThrottle(base_delay=1.0)
    hung_up = outcomes(throttle.attempt(IP, checks.check, clock))
    hung_up_d = throttle.attempt(IP, checks.check, clock)
    withdraw(hung_up_d)
    checks.refuse()
    checks.refuse()
    assert throttle.recent_failures(IP, 0.0) == 2
    assert throttle.refusal(IP, 0.0) is Refusal.BUSY
    clock.advance(2.0)
    assert hung_up[0].check(UnauthorizedLogin)
    assert throttle.refusal(IP, clock.seconds()) is None


def test_hanging_up_does_not_speed_up_guessing():
    """A client that hangs up as soon as it has sent each guess, over as
    many connections as it likes, for an hour: never more than
    max_failures checks in any 15 minutes, none after the block."""
    clock = task.Clock()
    throttle = AuthThrottle(base_delay=1.0, max_failures=10)
    checked_at: list[float] = []

    def guess() -> defer.Deferred:
        checked_at.append(clock.seconds())
        return defer.fail(UnauthorizedLogin())

    while clock.seconds() < 3600:
        for _ in range(20):
            if throttle.refusal(IP, clock.seconds()) is None:
                withdraw(throttle.attempt(IP, guess, clock))
        clock.advance(0.1)
    assert checked_at
    for start in checked_at:
        in_window = [t for t in checked_at if start <= t < start + WINDOW]
        assert len(in_window) <= 10
    per_minute = max(sum(start <= t < start + 60 for t in checked_at) for start in checked_at)
    print(f"hang-up guesser, one hour: {len(checked_at)} checks, at most {per_minute} in a minute")
    assert per_minute <= 10


@pytest.mark.parametrize("hang_up", [False, True])
def test_attempt_cancelled_during_its_delay_is_not_answered(hang_up):
    clock, checks = task.Clock(), Checks()
    throttle = AuthThrottle(base_delay=1.0)
    d = throttle.attempt(IP, checks.check, clock)
    seen = outcomes(d)
    checks.refuse()
    if hang_up:
        d.cancel()
        assert seen[0].check(defer.CancelledError)
    clock.advance(1.0)
    assert len(seen) == 1
    assert throttle.refusal(IP, clock.seconds()) is None
