"""The aliases file: ``name: target, ...`` per line.

Keys are ``local``, ``local@domain`` or ``@domain`` (a catch-all).  An
alias target is an address or a bare local part: no pipes, files,
``:include:``, quoting, or anything that could break a header or a
command; other targets are dropped with a log line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from twisted.logger import Logger

from twisted_mta.directory.watched import content_lines

_TARGET_PART = r'[^\s<>()\[\]\\,;:"@|/\x00-\x1f\x7f]+'
_TARGET = re.compile(rf"{_TARGET_PART}(?:@{_TARGET_PART})?")

_log = Logger()



def parse_aliases(lines: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``key -> targets``; keys are ``local``, ``local@domain`` or ``@domain``.

    Keys are lower-cased; targets keep their case, which matters for the
    local part of a remote address.  Lines and targets that cannot be used
    are left out with a log line.
    """
    aliases, problems = read_aliases(lines)
    for problem in problems:
        _log.info("aliases {problem}", problem=problem)
    return aliases


def read_aliases(lines: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """The aliases, and what was left out of them and why (``line N: ...``)."""
    aliases: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for number, text in content_lines(lines):
        key, colon, rest = text.partition(":")
        targets = []
        for target in (t.strip() for t in rest.split(",")):
            if _TARGET.fullmatch(target):
                targets.append(target)
            elif target:
                problems.append(f"line {number}: target {target!r} ignored: not a mail address")
        if not colon or not key.strip() or not targets:
            problems.append(f"line {number} ignored: expected 'name: target, ...'")
            continue
        aliases[key.strip().lower()] = tuple(targets)
    return aliases, problems
