"""Attacks on the real daemon that must not desynchronise or exhaust it."""

from __future__ import annotations

from silent_client import SilentTLSClient
from twisted_mta.smtp.server import MAX_AUTH_LINE


def test_an_over_long_auth_line_ends_the_exchange_and_quit_is_a_command(mta):
    with SilentTLSClient(mta.ports["submissions"]) as client:
        assert client.banner.startswith(b"220 ")
        assert client.command(b"EHLO client.example.org").startswith(b"250")
        assert client.command(b"AUTH LOGIN").startswith(b"334 ")
        client.send(b"A" * (MAX_AUTH_LINE + 100) + b"\r\n")
        refusal = client.read_reply()
        assert refusal.startswith(b"501 5.5.2 Error: line too long"), refusal
        assert client.command(b"QUIT").startswith(b"221 ")
        assert client.wait_for_close() < 5
