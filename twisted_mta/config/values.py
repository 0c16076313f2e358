"""Parsers of config values: a TOML value and its dotted key in, a checked
value out, or a :class:`ConfigValueError` naming the key.

Most parsers are ``(value, key)``; those of paths also take the
:class:`ParseContext`, which knows the folder paths are relative to.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted_mta import durations
from twisted_mta.config.errors import ConfigValueError

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
SMARTHOST_TLS_MODES = ("starttls", "implicit", "none")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


@dataclass(frozen=True)
class ParseContext:
    """What a value's meaning depends on besides the value itself.

    Relative paths resolve against *base*, the config file's folder (the
    current directory for the defaults); the files named are opened to check
    them only if *check_files*.  *hostname* is the configured one once it is
    parsed: defaults such as ``domains.local`` follow it.
    """

    base: Path
    check_files: bool
    hostname: str = ""


def _show(value: Any) -> str:
    """Render a TOML value for an error message, briefly."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def expected(key: str, what: str, value: Any) -> ConfigValueError:
    """The error for a *value* of *key* that is not *what* it should be."""
    return ConfigValueError(key, f"expected {what}, got {_show(value)}")


def reason(error: OSError) -> str:
    """Why a file could not be used, without the errno and file name."""
    return error.strerror or str(error)


# -- Plain types -------------------------------------------------------------


def string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise expected(key, "a string", value)
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise expected(key, "true or false", value)
    return value


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise expected(key, "an integer", value)
    return value


def count(value: Any, key: str) -> int:
    number = _integer(value, key)
    if number < 1:
        raise ConfigValueError(key, f"must be at least 1, got {number}")
    return number


def port_number(value: Any, key: str) -> int:
    number = _integer(value, key)
    if not 1 <= number <= 65535:
        raise ConfigValueError(key, f"expected a port 1-65535, got {number}")
    return number


def string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(item, str) for item in value
    ):
        raise expected(key, "a list of strings", value)
    return value


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def one_of_each(
    value: Any, key: str, choices: tuple[str, ...]
) -> tuple[str, ...]:
    """The names of the list *value*, each one of *choices*, without repeats."""
    names = string_list(value, key)
    for name in names:
        if name not in choices:
            raise expected(key, " or ".join(choices), name)
    return _unique(names)


def plugin_names(value: Any, key: str) -> tuple[str, ...]:
    """Plugin names, in order, each once; whether they are installed is
    checked when the plugins are loaded."""
    names = string_list(value, key)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise expected(key, "plugin names", name)
    return _unique(names)


def mechanisms(value: Any, key: str) -> tuple[str, ...]:
    names = [name.upper() for name in string_list(value, key)]
    return one_of_each(names, key, MECHANISMS)


# -- Durations and sizes -----------------------------------------------------


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number or a string like "30", "30s", "5m", "4h", "5d".

    Raises :class:`ConfigValueError` (a ValueError) naming *key*.
    """
    try:
        return durations.seconds(value)
    except durations.DurationError as error:
        raise expected(key, error.expected, value) from None


def positive_duration(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds == 0:
        raise expected(key, "a duration of more than 0", value)
    return seconds


def parse_size(value: Any, key: str) -> int:
    """Bytes from an integer or a string like "100", "100B", "512K", "25M".

    Suffixes K, M, G, T are 1024-based.  Raises :class:`ConfigValueError`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number, unit = match.groups()
        size = int(number) * _SIZE_UNITS[unit and unit.lower()]
    else:
        raise expected(key, 'bytes or a size like "25M"', value)
    if size < 0:
        raise expected(key, "a size of 0 or more", value)
    return size


def positive_size(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if size < 1:
        raise expected(key, "a size of at least 1 byte", value)
    return size


# -- Names and addresses -----------------------------------------------------


def is_domain(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(map(_LABEL.fullmatch, labels))


def hostname(value: Any, key: str) -> str:
    name = string(value, key)
    if not is_domain(name):
        raise ConfigValueError(key, f"not a valid domain name: {name!r}")
    return name


def domains(value: Any, key: str) -> tuple[str, ...]:
    names = string_list(value, key)
    return _unique([hostname(name, key).lower() for name in names])


def delimiter(value: Any, key: str) -> str:
    text = string(value, key)
    if len(text) > 1 or text == "@":
        raise expected(key, 'one character other than "@", or ""', value)
    return text


def networks(value: Any, key: str) -> tuple[Network, ...]:
    found = []
    for text in string_list(value, key):
        try:
            found.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigValueError(key, f"not a network: {text!r}") from None
    return tuple(found)


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    """Split "host", "host:port", "[v6]:port" or a bare IP into (host, port).

    Checks only the shape and the port; raises ValueError.
    """
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [address]:port")
        _ip_address(host)
        return host, _parse_port(rest[1:]) if rest else default_port
    if is_ip(value):
        return value, default_port
    host, colon, port = value.rpartition(":")
    if not colon:
        return value, default_port
    return host, _parse_port(port)


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def smarthost(value: Any, key: str) -> str:
    text = string(value, key)
    if not text:
        return text
    try:
        host, _ = parse_hostport(text, 25)
    except ValueError as error:
        problem = f"bad smart host {text!r}: {error}"
        raise ConfigValueError(key, problem) from None
    if not (is_ip(host) or is_domain(host)):
        raise ConfigValueError(key, f"bad smart host {text!r}: bad host name")
    return text


def smarthost_tls(value: Any, key: str) -> str:
    mode = string(value, key).lower()
    if mode not in SMARTHOST_TLS_MODES:
        raise expected(key, " or ".join(SMARTHOST_TLS_MODES), value)
    return mode


def resolvers(value: Any, key: str) -> tuple[str, ...]:
    for text in string_list(value, key):
        try:
            _ip_address(parse_hostport(text, 53)[0])
        except ValueError as error:
            problem = f"bad resolver {text!r}: {error}"
            raise ConfigValueError(key, problem) from None
    return tuple(value)


# -- Accounts ----------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A system group, looked up when the config is read; written back as
    its name."""

    name: str
    gid: int

    def __str__(self) -> str:
        return self.name


def group(value: Any, key: str) -> Group | None:
    """The group named, or None for ""."""
    name = string(value, key)
    if not name:
        return None
    try:
        return Group(name, grp.getgrnam(name).gr_gid)
    except KeyError:
        raise ConfigValueError(key, f"no such group: {name!r}") from None


# -- Paths -------------------------------------------------------------------


def _absolute(text: str, base: Path) -> Path:
    return Path(os.path.abspath(base / text))


def directory(value: Any, key: str, context: ParseContext) -> Path:
    text = string(value, key)
    if not text:
        raise ConfigValueError(key, "must not be empty")
    path = _absolute(text, context.base)
    if path.exists() and not path.is_dir():
        raise ConfigValueError(key, f"not a directory: {path}")
    return path


def readable_file(
    value: Any, key: str, context: ParseContext
) -> Path | None:
    """The file named, or None for ""; opened to check it if asked."""
    text = string(value, key)
    if not text:
        return None
    path = _absolute(text, context.base)
    if not context.check_files:
        return path
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ConfigValueError(
            key, f"cannot read {path}: {reason(error)}"
        ) from None
    return path
