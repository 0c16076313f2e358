"""What every subcommand of ``twisted-mta`` shares: its one-line errors
and how it finds the config."""

from __future__ import annotations

import argparse
import os

from twisted_mta.config import Config, ConfigError, load_config

CONFIG_HELP = (
    "the TOML config file (default: $TWISTED_MTA_CONFIG, else /etc/twisted-mta/mta.toml)"
)


class CommandError(Exception):
    """A one-line reason to stop with exit status 1."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=CONFIG_HELP)


def configured(args: argparse.Namespace, check_files: bool = True) -> Config:
    """The config the command was pointed at, or found."""
    try:
        return load_config(args.config, os.environ, check_files=check_files)
    except ConfigError as error:
        raise CommandError(str(error)) from None
