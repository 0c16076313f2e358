"""The ``twisted-mta`` administration command."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence

from twisted_mta.auth.passwords import SCHEMES, hash_password
from twisted_mta.auth.usersfile import set_password_line
from twisted_mta.config import ConfigError, dump_config, load_config


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as error:
        print(f"twisted-mta: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_config(config))
    return 0


def _passwd(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, os.environ, check_files=False)
    except ConfigError as error:
        print(f"twisted-mta: {error}", file=sys.stderr)
        return 1
    if config.users.file is None:
        print("twisted-mta: the config names no [users] file", file=sys.stderr)
        return 1
    address = args.address.strip()
    local, at, domain = address.rpartition("@")
    if not (local and at and domain) or any(c in address for c in ":# \t\r\n"):
        print(f"twisted-mta: not a valid login address: {address!r}", file=sys.stderr)
        return 1
    password = _read_password(args.stdin)
    if password is None:
        return 1
    if args.scheme == "plain" and ":" in password:
        print("twisted-mta: a {PLAIN} password cannot contain ':'", file=sys.stderr)
        return 1
    replaced = set_password_line(config.users.file, address, hash_password(args.scheme, password))
    verb = "replaced" if replaced else "added"
    print(f"{verb} {address} in {config.users.file} ({args.scheme})")
    return 0


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("twisted-mta: the passwords differ", file=sys.stderr)
            return None
    if not password or "\n" in password or "\r" in password:
        print("twisted-mta: empty password refused", file=sys.stderr)
        return None
    return password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twisted-mta", description="Manage twisted-mta.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", help="the TOML config file (default: $TWISTED_MTA_CONFIG)")
    check.set_defaults(run=_check_config)
    passwd = commands.add_parser("passwd", help="add or change an account's password")
    passwd.add_argument("address", help="the login, a full address")
    passwd.add_argument("--config", help="the TOML config file (default: $TWISTED_MTA_CONFIG)")
    passwd.add_argument("--scheme", choices=SCHEMES, default="argon2id")
    passwd.add_argument("--stdin", action="store_true", help="read the password from stdin")
    passwd.set_defaults(run=_passwd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
