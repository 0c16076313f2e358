"""A file read again whenever it changes: the users and aliases files.

A file that cannot be read raises :class:`DirectoryUnavailable` rather
than answering from an older copy: an account removed, or a file made
unreadable by mistake, must not go on as if nothing happened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

from twisted.logger import Logger

# A file changed twice within one timestamp tick keeps its mtime; a file
# younger than this is read again at the next lookup instead of trusted.
_RACY_SECONDS = 2.0

T = TypeVar("T")

_log = Logger()



class DirectoryUnavailable(OSError):
    """The users or aliases file cannot be read now; try again later."""


class WatchedFile(Generic[T]):
    """A file parsed again whenever its modification time, size or inode
    changes.

    A file that cannot be read raises :class:`DirectoryUnavailable` rather
    than answering from an older copy: an account removed, or a file made
    unreadable by mistake, must not go on as if nothing happened.
    """

    def __init__(self, path: Path | None, parse: Callable[[list[str]], T]) -> None:
        self._path = path
        self._parse = parse
        self._stamp: tuple[int, int, int] | None = None
        self._value = parse([])
        self._problem: str | None = None

    def get(self) -> T:
        if self._path is None:
            return self._value
        try:
            info = os.stat(self._path)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp != self._stamp:
                with open(self._path, encoding="utf-8") as lines:
                    self._value = self._parse(list(lines))
                self._stamp = None if _is_racy(info.st_mtime_ns) else stamp
        except (OSError, UnicodeDecodeError) as error:
            self._stamp = None
            problem = f"cannot read {self._path}: {getattr(error, 'strerror', None) or error}"
            self._report(problem)
            raise DirectoryUnavailable(problem) from None
        self._report(None)
        return self._value

    def _report(self, problem: str | None) -> None:
        """Log a problem once, not at every lookup."""
        if problem is not None and problem != self._problem:
            _log.info("{problem}", problem=problem)
        self._problem = problem


def _is_racy(mtime_ns: int) -> bool:
    return time.time() - mtime_ns / 1e9 < _RACY_SECONDS


def content_lines(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            yield number, text
