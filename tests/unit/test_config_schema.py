"""The config schema against etc/mta.toml and check-config: the example names
exactly the declared keys, each under a comment holding its doc, with its
default unless the comment says otherwise; check-config writes exactly the
declared keys.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from twisted_mta.config import Config
from twisted_mta.config.schema import Setting, sections, settings, subtables_field
from twisted_mta.config.values import ParseContext

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "mta.toml"
TWISTED_MTA = Path(sys.executable).parent / "twisted-mta"

_TABLE = re.compile(r"\[([a-z_]+)\]")
# A key set, or shown commented out: 'name = ...' or '# name = ...'.
_KEY = re.compile(r"#?\s*([a-z_]+)\s*=")

Key = tuple[str, str]  # (table, key); the table is "" at the top level


def declared() -> dict[Key, Setting]:
    """Every key the schema declares."""
    keys = {("", key): setting for key, setting in settings(Config).items()}
    for table, section in sections().items():
        for key, setting in settings(section).items():
            keys[table, key] = setting
    return keys


def dotted(key: Key) -> str:
    return ".".join(filter(None, key))


def normal(text: str) -> str:
    return " ".join(text.split())


def example_keys(text: str) -> dict[Key, str]:
    """Each key the example names, with the comment above it.

    The comment above a key is the one right above the run of key lines it
    is in, so keys documented together share it.
    """
    found: dict[Key, str] = {}
    table, comment, after_key = "", [], False
    for line in map(str.strip, text.splitlines()):
        if match := _TABLE.fullmatch(line):
            table, comment = match[1], []
        elif match := _KEY.match(line):
            found.setdefault((table, match[1]), normal(" ".join(comment)))
            after_key = True
            continue
        elif line.startswith("#"):
            comment = [] if after_key else comment
            comment.append(line.removeprefix("#"))
        else:
            comment = []
        after_key = False
    return found


def example_problems(text: str, keys: Mapping[Key, Setting]) -> list[str]:
    """How the example *text* and the declared *keys* disagree."""
    shown = example_keys(text)
    problems = [
        f"{dotted(key)}: declared but not in the example"
        for key in keys.keys() - shown.keys()
    ]
    problems += [
        f"{dotted(key)}: in the example but not declared"
        for key in shown.keys() - keys.keys()
    ]
    problems += [
        f"{dotted(key)}: doc {setting.doc!r} is not in the comment above it"
        for key, setting in keys.items()
        if key in shown and normal(setting.doc) not in shown[key]
    ]
    return sorted(problems)


def flatten(data: Mapping[str, Any]) -> dict[Key, Any]:
    """The values of parsed TOML by key."""
    values = {}
    for name, value in data.items():
        if isinstance(value, dict):
            values.update(((name, key), item) for key, item in value.items())
        else:
            values["", name] = value
    return values


# -- The schema ---------------------------------------------------------------


@pytest.mark.parametrize("section", [Config, *sections().values()])
def test_every_key_is_declared_with_a_one_line_doc(section: type) -> None:
    keys = settings(section)
    tables = sections() if section is Config else {}
    open_tables = subtables_field(section)
    for item in fields(section):
        assert item.name in (*keys, *tables, "source", open_tables)
    for setting in keys.values():
        assert setting.doc and "\n" not in setting.doc


# -- etc/mta.toml -------------------------------------------------------------


def test_example_names_and_documents_exactly_the_declared_keys() -> None:
    assert example_problems(EXAMPLE.read_text(), declared()) == []


def test_example_sets_the_defaults_unless_its_comment_says() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    comments = example_keys(text)
    context = ParseContext(EXAMPLE.parent, False, data["hostname"])
    keys = declared()
    for key, value in flatten(data).items():
        if "Default" in comments[key]:
            continue
        setting, name = keys[key], dotted(key)
        default = setting.default_value(context)
        assert setting.parse(value, name, context) == setting.parse(
            default, name, context
        ), name


def test_check_config_of_the_example_writes_exactly_the_declared_keys() -> None:
    result = subprocess.run(
        [TWISTED_MTA, "check-config", "--config", EXAMPLE],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert flatten(tomllib.loads(result.stdout)).keys() == declared().keys()


# -- The checks above can fail ------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("mx_port = 25\n", "",
         "relay.mx_port: declared but not in the example"),
        ("[queue]\n", "[queue]\nmx_port = 25\n",
         "queue.mx_port: in the example but not declared"),
        ("mx_port = 25\n", "mx_port = 25\n# not_a_key = 30\n",
         "relay.not_a_key: in the example but not declared"),
        ("# Port used on MX hosts.\n", "# The MX hosts' port.\n",
         "relay.mx_port: doc 'Port used on MX hosts.' is not in the comment"
         " above it"),
        ("# Port used on MX hosts.\n", "",
         "relay.mx_port: doc 'Port used on MX hosts.' is not in the comment"
         " above it"),
    ],
)
def test_a_changed_example_is_caught(old: str, new: str, problem: str) -> None:
    text = EXAMPLE.read_text()
    assert text.count(old) == 1
    assert problem in example_problems(text.replace(old, new), declared())


def test_a_key_declared_but_not_in_the_example_is_caught() -> None:
    keys = {**declared(), ("relay", "not_a_key"): Setting(30, int, "x")}
    assert example_problems(EXAMPLE.read_text(), keys) == [
        "relay.not_a_key: declared but not in the example"
    ]
