"""The ``dkim`` plugin: DKIM signatures (RFC 6376, RFC 8463).

One policy with one hook, ``message``: the mail our users submit (an
authenticated user, or local submission through ``twisted-mta-sendmail``)
is signed by :mod:`.sign`.  Options, the key folder and ``twisted-mta
dkim keygen`` are described in ``docs/plugins/dkim.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from twisted_mta.interfaces import (
    IMailPolicy,
    MessageInfo,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
)
from twisted_mta.mail.dkimkeys import valid_name
from twisted_mta.policies import BuiltinFactory
from twisted_mta.policies.dkim.sign import KeyFolder, Signer

OPTIONS = ("keys", "selector", "sign")
DEFAULT_KEYS = "dkim"
DEFAULT_SELECTOR = "mta"
SIGN_MODES = ("authenticated",)


def keys_folder(value: Any, spool: Path) -> Path:
    """The ``keys`` option: an absolute folder, or one under the spool."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"keys: expected a folder, not {value!r}")
    return spool / value if not os.path.isabs(value) else Path(value)


@implementer(IMailPolicy)
class DKIMPolicy:
    """Signs submitted mail."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> defer.Deferred[Verdict | None] | None:
        if session.user is None and session.listener != "local":
            return None
        return self.signer.sign_message(transaction, message)


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> DKIMPolicy:
    """The policy for ``[plugins.dkim]``; raises ValueError naming the
    option that is wrong.  A relative ``keys`` is under the spool (the
    parent of the plugins' state folders)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: unknown option (known: {', '.join(OPTIONS)})")
    folder = keys_folder(options.get("keys", DEFAULT_KEYS), context.state_dir.parent.parent)
    selector = options.get("selector", DEFAULT_SELECTOR)
    if not isinstance(selector, str) or not valid_name(selector):
        raise ValueError(f"selector: expected a DNS label, not {selector!r}")
    mode = options.get("sign", SIGN_MODES[0])
    if mode not in SIGN_MODES:
        raise ValueError(f"sign: expected one of {', '.join(SIGN_MODES)}, not {mode!r}")
    return DKIMPolicy(Signer(KeyFolder(folder, selector.lower()), context.reactor))


factory = BuiltinFactory(
    "dkim",
    "Sign submitted mail with DKIM (RSA or Ed25519 keys per From: domain)",
    make_policy,
)
