"""The users-file credentials checker.

It verifies PLAIN and LOGIN logins (``IUsernamePassword``) against every
scheme of the file, and CRAM-MD5 logins (``IUsernameHashedPassword``
carrying a challenge and a response) against ``{CRAM-MD5}`` contexts and
``{PLAIN}`` passwords.  Slow hashes are checked in Twisted's thread pool so
one login cannot stall other sessions; an unknown user costs the same
argon2 work as a known one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from zope.interface import directlyProvides, implementer, providedBy

from twisted_mta.delivery.directory import Directory
from twisted_mta.auth.passwords import StoredPassword, UnknownScheme, dummy_verify


@implementer(ICredentialsChecker)
class UsersFileChecker:
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, users: Callable[[], Mapping[str, str]]) -> None:
        self._users = users

    def requestAvatarId(self, credentials) -> defer.Deferred:
        login = _text(credentials.username).lower()
        stored = self._stored(login)
        if hasattr(credentials, "check_context"):
            context = stored.cram_context() if stored else None
            if context is not None and credentials.check_context(context):
                return defer.succeed(login.encode("utf-8"))
            return defer.fail(UnauthorizedLogin())
        if stored is None:
            d = threads.deferToThread(dummy_verify, _bytes(credentials.password))
            d.addCallback(lambda _: False)
        elif stored.is_slow:
            d = threads.deferToThread(stored.verify, _bytes(credentials.password))
        else:
            d = defer.succeed(stored.verify(_bytes(credentials.password)))
        return d.addCallback(_avatar_or_refusal, login)

    def _stored(self, login: str) -> StoredPassword | None:
        field = self._users().get(login)
        return None if field is None else _parse(field)


def _parse(field: str) -> StoredPassword | None:
    try:
        return StoredPassword.parse(field)
    except UnknownScheme:
        return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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
        text = _TextCredentials(credentials)
        for checker in candidates:
            # strcred's checkers disagree on types: "file" keys its users by
            # bytes, "memory" by str; each gets both forms to look at.
            for form in (credentials, text):
                try:
                    avatar = yield defer.maybeDeferred(checker.requestAvatarId, form)
                except UnauthorizedLogin:
                    continue
                return avatar
        raise UnauthorizedLogin()


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
