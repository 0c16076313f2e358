"""Configuration of twisted-mta: the TOML config file and embedded defaults.

Every command finds its config the same way: an explicit path, else the
environment variable ``TWISTED_MTA_CONFIG``, else ``/etc/twisted-mta/mta.toml``
when it exists, else the embedded defaults (see :func:`find_config_path`).
:func:`load_config` returns a frozen :class:`Config` with every value
checked and every path absolute, or raises
:class:`ConfigError`, whose message is one line naming the config file and
the dotted key at fault.  :func:`dump_config` writes a config back as TOML.

Each key is declared once, in :mod:`.schema`, with its default, its parser
(from :mod:`.values` and :mod:`.endpoints`) and a one-line doc;
:mod:`.load` reads a file by it, :mod:`.checks` checks keys that go
together and :mod:`.dump` writes the result back.
"""

from twisted_mta.config.dump import dump_config
from twisted_mta.config.errors import ConfigError, ConfigValueError
from twisted_mta.config.load import default_config, find_config_path, load_config
from twisted_mta.config.schema import (
    AliasesConfig,
    AuthConfig,
    Config,
    DomainsConfig,
    LimitsConfig,
    ListenConfig,
    MetricsConfig,
    ProxyConfig,
    QueueConfig,
    RelayConfig,
    TLSConfig,
    UsersConfig,
)
from twisted_mta.config.values import parse_duration, parse_hostport, parse_size

__all__ = [
    "AliasesConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "ConfigValueError",
    "DomainsConfig",
    "LimitsConfig",
    "ListenConfig",
    "MetricsConfig",
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
