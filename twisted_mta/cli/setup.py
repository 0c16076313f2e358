"""``twisted-mta init``: the first config, users and aliases of a server."""

from __future__ import annotations

import argparse
from pathlib import Path

from twisted_mta.cli.common import CommandError
from twisted_mta.config.initial import (
    DEFAULT_FOLDER,
    DEFAULT_SPOOL,
    DEFAULT_USER,
    InitError,
    initialise,
    planned,
)


def add_parser(commands) -> None:
    init = commands.add_parser(
        "init", help="write a first config, users and aliases file, and the spool"
    )
    init.add_argument(
        "folder", nargs="?", type=Path, help=f"where the files go (default: {DEFAULT_FOLDER})"
    )
    init.add_argument(
        "--user", default=DEFAULT_USER, help=f"the account the daemon runs as ({DEFAULT_USER})"
    )
    init.add_argument("--hostname", help="the server's name (default: this machine's)")
    init.add_argument("--domain", help="the mail domain (default: the hostname's domain)")
    init.add_argument("--spool", type=Path, help=f"the spool (default: {DEFAULT_SPOOL})")
    init.add_argument("--postmaster", default="", help="where postmaster@ mail goes")
    init.set_defaults(run=init_command)


def init_command(args: argparse.Namespace) -> int:
    plan = planned(
        folder=args.folder,
        user=args.user,
        hostname=args.hostname,
        domain=args.domain,
        spool=args.spool,
        postmaster=args.postmaster,
    )
    try:
        steps = initialise(plan)
    except (InitError, OSError) as error:
        raise CommandError(str(error)) from None
    print("\n".join(steps))
    return 0
