"""Where studies, raters, letter orders, votes and the pictures raters see are kept: one
SQLite file per workspace, the only file a rater's page reads or writes.

This module holds the schema and every SQL statement of studies; the rest of the package
speaks to it through :func:`reading` (a read transaction) and :func:`write` (a function run
in a write transaction), both of which hand out a :class:`StudyTables`.

Why SQLite and not DuckDB (which keeps runs, top-k and labels in ``neuroviz.duckdb``):
studies and votes are small rows written one at a time by many writers at once, the threads
of the Streamlit server (one per rater session) and other processes (``study results``,
``study export``, a second server). DuckDB is an analytic engine that lets one process hold
a file read-write and nobody else meanwhile: shared by opening the file per operation, a vote
took p50 1.8 s and p95 6.3 s with 20 rater threads, and 20 processes hit 441 lock errors
(p95 31 s); a long-lived DuckDB connection in the server would lock the command line out for
good. SQLite in WAL mode is made for this: any number of processes read while one writes,
readers never block the writer or each other, and writers queue for a short, bounded time.

How it is used:
- one long-lived connection per (process, thread, file), opened lazily; a connection
  inherited through ``fork`` is never touched again, and a file deleted and recreated (a
  wiped workspace) gets a fresh connection;
- ``synchronous=FULL``: a commit returns only after the WAL is on disk, so an acknowledged
  vote survives a crash, and every later read, from any process, sees it;
- writes run in ``BEGIN IMMEDIATE`` transactions, which take the one write lock before the
  first read: a read-then-write transaction that started deferred could find, in WAL mode,
  that another writer got in first and fail at once instead of waiting;
- threads of one process queue their writes and whoever's turn it is commits all queued
  ones in one transaction, each in its own savepoint (group commit: one disk flush for many
  raters, ~4 ms here, instead of one each); processes take turns on SQLite's write lock.
  Both waits are bounded by :func:`wait_seconds`; past it, :class:`StudiesBusyError` says
  to try again, without paths or process ids.

What is kept: studies and their items (labels captured at creation), raters (a display name
and the SHA-256 of their secret: a rater is found by the secret, never by the name), letter
orders, votes, ratings, and each item's pictures as JPEG bytes (``item_pictures``, frozen at
creation, see :mod:`.pictures`).

A workspace made before this file existed kept its studies in ``studies.duckdb``; the first
connection copies every table from there once (the old file is opened read-only and left in
place), in the same transaction that creates the schema. A file of an older schema version is
upgraded in place, step by step (``_UPGRADES``), also in one transaction. Keep the cache on a
local disk: WAL needs shared memory between the processes that open the file.

Issue 15.1 (acknowledged assignments and votes missing from the next read, a raw DuckDB
IOException) and 15.9 (441 lock errors, p95 31 s) were measured on the DuckDB storage; the
guarantees here are checked with 20 separate processes over three rounds in
tests/test_study_storage.py, every acknowledgement read back at once by another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import NeurovizError
from ..store import CacheLayout

T = TypeVar("T")

#: Bump when the schema changes; a file with a lower PRAGMA user_version is upgraded
#: (version 0, a new file: every table; older versions: the steps in ``_UPGRADES``).
SCHEMA_VERSION = 2

_TABLES = {
    "studies": """CREATE TABLE studies (
        study_id TEXT PRIMARY KEY, name TEXT, public_title TEXT, token TEXT UNIQUE,
        methods_json TEXT, raters_per_item INTEGER, n_images INTEGER, seed INTEGER,
        is_open INTEGER, config_json TEXT, created_at REAL)""",
    "study_items": """CREATE TABLE study_items (
        study_id TEXT, item_id INTEGER, run_key TEXT, model_spec TEXT, layer TEXT,
        neuron INTEGER, is_gold INTEGER, labels_json TEXT, label_keys_json TEXT,
        options_json TEXT, PRIMARY KEY (study_id, item_id))""",
    "raters": """CREATE TABLE raters (
        study_id TEXT, rater_id TEXT, name TEXT, created_at REAL, secret_hash TEXT,
        PRIMARY KEY (study_id, rater_id))""",
    "assignments": """CREATE TABLE assignments (
        study_id TEXT, rater_id TEXT, item_id INTEGER, order_json TEXT, assigned_at REAL,
        PRIMARY KEY (study_id, rater_id, item_id))""",
    "votes": """CREATE TABLE votes (
        study_id TEXT, rater_id TEXT, item_id INTEGER, choice_letter TEXT, choice_key TEXT,
        submitted_at REAL, PRIMARY KEY (study_id, rater_id, item_id))""",
    "ratings": """CREATE TABLE ratings (
        study_id TEXT, rater_id TEXT, item_id INTEGER, letter TEXT, option_key TEXT,
        rating INTEGER, PRIMARY KEY (study_id, rater_id, item_id, letter))""",
    "item_pictures": """CREATE TABLE item_pictures (
        study_id TEXT, item_id INTEGER, kind TEXT, image_ids_json TEXT, jpeg BLOB,
        PRIMARY KEY (study_id, item_id, kind))""",
}
#: A rater is found by the hash of their secret, never by name (several may share a name).
_SECRET_INDEX = "CREATE UNIQUE INDEX raters_by_secret ON raters (study_id, secret_hash)"
_INDEXES = (_SECRET_INDEX,)
#: version -> the statements that bring a file of that version to the next one.
_UPGRADES = {
    1: ("ALTER TABLE raters ADD COLUMN secret_hash TEXT", _TABLES["item_pictures"], _SECRET_INDEX,
        "DROP INDEX IF EXISTS raters_by_name"),
}
#: Children before parents, so a study is deleted bottom-up.
_DELETE_ORDER = ("item_pictures", "ratings", "votes", "assignments", "raters", "study_items", "studies")

_STUDY_COLUMNS = ("study_id, name, public_title, token, methods_json, raters_per_item, n_images, seed, is_open, "
                  "config_json, created_at")
_STUDY_SELECT = (f"SELECT {_STUDY_COLUMNS}, "
                 "(SELECT count(*) FROM study_items i WHERE i.study_id = s.study_id), "
                 "(SELECT count(*) FROM study_items i WHERE i.study_id = s.study_id AND i.is_gold) FROM studies s")


class StudiesBusyError(NeurovizError, RuntimeError):
    """The study store stayed busy (other writers) for longer than we were willing to wait."""


class StudiesMigrationError(NeurovizError, RuntimeError):
    """The studies of an older version could not be copied into the new study store."""


#: The file older versions kept studies in (DuckDB), next to the new one; read once, by the migration.
LEGACY_FILE = "studies.duckdb"


#: How long a write waits for its turn when the caller has no ``lock_timeout`` of its own
#: (the rating page opens only a workspace's layout, not its Store): what a rater may wait.
WRITE_WAIT_SECONDS = 10.0


def studies_path(store: CacheLayout) -> Path:
    """The SQLite file of a workspace's studies (the layout names every path)."""
    return store.studies_file()


def wait_seconds(store: CacheLayout) -> float:
    """The longest a read or write of the studies waits: the Store's lock_timeout, else WRITE_WAIT_SECONDS."""
    return float(getattr(store, "lock_timeout", WRITE_WAIT_SECONDS))


# -- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyRow:
    """A stored study, as the storage keeps it, with its item counts."""

    study_id: str
    name: str
    public_title: str
    token: str
    methods: tuple[str, ...]
    raters_per_item: int
    n_images: int
    seed: int
    is_open: bool
    config: dict
    created_at: float
    n_items: int
    n_gold: int


@dataclass(frozen=True)
class ItemRow:
    """A stored item: the neuron, each method's captured label and the options shown."""

    item_id: int
    run_key: str
    model_spec: str
    layer: str
    neuron: int
    is_gold: bool
    labels: dict[str, str]
    label_keys: dict[str, str]
    options: list[dict]


@dataclass(frozen=True)
class VoteRow:
    """One rater's answer to one item: the letter pressed and the option key behind it."""

    rater_id: str
    item_id: int
    letter: str
    choice_key: str
    submitted_at: float


@dataclass(frozen=True)
class Assignment:
    """An item shown to a rater: the option keys in the order of the letters, and when."""

    rater_id: str
    item_id: int
    order: list[str]
    assigned_at: float


def _study_row(row: Sequence[Any]) -> StudyRow:
    (study_id, name, public_title, token, methods_json, rpi, n_images, seed, is_open, config_json, created_at,
     n_items, n_gold) = row
    return StudyRow(study_id, name, public_title, token, tuple(json.loads(methods_json)), rpi, n_images, seed,
                    bool(is_open), json.loads(config_json or "{}"), created_at, n_items, n_gold or 0)


def _item_row(row: Sequence[Any]) -> ItemRow:
    item_id, run_key, model_spec, layer, neuron, is_gold, labels_json, keys_json, options_json = row
    return ItemRow(item_id, run_key, model_spec, layer, int(neuron), bool(is_gold), json.loads(labels_json),
                   json.loads(keys_json or "{}"), json.loads(options_json))


_ITEM_COLUMNS = "item_id, run_key, model_spec, layer, neuron, is_gold, labels_json, label_keys_json, options_json"


class StudyTables:
    """Every statement on studies, run on one connection inside one transaction."""

    def __init__(self, con: sqlite3.Connection):
        self._con = con

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        return self._con.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self._con.execute(sql, params).fetchall()

    # -- studies --------------------------------------------------------------------------
    def insert_study(self, study: StudyRow, items: Sequence[ItemRow]) -> None:
        """Store a new study and its items (the counts in ``study`` are derived, not stored)."""
        self._con.execute(
            f"INSERT INTO studies ({_STUDY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (study.study_id, study.name, study.public_title, study.token, json.dumps(list(study.methods)),
             study.raters_per_item, study.n_images, study.seed, int(study.is_open), json.dumps(study.config),
             study.created_at))
        self._con.executemany(
            f"INSERT INTO study_items (study_id, {_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(study.study_id, i.item_id, i.run_key, i.model_spec, i.layer, i.neuron, int(i.is_gold), json.dumps(i.labels),
              json.dumps(i.label_keys), json.dumps(i.options)) for i in items])

    def study(self, study_id: str) -> StudyRow | None:
        """One study, or None."""
        row = self._one(f"{_STUDY_SELECT} WHERE s.study_id = ?", (study_id,))
        return _study_row(row) if row else None

    def study_by_token(self, token: str) -> StudyRow | None:
        """The study behind a rater link token, or None."""
        row = self._one(f"{_STUDY_SELECT} WHERE s.token = ?", (token,))
        return _study_row(row) if row else None

    def studies(self) -> list[StudyRow]:
        """Every study, newest first."""
        return [_study_row(r) for r in self._all(f"{_STUDY_SELECT} ORDER BY s.created_at DESC", ())]

    def recent_study_ids(self, limit: int = 10) -> list[str]:
        """The ids of the newest studies, for error messages."""
        return [r[0] for r in self._all("SELECT study_id FROM studies ORDER BY created_at DESC LIMIT ?", (limit,))]

    def set_open(self, study_id: str, is_open: bool) -> None:
        """Open or close a study to votes."""
        self._con.execute("UPDATE studies SET is_open = ? WHERE study_id = ?", (int(is_open), study_id))

    def delete_study(self, study_id: str) -> None:
        """Remove a study and everything recorded for it."""
        for table in _DELETE_ORDER:
            self._con.execute(f"DELETE FROM {table} WHERE study_id = ?", (study_id,))

    # -- items ----------------------------------------------------------------------------
    def items(self, study_id: str) -> list[ItemRow]:
        """Every item of a study, by item id."""
        return [_item_row(r) for r in self._all(
            f"SELECT {_ITEM_COLUMNS} FROM study_items WHERE study_id = ? ORDER BY item_id", (study_id,))]

    def item(self, study_id: str, item_id: int) -> ItemRow | None:
        """One item, or None."""
        row = self._one(f"SELECT {_ITEM_COLUMNS} FROM study_items WHERE study_id = ? AND item_id = ?", (study_id, item_id))
        return _item_row(row) if row else None

    def item_kinds(self, study_id: str) -> list[tuple[int, bool]]:
        """(item id, is gold) of every item: what choosing the next item needs."""
        return [(i, bool(g)) for i, g in self._all("SELECT item_id, is_gold FROM study_items WHERE study_id = ?", (study_id,))]

    # -- raters ---------------------------------------------------------------------------
    def insert_rater(self, study_id: str, rater_id: str, name: str, secret_hash: str, created_at: float) -> None:
        """Register a rater, known from now on by the hash of their secret."""
        self._con.execute("INSERT INTO raters (study_id, rater_id, name, created_at, secret_hash) VALUES (?, ?, ?, ?, ?)",
                          (study_id, rater_id, name, created_at, secret_hash))

    def rater_by_secret(self, study_id: str, secret_hash: str) -> tuple[str, str] | None:
        """(rater id, name) of the rater holding this secret in this study, or None."""
        row = self._one("SELECT rater_id, name FROM raters WHERE study_id = ? AND secret_hash = ?", (study_id, secret_hash))
        return (row[0], row[1]) if row else None

    def rater_name(self, study_id: str, rater_id: str) -> str | None:
        """A rater's name, or None when the rater is not registered in the study."""
        row = self._one("SELECT name FROM raters WHERE study_id = ? AND rater_id = ?", (study_id, rater_id))
        return row[0] if row else None

    def raters(self, study_id: str) -> dict[str, str]:
        """rater id -> name, in order of registration."""
        return dict(self._all("SELECT rater_id, name FROM raters WHERE study_id = ? ORDER BY created_at, rowid", (study_id,)))

    # -- pictures -------------------------------------------------------------------------
    def insert_pictures(self, study_id: str, pictures: Sequence[tuple[int, str, list[str], bytes]]) -> None:
        """Store the pictures frozen for items: (item id, kind, image ids shown, JPEG bytes)."""
        self._con.executemany("INSERT OR IGNORE INTO item_pictures VALUES (?, ?, ?, ?, ?)",
                              [(study_id, item_id, kind, json.dumps(ids), sqlite3.Binary(jpeg))
                               for item_id, kind, ids, jpeg in pictures])

    def items_without_pictures(self, study_id: str) -> list[ItemRow]:
        """The items of a study that have no frozen picture (studies made before pictures were)."""
        return [_item_row(r) for r in self._all(
            f"SELECT {_ITEM_COLUMNS} FROM study_items i WHERE study_id = ? AND NOT EXISTS (SELECT 1 FROM item_pictures p "
            "WHERE p.study_id = i.study_id AND p.item_id = i.item_id) ORDER BY item_id", (study_id,))]

    def pictures(self, study_id: str, item_id: int) -> dict[str, tuple[bytes, list[str]]]:
        """kind -> (JPEG bytes, image ids shown) of one item's frozen pictures."""
        return {kind: (bytes(jpeg), json.loads(ids)) for kind, ids, jpeg in self._all(
            "SELECT kind, image_ids_json, jpeg FROM item_pictures WHERE study_id = ? AND item_id = ?", (study_id, item_id))}

    # -- assignments ----------------------------------------------------------------------
    def assignment(self, study_id: str, rater_id: str, item_id: int) -> Assignment | None:
        """The letter order a rater was shown for an item, or None if never shown."""
        row = self._one("SELECT order_json, assigned_at FROM assignments WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                        (study_id, rater_id, item_id))
        return Assignment(rater_id, item_id, json.loads(row[0]), row[1]) if row else None

    def insert_assignment(self, study_id: str, assignment: Assignment) -> None:
        """Record that an item was shown to a rater, with its letter order."""
        self._con.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                          (study_id, assignment.rater_id, assignment.item_id, json.dumps(assignment.order),
                           assignment.assigned_at))

    def first_unanswered(self, study_id: str, rater_id: str) -> int | None:
        """The item shown to a rater longest ago that they have not answered, or None."""
        row = self._one("SELECT a.item_id FROM assignments a WHERE a.study_id = ? AND a.rater_id = ? AND NOT EXISTS "
                        "(SELECT 1 FROM votes v WHERE v.study_id = a.study_id AND v.rater_id = a.rater_id "
                        "AND v.item_id = a.item_id) ORDER BY a.assigned_at, a.item_id LIMIT 1", (study_id, rater_id))
        return row[0] if row else None

    def others_on_items(self, study_id: str, rater_id: str, claimed_since: float) -> dict[int, int]:
        """item -> how many other raters answered it or were shown it since ``claimed_since``
        without answering yet: how close each item is to its raters_per_item."""
        return dict(self._all(
            "SELECT item_id, count(*) FROM ("
            " SELECT item_id FROM votes WHERE study_id = ? AND rater_id != ?"
            " UNION ALL"
            " SELECT a.item_id FROM assignments a WHERE a.study_id = ? AND a.rater_id != ? AND a.assigned_at > ?"
            " AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.study_id = a.study_id AND v.rater_id = a.rater_id"
            " AND v.item_id = a.item_id)"
            ") GROUP BY item_id", (study_id, rater_id, study_id, rater_id, claimed_since)))

    def assignments(self, study_id: str) -> list[Assignment]:
        """Every (rater, item) shown so far."""
        return [Assignment(r, i, json.loads(o), t) for r, i, o, t in self._all(
            "SELECT rater_id, item_id, order_json, assigned_at FROM assignments WHERE study_id = ?", (study_id,))]

    # -- votes and ratings ----------------------------------------------------------------
    def vote(self, study_id: str, rater_id: str, item_id: int) -> VoteRow | None:
        """A rater's answer to an item, or None."""
        row = self._one("SELECT choice_letter, choice_key, submitted_at FROM votes WHERE study_id = ? AND rater_id = ? "
                        "AND item_id = ?", (study_id, rater_id, item_id))
        return VoteRow(rater_id, item_id, *row) if row else None

    def votes(self, study_id: str) -> list[VoteRow]:
        """Every answer of a study, oldest first."""
        return [VoteRow(*r) for r in self._all(
            "SELECT rater_id, item_id, choice_letter, choice_key, submitted_at FROM votes WHERE study_id = ? "
            "ORDER BY submitted_at, rowid", (study_id,))]

    def answered_items(self, study_id: str, rater_id: str) -> set[int]:
        """The items a rater answered."""
        return {r[0] for r in self._all("SELECT item_id FROM votes WHERE study_id = ? AND rater_id = ?", (study_id, rater_id))}

    def count_votes(self, study_id: str, rater_id: str) -> int:
        """How many items a rater answered."""
        return int(self._one("SELECT count(*) FROM votes WHERE study_id = ? AND rater_id = ?", (study_id, rater_id))[0])

    def item_ratings(self, study_id: str, rater_id: str, item_id: int) -> dict[str, int]:
        """letter -> 1-5 rating a rater gave the options of one item."""
        return dict(self._all("SELECT letter, rating FROM ratings WHERE study_id = ? AND rater_id = ? AND item_id = ? "
                              "ORDER BY letter", (study_id, rater_id, item_id)))

    def ratings(self, study_id: str) -> dict[tuple[str, int], dict[str, tuple[str, int]]]:
        """(rater, item) -> letter -> (option key, rating), for every rated item of a study."""
        out: dict[tuple[str, int], dict[str, tuple[str, int]]] = {}
        for r, i, letter, key, value in self._all(
                "SELECT rater_id, item_id, letter, option_key, rating FROM ratings WHERE study_id = ?", (study_id,)):
            out.setdefault((r, i), {})[letter] = (key, value)
        return out

    def save_vote(self, study_id: str, vote: VoteRow, ratings: Sequence[tuple[str, str, int]]) -> bool:
        """Store an answer and its (letter, option key, rating)s, replacing any earlier one
        for the same (study, rater, item); True when it replaced one."""
        key = (study_id, vote.rater_id, vote.item_id)
        replaced = self._one("SELECT 1 FROM votes WHERE study_id = ? AND rater_id = ? AND item_id = ?", key) is not None
        self._con.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?, ?)",
                          (*key, vote.letter, vote.choice_key, vote.submitted_at))
        self._con.execute("DELETE FROM ratings WHERE study_id = ? AND rater_id = ? AND item_id = ?", key)
        self._con.executemany("INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?)",
                              [(*key, letter, option_key, value) for letter, option_key, value in ratings])
        return replaced


# -- connections ----------------------------------------------------------------------------
_local = threading.local()
#: Connections a child process inherited through fork: closing them there could disturb the
#: parent's locks, so they are kept referenced and never used or closed.
_inherited: list[sqlite3.Connection] = []


def _busy_error(timeout: float) -> StudiesBusyError:
    return StudiesBusyError(f"Many answers are being saved at this moment and the study store stayed busy for "
                            f"more than {timeout:g} s. Please try again in a moment; nothing was lost.")


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


@contextlib.contextmanager
def _busy_as_error(timeout: float) -> Iterator[None]:
    """Turn SQLite's 'database is locked/busy' into StudiesBusyError (nothing else)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise _busy_error(timeout) from None
        raise


def _open(path: Path, timeout: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; every transaction here is explicit.
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            _create_schema(con, path, timeout)
    except BaseException:
        con.close()
        raise
    return con


def _create_schema(con: sqlite3.Connection, path: Path, timeout: float) -> None:
    """Create the tables of a new file, or upgrade an older one step by step, in one transaction."""
    _begin_immediate(con, timeout)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it meanwhile
        if version == 0:
            for ddl in (*_TABLES.values(), *_INDEXES):
                con.execute(ddl)
            legacy = path.with_name(LEGACY_FILE)
            if legacy.exists():
                _copy_legacy(con, legacy)
        else:
            for step in range(version, SCHEMA_VERSION):
                for ddl in _UPGRADES[step]:
                    con.execute(ddl)
        if version < SCHEMA_VERSION:
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _copy_legacy(con: sqlite3.Connection, legacy: Path) -> None:
    """Copy every table of an older version's studies.duckdb (same tables and columns)."""
    import duckdb

    if legacy.stat().st_size == 0:  # created and never written: nothing to copy
        return
    try:
        old = duckdb.connect(str(legacy), read_only=True)
    except duckdb.Error as exc:
        reason = ("an older neuroviz process still has it open: stop it and try again" if "lock" in str(exc).lower()
                  else f"it is not a readable DuckDB file: move {LEGACY_FILE} out of the workspace to start without them")
        raise StudiesMigrationError(f"The studies of an older neuroviz version were not copied yet: {reason}.") from None
    try:
        present = {r[0] for r in old.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        for table in _TABLES:
            if table not in present:
                continue
            new_columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})").fetchall()]
            old_columns = {r[0] for r in old.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}
            columns = [c for c in new_columns if c in old_columns]
            rows = old.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
            con.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                            [tuple(int(v) if isinstance(v, bool) else v for v in row) for row in rows])
    finally:
        old.close()


def _connection(path: Path, timeout: float) -> sqlite3.Connection:
    """This thread's connection to ``path``, opened on first use and reopened when the file
    was replaced (a wiped workspace) or the process was forked."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _inherited.extend(con for con, _ in getattr(_local, "connections", {}).values())
        _local.pid, _local.connections = pid, {}
    cache: dict[tuple[str, float], tuple[sqlite3.Connection, tuple[int, int]]] = _local.connections
    key = (str(path), timeout)
    entry = cache.get(key)
    try:
        stat = os.stat(path)
        identity: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
    except FileNotFoundError:
        identity = None
    if entry is not None and entry[1] == identity:
        return entry[0]
    if entry is not None:
        entry[0].close()
        del cache[key]
    con = _open(path, timeout)
    stat = os.stat(path)
    cache[key] = (con, (stat.st_dev, stat.st_ino))
    return con


def _begin_immediate(con: sqlite3.Connection, timeout: float) -> None:
    """Take the file's one write lock, waiting up to ``timeout`` s for other processes.

    Polled here in short, jittered steps rather than by SQLite's busy handler, whose sleeps
    grow to 100 ms and let newcomers overtake long waiters (a 3 s tail with 20 processes).
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    con.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                con.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 0.004)
    finally:
        con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")


@contextlib.contextmanager
def reading(store: CacheLayout) -> Iterator[StudyTables]:
    """A read transaction: one consistent picture of the studies; never waits for writers."""
    timeout = wait_seconds(store)
    with _busy_as_error(timeout):
        con = _connection(studies_path(store), timeout)
        con.execute("BEGIN")
        try:
            yield StudyTables(con)
        finally:
            con.execute("COMMIT")


@dataclass
class _Job:
    """One caller's write, waiting for the transaction that commits it."""

    work: Callable[[StudyTables], Any]
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class _WriteQueue:
    """The writes of this process to one file. The thread holding ``turn`` commits every
    queued job in one transaction (group commit: one fsync for all the raters who submitted
    meanwhile), each job in a savepoint of its own so that one job's error undoes only it."""

    def __init__(self) -> None:
        self.turn = threading.Lock()
        self.guard = threading.Lock()
        self.pending: list[_Job] = []


_queues: dict[str, _WriteQueue] = {}
_queues_guard = threading.Lock()


def _queue(path: Path) -> _WriteQueue:
    with _queues_guard:
        return _queues.setdefault(str(path), _WriteQueue())


def _commit(path: Path, timeout: float, batch: list[_Job]) -> None:
    """Run ``batch`` in one write transaction; every job gets its result or its error."""
    committed = False
    try:
        with _busy_as_error(timeout):
            con = _connection(path, timeout)
            _begin_immediate(con, timeout)
            try:
                for job in batch:
                    con.execute("SAVEPOINT job")
                    try:
                        job.result = job.work(StudyTables(con))
                    except Exception as exc:  # this job's own error (a bad vote...): undo it alone
                        con.execute("ROLLBACK TO job")
                        job.error = exc
                    con.execute("RELEASE job")
                con.execute("COMMIT")
                committed = True
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
    except Exception as exc:  # nothing was committed: no job is acknowledged
        for job in batch:
            job.result, job.error = None, exc
    finally:
        for job in batch:
            if not committed and job.error is None:  # interrupted (KeyboardInterrupt, exit)
                job.error = StudiesBusyError("The answer was not saved: the server was interrupted. Please try again.")
            job.done = True


def write(store: CacheLayout, work: Callable[[StudyTables], T]) -> T:
    """Run ``work`` in a write transaction and return its result once it is committed:
    durable, and visible to every later read from any process. All or nothing.

    One writer at a time: threads of this process queue and are committed together,
    processes wait for the file's write lock; both waits are bounded by
    :func:`wait_seconds` (then StudiesBusyError). ``work`` may run in another thread of
    this process and must not call ``write`` itself.
    """
    path, timeout = studies_path(store), wait_seconds(store)
    queue = _queue(path)
    job = _Job(work)
    with queue.guard:
        queue.pending.append(job)
    if not queue.turn.acquire(timeout=timeout):
        with queue.guard:
            if job in queue.pending:  # nobody took it: give up cleanly
                queue.pending.remove(job)
                raise _busy_error(timeout)
        queue.turn.acquire()  # a committer is running it right now: wait for the outcome
    try:
        if not job.done:
            with queue.guard:
                batch, queue.pending = queue.pending, []
            _commit(path, timeout, batch)
    finally:
        queue.turn.release()
    if job.error is not None:
        raise job.error
    return job.result
