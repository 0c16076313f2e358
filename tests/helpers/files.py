"""Looking at what was written: modes and groups."""

from __future__ import annotations

import os
import stat


def mode_and_group(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The permission bits (setgid included) and the group of ``path``."""
    info = os.stat(path)
    return stat.S_IMODE(info.st_mode), info.st_gid
