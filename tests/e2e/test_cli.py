"""The twisted-mta command and the twistd plugin, as installed."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers.capture import TestCA
from twisted_mta.auth.passwords import hash_password

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args, cwd=None, env=None):
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_check_config_prints_effective_config():
    result = run("twisted-mta", "check-config", "--config", str(REPO / "etc" / "mta.toml"))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["hostname"] == "mx.example.test"
    assert effective["limits"]["max_message_size"] == 25 * 1024 * 1024
    assert effective["spool"] == str((REPO / "var").resolve())


def test_check_config_refuses_bad_config_in_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[limits]\nmax_recipients = "ten"\n')
    result = run("twisted-mta", "check-config", "--config", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert str(config) in line and "limits.max_recipients" in line


def test_check_config_refuses_a_haproxy_endpoint(tmp_path):
    config = tmp_path / "proxied.toml"
    config.write_text('[listen]\nsmtp = ["haproxy:tcp:0"]\n')
    result = run("twisted-mta", "check-config", "--config", str(config))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "listen.smtp" in line and "use [proxy] listeners" in line


USERS = (
    "alice@example.test:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n"
    "bob@example.test:{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuu5s2v8.iXieOjg/.AySBTTZIIVFJeBui\n"
    "# carol@example.test:{ARGON2ID}commented out\n"
    "carol@example.test:" + hash_password("cram-md5", "carol-pw") + "\n"
    "dave@example.test:{PLAIN}dave-pw\n"
    "erin@example.test:{SHA512-CRYPT}$6$salt$hash\n"
)


def check_users(tmp_path, mechanisms):
    (tmp_path / "users").write_text(USERS)
    config = tmp_path / "mta.toml"
    config.write_text(f'[users]\nfile = "users"\n[auth]\nmechanisms = {mechanisms}\n')
    return run("twisted-mta", "check-config", "--config", str(config))


def test_check_config_names_the_accounts_cram_md5_cannot_serve(tmp_path):
    result = check_users(tmp_path, '["PLAIN", "LOGIN", "CRAM-MD5"]')
    assert result.returncode == 0
    assert tomllib.loads(result.stdout)["auth"]["mechanisms"] == ["PLAIN", "LOGIN", "CRAM-MD5"]
    [line] = result.stderr.splitlines()
    assert line.startswith("twisted-mta: warning: ") and str(tmp_path / "users") in line
    assert line.endswith(": alice@example.test, bob@example.test, erin@example.test")


def test_check_config_warns_of_nothing_without_cram_md5(tmp_path):
    result = check_users(tmp_path, '["PLAIN", "LOGIN"]')
    assert result.returncode == 0
    assert tomllib.loads(result.stdout)["auth"]["mechanisms"] == ["PLAIN", "LOGIN"]
    assert result.stderr == ""


def test_twistd_refuses_bad_config_without_binding(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('hostname = "mx.example.test"\nbogus = 1\n')
    result = run("twistd", "-n", "--pidfile=", "mta", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "bogus" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "var").exists()


def test_twistd_lists_the_mta_plugin_and_its_options():
    result = run("twistd", "mta", "--help")
    assert result.returncode == 0
    assert "--config" in result.stdout and "--auth" in result.stdout


def test_plugin_found_from_any_directory(tmp_path):
    """The editable install keeps twisted/plugins/ visible to twistd."""
    result = run("twistd", "--help", cwd=tmp_path)
    assert re.search(r"^\s+mta\s+An ESMTP mail transfer agent", result.stdout, re.M)


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "tls")


def tls_config(tmp_path, certificate, key):
    config = tmp_path / "mta.toml"
    config.write_text(
        'hostname = "mx.example.test"\n[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
        'submission = []\nsubmissions = []\n'
        f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
    )
    return config


def test_check_config_accepts_a_chain_and_its_key(tmp_path, ca):
    pair = ca.issue("mx.example.test")
    chain = tmp_path / "fullchain.pem"
    chain.write_bytes(pair.certificate.read_bytes() + ca.path.read_bytes())
    result = run("twisted-mta", "check-config", "--config", str(tls_config(tmp_path, chain, pair.key)))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["tls"]["certificate"] == str(chain)


def test_check_config_and_twistd_refuse_a_key_of_another_certificate(tmp_path, ca):
    certificate, key = ca.issue("mx.example.test").certificate, ca.issue("other.example.test").key
    config = tls_config(tmp_path, certificate, key)
    result = run("twisted-mta", "check-config", "--config", str(config))
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert str(certificate) in line and str(key) in line
    daemon = run("twistd", "-n", "--pidfile=", "mta", "--config", str(config), cwd=tmp_path)
    assert daemon.returncode != 0
    output = daemon.stdout + daemon.stderr
    assert line.removeprefix("twisted-mta: ") in output
    assert "Traceback" not in output and "listening:" not in output


@pytest.mark.parametrize("broken", ["certificate", "key"])
def test_check_config_refuses_garbage_pem_in_one_line(tmp_path, ca, broken):
    pair = ca.issue("mx.example.test")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    certificate, key = (garbage, pair.key) if broken == "certificate" else (pair.certificate, garbage)
    result = run("twisted-mta", "check-config", "--config", str(tls_config(tmp_path, certificate, key)))
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"twisted-mta: {garbage}: cannot load ")
