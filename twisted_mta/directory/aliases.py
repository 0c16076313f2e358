"""The aliases file: ``name: target, ...`` per line.

Keys are ``local``, ``local@domain`` or ``@domain`` (a catch-all).  An
alias target is an address or a bare local part: no pipes, files,
``:include:``, quoting, or anything that could break a header or a
command; other targets are dropped with a log line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from twisted.python import log

from twisted_mta.directory.watched import content_lines

_TARGET_PART = r'[^\s<>()\[\]\\,;:"@|/\x00-\x1f\x7f]+'
_TARGET = re.compile(rf"{_TARGET_PART}(?:@{_TARGET_PART})?")


def parse_aliases(lines: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``key -> targets``; keys are ``local``, ``local@domain`` or ``@domain``.

    Keys are lower-cased; targets keep their case, which matters for the
    local part of a remote address.  Targets that are not addresses are
    dropped with a log line.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    for number, text in content_lines(lines):
        key, colon, rest = text.partition(":")
        targets = tuple(_valid_targets(number, rest.split(",")))
        if not colon or not key.strip() or not targets:
            log.msg(f"aliases line {number} ignored: expected 'name: target, ...'")
            continue
        aliases[key.strip().lower()] = targets
    return aliases


def _valid_targets(number: int, targets: Iterable[str]) -> Iterable[str]:
    for target in (t.strip() for t in targets):
        if _TARGET.fullmatch(target):
            yield target
        elif target:
            log.msg(f"aliases line {number}: target {target!r} ignored: not a mail address")
