"""A mail system assembled from a config file, as the daemon assembles it.

Unit tests that need the intake (the directory, the spool, the realm and
its portal) get it from :func:`twisted_mta.front.build_intake`, the
function the daemon uses, so they test what runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from twisted_mta.config import load_config
from twisted_mta.front import Intake, build_intake
from twisted_mta.intake.spool import Spool
from twisted_mta.storage.committer import Committer

HOSTNAME = "mx.example.test"


@contextlib.contextmanager
def assembled(
    root: Path,
    reactor,
    *,
    users: str,
    aliases: str = "",
    relay_networks: str = "[]",
    hostname: str = HOSTNAME,
) -> Iterator[Intake]:
    """The intake of a config for ``example.test`` in ``root``, with its
    spool prepared; the committer reports through ``reactor``."""
    (root / "users").write_text(users)
    (root / "aliases").write_text(aliases)
    config_file = root / "mta.toml"
    config_file.write_text(
        f'hostname = "{hostname}"\nspool = "."\n'
        '[domains]\nlocal = ["example.test"]\n'
        '[users]\nfile = "users"\n[aliases]\nfile = "aliases"\n'
        f"[relay]\nnetworks = {relay_networks}\n"
    )
    config = load_config(config_file, {})
    committer = Committer(reactor)
    spool = Spool(config.mail_dir, config.queue_dir, committer)
    spool.prepare()
    try:
        yield build_intake(config, spool)
    finally:
        committer.stop()
