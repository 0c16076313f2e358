"""The dnsbl plugin in the real daemon, asking a DNS server on loopback.

The clients connect from their own loopback addresses (127.0.x.y), and
``[relay] networks`` trusts only 127.0.0.1, so that they are strangers
whose addresses the zone may list.
"""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import (
    Daemon,
    failed_start,
    fresh_client_address,
    insecure_context,
    installed_plugins,
    make_daemon,
)
from tests.helpers.relay_fixtures import DNSServer, FailingDNS
from twisted_mta.policies.dnsbl import query_name

ZONE = "bl.test"


def config(resolver: str, stage: str = "rcpt") -> str:
    return f"""
[relay]
networks = ["127.0.0.1/32"]
resolvers = ["{resolver}"]

[plugins]
enabled = ["dnsbl"]
[plugins.dnsbl]
zones = ["{ZONE}"]
stage = "{stage}"
"""


def daemon_with(tmp_path, extra: str) -> Daemon:
    # One process: these tests count what one plugin instance remembers
    # (each worker process has its own; see README, "Processes").
    extra += "\n[limits]\nworkers = 1\n"
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=extra)


def client_from(daemon: Daemon, address: str, listener: str = "smtp") -> smtplib.SMTP:
    return daemon.smtp(listener, source_address=(address, 0))


def send_from(daemon: Daemon, address: str) -> tuple[int, bytes]:
    """One message to alice from ``address``: RCPT's reply (and the rest
    of the transaction when RCPT is accepted)."""
    with client_from(daemon, address) as client:
        client.ehlo("client.example.org")
        assert client.mail("sender@remote.example")[0] == 250
        reply = client.rcpt("alice@example.test")
        if reply[0] == 250:
            assert client.data(b"Subject: hello\r\n\r\nhello\r\n")[0] == 250
    return reply


def listed(*addresses: str) -> dict[str, list]:
    return {query_name(address, ZONE): [["A", "127.0.0.2"]] for address in addresses}


def test_a_listed_client_is_refused_at_rcpt_and_others_are_not(tmp_path):
    bad, good = fresh_client_address(), fresh_client_address()
    with DNSServer(tmp_path / "dns", listed(bad, "127.0.0.1")) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver)).start()
        try:
            assert send_from(daemon, bad) == (
                554,
                f"5.7.1 Service unavailable; Client host [{bad}] blocked using {ZONE}".encode(),
            )
            daemon.wait_for_log(
                rf"NOQUEUE: reject: RCPT from unknown\[{bad}\]: 554 5\.7\.1 Service unavailable;"
                rf" Client host \[{bad}\] blocked using bl\.test; from=<sender@remote\.example>"
                r" to=<alice@example\.test>"
            )
            assert send_from(daemon, good)[0] == 250
            # 127.0.0.1 is listed too, but in [relay] networks.
            assert send_from(daemon, "127.0.0.1")[0] == 250
            assert len(daemon.messages("example.test", "alice")) == 2
        finally:
            daemon.stop()


def test_an_authenticated_client_is_not_refused_however_listed(tmp_path):
    bad = fresh_client_address()
    with DNSServer(tmp_path / "dns", listed(bad)) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver)).start()
        try:
            with client_from(daemon, bad, "submission") as client:
                client.ehlo("client.example.org")
                client.starttls(context=insecure_context())
                client.ehlo("client.example.org")
                client.login("alice@example.test", "alice-secret")
                assert client.mail("alice@example.test")[0] == 250
                assert client.rcpt("bob@example.test")[0] == 250
                assert client.data(b"Subject: hello\r\n\r\nhello\r\n")[0] == 250
            assert len(daemon.messages("example.test", "bob")) == 1
        finally:
            daemon.stop()


def test_at_connect_a_listed_client_gets_a_554_greeting(tmp_path):
    bad, good = fresh_client_address(), fresh_client_address()
    with DNSServer(tmp_path / "dns", listed(bad)) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver, stage="connect")).start()
        try:
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                client_from(daemon, bad)
            assert (refused.value.smtp_code, refused.value.smtp_error) == (
                554,
                f"5.7.1 Service unavailable; Client host [{bad}] blocked using {ZONE}".encode(),
            )
            daemon.wait_for_log(rf"NOQUEUE: reject: CONNECT from unknown\[{bad}\]: 554 5\.7\.1")
            assert send_from(daemon, good)[0] == 250
        finally:
            daemon.stop()


def test_answers_are_cached_so_a_second_message_asks_nothing(tmp_path):
    bad, good = fresh_client_address(), fresh_client_address()
    addresses = {query_name(bad, ZONE): "127.0.0.2"}
    with FailingDNS(failing=(), addresses=addresses) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver)).start()
        try:
            for _ in range(2):
                assert send_from(daemon, good)[0] == 250
                assert send_from(daemon, bad)[0] == 554
            asked = [name for name, _ in dns.queries]
            assert asked.count(query_name(good, ZONE)) == 1
            assert asked.count(query_name(bad, ZONE)) == 1
        finally:
            daemon.stop()


def test_a_failing_blocklist_lists_nobody_and_is_logged_once(tmp_path):
    client = fresh_client_address()
    failing = [(query_name(client, ZONE), "A")]
    with FailingDNS(failing=failing, addresses={}) as dns:
        daemon = daemon_with(tmp_path, config(dns.resolver)).start()
        try:
            assert send_from(daemon, client)[0] == 250
            assert send_from(daemon, client)[0] == 250
            assert len(daemon.messages("example.test", "alice")) == 2
            line = "dnsbl: lookups in bl.test fail (DNSServerError); its listings are ignored"
            daemon.wait_for_log(re.escape(line))
            assert len([entry for entry in daemon.log if line in entry]) == 1
        finally:
            daemon.stop()


def test_bad_options_stop_the_start_in_one_line(tmp_path):
    daemon = daemon_with(tmp_path, '[plugins]\nenabled = ["dnsbl"]\n')
    code, problems = failed_start(daemon)
    assert code != 0
    assert problems == [
        "twistd mta: plugins.dnsbl: zones: expected a non-empty list of DNS zone names"
    ]


def test_help_plugins_lists_dnsbl():
    assert "dnsbl" in installed_plugins()
