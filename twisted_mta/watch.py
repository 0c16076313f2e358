"""Hear about files arriving in a directory, without polling where possible."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger
from twisted.python.filepath import FilePath

try:
    from twisted.internet import inotify
except ImportError:  # not Linux
    inotify = None

_log = Logger()



def watch_directory(reactor, directory: Path, arrived: Callable[[str], None]):
    """Call ``arrived(name)`` when a file is written or renamed into
    ``directory``; return the notifier (``loseConnection`` to stop), or None
    where inotify is not available and the caller must poll."""
    if inotify is None:
        return None
    try:
        notifier = inotify.INotify(reactor)
        notifier.startReading()
        notifier.watch(
            FilePath(str(directory)),
            mask=inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE,
            callbacks=[lambda _watch, path, _mask: arrived(os.fsdecode(path.basename()))],
        )
    except (OSError, inotify.INotifyError) as error:
        _log.info("no inotify on {directory} ({error})", directory=str(directory), error=str(error))
        return None
    return notifier
