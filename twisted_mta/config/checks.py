"""Checks across keys, made once every key is parsed on its own."""

from __future__ import annotations

from dataclasses import fields

from twisted_mta.config.endpoints import check_duplicate_ports
from twisted_mta.config.errors import ConfigValueError
from twisted_mta.config.schema import Config, ListenConfig, TLSConfig


def check_consistency(config: Config) -> None:
    """Raise :class:`ConfigValueError` for keys that do not go together."""
    _check_tls_pair(config.tls)
    if config.queue.retry_min > config.queue.retry_max:
        raise ConfigValueError(
            "queue.retry_min",
            f"must not exceed queue.retry_max ({config.queue.retry_max:g}s),"
            f" got {config.queue.retry_min:g}s",
        )
    check_duplicate_ports({**_listeners(config.listen), "metrics.listen": config.metrics.listen})
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


def _listeners(listen: ListenConfig) -> dict[str, tuple[str, ...]]:
    """The endpoint strings of each listener kind, by dotted key."""
    return {
        f"listen.{item.name}": getattr(listen, item.name)
        for item in fields(listen)
    }
