"""The ``twistd mta`` command line."""

from __future__ import annotations

import os

from twisted.cred import credentials, strcred
from twisted.python import usage

from twisted_mta.config import ConfigError, load_config
from twisted_mta.intake.policies import installed
from twisted_mta.service import build_service
from twisted_mta.tls import TLSError, check_configured_pair


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[--config FILE] [--auth CHECKER ...]"
    longdesc = (
        "Run the twisted-mta mail server.  The config is --config FILE, else "
        "$TWISTED_MTA_CONFIG, else /etc/twisted-mta/mta.toml if it exists, else "
        "the embedded defaults (127.0.0.1 only)."
    )
    optParameters = [
        ["config", "c", None, "the TOML config file"],
    ]
    supportedInterfaces = [
        credentials.IUsernamePassword,
        credentials.IUsernameHashedPassword,
    ]

    def opt_auth(self, description: str) -> None:
        """Specify an authentication method for the server."""
        super().opt_auth(description)
        # Kept as given too: worker processes make their own checkers.
        self.setdefault("auth_descriptions", []).append(description)

    def opt_help_plugins(self) -> None:
        """List the installed policy plugins and exit."""
        factories = installed()
        for name in sorted(factories):
            print(f"{name:20} {factories[name].description}")
        if not factories:
            print("no policy plugins are installed")
        raise SystemExit(0)

    def postOptions(self) -> None:
        """Refuse a config, or a certificate and key, before any port is bound."""
        try:
            config = load_config(self["config"], os.environ)
            check_configured_pair(config.tls.certificate, config.tls.private_key)
        except (ConfigError, TLSError) as error:
            raise SystemExit(f"twistd mta: {error}") from None
        self["mta_config"] = config


def makeService(options: Options):
    return build_service(
        options["mta_config"],
        options.get("credCheckers", []),
        options.get("auth_descriptions", []),
    )
