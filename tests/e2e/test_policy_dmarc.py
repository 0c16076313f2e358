"""The dmarc plugin in the real daemon, after spf and dkim, asking a DNS
server on loopback.

The clients connect from their own loopback addresses (127.0.x.y) and
``[relay] networks`` is empty, so that none of them is trusted; the
domains are under ``.test``, the zone the loopback server answers for.
"""

from __future__ import annotations

import email

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import (
    Daemon,
    failed_start,
    fresh_client_address,
    installed_plugins,
    make_daemon,
)
from tests.helpers.relay_fixtures import DNSServer


def config(resolver: str, enabled: str = '"spf", "dkim", "dmarc"') -> str:
    return f"""
[relay]
networks = []
resolvers = ["{resolver}"]

[plugins]
enabled = [{enabled}]
[plugins.dmarc]
enforce = true
"""


def zones(client: str) -> dict[str, list]:
    return {
        "pass.test": [["TXT", f"v=spf1 ip4:{client} -all"]],
        "_dmarc.pass.test": [["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.reject.test": [["TXT", "v=DMARC1; p=reject"]],
    }


def daemon_with(tmp_path, extra: str) -> Daemon:
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)


def send(daemon: Daemon, client: str, author: str) -> tuple[int, bytes]:
    """One message to alice from someone@pass.test, From: ``author``: the
    reply to its data."""
    with daemon.smtp("smtp", source_address=(client, 0)) as session:
        session.ehlo("client.example.org")
        assert session.mail("someone@pass.test")[0] == 250
        assert session.rcpt("alice@example.test")[0] == 250
        return session.data(f"From: {author}\r\nSubject: hello\r\n\r\nhello\r\n".encode())


def test_an_aligned_pass_is_delivered_and_a_reject_failure_refused(tmp_path):
    client = fresh_client_address()
    with DNSServer(tmp_path / "dns", zones(client)) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver)).start()
        try:
            assert send(daemon, client, "someone@news.pass.test")[0] == 250
            code, text = send(daemon, client, "boss@reject.test")
            assert (code, text) == (550, b"5.7.1 Email rejected per DMARC policy for reject.test")
            [delivered] = daemon.messages("example.test", "alice")
        finally:
            daemon.stop()
    results = " ".join(email.message_from_bytes(delivered)["Authentication-Results"].split())
    assert "spf=pass smtp.mailfrom=pass.test;" in results
    assert results.endswith("dmarc=pass (p=reject dis=none) header.from=news.pass.test")


def test_dmarc_without_spf_and_dkim_before_it_stops_the_start(tmp_path):
    daemon = daemon_with(tmp_path, config("127.0.0.1:53", enabled='"spf", "dmarc"'))
    code, problems = failed_start(daemon)
    assert code != 0
    assert problems == ["twistd mta: plugins.enabled: dmarc needs dkim enabled before it"]


def test_help_plugins_lists_dmarc():
    assert "dmarc" in installed_plugins()
