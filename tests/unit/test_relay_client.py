"""The relay's SMTP client against the capture server (tests/capture.py).

Each test drives a reactor of its own (a ``SelectReactor``, iterated until
the Deferred under test fires, with a deadline), so a hang fails the test
instead of the run; the fixture then checks that the client left no
timer or socket behind and logged no error (an unhandled failure in a
Deferred is logged when it is garbage collected).  The capture server
runs in threads with blocking sockets, on 127.0.0.x and free ports.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tests.helpers.capture import Behaviour, CaptureServer, Session, TestCA
from twisted_mta.relay.body import CHUNK_SIZE, DataEncoder
from twisted_mta.relay.outgoing import (
    AttemptResult,
    Outgoing,
    RecipientResult,
    RelayError,
    RelayTarget,
    Timeouts,
)
from twisted_mta.relay.session import deliver, open_session

QUICK = Timeouts(connect=5, command=5, data_block=5, data_end=5)
TINY = Timeouts(connect=5, command=0.3, data_block=0.3, data_end=0.3)
HELO = "relay.client.test"
DEADLINE = 30.0


# -- harness


@pytest.fixture
def reactor() -> Iterator[SelectReactor]:
    """A reactor of the test's own; the client must leave it clean."""
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("isError") or "log_failure" in event:
            errors.append(event)

    # What earlier tests left for the collector is theirs, not this test's.
    gc.collect()
    globalLogPublisher.addObserver(observe)
    reactor = SelectReactor()
    yield reactor
    gc.collect()
    globalLogPublisher.removeObserver(observe)
    timers = reactor.getDelayedCalls()
    sockets = reactor.removeAll()
    for timer in timers:
        timer.cancel()
    for selectable in sockets:
        selectable.connectionLost(Failure(ConnectionError("test over")))
    reactor.waker.connectionLost(None)
    assert not timers, f"timers left behind: {timers}"
    assert not sockets, f"connections left behind: {sockets}"
    assert not errors, f"errors logged: {errors}"


@pytest.fixture
def run(reactor: SelectReactor) -> Callable[[Deferred], object]:
    """Iterate the reactor until ``deferred`` fires; return its result."""

    def run(deferred: Deferred, deadline: float = DEADLINE) -> object:
        outcome: list[object] = []
        deferred.addBoth(outcome.append)
        give_up = time.monotonic() + deadline
        while not outcome:
            assert time.monotonic() < give_up, "the Deferred never fired"
            reactor.iterate(0.01)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    return run


@pytest.fixture
def relay(reactor: SelectReactor, run) -> Callable[..., AttemptResult]:
    """One attempt for one message, as the queue runner makes it."""

    def relay(to: RelayTarget, outgoing: Outgoing, timeouts: Timeouts = QUICK) -> AttemptResult:
        return run(deliver(reactor, to, HELO, outgoing, timeouts))

    return relay


@pytest.fixture
def capture() -> Iterator[Callable[..., CaptureServer]]:
    """Start capture servers; all are stopped after the test."""
    servers: list[CaptureServer] = []

    def start(behaviour: Behaviour | None = None, **options) -> CaptureServer:
        server = CaptureServer(behaviour, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


def message(tmp_path: Path, body: bytes, *recipients: str, **options) -> Outgoing:
    path = tmp_path / f"{len(list(tmp_path.glob('*.msg')))}.msg"
    path.write_bytes(body)
    return Outgoing(
        sender=options.pop("sender", "sender@origin.test"),
        recipients=recipients or ("rcpt@dest.test",),
        path=path,
        size=len(body),
        **options,
    )


def target(server: CaptureServer, tls: str = "may", **options) -> RelayTarget:
    options.setdefault("name", "mx.test")
    options.setdefault("addresses", (server.host,))
    return RelayTarget(port=server.port, tls=tls, **options)


def wire_form(body: bytes) -> bytes:
    """What DATA should carry, line by line (independent of the encoder)."""
    lines = body.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def assert_clean_wire(session: Session) -> None:
    """Every CR and LF the client sent was part of a CRLF."""
    for piece in bytes(session.received).split(b"\r\n"):
        assert b"\r" not in piece and b"\n" not in piece


def only(result: AttemptResult) -> RecipientResult:
    [single] = result.results
    return single


def assert_delivered(result: AttemptResult) -> None:
    assert all(r.delivered for r in result.results), result


SIMPLE = b"Subject: hello\n\nbody\n"


# -- the DATA encoder


def test_encoder_stuffs_every_line_start_including_the_first() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b".\n..\n...x\na.b\n.\n") == b"..\r\n...\r\n....x\r\na.b\r\n..\r\n"
    assert encoder.end() == b".\r\n"


def test_encoder_ends_an_unterminated_last_line() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b"no line end") == b"no line end"
    assert encoder.end() == b"\r\n.\r\n"
    assert DataEncoder().end() == b".\r\n"  # an empty message


def test_encoder_state_carries_across_every_split() -> None:
    body = b".a\n\n.\n..\nb.\n.c\n\n...\nend\n"
    for cut in range(len(body) + 1):
        for second_cut in range(cut, len(body) + 1):
            encoder = DataEncoder()
            pieces = (body[:cut], body[cut:second_cut], body[second_cut:])
            assert b"".join(encoder.encode(p) for p in pieces) == wire_form(body)


def test_encoder_random_chunks_of_random_dots() -> None:
    rng = random.Random(7)
    body = b"".join(rng.choice([b".", b"..", b"x", b".y", b""]) + b"\n" for _ in range(5000))
    encoder = DataEncoder()
    position, out = 0, []
    while position < len(body):
        step = rng.randint(1, 40)
        out.append(encoder.encode(body[position : position + step]))
        position += step
    assert b"".join(out) == wire_form(body)


def test_encoder_refuses_a_carriage_return() -> None:
    with pytest.raises(ValueError):
        DataEncoder().encode(b"a\rb\n")


# -- the data path, end to end


def dots_at_boundaries(size: int, boundaries: tuple[int, ...]) -> bytes:
    """Lines of x, with a line starting with "." at each multiple of each
    boundary, and some lines of dots and 8-bit bytes."""
    marks = sorted({m for b in boundaries for m in range(b, size, b)})
    body = bytearray(b".first line\n...\n\xc3\xa9t\xc3\xa9 \xff\n")
    for mark in marks:
        while len(body) < mark:
            body += b"x" * min(80, max(0, mark - len(body) - 1)) + b"\n"
        assert len(body) == mark
        body += b".at %d\n" % mark
    return bytes(body + b".\n..\nlast\n")


def test_relays_byte_exact_with_dots_at_chunk_boundaries(tmp_path, relay, capture) -> None:
    server = capture(size=10_000_000)
    body = dots_at_boundaries(6 * CHUNK_SIZE, (16 * 1024, CHUNK_SIZE))
    outgoing = message(tmp_path, body, eight_bit=True)
    result = relay(target(server), outgoing)
    assert_delivered(result)
    [session] = server.sessions
    [transaction] = session.transactions
    assert transaction.data == wire_form(body)
    assert transaction.message == body
    assert_clean_wire(session)
    mail = next(c.line for c in session.commands if c.verb == "MAIL")
    assert mail == f"MAIL FROM:<sender@origin.test> SIZE={len(body)} BODY=8BITMIME"


def test_message_without_final_line_end_gets_one(tmp_path, relay, capture) -> None:
    server = capture()
    result = relay(target(server), message(tmp_path, b"a\n.b"))
    assert_delivered(result)
    assert server.transactions[0].data == b"a\r\n..b\r\n"


def test_a_carriage_return_in_the_queue_file_is_never_sent(tmp_path, relay, capture) -> None:
    server = capture()
    body = b"Subject: x\n\n" + b"y" * 100_000 + b"\nsmuggle\r\n.\r\nMAIL FROM:<evil@x>\n"
    result = relay(target(server), message(tmp_path, body))
    verdict = only(result)
    assert verdict.permanent and verdict.status == "5.6.0"
    assert not server.transactions  # the connection went before any final dot
    server.sessions[0].ended.wait(5)
    assert b"\r\r" not in server.sessions[0].received
    assert_clean_wire(server.sessions[0])


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fifty_megabytes_stream_with_bounded_memory(tmp_path, reactor, capture) -> None:
    server = capture(store_data=False)
    path = tmp_path / "big.msg"
    expected = hashlib.sha256()
    block = b"".join(b".dot line %d\n" % i + b"x" * 120 + b"\n" for i in range(4000))
    with open(path, "wb") as file:
        while file.tell() < 50 * 1024 * 1024:
            file.write(block)
            expected.update(wire_form(block))
    outgoing = Outgoing("a@origin.test", ("b@dest.test",), path, path.stat().st_size)
    before = rss()
    peak = [before]
    done = deliver(reactor, target(server), HELO, outgoing, QUICK)
    outcome: list[object] = []
    done.addBoth(outcome.append)
    give_up = time.monotonic() + 60
    while not outcome and time.monotonic() < give_up:
        reactor.iterate(0.01)
        peak.append(rss())
    assert outcome and isinstance(outcome[0], AttemptResult), outcome
    assert_delivered(outcome[0])
    [transaction] = server.transactions
    assert transaction.size == len(wire_form(block)) * (path.stat().st_size // len(block))
    assert transaction.sha256 == expected.hexdigest()
    assert max(peak) - before < 20 * 1024 * 1024


# -- extensions


def test_size_too_big_for_the_server_is_refused_before_mail(tmp_path, relay, capture) -> None:
    server = capture(size=1000)
    result = relay(target(server), message(tmp_path, b"x" * 5000 + b"\n"))
    verdict = only(result)
    assert verdict.permanent and verdict.status == "5.3.4"
    assert "MAIL" not in server.sessions[0].verbs()


def test_size_is_declared_when_offered(tmp_path, relay, capture) -> None:
    server = capture(size=10_000)
    assert_delivered(relay(target(server), message(tmp_path, SIMPLE)))
    assert f"SIZE={len(SIMPLE)}" in server.sessions[0].commands[1].line


@pytest.fixture
def threads(reactor: SelectReactor) -> Iterator[None]:
    """The reactor's thread pool, which only a running reactor starts."""
    pool = reactor.getThreadPool()
    pool.start()
    yield
    pool.stop()


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict) -> None:
        if "line" in event:
            lines.append(event["line"])

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


EIGHT_BIT = b"Subject: caf\n\ncaf\xc3\xa9 " + b"x" * 100 + b"\n"


def test_eight_bit_without_8bitmime_goes_quoted_printable(
    tmp_path, relay, capture, threads, log_lines
) -> None:
    server = capture(eightbitmime=False, size=10_000)
    outgoing = message(
        tmp_path, EIGHT_BIT, eight_bit=True, prefix=b"X-Added: at the attempt\n", queue_id="Q1"
    )
    result = relay(target(server), outgoing)
    assert_delivered(result)
    [transaction] = server.transactions
    expected = (
        b"X-Added: at the attempt\nSubject: caf\n"
        b"Content-Transfer-Encoding: quoted-printable\nMIME-Version: 1.0\n\n"
        b"caf=C3=A9 " + b"x" * 65 + b"=\n" + b"x" * 35 + b"\n"
    )
    assert transaction.message == expected
    assert transaction.parameters == (f"SIZE={len(expected)}",)  # no BODY=8BITMIME
    assert outgoing.path.read_bytes() == EIGHT_BIT
    assert f"id=Q1 converted to quoted-printable for {result.remote}" in log_lines
    assert_clean_wire(server.sessions[0])


def test_the_7bit_copy_is_held_to_the_size_limit(tmp_path, relay, capture, threads) -> None:
    body = b"\n" + b"\xe9" * 1000 + b"\n"
    server = capture(eightbitmime=False, size=2000)  # the copy is three times as big
    verdict = only(relay(target(server), message(tmp_path, body, eight_bit=True)))
    assert verdict.permanent and verdict.status == "5.3.4"
    assert "MAIL" not in server.sessions[0].verbs()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"DKIM-Signature: v=1; d=origin.test\n" + EIGHT_BIT, "DKIM-signed"),
        (b"Subject: caf\xc3\xa9\n\nbody\n", "8-bit bytes in a header field"),
    ],
)
def test_eight_bit_that_cannot_be_converted_fails_without_sending(
    tmp_path, relay, capture, threads, body, reason
) -> None:
    server = capture(eightbitmime=False)
    outgoing = message(tmp_path, body, eight_bit=True)
    verdict = only(relay(target(server), outgoing))
    assert verdict.permanent and verdict.status == "5.6.3"
    assert verdict.text.startswith("8BITMIME is required, but was not offered by host ")
    assert reason in verdict.text
    assert "MAIL" not in server.sessions[0].verbs()


def test_eight_bit_headers_go_with_smtputf8(tmp_path, relay, capture, threads) -> None:
    server = capture(eightbitmime=False)
    body = b"Subject: caf\xc3\xa9\n\ncaf\xc3\xa9\n"
    assert_delivered(relay(target(server), message(tmp_path, body, eight_bit=True, smtputf8=True)))
    [transaction] = server.transactions
    assert transaction.parameters == ("SMTPUTF8",)
    assert transaction.message.startswith(b"Subject: caf\xc3\xa9\n")
    assert transaction.message.endswith(b"\n\ncaf=C3=A9\n")


@pytest.mark.parametrize(
    ("recipient", "status"), [("j\u00f6rg@dest.test", "5.6.7"), ("plain@dest.test", "5.6.9")]
)
def test_smtputf8_without_the_extension_fails_without_sending(
    tmp_path, relay, capture, recipient, status
) -> None:
    server = capture(smtputf8=False)
    outgoing = message(tmp_path, SIMPLE, recipient, smtputf8=True)
    verdict = only(relay(target(server), outgoing))
    assert verdict.permanent and verdict.status == status
    assert "MAIL" not in server.sessions[0].verbs()


def test_smtputf8_used_when_offered(tmp_path, relay, capture) -> None:
    server = capture()
    outgoing = message(tmp_path, SIMPLE, "j\u00f6rg@d\u00e9st.test", eight_bit=True)
    assert_delivered(relay(target(server), outgoing))
    commands = [c.line for c in server.sessions[0].commands]
    assert "MAIL FROM:<sender@origin.test> BODY=8BITMIME SMTPUTF8" in commands
    assert "RCPT TO:<j\u00f6rg@d\u00e9st.test>" in commands


def test_pipelining_puts_the_envelope_in_one_write(tmp_path, relay, capture) -> None:
    server = capture()
    outgoing = message(tmp_path, SIMPLE, "a@dest.test", "b@dest.test")
    assert_delivered(relay(target(server), outgoing))
    reads = {c.verb: c.read for c in server.sessions[0].commands}
    envelope = [c.read for c in server.sessions[0].commands if c.verb in ("MAIL", "RCPT", "DATA")]
    assert len(envelope) == 4 and len(set(envelope)) == 1
    assert reads["EHLO"] < reads["MAIL"]


def test_without_pipelining_each_command_waits_for_its_reply(tmp_path, relay, capture) -> None:
    server = capture(pipelining=False)
    outgoing = message(tmp_path, SIMPLE, "a@dest.test", "b@dest.test")
    assert_delivered(relay(target(server), outgoing))
    envelope = [c.read for c in server.sessions[0].commands if c.verb in ("MAIL", "RCPT", "DATA")]
    assert len(envelope) == 4 and len(set(envelope)) == 4


# -- per-recipient results


@pytest.mark.parametrize("pipelining", [True, False])
def test_recipients_get_their_own_verdicts(tmp_path, relay, capture, pipelining) -> None:
    replies = {
        "busy@dest.test": "451 4.2.1 mailbox busy",
        "gone@dest.test": "550 5.1.1 no such user",
    }
    server = capture(rcpt_replies=replies, pipelining=pipelining)
    outgoing = message(tmp_path, SIMPLE, "ok@dest.test", "busy@dest.test", "gone@dest.test")
    ok, busy, gone = relay(target(server), outgoing).results
    assert (ok.address, ok.code, ok.status, ok.in_reply_to) == (
        "ok@dest.test",
        250,
        "2.0.0",
        "end of DATA",
    )
    assert ok.delivered
    assert (busy.code, busy.status, busy.text) == (451, "4.2.1", "451 4.2.1 mailbox busy")
    assert not busy.permanent and not busy.delivered and busy.in_reply_to == "RCPT TO"
    assert (gone.code, gone.status, gone.text) == (550, "5.1.1", "550 5.1.1 no such user")
    assert gone.permanent
    assert server.transactions[0].recipients == ["ok@dest.test"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_no_body_when_every_recipient_is_refused(tmp_path, relay, capture, pipelining) -> None:
    server = capture(
        rcpt_replies={"gone@dest.test": "550 5.1.1 no such user"}, pipelining=pipelining
    )
    outgoing = message(tmp_path, SIMPLE, "gone@dest.test")
    verdict = only(relay(target(server), outgoing))
    assert verdict.status == "5.1.1"
    assert not server.transactions
    assert ("DATA" in server.sessions[0].verbs()) == pipelining


def test_refused_sender_decides_every_recipient(tmp_path, relay, capture) -> None:
    server = capture(replies={"MAIL": "553 5.7.1 sender rejected"})
    outgoing = message(tmp_path, SIMPLE, "a@dest.test", "b@dest.test")
    results = relay(target(server), outgoing).results
    assert [(r.status, r.in_reply_to) for r in results] == [("5.7.1", "MAIL FROM")] * 2


def test_refusal_at_the_final_dot(tmp_path, relay, capture) -> None:
    server = capture(data_end_reply="550 5.7.1 content rejected")
    outgoing = message(tmp_path, SIMPLE, "a@dest.test", "b@dest.test")
    results = relay(target(server), outgoing).results
    assert [(r.code, r.status, r.in_reply_to) for r in results] == [
        (550, "5.7.1", "end of DATA")
    ] * 2


def test_deferred_then_accepted(tmp_path, relay, capture) -> None:
    server = capture(defer_first=1)
    outgoing = message(tmp_path, SIMPLE)
    first = only(relay(target(server), outgoing))
    assert (first.code, first.status, first.permanent) == (451, "4.3.0", False)
    assert only(relay(target(server), outgoing)).delivered


def test_an_address_that_could_inject_commands_is_not_sent(tmp_path, relay, capture) -> None:
    server = capture()
    outgoing = message(tmp_path, SIMPLE, "evil@dest.test>\r\nRSET", "fine@dest.test")
    evil, fine = relay(target(server), outgoing).results
    assert evil.permanent and evil.status == "5.1.3"
    assert fine.delivered
    assert server.transactions[0].recipients == ["fine@dest.test"]
    assert_clean_wire(server.sessions[0])


# -- greeting and hello


def test_helo_when_ehlo_is_refused(tmp_path, relay, capture) -> None:
    server = capture(replies={"EHLO": "500 5.5.1 what?"})
    assert_delivered(relay(target(server), message(tmp_path, SIMPLE)))
    assert server.sessions[0].verbs() == ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert server.sessions[0].commands[1].line == f"HELO {HELO}"


def test_helo_refused_too_is_permanent(tmp_path, relay, capture) -> None:
    server = capture(replies={"EHLO": "500 5.5.1 what?", "HELO": "550 5.7.1 go away"})
    verdict = only(relay(target(server), message(tmp_path, SIMPLE)))
    assert (verdict.code, verdict.status, verdict.in_reply_to) == (550, "5.7.1", "HELO")


def test_five_hundred_greeting_is_permanent_for_all(tmp_path, relay, capture) -> None:
    server = capture(greeting="554 5.3.2 not accepting mail")
    outgoing = message(tmp_path, SIMPLE, "a@dest.test", "b@dest.test")
    result = relay(target(server), outgoing)
    assert result.remote == f"mx.test[127.0.0.1]:{server.port}"
    assert [(r.code, r.status, r.in_reply_to) for r in result.results] == [
        (554, "5.3.2", "greeting")
    ] * 2
    assert server.sessions[0].verbs() == ["QUIT"]


def test_ehlo_temporary_refusal_is_temporary(tmp_path, relay, capture) -> None:
    server = capture(replies={"EHLO": "421 4.3.2 shutting down"})
    verdict = only(relay(target(server), message(tmp_path, SIMPLE)))
    assert (verdict.status, verdict.in_reply_to, verdict.permanent) == ("4.3.2", "EHLO", False)


# -- addresses


@pytest.fixture
def refusing() -> Iterator[Callable[[int], str]]:
    """An address on which ``port`` refuses connections for the test's time."""
    held: list[socket.socket] = []

    def refuse(port: int) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.2", port))  # bound, never listening: refused
        held.append(sock)
        return "127.0.0.2"

    yield refuse
    for sock in held:
        sock.close()


def test_next_address_when_the_first_refuses(tmp_path, relay, capture, refusing) -> None:
    server = capture()
    addresses = (refusing(server.port), "127.0.0.1")
    outgoing = message(tmp_path, SIMPLE)
    result = relay(target(server, addresses=addresses), outgoing)
    assert_delivered(result)
    assert result.remote == f"mx.test[127.0.0.1]:{server.port}"


def test_no_address_answers(tmp_path, relay, capture, refusing) -> None:
    server = capture()
    server.stop()
    addresses = ("127.0.0.1", refusing(server.port))
    result = relay(target(server, addresses=addresses), message(tmp_path, SIMPLE))
    verdict = only(result)
    assert result.remote is None
    assert (verdict.status, verdict.permanent) == ("4.4.1", False)
    assert verdict.text == f"connect to mx.test[127.0.0.2]:{server.port}: Connection refused"


@pytest.mark.parametrize(
    "first",
    [
        Behaviour(hang_at="greeting"),
        Behaviour(greeting="421 4.3.2 busy"),
        Behaviour(replies={"EHLO": "451 4.3.0 later"}),
    ],
)
def test_next_address_when_the_first_fails_before_mail(tmp_path, relay, capture, first) -> None:
    good = capture()
    capture(first, host="127.0.0.2", port=good.port)
    addresses = ("127.0.0.2", "127.0.0.1")
    result = relay(target(good, addresses=addresses), message(tmp_path, SIMPLE), TINY)
    assert_delivered(result)
    assert result.remote == f"mx.test[127.0.0.1]:{good.port}"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_address(tmp_path, relay, capture) -> None:
    server = capture(host="::1", starttls=True)
    result = relay(target(server), message(tmp_path, SIMPLE))
    assert_delivered(result)
    assert result.remote == f"mx.test[::1]:{server.port}"


def test_permanent_greeting_stops_at_the_first_address(tmp_path, relay, capture) -> None:
    good = capture()
    bad = capture(host="127.0.0.2", port=good.port, greeting="554 5.7.1 no")
    addresses = ("127.0.0.2", "127.0.0.1")
    verdict = only(relay(target(good, addresses=addresses), message(tmp_path, SIMPLE)))
    assert verdict.status == "5.7.1"
    assert bad.sessions and not good.sessions


# -- opportunistic TLS (MX hosts)


def test_opportunistic_tls_encrypts_without_verifying(tmp_path, run, reactor, capture) -> None:
    server = capture(starttls=True)  # a certificate nobody trusts
    session = run(open_session(reactor, target(server), HELO, QUICK))
    assert session.tls and session.tls.startswith("TLSv1.")
    assert_delivered(run(session.send(message(tmp_path, SIMPLE))))
    run(session.close())
    [recorded] = server.sessions
    assert recorded.verbs(tls=False) == ["EHLO", "STARTTLS"]
    assert recorded.verbs(tls=True) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_opportunistic_tls_stays_in_clear_without_starttls(
    tmp_path, run, reactor, capture
) -> None:
    server = capture()
    session = run(open_session(reactor, target(server), HELO, QUICK))
    assert session.tls is None
    assert_delivered(run(session.send(message(tmp_path, SIMPLE))))
    run(session.close())


def test_opportunistic_tls_continues_in_clear_when_starttls_is_refused(
    tmp_path, relay, capture
) -> None:
    server = capture(starttls=True, replies={"STARTTLS": "454 4.7.0 TLS not available"})
    assert_delivered(relay(target(server), message(tmp_path, SIMPLE)))
    assert server.sessions[0].verbs() == ["EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "QUIT"]


def test_failed_handshake_is_retried_once_in_clear(tmp_path, relay, capture) -> None:
    server = capture(starttls=True, tls_break=True)
    assert_delivered(relay(target(server), message(tmp_path, SIMPLE)))
    first, second = server.sessions
    assert first.verbs() == ["EHLO", "STARTTLS"]
    assert second.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


# -- smart host TLS and AUTH


def smarthost(
    server: CaptureServer, ca: TestCA | None, tls: str = "starttls", **options
) -> RelayTarget:
    options.setdefault("username", "relay-user")
    options.setdefault("password", "s3cret")
    options.setdefault("ca_file", ca.path if ca else None)
    return target(server, tls=tls, **options)


AUTH = ("relay-user", "s3cret")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smarthost_verified_starttls_then_auth(tmp_path, relay, capture, ca, mechanism) -> None:
    server = capture(
        starttls=True, certificate=ca.issue("mx.test"), auth=AUTH, auth_mechanisms=(mechanism,)
    )
    result = relay(smarthost(server, ca), message(tmp_path, SIMPLE))
    assert_delivered(result)
    [session] = server.sessions
    assert (session.authenticated, session.auth_mechanism) == ("relay-user", mechanism)
    assert session.verbs(tls=False) == ["EHLO", "STARTTLS"]
    assert session.verbs(tls=True)[:2] == ["EHLO", "AUTH"]


def test_smarthost_without_starttls_defers_and_sends_nothing(tmp_path, relay, capture, ca) -> None:
    server = capture(auth=AUTH, auth_needs_tls=False)  # would take AUTH in clear
    outgoing = message(tmp_path, SIMPLE, "a@dest.test", "b@dest.test")
    result = relay(smarthost(server, ca), outgoing)
    assert [(r.status, r.permanent) for r in result.results] == [("4.7.4", False)] * 2
    assert "TLS is required, but was not offered" in result.results[0].text
    assert server.sessions[0].verbs() == ["EHLO", "QUIT"]


def test_smarthost_refusing_starttls_defers(tmp_path, relay, capture, ca) -> None:
    server = capture(starttls=True, replies={"STARTTLS": "502 5.5.1 not here"}, auth=AUTH)
    verdict = only(relay(smarthost(server, ca), message(tmp_path, SIMPLE)))
    assert (verdict.status, verdict.permanent) == ("4.7.4", False)  # whatever the reply said
    assert (verdict.text, verdict.in_reply_to) == ("502 5.5.1 not here", "STARTTLS")
    assert server.sessions[0].verbs() == ["EHLO", "STARTTLS", "QUIT"]


@pytest.mark.parametrize(
    ("names", "target_name"),
    [
        (("mx.test",), "mx.test"),  # issued by another CA
        (("other.test",), "mx.test"),  # wrong name
        (("mx.test",), "127.0.0.1"),  # an IP, not among the SANs
    ],
)
def test_smarthost_certificate_that_does_not_verify(
    tmp_path, relay, capture, ca, names, target_name
) -> None:
    issuer = TestCA(tmp_path / "other-ca") if target_name == names[0] else ca
    server = capture(starttls=True, certificate=issuer.issue(*names), auth=AUTH)
    outgoing = message(tmp_path, SIMPLE)
    verdict = only(relay(smarthost(server, ca, name=target_name), outgoing))
    assert (verdict.status, verdict.permanent) == ("4.7.5", False)
    assert "TLS handshake failed" in verdict.text
    assert server.sessions[0].verbs() == ["EHLO", "STARTTLS"]  # and no retry in clear
    assert len(server.sessions) == 1


def test_smarthost_with_an_unreadable_ca_file_defers(tmp_path, relay, capture, ca) -> None:
    server = capture(starttls=True, certificate=ca.issue("mx.test"), auth=AUTH)
    host = smarthost(server, None, ca_file=tmp_path / "missing.pem")
    verdict = only(relay(host, message(tmp_path, SIMPLE)))
    assert (verdict.status, verdict.permanent) == ("4.7.5", False)
    assert "cannot set up TLS" in verdict.text


def test_smarthost_by_ip_address_in_the_certificate(tmp_path, relay, capture, ca) -> None:
    server = capture(starttls=True, certificate=ca.issue("127.0.0.1"), auth=AUTH)
    host = smarthost(server, ca, name="127.0.0.1")
    assert_delivered(relay(host, message(tmp_path, SIMPLE)))
    assert server.sessions[0].authenticated == "relay-user"


def test_smarthost_implicit_tls(tmp_path, relay, capture, ca) -> None:
    server = capture(implicit_tls=True, certificate=ca.issue("mx.test"), auth=AUTH)
    host = smarthost(server, ca, tls="implicit")
    assert_delivered(relay(host, message(tmp_path, SIMPLE)))
    [session] = server.sessions
    assert session.verbs(tls=False) == []
    assert session.verbs() == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]


def test_smarthost_implicit_tls_with_an_untrusted_certificate(
    tmp_path, relay, capture, ca
) -> None:
    server = capture(implicit_tls=True, auth=AUTH)
    host = smarthost(server, ca, tls="implicit")
    verdict = only(relay(host, message(tmp_path, SIMPLE)))
    assert (verdict.status, verdict.permanent) == ("4.7.5", False)
    assert server.sessions[0].commands == []


def test_smarthost_wrong_password_defers(tmp_path, relay, capture, ca) -> None:
    server = capture(starttls=True, certificate=ca.issue("mx.test"), auth=("relay-user", "other"))
    verdict = only(relay(smarthost(server, ca), message(tmp_path, SIMPLE)))
    assert (verdict.code, verdict.status, verdict.in_reply_to) == (454, "4.7.8", "AUTH")
    assert verdict.text == "535 5.7.8 authentication failed"
    assert "MAIL" not in server.sessions[0].verbs()


def test_smarthost_without_a_usable_mechanism_defers(tmp_path, relay, capture, ca) -> None:
    server = capture(
        starttls=True, certificate=ca.issue("mx.test"), auth=AUTH, auth_mechanisms=("CRAM-MD5",)
    )
    verdict = only(relay(smarthost(server, ca), message(tmp_path, SIMPLE)))
    assert (verdict.status, verdict.permanent) == ("4.7.4", False)
    assert "MAIL" not in server.sessions[0].verbs()


def test_smarthost_in_clear_only_when_tls_is_none(tmp_path, relay, capture) -> None:
    server = capture(auth=AUTH, auth_needs_tls=False, auth_mechanisms=("LOGIN",))
    host = smarthost(server, None, tls="none")
    assert_delivered(relay(host, message(tmp_path, SIMPLE)))
    assert server.sessions[0].authenticated == "relay-user"


# -- timeouts and broken connections


@pytest.mark.parametrize(
    ("hang_at", "stage"),
    [
        ("greeting", "receiving the initial server greeting"),
        ("EHLO", "performing the EHLO handshake"),
        ("MAIL", "sending MAIL FROM"),
        ("DOT", "sending end of data -- message may be sent more than once"),
    ],
)
def test_a_silent_server_times_out(tmp_path, relay, capture, hang_at, stage) -> None:
    server = capture(hang_at=hang_at)
    started = time.monotonic()
    result = relay(target(server), message(tmp_path, SIMPLE), TINY)
    verdict = only(result)
    assert (verdict.code, verdict.status, verdict.permanent) == (421, "4.4.2", False)
    assert verdict.text == f"conversation with {result.remote} timed out while {stage}"
    assert time.monotonic() - started < 3


def test_a_stalled_body_times_out(tmp_path, relay, capture) -> None:
    server = capture(hang_at="BODY")
    body = (b"x" * 99 + b"\n") * 120_000  # more than the socket buffers hold
    verdict = only(relay(target(server), message(tmp_path, body), TINY))
    assert verdict.status == "4.4.2"
    assert verdict.text.endswith("timed out while sending message body")


@pytest.mark.parametrize(
    ("early", "status"), [("552 5.3.4 too big for us", "5.3.4"), ("250 2.0.0 thanks", "4.4.2")]
)
def test_a_reply_before_the_final_dot(tmp_path, run, reactor, capture, early, status) -> None:
    """A refusal counts; an acceptance before the end cannot be true."""
    server = capture(drop_in_data=100_000, drop_reply=early)
    body = (b"y" * 99 + b"\n") * 50_000
    session = run(open_session(reactor, target(server), HELO, QUICK))
    verdict = only(run(session.send(message(tmp_path, body))))
    assert verdict.status == status
    assert not session.usable
    run(session.close())


def test_drop_in_data_is_temporary_for_accepted_recipients(tmp_path, relay, capture) -> None:
    server = capture(
        drop_in_data=100_000, rcpt_replies={"gone@dest.test": "550 5.1.1 no such user"}
    )
    body = (b"y" * 99 + b"\n") * 20_000
    outgoing = message(tmp_path, body, "ok@dest.test", "gone@dest.test")
    ok, gone = relay(target(server), outgoing).results
    assert (ok.status, ok.permanent, ok.in_reply_to) == ("4.4.2", False, None)
    assert "lost connection" in ok.text
    assert gone.status == "5.1.1"


@pytest.mark.parametrize("hang_at", ["greeting", "DOT"])
def test_cancelling_drops_the_connection(tmp_path, run, reactor, capture, hang_at) -> None:
    """The scheduler may give up on an attempt (at shutdown, say)."""
    server = capture(hang_at=hang_at)
    attempt = deliver(reactor, target(server), HELO, message(tmp_path, SIMPLE), QUICK)
    waiting_for = [] if hang_at == "greeting" else ["DATA"]
    give_up = time.monotonic() + DEADLINE
    while not server.sessions or server.sessions[0].verbs()[-1:] != waiting_for:
        assert time.monotonic() < give_up
        reactor.iterate(0.01)
    attempt.cancel()
    with pytest.raises(CancelledError):
        run(attempt)
    # The fixture checks that the connection is gone.


# -- sessions


def test_one_connection_carries_several_messages(tmp_path, run, reactor, capture) -> None:
    server = capture()
    session = run(open_session(reactor, target(server), HELO, QUICK))
    first = run(session.send(message(tmp_path, b"first\n", "a@dest.test")))
    second = run(session.send(message(tmp_path, b"second\n", "b@dest.test")))
    assert session.usable
    run(session.close())
    assert not session.usable
    assert_delivered(first)
    assert_delivered(second)
    [recorded] = server.sessions
    assert recorded.verbs() == [
        "EHLO",
        "MAIL",
        "RCPT",
        "DATA",
        "RSET",
        "MAIL",
        "RCPT",
        "DATA",
        "QUIT",
    ]
    assert [t.message for t in recorded.transactions] == [b"first\n", b"second\n"]


def test_a_session_lost_between_messages(tmp_path, run, reactor, capture) -> None:
    server = capture(replies={"RSET": "421 4.4.2 idle too long"})
    session = run(open_session(reactor, target(server), HELO, QUICK))
    assert_delivered(run(session.send(message(tmp_path, SIMPLE))))
    verdict = only(run(session.send(message(tmp_path, SIMPLE))))
    assert (verdict.status, verdict.permanent) == ("4.4.2", False)
    assert not session.usable
    assert only(run(session.send(message(tmp_path, SIMPLE)))).status == "4.4.2"
    run(session.close())


def test_open_session_failure_carries_a_status(run, reactor, capture) -> None:
    server = capture(greeting="554 5.3.2 no")
    with pytest.raises(RelayError) as raised:
        run(open_session(reactor, target(server), HELO, QUICK))
    assert raised.value.permanent and raised.value.status == "5.3.2"
    assert raised.value.remote == f"mx.test[127.0.0.1]:{server.port}"


@pytest.mark.parametrize("eight_bit", [False, True])
def test_missing_queue_file_is_temporary(tmp_path, relay, capture, threads, eight_bit) -> None:
    server = capture(eightbitmime=False)
    path = tmp_path / "gone.msg"
    outgoing = Outgoing("a@origin.test", ("b@dest.test",), path, 10, eight_bit=eight_bit)
    verdict = only(relay(target(server), outgoing))
    assert (verdict.status, verdict.permanent) == ("4.3.0", False)
    assert "MAIL" not in server.sessions[0].verbs()
