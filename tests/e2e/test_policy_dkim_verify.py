"""The dkim plugin verifying arriving mail in the real daemon.

Messages signed here with dkimpy arrive over the ``smtp`` listener from a
loopback address that ``[relay] networks = []`` leaves untrusted; the
public keys are served by a DNS server on loopback (the 2048-bit RSA one
as a record of several strings, and over TCP, as it is too long for
UDP).  No keys folder exists: nothing is signed.
"""

from __future__ import annotations

import email

import dkim
import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import Daemon, fresh_client_address, make_daemon
from tests.helpers.relay_fixtures import DNSServer
from twisted_mta.mail import dkimkeys

MESSAGE = (
    b"From: Bob <bob@signer.example>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: signed\r\n"
    b"Message-ID: <{marker}@signer.example>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"a line\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {kind: dkimkeys.generate(kind) for kind in dkimkeys.KEY_TYPES}


def zones(keys: dict[str, bytes]) -> dict[str, list]:
    return {
        f"{kind}._domainkey.signer.example": [["TXT", *strings(dkimkeys.dns_record(pem))]]
        for kind, pem in keys.items()
    }


def strings(text: str) -> list[str]:
    return [text[i : i + 255] for i in range(0, len(text), 255)]


def signed(pem: bytes, selector: str, marker: str) -> bytes:
    message = MESSAGE.replace(b"{marker}", marker.encode())
    key = dkimkeys.signing_key(pem)
    field = dkim.sign(
        message,
        selector.encode(),
        b"signer.example",
        key.private,
        signature_algorithm=key.algorithm,
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return field + message


def daemon_for(tmp_path, resolver: str) -> Daemon:
    extra = f"""
[relay]
networks = []
resolvers = ["{resolver}"]

[plugins]
enabled = ["dkim"]
"""
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)


def send(daemon: Daemon, client: str, message: bytes) -> None:
    with daemon.smtp("smtp", source_address=(client, 0)) as session:
        session.ehlo("client.signer.example")
        assert session.mail("bob@signer.example")[0] == 250
        assert session.rcpt("alice@example.test")[0] == 250
        assert session.data(message)[0] == 250


def results_by_marker(daemon: Daemon) -> dict[str, str]:
    """Each delivered message's Authentication-Results, unfolded, by the
    marker of its Message-ID."""
    found = {}
    for raw in daemon.messages("example.test", "alice"):
        parsed = email.message_from_bytes(raw)
        marker = parsed["Message-ID"].strip("<>").partition("@")[0]
        found[marker] = " ".join(str(parsed["Authentication-Results"]).split())
    return found


def test_arriving_signatures_are_verified(tmp_path, keys):
    client = fresh_client_address()
    broken = signed(keys["rsa"], "rsa", "broken").replace(b"a line", b"a lie")
    sent = {
        "rsa": signed(keys["rsa"], "rsa", "rsa"),
        "ed25519": signed(keys["ed25519"], "ed25519", "ed25519"),
        "broken": broken,
        "unknown": signed(keys["ed25519"], "unknown", "unknown"),
        "unsigned": MESSAGE.replace(b"{marker}", b"unsigned"),
    }
    with DNSServer(tmp_path / "dns", zones(keys)) as dns:
        daemon = daemon_for(tmp_path, dns.resolver).start()
        try:
            for message in sent.values():
                send(daemon, client, message)
            found = results_by_marker(daemon)
        finally:
            daemon.stop()
    assert found["rsa"].startswith(
        "mx.example.test; dkim=pass header.d=signer.example header.i=@signer.example"
        " header.s=rsa header.a=rsa-sha256 header.b="
    )
    assert found["ed25519"].startswith(
        "mx.example.test; dkim=pass header.d=signer.example header.i=@signer.example"
        " header.s=ed25519 header.a=ed25519-sha256 header.b="
    )
    assert found["broken"].startswith(
        'mx.example.test; dkim=fail reason="body hash did not verify" header.d=signer.example'
    )
    assert found["unknown"].startswith(
        'mx.example.test; dkim=permerror reason="no key for signature"'
        " header.d=signer.example header.i=@signer.example header.s=unknown"
    )
    assert found["unsigned"] == "mx.example.test; dkim=none"
