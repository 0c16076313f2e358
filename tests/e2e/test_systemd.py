"""The daemon under systemd: the shipped units pass ``systemd-analyze
verify``, the daemon says READY=1 on ``$NOTIFY_SOCKET`` once it serves
(RELOADING=1 and STOPPING=1 around SIGHUP and SIGTERM), and it serves
sockets passed by socket activation (``systemd-socket-activate``, the
protocol systemd itself speaks)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import TWISTD, Daemon, base_config, make_daemon

UNITS = Path(__file__).resolve().parents[2] / "etc" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    assert SYSTEMD_ANALYZE, "systemd-analyze is not installed (apt-get install systemd)"
    service = (UNITS / "twisted-mta.service").read_text()
    assert "ExecStart=/opt/twisted-mta/bin/twistd " in service
    # verify wants the programs to exist: the installed path becomes ours.
    (tmp_path / "twisted-mta.service").write_text(
        service.replace("/opt/twisted-mta/bin/twistd", TWISTD)
    )
    sockets = sorted(UNITS.glob("*.socket"))
    assert [path.name for path in sockets] == [
        "twisted-mta-smtp.socket",
        "twisted-mta-submission.socket",
        "twisted-mta-submissions.socket",
    ]
    for path in sockets:
        shutil.copy(path, tmp_path)
    units = [str(tmp_path / "twisted-mta.service")] + [str(tmp_path / p.name) for p in sockets]
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *units], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_the_service_is_a_notify_service_that_reloads_by_sighup():
    service = (UNITS / "twisted-mta.service").read_text().splitlines()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadWritePaths=/var/spool/twisted-mta",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"):
        assert line in service


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()


def received(receiver: socket.socket) -> list[str]:
    return receiver.recv(4096).decode().split("\n")


def test_ready_once_listening_reloading_and_stopping(tmp_path, notify_socket):
    daemon = make_daemon(tmp_path / "mta", users=USERS, aliases=ALIASES)
    daemon.start()
    try:
        ready = received(notify_socket)
        assert ready == ["READY=1", "STATUS=serving on 3 listener(s)"]
        with daemon.smtp() as client:
            assert client.noop()[0] == 250
        daemon.process.send_signal(signal.SIGHUP)
        assert received(notify_socket) == ["RELOADING=1"]
        assert received(notify_socket) == ["READY=1"]
        daemon.wait_for_log("reload: config .* re-read")
    finally:
        daemon.stop()
    assert received(notify_socket) == ["STOPPING=1", "STATUS=draining sessions"]
    assert daemon.process.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def greeting_of(port: int) -> bytes:
    """Connect (as soon as the port listens) and read the greeting."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                return connection.recv(1024)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_sockets_passed_by_socket_activation_are_served(tmp_path):
    assert SOCKET_ACTIVATE, "systemd-socket-activate is not installed (apt-get install systemd)"
    root = tmp_path / "mta"
    daemon = make_daemon(root, users=USERS, aliases=ALIASES)
    daemon.config.write_text(
        base_config(root).replace(
            'smtp = ["tcp:0:interface=127.0.0.1"]', 'smtp = ["systemd:domain=INET:name=smtp"]'
        )
    )
    port = free_port()
    launcher = (SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=smtp")
    # systemd-socket-activate starts the program at the first connection.
    first = threading.Thread(target=greeting_of, args=(port,), daemon=True)
    first.start()
    daemon.start(launcher=launcher)
    try:
        first.join(30)
        assert daemon.ports["smtp"] == port
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            assert client.mail("someone@example.org")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.data(b"Subject: activated\r\n\r\nhello\r\n")[0] == 250
        [message] = daemon.messages("example.test", "alice")
        assert message.endswith(b"Subject: activated\n\nhello\n")
    finally:
        daemon.stop()


def test_a_systemd_listener_without_its_socket_stops_the_start_in_one_line(tmp_path):
    root = tmp_path / "mta"
    daemon: Daemon = make_daemon(root, users=USERS, aliases=ALIASES)
    daemon.config.write_text(
        base_config(root).replace(
            'smtp = ["tcp:0:interface=127.0.0.1"]', 'smtp = ["systemd:domain=INET:name=smtp"]'
        )
    )
    checked = subprocess.run(
        [str(Path(TWISTD).with_name("twisted-mta")), "check-config", "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert 'smtp = ["systemd:domain=INET:name=smtp"]' in checked.stdout
    with pytest.raises(RuntimeError) as failed:
        daemon.start()
    assert (
        "twistd mta: cannot listen on systemd:domain=INET:name=smtp: no socket 'smtp'"
        " was passed by systemd (socket activation)" in str(failed.value)
    )
