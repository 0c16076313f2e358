"""Tests for twisted_mta.config: loading, defaults, checks and dumping."""

from __future__ import annotations

import grp
import ipaddress
import socket
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from twisted_mta.config import (
    Config,
    ConfigError,
    ConfigValueError,
    default_config,
    dump_config,
    find_config_path,
    load_config,
    parse_duration,
    parse_hostport,
    parse_size,
)

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fixed_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *args: "MX.Example.Test")


def write_config(folder: Path, text: str, name: str = "mta.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_text(folder: Path, text: str) -> Config:
    return load_config(write_config(folder, text), environ={})


def error_for(folder: Path, text: str) -> str:
    """The one-line message of loading *text*, without the file's name."""
    path = write_config(folder, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    return message.removeprefix(f"{path}: ")


# -- Finding the config -----------------------------------------------------


def test_no_path_no_environment_and_no_system_file_gives_defaults(tmp_path: Path) -> None:
    absent = tmp_path / "etc" / "mta.toml"
    assert find_config_path(None, {}, absent) is None
    assert load_config(None, environ={}, system=absent).source is None


def test_empty_environment_variable_gives_defaults(tmp_path: Path) -> None:
    assert find_config_path(None, {"TWISTED_MTA_CONFIG": ""}, tmp_path / "absent") is None


def test_the_system_file_is_used_when_it_exists(tmp_path: Path) -> None:
    system = write_config(tmp_path, 'hostname = "system.example.test"\n')
    assert find_config_path(None, {}, system) == system
    assert find_config_path(None, {"TWISTED_MTA_CONFIG": ""}, system) == system
    assert load_config(None, environ={}, system=system).hostname == "system.example.test"
    environ = {"TWISTED_MTA_CONFIG": str(tmp_path / "env.toml")}
    assert find_config_path(None, environ, system) == tmp_path / "env.toml"
    assert find_config_path("given.toml", {}, system) == Path.cwd() / "given.toml"


def test_environment_variable_names_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'hostname = "env.example.test"\n')
    environ = {"TWISTED_MTA_CONFIG": str(path)}
    assert find_config_path(None, environ) == path
    assert load_config(environ=environ).hostname == "env.example.test"


def test_explicit_path_beats_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'hostname = "file.example.test"\n')
    environ = {"TWISTED_MTA_CONFIG": str(tmp_path / "other.toml")}
    config = load_config(str(path), environ=environ)
    assert config.hostname == "file.example.test"
    assert config.source == path


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    assert find_config_path("mta.toml", {}) == tmp_path / "mta.toml"
    assert load_config("mta.toml", environ={}).spool == tmp_path / "var"


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value) == (
        f"{path}: (file): cannot read: No such file or directory"
    )


def test_syntax_error_is_one_line(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[limits\nmax_hops = 3\n")
    assert message.startswith("(syntax): ")
    assert "line 1" in message


def test_invalid_utf8_is_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError, match=r": \(syntax\): "):
        load_config(path, environ={})


# -- Defaults ---------------------------------------------------------------


def test_embedded_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = default_config()
    assert config.source is None
    assert config.hostname == "MX.Example.Test"
    assert config.spool == tmp_path / "var"
    assert config.listen.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert config.listen.submission == ("tcp:2587:interface=127.0.0.1",)
    assert config.listen.submissions == ("tcp:2465:interface=127.0.0.1",)
    assert (config.tls.certificate, config.tls.private_key) == (None, None)
    assert config.domains.local == ("localhost", "mx.example.test")
    assert config.domains.recipient_delimiter == "+"
    assert config.users.file is None
    assert config.aliases.file is None
    assert config.auth.mechanisms == ("PLAIN", "LOGIN")
    assert config.auth.require_tls is True
    assert config.auth.received_user is False


def test_embedded_relay_queue_and_limit_defaults() -> None:
    config = default_config()
    assert config.relay.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.relay.smarthost == ""
    assert config.relay.smarthost_tls == "starttls"
    assert config.relay.smarthost_user == ""
    assert config.relay.smarthost_password_file is None
    assert config.relay.ca_file is None
    assert config.relay.resolvers == ()
    assert config.relay.mx_port == 25
    relay = config.relay
    assert (relay.connect_timeout, relay.command_timeout, relay.data_timeout) == (30, 300, 600)
    assert (config.queue.retry_min, config.queue.retry_max) == (300, 3600)
    assert config.queue.lifetime == 5 * 86400
    assert config.queue.delay_warning == 0
    limits = config.limits
    assert limits.max_message_size == 25 * 1024 * 1024
    assert limits.max_recipients == 100
    assert limits.max_connections == 1000
    assert limits.max_connections_per_ip == 20
    assert limits.idle_timeout == 300
    assert limits.max_auth_failures == 3
    assert limits.max_auth_failures_per_ip == 10
    assert limits.max_hops == 50
    assert limits.max_errors == 10
    assert limits.max_junk_commands == 100
    assert (limits.stress_idle_timeout, limits.stress_max_junk_commands) == (10, 3)
    assert (config.proxy.listeners, config.proxy.trusted) == ((), ())


def test_default_local_domains_are_deduplicated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *args: "LocalHost")
    assert default_config().domains.local == ("localhost",)


def test_invalid_machine_name_falls_back_to_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *args: "bad_name.local")
    assert default_config().hostname == "localhost"


def test_spool_subdirectories(tmp_path: Path) -> None:
    config = load_text(tmp_path, 'spool = "/srv/mta"\n')
    assert config.queue_dir == Path("/srv/mta/queue")
    assert config.mail_dir == Path("/srv/mta/mail")
    assert config.tls_dir == Path("/srv/mta/tls")
    assert config.maildrop_dir == Path("/srv/mta/maildrop")


def test_empty_file_uses_defaults_relative_to_its_folder(
    tmp_path: Path,
) -> None:
    config = load_text(tmp_path, "")
    assert config.spool == tmp_path / "var"
    assert config.domains.local == ("localhost", "mx.example.test")
    assert config == replace(default_config(), spool=tmp_path / "var")


def test_local_domains_are_exactly_the_configured_ones(
    tmp_path: Path,
) -> None:
    text = '[domains]\nlocal = ["Example.TEST", "example.test", "b.test"]\n'
    config = load_text(tmp_path, text)
    assert config.domains.local == ("example.test", "b.test")
    assert load_text(tmp_path, "[domains]\nlocal = []\n").domains.local == ()


def test_absent_local_domains_follow_the_configured_hostname(
    tmp_path: Path,
) -> None:
    config = load_text(tmp_path, 'hostname = "Mail.Example.Test"\n')
    assert config.hostname == "Mail.Example.Test"
    assert config.domains.local == ("localhost", "mail.example.test")


# -- Durations and sizes ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("1.5h", 5400.0),
        ("5 M", 300.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, "queue.lifetime") == seconds


@pytest.mark.parametrize(
    "value", ["", "5x", "m", "-5m", "5m5s", True, [5], -1, float("inf")]
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match=r"^queue\.lifetime: expected "):
        parse_duration(value, "queue.lifetime")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1000, 1000),
        ("100", 100),
        ("100B", 100),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("25M", 25 * 1024**2),
        ("25MB", 25 * 1024**2),
        ("25MiB", 25 * 1024**2),
        ("1G", 1024**3),
        ("2T", 2 * 1024**4),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value, "limits.max_message_size") == size


@pytest.mark.parametrize(
    "value", ["", "M", "1.5M", "25X", "-1", 2.5, False, -1]
)
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ConfigValueError) as caught:
        parse_size(value, "limits.max_message_size")
    assert caught.value.key == "limits.max_message_size"
    assert caught.value.problem.startswith("expected ")


def test_durations_and_sizes_in_a_file(tmp_path: Path) -> None:
    text = (
        '[queue]\nretry_min = 60\nretry_max = "2h"\nlifetime = "3d"\n'
        'delay_warning = "4h"\n'
        '[limits]\nmax_message_size = "10M"\nidle_timeout = 90.5\n'
    )
    config = load_text(tmp_path, text)
    assert config.queue.retry_min == 60
    assert config.queue.retry_max == 7200
    assert config.queue.lifetime == 3 * 86400
    assert config.queue.delay_warning == 4 * 3600
    assert config.limits.max_message_size == 10 * 1024 * 1024
    assert config.limits.idle_timeout == 90.5


# -- Refused values: one line naming the file and the key ---------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_recipients = 'ten'\n",
         "limits.max_recipients: expected an integer, got 'ten'"),
        ("[limits]\nmax_recipients = true\n",
         "limits.max_recipients: expected an integer, got true"),
        ("[limits]\nmax_hops = 2.0\n",
         "limits.max_hops: expected an integer, got 2.0"),
        ("[limits]\nmax_connections = 0\n",
         "limits.max_connections: must be at least 1, got 0"),
        ("[limits]\nmax_connections_per_ip = -3\n",
         "limits.max_connections_per_ip: must be at least 1, got -3"),
        ("[limits]\nmax_auth_failures = 0\n",
         "limits.max_auth_failures: must be at least 1, got 0"),
        ("[limits]\nmax_errors = 0\n",
         "limits.max_errors: must be at least 1, got 0"),
        ("[limits]\nmax_junk_commands = 0\n",
         "limits.max_junk_commands: must be at least 1, got 0"),
        ("[limits]\nstress_idle_timeout = 0\n",
         "limits.stress_idle_timeout: expected a duration of more than 0, got 0"),
        ("[limits]\nmax_message_size = 0\n",
         "limits.max_message_size: expected a size of at least 1 byte,"
         " got 0"),
        ("[limits]\nmax_message_size = 'lots'\n",
         "limits.max_message_size: expected bytes or a size like \"25M\","
         " got 'lots'"),
        ("[limits]\nidle_timeout = 0\n",
         "limits.idle_timeout: expected a duration of more than 0, got 0"),
        ("[queue]\nlifetime = '0s'\n",
         "queue.lifetime: expected a duration of more than 0, got '0s'"),
        ("[queue]\nretry_min = -5\n",
         "queue.retry_min: expected a finite duration of 0 or more,"
         " got -5"),
        ("[queue]\ndelay_warning = 'soon'\n",
         "queue.delay_warning: expected seconds or a duration like \"5m\","
         " got 'soon'"),
        ("[queue]\nretry_min = '2h'\nretry_max = '1h'\n",
         "queue.retry_min: must not exceed queue.retry_max (3600s),"
         " got 7200s"),
        ("[auth]\nrequire_tls = 'yes'\n",
         "auth.require_tls: expected true or false, got 'yes'"),
        ("[auth]\nreceived_user = 1\n",
         "auth.received_user: expected true or false, got 1"),
        ("[auth]\nmechanisms = 'PLAIN'\n",
         "auth.mechanisms: expected a list of strings, got 'PLAIN'"),
        ("[auth]\nmechanisms = ['PLAIN', 'DIGEST-MD5']\n",
         "auth.mechanisms: expected PLAIN or LOGIN or CRAM-MD5,"
         " got 'DIGEST-MD5'"),
        ("hostname = 42\n", "hostname: expected a string, got 42"),
        ("hostname = 'bad_name.test'\n",
         "hostname: not a valid domain name: 'bad_name.test'"),
        ("hostname = '-mx.example.test'\n",
         "hostname: not a valid domain name: '-mx.example.test'"),
        ("hostname = 'mx..example.test'\n",
         "hostname: not a valid domain name: 'mx..example.test'"),
        ("hostname = ''\n", "hostname: not a valid domain name: ''"),
        ("[domains]\nlocal = ['example.test', 'ex ample.test']\n",
         "domains.local: not a valid domain name: 'ex ample.test'"),
        ("[domains]\nlocal = 'example.test'\n",
         "domains.local: expected a list of strings, got 'example.test'"),
        ("[domains]\nrecipient_delimiter = '+-'\n",
         "domains.recipient_delimiter: expected one character other than"
         " \"@\", or \"\", got '+-'"),
        ("[domains]\nrecipient_delimiter = '@'\n",
         "domains.recipient_delimiter: expected one character other than"
         " \"@\", or \"\", got '@'"),
        ("[relay]\nsmarthost_tls = 'tls'\n",
         "relay.smarthost_tls: expected starttls or implicit or none,"
         " got 'tls'"),
        ("[relay]\nmx_port = 0\n",
         "relay.mx_port: expected a port 1-65535, got 0"),
        ("[relay]\nmx_port = 65536\n",
         "relay.mx_port: expected a port 1-65535, got 65536"),
        ("[relay]\nmx_port = '25'\n",
         "relay.mx_port: expected an integer, got '25'"),
        ("[relay]\nconnect_timeout = 'soon'\n",
         "relay.connect_timeout: expected seconds or a duration like \"5m\","
         " got 'soon'"),
        ("[relay]\ncommand_timeout = 0\n",
         "relay.command_timeout: expected a duration of more than 0, got 0"),
        ("[relay]\ndata_timeout = '-1m'\n",
         "relay.data_timeout: expected seconds or a duration like \"5m\","
         " got '-1m'"),
        ("[relay]\ndata_timeout = -60\n",
         "relay.data_timeout: expected a finite duration of 0 or more, got -60"),
        ("[relay]\nnetworks = ['10.0.0.0/8', '10.0.0.0/33']\n",
         "relay.networks: not a network: '10.0.0.0/33'"),
        ("[relay]\nnetworks = ['example.test']\n",
         "relay.networks: not a network: 'example.test'"),
        ("[relay]\nsmarthost_user = false\n",
         "relay.smarthost_user: expected a string, got false"),
        ("[relay]\nresolvers = ['dns.example.test']\n",
         "relay.resolvers: bad resolver 'dns.example.test':"
         " not an IP address: 'dns.example.test'"),
        ("[relay]\nresolvers = ['192.0.2.1:0']\n",
         "relay.resolvers: bad resolver '192.0.2.1:0': bad port '0'"),
    ],
)
def test_refused_value(tmp_path: Path, text: str, message: str) -> None:
    assert error_for(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[relay]\nsmarthost = 'smtp.example.test:port'\n",
         "relay.smarthost: bad smart host 'smtp.example.test:port':"
         " bad port 'port'"),
        ("[relay]\nsmarthost = 'smtp.example.test:70000'\n",
         "relay.smarthost: bad smart host 'smtp.example.test:70000':"
         " bad port '70000'"),
        ("[relay]\nsmarthost = 'smtp_relay.example.test'\n",
         "relay.smarthost: bad smart host 'smtp_relay.example.test':"
         " bad host name"),
        ("[relay]\nsmarthost = '[smtp.example.test]:25'\n",
         "relay.smarthost: bad smart host '[smtp.example.test]:25':"
         " not an IP address: 'smtp.example.test'"),
        ("[relay]\nsmarthost = '[2001:db8::1]587'\n",
         "relay.smarthost: bad smart host '[2001:db8::1]587':"
         " expected [address]:port"),
        ("[relay]\nsmarthost = ':25'\n",
         "relay.smarthost: bad smart host ':25': bad host name"),
    ],
)
def test_refused_smarthost(tmp_path: Path, text: str, message: str) -> None:
    assert error_for(tmp_path, text) == message


@pytest.mark.parametrize(
    ("smarthost", "expected"),
    [
        ("smtp.example.test", ("smtp.example.test", 25)),
        ("smtp.example.test:587", ("smtp.example.test", 587)),
        ("192.0.2.7:465", ("192.0.2.7", 465)),
        ("[2001:db8::1]:587", ("2001:db8::1", 587)),
        ("[2001:db8::1]", ("2001:db8::1", 25)),
        ("2001:db8::1", ("2001:db8::1", 25)),
    ],
)
def test_accepted_smarthost(
    tmp_path: Path, smarthost: str, expected: tuple[str, int]
) -> None:
    config = load_text(tmp_path, f'[relay]\nsmarthost = "{smarthost}"\n')
    assert config.relay.smarthost == smarthost
    assert parse_hostport(smarthost, 25) == expected


def test_accepted_relay_values(tmp_path: Path) -> None:
    text = (
        "[relay]\n"
        'networks = ["192.0.2.1/24", "2001:db8::/32"]\n'
        'resolvers = ["192.0.2.53", "192.0.2.54:5353", "[::1]:53", "::1"]\n'
        'smarthost_tls = "Implicit"\n'
        "mx_port = 2525\n"
        "[auth]\n"
        'mechanisms = ["plain", "cram-md5", "PLAIN"]\n'
        "[domains]\n"
        'recipient_delimiter = ""\n'
    )
    config = load_text(tmp_path, text)
    assert config.relay.networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert config.relay.resolvers == (
        "192.0.2.53", "192.0.2.54:5353", "[::1]:53", "::1"
    )
    assert config.relay.smarthost_tls == "implicit"
    assert config.relay.mx_port == 2525
    assert config.auth.mechanisms == ("PLAIN", "CRAM-MD5")
    assert config.domains.recipient_delimiter == ""


# -- Unknown keys and tables --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hostnme = 'x'\n", "hostnme: unknown key"),
        ("[relays]\nsmarthost = ''\n", "relays: unknown table"),
        ("[limits]\nmax_recipents = 10\n",
         "limits.max_recipents: unknown key"),
        ("[queue]\n[queue.extra]\n", "queue.extra: unknown key"),
        ("listen = 'tcp:25'\n", "listen: expected a table, got 'tcp:25'"),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, message: str) -> None:
    assert error_for(tmp_path, text) == message


# -- Listeners ----------------------------------------------------------------


def test_listen_accepts_a_string_or_a_list(tmp_path: Path) -> None:
    text = (
        "[listen]\n"
        'smtp = "tcp:0:interface=127.0.0.1"\n'
        'submission = ["tcp:0", "tcp6:0:interface=\\\\:\\\\:1"]\n'
        "submissions = []\n"
    )
    listen = load_text(tmp_path, text).listen
    assert listen.smtp == ("tcp:0:interface=127.0.0.1",)
    assert listen.submission == ("tcp:0", "tcp6:0:interface=\\:\\:1")
    assert listen.submissions == ()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("'nonsense:25'", "bad endpoint 'nonsense:25': Unknown endpoint"),
        ("['tcp:smtp']", "bad endpoint 'tcp:smtp': invalid literal"),
        ("['tcp:25:bogus=1']", "bad endpoint 'tcp:25:bogus=1': "),
        ("['tcp:70000']", "bad endpoint 'tcp:70000': port 70000 out of"),
        ("['tcp']", "bad endpoint 'tcp': "),
        ("[25]", "expected a list of strings, got [25]"),
    ],
)
def test_bad_endpoint(tmp_path: Path, value: str, problem: str) -> None:
    message = error_for(tmp_path, f"[listen]\nsubmission = {value}\n")
    assert message.startswith(f"listen.submission: {problem}")


@pytest.mark.parametrize(
    ("smtp", "submission"),
    [
        ("tcp:2525", "tcp:2525"),
        ("tcp:2525:interface=127.0.0.1", "tcp:port=2525:interface=127.0.0.1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:127.0.0.1"),
        ("tcp:2525", "tcp:2525:interface=127.0.0.1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=0.0.0.0"),
        ("tcp6:2525", "tcp:2525"),
        ("tcp:2525", "tcp6:2525:interface=\\\\:\\\\:"),
        (
            "tcp6:2525:interface=\\\\:\\\\:1",
            "tcp6:2525:interface=0\\\\:\\\\:1",
        ),
        ("tcp:2525:interface=\\\\:\\\\:1", "tcp6:2525:interface=\\\\:\\\\:1"),
    ],
)
def test_duplicate_ports_are_refused(
    tmp_path: Path, smtp: str, submission: str
) -> None:
    text = f'[listen]\nsmtp = ["{smtp}"]\nsubmission = ["{submission}"]\n'
    smtp_value = tomllib.loads(text)["listen"]["smtp"][0]
    submission_value = tomllib.loads(text)["listen"]["submission"][0]
    assert error_for(tmp_path, text) == (
        f"listen.submission: {submission_value!r} uses port 2525 like"
        f" {smtp_value!r} in listen.smtp"
    )


def test_duplicate_within_one_list(tmp_path: Path) -> None:
    text = '[listen]\nsmtp = ["tcp:2525", "tcp:2525"]\n'
    assert error_for(tmp_path, text) == (
        "listen.smtp: 'tcp:2525' uses port 2525 like 'tcp:2525'"
        " in listen.smtp"
    )


@pytest.mark.parametrize(
    ("smtp", "submission"),
    [
        ("tcp:0", "tcp:0"),
        ("tcp:2525", "tcp:2526"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.2"),
        ("tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\\\:\\\\:1"),
        ("tcp:2525", "unix:/tmp/mta.socket"),
    ],
)
def test_distinct_listeners_are_accepted(
    tmp_path: Path, smtp: str, submission: str
) -> None:
    text = f'[listen]\nsmtp = ["{smtp}"]\nsubmission = ["{submission}"]\n'
    load_text(tmp_path, text)


# -- PROXY protocol -----------------------------------------------------------


def test_proxy_listeners_and_trusted_networks(tmp_path: Path) -> None:
    text = (
        "[proxy]\n"
        'listeners = ["submissions", "smtp", "smtp"]\n'
        'trusted = ["10.0.0.5/32", "2001:db8::1/64"]\n'
    )
    proxy = load_text(tmp_path, text).proxy
    assert proxy.listeners == ("submissions", "smtp")
    assert proxy.trusted == (
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("2001:db8::/64"),
    )


def test_trusted_proxies_without_proxy_listeners_are_accepted(
    tmp_path: Path,
) -> None:
    proxy = load_text(tmp_path, '[proxy]\ntrusted = ["10.0.0.5"]\n').proxy
    assert proxy.listeners == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[proxy]\nlisteners = ['smtp', 'lmtp']\ntrusted = ['10.0.0.5']\n",
         "proxy.listeners: expected smtp or submission or submissions,"
         " got 'lmtp'"),
        ("[proxy]\nlisteners = 'smtp'\ntrusted = ['10.0.0.5']\n",
         "proxy.listeners: expected a list of strings, got 'smtp'"),
        ("[proxy]\nlisteners = ['SMTP']\ntrusted = ['10.0.0.5']\n",
         "proxy.listeners: expected smtp or submission or submissions,"
         " got 'SMTP'"),
        ("[proxy]\nlisteners = ['smtp']\n",
         "proxy.trusted: must not be empty when proxy.listeners is set"),
        ("[proxy]\nlisteners = ['smtp']\ntrusted = []\n",
         "proxy.trusted: must not be empty when proxy.listeners is set"),
        ("[proxy]\nlisteners = ['smtp']\ntrusted = ['haproxy.example']\n",
         "proxy.trusted: not a network: 'haproxy.example'"),
        ("[proxy]\ntrusted = '10.0.0.5'\n",
         "proxy.trusted: expected a list of strings, got '10.0.0.5'"),
        ("[proxy]\nsend_proxy = true\n", "proxy.send_proxy: unknown key"),
    ],
)
def test_refused_proxy_value(tmp_path: Path, text: str, message: str) -> None:
    assert error_for(tmp_path, text) == message


@pytest.mark.parametrize("key", ["smtp", "submission", "submissions"])
@pytest.mark.parametrize(
    "endpoint",
    ["haproxy:tcp:0", "HAProxy:tcp:0:interface=127.0.0.1", "hap\\\\roxy:tcp:0"],
)
def test_haproxy_endpoints_are_refused(
    tmp_path: Path, key: str, endpoint: str
) -> None:
    """Twisted's haproxy: endpoint would take a header from any source."""
    text = f'[listen]\n{key} = ["tcp:0", "{endpoint}"]\n'
    value = tomllib.loads(text)["listen"][key][1]
    assert error_for(tmp_path, text) == (
        f"listen.{key}: bad endpoint {value!r}: haproxy: takes a PROXY header"
        " from any source; use [proxy] listeners and trusted instead"
    )


# -- Files --------------------------------------------------------------------


def test_relative_paths_follow_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("tls/cert.pem", "tls/key.pem", "users", "aliases",
                 "password", "ca.pem"):
        (tmp_path / name).write_text("x\n")
    text = (
        'spool = "spool/../state"\n'
        '[tls]\ncertificate = "tls/cert.pem"\nprivate_key = "tls/key.pem"\n'
        '[users]\nfile = "users"\n'
        f'[aliases]\nfile = "{tmp_path / "aliases"}"\n'
        '[relay]\nsmarthost_password_file = "password"\nca_file = "ca.pem"\n'
    )
    config = load_config(write_config(tmp_path, text), environ={})
    assert config.spool == tmp_path / "state"
    assert config.tls.certificate == tmp_path / "tls" / "cert.pem"
    assert config.tls.private_key == tmp_path / "tls" / "key.pem"
    assert config.users.file == tmp_path / "users"
    assert config.aliases.file == tmp_path / "aliases"
    assert config.relay.smarthost_password_file == tmp_path / "password"
    assert config.relay.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("users", "file"),
        ("aliases", "file"),
        ("relay", "smarthost_password_file"),
        ("relay", "ca_file"),
    ],
)
def test_unreadable_file_is_named(
    tmp_path: Path, table: str, key: str
) -> None:
    message = error_for(tmp_path, f'[{table}]\n{key} = "missing"\n')
    assert message == (
        f"{table}.{key}: cannot read {tmp_path / 'missing'}:"
        " No such file or directory"
    )


def test_directory_is_not_a_readable_file(tmp_path: Path) -> None:
    message = error_for(tmp_path, '[users]\nfile = "."\n')
    assert message == f"users.file: cannot read {tmp_path}: Is a directory"


def test_certificate_without_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x\n")
    message = error_for(tmp_path, '[tls]\ncertificate = "cert.pem"\n')
    assert message == "tls.private_key: missing, tls.certificate is set"


def test_key_without_certificate(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x\n")
    message = error_for(tmp_path, '[tls]\nprivate_key = "key.pem"\n')
    assert message == "tls.certificate: missing, tls.private_key is set"


def test_unreadable_certificate(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x\n")
    text = '[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'
    assert error_for(tmp_path, text) == (
        f"tls.certificate: cannot read {tmp_path / 'cert.pem'}:"
        " No such file or directory"
    )


def test_spool_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    message = error_for(tmp_path, 'spool = "file"\n')
    assert message == f"spool: not a directory: {tmp_path / 'file'}"
    assert error_for(tmp_path, 'spool = ""\n') == "spool: must not be empty"


# -- Dumping ------------------------------------------------------------------


def round_trip(config: Config, folder: Path) -> Config:
    text = dump_config(config)
    tomllib.loads(text)
    return load_config(write_config(folder, text, "dumped.toml"), environ={})


def test_dump_of_defaults_round_trips(tmp_path: Path) -> None:
    config = default_config()
    assert round_trip(config, tmp_path) == config


def test_dump_writes_every_key_in_plain_units(tmp_path: Path) -> None:
    data = tomllib.loads(dump_config(load_text(tmp_path, "")))
    assert data["spool"] == str(tmp_path / "var")
    assert data["queue"]["lifetime"] == 432000
    assert data["limits"]["max_message_size"] == 26214400
    assert data["relay"]["networks"] == ["127.0.0.0/8", "::1/128"]
    assert data["tls"] == {"certificate": "", "private_key": ""}


def test_dump_of_a_full_config_round_trips(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "users", "aliases", "pw", "ca"):
        (tmp_path / name).write_text("x\n")
    text = (
        'hostname = "mx.example.test"\nspool = "spool"\n'
        '[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
        'submission = ["tcp6:0:interface=\\\\:\\\\:1"]\nsubmissions = []\n'
        '[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'
        '[domains]\nlocal = ["example.test"]\nrecipient_delimiter = "-"\n'
        '[users]\nfile = "users"\n[aliases]\nfile = "aliases"\n'
        '[auth]\nmechanisms = ["LOGIN"]\nrequire_tls = false\n'
        "received_user = true\n"
        '[relay]\nnetworks = ["10.0.0.0/8"]\n'
        'smarthost = "[2001:db8::1]:587"\nsmarthost_tls = "implicit"\n'
        'smarthost_user = "us\\"er\\\\ \\u00e9\\t"\n'
        'smarthost_password_file = "pw"\nca_file = "ca"\n'
        'resolvers = ["192.0.2.53:5353"]\nmx_port = 2525\n'
        'connect_timeout = "10s"\ncommand_timeout = 90\ndata_timeout = "20m"\n'
        '[queue]\nretry_min = "1.5s"\nretry_max = "1h"\nlifetime = "2d"\n'
        'delay_warning = "4h"\n'
        '[limits]\nmax_message_size = "1G"\nmax_recipients = 5\n'
        "max_connections = 6\nmax_connections_per_ip = 7\n"
        'idle_timeout = "1m"\nmax_auth_failures = 8\nmax_hops = 9\n'
        "max_errors = 11\nmax_junk_commands = 12\n"
        'stress_idle_timeout = "13s"\nstress_max_junk_commands = 14\n'
        '[proxy]\nlisteners = ["smtp", "submissions"]\n'
        'trusted = ["10.0.0.5/32", "2001:db8::/64"]\n'
    )
    config = load_text(tmp_path, text)
    assert config.relay.smarthost_user == 'us"er\\ \u00e9\t'
    again = round_trip(config, tmp_path)
    assert again == config
    assert again.source == tmp_path / "dumped.toml"


# -- The example config in the repository -------------------------------------


def test_repository_example_config_loads() -> None:
    etc = REPOSITORY / "etc"
    config = load_config(etc / "mta.toml", environ={})
    assert config.spool == REPOSITORY / "var"
    assert config.users.file == etc / "users"
    assert config.aliases.file == etc / "aliases"
    assert config.domains.local == ("localhost", "example.test")
    assert config.listen.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert config.listen.submission == ("tcp:2587:interface=127.0.0.1",)
    assert config.listen.submissions == ("tcp:2465:interface=127.0.0.1",)


@pytest.mark.parametrize("name", ["users", "aliases"])
def test_repository_example_files_have_only_comments(name: str) -> None:
    text = (REPOSITORY / "etc" / name).read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert all(not line or line.startswith("#") for line in lines)


def test_files_are_not_opened_without_check_files(tmp_path: Path) -> None:
    text = (
        '[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'
        '[users]\nfile = "users"\n[aliases]\nfile = "aliases"\n'
    )
    path = write_config(tmp_path, text)
    config = load_config(path, environ={}, check_files=False)
    assert config.tls.certificate == tmp_path / "cert.pem"
    assert config.users.file == tmp_path / "users"
    with pytest.raises(ConfigError, match="tls.certificate: cannot read"):
        load_config(path, environ={})


def test_plugin_tables_are_kept_for_their_plugins(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text(
        '[plugins]\nenabled = ["dnsbl", "greylist"]\ntimeout = "2s"\n'
        '[plugins.dnsbl]\nzones = ["bl.example"]\non_error = "accept"\n'
    )
    config = load_config(path, {})
    assert config.plugins.enabled == ("dnsbl", "greylist")
    assert config.plugins.timeout == 2.0
    assert config.plugins.options == {"dnsbl": {"zones": ["bl.example"], "on_error": "accept"}}
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped, {}).plugins == config.plugins


@pytest.mark.parametrize(
    "text, problem",
    [
        ('[plugins]\nenabled = ["bad name"]\n', "plugins.enabled: expected plugin names"),
        ("[plugins]\nzones = 1\n", "plugins.zones: unknown key"),
        ("[limits.sub]\nx = 1\n", "limits.sub: unknown key"),
    ],
)
def test_plugin_settings_are_checked(tmp_path, text, problem):
    path = tmp_path / "mta.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path, {})
    assert problem in str(error.value)



def test_the_delivery_group_is_looked_up_when_the_config_is_read(tmp_path):
    name = grp.getgrgid(0).gr_name
    config = load_text(tmp_path, f'[delivery]\ngroup = "{name}"\n')
    assert (config.delivery.group.name, config.delivery.group.gid) == (name, 0)
    assert f'group = "{name}"' in dump_config(config).splitlines()
    assert load_text(tmp_path, "").delivery.group is None


def test_an_unknown_delivery_group_stops_the_start_naming_the_key(tmp_path):
    problem = error_for(tmp_path, '[delivery]\ngroup = "no-such-group-here"\n')
    assert problem == "delivery.group: no such group: 'no-such-group-here'"
