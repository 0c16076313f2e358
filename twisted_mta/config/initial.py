"""The first files of a server, as ``twisted-mta init`` writes them.

A short, commented config for a real MX (ports 25, 587 and 465, the
system-wide place where every command finds it, the authentication
plugins on), an empty users file and an aliases file with the RFC 2142
role addresses; the spool and its DKIM key folder, owned by the account
the daemon runs as.  Existing files are never replaced.  The whole
config, every key with its default, is ``twisted-mta check-config``.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from twisted_mta.config.load import SYSTEM_CONFIG, load_config
from twisted_mta.storage.files import write_atomically

DEFAULT_FOLDER = SYSTEM_CONFIG.parent
DEFAULT_SPOOL = Path("/var/spool/twisted-mta")
DEFAULT_USER = "mta"

CONFIG = """\
# twisted-mta configuration, written by `twisted-mta init` on {date}.
#
# Every command finds this file without --config.  Check it, and see every
# key with its default, with:   twisted-mta check-config
# Relative paths are relative to this folder.

# The name in the banner, EHLO and Received: headers; its address needs a
# PTR record giving this name back.
hostname = "{hostname}"
# queue/, mail/ (the maildirs), maildrop/, tls/ and dkim/; owned by {user}.
spool = "{spool}"

[listen]
smtp = ["tcp:25"]
submission = ["tcp:587"]
submissions = ["tcp:465"]

[tls]
# A certificate for {hostname}, e.g. Let's Encrypt's (readable by {user}).
# Without one a self-signed certificate is made under the spool.
# certificate = "/etc/letsencrypt/live/{hostname}/fullchain.pem"
# private_key = "/etc/letsencrypt/live/{hostname}/privkey.pem"

[domains]
# Mail for these domains goes into maildirs under the spool.
local = ["{domain}"]

[users]
# One account a line; add one with:  twisted-mta passwd ADDRESS
file = "users"

[aliases]
file = "aliases"

[relay]
# Clients that may relay without AUTH; submission always needs AUTH.
networks = ["127.0.0.0/8", "::1/128"]

[delivery]
# Dovecot on the same maildirs: the group its mail processes use (README).
# group = "mailstore"

[metrics]
# Prometheus text at /metrics and a health check at /healthz.
# listen = ["tcp:9325:interface=127.0.0.1"]

[plugins]
# SPF, DKIM and DMARC results on arriving mail; DKIM signatures on mail
# your users send, once a key exists (twisted-mta dkim keygen {domain}).
enabled = ["spf", "dkim", "dmarc"]
[plugins.dmarc]
enforce = false
"""

USERS = """\
# twisted-mta users: one account a line, ADDRESS:{{SCHEME}}HASH (a Dovecot
# passwd-file).  Add or change one with:  twisted-mta passwd ADDRESS
"""

ALIASES = """\
# twisted-mta aliases:  NAME: TARGET, TARGET, ...   (see the README)
# postmaster@ every local domain is always accepted; without an alias its
# mail stays in {spool}/mail/<domain>/postmaster/.
{postmaster}
abuse: postmaster
hostmaster: postmaster
"""


class InitError(Exception):
    """A one-line reason why nothing (more) was written."""


@dataclass(frozen=True)
class Plan:
    """What ``init`` writes, and for whom."""

    folder: Path = DEFAULT_FOLDER
    user: str = DEFAULT_USER
    hostname: str = ""
    domain: str = ""
    spool: Path = DEFAULT_SPOOL
    postmaster: str = ""

    @property
    def config(self) -> Path:
        return self.folder / "mta.toml"

    @property
    def users(self) -> Path:
        return self.folder / "users"

    @property
    def aliases(self) -> Path:
        return self.folder / "aliases"


def planned(
    folder: Path | None = None,
    user: str = DEFAULT_USER,
    hostname: str | None = None,
    domain: str | None = None,
    spool: Path | None = None,
    postmaster: str = "",
) -> Plan:
    """A plan with defaults filled in: the machine's name, and its domain
    (the name without its first label when it has three or more)."""
    name = (hostname or socket.getfqdn()).lower().rstrip(".")
    labels = name.split(".")
    return Plan(
        folder=(folder or DEFAULT_FOLDER).absolute(),
        user=user,
        hostname=name,
        domain=(domain or (".".join(labels[1:]) if len(labels) > 2 else name)).lower(),
        spool=(spool or DEFAULT_SPOOL).absolute(),
        postmaster=postmaster,
    )


def initialise(plan: Plan) -> list[str]:
    """Write the files of ``plan``; the next steps, as lines to print.
    Raises InitError before writing anything if a file exists or the
    account is unknown."""
    owner = _account(plan.user)
    existing = [str(p) for p in (plan.config, plan.users, plan.aliases) if p.exists()]
    if existing:
        raise InitError(f"{', '.join(existing)} exist(s); init writes only new files")
    plan.folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    _make_spool(plan.spool, owner)
    write_atomically(plan.users, USERS.encode(), 0o600, owner)
    write_atomically(plan.aliases, _aliases(plan).encode(), 0o640, owner)
    write_atomically(plan.config, _config(plan).encode(), 0o644)
    load_config(plan.config, {})
    return _next_steps(plan)


def _account(user: str) -> tuple[int, int]:
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise InitError(
            f"no account {user!r}; make one with: useradd --system --user-group"
            f" --home-dir {DEFAULT_SPOOL} --shell /usr/sbin/nologin {user}"
        ) from None
    return account.pw_uid, account.pw_gid


def _make_spool(spool: Path, owner: tuple[int, int]) -> None:
    """The spool (0711: local users' sendmail reaches the maildrop inside)
    and its DKIM key folder, both the daemon's."""
    for folder, mode in ((spool, 0o711), (spool / "dkim", 0o700)):
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        os.chmod(folder, mode)
        os.chown(folder, *owner)


def _config(plan: Plan) -> str:
    return CONFIG.format(
        date=time.strftime("%Y-%m-%d"),
        hostname=plan.hostname,
        domain=plan.domain,
        spool=plan.spool,
        user=plan.user,
    )


def _aliases(plan: Plan) -> str:
    postmaster = (
        f"postmaster: {plan.postmaster}"
        if plan.postmaster
        else f"# postmaster: you@{plan.domain}"
    )
    return ALIASES.format(spool=plan.spool, postmaster=postmaster)


def _first_account(plan: Plan) -> str:
    if plan.postmaster:
        return f"  1. twisted-mta passwd {plan.postmaster}      (postmaster's mail goes there)"
    return (
        f"  1. twisted-mta passwd you@{plan.domain}      (an account; then point"
        f" postmaster at it in {plan.aliases})"
    )


def _next_steps(plan: Plan) -> list[str]:
    group = grp.getgrgid(pwd.getpwnam(plan.user).pw_gid).gr_name
    return [
        f"wrote {plan.config}, {plan.users} and {plan.aliases}; spool {plan.spool}"
        f" (owned by {plan.user}:{group})",
        "next:",
        _first_account(plan),
        f"  2. a certificate for {plan.hostname} in [tls] of {plan.config}",
        f"  3. twisted-mta dkim keygen {plan.domain}     (prints the DKIM record to publish)",
        f"  4. DNS: MX of {plan.domain} -> {plan.hostname}, PTR of its addresses,"
        " SPF, DKIM and DMARC records (README: Deliverability)",
        "  5. install etc/systemd/twisted-mta.service, then:"
        " systemctl enable --now twisted-mta",
        "  6. twisted-mta check-config",
    ]
