"""Policy plugins in the real daemon: a third-party plugin from the README's
example, installed in a twisted/plugins/ folder on PYTHONPATH, over SMTP and
over twisted-mta-sendmail; plugins that raise, hang, add headers or refuse
a message; plugins that are missing or misconfigured."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.capture import Behaviour, CaptureServer
from tests.helpers.daemon import TWISTD, Daemon, eventually, make_daemon
from tests.helpers.raw import EHLO, MAIL, Raw
from tests.helpers.relay_fixtures import relay_config, submit, wait_attempt

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sender_blocklist.py"
SENDMAIL = str(Path(sys.executable).with_name("twisted-mta-sendmail"))

# Test plugins: what each hook does is chosen by the recipient or the body.
TESTING_PLUGINS = '''
from twisted.internet import defer
from twisted.plugin import IPlugin
from twisted.python import log
from zope.interface import implementer

from twisted_mta.interfaces import AuthResult, IMailPolicyFactory, Verdict


class Faulty:
    def rcpt_to(self, session, transaction, recipient, params):
        if recipient.startswith("boom@"):
            raise RuntimeError("kaboom")
        if recipient.startswith("slow@"):
            return defer.Deferred()
        return None


class Tagger:
    def message(self, session, transaction, message):
        with message.open() as stream:
            if b"VIRUS" in stream.read():
                return Verdict.reject(554, "5.7.1", "Message refused: infected")
        listener = session.listener
        result = AuthResult("x-tag", "pass", (("header.subject", message.headers["Subject"]),))
        return Verdict.proceed(
            [("X-Tagged", f"{listener} {message.headers['Subject']}")], results=[result]
        )


@implementer(IPlugin, IMailPolicyFactory)
class Factory:
    def __init__(self, name, make):
        self.name = name
        self.description = f"the {name} test policy"
        self.make = make

    def policy(self, options, context):
        return self.make()


class Signer:
    def outbound(self, envelope, message):
        if any(r.startswith("refuse@") for r in envelope.recipients):
            return Verdict.reject(554, "5.7.0", "not signed")
        subject = message.headers["Subject"]
        return Verdict.proceed([("X-Signed", f"{envelope.queue_id} {subject}")])

    def delivered(self, envelope, recipient, result):
        log.msg(f"told: {recipient} {result.status} {result.relay} from {envelope.listener}")


faulty = Factory("faulty", Faulty)
tagger = Factory("tagger", Tagger)
signer = Factory("signer", Signer)
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch) -> Path:
    """A twisted/plugins/ folder on the daemon's PYTHONPATH, holding the
    README's example and the test plugins."""
    root = tmp_path / "site"
    folder = root / "twisted" / "plugins"
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLE, folder / "sender_blocklist.py")
    (folder / "testing_policies.py").write_text(TESTING_PLUGINS)
    monkeypatch.setenv("PYTHONPATH", str(root))
    return root


def daemon_with(tmp_path: Path, plugins: str) -> Daemon:
    return make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES, extra=plugins)


BLOCKLIST = """
[plugins]
enabled = ["sender-blocklist"]
[plugins.sender-blocklist]
senders = ["bob@example.test", "@bad.example"]
"""


def test_the_readme_example_refuses_over_smtp_and_over_sendmail(tmp_path, plugin_path):
    daemon = daemon_with(tmp_path, BLOCKLIST).start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            code, text = client.mail("spam@bad.example")
            assert (code, text) == (550, b"5.7.1 <spam@bad.example>: Sender address rejected: blocked")
            assert client.mail("friend@good.example")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.data(b"Subject: fine\r\n\r\nhello\r\n")[0] == 250
        assert len(daemon.messages("example.test", "alice")) == 1
        daemon.wait_for_log(r"NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.1\]: 550 5\.7\.1")

        result = subprocess.run(
            [SENDMAIL, "-C", str(daemon.config), "-f", "bob@example.test", "alice@example.test"],
            input=b"Subject: from bob\n\nhello\n",
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        daemon.wait_for_log(
            r"to=<alice@example\.test> relay=none .* status=bounced \(550 5\.7\.1 "
            r"<bob@example\.test>: Sender address rejected: blocked\)"
        )
        assert daemon.wait_for(lambda: daemon.messages("example.test", "bob"), timeout=10)
        [bounce] = daemon.messages("example.test", "bob")
        assert b"Sender address rejected: blocked" in bounce
        assert len(daemon.messages("example.test", "alice")) == 1
    finally:
        daemon.stop()


def test_help_plugins_lists_what_is_installed(plugin_path):
    result = subprocess.run(
        [TWISTD, "mta", "--help-plugins"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.split(None, 1) == ["sender-blocklist", "Refuse mail from the addresses and"
                                " @domains listed in 'senders'"]
        for line in lines
    ), lines
    assert any(line.startswith("tagger ") for line in lines)


@pytest.mark.parametrize(
    "plugins, problem",
    [
        ('[plugins]\nenabled = ["nonesuch"]\n', "twistd mta: plugins.enabled: no plugin 'nonesuch'"),
        (
            '[plugins]\nenabled = ["sender-blocklist"]\n',
            "twistd mta: plugins.sender-blocklist: senders: expected a list",
        ),
        (
            '[plugins]\nenabled = ["faulty"]\n[plugins.faulty]\non_error = "maybe"\n',
            "twistd mta: plugins.faulty.on_error: must be one of tempfail, accept",
        ),
    ],
)
def test_a_plugin_that_cannot_be_made_stops_the_start_in_one_line(
    tmp_path, plugin_path, plugins, problem
):
    daemon = daemon_with(tmp_path, plugins)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mta", "--config", str(daemon.config)],
        cwd=daemon.root, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if "twistd mta:" in line] == [
        line for line in result.stderr.splitlines() if line.startswith(problem)
    ]
    assert problem in result.stderr


FAULTY = """
[plugins]
enabled = ["faulty"]
timeout = "1s"
"""


def test_a_raising_or_hanging_hook_is_a_451_and_the_daemon_keeps_serving(tmp_path, plugin_path):
    daemon = daemon_with(tmp_path, FAULTY).start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("friend@good.example")[0] == 250
            assert client.rcpt("boom@remote.example") == (
                451, b"4.3.0 Temporary policy failure, try again later"
            )
            assert client.rcpt("slow@remote.example")[0] == 451
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.data(b"Subject: still here\r\n\r\nhello\r\n")[0] == 250
        daemon.wait_for_log(r"plugin faulty: rcpt_to failed: RuntimeError: kaboom; answered 451")
        daemon.wait_for_log(r"plugin faulty: rcpt_to failed: no answer within 1s; answered 451")
        assert len(daemon.messages("example.test", "alice")) == 1
    finally:
        daemon.stop()


def test_on_error_accept_passes_over_a_failing_hook(tmp_path, plugin_path):
    plugins = FAULTY + '[plugins.faulty]\non_error = "accept"\n'
    daemon = daemon_with(tmp_path, plugins).start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("friend@good.example")[0] == 250
            assert client.rcpt("boom@remote.example")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
        daemon.wait_for_log(r"plugin faulty: rcpt_to failed: RuntimeError: kaboom; passed over")
    finally:
        daemon.stop()


TAGGER = """
[plugins]
enabled = ["tagger"]
"""


def test_a_message_hook_adds_headers_to_every_copy_or_refuses_the_message(
    tmp_path, plugin_path
):
    daemon = daemon_with(tmp_path, TAGGER + "[relay]\nsmarthost = \"127.0.0.1:1\"\n").start()
    try:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("friend@good.example")[0] == 250
            for recipient in ("alice@example.test", "bob@example.test", "far@remote.example"):
                assert client.rcpt(recipient)[0] == 250
            forged = b"Authentication-Results: MX.example.test; x-tag=pass\r\n"
            other = b"Authentication-Results: other.example; x-tag=fail\r\n"
            message = forged + other + b"Subject: hello\r\n\r\nbody\r\n"
            assert client.data(message)[0] == 250
            assert client.mail("friend@good.example")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            code, text = client.data(b"Subject: bad\r\n\r\nVIRUS\r\n")
            assert (code, text) == (554, b"5.7.1 Message refused: infected")
        copies = daemon.messages("example.test", "alice") + daemon.messages("example.test", "bob")
        queued = sorted((daemon.spool / "queue").glob("*.msg"))
        assert len(copies) == 2 and len(queued) == 1
        ours = b"Authentication-Results: mx.example.test;\n\tx-tag=pass header.subject=hello\n"
        for stored in copies + [queued[0].read_bytes()]:
            assert ours + b"X-Tagged: smtp hello\nReceived: from client.example.org" in stored
            assert stored.endswith(
                b"\nAuthentication-Results: other.example; x-tag=fail\nSubject: hello\n\nbody\n"
            )
            assert stored.count(b"Authentication-Results:") == 2
        for stored in copies:
            assert stored.startswith(b"Return-Path: <friend@good.example>\nDelivered-To: ")
        assert not list((daemon.spool / "mail").glob("*/*/tmp/*"))
        # The relay attempt rewrites the queued envelope (through a
        # temporary file) at a time of its own: none may stay behind.
        daemon.wait_for_log(r"to=<far@remote\.example> .*status=deferred")
        assert eventually(
            lambda: not [p for p in (daemon.spool / "queue").iterdir() if p.name.endswith(".tmp")]
        )
    finally:
        daemon.stop()


def test_outbound_headers_go_out_with_the_relayed_message_and_results_are_told(
    tmp_path, plugin_path
):
    with CaptureServer(Behaviour(), host="127.0.0.2") as server:
        extra = relay_config(smarthost=f"{server.host}:{server.port}", smarthost_tls="none")
        extra += '[plugins]\nenabled = ["signer"]\n'
        daemon = daemon_with(tmp_path, extra).start()
        try:
            sent = b"Subject: out\r\n\r\nbody\r\n"
            queue_id = submit(
                daemon, "friend@good.example", ["far@remote.example", "alice@example.test"], sent
            )
            wait_attempt(daemon, queue_id, "far@remote.example", "sent")
            [transaction] = server.transactions
            assert transaction.message.startswith(f"X-Signed: {queue_id} out\nReceived: ".encode())
            assert transaction.message.endswith(b"Subject: out\n\nbody\n")
            daemon.wait_for_log(r"told: alice@example\.test sent local from smtp")
            daemon.wait_for_log(r"told: far@remote\.example sent 127\.0\.0\.2\[127\.0\.0\.2\]")
            refused = submit(daemon, "friend@good.example", ["refuse@remote.example"], sent)
            wait_attempt(daemon, refused, "refuse@remote.example", "bounced")
            assert len(server.transactions) == 1
            daemon.wait_for_log(r"told: refuse@remote\.example bounced none from smtp")
        finally:
            daemon.stop()


def test_a_slow_hook_does_not_hold_up_other_sessions_and_bounces_skip_the_policies(
    tmp_path, plugin_path
):
    plugins = '[plugins]\nenabled = ["faulty", "tagger"]\ntimeout = "5s"\n'
    daemon = daemon_with(tmp_path, plugins).start()
    try:
        slow = Raw(daemon.ports["smtp"])
        assert slow.reply().code == 220
        slow.expect(EHLO, 250)
        slow.expect(MAIL, 250)
        slow.send(b"RCPT TO:<slow@remote.example>\r\n")
        started = time.monotonic()
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("friend@good.example")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.data(b"Subject: meanwhile\r\n\r\nhello\r\n")[0] == 250
        assert time.monotonic() - started < 2.0
        assert slow.reply().code == 451  # the slow one, once its hook timed out
        slow.sock.close()

        result = subprocess.run(
            [SENDMAIL, "-C", str(daemon.config), "-f", "alice@example.test", "nobody@example.test"],
            input=b"Subject: lost\n\nhello\n",
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert daemon.wait_for(
            lambda: any(b"Subject: lost" in m for m in daemon.messages("example.test", "alice")),
            timeout=10,
        )
        [bounce] = [m for m in daemon.messages("example.test", "alice") if b"Subject: lost" in m]
        assert b"Return-Path: <>" in bounce and b"X-Tagged:" not in bounce.split(b"\n\n")[0]
        tagged = [m for m in daemon.messages("example.test", "alice") if b"meanwhile" in m]
        assert tagged and b"X-Tagged: smtp meanwhile" in tagged[0]
    finally:
        daemon.stop()
