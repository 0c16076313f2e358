"""The dmarc policy plugin against a resolver in memory and a fake clock."""

from __future__ import annotations

import email.parser
import email.policy
import io
import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet import defer, task

from tests.helpers.fake_resolver import FakeResolver
from twisted_mta.intake.policies import PluginError, load_policies
from twisted_mta.interfaces import (
    AuthResult,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
)
from twisted_mta.policies.dmarc import DMARCPolicy, factory

ZONES = {
    "_dmarc.none.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.quarantine.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.reject.example": [("TXT", "v=DMARC1; p=reject; sp=quarantine; aspf=r")],
    "_dmarc.sampled.example": [("TXT", "v=DMARC1; p=reject; pct=25")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
    "_dmarc.own.reject.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.broken.example": [("TXT", "v=DMARC1; p=reject; pct=150")],
    "_dmarc.twice.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.other.example": [("TXT", "v=spf1 -all"), ("TXT", "v=DMARC1; p=reject")],
}
FAILING = [("_dmarc.servfail.example", "TXT"), ("_dmarc.sub.servfail.example", "TXT")]


def context(resolver, clock=None) -> PolicyContext:
    return PolicyContext(
        reactor=clock or task.Clock(),
        hostname="mx.example.test",
        state_dir=Path("/nonexistent"),
        resolver=resolver,
        trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )


def policy(options=None, zones=ZONES, clock=None):
    return factory.policy(options or {}, context(FakeResolver(zones, failing=FAILING), clock))


def session(ip="192.0.2.10", listener="smtp", user=None):
    return SessionInfo(client_ip=ip, listener=listener, helo="mail.client.example", user=user)


def message(from_="user@reject.example", results=()):
    raw = (f"From: {from_}\n" if from_ is not None else "") + "Subject: hi\n\nbody\n"
    data = raw.encode()
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    return MessageInfo(headers, len(data), lambda: io.BytesIO(data), tuple(results))


def spf(result, domain):
    return AuthResult("spf", result, (("smtp.mailfrom", domain),))


def dkim(result, domain, selector="s1"):
    return AuthResult("dkim", result, (("header.d", domain), ("header.s", selector)))


TRANSACTION = TransactionInfo("Q1", "bounce@reject.example", ("rcpt@example.test",))


def verdict(checker, info, client=None):
    answer = checker.message(client or session(), TRANSACTION, info)
    if isinstance(answer, defer.Deferred):
        fired = []
        answer.addBoth(fired.append)
        assert fired, "the hook did not answer at once with a synchronous resolver"
        return fired[0]
    return answer


def dmarc(answer) -> AuthResult:
    [result] = answer.results
    return result


def test_a_pass_by_aligned_spf_only():
    answer = verdict(policy({"enforce": True}), message(results=[
        spf("pass", "bounces.reject.example"), dkim("fail", "reject.example"),
    ]))
    assert answer.kind == "proceed" and answer.headers == ()
    assert dmarc(answer) == AuthResult(
        "dmarc", "pass", (("header.from", "reject.example"),), comment="p=reject sp=quarantine"
        " dis=none"
    )


def test_a_pass_by_aligned_dkim_only():
    answer = verdict(policy({"enforce": True}), message(results=[
        spf("pass", "mailer.example"), dkim("fail", "reject.example"),
        dkim("pass", "mail.reject.example"),
    ]))
    assert dmarc(answer).result == "pass"


def test_strict_alignment_needs_the_same_domain():
    results = [spf("pass", "mail.strict.example"), dkim("pass", "mail.strict.example")]
    answer = verdict(policy(), message("a@strict.example", results))
    assert dmarc(answer).result == "fail"
    answer = verdict(policy(), message("a@strict.example", [dkim("pass", "strict.example")]))
    assert dmarc(answer).result == "pass"


def test_a_fail_with_p_none_is_labelled_and_accepted():
    answer = verdict(policy({"enforce": True}), message("a@none.example", [spf("fail", "x.test")]))
    assert answer.kind == "proceed" and answer.headers == ()
    assert (dmarc(answer).result, dmarc(answer).comment) == ("fail", "p=none dis=none")


def test_a_fail_with_p_quarantine_is_flagged_only_with_enforce():
    info = message("a@quarantine.example", [spf("pass", "other.test")])
    answer = verdict(policy({"enforce": True}), info)
    assert answer.kind == "proceed"
    assert answer.headers == (("X-Quarantine", "DMARC policy of quarantine.example: quarantine"),)
    assert dmarc(answer).comment == "p=quarantine dis=quarantine"
    answer = verdict(policy(), info)
    assert answer.headers == ()
    assert (dmarc(answer).result, dmarc(answer).comment) == ("fail", "p=quarantine dis=none")


def test_a_fail_with_p_reject_is_refused_only_with_enforce():
    info = message(results=[spf("pass", "other.test"), dkim("pass", "other.test")])
    answer = verdict(policy({"enforce": True}), info)
    assert (answer.kind, answer.code, answer.enhanced, answer.text) == (
        "reject", 550, "5.7.1", "Email rejected per DMARC policy for reject.example"
    )
    answer = verdict(policy(), info)
    assert answer.kind == "proceed"
    assert (dmarc(answer).result, dmarc(answer).comment) == (
        "fail", "p=reject sp=quarantine dis=none"
    )


def test_pct_lets_an_unsampled_message_through_with_the_weaker_disposition():
    resolver = FakeResolver(ZONES)
    sampled = DMARCPolicy(context(resolver), enforce=True, draw=lambda: 0.1)
    assert verdict(sampled, message("a@sampled.example")).kind == "reject"
    unsampled = DMARCPolicy(context(resolver), enforce=True, draw=lambda: 0.5)
    answer = verdict(unsampled, message("a@sampled.example"))
    assert answer.kind == "proceed"
    assert dmarc(answer).comment == "p=reject dis=quarantine"
    assert answer.headers[0][0] == "X-Quarantine"


def test_the_policy_of_the_organizational_domain_and_its_sp_for_a_subdomain():
    checker = policy({"enforce": True})
    answer = verdict(checker, message("a@news.reject.example"))
    assert answer.kind == "proceed"
    assert dmarc(answer).properties == (("header.from", "news.reject.example"),)
    assert dmarc(answer).comment == "p=reject sp=quarantine dis=quarantine"
    queries = checker.resolver.queries
    assert queries == [("_dmarc.news.reject.example", "TXT"), ("_dmarc.reject.example", "TXT")]


def test_a_subdomain_with_its_own_record_uses_it():
    answer = verdict(policy({"enforce": True}), message("a@own.reject.example"))
    assert answer.kind == "proceed"
    assert dmarc(answer).comment == "p=none dis=none"


@pytest.mark.parametrize(
    "from_", ["a@nowhere.example", "a@twice.example", "a@sub.twice.example"]
)
def test_no_single_record_is_none(from_):
    answer = verdict(policy({"enforce": True}), message(from_))
    assert dmarc(answer).result == "none"
    assert dmarc(answer).comment == ""


def test_a_record_among_other_txt_records_is_found():
    answer = verdict(policy({"enforce": True}), message("a@other.example"))
    assert answer.kind == "reject"


def test_an_invalid_record_is_a_permerror_never_enforced():
    answer = verdict(policy({"enforce": True}), message("a@broken.example"))
    assert answer.kind == "proceed"
    assert dmarc(answer).result == "permerror"
    assert "pct=150" in dmarc(answer).reason


@pytest.mark.parametrize("from_", [None, "", "undisclosed recipients", "a@[192.0.2.1]"])
def test_no_usable_from_is_a_permerror_refused_with_enforce(from_):
    answer = verdict(policy(), message(from_))
    assert answer.kind == "proceed"
    assert dmarc(answer) == AuthResult("dmarc", "permerror", reason="no usable From: address")
    refused = verdict(policy({"enforce": True}), message(from_))
    assert refused == Verdict.reject(550, "5.7.1", "Message refused: no usable From: address")


def test_several_from_domains_each_get_a_result_and_the_strictest_applies():
    info = message("a@none.example, b@reject.example, c@NONE.example")
    answer = verdict(policy({"enforce": True}), info)
    assert answer.kind == "reject"
    assert answer.text.endswith("reject.example")
    answer = verdict(policy(), info)
    assert [result.properties for result in answer.results] == [
        (("header.from", "none.example"),),
        (("header.from", "reject.example"),),
    ]


def test_servfail_is_a_temperror_deferred_only_with_enforce():
    answer = verdict(policy(), message("a@servfail.example"))
    assert answer.kind == "proceed"
    assert dmarc(answer).result == "temperror"
    assert "DNS TXT _dmarc.servfail.example" in dmarc(answer).reason
    answer = verdict(policy({"enforce": True}), message("a@sub.servfail.example"))
    assert (answer.kind, answer.code, answer.enhanced) == ("tempfail", 451, "4.7.1")


def test_a_failed_lookup_is_not_deferred_when_the_message_surely_passes():
    info = message("a@servfail.example", [dkim("pass", "servfail.example")])
    answer = verdict(policy({"enforce": True}), info)
    assert answer.kind == "proceed"
    assert dmarc(answer).result == "temperror"
    # A relaxed pass might fail under adkim=s: the record could say so.
    info = message("a@servfail.example", [dkim("pass", "mail.servfail.example")])
    assert verdict(policy({"enforce": True}), info).kind == "tempfail"


def test_a_lookup_that_hangs_is_a_temperror():
    clock = task.Clock()
    checker = policy({"enforce": True}, clock=clock)
    checker.resolver.lookupText = lambda name, timeout=None: defer.Deferred()
    d = checker.message(session(), TRANSACTION, message())
    fired = []
    d.addBoth(fired.append)
    assert not fired
    clock.advance(60)
    assert fired[0].kind == "tempfail"


@pytest.mark.parametrize(
    "results, expected",
    [
        ([spf("temperror", "reject.example")], "tempfail"),
        ([dkim("temperror", "reject.example")], "tempfail"),
        ([spf("temperror", "other.test")], "reject"),
        ([spf("temperror", "reject.example"), dkim("pass", "reject.example")], "proceed"),
    ],
)
def test_an_aligned_temperror_defers_a_message_the_policy_would_refuse(results, expected):
    answer = verdict(policy({"enforce": True}), message(results=results))
    assert answer.kind == expected


def test_an_aligned_temperror_under_p_none_is_labelled_only():
    answer = verdict(policy({"enforce": True}),
                     message("a@none.example", [spf("temperror", "none.example")]))
    assert answer.kind == "proceed"
    assert dmarc(answer).result == "temperror"


def test_the_null_sender_is_aligned_by_its_helo_name():
    helo = AuthResult("spf", "pass", (("smtp.helo", "mx.reject.example"),))
    assert dmarc(verdict(policy({"enforce": True}), message(results=[helo]))).result == "pass"


def test_sessions_not_from_elsewhere_get_nothing():
    checker = policy({"enforce": True})
    assert checker.message(session(ip="10.1.2.3"), TRANSACTION, message()) is None
    assert checker.resolver.queries == []


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"reject": True}, "reject: unknown option"),
        ({"enforce": "yes"}, "enforce: expected true or false"),
    ],
)
def test_bad_options(options, problem):
    with pytest.raises(ValueError, match=problem):
        policy(options)


def load(enabled, tmp_path):
    return load_policies(enabled, {}, 10.0, replace(context(FakeResolver({})), state_dir=tmp_path))


@pytest.mark.parametrize(
    "enabled, missing",
    [
        (["dmarc"], "spf and dkim"),
        (["spf", "dmarc"], "dkim"),
        (["dmarc", "spf", "dkim"], "spf and dkim"),
        (["dkim", "dmarc", "spf"], "spf"),
    ],
)
def test_the_chain_needs_spf_and_dkim_before_dmarc(tmp_path, enabled, missing):
    with pytest.raises(PluginError, match=f"dmarc needs {missing} enabled before it"):
        load(enabled, tmp_path)


def test_the_chain_loads_dmarc_after_spf_and_dkim(tmp_path):
    chain = load(["spf", "dkim", "dmarc"], tmp_path)
    assert [plugin.name for plugin in chain.plugins] == ["spf", "dkim", "dmarc"]
    assert chain.has("message")
