"""What a relay attempt takes and what it gives back.

* :class:`RelayTarget` is one host: its name (what TLS verifies and logs
  show), its addresses in the order to try, port, TLS mode (see
  :mod:`twisted_mta.relay.connect`) and smart host credentials.
* :class:`Timeouts` are the seconds each step may take.
* :class:`Outgoing` is one queued message: envelope, file and what its
  content needs of the server (SIZE, 8BITMIME, SMTPUTF8).
* A :class:`RecipientResult` has ``code`` and ``status`` (the verdict:
  ``delivered`` for 2.x.x, ``permanent`` for 5.x.x, else retry later) and
  ``text``: the remote's reply verbatim when ``in_reply_to`` names the
  command it answered (``"RCPT TO"``, ``"end of DATA"``, ``"greeting"``
  ...), for a DSN's Diagnostic-Code; else our own Postfix-worded reason
  ("connect to mx[192.0.2.1]:25: Connection refused").  An
  :class:`AttemptResult` holds one per recipient, in order.
* A :class:`RelayError` fails an attempt for every recipient not yet
  decided; :func:`temporary` and :func:`permanent` make our own ones,
  :class:`TLSFailed` is the one a failed TLS handshake gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

TLSMode = Literal["may", "starttls", "implicit", "none"]
TLS_MODES: frozenset[str] = frozenset(get_args(TLSMode))

__all__ = [
    "TLS_MODES",
    "AttemptResult",
    "Outgoing",
    "RecipientResult",
    "RelayError",
    "RelayTarget",
    "TLSFailed",
    "TLSMode",
    "Timeouts",
    "permanent",
    "temporary",
]


@dataclass(frozen=True)
class RelayTarget:
    """One host to relay through, over its addresses in order."""

    name: str
    addresses: tuple[str, ...]
    port: int = 25
    tls: TLSMode = "may"
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {self.tls!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("a username needs a password and the other way round")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait; the defaults are RFC 5321 4.5.3.2's and Postfix's.

    ``command`` covers each reply outside the body (the greeting, EHLO,
    STARTTLS and its handshake, AUTH, MAIL, RCPT, DATA, RSET, QUIT),
    ``data_block`` each write of the body, ``data_end`` the reply to the
    final dot.  ``[relay]`` sets ``connect``, ``command`` and ``data_end``
    (``connect_timeout``, ``command_timeout``, ``data_timeout``).
    """

    connect: float = 30.0
    command: float = 300.0
    data_block: float = 180.0
    data_end: float = 600.0


@dataclass(frozen=True)
class Outgoing:
    """One queued message: the envelope and the ``.msg`` file (LF ends).

    ``size`` is what SIZE= declares; ``eight_bit`` asks for BODY=8BITMIME,
    ``smtputf8`` for SMTPUTF8 (also implied by a non-ASCII address);
    ``prefix`` is header lines sent before the file (a policy's signature);
    ``queue_id`` names the message in log lines.
    """

    sender: str
    recipients: tuple[str, ...]
    path: Path
    size: int
    eight_bit: bool = False
    smtputf8: bool = False
    prefix: bytes = b""
    queue_id: str = ""


@dataclass(frozen=True)
class RecipientResult:
    """The verdict for one recipient of one attempt.

    ``text`` is the remote's reply, verbatim, when ``in_reply_to`` names
    the command it answered (``"RCPT TO"``, ``"end of DATA"`` ...), ready
    for a DSN's Diagnostic-Code; otherwise it is our own description.
    """

    address: str
    code: int
    status: str
    text: str
    in_reply_to: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status.startswith("2")

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


@dataclass(frozen=True)
class AttemptResult:
    """``remote`` is ``"host[ip]:port"``, or None if no connection was made."""

    remote: str | None
    results: tuple[RecipientResult, ...]


class RelayError(Exception):
    """An attempt failed for every recipient not yet decided.

    ``code`` and ``status`` are the verdict (their first digits agree);
    ``text`` is the remote's reply when ``in_reply_to`` names the command
    it answered, else our own description.  ``remote`` is
    ``"host[ip]:port"`` once a connection was made.
    """

    def __init__(
        self,
        code: int,
        status: str,
        text: str,
        in_reply_to: str | None = None,
        remote: str | None = None,
    ) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text
        self.in_reply_to = in_reply_to
        self.remote = remote

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


class TLSFailed(RelayError):
    """The TLS handshake failed (or the certificate did not verify)."""


def temporary(status: str, text: str, remote: str | None = None) -> RelayError:
    """A failure of ours (not a remote reply) worth retrying later."""
    return RelayError(451, status, text, remote=remote)


def permanent(status: str, text: str, remote: str | None = None) -> RelayError:
    """A failure of ours (not a remote reply) that retrying cannot cure."""
    return RelayError(554, status, text, remote=remote)
