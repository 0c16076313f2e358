"""The ``dkim`` plugin: DKIM signatures (RFC 6376, RFC 8463), made and checked.

One policy with one hook, ``message``, that does one of two things:

* the mail our users submit (an authenticated user, or local submission
  through ``twisted-mta-sendmail``) is signed by :mod:`.sign`;
* with ``verify`` (the default), the mail that arrives on the ``smtp``
  listener from elsewhere (not local, not from ``[relay] networks``, the
  same exemption as the ``spf`` plugin) has its signatures verified by
  :mod:`.verify`, one ``dkim=`` result each for the server's
  ``Authentication-Results`` header (and for the policies after this one,
  such as DMARC).

Our own signatures are never verified: submitted mail is only signed.
Options, the key folder and ``twisted-mta dkim keygen`` are described in
``docs/plugins/dkim.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.interfaces import (
    AuthResult,
    IMailPolicy,
    MessageInfo,
    Network,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
)
from twisted_mta.mail.dkimkeys import valid_name
from twisted_mta.policies import BuiltinFactory, from_elsewhere
from twisted_mta.policies.dkim.sign import KeyFolder, Signer
from twisted_mta.policies.dkim.verify import Verifier

OPTIONS = ("keys", "selector", "sign", "verify")
DEFAULT_KEYS = "dkim"
DEFAULT_SELECTOR = "mta"
SIGN_MODES = ("authenticated",)
_log = Logger()


def keys_folder(value: Any, spool: Path) -> Path:
    """The ``keys`` option: an absolute folder, or one under the spool."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"keys: expected a folder, not {value!r}")
    return spool / value if not os.path.isabs(value) else Path(value)


@implementer(IMailPolicy)
class DKIMPolicy:
    """Signs submitted mail; verifies arriving mail when given a verifier."""

    def __init__(
        self, signer: Signer, verifier: Verifier | None, trusted: Sequence[Network] = ()
    ) -> None:
        self.signer = signer
        self.verifier = verifier
        self.trusted = tuple(trusted)

    def message(
        self, session: SessionInfo, transaction: TransactionInfo, message: MessageInfo
    ) -> defer.Deferred[Verdict | None] | None:
        if session.user is not None or session.listener == "local":
            return self.signer.sign_message(transaction, message)
        if self.verifier is None or not from_elsewhere(session, self.trusted):
            return None
        d = self.verifier.verify_message(message)
        d.addCallback(self._verified, transaction)
        return d

    def _verified(self, results: list[AuthResult], transaction: TransactionInfo) -> Verdict:
        for result in results:
            _log.info(
                "dkim: id={queue_id} {result} d={domain} s={selector}{reason}",
                queue_id=transaction.queue_id,
                result=result.result,
                domain=result.property("header.d") or "-",
                selector=result.property("header.s") or "-",
                reason=f" ({result.reason})" if result.reason else "",
            )
        return Verdict.proceed(results=results)


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
    verify = options.get("verify", True)
    if not isinstance(verify, bool):
        raise ValueError(f"verify: expected true or false, not {verify!r}")
    signer = Signer(KeyFolder(folder, selector.lower()), context.reactor)
    verifier = Verifier(context.resolver, context.reactor) if verify else None
    return DKIMPolicy(signer, verifier, context.trusted_networks)


factory = BuiltinFactory(
    "dkim",
    "Sign submitted mail with DKIM (RSA or Ed25519 keys per From: domain);"
    " verify the signatures of arriving mail",
    make_policy,
)
