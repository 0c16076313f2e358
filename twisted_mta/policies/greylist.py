"""Greylisting: refuse mail from an unknown client for a while, and take
it when the client tries again.

Why: most spam and malware is sent by programs that fire once and never
retry, while a real mail server keeps a temporary refusal in its queue and
tries again minutes later.  Refusing the first attempt of every new
(client network, sender, recipient) triplet with a ``450`` costs legitimate
mail a few minutes' delay, once, and stops much of the rest.  Networks
rather than addresses are remembered because large providers retry from
another host of the same pool; a network that retried correctly a few
times is passed at once afterwards, so that regular correspondents are not
delayed for each new address.

The triplets live in sqlite (``state_dir/greylist.sqlite3``), so a restart
forgets nothing.  sqlite calls block, so they run in one thread of their
own per database file; the reactor thread only waits for a Deferred.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from twisted_mta.durations import option_seconds
from twisted_mta.interfaces import (
    IMailPolicy,
    PolicyContext,
    SessionInfo,
    TransactionInfo,
    Verdict,
    address_in,
    client_address,
)
from twisted_mta.policies import BuiltinFactory

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DATABASE_NAME = "greylist.sqlite3"
# Expired rows are deleted at most this often: a full scan per message
# would cost more than the rows it saves.
CLEANUP_INTERVAL = 3600.0

# Bounce Address Tag Validation (RFC-draft "prvs=TAG=user@domain"): a new
# tag for every message would make every message a new triplet.
_BATV = re.compile(r"^prvs=[^=@]+=", re.IGNORECASE)
_NUMBER = re.compile(r"\b\d+\b")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    client TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client, sender, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    passes INTEGER NOT NULL,
    last_seen REAL NOT NULL
) WITHOUT ROWID;
"""


# -- Options -----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The checked ``[plugins.greylist]`` options; durations in seconds."""

    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    expire: float = 35 * 86400.0
    auto_allow: int = 5
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    normalise_senders: bool = True
    exempt_recipients: frozenset[str] = frozenset()
    exempt_networks: tuple[Network, ...] = ()


def parse_options(options: Mapping[str, Any]) -> Settings:
    """Settings from the plugin's options; ValueError names a bad one."""
    parsers: dict[str, Callable[[Any, str], Any]] = {
        "delay": _positive_duration,
        "retry_window": _positive_duration,
        "expire": _positive_duration,
        "auto_allow": lambda value, key: _integer(value, key, 0, None),
        "ipv4_prefix": lambda value, key: _integer(value, key, 0, 32),
        "ipv6_prefix": lambda value, key: _integer(value, key, 0, 128),
        "normalise_senders": _boolean,
        "exempt_recipients": _recipients,
        "exempt_networks": _networks,
    }
    unknown = sorted(set(options) - set(parsers))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(sorted(parsers))})")
    settings = Settings(**{key: parsers[key](value, key) for key, value in options.items()})
    if settings.delay >= settings.retry_window:
        raise ValueError("retry_window: must be longer than delay")
    return settings


def _positive_duration(value: Any, key: str) -> float:
    return option_seconds(value, key, positive=True)


def _integer(value: Any, key: str, low: int, high: int | None) -> int:
    in_range = isinstance(value, int) and value >= low and (high is None or value <= high)
    if isinstance(value, bool) or not in_range:
        bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise ValueError(f"{key}: expected a whole number {bounds}, not {value!r}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, not {value!r}")
    return value


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key}: expected a list of strings, not {value!r}")
    return value


def _recipients(value: Any, key: str) -> frozenset[str]:
    """Addresses and ``@domain``s, compared in lower case."""
    found = set()
    for item in _strings(value, key):
        local, at, domain = item.strip().lower().rpartition("@")
        if not at or not domain:
            raise ValueError(f"{key}: expected an address or an @domain, not {item!r}")
        found.add(f"{local}@{domain}")
    return frozenset(found)


def _networks(value: Any, key: str) -> tuple[Network, ...]:
    found = []
    for item in _strings(value, key):
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{key}: not a network: {item!r}") from None
    return tuple(found)


# -- Triplets ----------------------------------------------------------------


@dataclass(frozen=True)
class Triplet:
    """What greylisting remembers: who sends, from where, to whom."""

    client: str
    sender: str
    recipient: str


def client_network(text: str, settings: Settings) -> str:
    """The client's /24 (IPv4) or /64 (IPv6), or as configured: the key a
    provider's pool of outgoing servers shares."""
    address = client_address(text)
    if address is None:
        return text
    prefix = settings.ipv4_prefix if address.version == 4 else settings.ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def normal_sender(sender: str, settings: Settings) -> str:
    """The sender in lower case, ``<>`` for the null sender, and with
    ``normalise_senders`` the per-message parts of VERP and BATV senders
    taken out (a tag, ``+extension``, numbers), as postgrey does."""
    if not sender:
        return "<>"
    address = sender.lower()
    if not settings.normalise_senders:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    local = _BATV.sub("", local).split("+", 1)[0]
    return f"{_NUMBER.sub('#', local)}@{domain}"


# -- The database --------------------------------------------------------------


class Database:
    """The triplets and the counts of retries per client network, in
    sqlite.  Every method must be called from one thread at a time, the
    same one: the connection is made there, on first use, once the daemon
    runs with its own privileges."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._cleaned = -math.inf

    def check(self, triplet: Triplet, now: float, settings: Settings) -> float | None:
        """Record an attempt; the seconds the client must still wait, or
        None when its mail may pass."""
        connection = self._connect()
        with connection:
            if now - self._cleaned >= CLEANUP_INTERVAL:
                self._remove_expired(connection, now, settings)
                self._cleaned = now
            if self._auto_allowed(connection, triplet.client, now, settings):
                return None
            return self._check_triplet(connection, triplet, now, settings)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=10.0)
            connection.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL is safe against corruption; a
            # power cut may lose the last triplets, which costs one retry.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            self._connection = connection
        return self._connection

    @staticmethod
    def _auto_allowed(
        connection: sqlite3.Connection, client: str, now: float, settings: Settings
    ) -> bool:
        if not settings.auto_allow:
            return False
        row = connection.execute(
            "SELECT passes, last_seen FROM clients WHERE client = ?", (client,)
        ).fetchone()
        if row is None or row[0] < settings.auto_allow or now - row[1] > settings.expire:
            return False
        connection.execute("UPDATE clients SET last_seen = ? WHERE client = ?", (now, client))
        return True

    def _check_triplet(
        self, connection: sqlite3.Connection, triplet: Triplet, now: float, settings: Settings
    ) -> float | None:
        key = (triplet.client, triplet.sender, triplet.recipient)
        row = connection.execute(
            "SELECT first_seen, last_seen, passed FROM triplets"
            " WHERE client = ? AND sender = ? AND recipient = ?",
            key,
        ).fetchone()
        if row is None or _stale(row, now, settings):
            connection.execute(
                "INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now)
            )
            return settings.delay
        first_seen, _, passed = row
        waited = now - first_seen
        if not passed and waited < settings.delay:
            return settings.delay - waited
        connection.execute(
            "UPDATE triplets SET last_seen = ?, passed = 1"
            " WHERE client = ? AND sender = ? AND recipient = ?",
            (now, *key),
        )
        if not passed:
            self._count_retry(connection, triplet.client, now)
        return None

    @staticmethod
    def _count_retry(connection: sqlite3.Connection, client: str, now: float) -> None:
        connection.execute(
            "INSERT INTO clients VALUES (?, 1, ?) ON CONFLICT (client)"
            " DO UPDATE SET passes = passes + 1, last_seen = excluded.last_seen",
            (client, now),
        )

    @staticmethod
    def _remove_expired(connection: sqlite3.Connection, now: float, settings: Settings) -> None:
        connection.execute(
            "DELETE FROM triplets WHERE (passed AND last_seen < ?)"
            " OR (NOT passed AND first_seen < ?)",
            (now - settings.expire, now - settings.retry_window),
        )
        connection.execute("DELETE FROM clients WHERE last_seen < ?", (now - settings.expire,))


def _stale(row: tuple[float, float, int], now: float, settings: Settings) -> bool:
    """A triplet to start over: passed but unseen for ``expire``, or not
    retried within ``retry_window``."""
    first_seen, last_seen, passed = row
    if passed:
        return now - last_seen > settings.expire
    return now - first_seen > settings.retry_window


# -- The thread ----------------------------------------------------------------


class DatabaseThread:
    """One thread running one :class:`Database`'s calls in order, so that
    sqlite never blocks the reactor and its connection stays in the thread
    that made it.  Started on first use: threads made before twistd forks
    into the background would not survive it."""

    def __init__(self, reactor: Any, database: Database) -> None:
        self.reactor = reactor
        self.database = database
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"greylist {database.path}")

    def run(self, method: str, *args: Any) -> defer.Deferred:
        """Call the database's ``method`` in the thread; a Deferred of its result."""
        if not self._pool.started:
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self.reactor, self._pool, getattr(self.database, method), *args)

    def stop(self) -> None:
        """Close the connection after the calls queued, then end the thread."""
        self._pool.callInThread(self.database.close)
        self._pool.stop()


# A SIGHUP makes new policies: those on one file share its thread and its
# connection rather than add a thread per reload.
_threads: dict[Path, DatabaseThread] = {}


def database_thread(reactor: Any, path: Path) -> DatabaseThread:
    """The thread of the database at ``path``, made on first request."""
    if path not in _threads:
        _threads[path] = DatabaseThread(reactor, Database(path))
    return _threads[path]


# -- The policy ----------------------------------------------------------------


@implementer(IMailPolicy)
class Greylist:
    """Refuses each new triplet at RCPT with a 450 until it is retried
    after ``delay``; ``run(method, *args)`` calls the :class:`Database`
    (in its thread) and gives a Deferred of the result."""

    def __init__(
        self,
        settings: Settings,
        clock: Any,
        run: Callable[..., defer.Deferred],
        trusted_networks: Sequence[Network] = (),
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.run = run
        self.exempt_networks = (*trusted_networks, *settings.exempt_networks)

    def rcpt_to(
        self,
        session: SessionInfo,
        transaction: TransactionInfo,
        recipient: str,
        params: Mapping[str, str],
    ) -> defer.Deferred | None:
        if self.exempt(session, recipient):
            return None
        triplet = Triplet(
            client_network(session.client_ip, self.settings),
            normal_sender(transaction.sender, self.settings),
            recipient.lower(),
        )
        d = self.run("check", triplet, self.clock.seconds(), self.settings)
        d.addCallback(_verdict, recipient)
        return d

    def exempt(self, session: SessionInfo, recipient: str) -> bool:
        """Mail that is not greylisted: local, authenticated, from trusted
        or exempt networks, or to exempt recipients."""
        if session.listener == "local" or session.user:
            return True
        if address_in(session.client_ip, self.exempt_networks):
            return True
        exempt = self.settings.exempt_recipients
        lowered = recipient.lower()
        return lowered in exempt or "@" + lowered.rpartition("@")[2] in exempt


def _verdict(wait: float | None, recipient: str) -> Verdict | None:
    if wait is None:
        return None
    return Verdict.tempfail(
        450,
        "4.7.1",
        f"<{recipient}>: Recipient address rejected: Greylisted, "
        f"try again in {math.ceil(wait)} seconds",
    )


def make_policy(options: Mapping[str, Any], context: PolicyContext) -> Greylist:
    settings = parse_options(options)
    thread = database_thread(context.reactor, context.state_dir / DATABASE_NAME)
    return Greylist(settings, context.reactor, thread.run, context.trusted_networks)


factory = BuiltinFactory(
    "greylist",
    "Refuse mail from unknown client/sender/recipient triplets until retried",
    make_policy,
)