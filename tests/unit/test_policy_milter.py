"""The milter plugin: the wire codec, and the policy against a fake milter
wired straight to it in memory (replies arrive within the write)."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

import twisted_mta.policies.milter.codec as codec
from twisted_mta.intake.policies import installed
from twisted_mta.interfaces import MessageInfo, PolicyContext, SessionInfo, TransactionInfo, Verdict
from twisted_mta.policies.milter import IDLE, MilterError, MilterPolicy, Settings, make_policy
from twisted_mta.policies.milter.client import ACTIONS, PROTOCOL

LATER = Verdict.tempfail(451, "4.7.1", "Service unavailable - try again later")

# ---------------------------------------------------------------- codec


def test_packets_are_length_command_data():
    assert codec.packet(codec.QUIT) == b"\0\0\0\x01Q"
    assert codec.optneg(0x31, 0x1FF) == b"\0\0\0\x0dO" + struct.pack(">III", 6, 0x31, 0x1FF)
    assert codec.connect(b"[192.0.2.1]", b"4", 25, b"192.0.2.1") == codec.packet(
        b"C", b"[192.0.2.1]\x004\x00\x19192.0.2.1\0"
    )
    assert codec.connect(b"localhost", b"U") == codec.packet(b"C", b"localhost\0U")
    assert codec.helo(b"client.example") == codec.packet(b"H", b"client.example\0")
    assert codec.mail(b"a@example.test", [b"SIZE=10"]) == codec.packet(
        b"M", b"<a@example.test>\0SIZE=10\0"
    )
    assert codec.rcpt(b"") == codec.packet(b"R", b"<>\0")
    assert codec.header(b"Subject", b"hi") == codec.packet(b"L", b"Subject\0hi\0")
    assert codec.macros(b"C", {b"j": b"mx", b"{daemon_name}": b"d"}) == codec.packet(
        b"D", b"Cj\0mx\0{daemon_name}\0d\0"
    )
    assert codec.body(b"x" * 65535)[:5] == b"\0\x01\0\0B"
    with pytest.raises(ValueError):
        codec.body(b"x" * 65536)


def test_the_decoder_waits_for_whole_packets():
    decoder = codec.Decoder()
    stream = codec.packet(b"c") + codec.packet(b"h", b"X-A\0b\0") + codec.packet(b"a")
    seen = []
    for byte in stream[:-1]:
        seen += decoder.feed(bytes([byte]))
    assert seen == [(b"c", b""), (b"h", b"X-A\0b\0")]
    assert decoder.feed(stream[-1:]) == [(b"a", b"")]
    with pytest.raises(codec.ProtocolError):
        codec.Decoder().feed(b"\0\0\0\0c")
    with pytest.raises(codec.ProtocolError):
        codec.Decoder().feed(b"\x7f\0\0\0c")


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"550 5.7.1 Go away\0", codec.ReplyCode(550, "5.7.1", "Go away")),
        (b"451 Later\0", codec.ReplyCode(451, "4.7.1", "Later")),
        (b"554 4.7.1 Odd\0", codec.ReplyCode(554, "5.7.1", "4.7.1 Odd")),
        (b"550-5.7.1 One\r\n550 5.7.1 Two\0", codec.ReplyCode(550, "5.7.1", "One Two")),
    ],
)
def test_reply_codes(data, expected):
    assert codec.decode_replycode(data) == expected


@pytest.mark.parametrize("data", [b"250 OK\0", b"", b"5x0 no\0"])
def test_a_reply_code_must_be_4xx_or_5xx(data):
    with pytest.raises(codec.ProtocolError):
        codec.decode_replycode(data)


def test_header_changes_and_quarantine():
    assert codec.decode_header_change(b"h", b"X-A\0one\r\n\ttwo\0") == codec.HeaderChange(
        b"h", "X-A", "one\n\ttwo"
    )
    inserted = codec.decode_header_change(b"i", struct.pack(">I", 0) + b"X-B\0v\0")
    assert inserted == codec.HeaderChange(b"i", "X-B", "v", 0)
    assert codec.decode_header_change(b"m", struct.pack(">I", 2) + b"X-C\0\0").index == 2
    with pytest.raises(codec.ProtocolError):
        codec.decode_header_change(b"h", b"X-A\0")
    assert codec.decode_quarantine(b"virus found\0") == "virus found"
    assert codec.decode_optneg(struct.pack(">III", 6, 1, 2) + b"\0\0\0\x01j\0") == (
        codec.Negotiated(6, 1, 2)
    )


# ---------------------------------------------------------------- a fake milter

CLOSE = object()
SILENT = b""


class Wire:
    """A transport that hands what is written to the peer at once."""

    def __init__(self, peer, host: IPv4Address, peer_address: IPv4Address) -> None:
        self.peer = peer
        self.other: Wire | None = None
        self.protocol = None
        self.closed = False
        self.host, self.peer_address = host, peer_address

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.peer.dataReceived(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        for side in (self, self.other):
            if not side.closed:
                side.closed = True
                side.protocol.connectionLost(Failure(ConnectionError("closed")))

    abortConnection = loseConnection

    def getPeer(self):
        return self.peer_address

    def getHost(self):
        return self.host


class FakeMilter:
    """Answers CONTINUE to every command, unless ``replies`` says otherwise
    (packets to send, SILENT, or CLOSE), and records what it received."""

    def __init__(self, replies=None, actions: int = ACTIONS, protocol: int = 0) -> None:
        self.replies: dict[bytes, object] = dict(replies or {})
        self.actions, self.protocol = actions, protocol
        self.received: list[tuple[bytes, bytes]] = []
        self.decoder = codec.Decoder()
        self.transport: Wire | None = None
        self.lost = False

    def commands(self) -> bytes:
        return b"".join(code for code, _ in self.received if code != codec.MACRO)

    def payloads(self, code: bytes) -> list[bytes]:
        return [payload for got, payload in self.received if got == code]

    def macros(self) -> dict[bytes, bytes]:
        found = {}
        for payload in self.payloads(codec.MACRO):
            parts = payload[1:].split(b"\0")[:-1]
            found.update(zip(parts[::2], parts[1::2]))
        return found

    def dataReceived(self, data: bytes) -> None:
        for code, payload in self.decoder.feed(data):
            self.received.append((code, payload))
            reply = self._reply(code)
            if reply is CLOSE:
                self.transport.loseConnection()
            elif reply:
                self.transport.write(reply)

    def _reply(self, code: bytes):
        if code == codec.OPTNEG:
            return codec.optneg(self.actions, self.protocol)
        if code in (codec.MACRO, codec.QUIT, codec.ABORT):
            return None
        if code in self.replies:
            return self.replies[code]
        no_reply = {
            codec.CONNECT: codec.NR_CONN, codec.HELO: codec.NR_HELO, codec.MAIL: codec.NR_MAIL,
            codec.RCPT: codec.NR_RCPT, codec.DATA: codec.NR_DATA, codec.HEADER: codec.NR_HDR,
            codec.EOH: codec.NR_EOH, codec.BODY: codec.NR_BODY,
        }
        if self.protocol & no_reply.get(code, 0):
            return None
        return codec.packet(codec.CONTINUE)

    def connectionLost(self, reason) -> None:
        self.lost = True


SESSION = SessionInfo("192.0.2.7", "smtp", helo="client.example.org", user="ann@example.test")
MESSAGE = (
    b"Received: from client.example.org\n\tby mx.example.test; today\n"
    b"From: Ann <ann@example.test>\nSubject: hi\n\nline one\nline two\n"
)


class Harness:
    """The policy on a memory reactor; every connection it opens is wired
    to the next fake milter (made by ``make``)."""

    def __init__(self, make: Callable[[], FakeMilter] = FakeMilter, **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.make = make
        self.milters: list[FakeMilter] = []
        options = {"timeout": 5, **settings}
        self.policy = make_policy(
            {"socket": "inet:8891@127.0.0.1", **options},
            PolicyContext(self.reactor, "mx.example.test", None, None),
        )

    @property
    def milter(self) -> FakeMilter:
        return self.milters[-1]

    def call(self, d: defer.Deferred):
        """Wire the pending connections, then the hook's result."""
        self._wire()
        results: list = []
        d.addBoth(results.append)
        assert results, "the hook has not answered"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def _wire(self) -> None:
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            assert (host, port) == ("127.0.0.1", 8891)
            milter = self.make()
            self.milters.append(milter)
            ours, theirs = IPv4Address("TCP", "127.0.0.1", 40000), IPv4Address("TCP", host, port)
            client = factory.buildProtocol(theirs)
            client_side = Wire(milter, ours, theirs)
            milter_side = Wire(client, theirs, ours)
            client_side.other, milter_side.other = milter_side, client_side
            client_side.protocol, milter_side.protocol = client, milter
            milter.transport = milter_side
            client.makeConnection(client_side)

    def mail(self, sender="ann@example.test", params=None):
        return self.call(self.policy.mail_from(SESSION, sender, params or {}))

    def rcpt(self, recipient, queue_id="Q1", sender="ann@example.test", before=()):
        transaction = TransactionInfo(queue_id, sender, tuple(before))
        return self.call(self.policy.rcpt_to(SESSION, transaction, recipient, {}))

    def message(self, queue_id="Q1", sender="ann@example.test", recipients=("bob@example.test",),
                text=MESSAGE):
        transaction = TransactionInfo(queue_id, sender, tuple(recipients))
        info = MessageInfo(None, len(text), lambda: io.BytesIO(text))
        return self.call(self.policy.message(SESSION, transaction, info))

    def transaction(self):
        assert self.mail(params={"SIZE": "120", "BODY": "8BITMIME"}) is None
        assert self.rcpt("bob@example.test") is None
        return self.message()


def replying(**replies) -> Callable[[], FakeMilter]:
    return lambda: FakeMilter({codec_name(k): v for k, v in replies.items()})


def codec_name(name: str) -> bytes:
    return getattr(codec, name.upper())


def header(kind: bytes, name: bytes, value: bytes, index: int | None = None) -> bytes:
    prefix = b"" if index is None else struct.pack(">I", index)
    return codec.packet(kind, prefix + name + b"\0" + value + b"\0")


# ---------------------------------------------------------------- sessions


def test_one_transaction_over_one_connection_from_mail_to_quit():
    harness = Harness()
    assert harness.transaction() is None
    [milter] = harness.milters
    assert milter.commands() == b"OCHMRTLLLNBEQ"
    version, actions, protocol = struct.unpack(">III", milter.payloads(b"O")[0])
    assert (version, actions, protocol) == (6, ACTIONS, PROTOCOL)
    assert actions & (codec.CHGBODY | codec.ADDRCPT_FLAG | codec.DELRCPT_FLAG) == 0
    assert actions & codec.CHGFROM_FLAG == 0
    assert milter.payloads(b"C") == [b"[192.0.2.7]\x004\0\x00192.0.2.7\0"]
    assert milter.payloads(b"H") == [b"client.example.org\0"]
    assert milter.payloads(b"M") == [b"<ann@example.test>\0SIZE=120\0BODY=8BITMIME\0"]
    assert milter.payloads(b"R") == [b"<bob@example.test>\0"]
    assert milter.payloads(b"L") == [
        b"Received\0from client.example.org\n\tby mx.example.test; today\0",
        b"From\0Ann <ann@example.test>\0",
        b"Subject\0hi\0",
    ]
    assert milter.payloads(b"B") == [b"line one\r\nline two\r\n"]
    macros = milter.macros()
    assert macros[b"{client_addr}"] == b"192.0.2.7"
    assert macros[b"{auth_authen}"] == b"ann@example.test"
    assert macros[b"j"] == b"mx.example.test"
    assert macros[b"i"] == b"Q1"
    assert milter.lost and harness.policy.held() == 0


def test_a_large_body_goes_in_packets_of_at_most_65535_bytes():
    harness = Harness()
    body = b"".join(b"line %05d\n" % n for n in range(20000))
    harness.mail()
    assert harness.message(text=b"Subject: big\n\n" + body) is None
    chunks = harness.milter.payloads(b"B")
    assert len(chunks) > 1 and all(len(chunk) <= 65535 for chunk in chunks)
    assert b"".join(chunks) == body.replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    "stage, reply, expected",
    [
        ("mail", codec.packet(b"r"), Verdict.reject(550, "5.7.1", "Command rejected")),
        ("connect", codec.packet(b"t"), LATER),
        ("helo", codec.packet(b"y", b"554 5.7.1 Away\0"), Verdict.reject(554, "5.7.1", "Away")),
        ("mail", codec.packet(b"y", b"421 4.3.2 Busy\0"), Verdict.tempfail(421, "4.3.2", "Busy")),
        ("mail", codec.packet(b"d"), Verdict.reject(550, "5.7.1", "Message discarded")),
    ],
)
def test_a_refusal_up_to_mail_refuses_the_sender_and_quits(stage, reply, expected):
    harness = Harness(replying(**{stage: reply}))
    assert harness.mail() == expected
    assert harness.milter.commands().endswith(b"Q") and harness.milter.lost
    assert harness.policy.held() == 0


def test_a_refused_recipient_is_only_that_one():
    refusing = codec.packet(b"y", b"550 5.1.1 No such user\0")
    harness = Harness(lambda: FakeMilter())
    harness.mail()
    harness.milter.replies[codec.RCPT] = refusing
    assert harness.rcpt("nobody@example.test") == Verdict.reject(550, "5.1.1", "No such user")
    harness.milter.replies[codec.RCPT] = codec.packet(b"t")
    assert harness.rcpt("later@example.test").kind == "tempfail"
    del harness.milter.replies[codec.RCPT]
    assert harness.rcpt("bob@example.test") is None
    assert harness.message() is None
    assert len(harness.milters) == 1
    assert harness.milter.commands().count(b"R") == 3


@pytest.mark.parametrize(
    "reply, expected",
    [
        (codec.packet(b"r"), Verdict.reject(550, "5.7.1", "Message content rejected")),
        (codec.packet(b"t"), LATER),
        (codec.packet(b"y", b"554 5.7.1 Spam\0"), Verdict.reject(554, "5.7.1", "Spam")),
        (codec.packet(b"a"), Verdict.accept()),
        (codec.packet(b"d"), Verdict.reject(550, "5.7.1", "Message discarded")),
    ],
)
def test_end_of_message_replies(reply, expected):
    harness = Harness(replying(bodyeob=reply))
    assert harness.transaction() == expected
    assert harness.policy.held() == 0 and harness.milter.lost


def test_added_and_inserted_headers_and_quarantine_are_prepended():
    eom = (
        header(b"h", b"X-Spam-Score", b"1.5")
        + header(b"i", b"DKIM-Signature", b"v=1; a=rsa-sha256;\r\n\tb=abc", 0)
        + header(b"m", b"Subject", b"changed", 1)
        + codec.packet(b"q", b"looks like a virus\0")
        + header(b"i", b"Authentication-Results", b"mx; none", 0)
        + codec.packet(b"c")
    )
    harness = Harness(replying(bodyeob=eom))
    assert harness.transaction() == Verdict.proceed(
        [
            ("Authentication-Results", "mx; none"),
            ("DKIM-Signature", "v=1; a=rsa-sha256;\n\tb=abc"),
            ("X-Spam-Score", "1.5"),
            ("X-Quarantine", "looks like a virus"),
        ]
    )


def test_headers_are_dropped_when_the_message_is_refused():
    eom = header(b"h", b"X-Spam", b"yes") + codec.packet(b"r")
    assert Harness(replying(bodyeob=eom)).transaction().kind == "reject"


def test_accept_at_mail_answers_the_rest_of_the_transaction_without_the_milter():
    harness = Harness(replying(mail=codec.packet(b"a")))
    assert harness.mail() == Verdict.accept()
    assert harness.milter.lost
    assert harness.rcpt("bob@example.test") == Verdict.accept()
    assert harness.message() == Verdict.accept()
    assert len(harness.milters) == 1 and harness.policy.held() == 0


def test_steps_the_milter_leaves_out_or_unanswered():
    protocol = codec.NOHELO | codec.NR_RCPT | codec.NR_CONN | codec.NOBODY | codec.NODATA
    harness = Harness(lambda: FakeMilter(protocol=protocol))
    assert harness.transaction() is None
    assert harness.milter.commands() == b"OCMRLLLNEQ"


def test_skip_ends_the_body():
    harness = Harness(replying(body=codec.packet(b"s")))
    harness.mail()
    body = b"x\n" * 40000
    assert harness.message(text=b"Subject: big\n\n" + body) is None
    assert harness.milter.commands().count(b"B") == 1
    assert harness.milter.commands().endswith(b"BEQ")


def test_a_milter_that_wants_more_than_offered_is_an_error():
    harness = Harness(lambda: FakeMilter(actions=ACTIONS | codec.CHGBODY))
    with pytest.raises(MilterError, match="more than offered"):
        harness.mail()
    assert harness.milter.lost


def test_a_milter_that_closes_the_connection_is_an_error():
    harness = Harness(replying(rcpt=CLOSE))
    harness.mail()
    with pytest.raises(MilterError, match="connection closed by the milter"):
        harness.rcpt("bob@example.test")
    assert harness.policy.held() == 0


def test_a_milter_that_does_not_answer_is_an_error_after_the_timeout():
    harness = Harness(replying(mail=SILENT))
    d = harness.policy.mail_from(SESSION, "ann@example.test", {})
    harness._wire()
    assert not d.called
    harness.reactor.advance(4.9)
    assert not d.called
    harness.reactor.advance(0.2)
    with pytest.raises(MilterError, match="no reply within 5s"):
        harness.call(d)
    assert harness.milter.lost


def test_progress_resets_the_timeout():
    harness = Harness(replying(bodyeob=SILENT))
    harness.mail()
    transaction = TransactionInfo("Q1", "ann@example.test", ("bob@example.test",))
    info = MessageInfo(None, len(MESSAGE), lambda: io.BytesIO(MESSAGE))
    d = harness.policy.message(SESSION, transaction, info)
    for _ in range(3):
        harness.reactor.advance(4)
        harness.milter.transport.write(codec.packet(b"p"))
    assert not d.called
    harness.milter.transport.write(codec.packet(b"c"))
    assert harness.call(d) is None


def test_a_hook_given_up_on_closes_its_connection():
    harness = Harness(replying(mail=SILENT))
    d = harness.policy.mail_from(SESSION, "ann@example.test", {})
    harness._wire()
    d.cancel()
    assert harness.milter.lost and harness.policy.held() == 0
    assert not harness.reactor.getDelayedCalls()


def test_a_milter_that_cannot_be_reached_is_an_error():
    harness = Harness()
    d = harness.policy.mail_from(SESSION, "ann@example.test", {})
    _, _, factory, _, _ = harness.reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    with pytest.raises(MilterError, match="cannot connect"):
        harness.call(d)


def test_default_action_accept_passes_a_failing_milter_over():
    harness = Harness(replying(rcpt=CLOSE), default_action="accept")
    harness.mail()
    assert harness.rcpt("bob@example.test") is None


def test_an_idle_conversation_is_closed_and_a_later_hook_replays_it():
    harness = Harness()
    harness.mail()
    first = harness.milter
    harness.reactor.advance(IDLE)
    assert first.lost and first.commands() == b"OCHMQ"
    assert harness.policy.held() == 0
    assert harness.message(recipients=("bob@example.test", "carol@example.test")) is None
    assert len(harness.milters) == 2
    assert harness.milter.commands() == b"OCHMRRTLLLNBEQ"
    assert harness.milter.payloads(b"M") == [b"<ann@example.test>\0"]


def test_a_milter_gone_between_hooks_is_asked_again_over_a_new_connection():
    harness = Harness()
    harness.mail()
    harness.milter.transport.loseConnection()
    assert harness.rcpt("bob@example.test") is None
    assert len(harness.milters) == 2 and harness.milter.commands() == b"OCHMR"


def test_transactions_of_one_session_are_told_apart_by_queue_id():
    harness = Harness()
    harness.mail()
    harness.rcpt("bob@example.test", queue_id="Q1")
    harness.mail()
    harness.rcpt("carol@example.test", queue_id="Q2")
    assert harness.policy.held() == 2
    assert harness.message(queue_id="Q2", recipients=("carol@example.test",)) is None
    assert harness.message(queue_id="Q1") is None
    assert [m.payloads(b"R") for m in harness.milters] == [
        [b"<bob@example.test>\0"], [b"<carol@example.test>\0"]
    ]
    assert harness.policy.held() == 0
    assert not harness.reactor.getDelayedCalls()


def test_a_session_without_an_ip_address_connects_as_unknown():
    harness = Harness()
    session = SessionInfo("local", "local", user="ann")
    harness.call(harness.policy.mail_from(session, "ann@example.test", {}))
    assert harness.milter.payloads(b"C") == [b"localhost\0U"]
    assert b"H" not in harness.milter.commands()
    assert b"{auth_authen}" not in harness.milter.macros()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "socket, endpoint",
    [
        ("inet:8891@127.0.0.1", "tcp:host=127.0.0.1:port=8891:timeout=30"),
        ("inet:11332@[::1]", "tcp:host=\\:\\:1:port=11332:timeout=30"),
        ("tcp:milter.example:8891", "tcp:host=milter.example:port=8891:timeout=30"),
        ("unix:/run/opendkim/opendkim.sock", "unix:path=/run/opendkim/opendkim.sock:timeout=30"),
    ],
)
def test_sockets_as_postfix_writes_them(socket, endpoint):
    policy = make_policy({"socket": socket}, PolicyContext(None, "mx", None, None))
    assert isinstance(policy, MilterPolicy)
    assert policy.settings == Settings(endpoint, 30.0, "tempfail", {})


@pytest.mark.parametrize(
    "options, problem",
    [
        ({}, "socket: required"),
        ({"socket": "inet:nope@host"}, "socket: 'inet:nope@host' is not"),
        ({"socket": "smtp:x"}, "is not inet:PORT@HOST"),
        ({"socket": "unix:/s", "timeout": "soon"}, "timeout: expected seconds"),
        ({"socket": "unix:/s", "timeout": 0}, "timeout: must be more than zero"),
        ({"socket": "unix:/s", "default_action": "reject"}, "default_action: must be one of"),
        ({"socket": "unix:/s", "macros": {"j": 1}}, "macros: expected a table"),
        ({"socket": "unix:/s", "sockett": "x"}, "unknown option 'sockett'"),
    ],
)
def test_bad_options_are_named(options, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        make_policy(options, PolicyContext(None, "mx", None, None))


def test_durations_and_macros():
    policy = make_policy(
        {"socket": "unix:/s", "timeout": "500ms", "macros": {"{daemon_name}": "mx-in"}},
        PolicyContext(None, "mx", None, None),
    )
    assert policy.settings.timeout == 0.5
    assert policy.settings.macros == {"{daemon_name}": "mx-in"}
    assert make_policy({"socket": "unix:/s", "timeout": "2m"},
                       PolicyContext(None, "mx", None, None)).settings.timeout == 120


def test_the_plugin_is_installed_as_milter():
    factory = installed()["milter"]
    assert factory.description.startswith("Ask a Sendmail milter")
