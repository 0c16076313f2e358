"""The policy chain in memory: order, verdicts, headers, failures and
timeouts on a fake clock."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer, task

from twisted_mta.intake import policies as chains
from twisted_mta.intake.acceptance import Session
from twisted_mta.intake.policies import POLICY_FAILURE, Plugin, PolicyChain, session_info
from twisted_mta.interfaces import (
    AuthResult,
    MessageInfo,
    PolicyContext,
    TransactionInfo,
    Verdict,
)
from twisted_mta.policies import BuiltinFactory, from_elsewhere

SESSION = session_info(Session("smtp", "192.0.2.7"))


class Answer:
    """A policy whose ``mail_from`` gives ``answer`` and records the call."""

    def __init__(self, answer, calls: list, name: str) -> None:
        self.answer, self.calls, self.name = answer, calls, name

    def mail_from(self, session, sender, params):
        self.calls.append(self.name)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def chain(*answers, on_error="tempfail", clock=None) -> tuple[PolicyChain, list]:
    calls: list = []
    plugins = [
        Plugin(f"p{n}", Answer(answer, calls, f"p{n}"), on_error)
        for n, answer in enumerate(answers)
    ]
    return PolicyChain(plugins, 5.0, clock or task.Clock()), calls


def outcome(chain_: PolicyChain):
    results: list = []
    chain_.run("mail_from", SESSION, "s@example.org", {}).addBoth(results.append)
    return results


def test_policies_are_asked_in_order_until_one_refuses():
    refusal = Verdict.reject(550, "5.7.1", "no")
    policies, calls = chain(None, refusal, None)
    [result] = outcome(policies)
    assert result.refusal == refusal and calls == ["p0", "p1"]


def test_accept_ends_the_round_with_a_yes():
    policies, calls = chain(Verdict.accept(), Verdict.reject())
    [result] = outcome(policies)
    assert result.refusal is None and calls == ["p0"]


def test_proceed_collects_headers_in_order():
    policies, _ = chain(Verdict.proceed([("A", "1")]), None, Verdict.proceed([("B", "2")]))
    [result] = outcome(policies)
    assert result.refusal is None and result.headers == (("A", "1"), ("B", "2"))


def test_a_policy_without_the_hook_is_not_asked():
    policies = PolicyChain([Plugin("none", object())], 5.0, task.Clock())
    assert not policies.has("mail_from")
    [result] = outcome(policies)
    assert result.refusal is None


@pytest.mark.parametrize("answer", [RuntimeError("broken"), "yes", 550])
def test_a_hook_that_raises_or_answers_nonsense_is_a_temporary_failure(answer, logged):
    policies, _ = chain(answer, Verdict.reject())
    [result] = outcome(policies)
    assert result.refusal == POLICY_FAILURE
    assert (POLICY_FAILURE.code, POLICY_FAILURE.enhanced) == (451, "4.3.0")
    assert any(line.startswith("plugin p0: mail_from failed: ") for line in logged)


def test_with_on_error_accept_a_failing_hook_is_passed_over(logged):
    refusal = Verdict.reject()
    policies, calls = chain(RuntimeError("broken"), refusal, on_error="accept")
    [result] = outcome(policies)
    assert result.refusal == refusal and calls == ["p0", "p1"]
    assert any("passed over (on_error = accept)" in line for line in logged)


def test_a_hook_past_the_timeout_is_a_temporary_failure_and_is_cancelled(logged):
    clock = task.Clock()
    pending: defer.Deferred = defer.Deferred()
    policies, _ = chain(pending, clock=clock)
    results = outcome(policies)
    assert results == []
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)
    assert results[0].refusal == POLICY_FAILURE
    assert pending.called  # cancelled, so whatever the plugin holds is let go
    assert any("no answer within 5s" in line for line in logged)


def test_a_hook_answering_in_time_is_waited_for():
    clock = task.Clock()
    pending: defer.Deferred = defer.Deferred()
    policies, _ = chain(pending, clock=clock)
    results = outcome(policies)
    clock.advance(4.0)
    pending.callback(Verdict.tempfail(450, "4.7.1", "later"))
    assert results[0].refusal == Verdict.tempfail(450, "4.7.1", "later")


def test_the_session_view():
    session = Session("submission", "198.51.100.1", helo=b"client.example",
                      tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384", user="alice@example.test")
    info = session_info(session)
    assert (info.client_ip, info.listener, info.helo, info.user) == (
        "198.51.100.1", "submission", "client.example", "alice@example.test"
    )
    assert (info.tls_version, info.tls_cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert session_info(Session("sendmail", "127.0.0.1", local=True)).listener == "local"


@pytest.mark.parametrize(
    "headers", [[("Bad Name", "x")], [("X-Ok", "line\rinjected")], [("To:", "x")]]
)
def test_headers_that_would_break_the_message_are_a_temporary_failure(headers, logged):
    policies, _ = chain(Verdict.proceed(headers))
    [result] = outcome(policies)
    assert result.refusal == POLICY_FAILURE
    assert any("cannot be written" in line for line in logged)


class Judge:
    """A ``message`` hook that records the results it was shown."""

    def __init__(self, answer, seen: list) -> None:
        self.answer, self.seen = answer, seen

    def message(self, session, transaction, message):
        self.seen.append(message.results)
        return self.answer


def test_results_are_collected_and_shown_to_the_policies_after():
    spf = AuthResult("spf", "pass", (("smtp.mailfrom", "example.org"),))
    dkim = AuthResult("dkim", "none")
    seen: list = []
    plugins = [
        Plugin("a", Judge(Verdict.proceed([("X-A", "1")], results=[spf]), seen)),
        Plugin("b", Judge(None, seen)),
        Plugin("c", Judge(Verdict.proceed(results=[dkim]), seen)),
        Plugin("d", Judge(Verdict.proceed(), seen)),
    ]
    transaction = TransactionInfo("Q1", "s@example.org", ("r@example.test",))
    results: list = []
    PolicyChain(plugins, 5.0, task.Clock()).run(
        "message", SESSION, transaction, MessageInfo(None, 0, None)
    ).addCallback(results.append)
    assert seen == [(), (spf,), (spf,), (spf, dkim)]
    assert results[0].results == (spf, dkim) and results[0].headers == (("X-A", "1"),)


@pytest.fixture
def factories(monkeypatch):
    made = {
        name: BuiltinFactory(name, name, lambda options, context: object(), requires)
        for name, requires in [("spf", ()), ("dkim", ()), ("dmarc", ("spf", "dkim"))]
    }
    monkeypatch.setattr(chains, "installed", lambda: made)
    return made


def load(enabled, tmp_path):
    context = PolicyContext(task.Clock(), "mx.example.test", tmp_path, None)
    return chains.load_policies(enabled, {}, 5.0, context)


def test_a_plugin_loads_after_those_it_requires(factories, tmp_path):
    loaded = load(["spf", "dkim", "dmarc"], tmp_path)
    assert [plugin.name for plugin in loaded.plugins] == ["spf", "dkim", "dmarc"]


@pytest.mark.parametrize(
    "enabled, missing",
    [(["dmarc"], "spf and dkim"), (["dkim", "dmarc", "spf"], "spf"), (["spf", "dmarc"], "dkim")],
)
def test_a_plugin_without_those_it_requires_before_it_stops_the_start(
    factories, tmp_path, enabled, missing
):
    with pytest.raises(chains.PluginError) as raised:
        load(enabled, tmp_path)
    assert str(raised.value) == f"plugins.enabled: dmarc needs {missing} enabled before it"


@pytest.mark.parametrize(
    "listener, ip, user, expected",
    [
        ("smtp", "192.0.2.1", None, True),
        ("smtp", "::ffff:192.0.2.1", None, True),
        ("smtp", "10.1.2.3", None, False),
        ("smtp", "::ffff:10.1.2.3", None, False),
        ("smtp", "192.0.2.1", "alice@example.test", False),
        ("submission", "192.0.2.1", None, False),
        ("local", "127.0.0.1", "alice", False),
        ("smtp", "unix-socket", None, False),
    ],
)
def test_mail_from_elsewhere_is_what_the_authentication_checks_look_at(
    listener, ip, user, expected
):
    session = session_info(Session(listener, ip, user=user))
    assert from_elsewhere(session, [ipaddress.ip_network("10.0.0.0/8")]) is expected
