"""Finding the config file and loading it into a checked :class:`Config`,
as the schema declares it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted_mta.config.checks import check_consistency
from twisted_mta.config.errors import ConfigError, ConfigValueError
from twisted_mta.config.schema import Config, Setting, sections, settings, subtables_field
from twisted_mta.config.values import ParseContext, expected, reason

ENVIRONMENT_VARIABLE = "TWISTED_MTA_CONFIG"
SYSTEM_CONFIG = Path("/etc/twisted-mta/mta.toml")
DEFAULTS_LABEL = "(defaults)"


def find_config_path(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    system: Path = SYSTEM_CONFIG,
) -> Path | None:
    """Return the config file to use (absolute), or None for the defaults.

    An explicit *path* wins, then ``TWISTED_MTA_CONFIG`` when set and not
    empty, then the system-wide *system* file when it exists: a sendmail
    run by cron, with neither, finds the server's config.
    """
    chosen = path if path is not None else environ.get(ENVIRONMENT_VARIABLE)
    if chosen:
        return Path(os.path.abspath(chosen))
    if system.exists():
        return system
    return None


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    *,
    check_files: bool = True,
    system: Path = SYSTEM_CONFIG,
) -> Config:
    """Load and check the config that :func:`find_config_path` picks.

    With *check_files* false, the files the config names (users, aliases,
    TLS, smart host password and CA) are not opened, for commands run by
    users who may not read them, such as sendmail.
    """
    source = find_config_path(path, environ, system)
    if source is None:
        return default_config()
    return _build(_read_toml(source), source, check_files)


def default_config() -> Config:
    """The embedded defaults, with the spool under the current directory."""
    return _build({}, None, check_files=True)


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        with source.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as error:
        raise _config_error(
            source, "(file)", f"cannot read: {reason(error)}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise _config_error(source, "(syntax)", str(error)) from None


def _config_error(source: Path | None, key: str, problem: str) -> ConfigError:
    label = str(source) if source is not None else DEFAULTS_LABEL
    return ConfigError(" ".join(f"{label}: {key}: {problem}".splitlines()))


def _build(
    data: Mapping[str, Any], source: Path | None, check_files: bool
) -> Config:
    base = source.parent if source is not None else Path.cwd()
    try:
        config = _parse(data, source, ParseContext(base, check_files))
        check_consistency(config)
    except ConfigValueError as error:
        raise _config_error(source, error.key, error.problem) from None
    return config


def _parse(
    data: Mapping[str, Any], source: Path | None, context: ParseContext
) -> Config:
    _check_known_keys(data)
    top = _parse_table(data, None, settings(Config), context)
    # The tables see the hostname: domains.local defaults to it.
    context = replace(context, hostname=top["hostname"])
    tables = {
        name: section(
            **_parse_table(data, name, settings(section), context),
            **_subtables(data.get(name, {}), section),
        )
        for name, section in sections().items()
    }
    return Config(source=source, **top, **tables)


def _check_known_keys(data: Mapping[str, Any]) -> None:
    top, tables = settings(Config), sections()
    for name, value in data.items():
        if name in top:
            continue
        if name not in tables:
            kind = "table" if isinstance(value, dict) else "key"
            raise ConfigValueError(name, f"unknown {kind}")
        if not isinstance(value, dict):
            raise expected(name, "a table", value)
        known = settings(tables[name])
        open_tables = subtables_field(tables[name]) is not None
        for key, item in value.items():
            if key not in known and not (open_tables and isinstance(item, dict)):
                raise ConfigValueError(f"{name}.{key}", "unknown key")


def _subtables(table: Mapping[str, Any], section: type) -> dict[str, Any]:
    """The sub-tables of *table*, for the section's field that holds them."""
    name = subtables_field(section)
    if name is None:
        return {}
    return {name: {key: dict(item) for key, item in table.items() if isinstance(item, dict)}}


def _parse_table(
    data: Mapping[str, Any],
    name: str | None,
    table_settings: Mapping[str, Setting],
    context: ParseContext,
) -> dict[str, Any]:
    """Parse the keys of table *name* (None: the top level), defaults too."""
    table = data if name is None else data.get(name, {})
    parsed = {}
    for key, setting in table_settings.items():
        value = table[key] if key in table else setting.default_value(context)
        dotted = key if name is None else f"{name}.{key}"
        parsed[key] = setting.parse(value, dotted, context)
    return parsed
