"""A small file system of its own, to fill up in a test (root only)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def run_or_skip(command: list[str]) -> None:
    """Run a command the test needs, or skip where the system forbids it."""
    try:
        result = subprocess.run(command, capture_output=True)
    except FileNotFoundError:
        pytest.skip(f"{command[0]} is not installed")
    if result.returncode != 0:
        pytest.skip(f"{' '.join(command[:2])}: {result.stderr.decode().strip()}")


@contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A small file system at ``path``, or skip the test if we may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    run_or_skip(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
