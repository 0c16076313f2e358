"""Writing a :class:`Config` back as TOML, every key the schema declares."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted_mta.config.load import DEFAULTS_LABEL
from twisted_mta.config.schema import Config, sections, settings, subtables_field

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}


def dump_config(config: Config) -> str:
    """The effective config as TOML that loads back into an equal Config.

    Every key is written; paths are absolute, durations in seconds, sizes in
    bytes, absent files as "".
    """
    source = config.source if config.source is not None else DEFAULTS_LABEL
    lines = [f"# twisted-mta effective configuration, from {source}"]
    lines += _key_lines(config, settings(Config))
    for name, section in sections().items():
        table = getattr(config, name)
        lines += ["", f"[{name}]"]
        lines += _key_lines(table, settings(section))
        field_name = subtables_field(section)
        for sub, items in (getattr(table, field_name) if field_name else {}).items():
            lines += ["", f"[{name}.{sub}]"]
            lines += [f"{key} = {_toml(value)}" for key, value in items.items()]
    return "\n".join(lines) + "\n"


def _key_lines(table: object, keys: Iterable[str]) -> list[str]:
    return [f"{key} = {_toml(getattr(table, key))}" for key in keys]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    return _toml_string("" if value is None else str(value))


def _toml_string(text: str) -> str:
    return '"' + "".join(map(_toml_character, text)) + '"'


def _toml_character(character: str) -> str:
    if character in _TOML_ESCAPES:
        return _TOML_ESCAPES[character]
    if ord(character) < 32 or ord(character) == 127:
        return f"\\u{ord(character):04x}"
    return character
