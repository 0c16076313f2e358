"""The ``twisted-mta`` administration command."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from twisted_mta.auth.checker import cram_md5_warning
from twisted_mta.auth.passwords import SCHEMES, hash_password
from twisted_mta.config import Config, ConfigError, dump_config, load_config
from twisted_mta.directory.users import set_password_line
from twisted_mta.mail import dkimkeys
from twisted_mta.policies.dkim import DEFAULT_KEYS, keys_folder
from twisted_mta.queue import control
from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.storage.envelope import UnknownMessage
from twisted_mta.storage.files import write_atomically
from twisted_mta.tls import TLSError, check_configured_pair


class CommandError(Exception):
    """A one-line reason to stop with exit status 1."""


def _config(args: argparse.Namespace, check_files: bool = True) -> Config:
    try:
        return load_config(args.config, os.environ, check_files=check_files)
    except ConfigError as error:
        raise CommandError(str(error)) from None


def _check_config(args: argparse.Namespace) -> int:
    config = _config(args)
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


def _passwd(args: argparse.Namespace) -> int:
    config = _config(args, check_files=False)
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


def _queue(args: argparse.Namespace) -> int:
    config = _config(args, check_files=False)
    if not config.queue_dir.is_dir():
        raise CommandError(f"no queue at {config.queue_dir}")
    try:
        return args.queue_run(args, QueueStore(config.queue_dir))
    except OSError as error:
        where = error.filename or "the queue"
        raise CommandError(
            f"queue {args.action}: cannot change {where}: {error.strerror or error}"
        ) from None


def _queue_list(args: argparse.Namespace, store: QueueStore) -> int:
    messages = list(store.messages())
    # With --json, stdout holds the JSON alone.
    notes = sys.stderr if args.json else sys.stdout
    if args.json:
        print(control.as_json(messages))
    elif messages:
        now = time.time()
        print("\n\n".join(control.describe(m, now) for m in messages))
        print(f"\n-- {len(messages)} message(s) in the queue")
    else:
        print("the queue is empty")
    for queue_id in control.unreadable(store):
        print(f"{queue_id}  unreadable envelope (moved to corrupt/ by the daemon)", file=notes)
    return 0


def _queue_show(args: argparse.Namespace, store: QueueStore) -> int:
    try:
        message = store.load(args.id)
        data = control.read_message(store, args.id)
    except UnknownMessage:
        raise CommandError(f"no message {args.id} in the queue") from None
    except CorruptMessage as error:
        reason = str(error).partition(": ")[2]
        raise CommandError(f"message {args.id}: unreadable envelope ({reason})") from None
    if args.json:
        print(control.show_json(message, data))
    else:
        sys.stdout.write(control.envelope_text(message, time.time()))
        sys.stdout.write("*** message ***\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    return 0


def _queue_flush(args: argparse.Namespace, store: QueueStore) -> int:
    results = control.flush(store)
    if args.json:
        print(control.results_json(results, "due"))
    else:
        print(f"{len(results.done)} message(s) due now")
    return 0


# Each action on a selection, and the word for a message it changed.
_SELECTING = {
    "hold": (control.hold, "held"),
    "release": (control.release, "released"),
    "delete": (control.delete, "deleted"),
    "bounce": (control.bounce, "bounced"),
}


def _queue_change(args: argparse.Namespace, store: QueueStore) -> int:
    selection = control.Selection(
        ids=tuple(dict.fromkeys(args.ids)),
        sender=args.sender,
        recipient=args.recipient,
        everything=args.all,
    )
    if selection.is_empty():
        raise CommandError(f"queue {args.action} needs message ids, --from, --to or --all")
    act, done = _SELECTING[args.action]
    results = act(store, selection)
    if args.json:
        print(control.results_json(results, done))
    else:
        for message in results.done:
            print(f"id={message.id} {done}")
    for queue_id in results.missing:
        print(f"twisted-mta: no message {queue_id} in the queue", file=sys.stderr)
    for queue_id, reason in results.unreadable.items():
        print(f"twisted-mta: message {queue_id}: unreadable envelope ({reason})", file=sys.stderr)
    return 1 if results.missing or results.unreadable else 0


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
    config = _config(args, check_files=False)
    options = config.plugins.options.get("dkim", {})
    try:
        return keys_folder(options.get("keys", DEFAULT_KEYS), config.spool)
    except ValueError as error:
        raise CommandError(f"[plugins.dkim] {error}") from None


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
    _add_queue_parser(commands)
    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_commands.add_parser("keygen", help="make a key, print its DNS record")
    keygen.add_argument("domain", help="the From: domain the key signs for")
    keygen.add_argument("--selector", default="mta", help="the selector (default: mta)")
    keygen.add_argument("--type", choices=dkimkeys.KEY_TYPES, default="rsa")
    keygen.add_argument("--keys", help="the keys folder (default: [plugins.dkim] keys)")
    keygen.add_argument("--config", help="the TOML config file (default: $TWISTED_MTA_CONFIG)")
    keygen.set_defaults(run=_dkim_keygen)
    return parser


def _add_queue_parser(commands) -> None:
    queue = commands.add_parser("queue", help="list, show or change the mail queue")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="the TOML config file (default: $TWISTED_MTA_CONFIG)")
    common.add_argument("--json", action="store_true", help="answer in JSON")
    selecting = argparse.ArgumentParser(add_help=False, parents=[common])
    selecting.add_argument("ids", nargs="*", metavar="ID", help="message ids")
    selecting.add_argument(
        "--from", dest="sender", metavar="PATTERN", help="sender matches (shell wildcards)"
    )
    selecting.add_argument(
        "--to", dest="recipient", metavar="PATTERN", help="a pending recipient matches"
    )
    selecting.add_argument("--all", action="store_true", help="every message")

    def add(name: str, run, summary: str, parent: argparse.ArgumentParser):
        action = actions.add_parser(name, help=summary, description=summary, parents=[parent])
        action.set_defaults(run=_queue, queue_run=run)
        return action

    add("list", _queue_list, "list the queued messages", common)
    show = add("show", _queue_show, "a message's envelope, then the message", common)
    show.add_argument("id", help="the message id")
    add("flush", _queue_flush, "try every message not on hold now", common)
    add("hold", _queue_change, "put messages on hold: not tried until released", selecting)
    add("release", _queue_change, "take messages off hold, due at once", selecting)
    add("delete", _queue_change, "remove messages, telling nobody", selecting)
    add("bounce", _queue_change, "return messages to their senders", selecting)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"twisted-mta: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
