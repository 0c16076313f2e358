"""Worker processes (``[limits] workers = 2``): mail through both, the
limits and the AUTH throttle over both, a killed worker replaced with
nothing acknowledged lost, SIGHUP and SIGTERM for the whole group, relay
by the main process, the metrics of all."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import threading
import urllib.request
from itertools import count

import pytest

from tests.helpers.capture import Behaviour, CaptureServer
from tests.helpers.daemon import Daemon, eventually, fresh_client_address, queue_id
from tests.helpers.relay_fixtures import relay_config, submit, wait_attempt

WORKERS = "[limits]\nworkers = 2\n"
USERS = "alice@example.test:{PLAIN}alice-secret\n"
_SERVING = re.compile(r"worker (\d) serving: pid (\d+)")
_ACCEPTED_BY = re.compile(r"\[(worker-\d)\] id=\w+ from=")
_TOKENS = count()


def serving_pids(daemon: Daemon) -> dict[str, int]:
    """The pid serving as each worker, the latest one."""
    pids: dict[str, int] = {}
    for line in list(daemon.log):
        if match := _SERVING.search(line):
            pids[match.group(1)] = int(match.group(2))
    return pids


def message(token: str) -> bytes:
    return f"Subject: {token}\r\n\r\nbody of {token}\r\n".encode()


def send_local(daemon: Daemon, token: str) -> str:
    with daemon.smtp() as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.data(message(token))
    assert code == 250, (code, text)
    return queue_id(text)


def greeting(daemon: Daemon) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", daemon.ports["smtp"]), timeout=30)
    return sock, sock.makefile("rb").readline()


def test_mail_is_served_by_every_worker(start_mta):
    daemon = start_mta(users=USERS, extra=WORKERS)
    pids = serving_pids(daemon)
    assert sorted(pids) == ["1", "2"] and os.getpid() not in pids.values()
    assert daemon.process.pid not in pids.values()
    systems: set[str] = set()
    sent: list[str] = []
    lock = threading.Lock()

    def sender() -> None:
        for _ in range(10):
            token = f"both-{next(_TOKENS)}"
            send_local(daemon, token)
            with lock:
                sent.append(token)

    # Connections at once, so that both workers take some.
    for _ in range(5):
        threads = [threading.Thread(target=sender) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        systems = {m.group(1) for line in daemon.log if (m := _ACCEPTED_BY.search(line))}
        if len(systems) == 2:
            break
    assert systems == {"worker-1", "worker-2"}
    stored = b"".join(daemon.messages("example.test", "alice"))
    assert all(f"Subject: {token}\n".encode() in stored for token in sent)


def test_connections_per_client_are_limited_over_all_workers(start_mta):
    extra = WORKERS + "max_connections_per_ip = 2\n"
    daemon = start_mta(users=USERS, extra=extra)
    held = [greeting(daemon) for _ in range(2)]
    assert all(line.startswith(b"220 ") for _, line in held)
    # Whichever worker takes them, the client's third connection is refused.
    for _ in range(6):
        sock, line = greeting(daemon)
        sock.close()
        assert line.startswith(b"421 4.7.0"), line
    held[0][0].close()

    def slot_given_back() -> bool:
        sock, line = greeting(daemon)
        sock.close()
        return line.startswith(b"220 ")

    assert eventually(slot_given_back)


def test_auth_failures_count_over_all_workers(start_mta):
    extra = WORKERS + 'max_auth_failures_per_ip = 3\n[auth]\nfailure_delay = "0.01s"\n'
    daemon = start_mta(users=USERS, extra=extra)
    source = fresh_client_address()

    def login(password: str) -> int:
        """One AUTH PLAIN attempt on a connection of its own."""
        with daemon.smtp("submissions", source_address=(source, 0)) as client:
            client.ehlo("client.example.org")
            client.user, client.password = "alice@example.test", password
            try:
                return client.auth("PLAIN", client.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as error:
                return error.smtp_code

    # One failure a connection: the connections go to either worker.
    assert [login("wrong") for _ in range(3)] == [535, 535, 535]
    # Blocked wherever the next ones land, the right password too.
    assert [login("alice-secret") for _ in range(6)] == [454] * 6


def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(start_mta):
    daemon = start_mta(users=USERS, extra=WORKERS)
    victim, old_pid = "1", serving_pids(daemon)["1"]
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            token = f"kill-{next(_TOKENS)}"
            try:
                send_local(daemon, token)
            except (OSError, smtplib.SMTPException, AssertionError):
                continue  # cut by the kill: not acknowledged, the client retries
            with lock:
                acknowledged.append(token)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert daemon.wait_for(lambda: len(acknowledged) >= 20, 60)
        os.kill(old_pid, signal.SIGKILL)
        daemon.wait_for_log(rf"worker {victim} \(pid {old_pid}\) killed by signal 9")
        assert daemon.wait_for(lambda: serving_pids(daemon)[victim] != old_pid, 60)
        served = len(acknowledged)
        assert daemon.wait_for(lambda: len(acknowledged) >= served + 20, 60)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    stored = daemon.messages("example.test", "alice")
    subjects = [re.search(rb"Subject: (\S+)", each).group(1).decode() for each in stored]
    for token in acknowledged:
        assert subjects.count(token) == 1, token
    assert daemon.process.poll() is None


def test_sighup_reaches_every_worker(start_mta):
    daemon = start_mta(users=USERS, extra=WORKERS)

    def rcpt(recipient: str) -> int:
        with daemon.smtp() as client:
            client.ehlo("client.example.org")
            client.mail("sender@example.org")
            return client.rcpt(recipient)[0]

    assert rcpt("nobody@new.example") == 250  # relayed: 127.0.0.1 may relay
    text = daemon.config.read_text()
    daemon.config.write_text(
        text.replace('local = ["example.test"', 'local = ["new.example", "example.test"')
    )
    seen = len(daemon.log)
    daemon.process.send_signal(signal.SIGHUP)
    # Logged once every worker has re-read it too.
    assert daemon.wait_for(lambda: any("re-read" in line for line in daemon.log[seen:]))
    # Now a local domain, wherever the connections land.
    assert [rcpt("nobody@new.example") for _ in range(8)] == [550] * 8


def test_sigterm_drains_every_worker_and_exits_zero(start_mta):
    daemon = start_mta(users=USERS, extra=WORKERS)
    sock = socket.create_connection(("127.0.0.1", daemon.ports["smtp"]), timeout=30)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    for line in (b"EHLO client.example.org", b"MAIL FROM:<s@example.org>",
                 b"RCPT TO:<alice@example.test>", b"DATA"):
        sock.sendall(line + b"\r\n")
        reply = reader.readline()
        while reply[3:4] == b"-":
            reply = reader.readline()
        assert reply[:3] in (b"250", b"354")
    sock.sendall(b"Subject: drained\r\n\r\n")
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_log("SIGTERM: shutting down")
    sock.sendall(b"the end\r\n.\r\n")
    assert reader.readline().startswith(b"250 2.0.0 Ok: queued as ")
    assert reader.readline().startswith(b"421 4.3.2")
    assert daemon.process.wait(timeout=60) == 0
    for number in ("1", "2"):
        assert any(re.search(rf"worker {number} \(pid \d+\) exited with status 0$", line)
                   for line in daemon.log)
    [stored] = daemon.messages("example.test", "alice")
    assert b"Subject: drained" in stored


def test_a_message_queued_by_a_worker_is_relayed_by_the_main_process(start_mta):
    with CaptureServer(Behaviour(), host="127.0.0.1") as server:
        extra = relay_config(smarthost=f"{server.host}:{server.port}", smarthost_tls="none")
        daemon = start_mta(users=USERS, extra=extra + WORKERS)
        first = submit(daemon, "sender@example.org", ["far@remote.example"], message("relayed"))
        line = wait_attempt(daemon, first, "far@remote.example", "sent")
        # Tried at once, by the main process: its lines have no worker's name.
        assert "[worker-" not in line
        [session] = server.sessions
        assert session.transactions[0].recipients == ["far@remote.example"]


def test_metrics_count_the_connections_of_every_worker(start_mta):
    extra = WORKERS + '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
    daemon = start_mta(users=USERS, extra=extra)
    held = [greeting(daemon) for _ in range(4)]
    url = f"http://127.0.0.1:{daemon.ports['metrics']}/metrics"

    def sample(name: str, listener: str = "smtp") -> float:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        match = re.search(rf'^{name}{{listener="{listener}"}} (\S+)$', text, re.M)
        return float(match.group(1))

    assert eventually(lambda: sample("twisted_mta_connections_total") == 4)
    assert sample("twisted_mta_connections_open") == 4
    for sock, _ in held:
        sock.close()
    assert eventually(lambda: sample("twisted_mta_connections_open") == 0)
    with daemon.smtp("submission") as client:
        client.starttls()
    handshakes = "twisted_mta_tls_handshakes_total"
    assert eventually(lambda: sample(handshakes, "submission") == 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_listening_lines_name_the_bound_ports(start_mta, workers):
    daemon = start_mta(users=USERS, extra=f"[limits]\nworkers = {workers}\n")
    assert set(daemon.ports) == {"smtp", "submission", "submissions"}
    assert bool(serving_pids(daemon)) == (workers > 1)
