"""``twisted-mta check-config`` (the effective config, or why there is
none) and ``check-aliases`` (what ``newaliases`` runs: every line of the
aliases file usable, every alias leading somewhere)."""

from __future__ import annotations

import argparse
import sys

from twisted_mta.auth.checker import cram_md5_warning
from twisted_mta.cli.common import CommandError, add_config_option, configured
from twisted_mta.config import Config, dump_config
from twisted_mta.directory.aliases import read_aliases
from twisted_mta.directory.resolve import AliasLoop, Directory, UnknownRecipient
from twisted_mta.mail.mailbox import UnsafeMailboxName
from twisted_mta.tls import TLSError, check_configured_pair


def add_parser(commands) -> None:
    check = commands.add_parser("check-config", help="validate and print the effective config")
    add_config_option(check)
    check.set_defaults(run=check_config)
    aliases = commands.add_parser(
        "check-aliases", help="check the aliases file: its lines, and where each alias leads"
    )
    add_config_option(aliases)
    aliases.set_defaults(run=check_aliases)


def check_config(args: argparse.Namespace) -> int:
    config = configured(args)
    _check_tls_pair(config)
    sys.stdout.write(dump_config(config))
    warning = cram_md5_warning(config.auth.mechanisms, config.users.file)
    if warning:
        print(f"twisted-mta: {warning}", file=sys.stderr)
    return 0


def _check_tls_pair(config: Config) -> None:
    try:
        check_configured_pair(config.tls.certificate, config.tls.private_key)
    except TLSError as error:
        raise CommandError(str(error)) from None


def check_aliases(args: argparse.Namespace) -> int:
    """One line per problem and exit 1, else how many aliases there are."""
    config = configured(args)
    path = config.aliases.file
    if path is None:
        raise CommandError("the config names no [aliases] file")
    try:
        aliases, problems = read_aliases(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise CommandError(f"cannot read {path}: {reason}") from None
    directory = Directory(
        frozenset(config.domains.local),
        config.domains.recipient_delimiter,
        config.users.file,
        path,
    )
    problems += [
        f"{key}: {problem}" for key in aliases for problem in _dead_ends(directory, key)
    ]
    for problem in problems:
        print(f"{path}: {problem}")
    if problems:
        return 1
    print(f"{path}: {len(aliases)} alias(es), all usable")
    return 0


def _dead_ends(directory: Directory, key: str) -> list[str]:
    """Where the alias ``key`` fails to lead, in each local domain it is in."""
    local, at, domain = key.rpartition("@")
    if not at:
        local, domains = key, sorted(directory.local_domains)
    elif not directory.is_local(domain):
        return [f"{domain} is not a local domain: the alias is never used"]
    else:
        domains = [domain]
    if not local:
        return []  # a catch-all: any local part is its own
    problems = []
    for name in domains:
        try:
            directory.resolve(local, name)
        except UnknownRecipient as error:
            problems.append(f"leads to {error}, which is no account, alias or catch-all")
        except AliasLoop as error:
            problems.append(f"goes round in a loop at {error}")
        except UnsafeMailboxName as error:
            problems.append(f"cannot be a mailbox name ({error})")
    return problems
