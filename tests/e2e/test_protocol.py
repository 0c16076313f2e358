"""The SMTP protocol against the real daemon: every kind of bad input.

Most tests share the module's ``mta`` daemon (users alice and bob, the
default limits, 127.0.0.1 trusted); ``strict`` adds small limits, an
untrusted 127.0.0.1 and a UTF-8 account.  Timeouts and connection limits
get daemons of their own.  Raw sockets send exactly the bytes under test;
every message carries a unique marker so tests sharing a daemon find
their own files.
"""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import Daemon, insecure_context, make_daemon
from tests.helpers.raw import EHLO, HOSTNAME, MAIL, Raw, connect, delivered, new_marker

ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3} ")
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"]
STRICT = """
[relay]
networks = ["10.0.0.0/8"]

[limits]
max_message_size = "64K"
max_recipients = 3
"""


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[Daemon]:
    """127.0.0.1 may not relay; 64 KiB messages, 3 recipients; user jörg."""
    users = USERS + "jörg@example.test:{PLAIN}jörg-secret\n"
    root = tmp_path_factory.mktemp("strict")
    daemon = make_daemon(root, users=users, aliases=ALIASES, extra=STRICT)
    daemon.start()
    yield daemon
    daemon.stop()


def message_of(stored: bytes) -> bytes:
    """What follows our Return-Path, Delivered-To and Received headers."""
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: ")
    index = 3
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\n".join(lines[index:])


def peak_memory(daemon: Daemon) -> int:
    """The daemon's peak resident set (VmHWM) in bytes."""
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


# -- line length and memory: first, while the daemon's peak memory is low ----


def test_an_endless_command_line_is_discarded_in_bounded_memory(mta):
    before = peak_memory(mta)
    with connect(mta) as raw:
        chunk = b"A" * 65536
        for _ in range(160):  # 10 MiB without a line end
            raw.send(chunk)
        raw.send(b"\r\nNOOP\r\n")
        assert [(r.code, r.text) for r in raw.replies(2)] == [
            (500, b"5.5.2 Error: line too long"),
            (250, b"2.0.0 Ok"),
        ]
    assert peak_memory(mta) - before < 4 << 20


def test_a_client_that_does_not_read_its_replies_costs_no_memory(mta):
    """EHLO pipelined without reading: 8 octets in, 150 out, if we let it.

    (Not HELP: that is junk, and the junk limit closes the session.)
    """
    before = peak_memory(mta)
    raw = connect(mta)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sock.settimeout(0.5)  # the server stopped reading: stop sending
    chunk, sent = b"EHLO x\r\n" * 10000, 0
    try:
        while sent < 4 << 20:  # 60 MB of replies if all were answered
            sent += raw.sock.send(chunk)
    except TimeoutError:
        pass
    raw.sock.close()
    assert peak_memory(mta) - before < 8 << 20
    with connect(mta) as again:
        again.expect(b"NOOP", 250)


def test_command_lines_may_be_512_octets_not_513(mta):
    with connect(mta) as raw:
        raw.expect(b"NOOP " + b"x" * 505, 250)  # 512 with the CRLF
        raw.expect(b"NOOP " + b"x" * 506, 500, b"5.5.2")
        raw.expect(b"NOOP", 250)


def test_local_part_64_and_domain_255_octets_are_the_limits(mta):
    label = b"d" * 63
    domain_255 = b".".join([label, label, label, b"d" * 61, b"test"])[:255]
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        raw.expect(b"RCPT TO:<" + b"a" * 64 + b"@example.test>", 550, b"5.1.1")
        raw.expect(b"RCPT TO:<" + b"a" * 65 + b"@example.test>", 501, b"5.1.3")
        raw.expect(b"RCPT TO:<a@" + domain_255 + b"x>", 501, b"5.1.3")


# -- greeting, extensions, replies -------------------------------------------


def test_greeting_and_ehlo_keywords(mta):
    with mta.smtp() as client:
        code, text = client.ehlo("client.example.org")
        assert code == 250
        assert text.split(b"\n")[1:] == [
            b"PIPELINING",
            b"SIZE 26214400",
            b"8BITMIME",
            b"ENHANCEDSTATUSCODES",
            b"SMTPUTF8",
            b"STARTTLS",
        ]
        client.starttls(context=insecure_context())
        client.ehlo("client.example.org")
        assert "starttls" not in client.esmtp_features
        assert {"pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8"} <= set(
            client.esmtp_features
        )


def test_every_reply_but_helo_and_ehlo_carries_an_enhanced_status_code(mta):
    session = [
        (b"HELO client.example.org", 250),
        (b"NOOP", 250),
        (b"NOOP with an argument", 250),
        (b"VRFY alice@example.test", 252),
        (b"VRFY", 501),
        (b"EXPN staff", 502),
        (b"HELP", 214),
        (b"RCPT TO:<alice@example.test>", 503),
        (b"BOGUS", 500),
        (b"MAIL FROM:<>", 250),
        (b"MAIL FROM:<>", 503),
        (b"RCPT TO:<nobody@example.test>", 550),
        (b"RCPT TO:<alice@example.test>", 250),
        (b"RSET", 250),
        (b"DATA", 503),
        (b"EHLO client.example.org", 250),
        (b"MAIL FROM:<sender@example.org>", 250),
        (b"RCPT TO:<alice@example.test>", 250),
        (b"DATA", 354),
        (b"Subject: codes\r\n\r\nhi\r\n.", 250),
        (b"QUIT", 221),
    ]
    with connect(mta) as raw:
        for line, code in session:
            reply = raw.command(line)
            assert reply.code == code, (line, reply)
            if line.startswith((b"HELO", b"EHLO")) or code == 354:
                # RFC 2034 exempts HELO and EHLO; RFC 3463 has no class 3.
                assert not any(ENHANCED.match(text) for text in reply.lines)
            else:
                for text in reply.lines:
                    assert ENHANCED.match(text) and text[:1] == str(code)[0].encode(), reply
        assert raw.at_eof()


def test_a_whole_transaction_pipelined_in_one_write(mta):
    marker = new_marker()
    with connect(mta) as raw:
        raw.send(
            EHLO + b"\r\nMAIL FROM:<sender@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        )
        assert [r.code for r in raw.replies(6)] == [250, 250, 250, 550, 250, 354]
        raw.send(b"Subject: " + marker + b"\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        assert [r.code for r in raw.replies(2)] == [250, 221]
    assert len(delivered(mta, marker, "alice")) == len(delivered(mta, marker, "bob")) == 1


def test_thousands_of_pipelined_commands_are_answered_in_order(mta):
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        # HELO ends the transaction like RSET, which would count as junk.
        raw.send(b"MAIL FROM:<sender@example.org>\r\nHELO x\r\n" * 2000 + b"QUIT\r\n")
        texts = [reply.text for reply in raw.replies(4001)]
        assert texts == [b"2.1.0 Ok", b"mx.example.test"] * 2000 + [b"2.0.0 Bye"]


# -- MAIL and RCPT parameters --------------------------------------------------


def test_size_is_checked_at_mail(mta):
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(b"MAIL FROM:<sender@example.org> SIZE=26214401", 552, b"5.3.4")
        raw.expect(b"MAIL FROM:<sender@example.org> SIZE=26214400", 250, b"2.1.0")


def test_unknown_parameters_are_refused_with_555(mta):
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(b"MAIL FROM:<sender@example.org> FOO=BAR", 555, b"5.5.4")
        raw.expect(b"MAIL FROM:<sender@example.org> BODY=8BITMIME SMTPUTF8", 250)
        raw.expect(b"RCPT TO:<alice@example.test> NOTIFY=NEVER", 555, b"5.5.4")


def test_an_8bit_body_is_stored_byte_exact(mta):
    marker = new_marker()
    octets = bytes(b for b in range(256) if b not in b"\r\n")
    body = b"".join(octets[i : i + 50] + b"\r\n" for i in range(0, len(octets), 50))
    message = b"Subject: " + marker + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
    with connect(mta) as raw:
        raw.start_data(mail=b"MAIL FROM:<sender@example.org> BODY=8BITMIME")
        raw.expect(message + b".", 250)
    [stored] = delivered(mta, marker)
    assert message_of(stored) == message.replace(b"\r\n", b"\n")


def test_utf8_sender_needs_smtputf8_and_is_delivered_with_it(mta):
    marker = new_marker()
    sender = "jörg@exämple.org".encode()
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(b"MAIL FROM:<" + sender + b">", 553, b"5.6.7")
        raw.start_data(mail=b"MAIL FROM:<" + sender + b"> SMTPUTF8")
        raw.expect(b"Subject: " + marker + b"\r\n\r\nhi\r\n.", 250)
    [stored] = delivered(mta, marker)
    assert stored.startswith(b"Return-Path: <" + sender + b">\n")


def test_a_utf8_recipient_is_delivered(strict):
    marker = new_marker()
    with strict.smtp() as client:
        client.ehlo("client.example.org")
        refused = client.sendmail(
            "sender@example.org",
            ["jörg@example.test"],
            b"Subject: " + marker + b"\r\n\r\nhi\r\n",
            mail_options=["SMTPUTF8"],
        )
    assert refused == {}
    [stored] = [m for m in strict.messages("example.test", "jörg") if marker in m]
    assert "Delivered-To: jörg@example.test\n".encode() in stored


# -- malformed commands -------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"NOOP\n", b"NOOP\rNOOP\r\n", b"HELO x\nMAIL FROM:<a@example.org>\r\n", b"\n", b"\r\r\n"],
)
def test_bare_line_endings_in_commands_are_refused(mta, data):
    with connect(mta) as raw:
        raw.send(data + b"NOOP\r\n")
        reply = raw.reply()
        assert (reply.code, reply.text[:6]) == (500, b"5.5.2 ")
        while reply.code >= 500:  # the pieces of the line, each refused
            reply = raw.reply()
        assert (reply.code, reply.text) == (250, b"2.0.0 Ok")


@pytest.mark.parametrize(
    "line",
    [
        b"\xff\xfeHELO x",
        b"HELO \x00x",
        b"\x00",
        b"NO\x00OP",
        b"MAIL FROM:<a\x00b@example.org>",
        b"H\xc3\xa9LO x",
        b" HELO x",
        b"",
    ],
)
def test_non_ascii_verbs_and_nul_bytes_are_refused(mta, line):
    with connect(mta) as raw:
        raw.expect(line, 500, b"5.5.2")
        raw.expect(b"NOOP", 250)


@pytest.mark.parametrize(
    "line", [b"AUTH", b"AUTH PLAIN =", b"AUTH PLAIN !!!", b"AUTH XYZ", b"AUTH LOGIN \xff"]
)
def test_auth_garbage_is_answered_not_dropped(mta, line):
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        reply = raw.command(line)
        assert 500 <= reply.code < 600 and ENHANCED.match(reply.text), reply
        raw.expect(b"NOOP", 250)


def test_too_many_errors_close_the_connection(mta):
    with connect(mta) as raw:
        raw.send(b"BOGUS\r\n" * 12)
        assert [r.code for r in raw.replies(11)] == [500] * 10 + [421]
        assert raw.at_eof()


# -- DATA ---------------------------------------------------------------------


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_delivers_neither_message(mta, sequence):
    outer, inner = new_marker(), new_marker()
    with connect(mta) as raw:
        raw.start_data()
        raw.send(
            b"Subject: " + outer + b"\r\n\r\nhello" + sequence
            + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            + b"Subject: " + inner + b"\r\n\r\nsmuggled\r\n.\r\nNOOP\r\n"
        )
        replies = raw.replies(2)
        assert [(r.code, r.text[:6]) for r in replies] == [(554, b"5.6.0 "), (250, b"2.0.0 ")]
    for marker in (outer, inner):
        assert delivered(mta, marker, "alice") == delivered(mta, marker, "bob") == []


@pytest.mark.parametrize("line", [b"bare LF\n", b"bare\rCR\r\n", b"\r\r\n", b"\n"])
def test_a_bare_lf_or_cr_in_data_refuses_the_message(mta, line):
    marker = new_marker()
    with connect(mta) as raw:
        raw.start_data()
        raw.expect(b"Subject: " + marker + b"\r\n\r\n" + line + b"after\r\n.", 554, b"5.6.0")
        raw.expect(b"NOOP", 250)
    assert delivered(mta, marker) == []


def test_an_overlong_data_line_runs_none_of_the_commands_after_it(mta):
    marker, smuggled = new_marker(), new_marker()
    with connect(mta) as raw:
        raw.start_data()
        raw.send(b"Subject: " + marker + b"\r\n\r\n" + b"x" * 1001 + b"\r\n")
        raw.send(
            b"RSET\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            b"Subject: " + smuggled + b"\r\n\r\nQUIT\r\n"
        )
        raw.expect(b".", 554, b"5.6.0")
        raw.expect(b"NOOP", 250)
    assert delivered(mta, marker) == delivered(mta, smuggled, "bob") == []


def test_a_998_octet_line_is_accepted_and_999_refused(mta):
    fits, too_long = new_marker(), new_marker()
    with connect(mta) as raw:
        raw.start_data()
        line = b"Subject: " + fits + b"\r\n\r\n" + b"8" * 998
        raw.expect(line + b"\r\n.", 250)
        raw.start_data()
        raw.expect(b"Subject: " + too_long + b"\r\n\r\n" + b"9" * 999 + b"\r\n.", 554, b"5.6.0")
    [stored] = delivered(mta, fits)
    assert message_of(stored).endswith(b"\n\n" + b"8" * 998 + b"\n")
    assert delivered(mta, too_long) == []


def test_dot_stuffing_is_undone_byte_exact(mta):
    marker = new_marker()
    body = b"..\r\n...\r\n.. \r\n.x\r\nx.\r\n\r\n..\r\n"
    sent = b"..leading dot\r\nSubject: " + marker + b"\r\n\r\n" + body
    # The first line is not a header field: an empty line goes before it.
    stored = b"\n.leading dot\nSubject: " + marker + b"\n\n.\n..\n. \nx\nx.\n\n.\n"
    with connect(mta) as raw:
        raw.start_data()
        raw.expect(sent + b".", 250)
    [message] = delivered(mta, marker)
    assert message_of(message) == stored


def test_a_large_message_in_odd_chunks_is_stored_byte_exact(mta):
    """5 MB sent in pieces so that dot-stuffed lines and the final
    <CRLF>.<CRLF> are cut at many different places."""
    marker = new_marker()
    lines = [b"Subject: " + marker, b""]
    for n in range(70000):
        lines.append(b"." * (n % 4) + b"line %d " % n + b"x" * (n % 131))
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    assert len(stuffed) > 5_000_000
    sizes = [1, 2, 3, 5, 7, 11, 13, 4093, 1021, 65537, 17, 8191]
    with connect(mta) as raw:
        raw.start_data()
        position = 0
        for size in _cycle(sizes):
            if position >= len(stuffed):
                break
            raw.send(stuffed[position : position + size])
            position += size
        for octet in b".\r\n":
            raw.send(bytes([octet]))
        assert raw.reply().code == 250
    [stored] = delivered(mta, marker)
    assert message_of(stored) == message.replace(b"\r\n", b"\n")


def _cycle(sizes: list[int]) -> Iterator[int]:
    while True:
        yield from sizes


def test_a_client_gone_in_the_middle_of_data_leaves_nothing(mta):
    marker = new_marker()
    with connect(mta) as raw:
        raw.start_data()
        raw.send(b"Subject: " + marker + b"\r\n\r\nhalf a mess")
    mta.wait_for_log(r"lost connection after DATA from unknown\[127\.0\.0\.1\]; message discarded")
    assert list((mta.maildir("example.test", "alice") / "tmp").iterdir()) == []
    assert delivered(mta, marker) == []
    with connect(mta) as raw:
        raw.expect(b"NOOP", 250)


def test_an_undeclared_oversize_body_is_refused_at_the_end(strict):
    marker = new_marker()
    with connect(strict) as raw:
        raw.expect(EHLO, 250)
        raw.expect(b"MAIL FROM:<sender@example.org> SIZE=65537", 552, b"5.3.4")
        raw.expect(b"RSET", 250)
        raw.start_data()
        body = (b"y" * 98 + b"\r\n") * 1000  # 100 KB
        raw.expect(b"Subject: " + marker + b"\r\n\r\n" + body + b".", 552, b"5.3.4")
        raw.expect(b"NOOP", 250)
    assert delivered(strict, marker) == []


# -- recipients and relaying -----------------------------------------------------


def test_too_many_recipients(strict):
    marker = new_marker()
    with connect(strict) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        for local in (b"alice", b"bob", b"postmaster"):
            raw.expect(b"RCPT TO:<" + local + b"@example.test>", 250)
        raw.expect(b"RCPT TO:<alice+more@example.test>", 452, b"4.5.3")
        raw.expect(b"DATA", 354)
        raw.expect(b"Subject: " + marker + b"\r\n\r\nhi\r\n.", 250)
    assert len(delivered(strict, marker, "alice")) == len(delivered(strict, marker, "bob")) == 1


def test_an_unknown_user_is_550_5_1_1(mta):
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        raw.expect(b"RCPT TO:<nobody@example.test>", 550, b"5.1.1")
        raw.expect(b"RCPT TO:<alice@example.test>", 250)


def test_an_untrusted_client_may_not_relay(strict):
    with connect(strict) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        raw.expect(b"RCPT TO:<someone@remote.example>", 554, b"5.7.1")
        raw.expect(b"RCPT TO:<someone@[192.0.2.1]>", 554, b"5.7.1")
        raw.expect(b"RCPT TO:<alice@example.test>", 250)


@pytest.mark.parametrize(
    "path",
    [
        b"<../x@example.test>",
        b'<"../x"@example.test>',
        b'<"../../etc/passwd"@example.test>',
        b"<a/b@example.test>",
        b"<x/../../y@example.test>",
        b"<.x@example.test>",
        b'<"a\\\\b"@example.test>',
        b"<a\x01b@example.test>",
        b'<"a\x7fb"@example.test>',
        b"<a\x00b@example.test>",
        b"<alice@../example.test>",
    ],
)
def test_path_tricks_in_local_parts_are_refused(mta, path):
    before = sorted(mta.root.rglob("*"))
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        reply = raw.command(b"RCPT TO:" + path)
        assert reply.code in (500, 501, 550, 553) and ENHANCED.match(reply.text), reply
        raw.expect(b"NOOP", 250)
    assert [p for p in sorted(mta.root.rglob("*")) if p.name != "daemon.log"] == [
        p for p in before if p.name != "daemon.log"
    ]


# -- TLS and the submission listeners ----------------------------------------------


def test_commands_pipelined_behind_starttls_are_discarded(mta):
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.send(b"STARTTLS\r\nMAIL FROM:<sender@example.org>\r\n")
        assert raw.reply().code == 220
        raw.starttls()
        ehlo = raw.command(EHLO)  # the first reply inside TLS is EHLO's
        assert ehlo.code == 250 and ehlo.lines[0].startswith(HOSTNAME + b" Hello")
        assert b"STARTTLS" not in ehlo.lines
        raw.expect(b"RCPT TO:<alice@example.test>", 503, b"5.5.1")


def test_starttls_starts_the_session_over(mta):
    marker = new_marker()
    with connect(mta) as raw:
        raw.expect(EHLO, 250)
        raw.expect(MAIL, 250)
        raw.expect(b"STARTTLS", 220, b"2.0.0")
        raw.starttls()
        raw.expect(b"RCPT TO:<alice@example.test>", 503, b"5.5.1")
        raw.expect(MAIL, 503, b"5.5.1")
        raw.start_data()
        raw.expect(b"Subject: " + marker + b"\r\n\r\nhi\r\n.", 250)
    [stored] = delivered(mta, marker)
    assert b" with ESMTPS id " in stored and b"\t(TLSv1." in stored


def test_submission_refuses_mail_without_auth(mta):
    with connect(mta, "submission") as raw:
        raw.expect(EHLO, 250)
        raw.expect(b"MAIL FROM:<alice@example.test>", 530, b"5.7.0")
        raw.expect(b"STARTTLS", 220)
        raw.starttls()
        raw.expect(EHLO, 250)
        raw.expect(b"MAIL FROM:<alice@example.test>", 530, b"5.7.0")


def test_submissions_is_implicit_tls_and_refuses_mail_without_auth(mta):
    with mta.smtp("submissions") as client:
        code, text = client.ehlo("client.example.org")
        assert code == 250 and "starttls" not in client.esmtp_features
        assert client.mail("alice@example.test") == (530, b"5.7.0 Authentication required")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.starttls(context=insecure_context())


# -- limits that need a daemon of their own -----------------------------------------


def test_an_idle_client_gets_421_and_is_disconnected(start_mta):
    daemon = start_mta(extra='[limits]\nidle_timeout = "1s"\n')
    with connect(daemon) as raw:
        raw.expect(EHLO, 250)
        reply = raw.reply()  # the server's own timer, about a second
        assert (reply.code, reply.text) == (421, b"4.4.2 mx.example.test Error: timeout exceeded")
        assert raw.at_eof()


def assert_refused(raw: Raw) -> None:
    reply = raw.reply()
    assert reply.code == 421
    assert reply.text == b"4.7.0 mx.example.test Too many connections, try later"
    assert raw.at_eof()


def test_connections_are_limited_per_address_and_in_total(start_mta):
    """Two per address, three in all; 127.0.0.2 is a second client address."""
    daemon = start_mta(extra="[limits]\nmax_connections = 3\nmax_connections_per_ip = 2\n")
    with connect(daemon) as first, connect(daemon), Raw(daemon.ports["smtp"]) as third:
        assert_refused(third)
        with connect(daemon, source="127.0.0.2"), Raw(daemon.ports["smtp"], "127.0.0.2") as fourth:
            assert_refused(fourth)
        first.expect(b"QUIT", 221)
        assert first.at_eof()  # its slot is free again
        with connect(daemon) as fifth:
            fifth.expect(b"NOOP", 250)
