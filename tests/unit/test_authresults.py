"""The Authentication-Results header: written from results, and forged
ones removed from an arriving message as it streams through DATA."""

from __future__ import annotations

import pytest

from twisted_mta.interfaces import AuthResult
from twisted_mta.mail.authresults import (
    authserv_id,
    claimed_remover,
    claims,
    header_value,
    without_fields,
)
from twisted_mta.smtp.data import DataTransfer

HOST = "mx.example.test"


def test_the_value_names_us_then_one_result_a_line():
    results = [
        AuthResult("spf", "pass", (("smtp.mailfrom", "example.org"),)),
        AuthResult(
            "dkim",
            "fail",
            (("header.d", "example.org"), ("header.b", "AbC+/123")),
            reason="body hash did not verify",
        ),
        AuthResult("dmarc", "fail", (("header.from", "example.org"),), comment="p=reject dis=none"),
    ]
    assert header_value(HOST, results).split("\n") == [
        "mx.example.test;",
        "spf=pass smtp.mailfrom=example.org;",
        'dkim=fail reason="body hash did not verify" header.d=example.org header.b="AbC+/123";',
        "dmarc=fail (p=reject dis=none) header.from=example.org",
    ]


def test_values_that_are_not_tokens_are_quoted_and_cannot_break_out():
    result = AuthResult(
        "spf", "none", (("smtp.helo", 'a "b";\nc'),), reason='x"\\y', comment="(a)\nb"
    )
    assert header_value(HOST, [result]) == (
        'mx.example.test;\nspf=none (ab) reason="xy" smtp.helo="a b;c"'
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        ("mx.example.test; spf=pass", "mx.example.test"),
        (" MX.Example.TEST 1; none", "mx.example.test"),
        ("(comment (nested)) mx.example.test;dkim=pass", "mx.example.test"),
        ('"mx.example.test"; none', "mx.example.test"),
        ("other.example; spf=pass smtp.mailfrom=mx.example.test", "other.example"),
        ("", ""),
    ],
)
def test_the_authserv_id_is_the_first_word_without_comments(value, expected):
    assert authserv_id(value) == expected


@pytest.mark.parametrize(
    "field, ours",
    [
        (b"Authentication-Results: mx.example.test; spf=pass\n", True),
        (b"authentication-results :\n\tMX.EXAMPLE.TEST;\n\tdkim=pass\n", True),
        (b"Authentication-Results: other.example; spf=pass smtp.mailfrom=mx.example.test\n", False),
        (b"Authentication-Results-Original: mx.example.test; spf=pass\n", False),
        (b"X-Authentication-Results: mx.example.test; spf=pass\n", False),
        (b"Subject: Authentication-Results: mx.example.test;\n", False),
    ],
)
def test_which_fields_claim_our_id(field, ours):
    assert claims(field, HOST) is ours


HEAD = (
    b"Received: from a by b\n"
    b"Authentication-Results: mx.example.test;\n"
    b"\tspf=pass smtp.mailfrom=forged.example\n"
    b"Subject: hi\n"
    b" there\n"
    b"Authentication-Results: relay.example; dkim=pass\n"
    b"authentication-results: MX.EXAMPLE.TEST; dmarc=pass\n"
)
CLEAN = (
    b"Received: from a by b\n"
    b"Subject: hi\n"
    b" there\n"
    b"Authentication-Results: relay.example; dkim=pass\n"
)


def test_fields_claiming_us_are_removed_with_their_folds():
    assert claimed_remover(HOST)(HEAD) == CLEAN
    assert without_fields(HEAD, lambda field: False) == HEAD


def test_a_header_without_such_fields_is_passed_as_it_is():
    remove = claimed_remover(HOST)
    head = b"Subject: x\nFrom: a@example.org\n"
    assert remove(head) is head


def transfer_of(stream: bytes, pieces: list[int]) -> bytes:
    """The bytes written for a DATA stream fed cut at ``pieces``."""

    class Message:
        written: list[bytes] = []

        def write(self, data):
            self.written.append(data)

    message = Message()
    message.written = []
    transfer = DataTransfer(message, 10_000_000, 0, claimed_remover(HOST))
    cuts = [0, *pieces, len(stream)]
    rests = [transfer.feed(stream[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert rests[-1] == b"" and all(rest is None for rest in rests[:-1])
    return b"".join(message.written)


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("cut", range(0, len(HEAD) + 12, 7))
def test_forged_results_are_removed_from_data_however_it_is_cut(cut):
    stream = crlf(HEAD + b"\nbody\nAuthentication-Results: mx.example.test; x\n") + b".\r\n"
    assert transfer_of(stream, [cut]) == (
        CLEAN + b"\nbody\nAuthentication-Results: mx.example.test; x\n"
    )


def test_a_message_that_is_all_header_is_filtered_at_its_end():
    stream = crlf(HEAD) + b".\r\n"
    assert transfer_of(stream, [5, 60]) == CLEAN


def test_a_header_block_over_the_limit_passes_as_it_is():
    long_header = b"".join(b"X-Filler-%d: %s\n" % (n, b"y" * 900) for n in range(200))
    head = b"Authentication-Results: mx.example.test; spf=pass\n" + long_header
    stream = crlf(head + b"\nbody\n") + b".\r\n"
    assert transfer_of(stream, list(range(30_000, len(stream), 30_000))) == head + b"\nbody\n"
