"""Password schemes, the CRAM-MD5 context, SASL mechanisms, the users file."""

import hmac
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from twisted_mta.auth.checker import FirstMatch, UsersFileChecker
from twisted_mta.auth.cram import cram_context, hmac_md5_from_context, md5_resume
from twisted_mta.auth.mechanisms import CramMD5, Login, MalformedResponse, Plain
from twisted_mta.auth.passwords import StoredPassword, UnknownScheme, hash_password

RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"
# doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf (Dovecot 2.3)
DOVEADM_TANSTAAF = "d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"


def test_md5_resume_from_initial_state_is_md5():
    import hashlib

    initial = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
    for size in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000):
        data = os.urandom(size)
        assert md5_resume(initial, 0, data) == hashlib.md5(data).digest()


def test_cram_context_matches_doveadm_and_rfc2195():
    assert cram_context(b"tanstaaftanstaaf") == DOVEADM_TANSTAAF
    assert hmac_md5_from_context(DOVEADM_TANSTAAF, RFC2195_CHALLENGE) == RFC2195_DIGEST


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 200])
def test_hmac_from_context_equals_hmac_md5(size):
    key, message = os.urandom(size), os.urandom(3 * size + 1)
    expected = hmac.new(key, message, "md5").hexdigest()
    assert hmac_md5_from_context(cram_context(key), message) == expected


def test_cram_context_matches_installed_doveadm():
    doveadm = shutil.which("doveadm")
    if doveadm is None:
        pytest.skip("dovecot-core (doveadm) is not installed")
    password = "pässwörd with a key longer than one MD5 block ......................"
    line = subprocess.run(
        [doveadm, "pw", "-s", "CRAM-MD5", "-p", password], capture_output=True, text=True
    ).stdout.strip()
    assert line == "{CRAM-MD5}" + cram_context(password.encode())


@pytest.mark.parametrize("scheme", ["argon2id", "blf-crypt", "cram-md5", "plain"])
def test_every_scheme_verifies_only_the_right_password(scheme):
    stored = StoredPassword.parse(hash_password(scheme, "correct horse"))
    assert stored.verify(b"correct horse")
    assert not stored.verify(b"correct horsE")
    assert not stored.verify(b"")


def test_bcrypt_2y_and_2a_prefixes_accepted():
    field = hash_password("blf-crypt", "pw")
    body = field[len("{BLF-CRYPT}$2b$"):]
    for prefix in ("$2y$", "$2a$"):
        assert StoredPassword.parse("{BLF-CRYPT}" + prefix + body).verify(b"pw")


def test_unknown_or_missing_scheme_refused():
    with pytest.raises(UnknownScheme):
        StoredPassword.parse("{MD5-CRYPT}$1$abc")
    with pytest.raises(UnknownScheme):
        StoredPassword.parse("plaintext")


def test_corrupt_hashes_fail_closed():
    for field in ("{ARGON2ID}garbage", "{BLF-CRYPT}$2b$zz", "{CRAM-MD5}nothex"):
        assert not StoredPassword.parse(field).verify(b"x")


def test_plain_mechanism_authzid_rules():
    plain = Plain()
    plain.setResponse(b"\0alice@example.test\0pw")
    assert (plain.username, plain.password) == (b"alice@example.test", b"pw")
    same = Plain()
    same.setResponse(b"alice@example.test\0alice@example.test\0pw")
    assert same.username == b"alice@example.test"
    for bad in (b"bob\0alice\0pw", b"alice\0pw", b"\0\0pw", b"\0alice\0", b"a\0b\0c\0d", b"\0\xff\0pw"):
        with pytest.raises(MalformedResponse):
            Plain().setResponse(bad)


def test_login_mechanism_prompts():
    login = Login()
    assert login.getChallenge() == b"Username:"
    login.setResponse(b"alice@example.test")
    assert login.moreChallenges() and login.getChallenge() == b"Password:"
    login.setResponse(b"pw")
    assert not login.moreChallenges()
    assert login.checkPassword(b"pw") and not login.checkPassword(b"pW")


def test_cram_challenge_is_random_and_names_host():
    first, second = CramMD5("mx.example.test"), CramMD5("mx.example.test")
    assert first.challenge != second.challenge
    assert first.challenge.startswith(b"<") and first.challenge.endswith(b"@mx.example.test>")


def test_cram_response_checked_against_context_and_plaintext():
    cram = CramMD5("mx.example.test")
    digest = hmac.new(b"tanstaaftanstaaf", cram.challenge, "md5").hexdigest()
    cram.setResponse(b"tim " + digest.encode())
    assert cram.username == b"tim"
    assert cram.check_context(DOVEADM_TANSTAAF)
    assert cram.checkPassword(b"tanstaaftanstaaf")
    assert not cram.checkPassword(b"wrong")
    for bad in (b"nospace", b"tim " + b"z" * 32, b"tim abc", b" " + digest.encode()):
        with pytest.raises(MalformedResponse):
            CramMD5("h").setResponse(bad)


def _result(deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "checker answered asynchronously"
    return results[0]


def in_place(function, *args):
    """Stands in for deferToThread: the checks run at once."""
    return defer.maybeDeferred(function, *args)


def test_users_file_checker_plain_and_cram():
    users = {"alice@example.test": "{PLAIN}pw", "carol@example.test": "{CRAM-MD5}" + DOVEADM_TANSTAAF}
    checker = UsersFileChecker(lambda: users, in_place)
    assert _result(checker.requestAvatarId(UsernamePassword(b"Alice@Example.Test", b"pw"))) == b"alice@example.test"
    assert _result(checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"no"))).check(UnauthorizedLogin)
    cram = CramMD5("h")
    cram.setResponse(b"carol@example.test " + hmac.new(b"tanstaaftanstaaf", cram.challenge, "md5").hexdigest().encode())
    assert _result(checker.requestAvatarId(cram)) == b"carol@example.test"


def test_first_match_tries_each_checker():
    first = UsersFileChecker(lambda: {"a@x.test": "{PLAIN}one"}, in_place)
    second = UsersFileChecker(lambda: {"a@x.test": "{PLAIN}two"}, in_place)
    checker = FirstMatch([first, second])
    assert _result(checker.requestAvatarId(UsernamePassword(b"a@x.test", b"two"))) == b"a@x.test"
    assert _result(checker.requestAvatarId(UsernamePassword(b"a@x.test", b"three"))).check(UnauthorizedLogin)


def _passwd(config, *args, stdin="secret\n"):
    command = [str(Path(sys.executable).with_name("twisted-mta")), "passwd", *args, "--config", str(config), "--stdin"]
    return subprocess.run(command, input=stdin, capture_output=True, text=True)


def test_passwd_adds_and_replaces_keeping_other_lines(tmp_path):
    config = tmp_path / "mta.toml"
    config.write_text('[users]\nfile = "users"\n')
    users = tmp_path / "users"
    users.write_text("# accounts\nbob@example.test:{PLAIN}bob # a note\n\n")
    result = _passwd(config, "alice@example.test", "--scheme", "plain", stdin="first\n")
    assert result.returncode == 0 and "first" not in result.stdout + result.stderr
    result = _passwd(config, "Alice@example.test", "--scheme", "cram-md5", stdin="second\n")
    assert result.returncode == 0 and "second" not in result.stdout + result.stderr
    lines = users.read_text().splitlines()
    assert lines[:3] == ["# accounts", "bob@example.test:{PLAIN}bob # a note", ""]
    assert lines[3:] == ["Alice@example.test:{CRAM-MD5}" + cram_context(b"second")]


def test_passwd_creates_file_mode_0600_with_argon2_default(tmp_path):
    config = tmp_path / "mta.toml"
    config.write_text('[users]\nfile = "users"\n')
    assert _passwd(config, "dave@example.test").returncode == 0
    users = tmp_path / "users"
    assert users.stat().st_mode & 0o777 == 0o600
    [line] = users.read_text().splitlines()
    assert line.startswith("dave@example.test:{ARGON2ID}$argon2id$")
    assert StoredPassword.parse(line.split(":", 1)[1]).verify(b"secret")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_passwd_as_root_keeps_the_owner_and_mode_of_the_file(tmp_path):
    config = tmp_path / "mta.toml"
    config.write_text('[users]\nfile = "users"\n')
    users = tmp_path / "users"
    users.write_text("bob@example.test:{PLAIN}bob\n")
    os.chown(users, 65534, 65534)
    users.chmod(0o640)
    assert _passwd(config, "alice@example.test", "--scheme", "plain").returncode == 0
    info = users.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o640)
    assert "alice@example.test:{PLAIN}secret" in users.read_text()


def test_passwd_refuses_bad_input(tmp_path):
    config = tmp_path / "mta.toml"
    config.write_text('[users]\nfile = "users"\n')
    assert _passwd(config, "no-at-sign").returncode == 1
    assert _passwd(config, "a@example.test", stdin="\n").returncode == 1
    assert _passwd(config, "a@example.test", "--scheme", "plain", stdin="a:b\n").returncode == 1
    assert not (tmp_path / "users").exists()


class CountedVerify:
    """Counts StoredPassword.verify calls by scheme."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        real = StoredPassword.verify

        def verify(stored, password):
            self.calls.append(stored.scheme)
            return real(stored, password)

        monkeypatch.setattr(StoredPassword, "verify", verify)


def _cheap_bcrypt(password: bytes) -> str:
    return "{BLF-CRYPT}" + bcrypt.hashpw(password, bcrypt.gensalt(rounds=4)).decode("ascii")


@pytest.mark.parametrize("login,password,expected", [
    ("nobody@x.test", b"pw", ["BLF-CRYPT"]),
    ("plain@x.test", b"pw", ["BLF-CRYPT", "PLAIN"]),
    ("cram@x.test", b"pw", ["BLF-CRYPT", "CRAM-MD5"]),
    ("slow@x.test", b"pw", ["BLF-CRYPT"]),
])
def test_every_check_costs_the_slowest_hash_once(monkeypatch, login, password, expected):
    users = {
        "plain@x.test": "{PLAIN}secret",
        "cram@x.test": hash_password("cram-md5", "secret"),
        "slow@x.test": _cheap_bcrypt(b"secret"),
    }
    counted = CountedVerify(monkeypatch)
    checker = FirstMatch([UsersFileChecker(lambda: users, in_place)])
    assert _result(checker.requestAvatarId(UsernamePassword(login.encode(), password))).check(UnauthorizedLogin)
    assert counted.calls == expected


def test_the_padding_is_the_slowest_kind_of_hash(monkeypatch):
    users = {
        "fast@x.test": _cheap_bcrypt(b"a"),
        "slow@x.test": "{BLF-CRYPT}" + bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=8)).decode(),
    }
    checker = UsersFileChecker(lambda: users, in_place)
    seen: list[str] = []
    real = StoredPassword.verify
    monkeypatch.setattr(StoredPassword, "verify", lambda s, p: seen.append(s.data[:7]) or real(s, p))
    _result(checker.requestAvatarId(UsernamePassword(b"nobody@x.test", b"x")))
    assert seen[-1] == "$2b$08$"


def str_keyed(users: dict[str, str]) -> InMemoryUsernamePasswordDatabaseDontUse:
    """Like strcred's "memory" checker: str names and passwords."""
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = dict(users)
    return checker


def test_strcred_checkers_are_asked_in_both_forms_ours_once():
    memory = str_keyed({"eve@x.test": "eve-pw"})
    ours = UsersFileChecker(lambda: {"a@x.test": "{PLAIN}pw"}, in_place)
    checker = FirstMatch([ours, memory])
    assert _result(checker.requestAvatarId(UsernamePassword(b"eve@x.test", b"eve-pw"))) == "eve@x.test"


def test_invalid_utf8_never_matches_a_stored_replacement_character():
    ours = UsersFileChecker(lambda: {"a@x.test": "{PLAIN}p\ufffdss"}, in_place)
    memory = str_keyed({"b@x.test": "p\ufffdss"})
    checker = FirstMatch([ours, memory])
    for login in ("a@x.test", "b@x.test"):
        wrong = _result(checker.requestAvatarId(UsernamePassword(login.encode(), b"p\xffss")))
        assert wrong.check(UnauthorizedLogin), login
        right = _result(checker.requestAvatarId(UsernamePassword(login.encode(), "p\ufffdss".encode())))
        assert right in (login, login.encode())
