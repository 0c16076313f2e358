"""The ``twisted-mta`` administration command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from twisted_mta.config import ConfigError, dump_config, load_config


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as error:
        print(f"twisted-mta: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_config(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twisted-mta", description="Manage twisted-mta.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", help="the TOML config file (default: $TWISTED_MTA_CONFIG)")
    check.set_defaults(run=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
