"""The relay end to end: the real daemon, a real DNS server, capture servers.

Everything listens on loopback: the daemon on 127.0.0.1, a twisted.names
DNS server on 127.0.0.1 (the daemon's only resolver), capture SMTP servers
on 127.0.0.2 and up (and ::1) sharing one port, the daemon's ``mx_port``.
``127.0.0.9`` is an MX where nothing listens.  Retry times are one or two
seconds; every wait is on a log line, a file or a capture server's records.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import os
import re
import smtplib
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.capture import Behaviour, CaptureServer, TestCA, Transaction
from tests.helpers.daemon import Daemon, make_daemon
from tests.helpers.relay_fixtures import (
    DOWN,
    WAIT,
    CaptureGroup,
    DNSServer,
    FailingDNS,
    attempts,
    change_behaviour,
    envelope,
    ipv6_loopback,
    message,
    notifications,
    parse_dsn,
    queue_cli,
    relay_config,
    single_dsn,
    submit,
    wait_attempt,
    wait_gone,
    wait_notification,
    wait_queue_empty,
    wait_until,
)

ALICE = ("alice@example.test", "alice-pw")
USERS = "alice@example.test:{PLAIN}alice-pw\nbob@example.test:{PLAIN}bob-pw\n"
ALIASES = "team@example.test: bob@example.test, member@fallback.test\n"
SENDER = "alice@example.test"
HAS_IPV6 = ipv6_loopback()

PLAIN_MX = "127.0.0.2"
TLS_MX = "127.0.0.3"
BROKEN_TLS_MX = "127.0.0.4"
FLAKY_MX = "127.0.0.5"
DROPPING_MX = "127.0.0.6"
HANGING_MX = "127.0.0.7"
PARTIAL_MX = "127.0.0.8"
LIMITED_MX = "127.0.0.11"  # no 8BITMIME, SIZE 4000
REFUSING_MX = "127.0.0.12"  # 554 greeting
ALSO_DOWN = "127.0.0.10"
REJECTED = "rejected@fallback.test"
REJECTION = "550 5.1.1 <rejected@fallback.test>: Recipient address rejected"

ZONES = {
    "two-mx.test": [["MX", 10, "mx1.two-mx.test"], ["MX", 20, "mx2.two-mx.test"],
                    ["MX", 30, "mx3.two-mx.test"]],
    "mx1.two-mx.test": [["A", DOWN]],
    "mx2.two-mx.test": [["A", PLAIN_MX]],
    "mx3.two-mx.test": [["A", TLS_MX]],
    "multi.test": [["MX", 10, "mx.multi.test"]],
    "mx.multi.test": [["A", DOWN], ["A", ALSO_DOWN], ["A", PLAIN_MX]],
    "v6.test": [["MX", 10, "mx.v6.test"]],
    "mx.v6.test": [["AAAA", "::1"]],
    "fallback.test": [["A", PLAIN_MX]],
    "other.test": [["A", PLAIN_MX]],
    "null.test": [["MX", 0, ""]],
    "cname.test": [["CNAME", "real.test"]],
    "real.test": [["MX", 10, "alias.real.test"]],
    "alias.real.test": [["CNAME", "mx2.two-mx.test"]],
    "tls.test": [["MX", 10, "mx.tls.test"]],
    "mx.tls.test": [["A", TLS_MX]],
    "brokentls.test": [["A", BROKEN_TLS_MX]],
    "flaky.test": [["A", FLAKY_MX]],
    "drop.test": [["A", DROPPING_MX]],
    "hang.test": [["A", HANGING_MX]],
    "partial.test": [["A", PARTIAL_MX]],
    "limited.test": [["A", LIMITED_MX]],
    "refusing.test": [["MX", 10, "mx1.refusing.test"], ["MX", 20, "mx2.refusing.test"]],
    "mx1.refusing.test": [["A", REFUSING_MX]],
    "mx2.refusing.test": [["A", PLAIN_MX]],
    "dead.test": [["MX", 10, "mx.dead.test"]],
    "mx.dead.test": [["A", DOWN]],
}

_markers = itertools.count(1)


def marker(name: str) -> str:
    return f"{name}-{next(_markers)}-{os.getpid()}"


def delivered_once(transactions: list[Transaction]) -> Transaction:
    """The one transaction the remote accepted; no other got a 250."""
    accepted = [t for t in transactions if t.reply.startswith("250")]
    assert len(accepted) == 1, [t.reply for t in transactions]
    return accepted[0]


def received_part(transaction: Transaction, sent: bytes) -> bytes:
    """What the relay added in front of ``sent`` (LF form): our Received."""
    relayed = transaction.message
    original = sent.replace(b"\r\n", b"\n")
    assert relayed.endswith(original), relayed[-300:]
    head = relayed[: len(relayed) - len(original)]
    assert head.startswith(b"Received: from ") and head.endswith(b"\n"), head
    return head


def wire_form(message_lf: bytes) -> bytes:
    """RFC 5321 DATA for a message (LF ends): CRLF, dot-stuffed, no final dot."""
    lines = message_lf.split(b"\n")
    assert lines[-1] == b""
    stuffed = (b"." + line if line.startswith(b".") else line for line in lines[:-1])
    return b"".join(line + b"\r\n" for line in stuffed)


# -- the MX world: one daemon routing by MX through the test DNS server


@dataclass
class World:
    daemon: Daemon
    dns: DNSServer
    captures: CaptureGroup

    def mx(self, host: str) -> CaptureServer:
        return self.captures[host]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mx-world")
    behaviours = {
        PLAIN_MX: Behaviour(rcpt_replies={REJECTED: REJECTION}),
        TLS_MX: Behaviour(starttls=True),
        BROKEN_TLS_MX: Behaviour(starttls=True, tls_break=True),
        FLAKY_MX: Behaviour(defer_first=1),
        DROPPING_MX: Behaviour(drop_in_data=4096),
        HANGING_MX: Behaviour(hang_at="greeting"),
        PARTIAL_MX: Behaviour(rcpt_replies={"later@partial.test": "451 4.2.1 mailbox busy"}),
        LIMITED_MX: Behaviour(eightbitmime=False, size=4000),
        REFUSING_MX: Behaviour(greeting="554 5.7.1 go away"),
    }
    if HAS_IPV6:
        behaviours["::1"] = Behaviour()
    with DNSServer(root / "dns", ZONES) as dns, CaptureGroup(
        behaviours, down=(DOWN, ALSO_DOWN)
    ) as captures:
        daemon = make_daemon(
            root / "mta",
            users=USERS,
            aliases=ALIASES,
            extra=relay_config(resolver=dns.resolver, mx_port=captures.port),
        )
        daemon.start()
        try:
            yield World(daemon, dns, captures)
        finally:
            daemon.stop()


def relay_one(world: World, domain: str, name: str, **submit_options) -> tuple[str, str, bytes]:
    """Submit one message to a fresh recipient at ``domain``; wait until sent."""
    recipient = f"{marker(name)}@{domain}"
    sent = message(recipient)
    queue_id = submit(world.daemon, SENDER, [recipient], sent, **submit_options)
    wait_attempt(world.daemon, queue_id, recipient, "sent")
    wait_gone(world.daemon, queue_id)
    return queue_id, recipient, sent


def test_authenticated_user_mail_leaves_by_mx_second_mx_when_first_is_down(world):
    queue_id, recipient, sent = relay_one(world, "two-mx.test", "mx", login=ALICE)
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    port = world.captures.port
    assert f"relay=mx2.two-mx.test[{PLAIN_MX}]:{port} " in line
    assert re.search(r"status=sent \(2\.0\.0 250 2\.0\.0 queued as \d+\)", line), line
    transaction = delivered_once(world.captures.transactions_for(recipient))
    assert transaction.sender == SENDER and transaction.recipients == [recipient]
    assert b" with ESMTPSA id " in received_part(transaction, sent)
    # The preference-30 MX was never needed.
    assert not [t for t in world.mx(TLS_MX).transactions if recipient in t.recipients]


def test_mx_refusing_at_the_greeting_passes_the_turn_to_the_next(world):
    queue_id, recipient, _ = relay_one(world, "refusing.test", "refusing")
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    assert f"relay=mx2.refusing.test[{PLAIN_MX}]:" in line
    assert world.mx(REFUSING_MX).sessions
    assert not world.mx(REFUSING_MX).transactions


def test_every_address_of_an_mx_host_is_tried(world):
    queue_id, recipient, _ = relay_one(world, "multi.test", "multi")
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    assert f"relay=mx.multi.test[{PLAIN_MX}]:" in line
    delivered_once(world.captures.transactions_for(recipient))


@pytest.mark.skipif(not HAS_IPV6, reason="::1 is not available")
def test_mx_with_only_an_aaaa_address(world):
    queue_id, recipient, _ = relay_one(world, "v6.test", "v6")
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    assert "relay=mx.v6.test[::1]:" in line
    delivered_once(world.mx("::1").transactions)


def test_domain_without_mx_gets_mail_at_its_a_record(world):
    queue_id, recipient, _ = relay_one(world, "fallback.test", "fallback")
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    assert f"relay=fallback.test[{PLAIN_MX}]:" in line


def test_cname_is_followed_for_the_domain_and_the_mx_host(world):
    queue_id, recipient, _ = relay_one(world, "cname.test", "cname")
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    assert f"[{PLAIN_MX}]:{world.captures.port} " in line
    delivered_once(world.captures.transactions_for(recipient))


def test_opportunistic_starttls_to_mx_without_verification(world):
    _, recipient, _ = relay_one(world, "tls.test", "tls")
    [session] = world.captures.sessions_for(recipient)
    assert session.tls
    assert session.verbs(tls=False) == ["EHLO", "STARTTLS"]
    assert session.verbs(tls=True)[:4] == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_mx_whose_tls_breaks_gets_the_mail_in_clear(world):
    _, recipient, _ = relay_one(world, "brokentls.test", "brokentls")
    sessions = world.mx(BROKEN_TLS_MX).sessions
    clear = [s for s in sessions if "MAIL" in s.verbs()]
    assert clear and not clear[-1].tls and "STARTTLS" not in clear[-1].verbs()
    assert any("STARTTLS" in s.verbs() for s in sessions)
    delivered_once(world.captures.transactions_for(recipient))


def test_address_literal_recipient_goes_to_that_address(world):
    queue_id, recipient, _ = relay_one(world, f"[{PLAIN_MX}]", "literal")
    [line] = attempts(world.daemon, queue_id, recipient, "sent")
    assert f"[{PLAIN_MX}]:{world.captures.port} " in line
    delivered_once(world.captures.transactions_for(recipient))


@pytest.mark.parametrize(
    "case, status",
    [("signed-eight-bit", "5.6.3"), ("too-big", "5.3.4")],
)
def test_what_the_mx_cannot_take_bounces_without_being_sent(world, case, status):
    daemon = world.daemon
    recipient = f"{marker(case)}@limited.test"
    if case == "signed-eight-bit":
        signature = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=mta\r\n"
        sent = signature + message(recipient, body="caf\u00e9\n")
        options = ["BODY=8BITMIME"]
    else:
        sent, options = message(recipient, body=("y" * 70 + "\n") * 80), []
    queue_id = submit(daemon, SENDER, [recipient], sent, mail_options=options)
    line = wait_attempt(daemon, queue_id, recipient, "bounced")
    assert f"({status} " in line
    wait_notification(daemon, queue_id)
    dsn = single_dsn(daemon, "example.test", "alice", queue_id)
    assert dsn.recipient(recipient)["Status"] == status
    assert not world.captures.sessions_for(recipient)
    assert "MAIL" not in [v for s in world.mx(LIMITED_MX).sessions for v in s.verbs()]
    if case == "signed-eight-bit":
        assert "DKIM-signed" in line and "8BITMIME is required" in line


def test_eight_bit_mail_goes_quoted_printable_to_an_mx_without_8bitmime(world):
    daemon = world.daemon
    recipient = f"{marker('qp')}@limited.test"
    text = "Gr\u00fc\u00dfe aus K\u00f6ln, " + "\u00e9" * 40 + "\n.\u00e9\n"
    body = text.encode()
    sent = (
        f"From: <{SENDER}>\nTo: <{recipient}>\nSubject: qp\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=b\n\n--b\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    ).encode() + body + b"--b--\n"
    queue_id = submit(
        daemon, SENDER, [recipient], sent.replace(b"\n", b"\r\n"), mail_options=["BODY=8BITMIME"]
    )
    wait_attempt(daemon, queue_id, recipient, "sent")
    port = world.captures.port
    daemon.wait_for_log(
        rf"id={queue_id} converted to quoted-printable for limited\.test\[{LIMITED_MX}\]:{port}"
    )
    transaction = delivered_once(world.captures.transactions_for(recipient))
    assert not [p for p in transaction.parameters if p.startswith("BODY")]
    relayed = transaction.message
    assert relayed.isascii()
    parsed = email.message_from_bytes(relayed, policy=email.policy.default)
    [part] = list(parsed.iter_parts())
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == body.rstrip(b"\n")  # the last LF is the delimiter's
    top, _, _ = sent.partition(b"--b\n")
    assert relayed.endswith(b"\n--b--\n") and top in relayed  # headers byte for byte


def test_internationalised_recipient_is_relayed_with_smtputf8(world):
    daemon = world.daemon
    recipient = f"j\u00f6rg-{marker('utf8')}@fallback.test"
    sent = message("utf8", body="gr\u00fc\u00dfe\n")
    queue_id = submit(daemon, SENDER, [recipient], sent, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    wait_attempt(daemon, queue_id, recipient, "sent")
    transaction = delivered_once(world.captures.transactions_for(recipient))
    assert "SMTPUTF8" in transaction.parameters
    received_part(transaction, sent)


def test_null_mx_fails_at_once_with_5_1_10_and_a_bounce(world):
    daemon = world.daemon
    recipient = f"{marker('null')}@null.test"
    queue_id = submit(daemon, SENDER, [recipient], message(recipient))
    line = wait_attempt(daemon, queue_id, recipient, "bounced")
    assert "relay=none" in line and "5.1.10" in line
    wait_notification(daemon, queue_id)
    dsn = single_dsn(daemon, "example.test", "alice", queue_id)
    fields = dsn.recipient(recipient)
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.10")
    assert "Remote-MTA" not in fields
    assert not world.captures.sessions_for(recipient)


def test_domain_that_does_not_exist_bounces_with_5_1_2(world):
    daemon = world.daemon
    recipient = f"{marker('nx')}@nx.test"
    queue_id = submit(daemon, SENDER, [recipient], message(recipient))
    wait_attempt(daemon, queue_id, recipient, "bounced")
    wait_notification(daemon, queue_id)
    fields = single_dsn(daemon, "example.test", "alice", queue_id).recipient(recipient)
    assert fields["Status"] == "5.1.2"


def test_recipients_of_one_domain_go_in_one_transaction(world):
    daemon = world.daemon
    name = marker("group")
    same = [f"{name}.{n}@fallback.test" for n in range(3)]
    other = f"{name}@other.test"
    given = [*same[:2], same[2].replace("fallback.test", "Fallback.TEST"), other]
    queue_id = submit(daemon, SENDER, given, message(name))
    for recipient in [*same, other]:
        wait_attempt(daemon, queue_id, recipient, "sent")
    wait_gone(daemon, queue_id)
    transaction = delivered_once(world.captures.transactions_for(same[0]))
    assert transaction.recipients == same
    assert delivered_once(world.captures.transactions_for(other)).recipients == [other]


def test_451_then_250_is_retried_and_delivered_once(world):
    daemon = world.daemon
    recipient = f"{marker('flaky')}@flaky.test"
    queue_id = submit(daemon, SENDER, [recipient], message(recipient))
    deferred = wait_attempt(daemon, queue_id, recipient, "deferred")
    assert "451 4.3.0 try again later" in deferred
    wait_attempt(daemon, queue_id, recipient, "sent")
    wait_gone(daemon, queue_id)
    transactions = world.mx(FLAKY_MX).transactions
    assert [t.reply[:3] for t in transactions] == ["451", "250"]
    delivered_once(transactions)


def test_rcpt_550_bounces_that_recipient_only_with_a_proper_dsn(world):
    daemon = world.daemon
    accepted = f"{marker('ok')}@fallback.test"
    name = marker("reject")
    sent = message(name)
    queue_id = submit(daemon, SENDER, [accepted, REJECTED], sent)
    wait_attempt(daemon, queue_id, accepted, "sent")
    bounced = wait_attempt(daemon, queue_id, REJECTED, "bounced")
    assert REJECTION in bounced
    bounce_id = wait_notification(daemon, queue_id)
    wait_gone(daemon, queue_id)
    [raw] = notifications(daemon, "example.test", "alice", queue_id)
    # From the null sender, to the envelope sender.
    assert raw.startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n")
    assert f"id {bounce_id}".encode() in raw
    dsn = parse_dsn(raw)
    assert dsn.message["To"] == SENDER
    assert dsn.message["Auto-Submitted"] == "auto-replied"
    assert dsn.message["From"].addresses[0].username == "MAILER-DAEMON"
    assert dsn.per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert "Arrival-Date" in dsn.per_message
    [fields] = dsn.recipients
    assert fields["Final-Recipient"] == f"rfc822; {REJECTED}"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert fields["Remote-MTA"] == "dns; fallback.test"
    assert fields["Diagnostic-Code"] == f"smtp; {REJECTION}"
    # The original headers come back, the body does not.
    assert f"Message-ID: <{name}@client.example.org>" in dsn.original_headers
    assert "hello" not in dsn.original_headers
    assert b"\nhello\n" not in raw


def test_bounce_to_a_remote_sender_is_relayed_from_the_null_sender(world):
    daemon = world.daemon
    sender = f"{marker('remote-sender')}@other.test"
    queue_id = submit(daemon, sender, [REJECTED], message(sender, sender=sender))
    bounce_id = wait_notification(daemon, queue_id)
    wait_attempt(daemon, bounce_id, sender, "sent")
    transaction = delivered_once(world.captures.transactions_for(sender))
    assert transaction.sender == ""
    dsn = parse_dsn(transaction.message)
    assert dsn.message["To"] == sender
    assert dsn.recipient(REJECTED)["Status"] == "5.1.1"


def test_recipient_deferred_at_rcpt_is_retried_alone(world):
    daemon = world.daemon
    now, later = f"{marker('now')}@partial.test", "later@partial.test"
    queue_id = submit(daemon, SENDER, [now, later], message("partial-rcpt"))
    wait_attempt(daemon, queue_id, now, "sent")
    line = wait_attempt(daemon, queue_id, later, "deferred")
    assert "451 4.2.1 mailbox busy" in line
    change_behaviour(world.mx(PARTIAL_MX), rcpt_replies={})
    wait_attempt(daemon, queue_id, later, "sent")
    wait_gone(daemon, queue_id)
    assert [t.recipients for t in world.mx(PARTIAL_MX).transactions] == [[now], [later]]
    assert len(attempts(daemon, queue_id, now)) == 1


def test_message_from_the_null_sender_is_never_bounced(world):
    daemon = world.daemon
    before = len(daemon.messages("example.test", "alice"))
    name = marker("null-sender")
    queue_id = submit(daemon, "", [REJECTED], message(name))
    wait_attempt(daemon, queue_id, REJECTED, "bounced")
    daemon.wait_for_log(rf"id={queue_id} no notification: the sender is null", WAIT)
    wait_gone(daemon, queue_id)
    assert not [line for line in daemon.log if f"id={queue_id} sender " in line]
    assert len(daemon.messages("example.test", "alice")) == before


def test_connection_dropped_mid_data_is_retried_and_delivered_whole(world):
    daemon = world.daemon
    recipient = f"{marker('drop')}@drop.test"
    sent = message(recipient, body=("x" * 70 + "\n") * 200)
    queue_id = submit(daemon, SENDER, [recipient], sent)
    deferred = wait_attempt(daemon, queue_id, recipient, "deferred")
    assert "4.4.2" in deferred and "lost connection" in deferred
    change_behaviour(world.mx(DROPPING_MX), drop_in_data=None)
    wait_attempt(daemon, queue_id, recipient, "sent")
    transaction = delivered_once(world.mx(DROPPING_MX).transactions)
    received_part(transaction, sent)


def test_hanging_mx_does_not_hold_up_other_mail(world):
    daemon = world.daemon
    stuck = f"{marker('hang')}@hang.test"
    stuck_id = submit(daemon, SENDER, [stuck], message(stuck))
    hanging = world.mx(HANGING_MX)
    wait_until(lambda: hanging.sessions, what="a connection to the hanging MX")
    relay_one(world, "fallback.test", "while-hanging")
    state = envelope(daemon, stuck_id)
    assert state is not None and state["recipients"][0]["state"] == "queued"


def test_alias_with_remote_target_is_relayed_with_the_original_sender(world):
    daemon = world.daemon
    name = marker("alias")
    outside = "someone@origin.example"
    queue_id = submit(daemon, outside, ["team@example.test"], message(name, sender=outside))
    wait_attempt(daemon, queue_id, "member@fallback.test", "sent")
    transactions = [t for t in world.mx(PLAIN_MX).transactions if name.encode() in t.message]
    transaction = delivered_once(transactions)
    assert transaction.sender == outside
    assert transaction.recipients == ["member@fallback.test"]
    assert [m for m in daemon.messages("example.test", "bob") if name.encode() in m]


def test_message_relayed_byte_exact_with_dots_at_chunk_boundaries(world):
    daemon = world.daemon
    recipient = f"{marker('exact')}@fallback.test"
    # Bare CR in any form is refused and leaves nothing behind.
    for attempt in (b"a\rb\r\n", b"x\r.\r\n", b"y\r\n.\r", b"z\n.\n"):
        assert_refused(daemon, recipient, b"Subject: bare\r\n\r\n" + attempt)
    # A message whose first lines are dots, and no header: it is stored
    # after our Received header and an empty line.  It also shows how long
    # the Received header is, to know where the relay's chunks start.
    probe_lf = b".\n..\n.probe starts with dots\n\n.\nbody\n"
    probe_id = submit(daemon, SENDER, [recipient], probe_lf.replace(b"\n", b"\r\n"))
    wait_attempt(daemon, probe_id, recipient, "sent")
    [probe] = world.captures.transactions_for(recipient)
    trace = received_part(probe, b"\n" + probe_lf)
    assert probe.data == wire_form(trace + b"\n" + probe_lf)
    header = len(trace)
    sent_lf = dotted_message(recipient, header)
    sent = sent_lf.replace(b"\n", b"\r\n")
    queue_id = submit(daemon, SENDER, [recipient], sent, mail_options=["BODY=8BITMIME"])
    wait_attempt(daemon, queue_id, recipient, "sent")
    [_, transaction] = world.captures.transactions_for(recipient)
    assert transaction.parameters == ("BODY=8BITMIME",)
    trace = received_part(transaction, sent)
    assert len(trace) == header
    for data in (sent_lf, trace + sent_lf):  # as submitted, as queued
        for boundary in range(16384, len(data), 16384):
            assert data[boundary - 1 : boundary + 1] == b"\n.", boundary
    assert transaction.data == wire_form(trace + sent_lf)
    assert len(world.captures.transactions_for(recipient)) == 2  # the probe and this one


def assert_refused(daemon: Daemon, recipient: str, data: bytes) -> None:
    """A message with a bare CR or LF gets a 5xx (or a 5xx and a close)."""
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        client.mail(SENDER)
        client.rcpt(recipient)
        try:
            code, _ = client.data(data)
        except smtplib.SMTPServerDisconnected:
            return
        except smtplib.SMTPResponseException as error:
            code = error.smtp_code
        assert 500 <= code < 600, code


def dotted_message(name: str, header: int) -> bytes:
    """About 200 KiB (LF ends, some 8-bit bytes) with a line starting
    with "." at every 16 KiB boundary of the message and of the queue file
    (which has ``header`` bytes in front), a "." line first in the body."""
    head = f"Subject: dots {name}\nMessage-ID: <{name}@client.example.org>\n\n.\n".encode()
    targets = sorted(
        {k * 16384 for k in range(1, 13)} | {k * 16384 - header for k in range(1, 13)}
    )
    dot_lines = itertools.cycle([b".\n", b"..\n", b". leading dot\n", b".\xe9t\xe9\n"])
    body = bytearray(head)
    for target in targets:
        gap = target - len(body)
        if gap < 0:
            continue
        while gap > 0:
            size = min(gap, 900)
            body += b"f" * (size - 1) + b"\n"
            gap -= size
        body += next(dot_lines)
    body += b"the end\n..\n.\n"
    return bytes(body)


def test_backoff_between_retry_min_and_retry_max(world):
    daemon = world.daemon
    recipient = f"{marker('dead')}@dead.test"
    queue_id = submit(daemon, SENDER, [recipient, "bob@example.test"], message(recipient))
    daemon.wait_for(lambda: len(attempts(daemon, queue_id, recipient, "deferred")) >= 3, WAIT)
    lines = attempts(daemon, queue_id, recipient, "deferred")
    assert len(lines) >= 3, "\n".join(daemon.log[-20:])
    assert "Connection refused" in lines[0] and "relay=none" in lines[0]
    # One queue entry: the message and a versioned envelope with the
    # state of each remote recipient (the local one is in its maildir).
    queued = sorted(p.name for p in (daemon.spool / "queue").glob(f"{queue_id}.*"))
    assert queued == [f"{queue_id}.env", f"{queue_id}.msg"]
    document = envelope(daemon, queue_id)
    assert document["version"] == 1 and document["sender"] == SENDER
    [state] = document["recipients"]
    assert state["address"] == recipient and state["state"] == "queued"
    gap = state["next_attempt"] - state["last_attempt"]
    assert gap == pytest.approx(min(2 ** (state["attempts"] - 1), 2.0))
    # The queue command shows it with its last error, daemon running.
    listing = queue_cli(daemon, "list")
    assert listing.returncode == 0, listing.stderr
    block = listing.stdout.split(queue_id, 1)[1]
    assert f"<{SENDER}>" in block and f"<{recipient}>  queued after" in block
    assert "Connection refused" in block
    assert queue_cli(daemon, "delete", queue_id).returncode == 0
    wait_gone(daemon, queue_id)


# -- smart hosts: one daemon each


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "ca")


def smarthost_daemon(start_mta, tmp_path, server: CaptureServer, **options) -> Daemon:
    password = options.pop("password", None)
    if password is not None:
        path = tmp_path / "smarthost-password"
        path.write_text(password + "\nsecond line is ignored\n")
        options["password_file"] = path
    host = options.pop("host", server.host)
    options.setdefault("smarthost", f"{host}:{server.port}")
    return start_mta(users=USERS, extra=relay_config(**options))


def test_connection_reused_for_the_next_message_to_the_same_destination(start_mta, tmp_path):
    with CaptureServer(Behaviour(), host=PLAIN_MX) as server:
        daemon = smarthost_daemon(start_mta, tmp_path, server, smarthost_tls="none")
        first = submit(daemon, SENDER, ["one@remote.example"], message("reuse-1"))
        wait_attempt(daemon, first, "one@remote.example", "sent")
        second = submit(daemon, SENDER, ["two@remote.example"], message("reuse-2"))
        wait_attempt(daemon, second, "two@remote.example", "sent")
        [session] = server.sessions
        assert [t.recipients for t in session.transactions] == [
            ["one@remote.example"], ["two@remote.example"]
        ]
        assert "RSET" in session.verbs()


def test_submission_leaves_through_verified_starttls_smarthost_with_auth(start_mta, tmp_path, ca):
    certificate = ca.issue(PLAIN_MX)
    behaviour = Behaviour(starttls=True, certificate=certificate, auth=("relay-user", "relay-pw"))
    with CaptureServer(behaviour, host=PLAIN_MX) as server:
        daemon = smarthost_daemon(
            start_mta, tmp_path, server, ca_file=ca.path, user="relay-user", password="relay-pw"
        )
        recipient = "friend@remote.example"
        sent = message("smarthost")
        queue_id = submit(daemon, SENDER, [recipient], sent, login=ALICE)
        line = wait_attempt(daemon, queue_id, recipient, "sent")
        assert f"relay={PLAIN_MX}[{PLAIN_MX}]:{server.port} " in line
        [session] = server.sessions
        assert session.commands[0].line == "EHLO mx.example.test"
        assert session.tls and session.authenticated == "relay-user"
        assert session.auth_mechanism == "PLAIN"
        assert session.verbs(tls=False) == ["EHLO", "STARTTLS"]
        transaction = delivered_once(session.transactions)
        assert (transaction.sender, transaction.recipients) == (SENDER, [recipient])
        received_part(transaction, sent)


@pytest.mark.skipif(not HAS_IPV6, reason="::1 is not available")
def test_smarthost_ipv6_literal_verified_against_its_ip_san(start_mta, tmp_path, ca):
    behaviour = Behaviour(starttls=True, certificate=ca.issue("::1"))
    with CaptureServer(behaviour, host="::1") as server:
        daemon = smarthost_daemon(start_mta, tmp_path, server, host="[::1]", ca_file=ca.path)
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], message("ipv6-smarthost"))
        line = wait_attempt(daemon, queue_id, recipient, "sent")
        assert f"[::1]:{server.port} " in line
        [session] = server.sessions
        assert session.tls
        delivered_once(session.transactions)


def test_implicit_tls_smarthost_by_name_with_auth_login(start_mta, tmp_path, ca):
    certificate = ca.issue("smtp.relay.test")
    behaviour = Behaviour(
        implicit_tls=True,
        certificate=certificate,
        auth=("relay-user", "relay-pw"),
        auth_mechanisms=("LOGIN",),
    )
    zones = {"smtp.relay.test": [["A", TLS_MX]]}
    with DNSServer(tmp_path / "dns", zones) as dns, CaptureServer(behaviour, host=TLS_MX) as server:
        daemon = smarthost_daemon(
            start_mta,
            tmp_path,
            server,
            host="smtp.relay.test",
            smarthost_tls="implicit",
            resolver=dns.resolver,
            ca_file=ca.path,
            user="relay-user",
            password="relay-pw",
        )
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], message("implicit"))
        line = wait_attempt(daemon, queue_id, recipient, "sent")
        assert f"relay=smtp.relay.test[{TLS_MX}]:{server.port} " in line
        [session] = server.sessions
        assert session.tls and session.auth_mechanism == "LOGIN"
        delivered_once(session.transactions)


@pytest.mark.parametrize("problem", ["no-starttls", "untrusted", "wrong-name"])
def test_smarthost_without_verified_tls_gets_nothing(start_mta, tmp_path, ca, problem):
    behaviour = {
        "no-starttls": Behaviour(auth=("relay-user", "relay-pw"), auth_needs_tls=False),
        "untrusted": Behaviour(starttls=True, auth=("relay-user", "relay-pw")),
        "wrong-name": Behaviour(
            starttls=True, certificate=ca.issue(TLS_MX), auth=("relay-user", "relay-pw")
        ),
    }[problem]
    with CaptureServer(behaviour, host=PLAIN_MX) as server:
        daemon = smarthost_daemon(
            start_mta, tmp_path, server, ca_file=ca.path, user="relay-user", password="relay-pw"
        )
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], message(problem))
        line = wait_attempt(daemon, queue_id, recipient, "deferred")
        assert re.search(r"\(4\.7\.\d ", line), line
        wait_until(lambda: server.sessions and all(s.ended.is_set() for s in server.sessions))
        for session in server.sessions:
            assert set(session.verbs()) <= {"EHLO", "STARTTLS", "QUIT"}, session.verbs()
            assert session.authenticated is None
        assert b"relay-pw" not in b"".join(bytes(s.received) for s in server.sessions)
        assert envelope(daemon, queue_id)["recipients"][0]["state"] == "queued"


def test_smarthost_in_clear_when_configured_so(start_mta, tmp_path):
    behaviour = Behaviour(auth=("relay-user", "relay-pw"), auth_needs_tls=False)
    with CaptureServer(behaviour, host=PLAIN_MX) as server:
        daemon = smarthost_daemon(
            start_mta,
            tmp_path,
            server,
            smarthost_tls="none",
            user="relay-user",
            password="relay-pw",
        )
        name = marker("clear")
        recipients = [f"a@{name}.example", f"b@{name}.example", "c@elsewhere.example"]
        queue_id = submit(daemon, SENDER, recipients, message(name))
        for recipient in recipients:
            wait_attempt(daemon, queue_id, recipient, "sent")
        [session] = server.sessions
        assert not session.tls and session.authenticated == "relay-user"
        # Through a smart host, every recipient goes in one transaction.
        assert delivered_once(session.transactions).recipients == recipients


def test_smarthost_refusing_auth_defers(start_mta, tmp_path):
    behaviour = Behaviour(auth=("relay-user", "relay-pw"), auth_needs_tls=False)
    with CaptureServer(behaviour, host=PLAIN_MX) as server:
        daemon = smarthost_daemon(
            start_mta, tmp_path, server, smarthost_tls="none", user="relay-user", password="wrong"
        )
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], message("bad-auth"))
        line = wait_attempt(daemon, queue_id, recipient, "deferred")
        assert "4.7.8" in line and "535" in line
        assert not server.transactions


def test_large_message_streams_from_disk(start_mta, tmp_path):
    size = 50 * 1024 * 1024
    line = b"0123456789 large message line, streamed and never held whole ....\n"
    body = line * (size // len(line))
    sent = (b"Subject: large\n\n" + body).replace(b"\n", b"\r\n")
    with CaptureServer(Behaviour(), host=PLAIN_MX) as server:
        extra = 'max_message_size = "60M"'
        daemon = smarthost_daemon(
            start_mta, tmp_path, server, smarthost_tls="none", extra=f"[limits]\n{extra}"
        )
        reset_peak_memory(daemon)
        baseline = memory(daemon, "VmRSS")
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], sent)
        wait_attempt(daemon, queue_id, recipient, "sent")
        transaction = delivered_once(server.transactions)
        assert transaction.data.endswith(sent)
        assert transaction.size > size
        grown = memory(daemon, "VmHWM") - baseline
        assert grown < 20 * 1024 * 1024, f"the daemon grew by {grown} bytes"


def memory(daemon: Daemon, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of the daemon, bytes."""
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    [kilobytes] = re.findall(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(kilobytes) * 1024


def reset_peak_memory(daemon: Daemon) -> None:
    """Start VmHWM afresh from the current resident size (Linux 4.0+)."""
    Path(f"/proc/{daemon.process.pid}/clear_refs").write_text("5")


# -- expiry and delay warnings


def test_delay_warning_then_expiry_bounce(start_mta, tmp_path):
    deferring = Behaviour(data_end_reply="451 4.3.0 mailbox busy")
    with CaptureServer(deferring, host=PLAIN_MX) as server:
        daemon = smarthost_daemon(
            start_mta, tmp_path, server, smarthost_tls="none", lifetime="3s", delay_warning="1s"
        )
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], message("expiry"))
        wait_notification(daemon, queue_id, "delay")
        line = wait_attempt(daemon, queue_id, recipient, "bounced")
        assert "4.4.7" in line
        wait_notification(daemon, queue_id)
        wait_gone(daemon, queue_id)
        stored = notifications(daemon, "example.test", "alice", queue_id)
        delayed, failed = [parse_dsn(raw) for raw in stored]
        if delayed.recipients[0]["Action"] != "delayed":
            delayed, failed = failed, delayed
        warning = delayed.recipient(recipient)
        assert warning["Action"] == "delayed" and warning["Status"] == "4.3.0"
        assert "Will-Retry-Until" in warning
        assert delayed.message["Subject"] == "Delayed Mail (still being retried)"
        final = failed.recipient(recipient)
        assert (final["Action"], final["Status"]) == ("failed", "4.4.7")
        assert "451 4.3.0 mailbox busy" in final["Diagnostic-Code"]
        assert final["Remote-MTA"] == f"dns; {PLAIN_MX}"
        assert not any(t.reply.startswith("250") for t in server.transactions)


# -- crashes and restarts


def test_sigkill_during_relay_then_restart_delivers_once(start_mta, tmp_path):
    with CaptureServer(Behaviour(hang_at="DOT"), host=PLAIN_MX) as server:
        daemon = smarthost_daemon(start_mta, tmp_path, server, smarthost_tls="none")
        recipient = "friend@remote.example"
        sent = message("kill-in-relay")
        queue_id = submit(daemon, SENDER, [recipient], sent)
        wait_until(
            lambda: any(s.received.endswith(b"\r\n.\r\n") for s in server.sessions),
            what="the whole message at the hanging server",
        )
        daemon.kill()
        change_behaviour(server, hang_at=None)
        daemon.start()
        wait_attempt(daemon, queue_id, recipient, "sent")
        wait_gone(daemon, queue_id)
        received_part(delivered_once(server.transactions), sent)


def test_sigkill_after_some_recipients_were_sent_never_resends_to_them(start_mta, tmp_path):
    zones = {"fast.test": [["A", PLAIN_MX]], "slow.test": [["A", TLS_MX]]}
    behaviours = {PLAIN_MX: Behaviour(), TLS_MX: Behaviour(hang_at="DOT")}
    with DNSServer(tmp_path / "dns", zones) as dns, CaptureGroup(behaviours) as captures:
        daemon = start_mta(
            users=USERS, extra=relay_config(resolver=dns.resolver, mx_port=captures.port)
        )
        fast, slow = "one@fast.test", "two@slow.test"
        queue_id = submit(daemon, SENDER, [fast, slow], message("partial"))
        wait_attempt(daemon, queue_id, fast, "sent")
        slow_server = captures[TLS_MX]
        wait_until(lambda: any(s.received.endswith(b"\r\n.\r\n") for s in slow_server.sessions))
        daemon.kill()
        [state] = [r for r in envelope(daemon, queue_id)["recipients"] if r["address"] == fast]
        assert state["state"] == "sent"
        change_behaviour(slow_server, hang_at=None)
        daemon.start()
        wait_attempt(daemon, queue_id, slow, "sent")
        wait_gone(daemon, queue_id)
        delivered_once(captures[PLAIN_MX].transactions)
        delivered_once(slow_server.transactions)
        assert not attempts(daemon, queue_id, fast, "sent")[1:]


def delivered_markers(server: CaptureServer) -> set[str]:
    """The markers of the messages ``server`` accepted."""
    found = (re.search(rb"Subject: relay test (\S+)", t.message) for t in accepted(server))
    return {match.group(1).decode() for match in found if match}


def accepted(server: CaptureServer) -> list[Transaction]:
    return [t for t in server.transactions if t.reply.startswith("250")]


def test_sigkill_while_relaying_a_stream_then_restart_loses_nothing(start_mta, tmp_path):
    """Killed while it takes messages in and relays others, the daemon
    relays every acknowledged message after a restart: at least once, as
    SMTP allows for one whose result was not yet recorded."""
    with CaptureServer(Behaviour(), host=PLAIN_MX) as server:
        daemon = smarthost_daemon(start_mta, tmp_path, server, smarthost_tls="none")
        acknowledged = []
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            for n in range(400):
                client.mail(SENDER)
                client.rcpt(f"friend{n}@remote.example")
                code, text = client.data(message(f"stream-{n}"))
                assert code == 250, text
                acknowledged.append(f"stream-{n}")
                if len(accepted(server)) >= 30:
                    break
        daemon.kill()
        assert len(accepted(server)) >= 30, "the relay never got going"
        daemon.start()
        wait_queue_empty(daemon)
        wait_until(
            lambda: delivered_markers(server) >= set(acknowledged),
            what="every acknowledged message at the smart host",
        )


BUSY = "421 4.3.2 busy, come back later"


def test_sigkill_with_100_queued_then_restart_delivers_all_once(start_mta, tmp_path):
    with CaptureServer(Behaviour(greeting=BUSY), host=PLAIN_MX) as server:
        daemon = smarthost_daemon(start_mta, tmp_path, server, smarthost_tls="none")
        recipients = [f"friend{n}@remote.example" for n in range(100)]
        ids = []
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            for recipient in recipients:
                client.mail(SENDER)
                client.rcpt(recipient)
                code, text = client.data(message(recipient))
                assert code == 250, text
                ids.append(text.decode().rsplit(" ", 1)[1])
        daemon.kill()
        assert len(list((daemon.spool / "queue").glob("*.env"))) == 100
        change_behaviour(server, greeting=Behaviour().greeting)
        daemon.start()
        wait_queue_empty(daemon)
        for queue_id, recipient in zip(ids, recipients):
            wait_attempt(daemon, queue_id, recipient, "sent")
        delivered = [r for t in server.transactions for r in t.recipients]
        assert sorted(delivered) == sorted(recipients)
        assert all(t.reply.startswith("250") for t in server.transactions)


# -- the queue command, daemon running and stopped


def test_flush_on_running_and_stopped_daemon(start_mta, tmp_path):
    with CaptureServer(Behaviour(greeting=BUSY), host=PLAIN_MX) as server:
        daemon = smarthost_daemon(
            start_mta, tmp_path, server, smarthost_tls="none", retry_min="1h", retry_max="2h"
        )
        first, second = "first@remote.example", "second@remote.example"
        first_id = submit(daemon, SENDER, [first], message("flush-1"))
        second_id = submit(daemon, SENDER, [second], message("flush-2"))
        wait_attempt(daemon, first_id, first, "deferred")
        wait_attempt(daemon, second_id, second, "deferred")
        as_json = queue_cli(daemon, "list", "--json")
        assert sorted(m["id"] for m in json.loads(as_json.stdout)) == [first_id, second_id]
        # Running: flush makes the daemon try now, not in an hour.
        change_behaviour(server, greeting=Behaviour().greeting)
        flushed = queue_cli(daemon, "flush")
        assert flushed.returncode == 0 and "2 message(s)" in flushed.stdout
        wait_attempt(daemon, first_id, first, "sent")
        wait_attempt(daemon, second_id, second, "sent")
        change_behaviour(server, greeting=BUSY)
        # A new process: no connection kept from the deliveries above.
        daemon.stop()
        daemon.start()
        third = "third@remote.example"
        third_id = submit(daemon, SENDER, [third], message("flush-3"))
        wait_attempt(daemon, third_id, third, "deferred")
        daemon.stop()
        # Stopped: list and flush work; the next start tries at once.
        listing = queue_cli(daemon, "list")
        assert listing.returncode == 0 and third_id in listing.stdout
        assert queue_cli(daemon, "flush").returncode == 0
        change_behaviour(server, greeting=Behaviour().greeting)
        daemon.start()
        wait_attempt(daemon, third_id, third, "sent")
        wait_gone(daemon, third_id)
        for recipient in (first, second, third):
            delivered_once([t for t in server.transactions if recipient in t.recipients])
        assert "the queue is empty" in queue_cli(daemon, "list").stdout


# -- name servers that fail


def test_failing_name_server_defers_and_never_bounces(start_mta, tmp_path):
    failing = [("servfail.test", "MX"), ("nomx.test", "A"), ("nomx.test", "AAAA")]
    with FailingDNS(failing, {"nomx.test": PLAIN_MX}) as dns:
        daemon = start_mta(users=USERS, extra=relay_config(resolver=dns.resolver))
        recipients = ["someone@servfail.test", "someone@nomx.test"]
        queue_id = submit(daemon, SENDER, recipients, message("servfail"))
        for recipient in recipients:
            line = wait_attempt(daemon, queue_id, recipient, "deferred")
            assert "(4.4.3 " in line, line
        assert not attempts(daemon, queue_id, recipients[1], "bounced")
        assert ("nomx.test", "MX") in dns.queries and ("nomx.test", "A") in dns.queries


# -- the scheduler under pressure, and damaged queue files


def test_queue_at_its_concurrency_limit_waits_without_spinning(start_mta, tmp_path):
    domains = [f"d{n}.test" for n in range(24)]
    zones = {domain: [["A", HANGING_MX]] for domain in domains}
    hanging = {HANGING_MX: Behaviour(hang_at="greeting")}
    with DNSServer(tmp_path / "dns", zones) as dns, CaptureGroup(hanging) as captures:
        daemon = start_mta(
            users=USERS, extra=relay_config(resolver=dns.resolver, mx_port=captures.port)
        )
        # Ten messages of one domain each, one for twelve domains, two more:
        # 24 attempts wanted, 20 at most at once, whatever the messages.
        for domain in domains[:10]:
            submit(daemon, SENDER, [f"someone@{domain}"], message(domain))
        submit(daemon, SENDER, [f"someone@{domain}" for domain in domains[10:22]], message("12"))
        for domain in domains[22:]:
            submit(daemon, SENDER, [f"someone@{domain}"], message(domain))
        server = captures[HANGING_MX]
        wait_until(lambda: len(server.sessions) >= 20, what="20 attempts at once")
        before, started = cpu_seconds(daemon), time.monotonic()
        assert queue_cli(daemon, "list").returncode == 0  # some wall time
        used, elapsed = cpu_seconds(daemon) - before, time.monotonic() - started
        assert used < 0.5 * elapsed, f"the idle daemon used {used:.2f}s CPU in {elapsed:.2f}s"
        assert len(server.sessions) == 20  # the limit: the rest wait for a slot


def cpu_seconds(daemon: Daemon) -> float:
    """User and system CPU time the daemon used so far."""
    fields = Path(f"/proc/{daemon.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_damaged_envelope_does_not_stop_the_queue(start_mta, tmp_path):
    with CaptureServer(Behaviour(), host=PLAIN_MX) as server:
        daemon = smarthost_daemon(start_mta, tmp_path, server, smarthost_tls="none")
        daemon.stop()
        queue = daemon.spool / "queue"
        damaged = {"00000000000000001": "{not json", "00000000000000002": '{"version": 99}'}
        for queue_id, text in damaged.items():
            (queue / f"{queue_id}.msg").write_bytes(b"Subject: damaged\n\nbody\n")
            (queue / f"{queue_id}.env").write_text(text)
        daemon.start()
        recipient = "friend@remote.example"
        queue_id = submit(daemon, SENDER, [recipient], message("after-damage"))
        wait_attempt(daemon, queue_id, recipient, "sent")
        listing = queue_cli(daemon, "list")
        assert listing.returncode == 0 and "the queue is empty" in listing.stdout
        # Set aside for the administrator, not deleted.
        for queue_id in damaged:
            daemon.wait_for_log(rf"id={queue_id} unreadable envelope .*queue/corrupt/", WAIT)
            assert (queue / "corrupt" / f"{queue_id}.msg").exists()
            assert (queue / "corrupt" / f"{queue_id}.env").exists()
