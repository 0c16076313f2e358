"""DMARC records, organizational domains, alignment and evaluation (RFC 7489)."""

from __future__ import annotations

import pytest

from twisted_mta.mail.dmarc import (
    Evaluation,
    Identifier,
    Record,
    RecordError,
    aligned,
    applicable_policy,
    author_domains,
    evaluate,
    is_dmarc,
    organizational_domain,
    parse_record,
    sampled_disposition,
)


def test_a_good_record():
    record = parse_record("v=DMARC1; p=reject; sp=quarantine; pct=50; adkim=s; aspf=r;"
                          " rua=mailto:dmarc@example.com")
    assert record == Record("reject", "quarantine", 50, "s", "r")


def test_defaults():
    assert parse_record("v=DMARC1;p=none") == Record("none", None, 100, "r", "r")


def test_spaces_and_case_in_values():
    assert parse_record("v=DMARC1 ; p = Reject ; adkim = S").policy == "reject"
    assert parse_record("v=DMARC1 ; p = Reject ; adkim = S").dkim == "s"


def test_unknown_tags_are_ignored():
    assert parse_record("v=DMARC1; p=quarantine; future=yes; x=1").policy == "quarantine"


@pytest.mark.parametrize(
    "text",
    [
        "p=reject",  # no version
        "p=reject; v=DMARC1",  # version not first
        "v=DMARC2; p=reject",
        "v=dmarc1; p=reject",  # the version is case sensitive (section 6.4)
        "v=DMARC1p=reject",
    ],
)
def test_records_not_starting_with_the_version_are_not_dmarc(text):
    assert not is_dmarc(text)
    with pytest.raises(RecordError):
        parse_record(text)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("v=DMARC1; p=block", "p=block"),
        ("v=DMARC1", "p="),
        ("v=DMARC1; p=reject; sp=maybe", "sp=maybe"),
        ("v=DMARC1; p=reject; pct=101", "pct=101"),
        ("v=DMARC1; p=reject; pct=-1", "pct=-1"),
        ("v=DMARC1; p=reject; pct=half", "pct=half"),
        ("v=DMARC1; p=reject; adkim=x", "adkim=x"),
        ("v=DMARC1; p=reject; aspf=relaxed", "aspf=relaxed"),
        ("v=DMARC1; p=reject; fo=2", "fo=2"),
        ("v=DMARC1; p=reject; ri=daily", "ri=daily"),
        ("v=DMARC1; p=reject; p=none", "p= is given twice"),
        ("v=DMARC1; p=reject; junk", "not a tag=value"),
    ],
)
def test_bad_values_of_known_tags_make_the_record_invalid(text, problem):
    with pytest.raises(RecordError, match=problem):
        parse_record(text)


def test_a_bad_policy_with_a_report_address_is_none():
    assert parse_record("v=DMARC1; rua=mailto:d@example.com").policy == "none"
    assert parse_record("v=DMARC1; p=block; rua=mailto:d@example.com").policy == "none"
    with pytest.raises(RecordError):
        parse_record("v=DMARC1; p=block; rua=nonsense")


@pytest.mark.parametrize(
    "domain, organizational",
    [
        ("mail.example.co.uk", "example.co.uk"),
        ("a.b.example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("example.com", "example.com"),
        ("co.uk", "co.uk"),
    ],
)
def test_organizational_domains(domain, organizational):
    assert organizational_domain(domain) == organizational


@pytest.mark.parametrize(
    "identifier, author, relaxed, strict",
    [
        ("example.com", "example.com", True, True),
        ("mail.example.com", "example.com", True, False),
        ("example.com", "news.example.com", True, False),
        ("EXAMPLE.com", "example.COM", True, True),
        ("example.net", "example.com", False, False),
        ("a.example.co.uk", "b.example.co.uk", True, False),
        ("other.co.uk", "example.co.uk", False, False),
    ],
)
def test_alignment(identifier, author, relaxed, strict):
    assert aligned(identifier, author, "r") is relaxed
    assert aligned(identifier, author, "s") is strict


def record(text):
    return parse_record(text)


def passing(domain):
    return Identifier("pass", domain)


@pytest.mark.parametrize(
    "mode, expected",
    [("r", "pass"), ("s", "fail")],
)
def test_spf_alignment_follows_aspf(mode, expected):
    policy = record(f"v=DMARC1; p=reject; aspf={mode}")
    result = evaluate("example.com", policy, False, passing("bounces.example.com"), [], 0.0)
    assert result.result == expected


@pytest.mark.parametrize(
    "mode, expected",
    [("r", "pass"), ("s", "fail")],
)
def test_dkim_alignment_follows_adkim(mode, expected):
    policy = record(f"v=DMARC1; p=reject; adkim={mode}")
    signatures = [Identifier("fail", "example.com"), passing("mail.example.com")]
    assert evaluate("example.com", policy, False, None, signatures, 0.0).result == expected


def test_a_pass_for_another_domain_is_a_fail_with_the_disposition():
    policy = record("v=DMARC1; p=reject")
    result = evaluate("example.com", policy, False, passing("example.net"),
                      [passing("example.org")], 0.0)
    assert result == Evaluation("fail", "reject")


def test_an_aligned_temperror_without_a_pass_is_a_temperror():
    policy = record("v=DMARC1; p=quarantine")
    result = evaluate("example.com", policy, False, Identifier("temperror", "example.com"),
                      [], 0.0)
    assert result == Evaluation("temperror", "quarantine")
    unaligned = evaluate("example.com", policy, False, Identifier("temperror", "example.net"),
                         [], 0.0)
    assert unaligned.result == "fail"


def test_sp_applies_to_a_subdomain_under_the_organizational_record():
    policy = record("v=DMARC1; p=reject; sp=none")
    assert applicable_policy(policy, "news.example.com", True) == "none"
    assert applicable_policy(policy, "example.com", True) == "reject"
    # A record at the subdomain itself is that domain's own: p= applies.
    assert applicable_policy(policy, "news.example.com", False) == "reject"
    assert applicable_policy(record("v=DMARC1; p=reject"), "news.example.com", True) == "reject"
    result = evaluate("news.example.com", policy, True, None, [], 0.0)
    assert result == Evaluation("fail", "none")


@pytest.mark.parametrize(
    "policy, percent, draw, expected",
    [
        ("reject", 100, 0.99, "reject"),
        ("reject", 20, 0.19, "reject"),
        ("reject", 20, 0.2, "quarantine"),
        ("quarantine", 20, 0.5, "none"),
        ("reject", 0, 0.0, "quarantine"),
        ("none", 50, 0.9, "none"),
    ],
)
def test_pct_sampling(policy, percent, draw, expected):
    assert sampled_disposition(policy, percent, draw) == expected


def test_pct_in_the_evaluation():
    policy = record("v=DMARC1; p=reject; pct=10")
    assert evaluate("example.com", policy, False, None, [], 0.05).disposition == "reject"
    assert evaluate("example.com", policy, False, None, [], 0.5).disposition == "quarantine"


@pytest.mark.parametrize(
    "values, expected",
    [
        (["Alice <alice@Example.COM>"], ["example.com"]),
        (["a@example.com, b@example.net, c@EXAMPLE.com"], ["example.com", "example.net"]),
        (["a@example.com", "b@example.org"], ["example.com", "example.org"]),
        (["a@bücher.example"], ["xn--bcher-kva.example"]),
        ([], None),
        ([""], None),
        (["undisclosed"], None),
        (["a@example.com, nobody"], None),
        (["a@[192.0.2.1]"], None),
        (["a@-bad-.example"], None),
    ],
)
def test_author_domains(values, expected):
    assert author_domains(values) == expected
