"""Delivery status notifications, read back with the stdlib email parser."""

from __future__ import annotations

import email
import email.policy
import email.utils

import pytest

from twisted_mta.mail.dsn import (
    DELAYED,
    HEADERS_LIMIT,
    RecipientFailure,
    build_dsn,
    header_block,
    read_original_headers,
    should_bounce,
)

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3 * 3600
HEADERS = b"Received: by mx.example.test\nFrom: alice@example.org\nSubject: hello\n"
USER_UNKNOWN = RecipientFailure(
    "bob@remote.example",
    "5.1.1",
    diagnostic="550 5.1.1 <bob@remote.example>: user unknown",
    remote_mta="mx.remote.example",
    last_attempt=NOW - 60,
)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def dsn(*failures: RecipientFailure, sender="alice@example.org", headers=HEADERS) -> bytes:
    return build_dsn("mx.example.test", "0123ABCD", ARRIVAL, sender, failures, headers, NOW)


def status_blocks(report) -> list:
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def test_failure_report_structure():
    report = parse(dsn(USER_UNKNOWN))
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in report.get_payload()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.test"
    assert report["From"].addresses[0].display_name == "Mail Delivery System"
    assert report["To"] == "alice@example.org"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(report["Date"]).timestamp() == NOW
    assert report["Message-ID"].endswith("@mx.example.test>")
    assert report["MIME-Version"] == "1.0"
    assert not report.defects


def test_delivery_status_fields():
    per_message, recipient = status_blocks(parse(dsn(USER_UNKNOWN)))
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["X-Twisted-MTA-Queue-ID"] == "0123ABCD"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert recipient["Final-Recipient"] == "rfc822; bob@remote.example"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; mx.remote.example"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.example>: user unknown"
    last = email.utils.parsedate_to_datetime(recipient["Last-Attempt-Date"])
    assert last.timestamp() == NOW - 60
    assert recipient["Will-Retry-Until"] is None


def test_human_part_names_each_recipient_and_reason():
    text = parse(dsn(USER_UNKNOWN)).get_payload()[0].get_content()
    assert "mx.example.test" in text
    assert "<bob@remote.example>: host mx.remote.example said: 550 5.1.1" in text


def test_only_the_original_headers_are_returned():
    report = parse(dsn(USER_UNKNOWN))
    headers = report.get_payload()[2]
    assert headers.get_payload(decode=True) == HEADERS


def test_read_original_headers_stops_at_the_body(tmp_path):
    path = tmp_path / "Q.msg"
    path.write_bytes(HEADERS + b"\nsecret body\n\nmore\n")
    assert read_original_headers(path) == HEADERS


def test_header_block_is_bounded_at_a_line_end():
    lines = b"".join(b"X-Filler-%06d: %s\n" % (n, b"x" * 50) for n in range(3000))
    block = header_block(lines + b"\nbody\n")
    assert len(block) <= HEADERS_LIMIT
    assert block.endswith(b"\n") and lines.startswith(block)
    assert header_block(b"\nbody only\n") == b""
    assert header_block(b"Subject: no body") == b"Subject: no body\n"


def test_eight_bit_headers_do_not_break_the_report():
    raw = b"Subject: caf\xe9 \xff\xfe\nFrom: \xc3\xa9ric@example.org\n"
    data = dsn(USER_UNKNOWN, headers=raw)
    report = parse(data)
    headers = report.get_payload()[2]
    assert headers["Content-Transfer-Encoding"] == "8bit"
    assert headers.get_payload(decode=True) == raw
    assert raw in data


def test_delay_warning():
    delayed = RecipientFailure(
        "carol@remote.example",
        "4.4.1",
        DELAYED,
        diagnostic="connect to mx.remote.example: Connection refused",
        last_attempt=NOW - 30,
        will_retry_until=ARRIVAL + 5 * 86400,
    )
    report = parse(dsn(delayed))
    assert report["Subject"] == "Delayed Mail (still being retried)"
    assert "WARNING ONLY" in report.get_payload()[0].get_content()
    _, recipient = status_blocks(report)
    assert recipient["Action"] == "delayed"
    assert recipient["Status"] == "4.4.1"
    # Not an SMTP reply: our own diagnostic type.
    assert recipient["Diagnostic-Code"].startswith("X-Twisted-MTA; connect to")
    until = email.utils.parsedate_to_datetime(recipient["Will-Retry-Until"])
    assert until.timestamp() == ARRIVAL + 5 * 86400


def test_several_recipients_one_block_each():
    other = RecipientFailure("dave@remote.example", "5.7.1", last_attempt=NOW)
    blocks = status_blocks(parse(dsn(USER_UNKNOWN, other)))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@remote.example",
        "rfc822; dave@remote.example",
    ]
    assert blocks[2]["Diagnostic-Code"] is None and blocks[2]["Remote-MTA"] is None


def test_a_remote_reply_cannot_forge_fields():
    evil = RecipientFailure(
        "bob@remote.example", "5.0.0", diagnostic="550 no\r\nAction: delivered\nX: \x00y"
    )
    _, recipient = status_blocks(parse(dsn(evil)))
    assert recipient["Action"] == "failed"
    assert "\n" not in recipient["Diagnostic-Code"]
    assert recipient["X"] is None


def test_utf8_addresses_use_the_global_types():
    failure = RecipientFailure("jörg@bücher.example", "5.1.1", diagnostic="550 5.1.1 unknown")
    data = dsn(failure, sender="ünal@example.org")
    report = parse(data)
    assert report.get_payload()[1].get_content_type() == "message/global-delivery-status"
    assert "Final-Recipient: utf-8; jörg@bücher.example\n".encode() in data
    assert "To: ünal@example.org\n".encode() in data


def test_quoted_sender_is_a_valid_to_header():
    report = parse(dsn(USER_UNKNOWN, sender='"john doe"@example.org'))
    assert report["To"].addresses[0].username == "john doe"
    assert not report["To"].defects


def test_null_sender_is_never_bounced():
    assert not should_bounce("")
    assert should_bounce("alice@example.org")


def test_an_empty_report_is_refused():
    with pytest.raises(ValueError):
        dsn()
