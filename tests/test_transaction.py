"""transaction(conn): commit or roll back on real SQLite files, under real kills and SIGKILLs."""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from _kills import event_types, kill_before, kill_during_commit, kill_in, start_in_body
from _sigkill import VersionJudge, run_trials, serve_trials, trial_workflow
from conftest import ADMIN, WAIT

import termsafe as ts
from termsafe import (
    ConfigurationError,
    InvalidArgumentType,
    Phases,
    Terminated,
    Terminator,
    TransactionStateError,
    WorkflowState,
    transaction,
)

LEVELS: list[str | None] = [None, "", "DEFERRED", "IMMEDIATE", "EXCLUSIVE"]


def _connect(path: Path, level: str | None = "", **kwargs: Any) -> sqlite3.Connection:
    # typeshed only admits the three named levels; "" (the default) is valid too.
    conn: sqlite3.Connection = sqlite3.connect(path, isolation_level=cast(Any, level), **kwargs)
    return conn


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    return [r[0] for r in rows]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A sqlite3 file with ``items(n)`` in the default (legacy, isolation_level="") mode."""
    conn = _connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE items (n INTEGER)")
    conn.commit()
    yield conn
    conn.close()


def _count(path: Path, table: str = "items") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


class TestCommit:
    @pytest.mark.parametrize("level", LEVELS)
    def test_commits_on_success(self, tmp_path: Path, level: str | None) -> None:
        """A clean exit commits: another connection sees the rows."""
        conn = _connect(tmp_path / "t.db", level)
        conn.execute("CREATE TABLE items (n INTEGER)")
        with transaction(conn) as db:
            db.executemany("INSERT INTO items VALUES (?)", [(i,) for i in range(10)])
        assert 10 == _count(tmp_path / "t.db")
        assert False is conn.in_transaction
        conn.close()

    @pytest.mark.parametrize("level", LEVELS)
    def test_rolls_back_on_error(self, tmp_path: Path, level: str | None) -> None:
        """An exception in the body rolls everything back and propagates."""
        conn = _connect(tmp_path / "t.db", level)
        conn.execute("CREATE TABLE items (n INTEGER)")
        if level is not None:
            conn.commit()

        def body() -> None:
            with transaction(conn):
                conn.executemany("INSERT INTO items VALUES (?)", [(i,) for i in range(10)])
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            body()
        assert 0 == _count(tmp_path / "t.db")
        assert False is conn.in_transaction
        conn.close()

    def test_yields_the_connection(self, db: sqlite3.Connection) -> None:
        """The block gets the connection itself."""
        with transaction(db) as got:
            assert db is got

    def test_transaction_object_reports_committed(self, db: sqlite3.Connection) -> None:
        """``Transaction.committed`` is True after a clean exit, False after a rollback."""
        tx = transaction(db)
        with tx:
            db.execute("INSERT INTO items VALUES (1)")
        assert True is tx.committed
        failed = transaction(db)

        def body() -> None:
            with failed:
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert False is failed.committed

    def test_block_cannot_be_entered_twice(self, db: sqlite3.Connection) -> None:
        """A Transaction object is one block: entering it again raises."""
        tx = transaction(db)
        with tx:
            pass

        def body() -> None:
            with tx:
                pass

        with pytest.raises(TransactionStateError, match="already entered"):
            body()

    def test_keyboard_interrupt_rolls_back(self, tmp_path: Path, db: sqlite3.Connection) -> None:
        """A BaseException (KeyboardInterrupt) rolls back too."""

        def body() -> None:
            with transaction(db):
                db.execute("INSERT INTO items VALUES (1)")
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            body()
        assert 0 == _count(tmp_path / "t.db")


class TestMigrations:
    @pytest.mark.parametrize("level", LEVELS)
    def test_ddl_rolls_back(self, tmp_path: Path, level: str | None) -> None:
        """CREATE/ALTER/INDEX and user_version roll back together, whatever the isolation level."""
        path = tmp_path / "m.db"
        conn = _connect(path, level)
        conn.execute("CREATE TABLE items (n INTEGER)")
        if level is not None:
            conn.commit()

        def body() -> None:
            with transaction(conn):
                conn.execute("CREATE TABLE extra (x TEXT)")
                conn.execute("ALTER TABLE items ADD COLUMN label TEXT")
                conn.execute("CREATE INDEX items_label ON items(label)")
                conn.execute("PRAGMA user_version = 7")
                raise RuntimeError("half-way")

        with pytest.raises(RuntimeError, match="half-way"):
            body()
        check = sqlite3.connect(path)
        assert ["items"] == _tables(check)
        assert ["n"] == [r[1] for r in check.execute("PRAGMA table_info(items)")]
        assert 0 == check.execute("PRAGMA user_version").fetchone()[0]
        check.close()
        conn.close()

    def test_default_mode_ddl_is_not_atomic_without_transaction(self, tmp_path: Path) -> None:
        """The hazard transaction() exists for: in sqlite3's default mode DDL autocommits."""
        path = tmp_path / "m.db"
        conn = _connect(path, "")
        try:
            conn.execute("CREATE TABLE extra (x TEXT)")
            raise RuntimeError("half-way")
        except RuntimeError:
            conn.rollback()
        assert ["extra"] == _tables(conn)
        conn.close()

    def test_migration_commits(self, tmp_path: Path) -> None:
        """A migration that completes is all there."""
        path = tmp_path / "m.db"
        conn = _connect(path, "")
        with transaction(conn):
            conn.execute("CREATE TABLE items (n INTEGER)")
            conn.execute("CREATE INDEX items_n ON items(n)")
            conn.execute("PRAGMA user_version = 1")
        check = sqlite3.connect(path)
        assert ["items"] == _tables(check)
        assert 1 == check.execute("PRAGMA user_version").fetchone()[0]
        check.close()
        conn.close()


class TestBegin:
    def test_isolation_level_is_the_begin_mode(self, tmp_path: Path) -> None:
        """isolation_level="IMMEDIATE" means BEGIN IMMEDIATE: the write lock is taken at once."""
        path = tmp_path / "t.db"
        conn = _connect(path, "IMMEDIATE")
        conn.execute("CREATE TABLE items (n INTEGER)")
        conn.commit()
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        with transaction(conn), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        conn.close()

    def test_begin_argument(self, tmp_path: Path) -> None:
        """begin="BEGIN EXCLUSIVE" is the statement sent."""
        path = tmp_path / "t.db"
        conn = _connect(path, None)
        conn.execute("CREATE TABLE items (n INTEGER)")
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        with transaction(conn, begin="BEGIN EXCLUSIVE"), pytest.raises(sqlite3.OperationalError):
            other.execute("SELECT count(*) FROM items").fetchone()
        assert (0,) == other.execute("SELECT count(*) FROM items").fetchone()
        other.close()
        conn.close()

    def test_begin_must_begin(self, db: sqlite3.Connection) -> None:
        """A begin statement that does not begin a transaction is refused, naming it."""
        with pytest.raises(ConfigurationError, match="DELETE FROM items"):
            transaction(db, begin="DELETE FROM items")

    def test_begin_must_be_a_string(self, db: sqlite3.Connection) -> None:
        """A begin that is not a string is refused, naming it."""
        with pytest.raises(InvalidArgumentType, match="42"):
            transaction(db, begin=42)  # type: ignore[arg-type]


class TestForeignTransaction:
    def test_pending_statements_are_refused(self, tmp_path: Path, db: sqlite3.Connection) -> None:
        """Entering with uncommitted statements on the connection raises and leaves them alone."""
        db.execute("INSERT INTO items VALUES (1)")

        def body() -> None:
            with transaction(db):
                pass

        with pytest.raises(TransactionStateError, match="did not begin") as info:
            body()
        assert "sqlite3.Connection" in str(info.value)
        assert True is db.in_transaction
        db.commit()
        assert 1 == _count(tmp_path / "t.db")

    def test_body_that_commits_is_reported(self, tmp_path: Path, db: sqlite3.Connection) -> None:
        """A body that ends the transaction itself gets an error at exit."""

        def body() -> None:
            with transaction(db):
                db.execute("INSERT INTO items VALUES (1)")
                db.commit()

        with pytest.raises(TransactionStateError, match="ended inside the block"):
            body()
        assert False is db.in_transaction


class TestNested:
    def test_inner_error_rolls_back_to_savepoint(
        self, tmp_path: Path, db: sqlite3.Connection
    ) -> None:
        """An error in a nested block undoes only that block; the outer one commits."""
        with transaction(db):
            db.execute("INSERT INTO items VALUES (1)")

            def body() -> None:
                with transaction(db):
                    db.execute("INSERT INTO items VALUES (2)")
                    raise ValueError("inner")

            with pytest.raises(ValueError, match="inner"):
                body()
            db.execute("INSERT INTO items VALUES (3)")
        rows = sqlite3.connect(tmp_path / "t.db").execute("SELECT n FROM items ORDER BY n")
        assert [(1,), (3,)] == rows.fetchall()

    def test_inner_success_is_released_into_outer(
        self, tmp_path: Path, db: sqlite3.Connection
    ) -> None:
        """A nested block's work commits or rolls back with the outer transaction."""
        inner = transaction(db)

        def body() -> None:
            with transaction(db):
                with inner:
                    db.execute("INSERT INTO items VALUES (2)")
                assert "termsafe_sp_1" == inner.savepoint
                assert True is inner.committed
                raise RuntimeError("outer")

        with pytest.raises(RuntimeError, match="outer"):
            body()
        assert 0 == _count(tmp_path / "t.db")

    def test_deep_nesting(self, tmp_path: Path, db: sqlite3.Connection) -> None:
        """Three levels: the middle one fails, the innermost's work goes with it."""
        with transaction(db):
            db.execute("INSERT INTO items VALUES (1)")

            def body() -> None:
                with transaction(db):
                    db.execute("INSERT INTO items VALUES (2)")
                    with transaction(db):
                        db.execute("INSERT INTO items VALUES (3)")
                    raise KeyError("middle")

            with pytest.raises(KeyError):
                body()
            with transaction(db):
                db.execute("INSERT INTO items VALUES (4)")
        rows = sqlite3.connect(tmp_path / "t.db").execute("SELECT n FROM items ORDER BY n")
        assert [(1,), (4,)] == rows.fetchall()

    def test_nested_begin_is_refused(self, db: sqlite3.Connection) -> None:
        """A nested block cannot take its own begin statement."""
        with (
            transaction(db),
            pytest.raises(ConfigurationError, match="nested"),
            transaction(db, begin="BEGIN IMMEDIATE"),
        ):
            pass

    def test_other_thread_is_refused(self, tmp_path: Path) -> None:
        """A second thread's transaction() on a connection in use is an error, not a savepoint."""
        conn = _connect(tmp_path / "t.db", None, check_same_thread=False)
        conn.execute("CREATE TABLE items (n INTEGER)")
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with transaction(conn):
                    pass
            except BaseException as exc:
                errors.append(exc)

        with transaction(conn):
            thread = threading.Thread(target=other)
            thread.start()
            thread.join(WAIT)
        assert 1 == len(errors)
        assert isinstance(errors[0], TransactionStateError)
        assert "another thread" in str(errors[0])
        conn.close()


class Pep249Connection:
    """A DB-API 2.0 connection that exposes only cursor/commit/rollback (and autocommit).

    It is the shape termsafe may rely on for psycopg and other drivers; the
    database behind it is a real sqlite3 file.
    """

    def __init__(self, path: Path, *, autocommit: bool) -> None:
        self._conn = _connect(path, None if autocommit else "")
        self.autocommit = autocommit
        self.statements: list[str] = []
        self.commits = 0
        self.rollbacks = 0

    def cursor(self) -> Pep249Cursor:
        return Pep249Cursor(self)

    def commit(self) -> None:
        self.commits += 1
        self._conn.commit()

    def rollback(self) -> None:
        self.rollbacks += 1
        self._conn.rollback()

    def close(self) -> None:
        self._conn.close()


class Pep249Cursor:
    """The cursor of ``Pep249Connection``."""

    def __init__(self, conn: Pep249Connection) -> None:
        self._conn = conn
        self._cur = conn._conn.cursor()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._conn.statements.append(sql)
        self._cur.execute(sql, params)

    def close(self) -> None:
        self._cur.close()


class TestDbApi:
    def test_autocommit_connection_gets_begin_commit(self, tmp_path: Path) -> None:
        """With autocommit on, termsafe sends BEGIN and COMMIT through a cursor."""
        conn = Pep249Connection(tmp_path / "t.db", autocommit=True)
        conn.cursor().execute("CREATE TABLE items (n INTEGER)")
        with transaction(conn) as db:
            db.cursor().execute("INSERT INTO items VALUES (1)")
        assert [
            "CREATE TABLE items (n INTEGER)",
            "BEGIN",
            "INSERT INTO items VALUES (1)",
            "COMMIT",
        ] == conn.statements
        assert 1 == _count(tmp_path / "t.db")
        conn.close()

    def test_autocommit_connection_rolls_back(self, tmp_path: Path) -> None:
        """With autocommit on, an error sends ROLLBACK; DDL is undone too."""
        conn = Pep249Connection(tmp_path / "t.db", autocommit=True)

        def body() -> None:
            with transaction(conn):
                conn.cursor().execute("CREATE TABLE items (n INTEGER)")
                raise ValueError("x")

        with pytest.raises(ValueError, match="x"):
            body()
        assert "ROLLBACK" == conn.statements[-1]
        assert [] == _tables(sqlite3.connect(tmp_path / "t.db"))
        conn.close()

    def test_driver_managed_connection_uses_commit(self, tmp_path: Path) -> None:
        """Without autocommit, the driver begins and termsafe calls commit()."""
        conn = Pep249Connection(tmp_path / "t.db", autocommit=False)
        conn.cursor().execute("CREATE TABLE items (n INTEGER)")
        conn.commit()
        with transaction(conn):
            conn.cursor().execute("INSERT INTO items VALUES (1)")
        assert 2 == conn.commits
        assert 1 == _count(tmp_path / "t.db")

        def body() -> None:
            with transaction(conn):
                conn.cursor().execute("INSERT INTO items VALUES (2)")
                raise ValueError("y")

        with pytest.raises(ValueError, match="y"):
            body()
        assert 1 == conn.rollbacks
        assert 1 == _count(tmp_path / "t.db")
        conn.close()

    def test_driver_managed_refuses_begin(self, tmp_path: Path) -> None:
        """begin= on a driver-managed connection is an error naming the statement."""
        conn = Pep249Connection(tmp_path / "t.db", autocommit=False)

        def body() -> None:
            with transaction(conn, begin="BEGIN IMMEDIATE"):
                pass

        with pytest.raises(ConfigurationError, match="BEGIN IMMEDIATE"):
            body()
        conn.close()

    def test_savepoints_through_cursor(self, tmp_path: Path) -> None:
        """Nesting uses SAVEPOINT / ROLLBACK TO / RELEASE through the cursor."""
        conn = Pep249Connection(tmp_path / "t.db", autocommit=True)
        conn.cursor().execute("CREATE TABLE items (n INTEGER)")
        with transaction(conn):

            def body() -> None:
                with transaction(conn):
                    conn.cursor().execute("INSERT INTO items VALUES (1)")
                    raise KeyError("k")

            with pytest.raises(KeyError):
                body()
        assert [
            "BEGIN",
            "SAVEPOINT termsafe_sp_1",
            "INSERT INTO items VALUES (1)",
            "ROLLBACK TO SAVEPOINT termsafe_sp_1",
            "RELEASE SAVEPOINT termsafe_sp_1",
            "COMMIT",
        ] == conn.statements[1:]
        conn.close()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3 autocommit attribute is 3.12+")
class TestAutocommitAttribute:
    @pytest.mark.parametrize("autocommit", [True, False], ids=["true", "false"])
    def test_autocommit(self, tmp_path: Path, autocommit: bool) -> None:
        """sqlite3's autocommit attribute, True or False: DDL rolls back on an error and commits."""
        conn = sqlite3.connect(tmp_path / "t.db", **cast(Any, {"autocommit": autocommit}))

        def body() -> None:
            with transaction(conn):
                conn.execute("CREATE TABLE items (n INTEGER)")
                raise ValueError("z")

        with pytest.raises(ValueError, match="z"):
            body()
        assert [] == _tables(conn)
        with transaction(conn):
            conn.execute("CREATE TABLE items (n INTEGER)")
        assert ["items"] == _tables(sqlite3.connect(tmp_path / "t.db"))
        conn.close()


class SlowCommit(sqlite3.Connection):
    """A real sqlite3 connection whose COMMIT waits for the test to let it go (a ``CommitGate``)."""

    entered: threading.Event
    released: threading.Event

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.entered.set()
            assert self.released.wait(WAIT)
        return super().execute(sql, *args)

    def wait_entered(self) -> None:
        """Return once COMMIT is waiting."""
        assert self.entered.wait(WAIT)

    def release(self) -> None:
        """Let COMMIT go on."""
        self.released.set()


def _slow(path: Path) -> SlowCommit:
    conn = sqlite3.connect(path, isolation_level=None, factory=SlowCommit, check_same_thread=False)
    assert isinstance(conn, SlowCommit)
    conn.entered = threading.Event()
    conn.released = threading.Event()
    conn.execute("CREATE TABLE IF NOT EXISTS items (n INTEGER)")
    return conn


class TestInWorkflow:
    def test_kill_in_body_rolls_back(self, tmp_path: Path, make_term: Any, jobs: Any) -> None:
        """A kill landing at a checkpoint in the body rolls back; the workflow is terminated."""
        term: Terminator = make_term()
        events = event_types(term)
        conn = _connect(tmp_path / "t.db", "", check_same_thread=False)
        conn.execute("CREATE TABLE items (n INTEGER)")
        conn.commit()
        job = start_in_body(term, jobs, conn, lambda: conn.execute("INSERT INTO items VALUES (1)"))
        assert WorkflowState.TERMINATED == term.kill("w", by=ADMIN, reason="test").wait(WAIT)
        assert WorkflowState.TERMINATED == job.result()
        assert 0 == _count(tmp_path / "t.db")
        assert term.flush(WAIT)
        assert "transaction_rolled_back" in events
        assert "transaction_committed" not in events
        conn.close()

    def test_kill_during_commit_commits(self, tmp_path: Path, make_term: Any, jobs: Any) -> None:
        """A kill during COMMIT waits for it: committed on disk and reported committed."""
        term: Terminator = make_term()
        events = event_types(term)
        conn = _slow(tmp_path / "t.db")
        killed = kill_during_commit(term, jobs, conn, conn)
        assert WorkflowState.TERMINATED == killed.state
        assert isinstance(killed.error, Terminated) or killed.error is None
        assert 1 == _count(tmp_path / "t.db")
        assert "transaction_committed" in events
        assert "transaction_rolled_back" not in events
        conn.close()

    def test_commit_outlives_an_expired_grace(
        self, tmp_path: Path, make_term: Any, jobs: Any
    ) -> None:
        """Even a forced kill whose db grace ran out does not split the COMMIT."""
        term: Terminator = make_term(Phases(0.05, 30.0), section_grace={"db": 0.05})
        events = event_types(term)
        conn = _slow(tmp_path / "t.db")
        kill_during_commit(term, jobs, conn, conn, force=True)
        assert 1 == _count(tmp_path / "t.db")
        assert "transaction_committed" in events
        assert "transaction_rolled_back" not in events
        conn.close()

    def test_kill_pending_at_commit_rolls_back(
        self, tmp_path: Path, make_term: Any, jobs: Any
    ) -> None:
        """A kill that arrived in the body (no checkpoint since) rolls back at the commit step."""
        term: Terminator = make_term()
        conn = _connect(tmp_path / "t.db", None, check_same_thread=False)
        conn.execute("CREATE TABLE items (n INTEGER)")

        def body(pause: Callable[[], None]) -> None:
            with transaction(conn):
                conn.execute("INSERT INTO items VALUES (1)")
                pause()

        kill_in(term, jobs, body)
        assert 0 == _count(tmp_path / "t.db")
        conn.close()

    def test_inside_a_critical_section_the_kill_waits(
        self, tmp_path: Path, make_term: Any, jobs: Any
    ) -> None:
        """Inside the caller's own critical section a deferred kill lets the transaction commit."""
        term: Terminator = make_term()
        conn = _connect(tmp_path / "t.db", None, check_same_thread=False)
        conn.execute("CREATE TABLE items (n INTEGER)")

        def body(pause: Callable[[], None]) -> None:
            with ts.critical_section("db"), transaction(conn):
                conn.execute("INSERT INTO items VALUES (1)")
                pause()

        assert kill_in(term, jobs, body).deferred
        assert 1 == _count(tmp_path / "t.db")
        conn.close()

    def test_pending_kill_refuses_to_begin(self, tmp_path: Path, make_term: Any, jobs: Any) -> None:
        """With a kill pending, transaction() does not begin: Terminated, nothing sent."""
        term: Terminator = make_term()
        conn = _connect(tmp_path / "t.db", None, check_same_thread=False)
        conn.execute("CREATE TABLE items (n INTEGER)")

        def insert() -> None:
            with transaction(conn):
                conn.execute("INSERT INTO items VALUES (1)")

        assert isinstance(kill_before(term, jobs, insert), Terminated)
        assert False is conn.in_transaction
        assert 0 == _count(tmp_path / "t.db")
        conn.close()

    def test_abandoned_thread_is_interrupted(
        self, tmp_path: Path, make_term: Any, jobs: Any
    ) -> None:
        """A thread stuck in a query past the system phase is interrupted and rolled back."""
        term: Terminator = make_term(Phases(0.05, 0.05), hook_timeout=5.0)
        path = tmp_path / "t.db"
        conn = _connect(path, None, check_same_thread=False)
        conn.execute("CREATE TABLE items (n INTEGER)")
        started = threading.Event()

        def body() -> None:
            with term.workflow("w", owner="alice"), transaction(conn):
                conn.execute("INSERT INTO items VALUES (1)")
                started.set()
                # A query that runs for minutes unless interrupted.
                conn.execute(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                    "SELECT count(*) FROM c"
                ).fetchone()

        job = jobs.start(body)
        assert started.wait(WAIT)
        assert WorkflowState.KILLED == term.kill("w", by=ADMIN, reason="test").wait(WAIT)
        error = job.error(WAIT * 3)
        assert isinstance(error, (sqlite3.OperationalError, Terminated)), error
        assert False is conn.in_transaction
        assert 0 == _count(path)
        conn.close()


# -- SIGKILL -------------------------------------------------------------------------------

BATCH_ROWS = 1000
ACCOUNTS = 200
MIG_ROWS = 300
SCENARIOS = [
    # (scenario, journal mode, kills)
    ("batch", "wal", 55),
    ("update", "delete", 55),
    ("migration", "delete", 55),
    ("migration", "wal", 55),
]


def _setup_db(path: Path, scenario: str, journal: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute("BEGIN")
    if scenario == "batch":
        conn.execute("CREATE TABLE items (batch INTEGER, n INTEGER, payload TEXT)")
    elif scenario == "update":
        conn.execute(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER, version INTEGER)"
        )
        conn.executemany(
            "INSERT INTO accounts VALUES (?, 1000, 0)", [(i,) for i in range(ACCOUNTS)]
        )
    else:
        conn.execute("CREATE TABLE mig (id INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO mig VALUES (?)", [(i,) for i in range(MIG_ROWS)])
    conn.execute("COMMIT")
    conn.close()


def _trial(spec: dict[str, Any], path: str, fd: int) -> None:
    """The operation a forked child runs (then it is SIGKILLed, or completes)."""
    level = spec["level"]
    conn = sqlite3.connect(path, isolation_level=level, timeout=30)
    scenario = spec["scenario"]
    rng = random.Random(spec["trial"])
    with trial_workflow(spec):
        os.write(fd, b"R")
        with transaction(conn):
            if scenario == "batch":
                payload = "x" * 16
                for n in range(BATCH_ROWS):
                    conn.execute("INSERT INTO items VALUES (?, ?, ?)", (spec["trial"], n, payload))
            elif scenario == "update":
                ids = list(range(ACCOUNTS))
                rng.shuffle(ids)
                for a, b in zip(ids[::2], ids[1::2], strict=True):
                    amount = rng.randrange(1, 50)
                    conn.execute(
                        "UPDATE accounts SET balance = balance - ?, version = version + 1 "
                        "WHERE id = ?",
                        (amount, a),
                    )
                    conn.execute(
                        "UPDATE accounts SET balance = balance + ?, version = version + 1 "
                        "WHERE id = ?",
                        (amount, b),
                    )
            else:
                v = conn.execute("PRAGMA user_version").fetchone()[0]
                conn.execute(f"ALTER TABLE mig ADD COLUMN c{v} INTEGER NOT NULL DEFAULT 0")
                conn.execute(f"UPDATE mig SET c{v} = id * {v + 1}")
                conn.execute(f"CREATE INDEX mig_c{v} ON mig(c{v})")
                conn.execute(f"CREATE TABLE side_{v} (id INTEGER PRIMARY KEY, val INTEGER)")
                conn.execute(f"INSERT INTO side_{v} SELECT id, c{v} FROM mig")
                conn.execute(f"PRAGMA user_version = {v + 1}")


def _worker(path: str) -> None:
    """One process per scenario: forks a child per trial, SIGKILLs it after the given delay."""
    serve_trials(lambda spec, fd: _trial(spec, path, fd))


class Judge(VersionJudge):
    """Reads a scenario's database after each trial with SQLite's own checks."""

    def __init__(self, path: Path, scenario: str) -> None:
        self.path = path
        super().__init__(scenario, BATCH_ROWS)

    def snapshot(self) -> Any:
        conn = sqlite3.connect(self.path)
        try:
            assert "ok" == conn.execute("PRAGMA integrity_check").fetchone()[0]
            if self.scenario == "batch":
                return dict(
                    conn.execute("SELECT batch, count(*) FROM items GROUP BY batch").fetchall()
                )
            if self.scenario == "update":
                versions = {r[0] for r in conn.execute("SELECT DISTINCT version FROM accounts")}
                total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
                assert 1 == len(versions), f"accounts torn across versions {sorted(versions)}"
                assert ACCOUNTS * 1000 == total
                return versions.pop()
            v = conn.execute("PRAGMA user_version").fetchone()[0]
            cols = [r[1] for r in conn.execute("PRAGMA table_info(mig)")]
            assert ["id"] + [f"c{k}" for k in range(v)] == cols, f"user_version {v}, columns {cols}"
            tables = set(_tables(conn))
            assert {"mig"} | {f"side_{k}" for k in range(v)} == tables
            indexes = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
            }
            assert {f"mig_c{k}" for k in range(v)} == indexes
            for k in range(v):
                bad = conn.execute(
                    f"SELECT count(*) FROM mig WHERE c{k} != id * {k + 1}"
                ).fetchone()[0]
                assert 0 == bad
                assert MIG_ROWS == conn.execute(f"SELECT count(*) FROM side_{k}").fetchone()[0]
            return v
        finally:
            conn.close()


class TestSigkill:
    @pytest.mark.parametrize(("scenario", "journal", "kills"), SCENARIOS)
    def test_all_or_nothing(
        self, tmp_path: Path, kill_seed: int, scenario: str, journal: str, kills: int
    ) -> None:
        """Random SIGKILLs leave integrity_check ok and each transaction all-or-nothing."""
        # crc32, not hash(): str hashes change with PYTHONHASHSEED, so the same
        # TERMSAFE_KILL_SEED would not replay the same kills.
        seed = kill_seed + zlib.crc32(f"{scenario}/{journal}".encode()) % 1000
        path = tmp_path / "kill.db"
        _setup_db(path, scenario, journal)
        levels: list[str | None] = [None, "", "DEFERRED", "IMMEDIATE"]

        def spec(trial: int, rng: random.Random) -> dict[str, Any]:
            return {
                "scenario": scenario,
                "level": levels[trial % len(levels)],
                "in_workflow": trial % 2 == 1,
            }

        outcomes, _ = run_trials(
            [sys.executable, __file__, "worker", str(path)],
            seed=seed,
            kills=kills,
            spec=spec,
            judge=Judge(path, scenario).each_trial(),
        )
        assert outcomes["killed_before"] >= 5, (
            f"seed {seed}: kills must land mid-transaction: {outcomes}"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])
