from twisted_mta.auth.throttle import MAX_DELAY, WINDOW, AuthThrottle


def test_delay_doubles_and_is_capped():
    throttle = AuthThrottle(base_delay=1.0)
    assert [throttle.delay(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert throttle.delay(50) == MAX_DELAY


def test_failures_per_address_persist_across_connections_then_decay():
    throttle = AuthThrottle(base_delay=1.0)
    assert throttle.record_failure("192.0.2.1", now=100.0) == 1
    assert throttle.record_failure("192.0.2.1", now=101.0) == 2
    assert throttle.recent_failures("192.0.2.1", now=102.0) == 2
    assert throttle.recent_failures("192.0.2.2", now=102.0) == 0
    assert throttle.recent_failures("192.0.2.1", now=101.0 + WINDOW) == 0
    assert throttle.record_failure("192.0.2.1", now=101.0 + WINDOW) == 1


def test_success_clears_the_address():
    throttle = AuthThrottle(base_delay=1.0)
    throttle.record_failure("192.0.2.1", now=0.0)
    throttle.record_success("192.0.2.1")
    assert throttle.recent_failures("192.0.2.1", now=1.0) == 0
