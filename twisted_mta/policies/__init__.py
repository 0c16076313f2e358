"""The built-in policy plugins: each a module here, registered in
``twisted/plugins/`` like any third party's, and documented in
``docs/plugins/``.  They use only :mod:`twisted_mta.interfaces`, the
durations and the pure mail formats, as a third-party plugin would."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import (
    IMailPolicyFactory,
    Network,
    PolicyContext,
    SessionInfo,
    address_in,
    client_address,
)


@implementer(IPlugin, IMailPolicyFactory)
@dataclass(frozen=True)
class BuiltinFactory:
    """A built-in plugin: its name, its one line for ``--help-plugins``,
    the function that makes its policy from its options, and the plugins
    that must be enabled before it."""

    name: str
    description: str
    make: Callable[[Mapping[str, Any], PolicyContext], Any]
    requires: tuple[str, ...] = ()

    def policy(self, options: Mapping[str, Any], context: PolicyContext) -> Any:
        return self.make(options, context)


def from_elsewhere(session: SessionInfo, trusted: Sequence[Network]) -> bool:
    """Whether the session brings mail from another domain's servers, the
    mail that SPF, DKIM and DMARC check: on the ``smtp`` listener, not
    authenticated, from an address outside the trusted networks."""
    if session.listener != "smtp" or session.user is not None:
        return False
    return client_address(session.client_ip) is not None and not address_in(
        session.client_ip, trusted
    )
