"""The daemon's log as structured events: with ``twistd --logger
twisted_mta.logs.json_lines`` every line is a JSON record carrying its
fields, with the same text; DNS lookups leave no lines of their own."""

from __future__ import annotations

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import fresh_client_address, make_daemon
from tests.helpers.relay_fixtures import DNSServer

JSON_LOGGER = ("--logger", "twisted_mta.logs.json_lines")


def with_spf(resolver: str) -> str:
    return f"""
[relay]
networks = []
resolvers = ["{resolver}"]
[plugins]
enabled = ["spf"]
"""


def fields(event: dict, *names: str) -> dict:
    return {name: event.get(name) for name in names}


def test_json_records_carry_the_fields_and_dns_lookups_are_not_logged(tmp_path):
    client = fresh_client_address()
    zones = {"sender.example": [["TXT", f"v=spf1 ip4:{client} -all"]]}
    with DNSServer(tmp_path / "dns", zones) as dns:
        daemon = make_daemon(
            tmp_path / "mta", users=USERS, aliases=ALIASES, extra=with_spf(dns.resolver)
        )
        daemon.start(twistd_args=JSON_LOGGER)
        try:
            with daemon.smtp("smtp", source_address=(client, 0)) as session:
                session.ehlo("client.example.org")
                assert session.mail("someone@sender.example")[0] == 250
                assert session.rcpt("alice@example.test")[0] == 250
                assert session.rcpt("nobody@example.test")[0] == 550
                assert session.data(b"Subject: logged\r\n\r\nhello\r\n")[0] == 250
            daemon.wait_for_log(r"to=<alice@example.test> relay=local .* status=sent")
        finally:
            daemon.stop()
    events = daemon.events
    assert events and len(events) == len(daemon.log)
    by_text = dict(zip(daemon.log, events))
    [listening] = [e for t, e in by_text.items() if t.startswith("listening: smtp on")]
    assert fields(listening, "listener", "host", "port") == {
        "listener": "smtp", "host": "127.0.0.1", "port": daemon.ports["smtp"],
    }
    [refused] = [e for t, e in by_text.items() if "NOQUEUE: reject: RCPT" in t]
    assert refused["client_ip"] == client and refused["recipient"] == "nobody@example.test"
    [accepted] = [e for t, e in by_text.items() if " from=<someone@sender.example> size=" in t]
    [delivered] = [e for t, e in by_text.items() if "to=<alice@example.test> relay=local" in t]
    assert accepted["queue_id"] == delivered["queue_id"]
    assert fields(delivered, "recipient", "relay", "status") == {
        "recipient": "alice@example.test", "relay": "local", "status": "sent",
    }
    [message] = daemon.messages("example.test", "alice")
    assert b"Received-SPF: pass" in message  # DNS was asked...
    noise = [t for t in daemon.log if "DNSDatagramProtocol" in t or "UDP Port" in t]
    assert noise == []  # ...and said nothing of itself
