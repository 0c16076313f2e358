"""The config schema: a frozen dataclass per table of the config file, and
:class:`Config`, the whole.

Each key is declared once, as a field made by :func:`setting` or
:func:`path_setting`: its type, its default in TOML form, its parser and a
one-line doc.  Loading, the unknown-key check and dumping follow the
fields; the tests hold ``etc/mta.toml`` to them.
"""

# No "from __future__ import annotations": sections() tells the tables of
# Config from its keys by the field types, which must be classes.

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import twisted_mta.config.values as values
from twisted_mta.config.endpoints import endpoints, optional_endpoints
from twisted_mta.config.values import Network, ParseContext

_SETTING = "twisted_mta.setting"
_SUBTABLES = "twisted_mta.subtables"


@dataclass(frozen=True)
class Setting:
    """What the schema knows of a key besides its name and type.

    *default* is a TOML value, or a function of the :class:`ParseContext`
    giving one; it goes through *parser* like a value from the file.
    *parser* takes ``(value, dotted key)``, and the context too if
    *in_context*.
    """

    default: Any
    parser: Callable[..., Any]
    doc: str
    in_context: bool = False

    def default_value(self, context: ParseContext) -> Any:
        """The default in TOML form."""
        if callable(self.default):
            return self.default(context)
        return self.default

    def parse(self, value: Any, key: str, context: ParseContext) -> Any:
        """The checked value of *value*, given for the dotted *key*."""
        if self.in_context:
            return self.parser(value, key, context)
        return self.parser(value, key)


def setting(
    default: Any, parser: Callable[[Any, str], Any], doc: str
) -> Any:
    """A field for a key: its default, its ``(value, key)`` parser, its doc."""
    return field(metadata={_SETTING: Setting(default, parser, doc)})


def path_setting(
    default: str, parser: Callable[[Any, str, ParseContext], Any], doc: str
) -> Any:
    """A field for a key naming a path, relative to the config's folder."""
    return field(
        metadata={_SETTING: Setting(default, parser, doc, in_context=True)}
    )


def subtables(doc: str) -> Any:
    """A field holding the section's sub-tables (``[section.NAME]``) as
    they are, for options the schema does not know (a plugin's)."""
    return field(metadata={_SUBTABLES: doc})


def subtables_field(cls: type) -> str | None:
    """The name of the field of *cls* that holds its sub-tables, if any."""
    for item in fields(cls):
        if _SUBTABLES in item.metadata:
            return item.name
    return None


def settings(cls: type) -> dict[str, Setting]:
    """The keys a section declares (of Config: the top-level ones), in order."""
    return {
        item.name: item.metadata[_SETTING]
        for item in fields(cls)
        if _SETTING in item.metadata
    }


def sections() -> dict[str, type]:
    """The tables of the config file and their classes, in order."""
    return {
        item.name: item.type
        for item in fields(Config)
        if is_dataclass(item.type)
    }


def _machine_hostname(_context: ParseContext) -> str:
    name = socket.getfqdn()
    return name if values.is_domain(name) else "localhost"


def _cpu_count(_context: ParseContext) -> int:
    return os.cpu_count() or 1


def _local_domains(context: ParseContext) -> list[str]:
    return ["localhost", context.hostname]


@dataclass(frozen=True)
class ListenConfig:
    """Twisted endpoint strings of the three kinds of listener."""

    smtp: tuple[str, ...] = setting(
        ["tcp:2525:interface=127.0.0.1"],
        endpoints,
        "MX traffic: mail for the local domains, or relay for trusted"
        " networks and authenticated clients.",
    )
    submission: tuple[str, ...] = setting(
        ["tcp:2587:interface=127.0.0.1"],
        endpoints,
        "Message submission (RFC 6409): STARTTLS, every transaction needs"
        " AUTH.",
    )
    submissions: tuple[str, ...] = setting(
        ["tcp:2465:interface=127.0.0.1"],
        endpoints,
        "Submission over implicit TLS (RFC 8314); the server wraps these in"
        " TLS.",
    )


LISTENER_KINDS = tuple(settings(ListenConfig))

_TLS_PAIR = (
    "PEM certificate chain (the server's certificate first) and its private"
    " key; give both or neither."
)


@dataclass(frozen=True)
class TLSConfig:
    """Certificate chain and key; both None means a self-signed one."""

    certificate: Path | None = path_setting(
        "", values.readable_file, _TLS_PAIR
    )
    private_key: Path | None = path_setting(
        "", values.readable_file, _TLS_PAIR
    )


@dataclass(frozen=True)
class DomainsConfig:
    """Local domains (lower case) and the recipient delimiter ("" = off)."""

    local: tuple[str, ...] = setting(
        _local_domains,
        values.domains,
        "Mail for these domains is delivered into maildirs.",
    )
    recipient_delimiter: str = setting(
        "+",
        values.delimiter,
        'alice+tag@example.test goes to alice; "" turns this off.',
    )


@dataclass(frozen=True)
class UsersConfig:
    """The Dovecot-style users file, if any."""

    file: Path | None = path_setting(
        "",
        values.readable_file,
        "Accounts, Dovecot passwd-file compatible (see the comments in that"
        " file).",
    )


@dataclass(frozen=True)
class AliasesConfig:
    """The aliases file, if any."""

    file: Path | None = path_setting(
        "",
        values.readable_file,
        "Aliases and catch-alls (see the comments in that file).",
    )


@dataclass(frozen=True)
class DeliveryConfig:
    """How the maildirs are shared, if at all."""

    group: values.Group | None = setting(
        "",
        values.group,
        "Share the maildirs with this group (folders 2770, files 0660), e.g."
        ' an IMAP server\'s; the run user must be a member. "" = the run'
        " user's alone (0700, 0600).",
    )


@dataclass(frozen=True)
class AuthConfig:
    """SASL mechanisms (upper case) and when they are offered."""

    # Not CRAM-MD5: it works only for accounts stored as {CRAM-MD5} or
    # {PLAIN}.
    mechanisms: tuple[str, ...] = setting(
        ["PLAIN", "LOGIN"],
        values.mechanisms,
        'SASL mechanisms offered, any of "PLAIN", "LOGIN", "CRAM-MD5".',
    )
    require_tls: bool = setting(
        True,
        values.boolean,
        "Offer AUTH only after STARTTLS or on the submissions listeners.",
    )
    received_user: bool = setting(
        False,
        values.boolean,
        "Name the authenticated user in the Received: header.",
    )
    failure_delay: float = setting(
        "1s",
        values.parse_duration,
        "Delay before answering a failed AUTH; it doubles with each further"
        " failure of the connection or of the client's address (capped at"
        " 30s).",
    )


@dataclass(frozen=True)
class RelayConfig:
    """Who may relay, and how outgoing mail leaves."""

    networks: tuple[Network, ...] = setting(
        ["127.0.0.0/8", "::1/128"],
        values.networks,
        "Clients from these networks may relay without AUTH (submission"
        " listeners always need AUTH).",
    )
    smarthost: str = setting(
        "",
        values.smarthost,
        'Send all outgoing mail through this host: "host", "host:port" or'
        ' "[2001:db8::1]:587" (port 25 if none).',
    )
    smarthost_tls: str = setting(
        "starttls",
        values.smarthost_tls,
        'TLS to the smart host: "starttls", "implicit" or "none".',
    )
    smarthost_user: str = setting(
        "",
        values.string,
        'Log in to the smart host as this user ("" = no AUTH).',
    )
    smarthost_password_file: Path | None = path_setting(
        "",
        values.readable_file,
        "The password for smarthost_user: the first line of this file.",
    )
    ca_file: Path | None = path_setting(
        "",
        values.readable_file,
        "Extra trust anchors (PEM) for verifying the smart host, besides the"
        " system's.",
    )
    resolvers: tuple[str, ...] = setting(
        [],
        values.resolvers,
        'DNS servers for MX/A/AAAA look-ups, as "ip" or "ip:port"'
        ' ("[v6]:port").',
    )
    mx_port: int = setting(25, values.port_number, "Port used on MX hosts.")
    connect_timeout: float = setting(
        "30s",
        values.positive_duration,
        "How long a TCP connection to a relay host (MX or smart host) may"
        " take to open.",
    )
    command_timeout: float = setting(
        "5m",
        values.positive_duration,
        "How long to wait for each reply of a relay host outside the message"
        " body: the greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA"
        " (RFC 5321 4.5.3.2).",
    )
    data_timeout: float = setting(
        "10m",
        values.positive_duration,
        "How long to wait for a relay host's reply to the final dot of a"
        " message (RFC 5321 4.5.3.2.6).",
    )


_RETRY = (
    "Retry a deferred message after retry_min, backing off up to retry_max."
)


@dataclass(frozen=True)
class QueueConfig:
    """Retry schedule in seconds; ``delay_warning`` 0 means no warning."""

    retry_min: float = setting("5m", values.positive_duration, _RETRY)
    retry_max: float = setting("1h", values.positive_duration, _RETRY)
    lifetime: float = setting(
        "5d",
        values.positive_duration,
        "After this long in the queue the sender gets a bounce (DSN).",
    )
    delay_warning: float = setting(
        0,
        values.parse_duration,
        "Tell the sender a message is still undelivered after this long;"
        " 0 = never.",
    )


_CONNECTIONS = (
    'Simultaneous connections, in all and per client IP; more get "421'
    ' 4.7.0".'
)
_STRESS = (
    "Stress mode: while more than 80 % of max_connections are open,"
    " sessions are cut after this much silence (counted from the last"
    " complete line, not the last byte) and after this many junk commands"
)


@dataclass(frozen=True)
class LimitsConfig:
    """Resource limits; sizes in bytes, durations in seconds."""

    max_message_size: int = setting(
        "25M",
        values.positive_size,
        "Largest message, advertised in SIZE and enforced while reading.",
    )
    max_recipients: int = setting(
        100,
        values.count,
        'Recipients per message; more get "452 4.5.3".',
    )
    max_connections: int = setting(1000, values.count, _CONNECTIONS)
    max_connections_per_ip: int = setting(20, values.count, _CONNECTIONS)
    idle_timeout: float = setting(
        "5m",
        values.positive_duration,
        'A client silent this long gets "421 4.4.2" and is disconnected.',
    )
    max_auth_failures: int = setting(
        3,
        values.count,
        "Failed AUTH attempts before the connection is closed.",
    )
    max_auth_failures_per_ip: int = setting(
        10,
        values.count,
        "Failed AUTH attempts of one client address within 15 minutes, over"
        ' all its connections, before its AUTH commands get "454 4.7.0"'
        " without a password check.",
    )
    max_hops: int = setting(
        50,
        values.count,
        "Received: headers before a message is refused as looping"
        " (554 5.4.6).",
    )
    max_errors: int = setting(
        10,
        values.count,
        "Bad commands before the connection is closed.",
    )
    shutdown_timeout: float = setting(
        "30s",
        values.parse_duration,
        "At SIGTERM, transactions in DATA may finish within this long; other"
        ' sessions get "421 4.3.2" at once.',
    )
    workers: int = setting(
        _cpu_count,
        values.count,
        "Processes serving SMTP, each on every listener; 1 serves in the main"
        " process.  Default: the number of CPUs.",
    )
    max_junk_commands: int = setting(
        100,
        values.count,
        "Commands that make no progress (NOOP, RSET, VRFY, HELP and every"
        ' refused command) before "421 4.7.0" and a close',
    )
    stress_idle_timeout: float = setting(
        "10s", values.positive_duration, _STRESS
    )
    stress_max_junk_commands: int = setting(3, values.count, _STRESS)


@dataclass(frozen=True)
class ProxyConfig:
    """Listeners behind a PROXY protocol proxy, and the proxies trusted."""

    listeners: tuple[str, ...] = setting(
        [],
        partial(values.one_of_each, choices=LISTENER_KINDS),
        'Listeners ("smtp", "submission", "submissions") whose every'
        " connection must come from a trusted proxy and start with a PROXY"
        " header",
    )
    trusted: tuple[Network, ...] = setting(
        [],
        values.networks,
        "Networks of the trusted proxies; required with listeners.",
    )


@dataclass(frozen=True)
class PluginsConfig:
    """The policy plugins to run, and their options."""

    enabled: tuple[str, ...] = setting(
        [],
        values.plugin_names,
        "Policy plugins to run at each stage of every message, in this order"
        " (twistd mta --help-plugins lists those installed).",
    )
    timeout: float = setting(
        "10s",
        values.positive_duration,
        "How long one hook of a plugin may take; later, it has failed.",
    )
    options: dict = subtables(
        "[plugins.NAME] tables: the options of plugin NAME, and its on_error"
        ' ("tempfail", the default, or "accept").'
    )


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics and the health check over HTTP."""

    listen: tuple[str, ...] = setting(
        [],
        optional_endpoints,
        "Twisted endpoint strings serving /metrics and /healthz over HTTP;"
        ' empty ([] or "") for none.',
    )


@dataclass(frozen=True)
class Config:
    """The whole effective configuration.

    ``source`` is the config file (None for the embedded defaults); it is
    not part of equality, so a config loaded from its own dump is equal.
    """

    source: Path | None = field(compare=False)
    hostname: str = setting(
        _machine_hostname,
        values.hostname,
        "Name in the SMTP banner, in EHLO and in Received: headers.",
    )
    spool: Path = path_setting(
        "var",
        values.directory,
        "Holds queue/, mail/ (the maildirs), tls/ and maildrop/.",
    )
    listen: ListenConfig
    tls: TLSConfig
    domains: DomainsConfig
    users: UsersConfig
    aliases: AliasesConfig
    delivery: DeliveryConfig
    auth: AuthConfig
    relay: RelayConfig
    queue: QueueConfig
    limits: LimitsConfig
    proxy: ProxyConfig
    plugins: PluginsConfig
    metrics: MetricsConfig

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
