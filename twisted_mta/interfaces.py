"""The plugin points of twisted-mta: mail policies as Twisted plugins.

A third party puts a module in a ``twisted/plugins/`` folder on the Python
path with an object that provides ``twisted.plugin.IPlugin`` and
:class:`IMailPolicyFactory`; ``[plugins] enabled`` names it, and
``[plugins.NAME]`` gives it options.  The factory makes an
:class:`IMailPolicy`, whose hooks run at each stage of every message, for
SMTP, submission and local submission (``twisted-mta-sendmail``) alike.

Every hook is optional and may return its answer or a Deferred of it.  A
hook that raises, or answers after ``[plugins] timeout``, is a temporary
failure (``451 4.3.0``), or is passed over with ``on_error = "accept"``.
A hook must not block: the server's sessions share one thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO, Callable

from zope.interface import Attribute, Interface, implementer

REJECT, TEMPFAIL, ACCEPT, PROCEED = "reject", "tempfail", "accept", "proceed"


@dataclass(frozen=True)
class AuthResult:
    """One result for the ``Authentication-Results`` header (RFC 8601).

    ``method`` and ``result`` as the registry names them (``spf`` and
    ``pass``, ``dkim`` and ``fail``); ``properties`` such as
    ``("smtp.mailfrom", "example.com")`` or ``("header.d", "example.com")``;
    ``reason`` a short text; ``comment`` goes in parentheses after the
    result (``p=reject dis=none``).
    """

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    comment: str = ""

    def property(self, name: str) -> str | None:
        """The first value of the property ``name`` (``header.d``), if any."""
        return next((value for key, value in self.properties if key == name), None)


@dataclass(frozen=True)
class Verdict:
    """What a hook decided; make one with the class methods."""

    kind: str
    code: int = 0
    enhanced: str = ""
    text: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    results: tuple[AuthResult, ...] = ()

    @classmethod
    def reject(cls, code: int = 550, enhanced: str = "5.7.1", text: str = "Rejected") -> Verdict:
        """Refuse for good (a 5xx reply)."""
        return cls(REJECT, code, enhanced, text)

    @classmethod
    def tempfail(
        cls, code: int = 451, enhanced: str = "4.7.1", text: str = "Try again later"
    ) -> Verdict:
        """Refuse for now (a 4xx reply): the client will try again."""
        return cls(TEMPFAIL, code, enhanced, text)

    @classmethod
    def accept(cls) -> Verdict:
        """Go on without asking the policies after this one, at this step."""
        return cls(ACCEPT)

    @classmethod
    def proceed(
        cls, headers: Sequence[tuple[str, str]] = (), results: Sequence[AuthResult] = ()
    ) -> Verdict:
        """Go on, with headers to prepend (``message`` and ``outbound``) and,
        from ``message``, results for the one ``Authentication-Results``
        header that the server prepends (the policies after this one see
        them in ``MessageInfo.results``)."""
        return cls(PROCEED, headers=tuple(headers), results=tuple(results))

    @property
    def refuses(self) -> bool:
        return self.kind in (REJECT, TEMPFAIL)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(text: str) -> IPAddress | None:
    """A client's address; an IPv4-mapped IPv6 one as the IPv4 address (a
    dual-stack listener sees IPv4 clients so); None if not an IP address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def address_in(text: str, networks: Sequence[Network]) -> bool:
    """Whether the client address ``text`` is in one of ``networks``."""
    address = client_address(text)
    return address is not None and any(address in network for network in networks)


@dataclass(frozen=True)
class SessionInfo:
    """The client, as a policy sees it.

    ``client_ip`` is the client's address (behind a trusted proxy, the one
    its PROXY header gives); ``listener`` is ``smtp``, ``submission``,
    ``submissions``, or ``local`` for ``twisted-mta-sendmail``; ``user``
    is the authenticated login (for ``local``, the local user who sent it).
    """

    client_ip: str
    listener: str
    helo: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class TransactionInfo:
    """One message's envelope so far."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class MessageInfo:
    """A message received in full, before it is acknowledged.

    ``headers`` is its header block parsed (our ``Received`` first);
    ``open()`` gives a binary file of the whole message from its first
    header, with LF line endings; ``results`` are the authentication
    results that the policies before this one gave for the message.
    """

    headers: Message
    size: int
    open: Callable[[], BinaryIO]
    results: tuple[AuthResult, ...] = ()


@dataclass(frozen=True)
class EnvelopeInfo:
    """A stored message on its way out: ``client_ip`` and ``listener``
    tell where it came from, ``user`` who sent it when authenticated."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    client_ip: str | None = None
    listener: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class DeliveryResult:
    """The final result for one recipient: ``status`` is ``sent`` or
    ``bounced``; ``relay`` is ``local`` or the host that answered;
    ``detail`` the reply or our reason."""

    status: str
    relay: str
    detail: str


class IPolicyPeers(Interface):
    """The other processes that run the same policies (``[limits]
    workers``): what a policy counts in one of them, it can tell the others,
    so that a limit holds over all.  A policy tells and listens on a topic
    of its own, e.g. its name."""

    def tell(topic: str, payload: str) -> None:
        """Pass ``payload`` to the listener of ``topic`` in every other
        process, soon; no answer."""

    def listen(topic: str, heard: Callable[[str], None]) -> None:
        """Call ``heard(payload)`` for what the others tell on ``topic``; a
        later listener of a topic replaces the earlier (a reload makes the
        policies anew)."""


@implementer(IPolicyPeers)
class NoPeers:
    """One process: no one to tell, nothing to hear."""

    def tell(self, topic: str, payload: str) -> None:
        pass

    def listen(self, topic: str, heard: Callable[[str], None]) -> None:
        pass


NO_PEERS = NoPeers()


@dataclass(frozen=True)
class PolicyContext:
    """What a factory may use to make its policy.

    ``state_dir`` is a folder of the plugin's own under the spool, for
    what it must remember across restarts; ``resolver`` is a
    ``twisted.names`` resolver using ``[relay] resolvers``;
    ``trusted_networks`` are ``[relay] networks``; ``peers``
    (:class:`IPolicyPeers`) the other processes running the same policies.
    """

    reactor: Any
    hostname: str
    state_dir: Path
    resolver: Any
    trusted_networks: Sequence[Any] = field(default_factory=tuple)
    peers: IPolicyPeers = NO_PEERS


class IMailPolicy(Interface):
    """Hooks at each stage of a message; every one is optional.

    Each returns None (go on), a :class:`Verdict`, or a Deferred of one.
    """

    def connect(session: SessionInfo) -> Verdict | None:
        """A client connected (SMTP only), before the greeting."""

    def helo(session: SessionInfo, name: str) -> Verdict | None:
        """HELO or EHLO (SMTP only)."""

    def mail_from(session: SessionInfo, sender: str, params: Mapping[str, str]) -> Verdict | None:
        """The envelope sender (empty for ``<>``) and MAIL's parameters."""

    def rcpt_to(
        session: SessionInfo,
        transaction: TransactionInfo,
        recipient: str,
        params: Mapping[str, str],
    ) -> Verdict | None:
        """A recipient that the server would accept."""

    def message(
        session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> Verdict | None:
        """The whole message, after the final dot and before the ``250``;
        ``Verdict.proceed(headers)`` prepends headers."""

    def outbound(envelope: EnvelopeInfo, message: MessageInfo) -> Verdict | None:
        """Before each attempt to relay the message to ``envelope.recipients``:
        ``Verdict.proceed(headers)`` prepends headers (a signature); a
        refusal fails the attempt, temporarily or for good."""

    def delivered(envelope: EnvelopeInfo, recipient: str, result: DeliveryResult) -> None:
        """A recipient's final result; the answer is not used."""


class IMailPolicyFactory(Interface):
    """A named policy that ``[plugins] enabled`` can name."""

    name = Attribute("The name in [plugins] enabled and [plugins.NAME].")
    description = Attribute("One line for twistd mta --help-plugins.")
    requires = Attribute(
        "Optional: names of plugins that must be enabled before this one"
        " (whose results it reads in MessageInfo.results)."
    )

    def policy(options: Mapping[str, Any], context: PolicyContext) -> IMailPolicy:
        """Make the policy from its ``[plugins.NAME]`` options; raise
        ``ValueError`` (or any exception) naming what is wrong with them."""
