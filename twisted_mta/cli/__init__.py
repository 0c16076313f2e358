"""The ``twisted-mta`` administration command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from twisted_mta.cli import accounts, checking, dkim, queue, setup
from twisted_mta.cli.common import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twisted-mta", description="Manage twisted-mta.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (setup, checking, accounts, queue, dkim):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"twisted-mta: {error}", file=sys.stderr)
        return 1
