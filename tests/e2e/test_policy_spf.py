"""The spf plugin in the real daemon, asking a DNS server on loopback.

The clients connect from their own loopback addresses (127.0.x.y) and
``[relay] networks`` is empty, so that none of them is trusted; the
senders' domains publish their SPF records on the loopback server.
"""

from __future__ import annotations

import email

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import (
    Daemon,
    fresh_client_address,
    insecure_context,
    make_daemon,
)
from tests.helpers.relay_fixtures import DNSServer


def config(resolver: str, reject_fail: bool = False) -> str:
    return f"""
[relay]
networks = []
resolvers = ["{resolver}"]

[plugins]
enabled = ["spf"]
[plugins.spf]
reject_fail = {str(reject_fail).lower()}
"""


def zones(client: str) -> dict[str, list]:
    return {
        "pass.example": [["TXT", f"v=spf1 ip4:{client} -all"]],
        "fail.example": [["TXT", "v=spf1 -all exp=why.%{d}"]],
        "why.fail.example": [["TXT", "%{i} is not a sender of %{d}"]],
        "soft.example": [["TXT", "v=spf1 ~all"]],
    }


def daemon_with(tmp_path, extra: str) -> Daemon:
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)


def send(daemon: Daemon, client: str, sender: str) -> tuple[int, bytes]:
    """One message to alice from ``sender``: MAIL's reply."""
    with daemon.smtp("smtp", source_address=(client, 0)) as session:
        session.ehlo("client.example.org")
        reply = session.mail(sender)
        if reply[0] == 250:
            assert session.rcpt("alice@example.test")[0] == 250
            assert session.data(b"Subject: hello\r\n\r\nhello\r\n")[0] == 250
    return reply


def received_spf(daemon: Daemon) -> list[str]:
    return [
        " ".join(email.message_from_bytes(raw).get("Received-SPF", "").split())
        for raw in daemon.messages("example.test", "alice")
    ]


def authentication_results(daemon: Daemon) -> list[str]:
    return [
        " ".join(email.message_from_bytes(raw).get("Authentication-Results", "").split())
        for raw in daemon.messages("example.test", "alice")
    ]


def test_pass_and_softfail_are_delivered_with_received_spf(tmp_path):
    client = fresh_client_address()
    with DNSServer(tmp_path / "dns", zones(client)) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver)).start()
        try:
            for domain in ("pass", "soft", "fail"):
                assert send(daemon, client, f"someone@{domain}.example")[0] == 250
            headers = received_spf(daemon)
            results = authentication_results(daemon)
        finally:
            daemon.stop()
    assert sorted(results) == [
        f"mx.example.test; spf={result} smtp.mailfrom={domain}.example"
        for result, domain in [("fail", "fail"), ("pass", "pass"), ("softfail", "soft")]
    ]
    by_domain = {h.split('envelope-from="someone@')[1].split(".")[0]: h for h in headers}
    assert by_domain["pass"] == (
        "pass (mx.example.test: domain of someone@pass.example designates"
        f" {client} as permitted sender) client-ip={client};"
        ' envelope-from="someone@pass.example"; helo=client.example.org;'
        " receiver=mx.example.test; identity=mailfrom;"
    )
    assert by_domain["soft"].startswith("softfail (mx.example.test: ")
    assert by_domain["fail"].startswith("fail (mx.example.test: ")


def test_a_fail_is_refused_at_mail_from_with_reject_fail(tmp_path):
    client = fresh_client_address()
    with DNSServer(tmp_path / "dns", zones(client)) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver, reject_fail=True)).start()
        try:
            code, text = send(daemon, client, "someone@fail.example")
            assert code == 550
            assert text == (
                f"5.7.23 SPF fail: someone@fail.example does not designate {client} as"
                f" permitted sender ({client} is not a sender of fail.example)"
            ).encode()
            assert send(daemon, client, "someone@pass.example")[0] == 250
            assert len(daemon.messages("example.test", "alice")) == 1
        finally:
            daemon.stop()


def test_the_null_sender_is_checked_by_its_helo_name(tmp_path):
    client = fresh_client_address()
    records = {**zones(client), "client.example.org": [["TXT", "v=spf1 -all"]]}
    with DNSServer(tmp_path / "dns", records) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver, reject_fail=True)).start()
        try:
            code, text = send(daemon, client, "")
            assert code == 550
            assert text.startswith(b"5.7.23 SPF fail: postmaster@client.example.org")
        finally:
            daemon.stop()


def test_an_authenticated_sender_is_not_checked(tmp_path):
    client = fresh_client_address()
    records = {**zones(client), "example.test": [["TXT", "v=spf1 -all"]]}
    with DNSServer(tmp_path / "dns", records) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver, reject_fail=True)).start()
        try:
            with daemon.smtp("submission", source_address=(client, 0)) as session:
                session.ehlo("client.example.org")
                session.starttls(context=insecure_context())
                session.ehlo("client.example.org")
                session.login("alice@example.test", "alice-secret")
                assert session.mail("alice@example.test")[0] == 250
                assert session.rcpt("bob@example.test")[0] == 250
                assert session.data(b"Subject: hello\r\n\r\nhello\r\n")[0] == 250
            [message] = daemon.messages("example.test", "bob")
            assert b"Received-SPF" not in message
        finally:
            daemon.stop()
