"""The users-file credentials checker.

It verifies PLAIN and LOGIN logins (``IUsernamePassword``) against every
scheme of the file, and CRAM-MD5 logins (``IUsernameHashedPassword``
carrying a challenge and a response) against ``{CRAM-MD5}`` contexts and
``{PLAIN}`` passwords.  Slow hashes are checked in Twisted's thread pool so
one login cannot stall other sessions.

A PLAIN or LOGIN check costs the same whoever the user: an unknown user,
or one stored as ``{CRAM-MD5}`` or ``{PLAIN}``, costs a check of the
slowest hash in the file, so timing tells none of them from an account
with that hash.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from zope.interface import directlyProvides, implementer, providedBy

from twisted_mta.auth.passwords import StoredPassword, UnknownScheme, slowest
from twisted_mta.directory.resolve import Directory


@implementer(ICredentialsChecker)
class UsersFileChecker:
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(
        self,
        users: Callable[[], Mapping[str, str]],
        in_thread: Callable[..., defer.Deferred] = threads.deferToThread,
    ) -> None:
        self._users = users
        self._in_thread = in_thread
        self._padding = _Padding()

    def requestAvatarId(self, credentials) -> defer.Deferred:
        users = self._users()
        login = _text(credentials.username).lower()
        stored = _stored(users, login)
        if hasattr(credentials, "check_context"):
            context = stored.cram_context() if stored else None
            if context is not None and credentials.check_context(context):
                return defer.succeed(login.encode("utf-8"))
            return defer.fail(UnauthorizedLogin())
        password = _bytes(credentials.password)
        if stored is not None and stored.is_slow:
            d = self._in_thread(stored.verify, password)
        else:
            d = self._in_thread(self._padded_verify, users, stored, password)
        return d.addCallback(_avatar_or_refusal, login)

    def _padded_verify(
        self, users: Mapping[str, str], stored: StoredPassword | None, password: bytes
    ) -> bool:
        padding = self._padding.of(users)
        if padding is not None:
            padding.verify(password)
        return stored is not None and stored.verify(password)


class _Padding:
    """The slowest hash of the users file, found again when it changes.

    Used from the thread pool; timing the kinds of hash is done once for
    each set of kinds the file holds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: Mapping[str, str] | None = None
        self._kinds: frozenset[str] = frozenset()
        self._slowest: StoredPassword | None = None

    def of(self, users: Mapping[str, str]) -> StoredPassword | None:
        with self._lock:
            if users is not self._users:
                stored = [s for field in users.values() if (s := _parse(field)) and s.is_slow]
                kinds = frozenset(s.cost for s in stored)
                if kinds != self._kinds:
                    self._kinds, self._slowest = kinds, slowest(stored)
                self._users = users
            return self._slowest


def _stored(users: Mapping[str, str], login: str) -> StoredPassword | None:
    field = users.get(login)
    return None if field is None else _parse(field)


def _parse(field: str) -> StoredPassword | None:
    try:
        return StoredPassword.parse(field)
    except UnknownScheme:
        return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _avatar_or_refusal(matched: bool, login: str) -> bytes:
    if not matched:
        raise UnauthorizedLogin()
    return login.encode("utf-8")


@implementer(ICredentialsChecker)
class FirstMatch:
    """Ask several checkers in turn; the first that accepts wins.

    A cred Portal keeps one checker per credentials interface, but the users
    file and every ``--auth`` checker must all be consulted.
    """

    def __init__(self, checkers: list) -> None:
        self.checkers = checkers
        self.credentialInterfaces = tuple(
            {i for checker in checkers for i in checker.credentialInterfaces}
        )

    def requestAvatarId(self, credentials) -> defer.Deferred:
        candidates = [
            checker
            for checker in self.checkers
            if any(i.providedBy(credentials) for i in checker.credentialInterfaces)
        ]
        return self._try(candidates, credentials)

    @defer.inlineCallbacks
    def _try(self, candidates, credentials):
        forms = _forms(credentials)
        for checker in candidates:
            # strcred's checkers disagree on types: "file" keys its users by
            # bytes, "memory" by str; each gets both forms to look at.  Ours
            # takes bytes, and is asked once: its check is the slow hash.
            for form in (credentials,) if isinstance(checker, UsersFileChecker) else forms:
                try:
                    avatar = yield defer.maybeDeferred(checker.requestAvatarId, form)
                except UnauthorizedLogin:
                    continue
                return avatar
        raise UnauthorizedLogin()


def _forms(credentials) -> tuple:
    """The credentials, and their str form if they are valid UTF-8.

    Invalid UTF-8 has no str form: decoding it leniently would let a
    password holding U+FFFD match any invalid byte.
    """
    try:
        return credentials, _TextCredentials(credentials)
    except UnicodeDecodeError:
        return (credentials,)


class _TextCredentials:
    """The same credentials with a str user name and password."""

    def __init__(self, credentials) -> None:
        directlyProvides(self, *providedBy(credentials))
        self._credentials = credentials
        self.username = _text(credentials.username)
        password = getattr(credentials, "password", None)
        if password is not None:
            self.password = _text(password)

    def checkPassword(self, password) -> bool:
        return self._credentials.checkPassword(_bytes(password))

    def __getattr__(self, name: str):
        return getattr(self._credentials, name)


def users_file_checker(path: str) -> UsersFileChecker:
    """A checker on its own watched copy of the users file at ``path``."""
    return UsersFileChecker(Directory(frozenset(), users_file=Path(path)).users)


def cram_md5_warning(mechanisms: Sequence[str], users_file: Path | None) -> str | None:
    """A warning naming the accounts CRAM-MD5 is offered to but cannot check.

    CRAM-MD5 needs the password or Dovecot's HMAC context; an account whose
    client picks CRAM-MD5 on its own otherwise fails every login.
    """
    if "CRAM-MD5" not in mechanisms or users_file is None:
        return None
    users = Directory(frozenset(), users_file=users_file).users()
    unusable = sorted(
        address
        for address, field in users.items()
        if (stored := _parse(field)) is None or stored.cram_context() is None
    )
    if not unusable:
        return None
    return (
        f"warning: [auth] mechanisms offers CRAM-MD5, but these accounts of {users_file}"
        " are stored neither as {CRAM-MD5} nor as {PLAIN} and cannot log in with it: "
        + ", ".join(unusable)
    )
