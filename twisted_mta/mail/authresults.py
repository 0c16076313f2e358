"""The ``Authentication-Results`` header field (RFC 8601).

Our own small formatter and reader: the server writes one such header for
the results its policies give, and removes those arriving with a message
that claim to be ours (section 5), which a mail reader or Sieve rule would
otherwise trust.  Only the authserv-id is read from arriving headers; the
rest of them is never interpreted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Protocol

NAME = "Authentication-Results"
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+")
_COMMENT_UNSAFE = re.compile(r"[()\\\r\n]")
_QUOTED_UNSAFE = re.compile(r'["\\\r\n]')
_FIELD_START = re.compile(rb"authentication-results[ \t]*:", re.IGNORECASE)


class Result(Protocol):
    """What a result must have to be written (``interfaces.AuthResult``)."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...]
    reason: str
    comment: str


def header_value(authserv_id: str, results: Iterable[Result]) -> str:
    """The header's value: ``authserv-id;`` and one result a line, ``;``
    between them; the lines are folded when the header is written."""
    return ";\n".join([authserv_id, *(result_text(result) for result in results)])


def result_text(result: Result) -> str:
    """``method=result [(comment)] [reason="..."] ptype.property=value ...``."""
    parts = [f"{result.method}={result.result}"]
    if result.comment:
        parts.append(f"({_COMMENT_UNSAFE.sub('', result.comment)})")
    if result.reason:
        parts.append(f"reason={quoted(result.reason)}")
    parts.extend(f"{name}={value_text(value)}" for name, value in result.properties)
    return " ".join(parts)


def value_text(value: str) -> str:
    """A property value: as it is when it is a token (an address or a
    domain is), else a quoted string."""
    return value if _TOKEN.fullmatch(value) else quoted(value)


def quoted(value: str) -> str:
    return '"' + _QUOTED_UNSAFE.sub("", value) + '"'


def authserv_id(value: str) -> str:
    """The authserv-id of a header's value: its first word, comments left
    out, lower case."""
    text = _without_comments(value.split(";", 1)[0]).strip()
    first = text.split(None, 1)[0] if text else ""
    return first.strip('"').lower()


def _without_comments(text: str) -> str:
    """``text`` without its (possibly nested) parenthesised comments."""
    kept, depth, escaped = [], 0, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(char)
            continue
    return "".join(kept)


def claims(field: bytes, our_id: str) -> bool:
    """Whether the header field (name, value and folds) is an
    ``Authentication-Results`` that claims ``our_id`` as its authserv-id."""
    start = _FIELD_START.match(field)
    if start is None:
        return False
    value = field[start.end() :].decode("utf-8", "replace").replace("\n", " ")
    return authserv_id(value) == our_id.lower()


def without_fields(head: bytes, unwanted: Callable[[bytes], bool]) -> bytes:
    """A header block (LF line ends) less the fields that ``unwanted``
    picks; a field is its first line and the folded lines after it."""
    lines = head.splitlines(keepends=True)
    kept: list[bytes] = []
    field: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
            continue
        _keep_unless(field, unwanted, kept)
        field = [line]
    _keep_unless(field, unwanted, kept)
    return b"".join(kept)


def _keep_unless(field: list[bytes], unwanted: Callable[[bytes], bool], kept: list[bytes]) -> None:
    if field and not unwanted(b"".join(field)):
        kept.extend(field)


def claimed_remover(our_id: str) -> Callable[[bytes], bytes]:
    """A function that removes, from a header block, the
    ``Authentication-Results`` fields that claim ``our_id``."""

    def remove(head: bytes) -> bytes:
        if b"authentication-results" not in head.lower():
            return head
        return without_fields(head, lambda field: claims(field, our_id))

    return remove
