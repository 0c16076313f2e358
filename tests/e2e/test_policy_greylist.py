"""The built-in greylist plugin in the real daemon: a new client is told to
come back, its retry after the delay is delivered, a restart in between
forgets nothing, and authenticated submissions are not greylisted."""

from __future__ import annotations

import time

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import (
    Daemon,
    failed_start,
    fresh_client_address,
    installed_plugins,
    make_daemon,
)

# No trusted networks: the test clients on loopback are strangers.
GREYLIST = """
[plugins]
enabled = ["greylist"]
[plugins.greylist]
delay = "1s"
[relay]
networks = []
"""
DELAY = 1.0


def attempt(daemon: Daemon, source: str, subject: str) -> tuple[int, bytes]:
    """One delivery to alice from ``source``: the RCPT reply, and the
    message sent if RCPT was accepted."""
    with daemon.smtp(source_address=(source, 0)) as client:
        client.ehlo("mail.client.example")
        assert client.mail("Friend@Remote.Example")[0] == 250
        reply = client.rcpt("alice@example.test")
        if reply[0] == 250:
            message = f"Subject: {subject}\r\n\r\nhello\r\n".encode()
            assert client.data(message)[0] == 250
    return reply


def test_a_new_client_is_greylisted_and_its_retry_delivered_across_a_restart(tmp_path):
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=GREYLIST)
    source = fresh_client_address()
    daemon.start()
    try:
        code, text = attempt(daemon, source, "first")
        assert code == 450
        assert text == (
            b"4.7.1 <alice@example.test>: Recipient address rejected: Greylisted,"
            b" try again in 1 seconds"
        )
        assert attempt(daemon, source, "too early")[0] == 450
        daemon.wait_for_log(r"NOQUEUE: reject: RCPT from .*: 450 4\.7\.1")
    finally:
        daemon.stop()
    assert (daemon.spool / "plugins" / "greylist" / "greylist.sqlite3").is_file()

    time.sleep(DELAY)
    daemon.start()
    try:
        assert attempt(daemon, source, "retried")[0] == 250
        assert attempt(daemon, source, "and again")[0] == 250
        assert daemon.wait_for(lambda: len(daemon.messages("example.test", "alice")) == 2)
        subjects = [m.split(b"Subject: ")[1].split(b"\n")[0] for m in
                    daemon.messages("example.test", "alice")]
        assert sorted(subjects) == [b"and again", b"retried"]
    finally:
        daemon.stop()


def test_an_authenticated_submission_is_not_greylisted(tmp_path):
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=GREYLIST)
    daemon.start()
    try:
        with daemon.smtp("submissions") as client:
            client.ehlo("laptop.example")
            assert client.login("alice@example.test", "alice-secret")[0] == 235
            assert client.mail("alice@example.test")[0] == 250
            assert client.rcpt("bob@example.test")[0] == 250
            assert client.data(b"Subject: at once\r\n\r\nhello\r\n")[0] == 250
        assert daemon.wait_for(lambda: daemon.messages("example.test", "bob"))
    finally:
        daemon.stop()


def test_help_plugins_lists_greylist():
    assert "greylist" in installed_plugins()


def test_a_bad_option_stops_the_start_naming_it(tmp_path):
    extra = GREYLIST.replace('delay = "1s"', 'delay = "soon"')
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)
    code, problems = failed_start(daemon)
    assert code != 0
    assert problems[0].startswith("twistd mta: plugins.greylist: delay: expected seconds")
