"""``twisted-mta passwd``: add an account to the users file, or change it."""

from __future__ import annotations

import argparse
import getpass
import sys

from twisted_mta.auth.passwords import SCHEMES, hash_password
from twisted_mta.cli.common import CommandError, add_config_option, configured
from twisted_mta.directory.users import set_password_line


def add_parser(commands) -> None:
    passwd = commands.add_parser("passwd", help="add or change an account's password")
    passwd.add_argument("address", help="the login, a full address")
    add_config_option(passwd)
    passwd.add_argument("--scheme", choices=SCHEMES, default="argon2id")
    passwd.add_argument("--stdin", action="store_true", help="read the password from stdin")
    passwd.set_defaults(run=passwd_command)


def passwd_command(args: argparse.Namespace) -> int:
    config = configured(args, check_files=False)
    if config.users.file is None:
        raise CommandError("the config names no [users] file")
    address = args.address.strip()
    local, at, domain = address.rpartition("@")
    if not (local and at and domain) or any(c in address for c in ":# \t\r\n"):
        raise CommandError(f"not a valid login address: {address!r}")
    password = _read_password(args.stdin)
    if args.scheme == "plain" and ":" in password:
        raise CommandError("a {PLAIN} password cannot contain ':'")
    replaced = set_password_line(config.users.file, address, hash_password(args.scheme, password))
    verb = "replaced" if replaced else "added"
    print(f"{verb} {address} in {config.users.file} ({args.scheme})")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the passwords differ")
    if not password:
        raise CommandError("empty password refused")
    return password
