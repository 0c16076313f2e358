"""The SPF evaluator (RFC 7208 check_host) against a resolver in memory."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from twisted.internet import defer, task

from tests.helpers.fake_resolver import FakeResolver
from twisted_mta.interfaces import (
    AuthResult,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
)
from twisted_mta.mail.spf import check_host, expand, parse_record
from twisted_mta.policies.spf import factory


def spf(record):
    return [("TXT", record)]


def check(zones, ip="192.0.2.10", sender="user@example.com", helo="mail.example.com", **kw):
    resolver = FakeResolver(zones, **kw)
    results = []
    domain = sender.rpartition("@")[2]
    check_host(ip, domain, sender, helo, resolver).addCallback(results.append)
    assert results, "check_host did not fire at once with a synchronous resolver"
    return results[0][0]


@pytest.mark.parametrize(
    "record, expected",
    [
        ("v=spf1 ip4:192.0.2.0/24 -all", "pass"),
        ("v=spf1 -all", "fail"),
        ("v=spf1 ~all", "softfail"),
        ("v=spf1 ?all", "neutral"),
        ("v=spf1", "neutral"),
        ("v=spf1 +all", "pass"),
        ("v=spf1 ip4:192.0.2.11 -all", "fail"),
        ("v=spf1 ip4:192.0.2.10/32 ~all", "pass"),
        ("V=SPF1 IP4:192.0.2.0/24 -ALL", "pass"),
        ("v=spf1 ip6:2001:db8::/32 -all", "fail"),
        ("v=spf1 -ip4:192.0.2.0/24 +all", "fail"),
        ("v=spf1 foo=bar -all", "fail"),
    ],
)
def test_results_of_simple_records(record, expected):
    assert check({"example.com": spf(record)}) == expected


def test_no_record_and_no_domain_is_none():
    assert check({"example.com": [("TXT", "some other text")]}) == "none"
    assert check({}) == "none"
    assert check({}, sender="user@localhost") == "none"


def test_two_spf_records_are_a_permerror():
    zones = {"example.com": spf("v=spf1 -all") + spf("v=spf1 +all")}
    assert check(zones) == "permerror"


def test_a_txt_record_that_is_not_spf_is_ignored():
    zones = {"example.com": spf("v=spf1 +all") + spf("v=spf10 -all")}
    assert check(zones) == "pass"


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ip4:192.0.2.0/33 +all",
        "v=spf1 ip4:192.0.2 +all",
        "v=spf1 ip4:192.0.2.1/ +all",
        "v=spf1 a:foo.1 +all",
        "v=spf1 a:1.2.3.4 +all",
        "v=spf1 include +all",
        "v=spf1 bogus:example.com +all",
        "v=spf1 all:x",
        "v=spf1 exists:%{x}.example.com",
        "v=spf1 exists:%{d0}.example.com",
        "v=spf1 a:%bad.example.com",
        "v=spf1 redirect=a.example.com redirect=b.example.com",
        "v=spf1 a/24//129",
        "v=spf1 +all exp=%",
    ],
)
def test_syntax_errors_anywhere_are_a_permerror(record):
    assert check({"example.com": spf(record)}) == "permerror"


def test_include_chains():
    zones = {
        "example.com": spf("v=spf1 include:one.example.net -all"),
        "one.example.net": spf("v=spf1 include:two.example.org ~all"),
        "two.example.org": spf("v=spf1 ip4:192.0.2.0/28 -all"),
    }
    assert check(zones) == "pass"
    assert check(zones, ip="198.51.100.1") == "fail"


def test_include_of_a_domain_without_record_is_a_permerror():
    zones = {"example.com": spf("v=spf1 include:missing.example.net -all")}
    assert check(zones) == "permerror"


def test_include_passes_a_temperror_on():
    zones = {
        "example.com": spf("v=spf1 include:broken.example.net -all"),
        "broken.example.net": [],
    }
    assert check(zones, failing=[("broken.example.net", "TXT")]) == "temperror"


def test_redirect_is_followed_when_nothing_matched():
    zones = {
        "example.com": spf("v=spf1 ip4:198.51.100.0/24 redirect=_spf.example.net"),
        "_spf.example.net": spf("v=spf1 ip4:192.0.2.0/24 ~all"),
    }
    assert check(zones) == "pass"
    assert check(zones, ip="203.0.113.1") == "softfail"
    assert check(zones, ip="198.51.100.7") == "pass"


def test_redirect_to_a_domain_without_record_is_a_permerror():
    assert check({"example.com": spf("v=spf1 redirect=nothing.example.net")}) == "permerror"


def test_a_with_cidr_lengths():
    zones = {
        "example.com": spf("v=spf1 a/24//64 -all") + [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")],
    }
    assert check(zones, ip="192.0.2.200") == "pass"
    assert check(zones, ip="192.0.3.1") == "fail"
    assert check(zones, ip="2001:db8::ffff:1") == "pass"
    assert check(zones, ip="2001:db8:1::1") == "fail"


def test_a_with_a_domain_and_ipv4_mapped_client():
    zones = {
        "example.com": spf("v=spf1 a:hosts.example.net -all"),
        "hosts.example.net": [("A", "192.0.2.10")],
    }
    assert check(zones, ip="::ffff:192.0.2.10") == "pass"


def test_mx_with_cidr():
    zones = {
        "example.com": spf("v=spf1 mx/30 -all") + [("MX", "mx.example.com")],
        "mx.example.com": [("A", "192.0.2.8")],
    }
    assert check(zones, ip="192.0.2.11") == "pass"
    assert check(zones, ip="192.0.2.12") == "fail"


def test_ip6():
    zones = {"example.com": spf("v=spf1 ip6:2001:db8:abcd::/48 -all")}
    assert check(zones, ip="2001:db8:abcd:1::25") == "pass"
    assert check(zones, ip="2001:db8:abce::25") == "fail"
    assert check(zones, ip="192.0.2.10") == "fail"


def test_exists_with_macros():
    zones = {
        "example.com": spf("v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d} -all"),
        "10.2.0.192.user._spf.example.com": [("A", "127.0.0.2")],
    }
    assert check(zones) == "pass"
    assert check(zones, ip="192.0.2.11") == "fail"


def test_ptr_is_evaluated_with_forward_confirmation():
    zones = {
        "example.com": spf("v=spf1 ptr -all"),
        "10.2.0.192.in-addr.arpa": [("PTR", "mail.example.com")],
        "mail.example.com": [("A", "192.0.2.10")],
        "11.2.0.192.in-addr.arpa": [("PTR", "forged.example.com")],
        "forged.example.com": [("A", "198.51.100.1")],
    }
    assert check(zones) == "pass"
    assert check(zones, ip="192.0.2.11") == "fail"


def test_more_than_ten_lookups_is_a_permerror():
    chain = {f"d{n}.example.com": spf(f"v=spf1 include:d{n + 1}.example.com") for n in range(11)}
    chain["d11.example.com"] = spf("v=spf1 +all")
    zones = {"example.com": spf("v=spf1 include:d1.example.com -all"), **chain}
    assert check(zones) == "permerror"
    shorter = {"example.com": spf("v=spf1 include:d3.example.com -all"), **chain}
    assert check(shorter) == "pass"


def test_more_than_two_void_lookups_is_a_permerror():
    voids = " ".join(f"a:void{n}.example.com" for n in range(3))
    assert check({"example.com": spf(f"v=spf1 {voids} +all")}) == "permerror"
    two = " ".join(f"a:void{n}.example.com" for n in range(2))
    assert check({"example.com": spf(f"v=spf1 {two} +all")}) == "pass"


def test_dns_failure_is_a_temperror():
    assert check({"example.com": []}, failing=[("example.com", "TXT")]) == "temperror"
    zones = {"example.com": spf("v=spf1 a:hosts.example.net -all"), "hosts.example.net": []}
    assert check(zones, failing=[("hosts.example.net", "A")]) == "temperror"


def test_the_helo_identity_of_a_null_sender():
    zones = {"mail.example.org": spf("v=spf1 a -all") + [("A", "192.0.2.10")]}
    resolver = FakeResolver(zones)
    results = []
    check_host("192.0.2.10", "mail.example.org", "postmaster@mail.example.org",
               "mail.example.org", resolver).addCallback(results.append)
    assert results[0][0] == "pass"


def test_macro_expansion_of_rfc_7208_examples():
    values = {
        "s": "strong-bad@email.example.com",
        "l": "strong-bad",
        "o": "email.example.com",
        "d": "email.example.com",
        "i": "192.0.2.3",
        "p": "unknown",
        "v": "in-addr",
        "h": "mx.example.org",
    }
    assert expand("%{s}", values) == "strong-bad@email.example.com"
    assert expand("%{d4}", values) == "email.example.com"
    assert expand("%{d2}", values) == "example.com"
    assert expand("%{d1}", values) == "com"
    assert expand("%{dr}", values) == "com.example.email"
    assert expand("%{d2r}", values) == "example.email"
    assert expand("%{l-}", values) == "strong.bad"
    assert expand("%{lr-}", values) == "bad.strong"
    assert expand("%{l1r-}", values) == "strong"
    assert expand("%{ir}.%{v}._spf.%{d2}", values) == "3.2.0.192.in-addr._spf.example.com"
    assert expand("%{S}", values) == "strong-bad%40email.example.com"
    assert expand("%%%_%-", values) == "% %20"


def test_ipv6_i_macro_is_dotted_nibbles():
    zones = {
        "example.com": spf("v=spf1 exists:%{i}.x.example.com -all"),
        ".".join("20010db8" + "0" * 23 + "1") + ".x.example.com": [("A", "127.0.0.2")],
    }
    assert check(zones, ip="2001:db8::1") == "pass"


def test_parse_record_keeps_redirect():
    assert parse_record("v=spf1 redirect=_spf.example.com").redirect == "_spf.example.com"


POLICY_ZONES = {
    "good.example": spf("v=spf1 ip4:192.0.2.0/24 -all"),
    "soft.example": spf("v=spf1 ~all"),
    "mail.client.example": spf("v=spf1 ip4:192.0.2.10 -all"),
    "broken.example": [],
}


def policy(options=None, zones=POLICY_ZONES, clock=None):
    context = PolicyContext(
        reactor=clock or task.Clock(),
        hostname="mx.example.test",
        state_dir=Path("/nonexistent"),
        resolver=FakeResolver(zones, failing=[("broken.example", "TXT")]),
        trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    return factory.policy(options or {}, context)


def session(ip="192.0.2.10", listener="smtp", user=None):
    return SessionInfo(client_ip=ip, listener=listener, helo="mail.client.example", user=user)


def fired(d):
    results = []
    d.addCallback(results.append)
    return results[0]


def header(checker, client, sender):
    transaction = TransactionInfo("Q1", sender, ("rcpt@example.test",))
    verdict = checker.message(client, transaction, MessageInfo(None, 0, None))
    return None if verdict is None else dict(verdict.headers)["Received-SPF"]


def test_a_pass_is_recorded_and_becomes_received_spf():
    checker = policy()
    client = session()
    assert fired(checker.mail_from(client, "user@good.example", {})) is None
    assert header(checker, client, "user@good.example") == (
        "pass (mx.example.test: domain of user@good.example designates 192.0.2.10 as"
        " permitted sender) client-ip=192.0.2.10; envelope-from=\"user@good.example\";"
        " helo=mail.client.example; receiver=mx.example.test; identity=mailfrom;"
    )
    assert header(checker, client, "other@good.example") is None


def test_a_fail_is_refused_only_with_reject_fail():
    assert fired(policy().mail_from(session("198.51.100.1"), "user@good.example", {})) is None
    verdict = fired(
        policy({"reject_fail": True}).mail_from(session("198.51.100.1"), "user@good.example", {})
    )
    assert (verdict.kind, verdict.code, verdict.enhanced) == ("reject", 550, "5.7.23")
    assert verdict.text.startswith("SPF fail: user@good.example does not designate 198.51.100.1")


def test_a_temperror_is_deferred_only_with_temperror_defer():
    assert fired(policy().mail_from(session(), "user@broken.example", {})) is None
    checker = policy({"temperror_defer": True})
    verdict = fired(checker.mail_from(session(), "user@broken.example", {}))
    assert (verdict.kind, verdict.code, verdict.enhanced) == ("tempfail", 451, "4.7.24")


def test_a_check_that_hangs_is_a_temperror():
    clock = task.Clock()
    checker = policy({"temperror_defer": True}, clock=clock)
    checker.resolver.lookupText = lambda name, timeout=None: defer.Deferred()
    d = checker.mail_from(session(), "user@good.example", {})
    clock.advance(60)
    assert fired(d).code == 451


def test_the_null_sender_is_checked_by_helo():
    checker = policy()
    client = session()
    fired(checker.mail_from(client, "", {}))
    assert checker.result_for(client, "")[0] == "pass"
    assert "identity=helo;" in header(checker, client, "")


def test_sessions_not_from_elsewhere_are_not_checked():
    client = session(user="alice@example.test")
    checker = policy({"reject_fail": True})
    assert checker.mail_from(client, "user@soft.example", {}) is None
    assert header(checker, client, "user@soft.example") is None


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"reject": True}, "reject: unknown option"),
        ({"reject_fail": "yes"}, "reject_fail: expected true or false"),
    ],
)
def test_bad_options(options, problem):
    with pytest.raises(ValueError, match=problem):
        policy(options)


def results(checker, client, sender):
    transaction = TransactionInfo("Q1", sender, ("rcpt@example.test",))
    return checker.message(client, transaction, MessageInfo(None, 0, None)).results


def test_the_result_is_given_for_authentication_results():
    checker = policy()
    client = session()
    fired(checker.mail_from(client, "u@good.example", {}))
    fired(checker.mail_from(client, "", {}))
    assert results(checker, client, "u@good.example") == (
        AuthResult("spf", "pass", (("smtp.mailfrom", "good.example"),)),
    )
    assert results(checker, client, "") == (
        AuthResult("spf", "pass", (("smtp.helo", "mail.client.example"),)),
    )


def explained(zones, ip="192.0.2.10", **kw):
    results = []
    resolver = FakeResolver(zones, **kw)
    check_host(ip, "example.com", "user@example.com", "h.example", resolver).addCallback(
        results.append
    )
    return results[0]


def test_a_fail_explains_itself_with_the_domains_exp_text():
    zones = {
        "example.com": spf("v=spf1 -all exp=why.%{d}"),
        "why.example.com": [("TXT", "%{c} may not send for %{o}: see https://%{d}/spf")],
    }
    assert explained(zones) == (
        "fail",
        "192.0.2.10 may not send for example.com: see https://example.com/spf",
    )


def test_the_exp_of_a_redirect_target_is_used_and_that_of_an_include_is_not():
    redirected = {
        "example.com": spf("v=spf1 redirect=policy.example.net"),
        "policy.example.net": spf("v=spf1 -all exp=why.example.net"),
        "why.example.net": [("TXT", "policy says no")],
    }
    assert explained(redirected) == ("fail", "policy says no")
    included = {
        "example.com": spf("v=spf1 -include:inner.example.net -all"),
        "inner.example.net": spf("v=spf1 -ip4:198.51.100.1 +all exp=why.example.net"),
        "why.example.net": [("TXT", "inner text")],
    }
    assert explained(included) == ("fail", "include of example.com matched")


@pytest.mark.parametrize(
    "texts, failing",
    [
        ([], ()),
        (["one", "two"], ()),
        (["bad\r\n250 injected"], ()),
        (["caf\u00e9"], ()),
        (["%{x} unknown macro"], ()),
        (["fine"], [("why.example.com", "TXT")]),
    ],
)
def test_an_unusable_exp_gives_our_own_text(texts, failing):
    zones = {
        "example.com": spf("v=spf1 -all exp=why.example.com"),
        "why.example.com": [("TXT", text) for text in texts],
    }
    assert explained(zones, failing=failing) == ("fail", "all of example.com matched")
