"""Characters in client-given text that change how a line is shown.

C0 and C1 controls, the line and paragraph separators (U+2028, U+2029),
and the bidirectional marks, embeddings, overrides and isolates (U+061C,
U+200E, U+200F, U+202A-U+202E, U+2066-U+2069): written raw, they start a
forged log line in some viewers, or make text read differently from what
it is (CVE-2021-42574, "Trojan Source").
"""

from __future__ import annotations

import re

UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def escape(text: str) -> str:
    """``text`` with each unsafe character written as ``\\xNN`` or ``\\uNNNN``."""
    return UNSAFE.sub(_escaped, text)


def first_unsafe(text: str) -> str | None:
    """The first unsafe character of ``text`` as ``U+NNNN``, or None."""
    match = UNSAFE.search(text)
    return f"U+{ord(match.group()):04X}" if match else None


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
