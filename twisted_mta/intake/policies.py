"""The enabled policy plugins, run in order at each stage of a message.

Plugins are found with ``twisted.plugin.getPlugins(IMailPolicyFactory)``
in every ``twisted/plugins/`` folder on the path; ``[plugins] enabled``
picks and orders them.  At each stage the policies that have the hook are
asked one after another: a refusal ends the round, ``Verdict.accept()``
ends it with a yes, ``None`` or ``Verdict.proceed`` goes on (the latter
collecting headers, and authentication results that the later policies
see in ``MessageInfo.results``).  Each call runs under ``[plugins] timeout``; a hook
that fails or is late is logged with the plugin's name and counts as a
temporary failure, or as no answer with ``on_error = "accept"``.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import getPlugins

import twisted.plugins
from twisted_mta.interfaces import (
    PROCEED,
    AuthResult,
    IMailPolicyFactory,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    Verdict,
)
from twisted_mta.mail.dsn import HEADERS_LIMIT, header_block

ON_ERROR = ("tempfail", "accept")
# Hooks that are only told of something: what they answer is not used.
_TOLD_ONLY = frozenset({"delivered"})
POLICY_FAILURE = Verdict.tempfail(451, "4.3.0", "Temporary policy failure, try again later")
_log = Logger()
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII but ':'
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class PluginError(Exception):
    """An enabled plugin that is not installed or refuses its options."""


@dataclass(frozen=True)
class Plugin:
    name: str
    policy: Any
    on_error: str = "tempfail"


@dataclass(frozen=True)
class Outcome:
    """What the policies of one stage decided: a refusal (or None), the
    headers they asked to prepend and the authentication results they gave."""

    refusal: Verdict | None = None
    headers: tuple[tuple[str, str], ...] = ()
    results: tuple[AuthResult, ...] = ()


class PolicyChain:
    """The enabled policies, in order."""

    def __init__(self, plugins: Sequence[Plugin] = (), timeout: float = 10.0, clock=None) -> None:
        self.plugins = tuple(plugins)
        self.timeout = timeout
        self.clock = clock
        self._by_hook: dict[str, list[Plugin]] = {}

    def has(self, hook: str) -> bool:
        return bool(self._answering(hook))

    def _answering(self, hook: str) -> list[Plugin]:
        if hook not in self._by_hook:
            self._by_hook[hook] = [
                p for p in self.plugins if callable(getattr(p.policy, hook, None))
            ]
        return self._by_hook[hook]

    def run(self, hook: str, *args: Any) -> defer.Deferred[Outcome]:
        """Ask every policy with ``hook``; fires with the :class:`Outcome`."""
        plugins = self._answering(hook)
        if not plugins:
            return defer.succeed(Outcome())
        return defer.ensureDeferred(self._run(plugins, hook, args))

    async def _run(self, plugins: list[Plugin], hook: str, args: tuple) -> Outcome:
        headers: list[tuple[str, str]] = []
        results: list[AuthResult] = []
        for plugin in plugins:
            verdict = await self._ask(plugin, hook, _with_results(args, results))
            if verdict is None:
                continue
            if verdict.refuses:
                return Outcome(verdict, tuple(headers), tuple(results))
            if verdict.kind != PROCEED:
                break
            headers.extend(verdict.headers)
            results.extend(verdict.results)
        return Outcome(None, tuple(headers), tuple(results))

    async def _ask(self, plugin: Plugin, hook: str, args: tuple) -> Verdict | None:
        d = defer.maybeDeferred(getattr(plugin.policy, hook), *args)
        d.addTimeout(self.timeout, self.clock)
        try:
            verdict = await d
        except defer.TimeoutError:
            return self._failed(plugin, hook, f"no answer within {self.timeout:g}s")
        except Exception as error:
            return self._failed(plugin, hook, f"{type(error).__name__}: {error}")
        if verdict is not None and not isinstance(verdict, Verdict):
            return self._failed(plugin, hook, f"answered {verdict!r}, not a Verdict")
        bad = verdict is not None and next(_bad_headers(verdict.headers), None)
        if bad:
            return self._failed(plugin, hook, f"header {bad!r} cannot be written")
        return verdict

    def _failed(self, plugin: Plugin, hook: str, reason: str) -> Verdict | None:
        if hook in _TOLD_ONLY:
            outcome, verdict = "ignored", None
        elif plugin.on_error == "accept":
            outcome, verdict = "passed over (on_error = accept)", None
        else:
            outcome, verdict = "answered 451 4.3.0", POLICY_FAILURE
        _log.warn(
            "plugin {plugin}: {hook} failed: {reason}; {outcome}",
            plugin=plugin.name,
            hook=hook,
            reason=reason,
            outcome=outcome,
        )
        return verdict


def _with_results(args: tuple, results: Sequence[AuthResult]) -> tuple:
    """The hook's arguments, its message view given the results so far."""
    if results and args and isinstance(args[-1], MessageInfo):
        return (*args[:-1], replace(args[-1], results=tuple(results)))
    return args


def _bad_headers(headers: Sequence[tuple[str, str]]):
    """Headers that would break the message: a name that is not a field
    name, a value with control characters (line breaks are folded)."""
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name) or _CONTROL.search(value):
            yield name


NO_POLICIES = PolicyChain()


def installed() -> dict[str, Any]:
    """The policy factories on the path, by name."""
    return {factory.name: factory for factory in getPlugins(IMailPolicyFactory, twisted.plugins)}


def load_policies(
    enabled: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    timeout: float,
    context: PolicyContext,
) -> PolicyChain:
    """Make the enabled policies from their options; raises PluginError
    with one line naming the plugin and what is wrong."""
    factories = installed()
    plugins = []
    for position, name in enumerate(enabled):
        if name not in factories:
            known = ", ".join(sorted(factories)) or "none"
            raise PluginError(
                f"plugins.enabled: no plugin {name!r} is installed (installed: {known})"
            )
        _check_requirements(name, getattr(factories[name], "requires", ()), enabled[:position])
        given = dict(options.get(name, {}))
        on_error = given.pop("on_error", "tempfail")
        if on_error not in ON_ERROR:
            raise PluginError(f"plugins.{name}.on_error: must be one of {', '.join(ON_ERROR)}")
        state_dir = context.state_dir / name
        try:
            policy = factories[name].policy(given, replace(context, state_dir=state_dir))
        except Exception as error:
            raise PluginError(f"plugins.{name}: {error}") from None
        plugins.append(Plugin(name, policy, on_error))
    return PolicyChain(tuple(plugins), timeout, context.reactor)


def _check_requirements(name: str, requires: Sequence[str], before: Sequence[str]) -> None:
    missing = [needed for needed in requires if needed not in before]
    if missing:
        raise PluginError(
            f"plugins.enabled: {name} needs {' and '.join(missing)} enabled before it"
        )


def message_info(open_message: Callable[[], BinaryIO], size: int) -> MessageInfo:
    """A message's view for the policies, its header block parsed."""
    with open_message() as stored:
        head = header_block(stored.read(HEADERS_LIMIT + 1))
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return MessageInfo(headers, size, open_message)


def header_lines(headers: Sequence[tuple[str, str]]) -> bytes:
    """``Name: value`` lines; a value's own line breaks become folds."""
    lines = []
    for name, value in headers:
        folded = "\n\t".join(part.strip() for part in value.splitlines() if part.strip())
        lines.append(f"{name}: {folded}\n")
    return "".join(lines).encode("utf-8")


def session_info(session: Any) -> SessionInfo:
    """The stable view of an intake ``Session`` that policies get."""
    version, cipher = _tls_parts(session.tls)
    return SessionInfo(
        client_ip=session.client_ip,
        listener="local" if session.local else session.listener,
        helo=session.helo.decode("utf-8", "replace") if session.helo else None,
        tls_version=version,
        tls_cipher=cipher,
        user=session.user,
    )


def _tls_parts(description: str | None) -> tuple[str | None, str | None]:
    """'TLSv1.3 with cipher NAME' -> ('TLSv1.3', 'NAME')."""
    if not description:
        return None, None
    version, _, cipher = description.partition(" with cipher ")
    return version, cipher or None
