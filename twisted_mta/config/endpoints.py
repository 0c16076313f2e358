"""Listener endpoints: the parser of ``[listen]`` and ``[metrics] listen``
values, and the check that no two listeners would bind the same port.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.endpoints import serverFromString

from twisted_mta.config.errors import ConfigValueError
from twisted_mta.config.values import is_ip, string_list

_Address = tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | str]
_ENDPOINT_PORT_TYPES = ("tcp", "tcp6", "ssl")


def endpoints(value: Any, key: str) -> tuple[str, ...]:
    """Twisted server endpoint strings, from one string or a list."""
    if isinstance(value, str):
        value = [value]
    descriptions = string_list(value, key)
    for description in descriptions:
        _check_endpoint(description, key)
    return tuple(descriptions)


def optional_endpoints(value: Any, key: str) -> tuple[str, ...]:
    """Like :func:`endpoints`, and an empty string for none (off)."""
    if value == "":
        return ()
    return endpoints(value, key)


def _check_endpoint(description: str, key: str) -> None:
    from twisted.internet import reactor  # not at import: twistd picks it

    if _split_endpoint(description)[0][0].lower() == "haproxy":
        raise ConfigValueError(
            key,
            f"bad endpoint {description!r}: haproxy: takes a PROXY header"
            " from any source; use [proxy] listeners and trusted instead",
        )
    try:
        if _split_endpoint(description)[0][0].lower() == "systemd":
            _check_systemd(description)
        else:
            serverFromString(reactor, description)
        _endpoint_address(description)
    except Exception as error:  # any complaint from any endpoint parser
        problem = str(error) or type(error).__name__
        raise ConfigValueError(
            key, f"bad endpoint {description!r}: {problem}"
        ) from None


def _check_systemd(description: str) -> None:
    """A ``systemd:`` endpoint names a socket systemd passes at start
    (socket activation), which does not exist when the config is checked:
    only its form is, as Twisted's parser would read it."""
    positional, keywords = _split_endpoint(description)
    unknown = set(keywords) - {"domain", "index", "name"} or positional[1:]
    if unknown:
        raise ValueError(f"unknown argument {sorted(unknown)[0]!r}")
    if not hasattr(socket, f"AF_{keywords.get('domain', '')}"):
        raise ValueError("domain= must be an address family such as INET or INET6")
    if ("index" in keywords) == ("name" in keywords):
        raise ValueError("give exactly one of index= and name=")
    if not keywords.get("index", "0").isdigit() or keywords.get("name") == "":
        raise ValueError("index= is a number, name= a FileDescriptorName")


def check_duplicate_ports(listeners: Mapping[str, Sequence[str]]) -> None:
    """Refuse two listeners that cannot both bind, before any binds.

    *listeners* maps each dotted key to its endpoint strings.
    """
    seen: list[tuple[_Address, str, str]] = []
    for key, descriptions in listeners.items():
        for description in descriptions:
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
    if is_ip(interface):
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
