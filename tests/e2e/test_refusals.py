"""Refusals in the real daemon's log, written as Postfix's smtpd writes them.

127.0.0.1 may not relay here, so relaying is refused too.  Each test uses
addresses of its own, as the tests share the daemon and its log.
"""

import re
import shutil
import smtplib
import subprocess

import pytest

from tests.helpers.daemon import insecure_context, make_daemon

CLIENT = "unknown[127.0.0.1]"
USERS = "dave@example.test:{PLAIN}dave-pw\n"
EXTRA = """
[relay]
networks = ["192.0.2.0/24"]
"""


@pytest.fixture(scope="module")
def mta(tmp_path_factory):
    daemon = make_daemon(tmp_path_factory.mktemp("refusals"), users=USERS, extra=EXTRA)
    daemon.start()
    yield daemon
    daemon.stop()


def logged_reject(daemon, line: str) -> None:
    """Wait for ``line``, the whole text after twistd's time and system."""
    daemon.wait_for_log(r"\] " + re.escape(line) + "$")


def test_unknown_user_550_5_1_1(mta):
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        assert client.rcpt("nobody@example.test")[0] == 550
    logged_reject(
        mta,
        f"NOQUEUE: reject: RCPT from {CLIENT}: 550 5.1.1 <nobody@example.test>: Recipient"
        " address rejected: User unknown; from=<sender@example.org> to=<nobody@example.test>"
        " proto=ESMTP helo=<client.example.org>",
    )


def test_relay_access_denied_554_5_7_1_after_helo(mta):
    with mta.smtp() as client:
        client.helo("old.example.org")
        client.mail("")
        assert client.rcpt("friend@remote.example")[0] == 554
    logged_reject(
        mta,
        f"NOQUEUE: reject: RCPT from {CLIENT}: 554 5.7.1 <friend@remote.example>: Relay access"
        " denied; from=<> to=<friend@remote.example> proto=SMTP helo=<old.example.org>",
    )


def test_sender_not_owned_553_at_mail(mta):
    with mta.smtp("submission") as client:
        client.ehlo("client.example.org")
        client.starttls(context=insecure_context())
        client.ehlo("laptop.example.org")
        client.login("dave@example.test", "dave-pw")
        assert client.mail("postmaster@example.test")[0] == 553
    logged_reject(
        mta,
        f"NOQUEUE: reject: MAIL from {CLIENT}: 553 5.7.1 <postmaster@example.test>: Sender"
        " address rejected: not owned by user dave@example.test;"
        " from=<postmaster@example.test> proto=ESMTP helo=<laptop.example.org>",
    )


def test_mail_without_auth_on_submission_before_helo_names_no_envelope(mta):
    with mta.smtp("submissions") as client:
        assert client.docmd("MAIL FROM:<x@example.org>")[0] == 503  # no HELO yet: syntax
        client.ehlo("nosy.example.org")
        assert client.mail("x@example.org")[0] == 530
    logged_reject(
        mta,
        f"NOQUEUE: reject: MAIL from {CLIENT}: 530 5.7.0 Authentication required;"
        " proto=ESMTP helo=<nosy.example.org>",
    )


def test_bare_lf_554_5_6_0_at_end_of_message_names_the_queue_id(mta):
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("bare@example.org")
        client.rcpt("postmaster@example.test")
        assert client.docmd("DATA")[0] == 354
        # smtplib's data() would turn the bare LF into CRLF.
        client.send(b"Subject: smuggled\r\n\r\nbare\nLF\r\n.\r\n")
        assert client.getreply()[0] == 554
    line = mta.wait_for_log(r"reject: END-OF-MESSAGE from .* from=<bare@example\.org>")
    queue_id, rest = line.split("] ", 1)[1].split(": ", 1)
    assert re.fullmatch(r"[0-9A-F]+", queue_id)
    assert rest == (
        f"reject: END-OF-MESSAGE from {CLIENT}: 554 5.6.0 Error: bare CR or LF in message;"
        " message refused; from=<bare@example.org> to=<postmaster@example.test>"
        " proto=ESMTP helo=<client.example.org>"
    )
    assert not list((mta.spool / "queue").glob(f"{queue_id}*"))


def test_syntax_errors_are_not_logged_as_rejects(mta):
    with mta.smtp() as client:
        client.ehlo("syntax.example.org")
        assert client.docmd("RCPT TO:<alice@example.test>")[0] == 503
        assert client.docmd("MAIL FROM:no-brackets@example.org")[0] == 501
        assert client.docmd("MAIL FROM:<x@example.org> BOGUS=1")[0] == 555
        assert client.docmd("FROB")[0] == 500
        client.mail("syntax@example.org")
        assert client.rcpt("marker@example.test")[0] == 550
    mta.wait_for_log(r"reject: RCPT .*to=<marker@example\.test>")
    rejects = [line for line in mta.log if "reject:" in line and "syntax.example.org" in line]
    assert len(rejects) == 1 and "to=<marker@example.test>" in rejects[0]


def test_too_many_connections_421_at_connect(start_mta):
    daemon = start_mta(extra="[limits]\nmax_connections_per_ip = 1\n")
    with daemon.smtp():
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            daemon.smtp()
        assert refused.value.smtp_code == 421
    logged_reject(
        daemon,
        f"NOQUEUE: reject: CONNECT from {CLIENT}: 421 4.7.0 mx.example.test Too many"
        " connections, try later; proto=SMTP",
    )


FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
POSTFIX_FILTER = "/etc/fail2ban/filter.d/postfix.conf"


@pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="fail2ban is not installed")
def test_fail2ban_postfix_filter_bans_for_our_reject_lines(mta):
    """fail2ban's own postfix filter, unchanged, reads twistd's log: the
    [system] marker takes the place of its optional host name."""
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("guess@example.org")
        client.rcpt("guess1@example.test")
        client.rcpt("guess2@remote.example")
    mta.wait_for_log(r"reject: RCPT .*to=<guess2@remote\.example>")
    result = subprocess.run(
        [FAIL2BAN_REGEX, "--print-all-matched", str(mta.root / "daemon.log"), POSTFIX_FILTER],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    matched = [line for line in result.stdout.splitlines() if "reject: RCPT" in line]
    assert any("to=<guess1@example.test>" in line for line in matched)
    assert any("to=<guess2@remote.example>" in line for line in matched)
