import sys
from pathlib import Path

import pytest
from twisted.logger import formatEvent, globalLogPublisher

sys.path.insert(0, str(Path(__file__).parent))

from daemon import make_daemon  # noqa: E402

USERS = """\
alice@example.test:{PLAIN}alice-secret
bob@example.test:{PLAIN}bob-secret
"""

ALIASES = """\
info@example.test: alice@example.test, bob@example.test
sales: bob@example.test
both@example.test: alice@example.test, friend@remote.example
loop1@example.test: loop2@example.test
loop2@example.test: loop1@example.test
"""


@pytest.fixture(scope="module")
def mta(tmp_path_factory):
    """A daemon shared by a test module: users alice and bob, some aliases."""
    daemon = make_daemon(tmp_path_factory.mktemp("mta"), users=USERS, aliases=ALIASES)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def start_mta(tmp_path):
    """Start daemons with a custom config; all are stopped after the test."""
    started = []

    def start(**kwargs):
        daemon = make_daemon(tmp_path / f"mta{len(started)}", **kwargs)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def logged():
    """The text of every event logged during the test, through
    twisted.python.log or twisted.logger."""
    lines: list[str] = []

    def observe(event) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)
