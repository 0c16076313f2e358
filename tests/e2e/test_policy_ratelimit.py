"""The ratelimit plugin in the real daemon: an address and a user over
their limits, from clients on their own loopback addresses (``[relay]
networks`` trusts only 127.0.0.1)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import (
    Daemon,
    eventually,
    failed_start,
    fresh_client_address,
    insecure_context,
    installed_plugins,
    make_daemon,
)

RATELIMIT = """
[relay]
networks = ["127.0.0.1/32"]

[plugins]
enabled = ["ratelimit"]
[plugins.ratelimit]
per_address = 2
per_user = 1
window = "1h"
"""
# Messages of one client before its MAIL gets 450, over all workers.
LIMIT = 12


def daemon_with(tmp_path, extra: str = RATELIMIT) -> Daemon:
    # One process: the limit over several is the last test's.
    extra += "\n[limits]\nworkers = 1\n"
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)


def send_from(daemon: Daemon, address: str, login: tuple[str, str] | None = None):
    """One message to bob: MAIL's reply (and the rest when it is a 250)."""
    listener = "submission" if login else "smtp"
    with daemon.smtp(listener, source_address=(address, 0)) as client:
        client.ehlo("client.example.org")
        if login:
            client.starttls(context=insecure_context())
            client.ehlo("client.example.org")
            client.login(*login)
        reply = client.mail(login[0] if login else "friend@remote.example")
        if reply[0] == 250:
            assert client.rcpt("bob@example.test")[0] == 250
            assert client.data(b"Subject: hello\r\n\r\nhello\r\n")[0] == 250
    return reply


def test_an_address_over_its_limit_gets_450_and_the_refusal_is_logged(tmp_path):
    stranger, other = fresh_client_address(), fresh_client_address()
    daemon = daemon_with(tmp_path).start()
    try:
        assert send_from(daemon, stranger)[0] == 250
        assert send_from(daemon, stranger)[0] == 250
        assert send_from(daemon, stranger) == (
            450,
            f"4.7.1 Too many messages from [{stranger}], try again later".encode(),
        )
        daemon.wait_for_log(rf"ratelimit: client {stranger} over 2 messages in 3600s")
        daemon.wait_for_log(
            rf"NOQUEUE: reject: MAIL from unknown\[{stranger}\]: 450 4\.7\.1 Too many messages"
        )
        assert send_from(daemon, other)[0] == 250
        # 127.0.0.1 is in [relay] networks: not limited.
        assert all(send_from(daemon, "127.0.0.1")[0] == 250 for _ in range(3))
        assert len(daemon.messages("example.test", "bob")) == 6
    finally:
        daemon.stop()


def test_a_user_over_the_limit_gets_452(tmp_path):
    address = fresh_client_address()
    login = ("alice@example.test", "alice-secret")
    daemon = daemon_with(tmp_path).start()
    try:
        assert send_from(daemon, address, login)[0] == 250
        assert send_from(daemon, fresh_client_address(), login) == (
            452,
            b"4.7.0 Too many messages from user alice@example.test, try again later",
        )
        daemon.wait_for_log(r"ratelimit: user alice@example\.test over 1 messages in 3600s")
        # Bob's login from the same address has a count of its own.
        assert send_from(daemon, address, ("bob@example.test", "bob-secret"))[0] == 250
    finally:
        daemon.stop()


def test_bad_options_stop_the_start_in_one_line(tmp_path):
    daemon = daemon_with(tmp_path, RATELIMIT.replace('"1h"', '"soon"'))
    code, problems = failed_start(daemon)
    assert code != 0
    assert problems == [
        'twistd mta: plugins.ratelimit: window: expected seconds or a duration like "5m",'
        " not 'soon'"
    ]


def test_help_plugins_lists_ratelimit():
    assert "ratelimit" in installed_plugins()


def mail_only(daemon: Daemon, address: str) -> int:
    """MAIL's reply code; nothing is sent, so nothing is counted."""
    with daemon.smtp(source_address=(address, 0)) as client:
        client.ehlo("client.example.org")
        return client.mail("friend@remote.example")[0]


def workers_that_accepted(daemon: Daemon, address: str, accepted: int) -> set[str]:
    """The workers that logged the ``accepted`` messages of ``address``
    (their lines reach the log through the main process, after the 250)."""
    line = re.compile(rf"\[(worker-\d)\] id=\w+ from=.* client=unknown\[{re.escape(address)}\]")

    def systems() -> list[str]:
        return [m.group(1) for text in list(daemon.log) if (m := line.search(text))]

    assert eventually(lambda: len(systems()) >= accepted)
    return set(systems())


def test_the_limit_holds_over_all_worker_processes(tmp_path):
    """A message counted by one worker counts in the others: the client's
    connections land on either worker, and the limit is still the client's."""
    extra = RATELIMIT.replace("per_address = 2", f"per_address = {LIMIT}")
    extra += "\n[limits]\nworkers = 2\n"
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra).start()
    stranger = fresh_client_address()
    try:
        accepted = 0
        # Connections at once, so that both workers take some.
        while accepted < LIMIT and len(workers_that_accepted(daemon, stranger, accepted)) < 2:
            batch = min(4, LIMIT - accepted)
            with ThreadPoolExecutor(batch) as pool:
                replies = list(pool.map(lambda _: send_from(daemon, stranger), range(batch)))
            assert all(code == 250 for code, _ in replies)
            accepted += batch
        assert workers_that_accepted(daemon, stranger, accepted) == {"worker-1", "worker-2"}
        while accepted < LIMIT:
            assert send_from(daemon, stranger)[0] == 250
            accepted += 1
        # Each worker counted only some of them itself: the others' reach
        # it through the main process.
        assert eventually(lambda: mail_only(daemon, stranger) == 450)
        assert [mail_only(daemon, stranger) for _ in range(6)] == [450] * 6
        assert len(daemon.messages("example.test", "bob")) == LIMIT
    finally:
        daemon.stop()
