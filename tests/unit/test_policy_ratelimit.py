"""The ratelimit policy in memory, on a fake clock."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.plugin import IPlugin

from twisted_mta.durations import option_seconds
from twisted_mta.interfaces import (
    NO_PEERS,
    IMailPolicy,
    IMailPolicyFactory,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
)
from twisted_mta.policies.ratelimit import factory

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)
TRANSACTION = TransactionInfo("Q1", "sender@remote.example", ("rcpt@example.test",))
STRANGER = SessionInfo(client_ip="192.0.2.7", listener="smtp")
ALICE = SessionInfo(client_ip="192.0.2.8", listener="submission", user="alice@example.test")


class Peers:
    """Two processes' worth of peers: what one tells, the other hears."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []
        self.listeners: dict[str, object] = {}

    def tell(self, topic: str, payload: str) -> None:
        self.told.append((topic, payload))

    def listen(self, topic: str, heard) -> None:
        self.listeners[topic] = heard


def make(options, clock=None, peers=NO_PEERS):
    context = PolicyContext(
        reactor=clock or task.Clock(),
        hostname="mx.example.test",
        state_dir=Path("/nonexistent"),
        resolver=None,
        trusted_networks=TRUSTED,
        peers=peers,
    )
    return factory.policy(options, context)


def send(policy, session):
    """One transaction: MAIL's verdict; the message counted if accepted."""
    verdict = policy.mail_from(session, "sender@remote.example", {})
    if verdict is None:
        policy.message(session, TRANSACTION, None)
    return verdict


def test_the_factory_is_a_plugin_named_ratelimit():
    assert IPlugin.providedBy(factory) and IMailPolicyFactory.providedBy(factory)
    assert factory.name == "ratelimit" and "\n" not in factory.description
    assert IMailPolicy.providedBy(make({}))


def test_an_address_over_its_limit_gets_450_4_7_1(logged):
    policy = make({"per_address": 3, "window": "1h"})
    assert [send(policy, STRANGER) for _ in range(3)] == [None] * 3
    verdict = send(policy, STRANGER)
    assert (verdict.kind, verdict.code, verdict.enhanced) == ("tempfail", 450, "4.7.1")
    assert verdict.text == "Too many messages from [192.0.2.7], try again later"
    assert "ratelimit: client 192.0.2.7 over 3 messages in 3600s; MAIL refused" in logged
    other = SessionInfo(client_ip="192.0.2.9", listener="smtp")
    assert send(policy, other) is None


def test_a_user_over_the_limit_gets_452_4_7_0_from_any_address(logged):
    policy = make({"per_user": 2, "per_address": 1})
    assert send(policy, ALICE) is None
    elsewhere = SessionInfo(
        client_ip="198.51.100.1", listener="submissions", user="Alice@example.test"
    )
    assert send(policy, elsewhere) is None
    verdict = send(policy, ALICE)
    assert (verdict.code, verdict.enhanced) == (452, "4.7.0")
    assert verdict.text == "Too many messages from user alice@example.test, try again later"
    assert "ratelimit: user alice@example.test over 2 messages in 3600s; MAIL refused" in logged
    # An authenticated user's mail does not count against the address.
    stranger_there = SessionInfo(client_ip="192.0.2.8", listener="smtp")
    assert send(policy, stranger_there) is None


def test_what_a_worker_counts_is_told_and_what_the_others_count_is_counted():
    peers = Peers()
    policy = make({"per_address": 3, "per_user": 2}, peers=peers)
    assert send(policy, STRANGER) is None and send(policy, ALICE) is None
    assert peers.told == [
        ("ratelimit", "client 192.0.2.7"),
        ("ratelimit", "user alice@example.test"),
    ]
    heard = peers.listeners["ratelimit"]
    heard("client 192.0.2.7")
    heard("client 192.0.2.7")
    assert send(policy, STRANGER).code == 450  # 1 here and 2 elsewhere
    heard("user alice@example.test")
    assert send(policy, ALICE).code == 452
    assert len(peers.told) == 2  # what was refused is not counted, nor told
    heard("garbage")  # ignored, as is a user without a name
    heard("user ")
    assert send(policy, SessionInfo(client_ip="192.0.2.99", listener="smtp")) is None


def test_the_window_slides():
    clock = task.Clock()
    policy = make({"per_address": 2, "window": "10m"}, clock)
    send(policy, STRANGER)
    clock.advance(300)
    send(policy, STRANGER)
    assert send(policy, STRANGER) is not None
    clock.advance(299)
    assert send(policy, STRANGER) is not None
    clock.advance(1)  # the first message is now 600 s old
    assert send(policy, STRANGER) is None
    assert send(policy, STRANGER) is not None


def test_refused_or_unfinished_transactions_do_not_count():
    policy = make({"per_address": 1})
    for _ in range(5):
        assert policy.mail_from(STRANGER, "sender@remote.example", {}) is None
    policy.message(STRANGER, TRANSACTION, None)
    assert policy.mail_from(STRANGER, "sender@remote.example", {}) is not None


@pytest.mark.parametrize(
    "session",
    [
        SessionInfo(client_ip="10.1.2.3", listener="smtp"),
        SessionInfo(client_ip="::ffff:10.1.2.3", listener="smtp"),
        SessionInfo(client_ip="127.0.0.1", listener="local", user="alice"),
    ],
)
def test_trusted_networks_and_local_submission_are_not_limited(session):
    policy = make({"per_user": 1, "per_address": 1})
    assert [send(policy, session) for _ in range(5)] == [None] * 5


def test_a_limit_of_0_or_absent_is_no_limit():
    policy = make({"per_user": 0})
    assert [send(policy, ALICE) for _ in range(5)] == [None] * 5
    assert [send(policy, STRANGER) for _ in range(5)] == [None] * 5


def test_idle_keys_are_forgotten():
    clock = task.Clock()
    policy = make({"per_address": 5, "window": 60}, clock)
    for n in range(100):
        send(policy, SessionInfo(client_ip=f"192.0.2.{n}", listener="smtp"))
    assert len(policy.addresses) == 100
    clock.advance(61)
    send(policy, STRANGER)
    assert len(policy.addresses) == 1


@pytest.mark.parametrize(
    "value, seconds",
    [(30, 30), ("30", 30), ("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), (1.5, 1.5)],
)
def test_windows_take_the_config_duration_forms(value, seconds):
    assert option_seconds(value, "window", positive=True) == seconds


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"per_user": -1}, "per_user: expected a number of messages (0 for no limit)"),
        ({"per_user": "100"}, "per_user: expected a number of messages"),
        ({"per_address": True}, "per_address: expected a number of messages"),
        ({"per_address": 1.5}, "per_address: expected a number of messages"),
        ({"window": "soon"}, 'window: expected seconds or a duration like "5m"'),
        ({"window": 0}, "window: expected a duration of more than 0"),
        ({"window": "1y"}, "window: expected seconds or a duration"),
        ({"per_users": 5}, "per_users: unknown option (known: per_user, per_address, window)"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, problem):
    with pytest.raises(ValueError) as caught:
        make(options)
    assert str(caught.value).startswith(problem)
