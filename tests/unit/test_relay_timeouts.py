"""[relay]'s timeouts reach the relay client, which keeps them on the
reactor it is given: here a fake clock, so nothing waits for real."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twisted_mta.config import default_config, load_config
from twisted_mta.relay.outgoing import RelayError, RelayTarget, Timeouts
from twisted_mta.relay.session import open_session
from twisted_mta.service import relay_timeouts


def test_the_defaults_are_the_relay_clients() -> None:
    assert relay_timeouts(default_config()) == Timeouts()


def test_configured_timeouts_reach_the_relay_client(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text(
        '[relay]\nconnect_timeout = "10s"\ncommand_timeout = "2m"\ndata_timeout = "20m"\n'
    )
    timeouts = relay_timeouts(load_config(path, environ={}))
    assert timeouts == Timeouts(connect=10, command=120, data_block=180, data_end=1200)


def test_a_peer_silent_after_the_greeting_is_abandoned_after_command_timeout() -> None:
    clock = MemoryReactorClock()
    timeouts = Timeouts(connect=10, command=120)
    target = RelayTarget("mx.test", ("192.0.2.1",), tls="none")
    opening = open_session(clock, target, "client.test", timeouts)
    outcome: list[object] = []
    opening.addBoth(outcome.append)
    [(host, port, factory, connect_timeout, _)] = clock.tcpClients
    assert (host, port, connect_timeout) == ("192.0.2.1", 25, 10)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(100)  # a slow greeting is still within its time
    protocol.dataReceived(b"220 mx.test ESMTP\r\n")
    assert transport.value() == b"EHLO client.test\r\n"
    clock.advance(119.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionAborted()))
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(RelayError)
    error = failure.value
    assert (error.code, error.status) == (421, "4.4.2")
    assert error.text == (
        "conversation with mx.test[192.0.2.1]:25 timed out while performing the EHLO handshake"
    )
