"""The greylist policy on a fake clock, with a real sqlite file: first
tries refused, retries taken after the delay, expiry, the retry window,
client networks, auto-allow, exemptions, a restart, and its options."""

from __future__ import annotations

import ipaddress
import queue
import sqlite3
import threading
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from twisted_mta.intake.policies import installed
from twisted_mta.interfaces import PolicyContext, SessionInfo, TransactionInfo, Verdict
from twisted_mta.policies.greylist import (
    DATABASE_NAME,
    Database,
    DatabaseThread,
    Greylist,
    Settings,
    factory,
    parse_options,
)

DAY = 86400.0
TRUSTED = (ipaddress.ip_network("198.51.100.0/24"),)


def synchronous(database: Database):
    """A runner calling the database at once, in this thread."""
    return lambda method, *args: defer.maybeDeferred(getattr(database, method), *args)


class Greylisting:
    """A policy on a fake clock and a database in ``folder``."""

    def __init__(self, folder: Path, clock: task.Clock | None = None, **options) -> None:
        if clock is None:
            clock = task.Clock()
            clock.advance(1_000_000)
        self.clock = clock
        self.database = Database(folder / DATABASE_NAME)
        self.policy = Greylist(
            parse_options(options), self.clock, synchronous(self.database), TRUSTED
        )

    def ask(
        self,
        ip: str = "192.0.2.10",
        sender: str = "sender@example.org",
        recipient: str = "alice@example.test",
        listener: str = "smtp",
        user: str | None = None,
    ) -> Verdict | None:
        session = SessionInfo(ip, listener, user=user)
        transaction = TransactionInfo("QID", sender, ())
        answer = self.policy.rcpt_to(session, transaction, recipient, {})
        if not isinstance(answer, defer.Deferred):
            return answer
        results: list = []
        answer.addBoth(results.append)
        [result] = results
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def rows(self, table: str) -> int:
        with sqlite3.connect(self.database.path) as connection:
            return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.fixture
def grey(tmp_path) -> Greylisting:
    return Greylisting(tmp_path)


def greylisted(verdict: Verdict | None) -> bool:
    return verdict is not None and (verdict.kind, verdict.code) == ("tempfail", 450)


def test_a_first_try_is_refused_for_now_and_an_early_retry_too(grey):
    verdict = grey.ask()
    assert verdict == Verdict.tempfail(
        450,
        "4.7.1",
        "<alice@example.test>: Recipient address rejected: Greylisted, try again in 300 seconds",
    )
    grey.wait(100)
    assert grey.ask().text.endswith("Greylisted, try again in 200 seconds")
    grey.wait(199.5)
    assert grey.ask().text.endswith("try again in 1 seconds")


def test_a_retry_after_the_delay_passes_and_then_every_message_does(grey):
    assert greylisted(grey.ask())
    grey.wait(300)
    assert grey.ask() is None
    grey.wait(60)
    assert grey.ask() is None


def test_a_passed_triplet_is_remembered_for_expire_since_last_seen(grey):
    grey.ask()
    grey.wait(300)
    assert grey.ask() is None
    grey.wait(34 * DAY)
    assert grey.ask() is None
    grey.wait(34 * DAY)
    assert grey.ask() is None
    grey.wait(36 * DAY)
    assert greylisted(grey.ask())


def test_a_retry_after_the_retry_window_starts_over(grey):
    grey.ask()
    grey.wait(2 * DAY + 1)
    assert grey.ask().text.endswith("try again in 300 seconds")
    grey.wait(299)
    assert greylisted(grey.ask())
    grey.wait(1)
    assert grey.ask() is None


def test_the_triplet_is_the_client_network_sender_and_recipient(grey):
    grey.ask()
    grey.wait(300)
    assert greylisted(grey.ask(sender="other@example.org"))
    assert greylisted(grey.ask(recipient="bob@example.test"))
    assert greylisted(grey.ask(ip="192.0.3.10"))
    assert grey.ask(ip="192.0.2.200") is None


def test_ipv6_clients_are_grouped_by_64_and_mapped_ipv4_as_ipv4(grey):
    grey.ask(ip="2001:db8:1:2::1")
    grey.ask(ip="192.0.2.1")
    grey.wait(300)
    assert grey.ask(ip="2001:db8:1:2:ffff::9") is None
    assert greylisted(grey.ask(ip="2001:db8:1:3::1"))
    assert grey.ask(ip="::ffff:192.0.2.77") is None


def test_the_prefixes_can_be_chosen(tmp_path):
    grey = Greylisting(tmp_path, ipv4_prefix=32, ipv6_prefix=48)
    grey.ask(ip="192.0.2.1")
    grey.ask(ip="2001:db8:1:2::1")
    grey.wait(300)
    assert greylisted(grey.ask(ip="192.0.2.2"))
    assert grey.ask(ip="2001:db8:1:ffff::1") is None


def test_senders_compare_in_any_case_and_the_null_sender_is_one_sender(grey):
    grey.ask(sender="Sender@Example.ORG")
    grey.ask(sender="")
    grey.wait(300)
    assert grey.ask(sender="sender@example.org") is None
    assert grey.ask(sender="") is None
    assert grey.ask(recipient="ALICE@example.test") is None


def test_per_message_parts_of_verp_and_batv_senders_are_ignored(grey):
    grey.ask(sender="list+bounces-123-alice=example.test@lists.example.org")
    grey.ask(sender="prvs=1234abcdef=news@shop.example")
    grey.ask(sender="bounce-4711@mailer.example")
    grey.wait(300)
    assert grey.ask(sender="list+bounces-124-alice=example.test@lists.example.org") is None
    assert grey.ask(sender="prvs=9999zzzzzz=news@shop.example") is None
    assert grey.ask(sender="bounce-4712@mailer.example") is None


def test_without_normalising_each_verp_sender_is_new(tmp_path):
    grey = Greylisting(tmp_path, normalise_senders=False)
    grey.ask(sender="bounce-4711@mailer.example")
    grey.wait(300)
    assert greylisted(grey.ask(sender="bounce-4712@mailer.example"))


def test_a_network_that_retried_auto_allow_times_is_passed_at_once(grey):
    recipients = [f"user{n}@example.test" for n in range(5)]
    for recipient in recipients[:4]:
        grey.ask(recipient=recipient)
    grey.wait(300)
    for recipient in recipients[:4]:
        assert grey.ask(recipient=recipient) is None
    assert greylisted(grey.ask(recipient=recipients[4]))
    grey.wait(300)
    assert grey.ask(recipient=recipients[4]) is None
    assert grey.ask(ip="192.0.2.99", recipient="new@example.test") is None
    assert greylisted(grey.ask(ip="192.0.3.1", recipient="new@example.test"))
    grey.wait(36 * DAY)
    assert greylisted(grey.ask(recipient="newer@example.test"))


def test_auto_allow_0_never_allows_a_network(tmp_path):
    grey = Greylisting(tmp_path, auto_allow=0)
    for n in range(10):
        grey.ask(recipient=f"user{n}@example.test")
    grey.wait(300)
    for n in range(10):
        assert grey.ask(recipient=f"user{n}@example.test") is None
    assert greylisted(grey.ask(recipient="new@example.test"))


@pytest.mark.parametrize(
    "ip, listener, user, recipient",
    [
        ("198.51.100.7", "smtp", None, "alice@example.test"),
        ("203.0.113.9", "smtp", None, "alice@example.test"),
        ("::ffff:203.0.113.9", "smtp", None, "alice@example.test"),
        ("192.0.2.10", "submission", "alice@example.test", "far@remote.example"),
        ("127.0.0.1", "local", "alice", "far@remote.example"),
        ("192.0.2.10", "smtp", None, "postmaster@example.test"),
        ("192.0.2.10", "smtp", None, "Anyone@Exempt.Example"),
    ],
    ids=["trusted", "exempt-net", "exempt-mapped", "authenticated", "local", "address", "domain"],
)
def test_exempt_mail_is_not_greylisted_nor_recorded(tmp_path, ip, listener, user, recipient):
    grey = Greylisting(
        tmp_path,
        exempt_networks=["203.0.113.0/24"],
        exempt_recipients=["postmaster@example.test", "@exempt.example"],
    )
    assert grey.ask(ip=ip, listener=listener, user=user, recipient=recipient) is None
    assert not grey.database.path.exists()


def test_a_new_policy_on_the_same_file_remembers(tmp_path):
    first = Greylisting(tmp_path / "state")
    first.ask(recipient="waiting@example.test")
    first.ask(recipient="passed@example.test")
    first.wait(300)
    assert first.ask(recipient="passed@example.test") is None
    first.database.close()

    second = Greylisting(tmp_path / "state", clock=first.clock)
    assert second.ask(recipient="waiting@example.test") is None
    assert second.ask(recipient="passed@example.test") is None
    assert greylisted(second.ask(recipient="new@example.test"))
    with sqlite3.connect(second.database.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_expired_rows_are_removed(grey):
    grey.ask(recipient="passed@example.test")
    grey.wait(300)
    grey.ask(recipient="passed@example.test")
    grey.ask(recipient="never-retried@example.test")
    assert (grey.rows("triplets"), grey.rows("clients")) == (2, 1)
    grey.wait(3 * DAY)
    grey.ask(recipient="fresh@example.test")
    assert grey.rows("triplets") == 2
    grey.wait(33 * DAY)
    grey.ask(recipient="fresh@example.test")
    assert (grey.rows("triplets"), grey.rows("clients")) == (1, 0)


class ThreadedClock(task.Clock):
    """A fake reactor whose ``callFromThread`` queues the call for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()
        self.triggers: list = []

    def callFromThread(self, function, *args, **kwargs) -> None:
        self.from_threads.put((function, args, kwargs))

    def addSystemEventTrigger(self, phase, event, function, *args) -> None:
        self.triggers.append((phase, event, function))

    def deliver(self) -> None:
        function, args, kwargs = self.from_threads.get(timeout=10)
        function(*args, **kwargs)


def test_the_database_runs_in_a_thread_of_its_own_stopped_at_shutdown(tmp_path):
    reactor = ThreadedClock()
    threads: list[int] = []

    class Recording(Database):
        def check(self, *args):
            threads.append(threading.get_ident())
            return super().check(*args)

    worker = DatabaseThread(reactor, Recording(tmp_path / DATABASE_NAME))
    policy = Greylist(Settings(), reactor, worker.run)
    session, transaction = SessionInfo("192.0.2.1", "smtp"), TransactionInfo("Q", "s@x.org", ())
    results: list = []
    policy.rcpt_to(session, transaction, "a@example.test", {}).addBoth(results.append)
    reactor.deliver()
    assert greylisted(results[0])
    assert threads and threads[0] != threading.get_ident()
    [(phase, event, stop)] = reactor.triggers
    assert (phase, event) == ("during", "shutdown")
    stop()
    assert worker.database._connection is None


def test_the_factory_is_installed_and_touches_no_file(tmp_path):
    installed_factory = installed()["greylist"]
    assert installed_factory is factory
    context = PolicyContext(task.Clock(), "mx.example.test", tmp_path / "greylist", None)
    policy = installed_factory.policy({"delay": "1s"}, context)
    assert policy.settings.delay == 1.0
    assert not (tmp_path / "greylist").exists()


def test_defaults_are_postgrey_like():
    assert parse_options({}) == Settings(
        delay=300.0, retry_window=2 * DAY, expire=35 * DAY, auto_allow=5,
        ipv4_prefix=24, ipv6_prefix=64, normalise_senders=True,
    )


@pytest.mark.parametrize(
    "value, seconds", [(30, 30.0), (1.5, 1.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
                       ("1d", DAY), ("45", 45.0)]
)
def test_durations_are_seconds_or_strings_with_a_unit(value, seconds):
    assert parse_options({"delay": value}).delay == seconds


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"dealy": 5}, "dealy: unknown option"),
        ({"delay": "soon"}, "delay: expected seconds"),
        ({"delay": 0}, "delay: expected a duration of more than 0"),
        ({"delay": True}, "delay: expected seconds"),
        ({"expire": -1}, "expire: expected a finite duration"),
        ({"delay": "3d"}, "retry_window: must be longer than delay"),
        ({"auto_allow": -1}, "auto_allow: expected a whole number of 0 or more"),
        ({"auto_allow": "5"}, "auto_allow: expected a whole number"),
        ({"ipv4_prefix": 33}, "ipv4_prefix: expected a whole number from 0 to 32"),
        ({"ipv6_prefix": 129}, "ipv6_prefix: expected a whole number from 0 to 128"),
        ({"normalise_senders": "yes"}, "normalise_senders: expected true or false"),
        ({"exempt_networks": ["nonsense"]}, "exempt_networks: not a network: 'nonsense'"),
        ({"exempt_networks": "10.0.0.0/8"}, "exempt_networks: expected a list of strings"),
        ({"exempt_recipients": ["nobody"]}, "exempt_recipients: expected an address or"),
    ],
)
def test_bad_options_are_a_value_error_naming_the_option(options, problem):
    with pytest.raises(ValueError) as raised:
        parse_options(options)
    assert str(raised.value).startswith(problem)
