"""The built-in policy plugins: each a module here, registered in
``twisted/plugins/`` like any third party's, and documented in
``docs/plugins/``.  They use only :mod:`twisted_mta.interfaces`, the
durations and the pure mail formats, as a third-party plugin would."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import IMailPolicyFactory, PolicyContext


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
