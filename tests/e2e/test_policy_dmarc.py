"""SPF, DKIM and DMARC together in the real daemon, asking a DNS server on
loopback: what each message's one ``Authentication-Results`` header says,
and, with ``[plugins.dmarc] enforce``, the reply it gets.

The clients connect from their own loopback addresses (127.0.x.y) and
``[relay] networks`` is empty, so that none of them is trusted; the
domains are under ``.test``, the zone the loopback server answers for.
Signed messages are signed here with dkimpy, by a key whose public half
the server publishes.
"""

from __future__ import annotations

import email

import dkim
import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import (
    Daemon,
    failed_start,
    fresh_client_address,
    installed_plugins,
    make_daemon,
)
from tests.helpers.relay_fixtures import DNSServer
from twisted_mta.mail import dkimkeys

SPF_RESULTS = {
    "pass": "pass",
    "fail": "fail",
    "soft": "softfail",
    "neutral": "neutral",
    "none": "none",
    "temp": "temperror",
    "perm": "permerror",
}


@pytest.fixture(scope="module")
def key() -> bytes:
    return dkimkeys.generate("rsa")


def zones(client: str, key: bytes) -> dict[str, list]:
    record = dkimkeys.dns_record(key)
    return {
        "pass.test": [["TXT", f"v=spf1 ip4:{client} -all"]],
        "fail.test": [["TXT", "v=spf1 -all"]],
        "soft.test": [["TXT", "v=spf1 ~all"]],
        "neutral.test": [["TXT", "v=spf1 ?all"]],
        "none.test": [["A", "127.0.0.9"]],
        "temp.test": [["SERVFAIL"]],
        "perm.test": [["TXT", "v=spf1 ip4:300.1.1.1 -all"]],
        "mta._domainkey.signer.test": [["TXT", record[:200], record[200:]]],
        "_dmarc.pass.test": [["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.signer.test": [["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.watch.test": [["TXT", "v=DMARC1; p=none"]],
        "_dmarc.quarantine.test": [["TXT", "v=DMARC1; p=quarantine"]],
        "_dmarc.reject.test": [["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.flaky.test": [["SERVFAIL"]],
    }


def config(resolver: str, enforce: bool, enabled: str = '"spf", "dkim", "dmarc"') -> str:
    return f"""
[relay]
networks = []
resolvers = ["{resolver}"]

[plugins]
enabled = [{enabled}]
[plugins.dmarc]
enforce = {str(enforce).lower()}
"""


def message(author: str, subject: str, key: bytes | None = None, tamper: bool = False) -> bytes:
    text = (
        f"From: {author}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
        f"Authentication-Results: mx.example.test; dmarc=pass header.from={author}\r\n"
        "\r\nhello\r\n"
    ).encode()
    if key is not None:
        signing = dkimkeys.signing_key(key)
        text = (
            dkim.sign(text, b"mta", b"signer.test", signing.private, include_headers=[b"from"])
            + text
        )
    return text.replace(b"hello", b"jello") if tamper else text


class Sender:
    """Sends to alice from one untrusted client address; reads what she got."""

    def __init__(self, daemon: Daemon, client: str) -> None:
        self.daemon, self.client = daemon, client

    def send(self, mail_from: str, data: bytes) -> tuple[int, bytes]:
        with self.daemon.smtp("smtp", source_address=(self.client, 0)) as session:
            session.ehlo("client.example.org")
            assert session.mail(mail_from)[0] == 250
            assert session.rcpt("alice@example.test")[0] == 250
            return session.data(data)

    def delivered(self) -> dict[str, email.message.Message]:
        parsed = map(email.message_from_bytes, self.daemon.messages("example.test", "alice"))
        return {message["Subject"]: message for message in parsed}


@pytest.fixture
def world(tmp_path, key):
    """A DNS server for a fresh client address, and a way to start daemons."""
    client = fresh_client_address()
    with DNSServer(tmp_path / "dns", zones(client, key)) as dns:
        started: list[Daemon] = []

        def start(enforce: bool) -> Sender:
            root = tmp_path / f"mta-{len(started)}"
            extra = config(dns.resolver, enforce)
            daemon = make_daemon(root, users=USERS, aliases=ALIASES, extra=extra).start()
            started.append(daemon)
            return Sender(daemon, client)

        yield start
        for daemon in started:
            daemon.stop()


def results(message: email.message.Message) -> str:
    """Its one Authentication-Results: ours (the forged one sent along is gone)."""
    [value] = message.get_all("Authentication-Results")
    return " ".join(value.split())


def test_every_spf_result_is_in_the_one_authentication_results(world):
    sender = world(enforce=False)
    for name in SPF_RESULTS:
        assert sender.send(f"someone@{name}.test", message("a@watch.test", name))[0] == 250
    delivered = sender.delivered()
    for name, result in SPF_RESULTS.items():
        assert results(delivered[name]).startswith(
            f"mx.example.test; spf={result} smtp.mailfrom={name}.test; dkim=none;"
        )


def test_dmarc_passes_by_spf_or_by_dkim_alignment_alone(world, key):
    sender = world(enforce=True)
    assert sender.send("someone@pass.test", message("a@pass.test", "by spf"))[0] == 250
    by_dkim = message("a@signer.test", "by dkim", key)
    assert sender.send("someone@fail.test", by_dkim)[0] == 250
    delivered = sender.delivered()
    assert results(delivered["by spf"]) == (
        "mx.example.test; spf=pass smtp.mailfrom=pass.test; dkim=none;"
        " dmarc=pass (p=reject dis=none) header.from=pass.test"
    )
    by_dkim_results = results(delivered["by dkim"])
    assert by_dkim_results.startswith(
        "mx.example.test; spf=fail smtp.mailfrom=fail.test;"
        " dkim=pass header.d=signer.test header.i=@signer.test header.s=mta"
        " header.a=rsa-sha256 header.b="
    )
    assert by_dkim_results.endswith("; dmarc=pass (p=reject dis=none) header.from=signer.test")


def test_failing_messages_are_labelled_when_enforcement_is_off(world, key):
    sender = world(enforce=False)
    for policy in ("watch", "quarantine", "reject"):
        assert sender.send("someone@pass.test", message(f"a@{policy}.test", policy))[0] == 250
    broken = message("a@signer.test", "broken", key, tamper=True)
    assert sender.send("someone@pass.test", broken)[0] == 250
    delivered = sender.delivered()
    for policy, p in [("watch", "none"), ("quarantine", "quarantine"), ("reject", "reject")]:
        assert results(delivered[policy]).endswith(
            f"dmarc=fail (p={p} dis=none) header.from={policy}.test"
        )
        assert "X-Quarantine" not in delivered[policy]
    assert 'dkim=fail reason="body hash did not verify" header.d=signer.test' in results(
        delivered["broken"]
    )
    assert results(delivered["broken"]).endswith(
        "dmarc=fail (p=reject dis=none) header.from=signer.test"
    )


def test_enforcement_refuses_reject_marks_quarantine_and_defers_on_dns_failure(world, key):
    sender = world(enforce=True)
    refused = (550, b"5.7.1 Email rejected per DMARC policy for reject.test")
    assert sender.send("someone@pass.test", message("boss@reject.test", "forged")) == refused
    broken = message("a@signer.test", "broken", key, tamper=True)
    assert sender.send("someone@pass.test", broken) == (
        550,
        b"5.7.1 Email rejected per DMARC policy for signer.test",
    )
    code, text = sender.send("someone@pass.test", message("a@flaky.test", "flaky"))
    assert (code, text[:6]) == (451, b"4.7.1 ")
    assert sender.send("someone@pass.test", message("a@quarantine.test", "marked"))[0] == 250
    assert sender.send("someone@pass.test", message("a@watch.test", "watched"))[0] == 250
    delivered = sender.delivered()
    assert sorted(delivered) == ["marked", "watched"]
    assert delivered["marked"]["X-Quarantine"] == "DMARC policy of quarantine.test: quarantine"
    assert results(delivered["marked"]).endswith(
        "dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test"
    )
    assert "X-Quarantine" not in delivered["watched"]


def test_dmarc_without_spf_and_dkim_before_it_stops_the_start(tmp_path):
    extra = config("127.0.0.1:53", True, enabled='"spf", "dmarc"')
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)
    code, problems = failed_start(daemon)
    assert code != 0
    assert problems == ["twistd mta: plugins.enabled: dmarc needs dkim enabled before it"]


def test_help_plugins_lists_dmarc():
    assert "dmarc" in installed_plugins()
