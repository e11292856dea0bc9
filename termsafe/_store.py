"""The durable store: checkpoints, idempotency records, compensations, runs and
the crash-cleanup journal.

``Store`` is the interface; ``SQLiteStore`` the default implementation (SQLite
in WAL mode under ``TERMSAFE_HOME``, default ``./.termsafe``). Nothing outside
this module writes SQL, so another backend (PostgreSQL for many hosts) can be
added without touching callers.

Durability: writes that record a fact the outside world depends on (an
idempotency result, a checkpoint, a run's final state) commit with
``synchronous=FULL``. Journal entries (temp files and child pids a crash
would leave behind) commit with ``synchronous=NORMAL``: in WAL mode they
survive the process being SIGKILLed, which is the crash they exist for, and
they do not add an fsync to every atomic write.

Schema changes are numbered migrations, each applied in one transaction
together with the version bump, so a crash mid-migration leaves the old
schema intact.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, Protocol, runtime_checkable

import attrs

from ._exceptions import (
    ConfigurationError,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InvalidArgumentType,
    LeaseLost,
    OutcomeUnknown,
    StoreCorrupt,
)
from ._procs import Identity, current_identity, identity_alive
from ._validate import validate_seconds

__all__ = [
    "APPLICATION_ID",
    "Claim",
    "Compensation",
    "IdempotencyRecord",
    "JournalEntry",
    "Run",
    "SQLiteStore",
    "Store",
    "default_home",
    "open_default_store",
]

#: ``PRAGMA application_id`` of a termsafe store ("TSAF"): tells our file from a foreign one.
APPLICATION_ID: Final = 0x54534146
MAX_KEY_LENGTH: Final = 255
SQLITE_MAGIC: Final = b"SQLite format 3\x00"

#: How many recorded (``done``) idempotency keys a store object keeps in memory.
#: A ``done`` record never changes; only ``idem_prune`` deletes it, and a prune
#: through this object forgets them all. A prune by another store object or
#: process is not seen here: a key this object replayed keeps replaying (it
#: never runs twice) until it falls out of these, oldest first.
DONE_CACHE_SIZE: Final = 4096

JournalKind = Literal["temp_file", "temp_dir", "child_process", "git_lock", "lock"]
JOURNAL_KINDS: Final = ("child_process", "git_lock", "lock", "temp_dir", "temp_file")


def default_home() -> Path:
    """``$TERMSAFE_HOME``, or ``./.termsafe``."""
    return Path(os.environ.get("TERMSAFE_HOME") or ".termsafe")


@attrs.frozen
class JournalEntry:
    """Something a crash would leave behind, recorded before it exists.

    Attributes:
        id: The entry's id.
        kind: ``temp_file``, ``temp_dir``, ``child_process``, ``git_lock`` or ``lock``.
        payload: What recovery needs (a path; a pid and its start time; ...).
        owner: The process that made the entry.
        workflow_id: The workflow it belongs to, if any.
        created_at: Wall-clock time of the entry.
    """

    id: int
    kind: str
    payload: dict[str, Any]
    owner: Identity
    workflow_id: str | None
    created_at: float


class Claim(NamedTuple):
    """The outcome of claiming an idempotency key.

    Attributes:
        key: The key.
        replay: ``True`` when the call already succeeded: ``result`` is its result.
        result: The recorded result (replays only).
        epoch: The fencing epoch of this claim (first runs and retries).
        retried: ``True`` when this claim took over from a run that died.
    """

    key: str
    replay: bool
    result: Any
    epoch: int
    retried: bool = False


@attrs.frozen
class Compensation:
    """A compensating action recorded for an idempotent call.

    Attributes:
        id: The compensation's id.
        key: The idempotency key it compensates.
        name: A name for the action (the callable's name).
        payload: JSON data the action needs.
        status: ``pending``, ``running``, ``done`` or ``failed``.
    """

    id: int
    key: str
    name: str
    payload: Any
    status: str


@attrs.frozen
class IdempotencyRecord:
    """What the store knows about one idempotency key.

    Attributes:
        key: The key.
        status: ``in_flight``, ``done``, ``released`` or ``unknown``.
        epoch: The fencing epoch of the latest claim.
        owner: The process that made the latest claim.
        lease_expires: Wall-clock time the latest claim's lease runs out.
        sent: Whether the latest claim's side effect may have started.
        result: The recorded result (``done`` only).
        created_at: Wall-clock time of the first claim.
        updated_at: Wall-clock time of the last change.
    """

    key: str
    status: str
    epoch: int
    owner: Identity
    lease_expires: float
    sent: bool
    result: Any
    created_at: float
    updated_at: float


@attrs.frozen
class Run:
    """A workflow run registered across processes.

    Attributes:
        run_id: Unique id of this run.
        workflow_id: The workflow's id.
        owner: The owner's principal id.
        team: The team.
        state: The last recorded state.
        process: The process hosting the run.
        started_at: Wall-clock start.
        ended_at: Wall-clock end, if it ended.
        info: Extra JSON data (control socket path, command, ...).
    """

    run_id: str
    workflow_id: str
    owner: str | None
    team: str | None
    state: str
    process: Identity
    started_at: float
    ended_at: float | None
    info: dict[str, Any]


@runtime_checkable
class Store(Protocol):
    """What termsafe needs from a durable store. Every method is thread-safe."""

    def save_checkpoint(self, workflow_id: str, state: Any) -> None:
        """Record ``state`` (JSON data) as the workflow's last checkpoint."""

    def load_checkpoint(self, workflow_id: str) -> Any:
        """The workflow's last checkpoint, or ``None``."""

    def journal_add(
        self, kind: JournalKind, payload: dict[str, Any], workflow_id: str | None = None
    ) -> int:
        """Record something a crash would leave behind; return the entry id."""

    def journal_update(self, entry_id: int, payload: dict[str, Any]) -> None:
        """Replace an entry's payload (what it names became known: a child's pid)."""

    def journal_remove(self, entry_id: int) -> None:
        """Forget an entry (it was cleaned up or committed)."""

    def journal_entries(self, kind: str | None = None) -> list[JournalEntry]:
        """Every journal entry (of ``kind``), oldest first."""

    def idem_claim(
        self,
        key: str,
        fingerprint: str,
        *,
        lease_seconds: float,
        retry_unknown: bool,
        sent: bool = False,
    ) -> Claim:
        """Claim ``key`` for a first run, or return its recorded result."""

    def idem_mark_sent(self, key: str, epoch: int) -> None:
        """Record that the side effect may have started (point of no return)."""

    def idem_record(self, key: str, epoch: int, result: Any, *, encoded: str | None = None) -> None:
        """Record the result of the call (``encoded``: its JSON, if known); fenced by ``epoch``."""

    def idem_release(self, key: str, epoch: int, *, unknown: bool) -> None:
        """Give up a claim: retryable, or (``unknown``) outcome unknown."""

    def idem_renew(self, key: str, epoch: int, lease_seconds: float) -> None:
        """Extend the lease of a claim still held; fenced by ``epoch``."""

    def idem_resolve(self, key: str, result: Any | None, *, succeeded: bool) -> None:
        """Settle an ``unknown`` key: done with ``result``, or released for retry."""

    def idem_info(self, key: str) -> IdempotencyRecord | None:
        """What the store knows about ``key``, or ``None``."""

    def idem_prune(
        self, older_than: float, *, now: float | None = None, dry_run: bool = False
    ) -> int:
        """Delete settled keys untouched for ``older_than`` seconds before ``now``; return how many.

        ``dry_run``: delete nothing, count what would go.
        """

    def comp_add(self, key: str, epoch: int, name: str, payload: Any) -> int:
        """Record a pending compensation for ``key``; fenced by ``epoch``."""

    def comp_claim(self, comp_id: int) -> bool:
        """Take a pending compensation to run it; ``False`` if it ran elsewhere."""

    def comp_finish(self, comp_id: int, *, ok: bool) -> None:
        """Record a claimed compensation's outcome."""

    def comp_discard(self, comp_id: int) -> bool:
        """Forget a compensation that is still pending (no longer needed)."""

    def comp_list(self, key: str | None = None) -> list[Compensation]:
        """Compensations (for ``key``), in the order they were recorded."""

    def clear_checkpoint(self, workflow_id: str) -> None:
        """Forget the workflow's checkpoint (it completed)."""

    def checkpoint_prune(
        self, older_than: float, *, now: float | None = None, dry_run: bool = False
    ) -> int:
        """Delete checkpoints not saved for ``older_than`` seconds before ``now``; return how many.

        A checkpoint of a workflow with a live run in the registry is kept.
        ``dry_run``: delete nothing, count what would go.
        """

    def run_register(
        self,
        run_id: str,
        workflow_id: str,
        *,
        owner: str | None,
        team: str | None,
        state: str,
        process: Identity | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        """Record a run as live in a process (default: this one)."""

    def run_set_state(self, run_id: str, state: str, *, final: bool = False) -> bool:
        """Record a run's state unless it is final already; return whether it was recorded."""

    def run_batch(
        self, new: Sequence[Run] = (), states: Sequence[tuple[str, str, bool]] = ()
    ) -> None:
        """Register ``new`` runs, then record ``(run_id, state, final)`` changes, in one go."""

    def run_get(self, run_id: str) -> Run | None:
        """The run with this id, or ``None``."""

    def runs(self, *, live_only: bool = False) -> list[Run]:
        """Registered runs, oldest first (``live_only``: not yet in a final state)."""

    def run_prune(
        self, older_than: float, *, now: float | None = None, dry_run: bool = False
    ) -> int:
        """Delete runs that ended ``older_than`` seconds before ``now``; return how many.

        Only runs in a final state go. ``dry_run``: delete nothing, count what would go.
        """

    def close(self) -> None:
        """Close the store's connections."""


def _prune_cutoff(older_than: object, now: object, dry_run: object) -> float:
    """``now - older_than`` for a prune, once the arguments are checked.

    Raises:
        InvalidArgumentType: ``older_than`` or ``now`` is not a number, or
            ``dry_run`` not a bool.
        ConfigurationError: ``older_than`` is negative, NaN or infinite, or
            ``now`` NaN or infinite.
    """
    age = validate_seconds("older_than", older_than)
    assert age is not None
    if now is None:
        now = time.time()
    elif isinstance(now, bool) or not isinstance(now, (int, float)):
        raise InvalidArgumentType(f"now must be a number of seconds since the epoch (got {now!r})")
    elif not math.isfinite(now):
        raise ConfigurationError(f"now must be finite (got {now!r})")
    if not isinstance(dry_run, bool):
        raise InvalidArgumentType(f"dry_run must be a bool (got {dry_run!r})")
    return float(now) - age


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidArgumentType(f"idempotency key must be a str (got {key!r})")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ConfigurationError(
            f"idempotency key must have 1 to {MAX_KEY_LENGTH} characters "
            f"(got {len(key)}: {key[:40]!r}{'...' if len(key) > 40 else ''})"
        )
    return key


# Built once: json.dumps(..., sort_keys=True) builds an encoder on every call.
_encode: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _dumps(value: Any, what: str) -> str:
    try:
        return _encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentType(f"{what} must be JSON data (got {value!r}: {exc})") from None


# Bumped in a forked child: what a process caches about itself (its identity,
# its connections) is recomputed there. Cheaper to compare than os.getpid(),
# which is a system call, on every statement.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

_identity_cache: tuple[int, str] | None = None


def _identity_json() -> str:
    """``current_identity()`` as JSON, encoded once per process (it is on every claim)."""
    global _identity_cache
    cached = _identity_cache
    if cached is None or cached[0] != _fork_generation:
        cached = (_fork_generation, json.dumps(current_identity().as_dict()))
        _identity_cache = cached
    return cached[1]


# Statements of the idempotency fast paths (sqlite3 caches prepared statements
# by their text, so it stays the same text).
_SQL_IDEM_PEEK: Final = "SELECT fingerprint, status, result, epoch FROM idempotency WHERE key = ?"
_SQL_IDEM_INSERT: Final = (
    "INSERT INTO idempotency(key, fingerprint, status, epoch, owner, lease_expires, sent, "
    "created_at, updated_at) VALUES (?, ?, 'in_flight', 1, ?, ?, ?, ?, ?) "
    "ON CONFLICT(key) DO NOTHING"
)
_SQL_IDEM_RECORD: Final = (
    "UPDATE idempotency SET status = 'done', result = ?, updated_at = ? "
    "WHERE key = ? AND epoch = ? AND status = 'in_flight'"
)
# Retention: (count, delete) statements with one WHERE, whose parameter is the
# cutoff time. Settled keys only (never in flight or unknown); checkpoints of
# workflows without a live run; runs in a final state, by when they ended.
_SQL_IDEM_PRUNE: Final = (
    "SELECT count(*) FROM idempotency WHERE status IN ('done', 'released') AND updated_at < ?",
    "DELETE FROM idempotency WHERE status IN ('done', 'released') AND updated_at < ?",
)
_SQL_CHECKPOINT_PRUNE: Final = (
    "SELECT count(*) FROM checkpoints WHERE saved_at < ? AND workflow_id NOT IN "
    "(SELECT workflow_id FROM runs WHERE state NOT IN "
    "('completed', 'failed', 'terminated', 'killed'))",
    "DELETE FROM checkpoints WHERE saved_at < ? AND workflow_id NOT IN "
    "(SELECT workflow_id FROM runs WHERE state NOT IN "
    "('completed', 'failed', 'terminated', 'killed'))",
)
_SQL_RUN_PRUNE: Final = (
    "SELECT count(*) FROM runs WHERE state IN ('completed', 'failed', 'terminated', 'killed') "
    "AND coalesce(ended_at, started_at) < ?",
    "DELETE FROM runs WHERE state IN ('completed', 'failed', 'terminated', 'killed') "
    "AND coalesce(ended_at, started_at) < ?",
)
# Claim(...) through NamedTuple's generated __new__ costs a Python call; the
# fast paths build the tuple directly (every field given, in order).
_new_claim: Final = tuple.__new__

# Numbered migrations; index i upgrades user_version i -> i+1.
MIGRATIONS: Final[Sequence[str]] = (
    """
    CREATE TABLE checkpoints (
        workflow_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        saved_at REAL NOT NULL
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        owner TEXT NOT NULL,
        workflow_id TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX journal_kind ON journal(kind);
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('in_flight', 'done', 'released', 'unknown')),
        result TEXT,
        epoch INTEGER NOT NULL,
        owner TEXT NOT NULL,
        lease_expires REAL NOT NULL,
        sent INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX idempotency_updated ON idempotency(updated_at);
    CREATE TABLE compensations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        name TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX compensations_key ON compensations(key);
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        workflow_id TEXT NOT NULL,
        owner TEXT,
        team TEXT,
        state TEXT NOT NULL,
        process TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        info TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX runs_workflow ON runs(workflow_id);
    """,
    # 2: the same idempotency table, its status CHECK written as comparisons:
    # SQLite evaluates ``status IN (...)`` through a temporary table built for
    # every statement, which cost about 9 us per first run (claim + record).
    # A CHECK cannot be altered in place: the table is rebuilt, rows kept.
    """
    CREATE TABLE idempotency_v2 (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        status TEXT NOT NULL CHECK (
            status = 'in_flight' OR status = 'done' OR status = 'released' OR status = 'unknown'
        ),
        result TEXT,
        epoch INTEGER NOT NULL,
        owner TEXT NOT NULL,
        lease_expires REAL NOT NULL,
        sent INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    INSERT INTO idempotency_v2(key, fingerprint, status, result, epoch, owner, lease_expires,
        sent, created_at, updated_at)
    SELECT key, fingerprint, status, result, epoch, owner, lease_expires, sent, created_at,
        updated_at FROM idempotency;
    DROP TABLE idempotency;
    ALTER TABLE idempotency_v2 RENAME TO idempotency;
    CREATE INDEX idempotency_updated ON idempotency(updated_at);
    """,
)


class SQLiteStore:
    """The default ``Store``: one SQLite file in WAL mode.

    Safe to share between threads (one connection per thread) and processes
    (SQLite's locking; ``BEGIN IMMEDIATE`` for every read-modify-write), and
    across ``fork`` (a child opens its own connections).

    Args:
        path: The database file; default ``$TERMSAFE_HOME/store.sqlite3``.
            Its folder is created (mode 0o700) if missing.
        busy_timeout: Seconds to wait for another process's write lock.

    Raises:
        InvalidArgumentType: ``path`` is not a path.
        StoreCorrupt: the file exists and is not a termsafe store (not SQLite,
            corrupt, or another application's database); it is left untouched.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, busy_timeout: float = 30.0
    ) -> None:
        if path is None:
            path = default_home() / "store.sqlite3"
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentType(f"store path must be a path (got {path!r})")
        self.path = Path(path)
        self._busy_ms = int(busy_timeout * 1000)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        # Recorded results this object has read, by key: (fingerprint, JSON, epoch).
        self._done: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._done_lock = threading.Lock()
        self._done_gen = 0  # bumped by every prune
        self._check_file()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._migrate()

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"

    # -- connections --------------------------------------------------------------

    def _check_file(self) -> None:
        try:
            with self.path.open("rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise StoreCorrupt(self.path, "is a directory") from None
        except OSError as exc:
            raise StoreCorrupt(self.path, f"cannot be read: {exc}") from None
        if head and head != SQLITE_MAGIC:
            raise StoreCorrupt(self.path, "is not an SQLite database")

    def _conn(self, durable: bool = True) -> sqlite3.Connection:
        local = self._local
        try:
            if local.generation == _fork_generation:
                return local.conns[durable]  # type: ignore[no-any-return]
        except (AttributeError, KeyError):
            pass
        return self._connect(durable)

    def _connect(self, durable: bool) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "generation", None) != _fork_generation:
            # New thread, or a forked child: never reuse a parent's connection.
            local.generation = _fork_generation
            local.conns = {}
        conns: dict[bool, sqlite3.Connection] = local.conns
        conn = conns.get(durable)
        if conn is None:
            if self._closed:
                raise ConfigurationError(f"store {str(self.path)!r} is closed")
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise StoreCorrupt(self.path, f"cannot be opened: {exc}") from None
            conns[durable] = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): commits, or rolls back on any exception."""
        conn = self._conn(durable)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        conn = self._conn()
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(self.path, f"cannot be read: {exc}") from None
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise StoreCorrupt(self.path, "belongs to another application")
        if version > len(MIGRATIONS):
            raise StoreCorrupt(
                self.path,
                f"has schema version {version}, newer than this termsafe ({len(MIGRATIONS)})",
            )
        while version < len(MIGRATIONS):
            with self._tx() as tx:
                # Re-read under the write lock: another process may have migrated.
                version = tx.execute("PRAGMA user_version").fetchone()[0]
                if version >= len(MIGRATIONS):
                    break
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        tx.execute(statement)
                tx.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                tx.execute(f"PRAGMA user_version = {version + 1}")
            version += 1

    @property
    def schema_version(self) -> int:
        """The schema version of the file."""
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s answer (``"ok"`` when healthy)."""
        return str(self._conn().execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- retention ----------------------------------------------------------------

    def _prune(
        self, sql: tuple[str, str], older_than: float, now: float | None, dry_run: bool
    ) -> int:
        """Count (``dry_run``) or delete, durably, the rows older than the cutoff.

        ``sql`` is a ``(count, delete)`` pair of statements sharing one
        ``WHERE``, whose one parameter is the cutoff.
        """
        cutoff = _prune_cutoff(older_than, now, dry_run)
        if dry_run:
            return int(self._conn().execute(sql[0], (cutoff,)).fetchone()[0])
        with self._tx() as tx:
            return tx.execute(sql[1], (cutoff,)).rowcount

    # -- checkpoints --------------------------------------------------------------

    def save_checkpoint(self, workflow_id: str, state: Any) -> None:
        """Record ``state`` as ``workflow_id``'s last checkpoint (durably).

        Raises:
            InvalidArgumentType: ``state`` is not JSON data.
        """
        data = _dumps(state, "checkpoint state")
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO checkpoints(workflow_id, state, saved_at) VALUES (?, ?, ?) "
                "ON CONFLICT(workflow_id) DO UPDATE SET state = excluded.state, "
                "saved_at = excluded.saved_at",
                (workflow_id, data, time.time()),
            )

    def load_checkpoint(self, workflow_id: str) -> Any:
        """The last checkpoint of ``workflow_id``, or ``None``."""
        row = (
            self._conn()
            .execute("SELECT state FROM checkpoints WHERE workflow_id = ?", (workflow_id,))
            .fetchone()
        )
        return None if row is None else json.loads(row[0])

    def clear_checkpoint(self, workflow_id: str) -> None:
        """Forget ``workflow_id``'s checkpoint (the workflow completed)."""
        with self._tx() as tx:
            tx.execute("DELETE FROM checkpoints WHERE workflow_id = ?", (workflow_id,))

    def checkpoint_prune(
        self, older_than: float, *, now: float | None = None, dry_run: bool = False
    ) -> int:
        """Delete checkpoints not saved for ``older_than`` seconds.

        A checkpoint is the resume point of a workflow that did not complete
        (a completed one clears its own). One whose workflow has a run in the
        registry that is not in a final state yet is kept whatever its age:
        that run may still resume from it.

        Args:
            older_than: Retention in seconds: a checkpoint goes when it was last
                saved strictly before ``now - older_than``.
            now: The time ages are measured from (default ``time.time()``).
            dry_run: Delete nothing; count the checkpoints that would go.

        Returns:
            How many checkpoints were deleted (or would be).

        Raises:
            InvalidArgumentType: ``older_than`` or ``now`` is not a number, or
                ``dry_run`` not a bool.
            ConfigurationError: ``older_than`` is negative, NaN or infinite, or
                ``now`` NaN or infinite.
        """
        return self._prune(_SQL_CHECKPOINT_PRUNE, older_than, now, dry_run)

    # -- journal ------------------------------------------------------------------

    def journal_add(
        self, kind: JournalKind, payload: dict[str, Any], workflow_id: str | None = None
    ) -> int:
        """Record something a crash would leave behind; return its id.

        Raises:
            ConfigurationError: ``kind`` is unknown.
            InvalidArgumentType: ``payload`` is not JSON data.
        """
        if kind not in JOURNAL_KINDS:
            raise ConfigurationError(
                f"unknown journal kind {kind!r} (known: {', '.join(JOURNAL_KINDS)})"
            )
        data = _dumps(payload, "journal payload")
        owner = _identity_json()
        # One statement is its own transaction: an explicit BEGIN IMMEDIATE ...
        # COMMIT around it would add two round trips (~20 us) to every atomic write.
        cur = self._conn(durable=False).execute(
            "INSERT INTO journal(kind, payload, owner, workflow_id, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (kind, data, owner, workflow_id, time.time()),
        )
        entry_id = cur.lastrowid
        assert entry_id is not None
        return entry_id

    def journal_update(self, entry_id: int, payload: dict[str, Any]) -> None:
        """Replace a journal entry's payload, in one statement (the entry is never missing).

        Raises:
            InvalidArgumentType: ``payload`` is not JSON data.
        """
        data = _dumps(payload, "journal payload")
        self._conn(durable=False).execute(
            "UPDATE journal SET payload = ? WHERE id = ?", (data, entry_id)
        )

    def journal_remove(self, entry_id: int) -> None:
        """Forget a journal entry (cleaned up, or committed)."""
        self._conn(durable=False).execute("DELETE FROM journal WHERE id = ?", (entry_id,))

    def journal_entries(self, kind: str | None = None) -> list[JournalEntry]:
        """Every journal entry (of ``kind``), oldest first."""
        sql = "SELECT id, kind, payload, owner, workflow_id, created_at FROM journal"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        rows = self._conn(durable=False).execute(sql + " ORDER BY id", args).fetchall()
        return [
            JournalEntry(
                r[0], r[1], json.loads(r[2]), Identity.from_dict(json.loads(r[3])), r[4], r[5]
            )
            for r in rows
        ]

    # -- idempotency ----------------------------------------------------------------

    def _remember_done(
        self, key: str, fingerprint: str, result: str, epoch: int, generation: int
    ) -> None:
        """Keep a ``done`` record in memory: it never changes until pruned.

        ``generation`` is ``_done_gen`` from before the record was read: a
        prune since then may have deleted it, and then it is not kept.
        """
        done = self._done
        with self._done_lock:
            if generation != self._done_gen:
                return
            if key not in done and len(done) >= DONE_CACHE_SIZE:
                done.popitem(last=False)  # the oldest
            done[key] = (fingerprint, result, epoch)

    def idem_claim(
        self,
        key: str,
        fingerprint: str,
        *,
        lease_seconds: float,
        retry_unknown: bool,
        sent: bool = False,
    ) -> Claim:
        """Claim ``key`` for a first run, or return its recorded result.

        Stripe semantics: a key that succeeded replays its result; the same key
        with another request is an error; a key held by a live run is a
        conflict; a key whose run died after the side effect may have started
        has an unknown outcome, which is reported, never guessed, unless
        ``retry_unknown`` (the external system deduplicates by key).

        A replay costs one read and never the write lock, and a key this store
        object has replayed before costs nothing: a ``done`` record never
        changes (only pruning deletes it), so the last ``DONE_CACHE_SIZE`` of
        them are kept in memory. A first claim of a new key is that read (it
        finds nothing) and one statement (an ``INSERT`` that does nothing if
        the key exists), its own durable transaction; any other case is read
        and decided under the write lock (``BEGIN IMMEDIATE``). The read comes
        first even though first runs are the common case: an ``INSERT`` tried
        first would make a replay wait for the write lock behind any writer
        (a prune, another process's claim), and fail with "database is
        locked" after ``busy_timeout``, where the read replays at once.

        Args:
            key: The idempotency key (1 to 255 characters).
            fingerprint: Identifies the request; another fingerprint under the
                same key is an error.
            lease_seconds: How long the claim holds without renewal.
            retry_unknown: Retry a key whose outcome is unknown.
            sent: Record the claim as "the side effect may have started" at
                once (the whole body is the point of no return); saves the
                separate ``idem_mark_sent`` transaction.

        Returns:
            The ``Claim``: a replay with its result, or a first run/retry with its epoch.

        Raises:
            IdempotencyKeyReused: the key was used with another fingerprint.
            IdempotencyConflict: a live run holds the key.
            OutcomeUnknown: a run died after the side effect may have started.
            ConfigurationError: the key is empty or longer than 255 characters.
        """
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:
            _check_key(key)
        known = self._done.get(key)
        if known is not None and not self._closed:
            if known[0] != fingerprint:
                raise IdempotencyKeyReused(key)
            return _new_claim(Claim, (key, True, json.loads(known[1]), known[2], False))
        generation = self._done_gen
        conn = self._conn()
        row = conn.execute(_SQL_IDEM_PEEK, (key,)).fetchone()
        if row is None:
            now = time.time()
            cur = conn.execute(
                _SQL_IDEM_INSERT,
                (key, fingerprint, _identity_json(), now + lease_seconds, int(sent), now, now),
            )
            if cur.rowcount == 1:
                return _new_claim(Claim, (key, False, None, 1, False))
            # Another process claimed the key since the read: decide under the lock.
        elif row[1] == "done":
            if row[0] != fingerprint:
                raise IdempotencyKeyReused(key)
            self._remember_done(key, row[0], row[2], row[3], generation)
            return _new_claim(Claim, (key, True, json.loads(row[2]), row[3], False))
        return self._idem_claim_locked(key, fingerprint, lease_seconds, retry_unknown, sent)

    def _idem_claim_locked(
        self, key: str, fingerprint: str, lease_seconds: float, retry_unknown: bool, sent: bool
    ) -> Claim:
        """``idem_claim`` for a key that has a record: read and decide under the write lock."""
        now = time.time()
        me = _identity_json()
        with self._tx() as tx:
            row = tx.execute(
                "SELECT fingerprint, status, result, epoch, owner, lease_expires, sent "
                "FROM idempotency WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                # Pruned since the first read: a new key again.
                tx.execute(
                    "INSERT INTO idempotency(key, fingerprint, status, epoch, owner, "
                    "lease_expires, sent, created_at, updated_at) "
                    "VALUES (?, ?, 'in_flight', 1, ?, ?, ?, ?, ?)",
                    (key, fingerprint, me, now + lease_seconds, int(sent), now, now),
                )
                return Claim(key, False, None, 1)
            stored_fp, status, result, epoch, owner, lease_expires, was_sent = row
            if stored_fp != fingerprint:
                raise IdempotencyKeyReused(key)
            if status == "done":
                return Claim(key, True, json.loads(result), epoch)
            if status == "in_flight":
                holder = Identity.from_dict(json.loads(owner))
                if lease_expires > now and identity_alive(holder):
                    raise IdempotencyConflict(key, holder.pid, holder.host)
                if was_sent and not retry_unknown:
                    # The holder died (or its lease ran out) after the side
                    # effect may have started: nobody can know what happened.
                    tx.execute(
                        "UPDATE idempotency SET status = 'unknown', updated_at = ? WHERE key = ?",
                        (now, key),
                    )
                    status = "unknown"
            if status == "unknown" and not retry_unknown:
                # Raised after the transaction, so the 'unknown' status is committed.
                unknown = True
            else:
                unknown = False
                tx.execute(
                    "UPDATE idempotency SET status = 'in_flight', epoch = ?, owner = ?, "
                    "lease_expires = ?, sent = ?, updated_at = ? WHERE key = ?",
                    (epoch + 1, me, now + lease_seconds, int(sent), now, key),
                )
        if unknown:
            raise OutcomeUnknown(key)
        return Claim(key, False, None, epoch + 1, retried=True)

    def _fenced(self, sql: str, args: tuple[Any, ...], key: str, epoch: int) -> None:
        """Run one durable ``UPDATE`` of the claim ``(key, epoch)``; ``LeaseLost`` if it is gone.

        One statement outside ``BEGIN ... COMMIT`` is its own transaction,
        committed (and, with ``synchronous=FULL``, fsynced) before ``execute``
        returns; its ``WHERE`` holds the fencing check, so it is all the
        read-modify-write there is, and it saves two round trips per write.
        """
        conn = self._conn()
        if conn.execute(sql, args).rowcount != 1:
            row = conn.execute("SELECT epoch FROM idempotency WHERE key = ?", (key,)).fetchone()
            raise LeaseLost(key, epoch, None if row is None else int(row[0]))

    def idem_mark_sent(self, key: str, epoch: int) -> None:
        """Record durably that the side effect may have started.

        Raises:
            LeaseLost: another run took the key over (fencing).
        """
        self._fenced(
            "UPDATE idempotency SET sent = 1, updated_at = ? "
            "WHERE key = ? AND epoch = ? AND status = 'in_flight'",
            (time.time(), key, epoch),
            key,
            epoch,
        )

    def idem_renew(self, key: str, epoch: int, lease_seconds: float) -> None:
        """Extend the lease of a claim still held.

        Raises:
            LeaseLost: another run took the key over (fencing).
        """
        now = time.time()
        self._fenced(
            "UPDATE idempotency SET lease_expires = ?, updated_at = ? "
            "WHERE key = ? AND epoch = ? AND status = 'in_flight'",
            (now + lease_seconds, now, key, epoch),
            key,
            epoch,
        )

    def idem_record(self, key: str, epoch: int, result: Any, *, encoded: str | None = None) -> None:
        """Record the call's result (durably); later claims replay it.

        Args:
            key: The key.
            epoch: The epoch of the claim recording it (fencing).
            result: JSON data.
            encoded: ``result`` already encoded as JSON by the caller (saves
                encoding it twice); ``result`` is then not looked at.

        Raises:
            InvalidArgumentType: ``result`` is not JSON data.
            LeaseLost: another run took the key over (fencing): nothing recorded.
        """
        data = encoded if encoded is not None else _dumps(result, "idempotent call result")
        # _fenced, written out: this is on every first run.
        conn = self._conn()
        if conn.execute(_SQL_IDEM_RECORD, (data, time.time(), key, epoch)).rowcount != 1:
            row = conn.execute("SELECT epoch FROM idempotency WHERE key = ?", (key,)).fetchone()
            raise LeaseLost(key, epoch, None if row is None else int(row[0]))

    def idem_release(self, key: str, epoch: int, *, unknown: bool) -> None:
        """Give up a claim: ``released`` (safe to retry) or ``unknown``.

        Raises:
            LeaseLost: another run took the key over (fencing).
        """
        self._fenced(
            "UPDATE idempotency SET status = ?, updated_at = ? "
            "WHERE key = ? AND epoch = ? AND status = 'in_flight'",
            ("unknown" if unknown else "released", time.time(), key, epoch),
            key,
            epoch,
        )

    def idem_resolve(self, key: str, result: Any | None, *, succeeded: bool) -> None:
        """An operator settles an ``unknown`` key: recorded as done, or released for retry.

        Raises:
            InvalidArgumentType: ``result`` is not JSON data.
            ConfigurationError: the key is not in the ``unknown`` state.
        """
        data = _dumps(result, "idempotent call result")
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE idempotency SET status = ?, result = ?, updated_at = ? "
                "WHERE key = ? AND status = 'unknown'",
                ("done" if succeeded else "released", data, time.time(), key),
            )
            if cur.rowcount != 1:
                raise ConfigurationError(f"idempotency key {key!r} is not in the 'unknown' state")

    def idem_status(self, key: str) -> str | None:
        """The key's status (``in_flight``, ``done``, ``released``, ``unknown``) or ``None``."""
        row = (
            self._conn().execute("SELECT status FROM idempotency WHERE key = ?", (key,)).fetchone()
        )
        return None if row is None else str(row[0])

    def idem_info(self, key: str) -> IdempotencyRecord | None:
        """What the store knows about ``key``, or ``None`` if it has no record."""
        row = (
            self._conn()
            .execute(
                "SELECT status, epoch, owner, lease_expires, sent, result, created_at, "
                "updated_at FROM idempotency WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return IdempotencyRecord(
            key,
            row[0],
            row[1],
            Identity.from_dict(json.loads(row[2])),
            row[3],
            bool(row[4]),
            None if row[5] is None else json.loads(row[5]),
            row[6],
            row[7],
        )

    def idem_prune(
        self, older_than: float, *, now: float | None = None, dry_run: bool = False
    ) -> int:
        """Delete settled keys (done/released) untouched for ``older_than`` seconds.

        Keys in flight or with an unknown outcome are never deleted. Finished
        compensations (done/failed) of the same age go too.

        Args:
            older_than: Retention in seconds: a key goes when its last change is
                strictly older than ``now - older_than``.
            now: The time ages are measured from (default ``time.time()``).
            dry_run: Delete nothing; count the keys that would go.

        Returns:
            How many keys were deleted (or would be).

        Raises:
            InvalidArgumentType: ``older_than`` or ``now`` is not a number, or
                ``dry_run`` not a bool.
            ConfigurationError: ``older_than`` is negative, NaN or infinite, or
                ``now`` NaN or infinite.
        """
        cutoff = _prune_cutoff(older_than, now, dry_run)
        if dry_run:
            return self._prune(_SQL_IDEM_PRUNE, older_than, now, dry_run)
        try:
            with self._tx() as tx:
                cur = tx.execute(_SQL_IDEM_PRUNE[1], (cutoff,))
                tx.execute(
                    "DELETE FROM compensations "
                    "WHERE status IN ('done', 'failed') AND updated_at < ?",
                    (cutoff,),
                )
                return cur.rowcount
        finally:
            # Pruned keys are new again here at once (in other store objects
            # and processes, see DONE_CACHE_SIZE).
            with self._done_lock:
                self._done_gen += 1
                self._done.clear()

    # -- compensations --------------------------------------------------------------

    def comp_add(self, key: str, epoch: int, name: str, payload: Any) -> int:
        """Record a compensation for ``key``; fenced by the claim's ``epoch``.

        Raises:
            InvalidArgumentType: ``payload`` is not JSON data.
            LeaseLost: another run took the key over (fencing).
        """
        data = _dumps(payload, "compensation payload")
        now = time.time()
        with self._tx() as tx:
            row = tx.execute(
                "SELECT epoch, status FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
            # Only the run that holds the claim (or recorded it) may add one: a
            # run whose claim was released or marked unknown is fenced too.
            if row is None or int(row[0]) != epoch or row[1] not in ("in_flight", "done"):
                raise LeaseLost(key, epoch, None if row is None else int(row[0]))
            cur = tx.execute(
                "INSERT INTO compensations(key, name, payload, status, created_at, updated_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?)",
                (key, name, data, now, now),
            )
            comp_id = cur.lastrowid
        assert comp_id is not None
        return comp_id

    def comp_claim(self, comp_id: int) -> bool:
        """Take a pending compensation to run it; ``False`` if it ran (or runs) elsewhere."""
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE compensations SET status = 'running', updated_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (time.time(), comp_id),
            )
            return cur.rowcount == 1

    def comp_finish(self, comp_id: int, *, ok: bool) -> None:
        """Record a claimed compensation's outcome."""
        with self._tx() as tx:
            tx.execute(
                "UPDATE compensations SET status = ?, updated_at = ? WHERE id = ?",
                ("done" if ok else "failed", time.time(), comp_id),
            )

    def comp_discard(self, comp_id: int) -> bool:
        """Forget a compensation still pending (its workflow succeeded: it is not needed).

        Returns:
            Whether it was pending (and is now gone).
        """
        with self._tx() as tx:
            cur = tx.execute(
                "DELETE FROM compensations WHERE id = ? AND status = 'pending'", (comp_id,)
            )
            return cur.rowcount == 1

    def comp_list(self, key: str | None = None) -> list[Compensation]:
        """Compensations (for ``key``), in the order they were recorded."""
        sql = "SELECT id, key, name, payload, status FROM compensations"
        args: tuple[Any, ...] = ()
        if key is not None:
            sql += " WHERE key = ?"
            args = (key,)
        rows = self._conn().execute(sql + " ORDER BY id", args).fetchall()
        return [Compensation(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    # -- runs -----------------------------------------------------------------------

    def run_register(
        self,
        run_id: str,
        workflow_id: str,
        *,
        owner: str | None,
        team: str | None,
        state: str,
        process: Identity | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        """Record a run as live in a process (default: this one).

        Raises:
            InvalidArgumentType: ``info`` is not JSON data.
        """
        proc = process if process is not None else current_identity()
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO runs(run_id, workflow_id, owner, team, state, process, "
                "started_at, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    workflow_id,
                    owner,
                    team,
                    state,
                    json.dumps(proc.as_dict()),
                    time.time(),
                    _dumps(info or {}, "run info"),
                ),
            )

    def run_set_state(self, run_id: str, state: str, *, final: bool = False) -> bool:
        """Record a run's state; a run already in a final state is never changed.

        Returns:
            Whether the state was recorded (``False``: the run had ended already).
        """
        terminal = ("completed", "failed", "terminated", "killed")
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE runs SET state = ?, ended_at = CASE WHEN ? THEN ? ELSE ended_at END "
                "WHERE run_id = ? AND state NOT IN (?, ?, ?, ?)",
                (state, final, time.time(), run_id, *terminal),
            )
            return cur.rowcount == 1

    def runs(self, *, live_only: bool = False) -> list[Run]:
        """Registered runs, oldest first (``live_only``: not yet in a final state)."""
        sql = (
            "SELECT run_id, workflow_id, owner, team, state, process, started_at, ended_at, info "
            "FROM runs"
        )
        if live_only:
            sql += " WHERE state NOT IN ('completed', 'failed', 'terminated', 'killed')"
        rows = self._conn().execute(sql + " ORDER BY started_at, run_id").fetchall()
        return [
            Run(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                Identity.from_dict(json.loads(r[5])),
                r[6],
                r[7],
                json.loads(r[8]),
            )
            for r in rows
        ]

    def run_prune(
        self, older_than: float, *, now: float | None = None, dry_run: bool = False
    ) -> int:
        """Delete the records of runs that ended ``older_than`` seconds ago.

        Only runs in a final state (completed, failed, terminated, killed) go,
        by the time they ended (their start, for a run recorded as ended
        without an end time). A live run, or one whose process died and that
        ``recover`` has not closed yet, is kept whatever its age.

        Args:
            older_than: Retention in seconds: a run goes when it ended strictly
                before ``now - older_than``.
            now: The time ages are measured from (default ``time.time()``).
            dry_run: Delete nothing; count the runs that would go.

        Returns:
            How many runs were deleted (or would be).

        Raises:
            InvalidArgumentType: ``older_than`` or ``now`` is not a number, or
                ``dry_run`` not a bool.
            ConfigurationError: ``older_than`` is negative, NaN or infinite, or
                ``now`` NaN or infinite.
        """
        return self._prune(_SQL_RUN_PRUNE, older_than, now, dry_run)

    def run_batch(
        self, new: Sequence[Run] = (), states: Sequence[tuple[str, str, bool]] = ()
    ) -> None:
        """Register ``new`` runs, then record ``(run_id, state, final)`` changes: one transaction.

        For hosts that register many workflows (``serve_control``): one commit
        (one fsync) for a whole batch instead of one per run. A state change of
        a run already in a final state is skipped, as in ``run_set_state``.

        Raises:
            InvalidArgumentType: a run's ``info`` is not JSON data.
        """
        processes: dict[Identity, str] = {}  # one host process registers many runs
        rows = []
        for run in new:
            process = processes.get(run.process)
            if process is None:
                process = processes[run.process] = json.dumps(run.process.as_dict())
            rows.append(
                (
                    run.run_id,
                    run.workflow_id,
                    run.owner,
                    run.team,
                    run.state,
                    process,
                    run.started_at,
                    run.ended_at,
                    _dumps(run.info, "run info"),
                )
            )
        if not rows and not states:
            return
        now = time.time()
        with self._tx() as tx:
            tx.executemany(
                "INSERT INTO runs(run_id, workflow_id, owner, team, state, process, "
                "started_at, ended_at, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            tx.executemany(
                "UPDATE runs SET state = ?, ended_at = CASE WHEN ? THEN ? ELSE ended_at END "
                "WHERE run_id = ? AND state NOT IN ('completed', 'failed', 'terminated', 'killed')",
                [(state, final, now, run_id) for run_id, state, final in states],
            )

    def run_get(self, run_id: str) -> Run | None:
        """The run with this id, or ``None``."""
        r = (
            self._conn()
            .execute(
                "SELECT run_id, workflow_id, owner, team, state, process, started_at, ended_at, "
                "info FROM runs WHERE run_id = ?",
                (run_id,),
            )
            .fetchone()
        )
        if r is None:
            return None
        process = Identity.from_dict(json.loads(r[5]))
        return Run(r[0], r[1], r[2], r[3], r[4], process, r[6], r[7], json.loads(r[8]))


_default_store: SQLiteStore | None = None
_default_lock = threading.Lock()
# The $TERMSAFE_HOME value _default_store was opened for: every atomic write
# looks the store up, and building Paths to compare costs ~10 us each time.
_default_key: object = None
_encodekey = getattr(os.environ, "encodekey", None)
_HOME_KEY: Final[object] = _encodekey("TERMSAFE_HOME") if callable(_encodekey) else None


def _home_setting() -> object:
    """``$TERMSAFE_HOME`` as the environment holds it, to compare (never used as a path).

    Read from ``os.environ``'s own mapping where it has one (CPython):
    ``os.environ.get`` is four Python calls deep, and this runs on every safe
    operation that uses the default store.
    """
    data = getattr(os.environ, "_data", None)
    if _HOME_KEY is not None and isinstance(data, dict):
        return data.get(_HOME_KEY)
    return os.environ.get("TERMSAFE_HOME")


def open_default_store() -> SQLiteStore:
    """The process's store at ``$TERMSAFE_HOME/store.sqlite3`` (opened on first use).

    Raises:
        StoreCorrupt: the file there is not a termsafe store.
    """
    global _default_store, _default_key
    key = _home_setting()
    store = _default_store
    if store is not None and not store._closed and key == _default_key:
        return store
    with _default_lock:
        store = _default_store
        if store is None or store._closed or store.path != default_home() / "store.sqlite3":
            store = _default_store = SQLiteStore()
        _default_key = key
        return store
