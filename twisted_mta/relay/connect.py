"""Reaching a relay host: its addresses in order, over TCP, with TLS.

A relay target is one host name with one or more addresses.  This module
holds what is not SMTP about an attempt on it:

* :func:`connect_tcp` opens TCP to one address (IPv6 or IPv4), with a
  connect timeout, and turns refusals and timeouts into a temporary
  :class:`RelayError` (``4.4.1``), Postfix-worded;
* :func:`try_in_order` walks the addresses until one gives a session: a
  temporary failure moves on to the next address, a permanent one (a 5xx
  greeting) ends the walk; under opportunistic TLS a failed handshake is
  retried once on the same address in clear, as Postfix's ``may`` level;
* the TLS modes: ``"starttls"`` and ``"implicit"`` verify the certificate
  (chain to the system trust store plus an optional ``ca_file``, and the
  name written in the configuration, an IP address against the
  certificate's IP SANs); ``"may"`` encrypts without verifying; ``"none"``
  stays in clear;
* :func:`start_tls` puts a TLS layer under a connected protocol.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from OpenSSL import SSL
from twisted.internet import error as net_error
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from twisted_mta.relay.outgoing import RelayError, TLSFailed, temporary

TLSCreator = IOpenSSLClientConnectionCreator | CertificateOptions

T = TypeVar("T")

_log = Logger()

_CONNECT_ERRORS: dict[type[Exception], str] = {
    net_error.ConnectionRefusedError: "Connection refused",
    net_error.TimeoutError: "Connection timed out",
    net_error.NoRouteError: "No route to host",
}


def describe(name: str, address: str, port: int) -> str:
    """``host[ip]:port``, as Postfix logs a relay."""
    return f"{name}[{address}]:{port}"


async def connect_tcp(
    reactor: IReactorTCP,
    address: str,
    port: int,
    factory: IProtocolFactory,
    timeout: float,
    remote: str,
) -> Protocol:
    """Connect to one IP address; failures become temporary ``4.4.1``."""
    try:
        family = ipaddress.ip_address(address).version
    except ValueError:
        raise temporary("4.4.1", f"connect to {remote}: not an IP address") from None
    endpoint_type = TCP6ClientEndpoint if family == 6 else TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, address, port, timeout=timeout)
    try:
        return await endpoint.connect(factory)
    except net_error.ConnectError as error:
        reason = _CONNECT_ERRORS.get(type(error)) or str(error).rstrip(".")
        raise temporary("4.4.1", f"connect to {remote}: {reason}") from None


async def try_in_order(
    addresses: Sequence[str],
    attempt: Callable[[str, bool], Awaitable[T]],
    retry_in_clear: bool,
) -> T:
    """The first session ``attempt(address, tls_allowed)`` gives.

    Temporary failures move on to the next address and the last one is
    raised if none succeeds; a permanent failure is raised at once.  With
    ``retry_in_clear`` (opportunistic TLS) an address whose handshake
    failed is tried once more with TLS not allowed.
    """
    if not addresses:
        raise temporary("4.4.4", "no address to connect to")
    failure = temporary("4.4.4", "no address to connect to")
    for address in addresses:
        for tls_allowed in (True, False) if retry_in_clear else (True,):
            try:
                return await attempt(address, tls_allowed)
            except TLSFailed as error:
                failure = error
                if retry_in_clear and tls_allowed:
                    _log.info("{error}; retrying in clear", error=error.text)
            except RelayError as error:
                if error.permanent:
                    raise
                failure = error
                break
    raise failure


def verified_tls(name: str, ca_file: Path | None) -> TLSCreator:
    """Client TLS that checks the chain and ``name`` (DNS name or IP)."""
    return optionsForClientTLS(
        name,
        trustRoot=_SystemTrustAndFile(ca_file),
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    )


def opportunistic_tls() -> CertificateOptions:
    """Client TLS that encrypts without checking who answers (RFC 7435)."""
    return CertificateOptions(verify=False)


def start_tls(protocol: Protocol, creator: TLSCreator, clock: IReactorTime) -> None:
    """Put a TLS client layer between ``protocol`` and its TCP transport.

    ``ITLSTransport.startTLS`` builds the same layer, but its small-write
    buffering flushes on the global reactor; this one flushes on ``clock``,
    the reactor the connection runs on.  ``protocol.makeConnection`` must
    accept being called again with the layer as its new transport.
    """
    raw = protocol.transport
    factory = TLSMemoryBIOFactory(creator, True, Factory(), clock=clock)
    layer = factory.protocol(factory, protocol)
    layer.makeConnection(raw)  # raises if the TLS context cannot be made
    raw.protocol = layer


@implementer(IOpenSSLTrustRoot)
class _SystemTrustAndFile:
    """The platform's trust store plus the anchors in ``ca_file``.

    Twisted offers one or the other (``platformTrust``,
    ``trustRootFromCertificates``), not both.
    """

    def __init__(self, ca_file: Path | None) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self._ca_file is not None:
            context.load_verify_locations(str(self._ca_file))
