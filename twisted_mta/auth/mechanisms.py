"""SASL mechanisms for SMTP AUTH: PLAIN, LOGIN and CRAM-MD5.

Each is a Twisted challenger: an object with ``getChallenge``,
``setResponse`` and ``moreChallenges`` (``IChallengeResponse``) that is
also the credentials handed to the portal.  Twisted's own classes ignore
the PLAIN authorization identity, crash on malformed input, use a
non-cryptographic CRAM-MD5 challenge with no real hostname, and compare
with ``==`` (audit 2.4); these do not.

A malformed response raises ``MalformedResponse``, which the server turns
into ``501 5.5.2``.
"""

from __future__ import annotations

import hmac
import secrets
import time

from twisted.cred.credentials import (
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.mail.interfaces import IChallengeResponse
from zope.interface import implementer

from twisted_mta.auth.cram import cram_context, hmac_md5_from_context

MAX_FIELD = 1024


class MalformedResponse(ValueError):
    """The client's SASL response breaks the mechanism's syntax."""


def _utf8(value: bytes, what: str) -> str:
    if not value or len(value) > MAX_FIELD or b"\0" in value:
        raise MalformedResponse(f"bad {what}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedResponse(f"{what} is not UTF-8") from None


@implementer(IChallengeResponse, IUsernamePassword)
class Plain:
    """RFC 4616.  The authorization identity must be empty or the login."""

    name = b"PLAIN"

    def __init__(self) -> None:
        self.username: bytes = b""
        self.password: bytes = b""
        self._done = False

    def getChallenge(self) -> bytes:
        return b""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise MalformedResponse("PLAIN needs authzid NUL authcid NUL passwd")
        authzid, authcid, password = parts
        login = _utf8(authcid, "user name")
        if not password or len(password) > MAX_FIELD:
            raise MalformedResponse("bad password")
        if authzid and authzid != authcid:
            raise MalformedResponse("authorization identity must be empty or the login")
        self.username = login.encode("utf-8")
        self.password = password
        self._done = True

    def moreChallenges(self) -> bool:
        return not self._done

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)


@implementer(IChallengeResponse, IUsernamePassword)
class Login:
    """The LOGIN mechanism, with the prompts Outlook and phones expect."""

    name = b"LOGIN"
    _PROMPTS = (b"Username:", b"Password:")

    def __init__(self) -> None:
        self.username: bytes = b""
        self.password: bytes = b""
        self._answers: list[bytes] = []

    def getChallenge(self) -> bytes:
        return self._PROMPTS[len(self._answers)]

    def setResponse(self, response: bytes) -> None:
        if not self._answers:
            self.username = _utf8(response, "user name").encode("utf-8")
        elif not response or len(response) > MAX_FIELD:
            raise MalformedResponse("bad password")
        else:
            self.password = response
        self._answers.append(response)

    def moreChallenges(self) -> bool:
        return len(self._answers) < 2

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)


@implementer(IChallengeResponse, IUsernameHashedPassword)
class CramMD5:
    """RFC 2195, with a challenge from ``secrets`` naming our host."""

    name = b"CRAM-MD5"

    def __init__(self, hostname: str) -> None:
        self.challenge = (
            f"<{secrets.randbelow(2**63)}.{int(time.time())}@{hostname}>".encode("ascii")
        )
        self.username: bytes = b""
        self.response: str = ""

    def getChallenge(self) -> bytes:
        return self.challenge

    def setResponse(self, response: bytes) -> None:
        name, space, digest = response.rpartition(b" ")
        if not space or len(digest) != 32:
            raise MalformedResponse("CRAM-MD5 needs 'user digest'")
        try:
            self.response = digest.decode("ascii")
            bytes.fromhex(self.response)
        except (UnicodeDecodeError, ValueError):
            raise MalformedResponse("digest is not hex") from None
        self.username = _utf8(name, "user name").encode("utf-8")

    def moreChallenges(self) -> bool:
        return not self.response

    def checkPassword(self, password: bytes) -> bool:
        """For checkers that hold plaintext passwords (strcred's file, memory)."""
        return self.check_context(cram_context(password))

    def check_context(self, context: str) -> bool:
        """For stored ``{CRAM-MD5}`` contexts."""
        expected = hmac_md5_from_context(context, self.challenge)
        return hmac.compare_digest(expected, self.response.lower())


def challengers(mechanisms: list[str], hostname: str) -> dict[bytes, object]:
    """Twisted's ``challengers`` mapping for the named mechanisms."""
    makers = {
        "PLAIN": Plain,
        "LOGIN": Login,
        "CRAM-MD5": lambda: CramMD5(hostname),
    }
    return {name.encode("ascii"): makers[name] for name in mechanisms}
