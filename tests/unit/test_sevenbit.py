"""8-bit MIME made 7-bit part by part (twisted_mta.mail.sevenbit)."""

from __future__ import annotations

import base64
import email
from email.message import Message
from email.policy import compat32

import pytest

from twisted_mta.mail.sevenbit import SignedMessage, Unconvertible, seven_bit

CAFE = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode()


def leaves(data: bytes) -> list[Message]:
    parsed = email.message_from_bytes(data, policy=compat32)
    return [part for part in parsed.walk() if not part.is_multipart()]


def assert_same_content(original: bytes, converted: bytes) -> None:
    """7-bit, the same parts, and each decodes to the bytes it had."""
    assert converted.isascii()
    before, after = leaves(original), leaves(converted)
    assert [p.get_content_type() for p in before] == [p.get_content_type() for p in after]
    for old, new in zip(before, after):
        assert new.get_payload(decode=True) == old.get_payload(decode=True)


def test_text_plain_8bit_body_becomes_quoted_printable_headers_untouched() -> None:
    head = (
        b"Subject:   spaces kept\n"
        b"X-Folded: one\n\ttwo\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding:  8bit\n"
        b"X-After: last\n"
    )
    original = head + b"\n" + CAFE
    converted = seven_bit(original)
    assert converted == (
        head.replace(b"Content-Transfer-Encoding:  8bit", b"Content-Transfer-Encoding: quoted-printable")
        + b"\ncaf=C3=A9 cr=C3=A8me br=C3=BBl=C3=A9e\n"
    )
    assert_same_content(original, converted)


def test_multipart_alternative_converts_the_8bit_part_and_leaves_base64_alone() -> None:
    encoded = base64.encodebytes(CAFE * 3)
    original = (
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/alternative; boundary="b 1"\n'
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n"
        b"preamble\n"
        b"--b 1\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n" + CAFE + b"\n"
        b"--b 1  \n"
        b"Content-Type: text/html; charset=utf-8\n"
        b"Content-Transfer-Encoding: base64\n"
        b"\n" + encoded + b"\n"
        b"--b 1--\n"
        b"epilogue\n"
    )
    converted = seven_bit(original)
    assert_same_content(original, converted)
    head, _, _ = converted.partition(b"\n\n")
    assert head.endswith(b"Content-Transfer-Encoding: 7bit")
    html = converted.index(b"Content-Type: text/html")
    assert original.endswith(converted[html:])  # the base64 part, byte for byte
    assert b"\n--b 1  \n" in converted and converted.startswith(head)
    text = leaves(converted)[0]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"


def test_message_rfc822_attachment_is_walked() -> None:
    inner = b"Subject: forwarded\nContent-Type: text/plain\nContent-Transfer-Encoding: 8bit\n\n"
    original = (
        b"MIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=outer\n"
        b"\n"
        b"--outer\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"see attached\n"
        b"--outer\n"
        b"Content-Type: message/rfc822\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n" + inner + CAFE + b"\n"
        b"--outer--\n"
    )
    converted = seven_bit(original)
    assert_same_content(original, converted)
    assert b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 7bit\n\n" in converted
    assert b"Subject: forwarded\n" in converted
    assert b"\n\nsee attached\n--outer\n" in converted  # 7-bit and unlabelled: left alone


def test_lines_longer_than_76_characters_are_broken_softly() -> None:
    original = b"Content-Transfer-Encoding: 8bit\n\n" + b"\xe9" * 200 + b"\n" + b"a" * 300 + b"\n"
    converted = seven_bit(original)
    assert_same_content(original, converted)
    assert max(len(line) for line in converted.split(b"\n")) <= 76


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_line_ends_are_kept_as_they_are(newline: bytes) -> None:
    lines = [
        b"MIME-Version: 1.0",
        b"Content-Type: multipart/mixed; boundary=x",
        b"",
        b"--x",
        b"Content-Type: text/plain; charset=iso-8859-1",
        b"",
        b"d\xe9j\xe0 vu",
        b"--x--",
        b"",
    ]
    original = newline.join(lines)
    converted = seven_bit(original)
    assert_same_content(original, converted)
    added = b"Content-Transfer-Encoding: quoted-printable" + newline
    assert added + newline + b"d=E9j=E0 vu" + newline + b"--x--" in converted
    if newline == b"\n":
        assert b"\r" not in converted
    else:
        assert b"\n" not in converted.replace(b"\r\n", b"")


def test_message_without_mime_headers_becomes_mime_without_a_charset() -> None:
    original = b"Subject: plain\nFrom: a@b.test\n\n" + CAFE
    converted = seven_bit(original)
    assert converted == (
        b"Subject: plain\nFrom: a@b.test\n"
        b"Content-Transfer-Encoding: quoted-printable\nMIME-Version: 1.0\n"
        b"\ncaf=C3=A9 cr=C3=A8me br=C3=BBl=C3=A9e\n"
    )
    assert_same_content(original, converted)


def test_message_without_any_header() -> None:
    converted = seven_bit(CAFE)
    assert converted.startswith(b"Content-Transfer-Encoding: quoted-printable\n")
    assert_same_content(CAFE, converted)


def test_7bit_message_is_unchanged() -> None:
    original = b"Subject: hi\nContent-Type: text/plain\n\nhello\n"
    assert seven_bit(original) == original


def test_dkim_signed_message_is_not_converted() -> None:
    original = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test\nSubject: x\n\n" + CAFE
    with pytest.raises(SignedMessage):
        seven_bit(original)


@pytest.mark.parametrize(
    "original",
    [
        b"Subject: caf\xc3\xa9\n\nhello\n",
        b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n\xe9\n",
        b"Content-Type: multipart/mixed; boundary=x\n\npr\xe9amble\n--x\n\nhi\n--x--\n",
    ],
    ids=["header", "base64 part", "preamble"],
)
def test_what_quoted_printable_cannot_fix(original: bytes) -> None:
    with pytest.raises(Unconvertible):
        seven_bit(original)


def test_8bit_headers_pass_when_allowed() -> None:
    original = b"Subject: caf\xc3\xa9\n\n" + CAFE
    converted = seven_bit(original, eight_bit_headers=True)
    assert converted.startswith(b"Subject: caf\xc3\xa9\n")
    assert converted.endswith(b"\ncaf=C3=A9 cr=C3=A8me br=C3=BBl=C3=A9e\n")
