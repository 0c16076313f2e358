import grp
import os

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from tests.helpers.accounts import ALIASES, USERS
from tests.helpers.daemon import make_daemon


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


@pytest.fixture
def shareable_group() -> int:
    """A group this process may give its files, if possible not its own, so
    that the group has to be set rather than inherited."""
    if os.geteuid() == 0:
        return next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getegid())
    others = [gid for gid in os.getgroups() if gid != os.getegid()]
    return others[0] if others else os.getegid()


@pytest.fixture
def strict_umask():
    """The tightest umask a daemon might run with: modes must not depend on it."""
    old = os.umask(0o077)
    yield
    os.umask(old)
