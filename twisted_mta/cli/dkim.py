"""``twisted-mta dkim keygen``: a DKIM key, and the DNS record to publish."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from twisted_mta.cli.common import CommandError, add_config_option, configured
from twisted_mta.mail import dkimkeys
from twisted_mta.policies.dkim import DEFAULT_KEYS, keys_folder
from twisted_mta.storage.files import write_atomically


def add_parser(commands) -> None:
    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_commands.add_parser("keygen", help="make a key, print its DNS record")
    keygen.add_argument("domain", help="the From: domain the key signs for")
    keygen.add_argument("--selector", default="mta", help="the selector (default: mta)")
    keygen.add_argument("--type", choices=dkimkeys.KEY_TYPES, default="rsa")
    keygen.add_argument("--keys", help="the keys folder (default: [plugins.dkim] keys)")
    add_config_option(keygen)
    keygen.set_defaults(run=_dkim_keygen)


def _dkim_keygen(args: argparse.Namespace) -> int:
    domain, selector = args.domain.lower().rstrip("."), args.selector.lower()
    for what, name in (("domain", domain), ("selector", selector)):
        if not dkimkeys.valid_name(name):
            raise CommandError(f"not a valid {what}: {name!r}")
    folder = Path(args.keys) if args.keys else _configured_keys(args)
    if not folder.is_dir():
        raise CommandError(f"no keys folder {folder}")
    path = folder / dkimkeys.key_file_name(domain, selector)
    if path.exists():
        raise CommandError(f"{path} exists; remove it first to make a new key")
    key = dkimkeys.generate(args.type)
    status = folder.stat()
    owner = (status.st_uid, status.st_gid) if os.geteuid() == 0 else None
    try:
        write_atomically(path, key, 0o600, owner)
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror or error}") from None
    print(f"wrote {path} ({args.type}); publish this DNS record:")
    print(dkimkeys.zone_line(domain, selector, dkimkeys.dns_record(key)))
    return 0


def _configured_keys(args: argparse.Namespace) -> Path:
    """``[plugins.dkim] keys`` of the config, resolved as the plugin does."""
    config = configured(args, check_files=False)
    options = config.plugins.options.get("dkim", {})
    try:
        return keys_folder(options.get("keys", DEFAULT_KEYS), config.spool)
    except ValueError as error:
        raise CommandError(f"[plugins.dkim] {error}") from None
