"""Password schemes of the users file, in Dovecot's ``{SCHEME}data`` form.

``{ARGON2ID}`` (argon2-cffi), ``{BLF-CRYPT}`` (bcrypt; ``$2y$``, ``$2b$``
and ``$2a$``), ``{CRAM-MD5}`` (the HMAC-MD5 context, see ``cram``) and
``{PLAIN}``.  Every comparison is constant-time and byte-exact (a password
is never decoded before it is compared).  Argon2 and bcrypt are slow on
purpose; callers run ``verify`` in a thread.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from twisted_mta.auth.cram import cram_context, is_context

SCHEMES = ("argon2id", "blf-crypt", "cram-md5", "plain")
_STORED = re.compile(r"\{([A-Za-z0-9.-]+)\}(.*)", re.S)
_argon2 = PasswordHasher()


class UnknownScheme(ValueError):
    """The stored password names a scheme we cannot verify."""


@dataclass(frozen=True)
class StoredPassword:
    scheme: str  # upper case, as in the file
    data: str

    @classmethod
    def parse(cls, field: str) -> "StoredPassword":
        match = _STORED.fullmatch(field)
        if not match:
            raise UnknownScheme("password field has no {SCHEME} prefix")
        scheme = match.group(1).upper()
        if scheme.lower() not in SCHEMES:
            raise UnknownScheme(scheme)
        return cls(scheme, match.group(2))

    @property
    def is_slow(self) -> bool:
        return self.scheme in ("ARGON2ID", "BLF-CRYPT")

    @property
    def cost(self) -> str:
        """What decides how long ``verify`` takes: the scheme and its
        parameters (bcrypt's rounds, argon2's version, memory, time and lanes)."""
        if self.scheme == "BLF-CRYPT":
            return "BLF-CRYPT$" + self.data[4:6]
        if self.scheme == "ARGON2ID":
            return "ARGON2ID" + self.data.rsplit("$", 2)[0]
        return self.scheme

    def cram_context(self) -> str | None:
        """The HMAC-MD5 context CRAM-MD5 needs, if this scheme keeps one."""
        if self.scheme == "PLAIN":
            return cram_context(self.data.encode("utf-8"))
        if self.scheme == "CRAM-MD5" and is_context(self.data):
            return self.data.lower()
        return None

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` matches; never raises for a wrong password."""
        if self.scheme == "PLAIN":
            return hmac.compare_digest(self.data.encode("utf-8"), password)
        if self.scheme == "CRAM-MD5":
            return is_context(self.data) and hmac.compare_digest(
                cram_context(password), self.data.lower()
            )
        if self.scheme == "BLF-CRYPT":
            return _verify_bcrypt(self.data, password)
        return _verify_argon2(self.data, password)


def _verify_bcrypt(data: str, password: bytes) -> bool:
    stored = data.encode("ascii", "replace")
    if stored.startswith(b"$2y$"):
        stored = b"$2b$" + stored[4:]
    try:
        return bcrypt.checkpw(password, stored)
    except ValueError:
        return False


def _verify_argon2(data: str, password: bytes) -> bool:
    try:
        return _argon2.verify(data, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def hash_password(scheme: str, password: str) -> str:
    """The users-file field for ``password`` under ``scheme``."""
    secret = password.encode("utf-8")
    scheme = scheme.lower()
    if scheme == "argon2id":
        return "{ARGON2ID}" + _argon2.hash(secret)
    if scheme == "blf-crypt":
        return "{BLF-CRYPT}" + bcrypt.hashpw(secret, bcrypt.gensalt()).decode("ascii")
    if scheme == "cram-md5":
        return "{CRAM-MD5}" + cram_context(secret)
    if scheme == "plain":
        return "{PLAIN}" + password
    raise UnknownScheme(scheme)


def slowest(stored: Iterable[StoredPassword]) -> StoredPassword | None:
    """The slow hash among ``stored`` that takes longest to verify.

    Each kind of cost is timed once; a wrong password against the result
    costs what a check of the slowest account costs.  Run it in a thread.
    """
    kinds = {password.cost: password for password in stored if password.is_slow}
    if len(kinds) < 2:
        return next(iter(kinds.values()), None)
    return max(kinds.values(), key=_verify_time)


def _verify_time(stored: StoredPassword) -> float:
    started = time.perf_counter()
    stored.verify(b"\0not the password\0")
    return time.perf_counter() - started
