"""Configuration of twisted-mta: the TOML config file and embedded defaults.

Every command finds its config the same way: an explicit path, else the
environment variable ``TWISTED_MTA_CONFIG``, else the embedded defaults
(see :func:`find_config_path`).  :func:`load_config` returns a frozen
:class:`Config` with every value checked and every path absolute, or raises
:class:`ConfigError`, whose message is one line naming the config file and
the dotted key at fault.  :func:`dump_config` writes a config back as TOML.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import serverFromString

__all__ = [
    "AliasesConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "ConfigValueError",
    "DomainsConfig",
    "LimitsConfig",
    "ListenConfig",
    "ProxyConfig",
    "QueueConfig",
    "RelayConfig",
    "TLSConfig",
    "UsersConfig",
    "default_config",
    "dump_config",
    "find_config_path",
    "load_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
]

ENVIRONMENT_VARIABLE = "TWISTED_MTA_CONFIG"
DEFAULTS_LABEL = "(defaults)"
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
SMARTHOST_TLS_MODES = ("starttls", "implicit", "none")
LISTENER_KINDS = ("smtp", "submission", "submissions")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Parser = Callable[[Any, str], Any]  # (TOML value, dotted key) -> value
_Address = tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | str]


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


@dataclass(frozen=True)
class ListenConfig:
    """Twisted endpoint strings of the three kinds of listener."""

    smtp: tuple[str, ...]
    submission: tuple[str, ...]
    submissions: tuple[str, ...]


@dataclass(frozen=True)
class TLSConfig:
    """Certificate chain and key; both None means a self-signed one."""

    certificate: Path | None
    private_key: Path | None


@dataclass(frozen=True)
class DomainsConfig:
    """Local domains (lower case) and the recipient delimiter ("" = off)."""

    local: tuple[str, ...]
    recipient_delimiter: str


@dataclass(frozen=True)
class UsersConfig:
    """The Dovecot-style users file, if any."""

    file: Path | None


@dataclass(frozen=True)
class AliasesConfig:
    """The aliases file, if any."""

    file: Path | None


@dataclass(frozen=True)
class AuthConfig:
    """SASL mechanisms (upper case) and when they are offered."""

    mechanisms: tuple[str, ...]
    require_tls: bool
    received_user: bool
    failure_delay: float


@dataclass(frozen=True)
class RelayConfig:
    """Who may relay, and how outgoing mail leaves."""

    networks: tuple[Network, ...]
    smarthost: str
    smarthost_tls: str
    smarthost_user: str
    smarthost_password_file: Path | None
    ca_file: Path | None
    resolvers: tuple[str, ...]
    mx_port: int


@dataclass(frozen=True)
class QueueConfig:
    """Retry schedule in seconds; ``delay_warning`` 0 means no warning."""

    retry_min: float
    retry_max: float
    lifetime: float
    delay_warning: float


@dataclass(frozen=True)
class LimitsConfig:
    """Resource limits; sizes in bytes, durations in seconds."""

    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    idle_timeout: float
    max_auth_failures: int
    max_auth_failures_per_ip: int
    max_hops: int
    max_errors: int
    shutdown_timeout: float
    max_junk_commands: int
    stress_idle_timeout: float
    stress_max_junk_commands: int


@dataclass(frozen=True)
class ProxyConfig:
    """Listeners behind a PROXY protocol proxy, and the proxies trusted."""

    listeners: tuple[str, ...]
    trusted: tuple[Network, ...]


@dataclass(frozen=True)
class Config:
    """The whole effective configuration.

    ``source`` is the config file (None for the embedded defaults); it is
    not part of equality, so a config loaded from its own dump is equal.
    """

    source: Path | None = field(compare=False)
    hostname: str
    spool: Path
    listen: ListenConfig
    tls: TLSConfig
    domains: DomainsConfig
    users: UsersConfig
    aliases: AliasesConfig
    auth: AuthConfig
    relay: RelayConfig
    queue: QueueConfig
    limits: LimitsConfig
    proxy: ProxyConfig

    @property
    def queue_dir(self) -> Path:
        """Where accepted messages wait for delivery."""
        return self.spool / "queue"

    @property
    def mail_dir(self) -> Path:
        """The root of the local maildirs."""
        return self.spool / "mail"

    @property
    def tls_dir(self) -> Path:
        """Where the self-signed certificate is made."""
        return self.spool / "tls"

    @property
    def maildrop_dir(self) -> Path:
        """Where the sendmail command drops messages."""
        return self.spool / "maildrop"


_SECTIONS: dict[str, type] = {
    "listen": ListenConfig,
    "tls": TLSConfig,
    "domains": DomainsConfig,
    "users": UsersConfig,
    "aliases": AliasesConfig,
    "auth": AuthConfig,
    "relay": RelayConfig,
    "queue": QueueConfig,
    "limits": LimitsConfig,
    "proxy": ProxyConfig,
}

# Defaults in TOML form; they go through the same parsers as the file.
# The hostname and domains.local depend on the machine (see _defaults).
_DEFAULTS: dict[str, Any] = {
    "spool": "var",
    "listen": {
        "smtp": ["tcp:2525:interface=127.0.0.1"],
        "submission": ["tcp:2587:interface=127.0.0.1"],
        "submissions": ["tcp:2465:interface=127.0.0.1"],
    },
    "tls": {"certificate": "", "private_key": ""},
    "domains": {"recipient_delimiter": "+"},
    "users": {"file": ""},
    "aliases": {"file": ""},
    "auth": {
        # CRAM-MD5 only works for accounts stored as {CRAM-MD5} or {PLAIN}.
        "mechanisms": ["PLAIN", "LOGIN"],
        "require_tls": True,
        "received_user": False,
        "failure_delay": "1s",
    },
    "relay": {
        "networks": ["127.0.0.0/8", "::1/128"],
        "smarthost": "",
        "smarthost_tls": "starttls",
        "smarthost_user": "",
        "smarthost_password_file": "",
        "ca_file": "",
        "resolvers": [],
        "mx_port": 25,
    },
    "queue": {
        "retry_min": "5m",
        "retry_max": "1h",
        "lifetime": "5d",
        "delay_warning": 0,
    },
    "limits": {
        "max_message_size": "25M",
        "max_recipients": 100,
        "max_connections": 1000,
        "max_connections_per_ip": 20,
        "idle_timeout": "5m",
        "max_auth_failures": 3,
        "max_auth_failures_per_ip": 10,
        "max_hops": 50,
        "max_errors": 10,
        "shutdown_timeout": "30s",
        "max_junk_commands": 100,
        "stress_idle_timeout": "10s",
        "stress_max_junk_commands": 3,
    },
    "proxy": {"listeners": [], "trusted": []},
}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)
_ENDPOINT_PORT_TYPES = ("tcp", "tcp6", "ssl")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}


# -- Finding and loading ---------------------------------------------------


def find_config_path(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path | None:
    """Return the config file to use (absolute), or None for the defaults.

    An explicit *path* wins, then ``TWISTED_MTA_CONFIG`` when set and not
    empty.
    """
    chosen = path if path is not None else environ.get(ENVIRONMENT_VARIABLE)
    if not chosen:
        return None
    return Path(os.path.abspath(chosen))


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    *,
    check_files: bool = True,
) -> Config:
    """Load and check the config that :func:`find_config_path` picks.

    With *check_files* false, the files the config names (users, aliases,
    TLS, smart host password and CA) are not opened, for commands run by
    users who may not read them, such as sendmail.
    """
    source = find_config_path(path, environ)
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
            source, "(file)", f"cannot read: {_reason(error)}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise _config_error(source, "(syntax)", str(error)) from None


def _config_error(source: Path | None, key: str, problem: str) -> ConfigError:
    label = str(source) if source is not None else DEFAULTS_LABEL
    return ConfigError(" ".join(f"{label}: {key}: {problem}".splitlines()))


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _build(
    data: Mapping[str, Any], source: Path | None, check_files: bool
) -> Config:
    base = source.parent if source is not None else Path.cwd()
    try:
        config = _parse(data, source, base, _parsers(base, check_files))
        _check_consistency(config)
    except ConfigValueError as error:
        raise _config_error(source, error.key, error.problem) from None
    return config


def _parse(
    data: Mapping[str, Any],
    source: Path | None,
    base: Path,
    parsers: Mapping[str, Mapping[str, _Parser]],
) -> Config:
    _check_known_keys(data, parsers)
    if "hostname" in data:
        hostname = _hostname(data["hostname"], "hostname")
    else:
        hostname = _default_hostname()
    defaults = _defaults(hostname)
    spool = _directory(data.get("spool", defaults["spool"]), "spool", base)
    sections = {
        name: cls(**_parse_table(data, name, parsers[name], defaults[name]))
        for name, cls in _SECTIONS.items()
    }
    return Config(
        source=source,
        hostname=hostname,
        spool=spool,
        **sections,
    )


def _default_hostname() -> str:
    name = socket.getfqdn()
    return name if _is_domain(name) else "localhost"


def _defaults(hostname: str) -> dict[str, Any]:
    domains = {**_DEFAULTS["domains"], "local": ["localhost", hostname]}
    return {**_DEFAULTS, "domains": domains}


def _check_known_keys(
    data: Mapping[str, Any], parsers: Mapping[str, Mapping[str, _Parser]]
) -> None:
    for name, value in data.items():
        if name in ("hostname", "spool"):
            continue
        if name not in parsers:
            kind = "table" if isinstance(value, dict) else "key"
            raise ConfigValueError(name, f"unknown {kind}")
        if not isinstance(value, dict):
            raise _expected(name, "a table", value)
        for key in value:
            if key not in parsers[name]:
                raise ConfigValueError(f"{name}.{key}", "unknown key")


def _parse_table(
    data: Mapping[str, Any],
    name: str,
    parsers: Mapping[str, _Parser],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    table = data.get(name, {})
    return {
        key: parse(table.get(key, defaults[key]), f"{name}.{key}")
        for key, parse in parsers.items()
    }


# -- Value parsers: (value, dotted key) -> checked value --------------------


def _parsers(base: Path, check_files: bool) -> dict[str, dict[str, _Parser]]:
    """The parser of every key of every table; paths resolve against *base*.

    Files named are opened to check them only if *check_files*.
    """
    readable = partial(_readable_file, base=base, check=check_files)
    return {
        "listen": dict.fromkeys(LISTENER_KINDS, _endpoints),
        "tls": dict.fromkeys(("certificate", "private_key"), readable),
        "domains": {"local": _domains, "recipient_delimiter": _delimiter},
        "users": {"file": readable},
        "aliases": {"file": readable},
        "auth": {
            "mechanisms": _mechanisms,
            "require_tls": _boolean,
            "received_user": _boolean,
            "failure_delay": parse_duration,
        },
        "relay": {
            "networks": _networks,
            "smarthost": _smarthost,
            "smarthost_tls": _smarthost_tls,
            "smarthost_user": _string,
            "smarthost_password_file": readable,
            "ca_file": readable,
            "resolvers": _resolvers,
            "mx_port": _port_number,
        },
        "queue": {
            "retry_min": _positive_duration,
            "retry_max": _positive_duration,
            "lifetime": _positive_duration,
            "delay_warning": parse_duration,
        },
        "limits": {
            "max_message_size": _positive_size,
            "max_recipients": _count,
            "max_connections": _count,
            "max_connections_per_ip": _count,
            "idle_timeout": _positive_duration,
            "max_auth_failures": _count,
            "max_auth_failures_per_ip": _count,
            "max_hops": _count,
            "max_errors": _count,
            "shutdown_timeout": parse_duration,
            "max_junk_commands": _count,
            "stress_idle_timeout": _positive_duration,
            "stress_max_junk_commands": _count,
        },
        "proxy": {"listeners": _listener_kinds, "trusted": _networks},
    }


def _show(value: Any) -> str:
    """Render a TOML value for an error message, briefly."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(key: str, what: str, value: Any) -> ConfigValueError:
    return ConfigValueError(key, f"expected {what}, got {_show(value)}")


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _expected(key, "a string", value)
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(key, "true or false", value)
    return value


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected(key, "an integer", value)
    return value


def _count(value: Any, key: str) -> int:
    number = _integer(value, key)
    if number < 1:
        raise ConfigValueError(key, f"must be at least 1, got {number}")
    return number


def _port_number(value: Any, key: str) -> int:
    number = _integer(value, key)
    if not 1 <= number <= 65535:
        raise ConfigValueError(key, f"expected a port 1-65535, got {number}")
    return number


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(item, str) for item in value
    ):
        raise _expected(key, "a list of strings", value)
    return value


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number or a string like "30", "30s", "5m", "4h", "5d".

    Raises :class:`ConfigValueError` (a ValueError) naming *key*.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        number, unit = match.groups()
        seconds = float(number) * _DURATION_UNITS[unit.lower()]
    else:
        raise _expected(key, 'seconds or a duration like "5m"', value)
    if not math.isfinite(seconds) or seconds < 0:
        raise _expected(key, "a finite duration of 0 or more", value)
    return seconds


def _positive_duration(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds == 0:
        raise _expected(key, "a duration of more than 0", value)
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
        raise _expected(key, 'bytes or a size like "25M"', value)
    if size < 0:
        raise _expected(key, "a size of 0 or more", value)
    return size


def _positive_size(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if size < 1:
        raise _expected(key, "a size of at least 1 byte", value)
    return size


def _is_domain(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(map(_LABEL.fullmatch, labels))


def _hostname(value: Any, key: str) -> str:
    name = _string(value, key)
    if not _is_domain(name):
        raise ConfigValueError(key, f"not a valid domain name: {name!r}")
    return name


def _domains(value: Any, key: str) -> tuple[str, ...]:
    names = _string_list(value, key)
    return _unique([_hostname(name, key).lower() for name in names])


def _delimiter(value: Any, key: str) -> str:
    delimiter = _string(value, key)
    if len(delimiter) > 1 or delimiter == "@":
        raise _expected(key, 'one character other than "@", or ""', value)
    return delimiter


def _mechanisms(value: Any, key: str) -> tuple[str, ...]:
    names = [name.upper() for name in _string_list(value, key)]
    for name in names:
        if name not in MECHANISMS:
            raise _expected(key, " or ".join(MECHANISMS), name)
    return _unique(names)


def _listener_kinds(value: Any, key: str) -> tuple[str, ...]:
    names = _string_list(value, key)
    for name in names:
        if name not in LISTENER_KINDS:
            raise _expected(key, " or ".join(LISTENER_KINDS), name)
    return _unique(names)


def _networks(value: Any, key: str) -> tuple[Network, ...]:
    networks = []
    for text in _string_list(value, key):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigValueError(key, f"not a network: {text!r}") from None
    return tuple(networks)


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
    if _is_ip(value):
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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _smarthost(value: Any, key: str) -> str:
    text = _string(value, key)
    if not text:
        return text
    try:
        host, _ = parse_hostport(text, 25)
    except ValueError as error:
        problem = f"bad smart host {text!r}: {error}"
        raise ConfigValueError(key, problem) from None
    if not (_is_ip(host) or _is_domain(host)):
        raise ConfigValueError(key, f"bad smart host {text!r}: bad host name")
    return text


def _smarthost_tls(value: Any, key: str) -> str:
    mode = _string(value, key).lower()
    if mode not in SMARTHOST_TLS_MODES:
        raise _expected(key, " or ".join(SMARTHOST_TLS_MODES), value)
    return mode


def _resolvers(value: Any, key: str) -> tuple[str, ...]:
    for text in _string_list(value, key):
        try:
            _ip_address(parse_hostport(text, 53)[0])
        except ValueError as error:
            problem = f"bad resolver {text!r}: {error}"
            raise ConfigValueError(key, problem) from None
    return tuple(value)


def _endpoints(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    descriptions = _string_list(value, key)
    for description in descriptions:
        _check_endpoint(description, key)
    return tuple(descriptions)


def _check_endpoint(description: str, key: str) -> None:
    from twisted.internet import reactor  # not at import: twistd picks it

    if _split_endpoint(description)[0][0].lower() == "haproxy":
        raise ConfigValueError(
            key,
            f"bad endpoint {description!r}: haproxy: takes a PROXY header"
            " from any source; use [proxy] listeners and trusted instead",
        )
    try:
        serverFromString(reactor, description)
        _endpoint_address(description)
    except Exception as error:  # any complaint from any endpoint parser
        problem = str(error) or type(error).__name__
        raise ConfigValueError(
            key, f"bad endpoint {description!r}: {problem}"
        ) from None


def _absolute(text: str, base: Path) -> Path:
    return Path(os.path.abspath(base / text))


def _directory(value: Any, key: str, base: Path) -> Path:
    text = _string(value, key)
    if not text:
        raise ConfigValueError(key, "must not be empty")
    path = _absolute(text, base)
    if path.exists() and not path.is_dir():
        raise ConfigValueError(key, f"not a directory: {path}")
    return path


def _readable_file(
    value: Any, key: str, base: Path, check: bool
) -> Path | None:
    text = _string(value, key)
    if not text:
        return None
    path = _absolute(text, base)
    if not check:
        return path
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ConfigValueError(
            key, f"cannot read {path}: {_reason(error)}"
        ) from None
    return path


# -- Checks across keys -----------------------------------------------------


def _check_consistency(config: Config) -> None:
    _check_tls_pair(config.tls)
    if config.queue.retry_min > config.queue.retry_max:
        raise ConfigValueError(
            "queue.retry_min",
            f"must not exceed queue.retry_max ({config.queue.retry_max:g}s),"
            f" got {config.queue.retry_min:g}s",
        )
    _check_duplicate_ports(config.listen)
    if config.proxy.listeners and not config.proxy.trusted:
        raise ConfigValueError(
            "proxy.trusted", "must not be empty when proxy.listeners is set"
        )


def _check_tls_pair(tls: TLSConfig) -> None:
    if tls.certificate is not None and tls.private_key is None:
        raise ConfigValueError(
            "tls.private_key", "missing, tls.certificate is set"
        )
    if tls.private_key is not None and tls.certificate is None:
        raise ConfigValueError(
            "tls.certificate", "missing, tls.private_key is set"
        )


def _check_duplicate_ports(listen: ListenConfig) -> None:
    """Refuse two listeners that cannot both bind, before any binds."""
    seen: list[tuple[_Address, str, str]] = []
    for field_ in fields(listen):
        key = f"listen.{field_.name}"
        for description in getattr(listen, field_.name):
            address = _endpoint_address(description)
            if address is None or address[0] == 0:
                continue
            for other, other_key, other_description in seen:
                if _overlaps(address, other):
                    raise ConfigValueError(
                        key,
                        f"{description!r} uses port {address[0]} like"
                        f" {other_description!r} in {other_key}",
                    )
            seen.append((address, key, description))


def _endpoint_address(description: str) -> _Address | None:
    """The (port, interface) a tcp, tcp6 or ssl endpoint binds, else None."""
    positional, keywords = _split_endpoint(description)
    kind = positional.pop(0).lower()
    if kind not in _ENDPOINT_PORT_TYPES:
        return None
    port = int(keywords.get("port") or positional[0])
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    interface = keywords.get("interface", "")
    if kind == "tcp" and not interface and len(positional) > 1:
        interface = positional[1]
    interface = interface or ("::" if kind == "tcp6" else "0.0.0.0")
    if _is_ip(interface):
        return port, ipaddress.ip_address(interface)
    return port, interface


def _split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    r"""Split as Twisted does: ":" between arguments, "\" escapes.

    Returns the positional arguments (the first is the endpoint type) and
    the keyword ones (``name=value``).
    """
    segments: list[list[str]] = [[""]]
    characters = iter(description)
    for character in characters:
        if character == "\\":
            segments[-1][-1] += next(characters, "")
        elif character == ":":
            segments.append([""])
        elif character == "=" and len(segments[-1]) == 1:
            segments[-1].append("")
        else:
            segments[-1][-1] += character
    positional = [segment[0] for segment in segments if len(segment) == 1]
    keywords = {
        segment[0]: segment[1] for segment in segments if len(segment) == 2
    }
    return positional, keywords


def _overlaps(first: _Address, second: _Address) -> bool:
    """Whether two bindings clash: same port, and same or covering address.

    Twisted does not set IPV6_V6ONLY, so "::" also takes IPv4 (on Linux).
    """
    if first[0] != second[0]:
        return False
    return (
        first[1] == second[1]
        or _covers(first[1], second[1])
        or _covers(second[1], first[1])
    )


def _covers(wildcard: object, interface: object) -> bool:
    if wildcard == ipaddress.IPv6Address("::"):
        return True
    return wildcard == ipaddress.IPv4Address("0.0.0.0") and isinstance(
        interface, ipaddress.IPv4Address
    )


# -- Dumping ----------------------------------------------------------------


def dump_config(config: Config) -> str:
    """The effective config as TOML that loads back into an equal Config.

    Every key is written; paths are absolute, durations in seconds, sizes in
    bytes, absent files as "".
    """
    source = config.source if config.source is not None else DEFAULTS_LABEL
    lines = [
        f"# twisted-mta effective configuration, from {source}",
        f"hostname = {_toml(config.hostname)}",
        f"spool = {_toml(config.spool)}",
    ]
    for name in _SECTIONS:
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        lines += [
            f"{item.name} = {_toml(getattr(section, item.name))}"
            for item in fields(section)
        ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return _toml_string("" if value is None else str(value))


def _toml_string(text: str) -> str:
    return '"' + "".join(map(_toml_character, text)) + '"'


def _toml_character(character: str) -> str:
    if character in _TOML_ESCAPES:
        return _TOML_ESCAPES[character]
    if ord(character) < 32 or ord(character) == 127:
        return f"\\u{ord(character):04x}"
    return character
