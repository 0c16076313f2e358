"""The Dovecot config the README shows is the file the end-to-end test runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_shows_etc_dovecot_dovecot_conf_whole():
    config = (ROOT / "etc" / "dovecot" / "dovecot.conf").read_text()
    assert f"```\n{config}```\n" in (ROOT / "README.md").read_text()
