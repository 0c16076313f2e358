"""twistd plugin ``mta`` and the ``mta-users`` credentials checker.

``twistd -n mta [--config FILE] [--auth mta-users:etc/users ...]``
"""

from twisted.application.service import ServiceMaker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

mta = ServiceMaker(
    "twisted-mta",
    "twisted_mta.tap",
    "An ESMTP mail transfer agent: MX, submission, Maildir delivery, relay",
    "mta",
)


@implementer(ICheckerFactory, IPlugin)
class UsersFileCheckerFactory:
    """``--auth mta-users:PATH``: a twisted-mta users file (Dovecot format)."""

    authType = "mta-users"
    authHelp = (
        "A twisted-mta users file: 'address:{SCHEME}data' lines with the schemes "
        "ARGON2ID, BLF-CRYPT, CRAM-MD5 and PLAIN.  Re-read when it changes."
    )
    argStringFormat = "The path of the users file."
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def generateChecker(self, argstring: str):
        from twisted_mta.auth.checker import users_file_checker

        return users_file_checker(argstring)


users_file = UsersFileCheckerFactory()
