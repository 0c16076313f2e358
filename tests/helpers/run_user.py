"""The unprivileged system account the privilege-drop tests run the daemon
as (``twistd --uid/--gid``), and other system accounts and groups such
tests need.  Making them needs root; the tests that use them skip without.
"""

from __future__ import annotations

import grp
import pwd
import shutil
import subprocess
import sys

import pytest

RUN_USER = "twisted-mta-test"


def run_user() -> pwd.struct_passwd:
    """The run user, made if missing; the test is skipped if it cannot run
    our code."""
    entry = system_account(RUN_USER)
    # The daemon imports modules after the drop, so the account must read
    # Python, the venv and the checkout, as on a real server.
    probe = subprocess.run(
        ["runuser", "-u", RUN_USER, "--", sys.executable, "-c", "import twisted_mta.service"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"{RUN_USER} cannot read the checkout or the venv: {probe.stderr.strip()[-200:]}"
        )
    return entry


def system_account(name: str, group: str | None = None) -> pwd.struct_passwd:
    """A system account without a home, made if missing: with ``group`` as
    its primary group, or a group of its own."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip("no useradd to make a system account")
    primary = ["--gid", group] if group else ["--user-group"]
    subprocess.run(
        ["useradd", "--system", *primary, "--no-create-home", "--shell", "/usr/sbin/nologin",
         name],
        check=True,
    )
    return pwd.getpwnam(name)


def system_group(name: str, members: tuple[str, ...] = ()) -> grp.struct_group:
    """A system group, made if missing, with ``members`` added to it."""
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
    for member in members:
        subprocess.run(["usermod", "--append", "--groups", name, member], check=True)
    return grp.getgrnam(name)


def drop_arguments(account: pwd.struct_passwd) -> tuple[str, ...]:
    """twistd's arguments to run as ``account`` and its primary group."""
    return ("--uid", account.pw_name, "--gid", grp.getgrgid(account.pw_gid).gr_name)
