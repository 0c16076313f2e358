"""SMTP AUTH against the real daemon: mechanisms, schemes, policy, abuse."""

import base64
import re
import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.daemon import fresh_client_address, insecure_context, make_daemon
from twisted_mta.auth.passwords import hash_password

PASSWORDS = {
    "alice@example.test": ("argon2id", "alice-pw"),
    "bob@example.test": ("blf-crypt", "bob-pw"),
    "carol@example.test": ("cram-md5", "carol-pw"),
    "dave@example.test": ("plain", "dave-pw"),
}
ALIASES = "team@example.test: alice@example.test, bob@example.test\n"
EXTRA = """
[auth]
mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]
failure_delay = "0.05s"

[relay]
networks = ["192.0.2.0/24"]
"""


def users_file() -> str:
    return "".join(
        f"{address}:{hash_password(scheme, password)}\n"
        for address, (scheme, password) in PASSWORDS.items()
    )


@pytest.fixture(scope="module")
def mta(tmp_path_factory):
    daemon = make_daemon(
        tmp_path_factory.mktemp("auth"), users=users_file(), aliases=ALIASES, extra=EXTRA
    )
    daemon.start()
    yield daemon
    daemon.stop()


def submission(mta, source=None):
    """A session inside TLS, from ``source`` or else a fresh address."""
    client = mta.smtp("submission", source_address=(source or fresh_client_address(), 0))
    client.ehlo("client.example.org")
    client.starttls(context=insecure_context())
    client.ehlo("client.example.org")
    return client


def auth_line(client):
    return client.esmtp_features.get("auth", "")


def test_auth_not_offered_before_tls_but_after(mta):
    with mta.smtp("smtp") as client:
        client.ehlo("client.example.org")
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH PLAIN " + base64.b64encode(b"\0dave@example.test\0dave-pw").decode())[0] == 538
        client.starttls(context=insecure_context())
        client.ehlo("client.example.org")
        assert auth_line(client).split() == ["PLAIN", "LOGIN", "CRAM-MD5"]


def test_cram_md5_is_offered_only_when_configured(tmp_path):
    default_mechanisms = EXTRA.replace('mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]\n', "")
    daemon = make_daemon(tmp_path / "mta", users=users_file(), extra=default_mechanisms)
    daemon.start()
    try:
        with submission(daemon) as client:
            assert auth_line(client).split() == ["PLAIN", "LOGIN"]
            assert client.login("alice@example.test", "alice-pw")[0] == 235
    finally:
        daemon.stop()
    assert not [line for line in daemon.log if "CRAM-MD5" in line]


def test_start_warns_of_accounts_cram_md5_cannot_serve(mta):
    line = mta.wait_for_log(r"warning: .*CRAM-MD5")
    assert line.endswith(": alice@example.test, bob@example.test")
    assert str(mta.root / "users") in line


def test_auth_offered_at_once_on_submissions(mta):
    with mta.smtp("submissions") as client:
        client.ehlo("client.example.org")
        assert "STARTTLS" not in client.esmtp_features
        assert auth_line(client).split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
        client.login("dave@example.test", "dave-pw")


@pytest.mark.parametrize("address", sorted(PASSWORDS))
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_plain_and_login_work_for_every_scheme(mta, address, mechanism):
    password = PASSWORDS[address][1]
    with submission(mta) as client:
        client.user, client.password = address, password
        authenticator = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
        code, _ = client.auth(mechanism, authenticator)
        assert code == 235
        assert client.sendmail(address, ["postmaster@example.test"], b"Subject: t\r\n\r\nx\r\n") == {}


@pytest.mark.parametrize("address,works", [
    ("carol@example.test", True), ("dave@example.test", True),
    ("alice@example.test", False), ("bob@example.test", False),
])
def test_cram_md5_needs_a_cram_or_plain_secret(mta, address, works):
    with submission(mta) as client:
        if works:
            assert client.login(address, PASSWORDS[address][1])[0] == 235
        else:
            client.user, client.password = address, PASSWORDS[address][1]
            with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
                client.auth("CRAM-MD5", client.auth_cram_md5)
            assert raised.value.smtp_code == 535


def test_mail_without_auth_refused_on_submission_ports(mta):
    for listener in ("submission", "submissions"):
        with mta.smtp(listener) as client:
            client.ehlo("client.example.org")
            if listener == "submission":
                client.starttls(context=insecure_context())
                client.ehlo("client.example.org")
            code, text = client.mail("dave@example.test")
            assert (code, text[:5]) == (530, b"5.7.0")


def test_auth_twice_or_inside_a_transaction_is_503(mta):
    with submission(mta) as client:
        client.login("dave@example.test", "dave-pw")
        assert client.docmd("AUTH PLAIN " + base64.b64encode(b"\0dave@example.test\0dave-pw").decode())[0] == 503
    with mta.smtp("smtp") as client:
        client.ehlo("client.example.org")
        client.starttls(context=insecure_context())
        client.ehlo("client.example.org")
        assert client.mail("someone@example.org")[0] == 250
        code, text = client.docmd("AUTH PLAIN " + base64.b64encode(b"\0dave@example.test\0dave-pw").decode())
        assert (code, text[:5]) == (503, b"5.5.1")


@pytest.mark.parametrize("command,code", [
    ("AUTH", 501),
    ("AUTH BOGUS", 504),
    ("AUTH PLAIN !!!notbase64", 501),
    ("AUTH PLAIN =", 501),
    ("AUTH PLAIN " + base64.b64encode(b"no-nul-at-all").decode(), 501),
    ("AUTH PLAIN " + base64.b64encode(b"bob@example.test\0dave@example.test\0dave-pw").decode(), 501),
    ("AUTH CRAM-MD5 extra words here", 501),
])
def test_auth_garbage_gets_a_reply_and_the_session_goes_on(mta, command, code):
    with submission(mta) as client:
        assert client.docmd(command)[0] == code
        assert client.noop()[0] == 250


def test_star_cancels_an_exchange(mta):
    with submission(mta) as client:
        assert client.docmd("AUTH LOGIN")[0] == 334
        code, text = client.docmd("*")
        assert (code, text[:5]) == (501, b"5.0.0")
        assert client.noop()[0] == 250


def test_garbage_inside_login_exchange(mta):
    with submission(mta) as client:
        assert client.docmd("AUTH LOGIN")[0] == 334
        assert client.docmd("%%%")[0] == 501
        assert client.docmd("AUTH CRAM-MD5")[0] == 334
        assert client.docmd(base64.b64encode(b"carol@example.test nothex").decode())[0] == 501


def test_failures_get_535_then_421_and_close(mta):
    source = fresh_client_address()
    with submission(mta, source) as client:
        client.user, client.password = "dave@example.test", "wrong"
        for _ in range(2):
            code, text = client.docmd("AUTH PLAIN " + base64.b64encode(b"\0dave@example.test\0wrong").decode())
            assert (code, text[:5]) == (535, b"5.7.8")
        client.send(b"AUTH PLAIN " + base64.b64encode(b"\0dave@example.test\0wrong") + b"\r\n")
        assert client.getreply()[0] == 535
        assert client.getreply()[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    line = mta.wait_for_log(
        rf"auth failed: client=\[{re.escape(source)}\] mechanism=PLAIN user=dave@example\.test"
    )
    assert "wrong" not in line


def test_failure_delay_grows(mta):
    with submission(mta) as client:
        timings = []
        for _ in range(2):
            started = time.monotonic()
            client.docmd("AUTH PLAIN " + base64.b64encode(b"\0nobody@example.test\0x").decode())
            timings.append(time.monotonic() - started)
    assert timings[1] > timings[0]


def test_authenticated_user_may_relay_and_is_logged(mta):
    with submission(mta) as client:
        client.login("dave@example.test", "dave-pw")
        assert client.sendmail("dave@example.test", ["friend@remote.example"], b"Subject: r\r\n\r\nx\r\n") == {}
    mta.wait_for_log(r"from=<dave@example\.test> .* sasl_username=dave@example\.test")
    assert list((mta.spool / "queue").glob("*.env"))


def test_unauthenticated_client_cannot_relay(mta):
    with mta.smtp("smtp") as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org")
        code, text = client.rcpt("friend@remote.example")
        assert (code, text[:5]) == (554, b"5.7.1")


@pytest.mark.parametrize("sender,allowed", [
    ("dave@example.test", True),
    ("DAVE+lists@example.test", True),
    ("bob@example.test", False),
    ("someone@example.org", False),
    ("", False),
])
def test_authenticated_user_sends_only_as_own_address(mta, sender, allowed):
    with submission(mta) as client:
        client.login("dave@example.test", "dave-pw")
        code, text = client.mail(sender)
        if allowed:
            assert code == 250
        else:
            assert (code, text[:5]) == (553, b"5.7.1")


def test_alias_that_delivers_to_the_user_is_an_own_address(mta):
    with submission(mta) as client:
        client.login("alice@example.test", "alice-pw")
        assert client.mail("team@example.test")[0] == 250


def _login_time(mta, address, password):
    with submission(mta) as client:
        started = time.monotonic()
        client.docmd("AUTH PLAIN " + base64.b64encode(f"\0{address}\0{password}".encode()).decode())
        return time.monotonic() - started


def test_unknown_users_cost_as_much_as_the_slowest_accounts(mta):
    """A wrong password for an unknown user, a {CRAM-MD5} or a {PLAIN}
    account takes as long as for a bcrypt account (this file's slowest
    hash); without padding the first three answer in a fraction of it.
    Each guess comes from a fresh address, so the delays are all the same."""
    timings = {
        address: min(_login_time(mta, address, "wrong") for _ in range(3))
        for address in ("bob@example.test", "nobody@example.test", "carol@example.test",
                        "dave@example.test")
    }
    print("wrong password, seconds to answer:", {a: round(t, 3) for a, t in timings.items()})
    slowest = timings.pop("bob@example.test")
    for address, seconds in timings.items():
        assert 0.6 < seconds / slowest < 1.6, (address, seconds, slowest)


def test_slow_hash_does_not_block_other_sessions(mta):
    """While one argon2 login is checked, another session is served at once."""
    with submission(mta) as slow, mta.smtp("smtp") as other:
        other.ehlo("client.example.org")
        slow.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-pw") + b"\r\n")
        started = time.monotonic()
        assert other.noop()[0] == 250
        noop_time = time.monotonic() - started
        assert slow.getreply()[0] == 235
        login_time = time.monotonic() - started
    assert noop_time < login_time


def _parallel_logins(mta, count):
    """Seconds for ``count`` sessions' bcrypt logins sent at the same moment."""
    command = b"AUTH PLAIN " + base64.b64encode(b"\0bob@example.test\0bob-pw") + b"\r\n"
    clients = [submission(mta) for _ in range(count)]
    try:
        started = time.monotonic()
        for client in clients:
            client.send(command)
        assert [client.getreply()[0] for client in clients] == [235] * count
        return time.monotonic() - started
    finally:
        for client in clients:
            client.close()


def test_concurrent_logins_are_not_serialised(mta):
    """Two bcrypt checks (single-threaded, unlike argon2's lanes) at once
    take about as long as one: they run in threads, not on the reactor.
    Serialised they would take twice as long every time; the best of three
    tries keeps a busy machine from failing the test."""
    ratios = []
    for _ in range(3):
        ratios.append(_parallel_logins(mta, 2) / _parallel_logins(mta, 1))
        if ratios[-1] < 1.6:
            break
    assert min(ratios) < 1.6, ratios


def test_many_logins_at_once_from_one_clean_address_all_succeed(mta):
    """A webmail logging several users in at once is not a guesser."""
    command = b"AUTH PLAIN " + base64.b64encode(b"\0bob@example.test\0bob-pw") + b"\r\n"
    source = fresh_client_address()
    clients = [submission(mta, source) for _ in range(5)]
    try:
        for client in clients:
            client.send(command)
        assert [client.getreply()[0] for client in clients] == [235] * 5
    finally:
        for client in clients:
            client.close()


def test_received_header_names_user_only_when_configured(mta):
    with submission(mta) as client:
        client.login("dave@example.test", "dave-pw")
        client.sendmail("dave@example.test", ["carol@example.test"], b"Subject: who\r\n\r\nx\r\n")
    [message] = [m for m in mta.messages("example.test", "carol") if b"Subject: who" in m]
    assert b"dave@example.test" not in message.split(b"\nSubject:")[0].split(b"Received:")[1]
    assert b"with ESMTPSA" in message


def test_strcred_memory_and_file_checkers(tmp_path):
    passwords = tmp_path / "passwd"
    passwords.write_text("frank@example.test:frank-pw\n")
    daemon = make_daemon(tmp_path / "mta", extra=EXTRA)
    daemon.start(("--auth", "memory:eve@example.test:eve-pw", "--auth", f"file:{passwords}"))
    try:
        for user, password in (("eve@example.test", "eve-pw"), ("frank@example.test", "frank-pw")):
            with submission(daemon) as client:
                assert client.login(user, password)[0] == 235
        with submission(daemon) as client:
            client.user, client.password = "eve@example.test", "eve-pw"
            assert client.auth("CRAM-MD5", client.auth_cram_md5)[0] == 235
    finally:
        daemon.stop()


def test_password_only_checker_hides_cram_md5(tmp_path):
    daemon = make_daemon(tmp_path / "mta", extra=EXTRA)
    daemon.config.write_text(daemon.config.read_text().replace('file = "users"', 'file = ""'))
    daemon.start(("--auth", "unix"))
    try:
        with submission(daemon) as client:
            assert auth_line(client).split() == ["PLAIN", "LOGIN"]
    finally:
        daemon.stop()


def test_no_checker_no_auth(tmp_path):
    daemon = make_daemon(tmp_path / "mta", extra=EXTRA)
    daemon.config.write_text(daemon.config.read_text().replace('file = "users"', 'file = ""'))
    daemon.start()
    try:
        with submission(daemon) as client:
            assert "auth" not in client.esmtp_features
    finally:
        daemon.stop()


def test_users_file_reread_without_restart(mta):
    users = mta.root / "users"
    original = users.read_text()
    users.write_text(original + "gina@example.test:{PLAIN}gina-pw\n")
    try:
        with submission(mta) as client:
            assert client.login("gina@example.test", "gina-pw")[0] == 235
    finally:
        users.write_text(original)


SWAKS = shutil.which("swaks")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
@pytest.mark.parametrize("mechanism,address", [
    ("CRAM-MD5", "carol@example.test"), ("LOGIN", "bob@example.test"), ("PLAIN", "alice@example.test"),
])
def test_swaks(mta, mechanism, address):
    result = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{mta.ports['submission']}", "--tls",
         "--auth", mechanism, "--auth-user", address, "--auth-password", PASSWORDS[address][1],
         "--from", address, "--to", "postmaster@example.test", "--helo", "client.example.org"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout


FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
FILTER = Path(__file__).resolve().parents[2] / "etc" / "fail2ban" / "filter.d" / "twisted-mta.conf"


@pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="fail2ban is not installed")
def test_fail2ban_filter_matches_what_the_server_logs(mta):
    with submission(mta) as client:
        client.docmd("AUTH PLAIN " + base64.b64encode(b"\0mallory@example.test\0guess").decode())
    mta.wait_for_log(r"auth failed: .*user=mallory@example\.test")
    result = subprocess.run(
        [FAIL2BAN_REGEX, "--print-all-matched", str(mta.root / "daemon.log"), str(FILTER)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    matched = [line for line in result.stdout.splitlines() if "auth failed:" in line and "mallory" in line]
    assert matched
    total = re.search(r"Lines: \d+ lines, \d+ ignored, (\d+) matched", result.stdout)
    failures = sum("auth failed:" in line for line in (mta.root / "daemon.log").read_text().splitlines())
    assert int(total.group(1)) == failures


def test_mta_users_checker_plugin_and_received_user(tmp_path):
    """--auth mta-users:FILE, our checker as a strcred plugin; and
    received_user = true names the login in the Received header."""
    users = tmp_path / "extra-users"
    users.write_text("henry@example.test:" + hash_password("cram-md5", "henry-pw") + "\n")
    daemon = make_daemon(tmp_path / "mta", extra=EXTRA.replace("[auth]\n", "[auth]\nreceived_user = true\n"))
    daemon.start(("--auth", f"mta-users:{users}"))
    try:
        with submission(daemon) as client:
            assert client.login("henry@example.test", "henry-pw")[0] == 235
            client.sendmail("henry@example.test", ["postmaster@example.test"], b"Subject: h\r\n\r\nx\r\n")
        [message] = daemon.messages("example.test", "postmaster")
        received = message.split(b"\nSubject:")[0].split(b"Received:")[1]
        assert b"(authenticated as henry@example.test)" in received
    finally:
        daemon.stop()


def test_failures_slow_down_the_address_across_connections(tmp_path):
    daemon = make_daemon(tmp_path / "mta", extra=EXTRA.replace('"0.05s"', '"0.2s"'))
    daemon.start()
    wrong = "AUTH PLAIN " + base64.b64encode(b"\0nobody@example.test\0x").decode()
    source = fresh_client_address()
    try:
        durations = []
        for _ in range(3):
            with submission(daemon, source) as client:
                started = time.monotonic()
                assert client.docmd(wrong)[0] == 535
                durations.append(time.monotonic() - started)
        # Answers after 0.2 s, 0.4 s and 0.8 s, plus each check's own time.
        assert durations[2] > durations[0] + 0.4, durations
    finally:
        daemon.stop()


def _auth_plain(client, address, password):
    """Send AUTH PLAIN; the reply code and the seconds it took."""
    started = time.monotonic()
    code, _ = client.docmd("AUTH PLAIN " + base64.b64encode(f"\0{address}\0{password}".encode()).decode())
    return code, time.monotonic() - started


def test_a_success_waits_like_a_failure_and_erases_none(tmp_path):
    """From an address with two failures, the right password is answered
    only after the delay a third failure would get (hanging up before then
    tells nothing); the failures stay, and the third makes the address
    blocked: 454 4.7.0 at once, without a password check."""
    extra = EXTRA.replace('"0.05s"', '"0.25s"') + "\n[limits]\nmax_auth_failures_per_ip = 3\n"
    daemon = make_daemon(tmp_path / "mta", users=users_file(), extra=extra)
    daemon.start()
    source = fresh_client_address()
    try:
        steps = []
        for password in ("wrong", "wrong", "dave-pw", "wrong"):
            with submission(daemon, source) as client:
                steps.append(_auth_plain(client, "dave@example.test", password))
        with submission(daemon, source) as client:
            refused = _auth_plain(client, "dave@example.test", "dave-pw")
            reply = client.docmd("AUTH LOGIN")
        with submission(daemon) as client:
            fresh = _auth_plain(client, "dave@example.test", "dave-pw")
    finally:
        daemon.stop()
    print("from one address: wrong, wrong, right, wrong, right:",
          [(code, round(seconds, 2)) for code, seconds in steps + [refused]],
          f"- right from a fresh address: {fresh[1]:.2f} s")
    assert [code for code, _ in steps] == [535, 535, 235, 535]
    check = fresh[1]
    assert steps[2][1] > check + 0.8, "the success waited the delay of a third failure (1 s)"
    assert steps[3][1] > check + 0.8, "a third failure's delay (1 s), not a first one's (0.25 s)"
    assert refused[0] == 454 and refused[1] < check + 0.5
    assert reply[0] == 454 and reply[1].startswith(b"4.7.0")

    def lines(text: str) -> list[str]:
        return [line for line in daemon.log if text in line]

    # A worker's lines reach the log through the main process, after the reply.
    daemon.wait_for(lambda: len(lines(f"auth failed: client=[{source}]")) >= 3)
    daemon.wait_for(lambda: lines(f"auth refused: client=[{source}]"))
    assert len(lines(f"auth failed: client=[{source}]")) == 3
    told = lines(f"auth refused: client=[{source}]")
    assert len(told) == 1 and "mechanism=PLAIN: too many authentication failures" in told[0]


def test_sighup_applies_max_auth_failures_per_ip(tmp_path):
    extra = EXTRA + "\n[limits]\nmax_auth_failures_per_ip = 100\n"
    daemon = make_daemon(tmp_path / "mta", users=users_file(), extra=extra)
    daemon.start()
    source = fresh_client_address()
    try:
        with submission(daemon, source) as client:
            assert _auth_plain(client, "dave@example.test", "wrong")[0] == 535
            assert _auth_plain(client, "dave@example.test", "wrong")[0] == 535
        daemon.config.write_text(daemon.config.read_text().replace("= 100", "= 2"))
        seen = len(daemon.log)
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for(lambda: any("reload: config" in line for line in daemon.log[seen:]))
        with submission(daemon, source) as client:
            assert _auth_plain(client, "dave@example.test", "dave-pw")[0] == 454
    finally:
        daemon.stop()
