"""Tests for twisted_mta.mail.address: MAIL FROM / RCPT TO argument parsing."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
from twisted.mail import smtp

from twisted_mta.mail.address import (
    NULL_SENDER,
    Address,
    MailCommand,
    NullAddress,
    PathError,
    RcptCommand,
    parse_mail,
    parse_rcpt,
)

MAX_SIZE = 10_000_000
LABEL63 = b"a" * 63
DOMAIN255 = b".".join([LABEL63] * 4)  # 4 * 63 + 3 dots
CONTROLS = [bytes([c]) for c in [*range(0x20), 0x7F]]


def _domain_of(length: int) -> bytes:
    """A valid domain name of exactly ``length`` octets."""
    labels = []
    while length > 63:
        labels.append(b"a" * 62)
        length -= 63
    return b".".join([*labels, b"b" * length])


DOMAIN256 = _domain_of(256)
INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\x80",  # lone continuation byte
    b"\xc3",  # truncated sequence
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xae",  # overlong "."
    b"\xed\xa0\x80",  # lone high surrogate U+D800
    b"\xed\xbf\xbf",  # lone low surrogate U+DFFF
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
]


def mail(argument: bytes, max_size: int = MAX_SIZE) -> MailCommand:
    return parse_mail(argument, max_size=max_size)


def rcpt(argument: bytes, smtputf8: bool = False) -> RcptCommand:
    return parse_rcpt(argument, smtputf8=smtputf8)


def sender(path: bytes, params: bytes = b"") -> Address | NullAddress:
    return mail(b"FROM:<" + path + b">" + params).sender


def recipient(path: bytes, smtputf8: bool = False) -> Address:
    return rcpt(b"TO:<" + path + b">", smtputf8).recipient


def error(parse: Callable[[], object]) -> PathError:
    with pytest.raises(PathError) as info:
        parse()
    return info.value


def mail_error(argument: bytes, max_size: int = MAX_SIZE) -> PathError:
    return error(lambda: mail(argument, max_size))


def rcpt_error(argument: bytes, smtputf8: bool = False) -> PathError:
    return error(lambda: rcpt(argument, smtputf8))


def reply(exc: PathError) -> tuple[int, str]:
    return exc.code, exc.enhanced


def assert_bad_sender(path: bytes, params: bytes = b"") -> PathError:
    exc = mail_error(b"FROM:<" + path + b">" + params)
    assert reply(exc) == (501, "5.1.7")
    return exc


def assert_bad_recipient(path: bytes, smtputf8: bool = False) -> PathError:
    exc = rcpt_error(b"TO:<" + path + b">", smtputf8)
    assert reply(exc) == (501, "5.1.3")
    return exc


def assert_wire_safe(exc: PathError) -> None:
    assert exc.text.isascii() and exc.text.isprintable()
    assert len(str(exc)) < 120


# --- command syntax ----------------------------------------------------------


@pytest.mark.parametrize("prefix", [b"FROM:", b"from:", b"FrOm:"])
def test_mail_keyword_is_case_insensitive(prefix: bytes) -> None:
    assert mail(prefix + b"<a@b.example>").sender == Address(
        b"a", b"b.example"
    )


@pytest.mark.parametrize("prefix", [b"TO:", b"to:", b"tO:"])
def test_rcpt_keyword_is_case_insensitive(prefix: bytes) -> None:
    assert rcpt(prefix + b"<a@b.example>").recipient == Address(
        b"a", b"b.example"
    )


@pytest.mark.parametrize("spaces", [b" ", b"   "])
def test_spaces_between_colon_and_path_are_tolerated(spaces: bytes) -> None:
    assert mail(b"FROM:" + spaces + b"<a@b>").sender == Address(b"a", b"b")
    assert rcpt(b"TO:" + spaces + b"<a@b>").recipient == Address(b"a", b"b")


@pytest.mark.parametrize(
    "argument",
    [
        b"",
        b"FROM",
        b"FROM:",
        b"FROM: ",
        b"FROM a@b",
        b"FROM <a@b>",
        b"FROM :<a@b>",
        b"FROM:a@b",
        b"FROM:\t<a@b>",
        b"FROM:<a@b",
        b"FROM:a@b>",
        b"FROM:<a@b>>",
        b"FROM:<a@b>SIZE=1",
        b"FROM:<a@b>\tSIZE=1",
        b'FROM:<"a>@b',  # unterminated quoted string
        b"<a@b>",
        b"TO:<a@b>",
        b"FROMM:<a@b>",
        b"\x00FROM:<a@b>",
        b"FROM:\x00<a@b>",
    ],
)
def test_mail_command_syntax_errors(argument: bytes) -> None:
    exc = mail_error(argument)
    assert reply(exc) == (501, "5.5.2")
    assert exc.text == "Syntax: MAIL FROM:<address> [parameters]"


@pytest.mark.parametrize(
    "argument", [b"", b"TO", b"TO a@b", b"TO:a@b", b"TO:<a@b", b"FROM:<a@b>"]
)
def test_rcpt_command_syntax_errors(argument: bytes) -> None:
    exc = rcpt_error(argument)
    assert reply(exc) == (501, "5.5.2")
    assert exc.text == "Syntax: RCPT TO:<address> [parameters]"


def test_angle_bracket_inside_quoted_local_part() -> None:
    assert sender(b'"a>b"@c') == Address(b"a>b", b"c")


# --- local part --------------------------------------------------------------


def test_local_part_case_is_preserved_and_domain_lower_cased() -> None:
    address = sender(b"John.Doe@Mail.Example.COM")
    assert address.local == b"John.Doe"
    assert address.domain == b"mail.example.com"


@pytest.mark.parametrize(
    "local",
    [
        b"a",
        b"a.b.c",
        b"!#$%&'*+/=?^_`{|}~-",
        b"user+tag",
        b"a%b",  # %-hack is just a character, no routing
        b"host!user",  # so is the UUCP bang path
        b"a/b",
        b"-",
        b"0",
    ],
)
def test_valid_dot_strings_are_kept_literally(local: bytes) -> None:
    address = sender(local + b"@example.com")
    assert address == Address(local, b"example.com")
    assert bytes(address) == local + b"@example.com"


@pytest.mark.parametrize(
    "local",
    [
        b".a",
        b"a.",
        b"a..b",
        b"..",
        b"../etc/passwd",
        b"a/../b",
        b"a b",
        b"a(b)",
        b"a,b",
        b"a:b",
        b"a;b",
        b"a<b",
        b"a[b]",
        b"a\\b",
        b'"a"b',
        b'a"b"',
        b'"a""b"',
    ],
)
def test_invalid_dot_strings_fail_cleanly(local: bytes) -> None:
    assert_bad_sender(local + b"@example.com")
    assert_bad_recipient(local + b"@example.com")


@pytest.mark.parametrize(
    ("path", "local", "canonical"),
    [
        (b'"a b"@c', b"a b", b'"a b"@c'),
        (b'"a\\"b"@c', b'a"b', b'"a\\"b"@c'),
        (b'"a\\\\b"@c', b"a\\b", b'"a\\\\b"@c'),
        (b'"\\a"@c', b"a", b"a@c"),  # needless quoted-pair
        (b'"abc"@c', b"abc", b"abc@c"),  # needless quotes
        (b'"john..doe"@c', b"john..doe", b'"john..doe"@c'),
        (b'".a"@c', b".a", b'".a"@c'),
        (b'"a@b"@c', b"a@b", b'"a@b"@c'),
        (
            b'"../../etc/passwd"@c',
            b"../../etc/passwd",
            b'"../../etc/passwd"@c',
        ),
        (b'"(),:;<>[]"@c', b"(),:;<>[]", b'"(),:;<>[]"@c'),
        (b'" "@c', b" ", b'" "@c'),
        (b'"\\ "@c', b" ", b'" "@c'),
    ],
)
def test_quoted_local_parts(
    path: bytes, local: bytes, canonical: bytes
) -> None:
    address = sender(path)
    assert address.local == local
    assert bytes(address) == canonical
    assert str(address) == canonical.decode()
    assert sender(canonical) == address  # round trip


@pytest.mark.parametrize(
    "path",
    [
        b'""@c',  # empty local part
        b'"a"@',
        b'"a"',
        b'"\\\xc3\xa9"@c',  # quoted-pair only escapes ASCII
    ],
)
def test_invalid_quoted_local_parts(path: bytes) -> None:
    assert_bad_sender(path, b" SMTPUTF8")


@pytest.mark.parametrize("path", [b'"a@b', b'a"b@c', b'"\\"@c'])
def test_unbalanced_quote_in_path_is_a_command_syntax_error(
    path: bytes,
) -> None:
    # Without the closing quote the end of the path cannot be found.
    assert reply(mail_error(b"FROM:<" + path + b">")) == (501, "5.5.2")


@pytest.mark.parametrize("char", CONTROLS)
@pytest.mark.parametrize(
    "template", [b"a%sb@c", b'"a%sb"@c', b'"a\\%s"@c', b"a@b%sc", b"@r%s:a@b"]
)
def test_control_characters_are_always_rejected(
    template: bytes, char: bytes
) -> None:
    path = template % char
    exc = assert_bad_sender(path)
    assert_wire_safe(exc)
    assert_bad_recipient(path, smtputf8=True)


@pytest.mark.parametrize("char", ["\x80", "\x85", "\x9f"])
def test_c1_control_characters_are_rejected(char: str) -> None:
    assert_bad_sender(f"a{char}b@c".encode(), b" SMTPUTF8")


# --- domain ------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain",
    [
        b"localhost",
        b"a-b.example",
        b"a--b.example",
        b"x1.y2",
        b"123.example",
        b"1.2.3.4",
        LABEL63 + b".example",
    ],
)
def test_valid_domains(domain: bytes) -> None:
    assert sender(b"a@" + domain).domain == domain


@pytest.mark.parametrize(
    "domain",
    [
        b"",
        b".",
        b"example.com.",
        b".example.com",
        b"a..b",
        b"-a.b",
        b"a-.b",
        b"a.-b",
        b"a_b.example",
        b"a b",
        b"a/b",
        b"a@b",
        b"a:b",
        b"a\\b",
        LABEL63 + b"a.example",
    ],
)
def test_invalid_domains(domain: bytes) -> None:
    assert_bad_sender(b"a@" + domain)
    assert_bad_recipient(b"a@" + domain)


@pytest.mark.parametrize(
    ("literal", "domain"),
    [
        (b"[192.0.2.1]", b"[192.0.2.1]"),
        (b"[IPv6:2001:db8::1]", b"[ipv6:2001:db8::1]"),
        (b"[ipv6:2001:DB8::1]", b"[ipv6:2001:db8::1]"),
        (b"[IPv6:::1]", b"[ipv6:::1]"),
        (b"[IPv6:::ffff:192.0.2.1]", b"[ipv6:::ffff:192.0.2.1]"),
        (b"[IPv6:2001:db8:0:0:0:0:0:1]", b"[ipv6:2001:db8:0:0:0:0:0:1]"),
    ],
)
def test_address_literals(literal: bytes, domain: bytes) -> None:
    address = sender(b"a@" + literal)
    assert address.domain == domain
    assert sender(bytes(address)) == address


@pytest.mark.parametrize(
    "literal",
    [
        b"[]",
        b"[192.0.2]",
        b"[192.0.2.256]",
        b"[192.0.2.01]",  # leading zeros are ambiguous (octal)
        b"[192.0.2.1",
        b"192.0.2.1]",
        b"[192.0.2.1]x",
        b"[ 192.0.2.1]",
        b"[2001:db8::1]",  # IPv6 needs its tag
        b"[IPv6:192.0.2.1]",
        b"[IPv6:fe80::1%eth0]",  # no zone identifiers
        b"[IPv6:2001:db8::g]",
        b"[IPv6:1:2:3:4:5:6:7:8:9]",
        b"[IPv6:]",
        b"[IPv7:x]",
        b"[tag:content]",
        b"[a.b.c.d]",
    ],
)
def test_invalid_address_literals(literal: bytes) -> None:
    assert_bad_sender(b"a@" + literal)


# --- source routes -----------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"@a:user@host",
        b"@a,@b:user@host",
        b"@A.example,@b-c.example:user@host",
    ],
)
def test_source_routes_are_accepted_and_dropped(path: bytes) -> None:
    assert sender(path) == Address(b"user", b"host")
    assert recipient(path) == Address(b"user", b"host")


@pytest.mark.parametrize(
    "path",
    [
        b"@a user@host",
        b"@a",
        b"@:user@host",
        b"@a,:user@host",
        b"@a,b:user@host",
        b"@a@b:user@host",
        b"@a.:user@host",
        b"@[192.0.2.1]:user@host",  # no address literals in routes
        b"@a:",
        b"@a:user",
        b"@a:@b:user@host",
        b"@",
    ],
)
def test_malformed_source_routes(path: bytes) -> None:
    assert_bad_sender(path)
    assert_bad_recipient(path)


# --- postmaster and null paths -----------------------------------------------


@pytest.mark.parametrize("path", [b"postmaster", b"Postmaster", b"POSTMASTER"])
def test_rcpt_to_bare_postmaster(path: bytes) -> None:
    address = recipient(path)
    assert address == Address(b"postmaster", b"")
    assert address.domain == b""
    assert bytes(address) == b"postmaster"
    assert str(address) == "postmaster"


def test_postmaster_at_domain_is_a_normal_address() -> None:
    assert recipient(b"Postmaster@Example.com") == Address(
        b"Postmaster", b"example.com"
    )


@pytest.mark.parametrize(
    "path", [b'"postmaster"', b"@a:postmaster", b"postmaster "]
)
def test_only_the_exact_postmaster_form_lacks_a_domain(path: bytes) -> None:
    assert_bad_recipient(path)


@pytest.mark.parametrize("path", [b"postmaster", b"user"])
def test_mail_from_requires_a_domain(path: bytes) -> None:
    assert_bad_sender(path)


def test_rcpt_to_unqualified_user_is_rejected() -> None:
    assert_bad_recipient(b"user")


def test_mail_from_null_path() -> None:
    command = mail(b"FROM:<>")
    assert command.sender is NULL_SENDER
    assert command == MailCommand(NULL_SENDER, None, None, False, {})


def test_mail_from_null_path_with_parameters() -> None:
    command = mail(b"FROM:<> SIZE=100 BODY=8BITMIME")
    assert command.sender is NULL_SENDER
    assert command.size == 100
    assert command.body == "8BITMIME"


def test_rcpt_to_null_path_is_rejected() -> None:
    assert_bad_recipient(b"")


@pytest.mark.parametrize("path", [b" ", b"<>", b"@"])
def test_not_quite_null_paths(path: bytes) -> None:
    exc = mail_error(b"FROM:<" + path + b">")
    assert exc.code == 501


# --- SMTPUTF8 ----------------------------------------------------------------

UTF8_PATHS = [
    "用户@例子.广告".encode(),
    "josé@example.com".encode(),
    "a@bücher.example".encode(),
    '"señor x"@example.com'.encode(),
    "@ürl.example:a@b".encode(),
]


@pytest.mark.parametrize("path", UTF8_PATHS)
def test_utf8_sender_requires_smtputf8_on_the_same_command(
    path: bytes,
) -> None:
    exc = mail_error(b"FROM:<" + path + b">")
    assert reply(exc) == (553, "5.6.7")
    assert mail(b"FROM:<" + path + b"> SMTPUTF8").smtputf8


@pytest.mark.parametrize("path", UTF8_PATHS)
def test_utf8_recipient_requires_smtputf8_transaction(path: bytes) -> None:
    assert reply(rcpt_error(b"TO:<" + path + b">")) == (553, "5.6.7")
    assert recipient(path, smtputf8=True)


def test_utf8_address_attributes_and_round_trip() -> None:
    address = sender("用户.Ä@例子.广告".encode(), b" SMTPUTF8")
    assert address.local == "用户.Ä".encode()
    assert address.domain == "例子.广告".encode()
    assert address.needs_utf8
    assert str(address) == "用户.Ä@例子.广告"
    assert sender(bytes(address), b" SMTPUTF8") == address


def test_utf8_domain_lower_cases_ascii_only() -> None:
    address = recipient("a@BÜCHER.Example".encode(), smtputf8=True)
    assert address.domain == "bÜcher.example".encode()
    assert address.needs_utf8


def test_ascii_address_does_not_need_utf8() -> None:
    assert not sender(b"a@b", b" SMTPUTF8").needs_utf8
    assert not NULL_SENDER.needs_utf8


@pytest.mark.parametrize("garbage", INVALID_UTF8)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_invalid_utf8_is_a_syntax_error(
    garbage: bytes, smtputf8: bool
) -> None:
    params = b" SMTPUTF8" if smtputf8 else b""
    for path in (garbage + b"@b", b"a@" + garbage, b'"' + garbage + b'"@b'):
        assert_wire_safe(assert_bad_sender(path, params))
        assert_bad_recipient(path, smtputf8)


SHOWN_DIFFERENTLY = ["\u2028", "\u2029", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069", "\u061c"]


@pytest.mark.parametrize("char", SHOWN_DIFFERENTLY)
@pytest.mark.parametrize("template", ["a{}b@example.com", "a@b{}.example", '"a{}b"@example.com'])
def test_separators_and_bidi_controls_are_refused_in_addresses(char: str, template: str) -> None:
    path = template.format(char).encode()
    named = f"U+{ord(char):04X}"
    exc = mail_error(b"FROM:<" + path + b"> SMTPUTF8")
    assert reply(exc) == (553, "5.1.7")
    assert exc.text == (
        f"Sender address rejected: it contains {named}, a line separator or"
        " bidirectional control character"
    )
    assert_wire_safe(exc)
    exc = rcpt_error(b"TO:<" + path + b">", smtputf8=True)
    assert reply(exc) == (553, "5.1.3") and exc.text.startswith("Recipient address rejected")


def test_utf8_label_length_is_counted_in_octets() -> None:
    label = "é".encode() * 32  # 64 octets
    assert_bad_recipient(b"a@" + label + b".example", smtputf8=True)
    assert recipient(b"a@" + label[:-2] + b".example", smtputf8=True)


# --- length limits -----------------------------------------------------------


def test_local_part_of_64_octets_is_accepted() -> None:
    assert sender(b"a" * 64 + b"@b").local == b"a" * 64


def test_local_part_of_65_octets_is_rejected() -> None:
    assert "local part too long" in assert_bad_sender(b"a" * 65 + b"@b").text
    assert (
        "local part too long" in assert_bad_recipient(b"a" * 65 + b"@b").text
    )


def test_quoted_local_part_length_includes_the_quotes() -> None:
    assert sender(b'"' + b" " * 62 + b'"@b').local == b" " * 62
    assert "too long" in assert_bad_sender(b'"' + b" " * 63 + b'"@b').text


def test_utf8_local_part_length_is_counted_in_octets() -> None:
    local = "é".encode() * 32  # 64 octets, 32 characters
    assert sender(local + b"@b", b" SMTPUTF8").local == local
    assert_bad_sender(local + b"a@b", b" SMTPUTF8")


def test_domain_of_255_octets_passes_the_domain_limit() -> None:
    assert len(DOMAIN255) == 255
    # A 255-octet domain cannot fit into a 256-octet path with its local part.
    text = assert_bad_sender(b"a@" + DOMAIN255).text
    assert "path too long" in text


def test_domain_of_256_octets_is_rejected() -> None:
    assert len(DOMAIN256) == 256
    assert "domain too long" in assert_bad_sender(b"a@" + DOMAIN256).text
    assert "domain too long" in assert_bad_recipient(b"a@" + DOMAIN256).text


def test_path_of_256_octets_is_accepted() -> None:
    path = b"a" * 64 + b"@" + _domain_of(189)
    assert len(b"<" + path + b">") == 256
    assert sender(path).local == b"a" * 64
    assert recipient(path).local == b"a" * 64


def test_path_of_257_octets_is_rejected() -> None:
    path = b"a" * 64 + b"@" + _domain_of(190)
    assert len(b"<" + path + b">") == 257
    assert "path too long" in assert_bad_sender(path).text
    assert "path too long" in assert_bad_recipient(path).text


def test_source_route_counts_towards_the_path_length() -> None:
    route = b"@" + _domain_of(124) + b":"
    mailbox = b"a" * 64 + b"@" + _domain_of(63)
    assert len(b"<" + route + mailbox + b">") == 256
    assert sender(route + mailbox) == Address(b"a" * 64, _domain_of(63))
    longer_route = b"@x," + route
    assert "path too long" in assert_bad_sender(longer_route + mailbox).text


# --- ESMTP parameters --------------------------------------------------------


def test_mail_parameters_are_parsed() -> None:
    command = mail(b"FROM:<a@b> size=10 Body=8bitmime SMTPUTF8")
    assert command == MailCommand(
        sender=Address(b"a", b"b"),
        size=10,
        body="8BITMIME",
        smtputf8=True,
        params={"SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": None},
    )


def test_mail_without_parameters() -> None:
    assert mail(b"FROM:<a@b>") == MailCommand(
        Address(b"a", b"b"), None, None, False, {}
    )


@pytest.mark.parametrize("spacing", [b"  ", b"   "])
def test_parameters_may_be_separated_by_several_spaces(spacing: bytes) -> None:
    command = mail(
        b"FROM:<a@b>" + spacing + b"SIZE=1" + spacing + b"BODY=7BIT"
    )
    assert (command.size, command.body) == (1, "7BIT")


def test_trailing_spaces_are_tolerated() -> None:
    assert mail(b"FROM:<a@b> ").params == {}
    assert mail(b"FROM:<a@b> SIZE=1  ").size == 1
    assert rcpt(b"TO:<a@b>  ").params == {}


@pytest.mark.parametrize("value", [b"0", b"1", b"0000", b"10000000"])
def test_size_values(value: bytes) -> None:
    assert mail(b"FROM:<a@b> SIZE=" + value).size == int(value)


def test_size_limit_boundary() -> None:
    assert mail(b"FROM:<a@b> SIZE=1000", max_size=1000).size == 1000
    exc = mail_error(b"FROM:<a@b> SIZE=1001", max_size=1000)
    assert reply(exc) == (552, "5.3.4")
    assert exc.text == "Message size exceeds fixed maximum message size"


def test_size_of_20_digits_is_accepted() -> None:
    assert (
        mail(b"FROM:<a@b> SIZE=" + b"9" * 20, max_size=10**20).size
        == 10**20 - 1
    )
    assert reply(mail_error(b"FROM:<a@b> SIZE=" + b"9" * 20)) == (552, "5.3.4")


@pytest.mark.parametrize(
    "param",
    [
        b"SIZE",
        b"SIZE=" + b"1" * 21,
        b"SIZE=-1",
        b"SIZE=+1",
        b"SIZE=1.5",
        b"SIZE=1e3",
        b"SIZE=0x10",
        b"SIZE=ten",
        b"BODY",
        b"BODY=BINARYMIME",
        b"BODY=8BIT",
        b"SMTPUTF8=yes",
        b"SMTPUTF8=",
    ],
)
def test_invalid_known_parameter_values(param: bytes) -> None:
    assert reply(mail_error(b"FROM:<a@b> " + param)) == (501, "5.5.4")


@pytest.mark.parametrize(
    "param",
    [
        b"-X=1",
        b"X_Y=1",
        b"X.Y",
        b"=1",
        b"X=",
        b"X==1",
        b"X=a=b",
        b"X=\x7f",
        b"X=\x00",
        b"X=\xc3\xa9",
        b"\xc3\xa9=1",
        b"X\t=1",
        b"SIZE=1\tBODY=7BIT",
        b"SIZE=1\r\nRSET",
    ],
)
def test_parameter_syntax_errors(param: bytes) -> None:
    exc = mail_error(b"FROM:<a@b> " + param)
    assert reply(exc) == (501, "5.5.4")
    assert_wire_safe(exc)
    assert reply(rcpt_error(b"TO:<a@b> " + param)) == (501, "5.5.4")


@pytest.mark.parametrize(
    "params", [b"SIZE=1 SIZE=2", b"SIZE=1 size=1", b"SMTPUTF8 smtputf8"]
)
def test_duplicate_parameters(params: bytes) -> None:
    exc = mail_error(b"FROM:<a@b> " + params)
    assert reply(exc) == (501, "5.5.4")
    assert "Duplicate" in exc.text


def test_parameter_values_may_contain_any_printable_but_equals() -> None:
    exc = mail_error(b'FROM:<a@b> X-TEST=!"#<>?~')
    assert reply(exc) == (555, "5.5.4")


@pytest.mark.parametrize(
    ("param", "name"),
    [
        (b"FOO=bar", "FOO"),
        (b"foo", "FOO"),
        (b"AUTH=<>", "AUTH"),
        (b"RET=FULL", "RET"),
    ],
)
def test_unknown_mail_parameters(param: bytes, name: str) -> None:
    exc = mail_error(b"FROM:<a@b> " + param)
    assert reply(exc) == (555, "5.5.4")
    assert exc.text == f"MAIL parameter {name} not recognized"


@pytest.mark.parametrize(
    ("param", "name"),
    [
        (b"NOTIFY=NEVER", "NOTIFY"),
        (b"SIZE=1", "SIZE"),
        (b"smtputf8", "SMTPUTF8"),
    ],
)
def test_every_rcpt_parameter_is_unknown(param: bytes, name: str) -> None:
    exc = rcpt_error(b"TO:<a@b> " + param)
    assert reply(exc) == (555, "5.5.4")
    assert exc.text == f"RCPT parameter {name} not recognized"


def test_long_unknown_keyword_is_not_echoed_in_full() -> None:
    exc = mail_error(b"FROM:<a@b> " + b"X" * 400)
    assert reply(exc) == (555, "5.5.4")
    assert_wire_safe(exc)


def test_rcpt_command_result() -> None:
    assert rcpt(b"TO:<a@B>") == RcptCommand(Address(b"a", b"b"), {})


# --- precedence of errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        (b"FROM:a@b X=", (501, "5.5.2")),
        (b"FROM:<bad> X=", (501, "5.5.4")),
        (b"FROM:<bad> FOO", (501, "5.1.7")),
        (b"FROM:<bad> SIZE=999", (501, "5.1.7")),
        ("FROM:<é@b> FOO".encode(), (553, "5.6.7")),
        (b"FROM:<a@b> FOO SIZE=999", (555, "5.5.4")),
    ],
)
def test_error_precedence(argument: bytes, expected: tuple[int, str]) -> None:
    assert reply(mail_error(argument, max_size=10)) == expected


# --- the objects -------------------------------------------------------------


def test_address_is_a_twisted_address() -> None:
    address = Address(b"a", b"b")
    assert isinstance(address, smtp.Address)
    copy = smtp.Address(address)  # Twisted's copy constructor
    assert (copy.local, copy.domain) == (b"a", b"b")
    assert str(copy) == "a@b"


def test_address_equality_is_exact() -> None:
    assert Address(b"a", b"b") == Address(b"a", b"b")
    assert Address(b"a", b"b") != Address(b"A", b"b")
    assert Address(b"a", b"b") != Address(b"a", b"c")
    assert Address(b"a", b"b") != "a@b"
    assert (
        len({Address(b"a", b"b"), Address(b"a", b"b"), Address(b"A", b"b")})
        == 2
    )


def test_address_repr() -> None:
    assert repr(Address(b"a", b"b")) == "Address(local=b'a', domain=b'b')"


def test_null_address() -> None:
    assert isinstance(NULL_SENDER, smtp.Address)
    assert isinstance(NULL_SENDER, NullAddress)
    assert (NULL_SENDER.local, NULL_SENDER.domain) == (b"", b"")
    assert str(NULL_SENDER) == ""
    assert bytes(NULL_SENDER) == b""
    assert repr(NULL_SENDER) == "NullAddress()"


def test_commands_are_frozen() -> None:
    command = mail(b"FROM:<a@b>")
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.size = 1  # type: ignore[misc]


def test_path_error() -> None:
    exc = PathError(501, "5.1.7", "Bad sender address syntax")
    assert (exc.code, exc.enhanced, exc.text) == (
        501,
        "5.1.7",
        "Bad sender address syntax",
    )
    assert str(exc) == "501 5.1.7 Bad sender address syntax"


# --- robustness --------------------------------------------------------------

SEEDS = [
    b"<user@example.com> SIZE=100 BODY=8BITMIME",
    b'<"a b\\"c"@[IPv6:2001:db8::1]> SMTPUTF8',
    b"<@a,@b:x.y@[192.0.2.1]>",
    "<用户@例子.广告> SMTPUTF8".encode(),
    b"<>",
    b"<postmaster>",
    b" <a@b> ",
]


def _check(tail: bytes) -> None:
    """Parse ``FROM:tail`` and ``TO:tail``.

    Only PathError may escape, and parsed addresses must round-trip.
    """
    for parse in (
        lambda: mail(b"FROM:" + tail, max_size=1000),
        lambda: rcpt(b"TO:" + tail, smtputf8=True),
    ):
        try:
            result = parse()
        except PathError as exc:
            assert_wire_safe(exc)
            continue
        address = (
            result.sender
            if isinstance(result, MailCommand)
            else result.recipient
        )
        if address is NULL_SENDER or not address.domain:
            continue
        assert recipient(bytes(address), smtputf8=True) == address


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(buffer))
        byte = rng.choice([rng.randrange(256), *b'<>@:,."\\ =[]'])
        operation = rng.randrange(3)
        if operation == 0:
            buffer.insert(position, byte)
        elif position < len(buffer):
            if operation == 1:
                del buffer[position]
            else:
                buffer[position] = byte
    return bytes(buffer)


def test_random_bytes_only_raise_path_error() -> None:
    rng = random.Random(5321)
    for _ in range(3000):
        prefix = rng.choice([b"", b"<"])
        _check(prefix + rng.randbytes(rng.randrange(300)))


def test_mutated_commands_only_raise_path_error() -> None:
    rng = random.Random(6531)
    for _ in range(5000):
        _check(_mutate(rng, rng.choice(SEEDS)))


@pytest.mark.parametrize(
    "argument",
    [
        b"FROM:<" + b"a" * 1_000_000 + b"@b>",
        b"FROM:<a@" + b"b." * 500_000 + b"c>",
        b"FROM:<" + b'"\\' * 500_000 + b">",
        b"FROM:<" + b'"' * 1_000_000 + b">",
        b"FROM:" + b"<" * 1_000_000,
        b"FROM:<" + b"@a," * 300_000 + b"@a:b@c>",
        b"FROM:<a@b>" + b" X" * 500_000,
        b"FROM:<a@b> SIZE=" + b"9" * 1_000_000,
        b"\x00" * 1_000_000,
    ],
)
def test_very_long_inputs_fail_cleanly(argument: bytes) -> None:
    assert_wire_safe(mail_error(argument))
    assert_wire_safe(rcpt_error(b"TO:" + argument[5:]))
