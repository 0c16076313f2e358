"""The factory of one listener: every connection gets its own ``MTAServer``.

What a listener's connections share (portal, settings, mechanisms) can be
replaced while it runs (``reconfigure``); open connections keep theirs.
As with Twisted's ``SMTPFactory``, ``protocol`` is the class built (an
``MTAServer`` subclass, given the same arguments) and ``domain`` the name
its servers give themselves; by default, the settings' hostname.
"""

from __future__ import annotations

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress, IOpenSSLServerConnectionCreator
from twisted.mail import smtp

from twisted_mta.auth.throttle import AuthThrottle
from twisted_mta.smtp.limits import ConnectionLimits, ServerSettings, Sessions
from twisted_mta.smtp.server import MTAServer


class MTAFactory(smtp.SMTPFactory):
    """Builds ``MTAServer``s for one listener."""

    noisy = False
    protocol: type[MTAServer] = MTAServer
    _domain: bytes | None = None

    def __init__(
        self,
        portal: Portal | None,
        settings: ServerSettings,
        limits: ConnectionLimits,
        context_factory: IOpenSSLServerConnectionCreator | None = None,
        challengers: dict | None = None,
        throttle: AuthThrottle | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        super().__init__(portal)
        self.limits = limits
        self.context_factory = context_factory
        self.throttle = throttle
        self.sessions = sessions if sessions is not None else Sessions()
        self.reconfigure(portal, settings, challengers or {})

    def reconfigure(
        self, portal: Portal | None, settings: ServerSettings, challengers: dict
    ) -> None:
        """What new connections get from now on; open ones keep theirs."""
        self.portal = portal
        self.settings = settings
        self.challengers = challengers

    @property
    def domain(self) -> bytes:
        """The name new servers greet with: the settings' hostname unless set.

        A name set here (or by a subclass) stays through ``reconfigure``.
        """
        if self._domain is not None:
            return self._domain
        return self.settings.hostname.encode("ascii")

    @domain.setter
    def domain(self, name: bytes | str) -> None:
        self._domain = name.encode("ascii") if isinstance(name, str) else name

    def buildProtocol(self, addr: IAddress) -> MTAServer:
        server = self.protocol(
            self.settings,
            self.limits,
            dict(self.challengers),
            self.context_factory,
            self.throttle,
            sessions=self.sessions,
        )
        server.factory = self
        server.portal = self.portal
        server.host = self.domain
        return server
