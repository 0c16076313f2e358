"""Escaping what would change how a log line is shown."""

import pytest

from twisted_mta.mail.text import escape, first_unsafe


@pytest.mark.parametrize(
    "raw, escaped",
    [
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("\u202eevil\u202c", "\\u202eevil\\u202c"),
        ("\u200e\u200f\u2066\u2067\u2068\u2069\u061c", "\\u200e\\u200f\\u2066\\u2067\\u2068\\u2069\\u061c"),
        ("tab\tnul\x00del\x7fc1\x85", "tab\\x09nul\\x00del\\x7fc1\\x85"),
        ("jörg@bücher.example 用户", "jörg@bücher.example 用户"),
    ],
)
def test_escape(raw, escaped):
    assert escape(raw) == escaped


def test_first_unsafe_names_the_code_point():
    assert first_unsafe("ab\u202ec\u2028") == "U+202E"
    assert first_unsafe("plain text") is None
