"""DataDecoder fed every way a TCP stream can be cut.

Each tricky input is checked against a reference computed on the whole
stream at once, then fed in two pieces at every split point, in three
pieces at every pair of split points (short inputs) and byte by byte.
The decoder must give the same body, fault and leftover every time.
"""

from __future__ import annotations

import itertools
import tracemalloc
from dataclasses import dataclass

import pytest

from twisted_mta.smtp.data import (
    BARE_LINE_ENDING,
    LINE_TOO_LONG,
    MAX_LINE,
    TOO_BIG,
    DataDecoder,
)

BIG = 1 << 20
SMUGGLED = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n"
SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
]


@dataclass(frozen=True)
class Outcome:
    body: bytes | None  # None when the message failed: its body is not used
    fault: str | None
    rest: bytes


@dataclass(frozen=True)
class Expected:
    """A reference outcome; a stream with both a bare line ending and an
    over-long line may be refused for either, whichever the decoder saw
    first in the pieces it was given."""

    body: bytes | None
    faults: frozenset[str | None]
    rest: bytes

    def matches(self, outcome: Outcome) -> bool:
        return (outcome.body, outcome.rest) == (self.body, self.rest) and (
            outcome.fault in self.faults
        )


def reference(stream: bytes, max_size: int = BIG) -> Expected:
    """What decoding the whole ``stream`` must give, computed naively."""
    if stream.startswith(b".\r\n"):
        raw, rest = b"", stream[3:]
    else:
        end = stream.index(b"\r\n.\r\n")
        raw, rest = stream[: end + 2], stream[end + 5 :]
    lines = raw.split(b"\r\n")[:-1]
    faults = set()
    if any(b"\r" in line or b"\n" in line for line in lines):
        faults.add(BARE_LINE_ENDING)
    if any(len(line) > MAX_LINE for line in lines):
        faults.add(LINE_TOO_LONG)
    body = b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)
    if not faults and len(body) > max_size:
        faults.add(TOO_BIG)
    if faults:
        return Expected(None, frozenset(faults), rest)
    return Expected(body, frozenset({None}), rest)


def decode(chunks, max_size: int = BIG) -> Outcome:
    """Feed ``chunks`` until the decoder sees the end; the rest follows it."""
    written: list[bytes] = []
    decoder = DataDecoder(written.append, max_size)
    chunks = list(chunks)
    for index, chunk in enumerate(chunks):
        rest = decoder.feed(chunk)
        if rest is not None:
            rest += b"".join(chunks[index + 1 :])
            body = b"".join(written) if decoder.fault is None else None
            return Outcome(body, decoder.fault, rest)
    raise AssertionError("the decoder did not see the end of DATA")


def splits(stream: bytes, pieces: int):
    """Every way to cut ``stream`` into ``pieces`` non-empty chunks."""
    for cuts in itertools.combinations(range(1, len(stream)), pieces - 1):
        bounds = (0, *cuts, len(stream))
        yield [stream[a:b] for a, b in zip(bounds, bounds[1:])]


SHORT = {
    "empty message": b".\r\nQUIT\r\n",
    "one empty line": b"\r\n.\r\n",
    "dot-stuffed lines": b".first\r\n..\r\n...\r\nx.y\r\n.\r\nNOOP\r\n",
    "only a stuffed dot": b"..\r\n.\r\n",
    "8-bit": b"caf\xc3\xa9 \xff\x00\x80\r\n.\r\n",
    "end then a second message": b"a\r\n.\r\nb\r\n.\r\n",
    "CRLF dot not at line start": b"a\r\nb.\r\n\r\n.\r\n",
    **{f"smuggling {seq!r}": b"x" + seq + b"MAIL\r\n.\r\nRSET\r\n" for seq in SMUGGLING},
    "bare CR at the very end": b"abc\r\r\n.\r\n",
    "bare LF first": b"\nabc\r\n.\r\n",
    "lone CR line": b"\r\r\n.\r\n",
}

LONG = {
    "998 octets": b"a" * MAX_LINE + b"\r\n.\r\n",
    "999 octets": b"a" * (MAX_LINE + 1) + b"\r\n.\r\n",
    "998 stuffed": b"." + b"b" * MAX_LINE + b"\r\n" + b"." * 7 + b"\r\n.\r\n",
    "long line then commands": b"c" * 2500 + b"\r\nQUIT\r\nMAIL FROM:<x@y>\r\n.\r\nNOOP\r\n",
    "long line ending in CR": b"d" * 1200 + b"\r\r\n.\r\n",
    "long line with smuggling": b"e" * 1100 + b"\n.\r\n" + SMUGGLED + b".\r\nQUIT\r\n",
    **{
        f"smuggling {seq!r}": b"Subject: x\r\n\r\nhello" + seq + SMUGGLED + b".\r\nRSET\r\n"
        for seq in SMUGGLING
    },
}


@pytest.mark.parametrize("stream", SHORT.values(), ids=SHORT.keys())
def test_short_inputs_cut_into_three_pieces_everywhere(stream):
    expected = reference(stream)
    assert expected.matches(decode([stream]))
    for chunks in itertools.chain(splits(stream, 2), splits(stream, 3)):
        assert expected.matches(decode(chunks)), chunks


@pytest.mark.parametrize("stream", [*SHORT.values(), *LONG.values()], ids=[*SHORT, *LONG])
def test_cut_in_two_everywhere_and_byte_by_byte(stream):
    expected = reference(stream)
    for chunks in splits(stream, 2):
        assert expected.matches(decode(chunks)), chunks
    assert expected.matches(decode(stream[i : i + 1] for i in range(len(stream))))


def test_every_short_mix_of_cr_lf_and_text_decodes_as_the_reference():
    """Every line made of ``a``, CR and LF up to six octets: a bare CR or LF
    anywhere is refused, and CRLF alone becomes LF."""
    for length in range(7):
        for octets in itertools.product(b"a\r\n", repeat=length):
            stream = bytes(octets) + b"\r\nz\r\n.\r\n"
            assert reference(stream).matches(decode([stream])), stream


def test_reference_agrees_with_rfc_examples():
    """The reference itself, on cases whose answer is known by heart."""
    assert reference(b".\r\n").matches(Outcome(b"", None, b""))
    assert reference(b"..\r\n.\r\nNOOP\r\n").matches(Outcome(b".\n", None, b"NOOP\r\n"))
    assert reference(b"a" * 998 + b"\r\n.\r\n").faults == {None}
    assert reference(b"a" * 999 + b"\r\n.\r\n").faults == {LINE_TOO_LONG}
    for seq in SMUGGLING:
        assert reference(b"x" + seq + b"\r\n.\r\n").faults == {BARE_LINE_ENDING}


@pytest.mark.parametrize("seq", SMUGGLING)
def test_smuggling_sequences_never_end_data(seq):
    stream = b"Subject: x\r\n\r\nhi" + seq + SMUGGLED + b".\r\nQUIT\r\n"
    outcome = decode([stream])
    assert outcome.fault == BARE_LINE_ENDING
    assert outcome.rest == b"QUIT\r\n"


def test_size_limit_counts_the_stored_body():
    body = b"x" * 98 + b"\r\n"  # 99 octets once stored with LF
    assert decode([body + b".\r\n"], max_size=99) == Outcome(b"x" * 98 + b"\n", None, b"")
    assert decode([body + b".\r\n"], max_size=98).fault == TOO_BIG


def test_nothing_reaches_the_sink_after_a_fault():
    written: list[bytes] = []
    decoder = DataDecoder(written.append, BIG)
    assert decoder.feed(b"good\r\nbad\n") is None
    assert decoder.feed(b"more\r\nlines\r\n") is None
    assert decoder.feed(b".\r\nNOOP\r\n") == b"NOOP\r\n"
    assert decoder.fault == BARE_LINE_ENDING
    assert b"more" not in b"".join(written)


def test_a_ten_mebibyte_line_is_not_kept():
    """Discarding an endless line costs no memory, whatever arrives."""
    decoder = DataDecoder(lambda data: None, BIG)
    chunk = b"A" * 65536
    tracemalloc.start()
    try:
        for _ in range(160):
            assert decoder.feed(chunk) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(chunk)
    assert decoder.fault == LINE_TOO_LONG
    assert decoder.feed(b"\r\n.\r\nNOOP\r\n") == b"NOOP\r\n"
