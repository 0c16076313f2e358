"""The errors of the config package: a config refused, a value refused."""

from __future__ import annotations


class ConfigError(Exception):
    """A config that cannot be used.

    ``str(error)`` is one line: ``"<config file or (defaults)>: <key>:
    <problem>"``.
    """


class ConfigValueError(ValueError):
    """A bad value for one key; :func:`load_config` adds the file name."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
