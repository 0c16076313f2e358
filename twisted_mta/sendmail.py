"""``twisted-mta-sendmail``: the sendmail command line, for programs that send mail.

Reads a message on standard input and drops it into ``spool/maildrop/``
(see ``queue.maildrop``), where the daemon picks it up, now or when it next
starts.  Understands the flags programs pass to sendmail::

    -t            recipients also from the To, Cc and Bcc headers
    -i, -oi       a line with a single "." does not end the message
    -f ADDR       envelope sender (also -r); "<>" is the null sender
    -F NAME       display name of the From: header added when there is none
    -C FILE       the config file (else $TWISTED_MTA_CONFIG, else
                  /etc/twisted-mta/mta.toml if it exists, else the defaults)

and ignores the harmless rest (``-odi -oem -v -bm -B 8BITMIME -N -R -V``...).

Like Postfix's sendmail it is also the queue and aliases tools, handing
over to ``twisted-mta`` (as Postfix's hands over to postqueue and
newaliases): ``-bp``, or called as ``mailq``, lists the queue; ``-bi``, or
called as ``newaliases``, checks the aliases file; ``-q`` tries the queue
now.  ``/usr/sbin/sendmail``, ``/usr/bin/mailq`` and ``/usr/bin/newaliases``
can all be links to it.
Without ``-f`` the sender is ``<login name>@<hostname>``; bare names
(``alice``) get ``@<hostname>``.  Bcc headers are removed; a message
without From, Date or Message-ID gets one, as Postfix's pickup does.

Exit codes are sendmail's (sysexits.h): 64 for a usage or address error,
65 for a message over ``max_message_size``, 75 when the message could not
be dropped (the caller keeps it and may try again); one line on stderr.
"""

from __future__ import annotations

import email.policy
import email.utils
import getopt
import os
import pwd
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from twisted_mta.config import ConfigError, load_config
from twisted_mta.mail.address import PathError, parse_mail, parse_rcpt
from twisted_mta.mail.dsn import header_address
from twisted_mta.mail.lines import normalise_line_endings
from twisted_mta.storage.drop import DropEnvelope, prepare_directory, write_drop

PROGRAM = "twisted-mta-sendmail"
EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL = 0, 64, 65, 75

# Flags taking a value are followed by ":"; those not in Options are ignored.
_FLAGS = "tif:r:F:C:o:O:B:N:R:V:X:L:h:b:A:vmnUG"
# The modes handed over to twisted-mta, by flag or by the name we are called.
_MODE_FLAGS = {"p": "mailq", "i": "newaliases"}
_DELEGATED = {
    "mailq": ("queue", "list"),
    "newaliases": ("check-aliases",),
    "flush": ("queue", "flush"),
}
_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_RECIPIENT_HEADERS = (b"to", b"cc", b"bcc")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UsageError(Exception):
    """Bad flags or addresses: EX_USAGE."""


class MessageTooBig(Exception):
    """The message exceeds ``max_message_size``: EX_DATAERR."""


@dataclass
class Options:
    """What the flags asked for; the rest of sendmail's flags change nothing here."""

    recipients: list[str] = field(default_factory=list)
    extract: bool = False
    ignore_dots: bool = False
    sender: str | None = None
    full_name: str | None = None
    config: str | None = None
    mode: str = "send"


def parse_args(argv: Sequence[str], program: str = PROGRAM) -> Options:
    """The flags that matter; raises UsageError for unknown or unsupported
    ones.  Called as ``mailq`` or ``newaliases``, that is the mode."""
    # -q takes an optional interval (-q30m), which getopt cannot express.
    flush = any(arg.startswith("-q") for arg in argv)
    try:
        flags, recipients = getopt.getopt([a for a in argv if not a.startswith("-q")], _FLAGS)
    except getopt.GetoptError as error:
        raise UsageError(str(error)) from None
    options = Options(recipients=recipients)
    if program in _DELEGATED:
        options.mode = program
    if flush:
        options.mode = "flush"
    for flag, value in flags:
        _apply_flag(options, flag, value)
    return options


def _apply_flag(options: Options, flag: str, value: str) -> None:
    if flag == "-t":
        options.extract = True
    elif flag == "-i" or (flag == "-o" and value == "i"):
        options.ignore_dots = True
    elif flag in ("-f", "-r"):
        options.sender = value
    elif flag == "-F":
        options.full_name = value
    elif flag == "-C":
        options.config = value
    elif flag == "-b" and value in _MODE_FLAGS:
        options.mode = _MODE_FLAGS[value]
    elif flag == "-b" and value != "m":
        raise UsageError(f"-b{value} is not supported (only -bm, -bp and -bi)")


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """Standard input up to its end or, unless ``ignore_dots``, a "." line."""
    if ignore_dots:
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise MessageTooBig()
        return data
    lines = []
    size = 0
    for line in iter(lambda: stream.readline(limit + 1), b""):
        if line.rstrip(b"\r\n") == b".":
            break
        size += len(line)
        if size > limit:
            raise MessageTooBig()
        lines.append(line)
    return b"".join(lines)


@dataclass(frozen=True)
class Prepared:
    """The message to drop, and what ``-t`` would add to its recipients."""

    message: bytes
    header_recipients: list[str]


def prepare_message(
    data: bytes, *, sender: str, full_name: str | None, hostname: str, now: float
) -> Prepared:
    """The message as dropped (LF endings, no Bcc, From/Date/Message-ID
    present) and the addresses of its To, Cc and Bcc headers."""
    fields, body = _split_header(normalise_line_endings(data))
    header_recipients = list(_header_addresses(fields))
    kept = [f for f in fields if _field_name(f) != b"bcc"]
    names = {_field_name(f) for f in kept}
    if b"from" not in names:
        kept.append(_from_field(sender or f"MAILER-DAEMON@{hostname}", full_name))
    if b"date" not in names:
        kept.append(f"Date: {email.utils.formatdate(now, localtime=True)}\n".encode())
    if b"message-id" not in names:
        kept.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}\n".encode())
    return Prepared(b"".join(kept) + b"\n" + body, header_recipients)


def _split_header(data: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (with their continuation lines) and the body.

    The header ends at an empty line, or at the first line that is not a
    header field (that line starts the body).  A leading mbox ``From ``
    line is dropped, as sendmail does.
    """
    if data and not data.endswith(b"\n"):
        data += b"\n"
    lines = data.splitlines(keepends=True)
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    fields: list[bytes] = []
    for index, line in enumerate(lines):
        if line == b"\n":
            return fields, b"".join(lines[index + 1 :])
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        elif _HEADER.match(line):
            fields.append(line)
        else:
            return fields, b"".join(lines[index:])
    return fields, b""


def _field_name(field_: bytes) -> bytes:
    return field_.split(b":", 1)[0].strip().lower()


def _header_addresses(fields: Iterable[bytes]) -> Iterable[str]:
    values = [
        f.split(b":", 1)[1].decode("utf-8", "replace")
        for f in fields
        if _field_name(f) in _RECIPIENT_HEADERS
    ]
    for _, address in email.utils.getaddresses(values):
        if address:
            yield address


def _from_field(address: str, full_name: str | None) -> bytes:
    """``From: NAME <ADDRESS>``, the name RFC 2047-encoded unless the
    address itself needs SMTPUTF8 (then UTF-8 is allowed as it is)."""
    policy = email.policy.default.clone(linesep="\n", utf8=not address.isascii())
    name = _CONTROL.sub(" ", full_name or "").strip()
    header = policy.header_factory("From", header_address(address, name))
    return policy.fold_binary("From", header)


def envelope_sender(value: str | None, login: str, hostname: str) -> str:
    """The checked envelope sender: ``-f``'s, else ``login@hostname``."""
    if value is None:
        return _checked(f"{login}@{hostname}", "sender")
    address = value.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        return ""
    return _checked(_qualified(address, hostname), "sender")


def recipients_of(values: Iterable[str], hostname: str) -> list[str]:
    """Checked recipients from arguments or headers, each once, in order.

    An argument may hold several addresses (``"a@x, Bob <b@y>"``).
    """
    recipients: list[str] = []
    for _, address in email.utils.getaddresses(list(values)):
        if not address:
            continue
        checked = _checked(_qualified(address, hostname), "recipient")
        if checked not in recipients:
            recipients.append(checked)
    return recipients


def _qualified(address: str, hostname: str) -> str:
    return address if "@" in address else f"{address}@{hostname}"


def _checked(address: str, role: str) -> str:
    """The address in SMTP form, if SMTP would take it."""
    path = f"<{address}>".encode("utf-8", "surrogateescape")
    try:
        if role == "sender":
            parsed = parse_mail(b"FROM:" + path + b" SMTPUTF8", max_size=sys.maxsize).sender
        else:
            parsed = parse_rcpt(b"TO:" + path, smtputf8=True).recipient
    except PathError as error:
        raise UsageError(f"bad {role} address {address!r}: {error.text}") from None
    return str(parsed)


def login_name() -> str:
    """The name of the user running the command (from the uid, not $USER)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None) -> int:
    program = os.path.basename(sys.argv[0])
    argv = sys.argv[1:] if argv is None else argv
    stdin = sys.stdin.buffer if stdin is None else stdin
    try:
        options = parse_args(argv, program)
    except UsageError as error:
        return _fail(EX_USAGE, str(error))
    if options.mode in _DELEGATED:
        return _hand_over(options)
    try:
        return _sendmail(options, stdin)
    except UsageError as error:
        return _fail(EX_USAGE, str(error))


def delegated_command(options: Options) -> list[str]:
    """The ``twisted-mta`` command line that does what ``options.mode`` asks."""
    command = [sys.executable, "-m", "twisted_mta.cli", *_DELEGATED[options.mode]]
    return command + (["--config", options.config] if options.config else [])


def _hand_over(options: Options) -> int:
    command = delegated_command(options)
    try:
        os.execv(command[0], command)
    except OSError as error:
        return _fail(EX_TEMPFAIL, f"cannot run {' '.join(command[2:])}: {error.strerror}")


def _sendmail(options: Options, stdin: BinaryIO) -> int:
    try:
        config = load_config(options.config, os.environ, check_files=False)
    except ConfigError as error:
        return _fail(EX_TEMPFAIL, str(error))
    login = login_name()
    sender = envelope_sender(options.sender, login, config.hostname)
    limit = config.limits.max_message_size
    try:
        data = read_message(stdin, options.ignore_dots, limit)
    except MessageTooBig:
        return _fail(EX_DATAERR, f"message exceeds max_message_size ({limit} bytes)")
    now = time.time()
    prepared = prepare_message(
        data, sender=sender, full_name=options.full_name, hostname=config.hostname, now=now
    )
    values = options.recipients + (prepared.header_recipients if options.extract else [])
    recipients = recipients_of(values, config.hostname)
    if not recipients:
        return _fail(EX_USAGE, "no recipients given (as arguments, or with -t in the headers)")
    envelope = DropEnvelope(sender, tuple(recipients), login, now)
    return _drop(config.spool, config.maildrop_dir, envelope, prepared.message)


def _drop(spool, maildrop, envelope: DropEnvelope, message: bytes) -> int:
    """Write the drop; the spool must exist (a wrong config must not scatter
    folders where no daemon looks), the maildrop is made if missing."""
    if not spool.is_dir():
        return _fail(EX_TEMPFAIL, f"no spool directory {spool} (is the config right?)")
    try:
        prepare_directory(maildrop)
        write_drop(maildrop, envelope, message)
    except OSError as error:
        where = error.filename or maildrop
        return _fail(EX_TEMPFAIL, f"cannot write to the maildrop ({where}): {error.strerror}")
    return EX_OK


def _fail(code: int, message: str) -> int:
    print(f"{PROGRAM}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
