"""Mail loops: too many Received headers are refused with 554 5.4.6."""

import pytest

from twisted_mta.smtp.data import TOO_MANY_HOPS, DataDecoder


def received(n):
    return b"".join(b"Received: from hop%d by x; Sat, 28 Nov 2026 10:00:00 +0000\r\n" % i for i in range(n))


def decode(raw, max_hops):
    chunks = []
    decoder = DataDecoder(chunks.append, 10**9, max_hops)
    for offset in range(0, len(raw), 7):
        decoder.feed(raw[offset:offset + 7])
    return decoder


def test_hops_counted_in_the_header_only_across_chunks():
    raw = received(3) + b"Subject: x\r\nX-Received: not counted\r\n\r\nReceived: in the body\r\n.\r\n"
    decoder = decode(raw, 0)
    assert decoder.hops == 3 and decoder.fault is None


def test_over_the_limit_is_a_fault():
    assert decode(received(5) + b"\r\nbody\r\n.\r\n", 4).fault == TOO_MANY_HOPS
    assert decode(received(4) + b"\r\nbody\r\n.\r\n", 4).fault is None


@pytest.mark.parametrize("hops,code", [(50, 250), (51, 554)])
def test_e2e_hop_limit(mta, hops, code):
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        client.rcpt("postmaster@example.test")
        reply = client.data(received(hops) + b"Subject: loop\r\n\r\nbody\r\n")
    assert reply[0] == code
    if code == 554:
        assert reply[1].startswith(b"5.4.6")
