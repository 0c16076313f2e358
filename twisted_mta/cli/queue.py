"""``twisted-mta queue``: the mailq / postqueue / postsuper of twisted-mta."""

from __future__ import annotations

import argparse
import sys
import time

from twisted_mta.cli.common import CommandError, add_config_option, configured
from twisted_mta.queue import control
from twisted_mta.queue.store import CorruptMessage, QueueStore
from twisted_mta.storage.envelope import UnknownMessage


def add_parser(commands) -> None:
    queue = commands.add_parser("queue", help="list, show or change the mail queue")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    add_config_option(common)
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


def _queue(args: argparse.Namespace) -> int:
    config = configured(args, check_files=False)
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
