"""transaction(conn) with psycopg 3 on a real PostgreSQL server: commit, roll back, kills, SIGKILLs.

A throwaway cluster (``tests/_pg.py``) is started once for the module, on a
Unix socket only; each test works in a schema of its own. Without PostgreSQL's
programs or psycopg the tests are skipped with the reason, unless
``TERMSAFE_REQUIRE_POSTGRES`` is set: CI (``.ci/run``) installs both and sets
it, so there they run or fail.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from _kills import event_types, kill_during_commit, start_in_body
from _sigkill import VersionJudge, run_trials, serve_trials, trial_workflow
from conftest import ADMIN, WAIT

import termsafe as ts
from termsafe import (
    ConfigurationError,
    Phases,
    Terminated,
    Terminator,
    TransactionStateError,
    WorkflowState,
    transaction,
)

try:
    import psycopg

    HAVE_PSYCOPG = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_PSYCOPG = False

from _pg import PgCluster, find_bindir, unavailable_reason

MODES = [pytest.param(False, id="driver-begins"), pytest.param(True, id="autocommit")]


#: Set (by .ci/run) where PostgreSQL must be there: a missing piece fails instead of skipping.
REQUIRE = "TERMSAFE_REQUIRE_POSTGRES"


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of its own for this module, stopped and removed afterwards."""
    reason = unavailable_reason()
    if not HAVE_PSYCOPG:
        reason = "psycopg 3 is not installed (the test extra installs 'psycopg[binary]')"
    if reason is not None:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set but {reason}")
        pytest.skip(reason)
    bindir = find_bindir()
    assert bindir is not None
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Pg:
    """One test's schema in the cluster; every connection it opens is closed at teardown."""

    def __init__(self, cluster: PgCluster, schema: str) -> None:
        self.cluster = cluster
        self.schema = schema
        self.conninfo = f"{cluster.conninfo} options='-c search_path={schema}'"
        self._conns: list[psycopg.Connection[Any]] = []
        self.check = self.connect(autocommit=True)

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A new connection to the schema."""
        conn = psycopg.connect(self.conninfo, autocommit=autocommit)
        self._conns.append(conn)
        return conn

    def value(self, sql: str) -> Any:
        """The first column of the first row of ``sql``, read on the checking connection."""
        row = self.check.execute(sql).fetchone()
        assert row is not None
        return row[0]

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """All rows of ``sql``, read on the checking connection."""
        return self.check.execute(sql).fetchall()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


@pytest.fixture
def pg(pg_cluster: PgCluster) -> Iterator[Pg]:
    """A fresh schema with ``items(n int unique)``; dropped (with its connections) afterwards."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_cluster.conninfo, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    db = Pg(pg_cluster, schema)
    db.check.execute("CREATE TABLE items (n int UNIQUE)")
    try:
        yield db
    finally:
        db.close()
        with psycopg.connect(pg_cluster.conninfo, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def _status(conn: psycopg.Connection[Any]) -> str:
    return conn.info.transaction_status.name


class TestCommit:
    @pytest.mark.parametrize("autocommit", MODES)
    def test_commits_on_success(self, pg: Pg, autocommit: bool) -> None:
        """A clean exit commits: a second connection sees every row."""
        conn = pg.connect(autocommit=autocommit)
        tx = transaction(conn)
        with tx as db:
            db.cursor().executemany("INSERT INTO items VALUES (%s)", [(i,) for i in range(10)])
        assert 10 == pg.value("SELECT count(*) FROM items")
        assert True is tx.committed
        assert "IDLE" == _status(conn)

    @pytest.mark.parametrize("autocommit", MODES)
    def test_rolls_back_on_error(self, pg: Pg, autocommit: bool) -> None:
        """An exception in the body rolls every row back and propagates."""
        conn = pg.connect(autocommit=autocommit)
        tx = transaction(conn)

        def body() -> None:
            with tx:
                conn.cursor().executemany(
                    "INSERT INTO items VALUES (%s)", [(i,) for i in range(10)]
                )
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            body()
        assert 0 == pg.value("SELECT count(*) FROM items")
        assert False is tx.committed
        assert "IDLE" == _status(conn)

    @pytest.mark.parametrize("autocommit", MODES)
    def test_migration_rolls_back(self, pg: Pg, autocommit: bool) -> None:
        """CREATE TABLE, ALTER TABLE and CREATE INDEX roll back together (transactional DDL)."""
        conn = pg.connect(autocommit=autocommit)

        def body() -> None:
            with transaction(conn):
                conn.execute("CREATE TABLE extra (x text)")
                conn.execute("ALTER TABLE items ADD COLUMN label text")
                conn.execute("CREATE INDEX items_label ON items (label)")
                raise RuntimeError("half-way")

        with pytest.raises(RuntimeError, match="half-way"):
            body()
        tables = pg.rows(
            f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{pg.schema}'"
        )
        assert [("items",)] == tables
        columns = pg.rows(
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = '{pg.schema}' AND table_name = 'items'"
        )
        assert [("n",)] == columns
        assert 0 == pg.value("SELECT count(*) FROM pg_indexes WHERE indexname = 'items_label'")

    @pytest.mark.parametrize("autocommit", MODES)
    def test_nested_block_is_a_savepoint(self, pg: Pg, autocommit: bool) -> None:
        """An error in a nested transaction() undoes only its rows; the outer one commits."""
        conn = pg.connect(autocommit=autocommit)
        with transaction(conn):
            conn.execute("INSERT INTO items VALUES (1)")

            def inner() -> None:
                with transaction(conn):
                    conn.execute("INSERT INTO items VALUES (2)")
                    raise KeyError("inner")

            with pytest.raises(KeyError):
                inner()
            conn.execute("INSERT INTO items VALUES (3)")
        assert [(1,), (3,)] == pg.rows("SELECT n FROM items ORDER BY n")


class TestPsycopgInterface:
    @pytest.mark.parametrize("autocommit", MODES)
    def test_caught_statement_error_is_not_reported_committed(
        self, pg: Pg, autocommit: bool
    ) -> None:
        """A statement error the body caught aborts the transaction: exit raises, no commit."""
        conn = pg.connect(autocommit=autocommit)
        tx = transaction(conn)

        def body() -> None:
            with tx:
                conn.execute("INSERT INTO items VALUES (1)")
                with pytest.raises(psycopg.errors.UniqueViolation):
                    conn.execute("INSERT INTO items VALUES (1)")

        with pytest.raises(TransactionStateError, match="can only roll this transaction back"):
            body()
        assert False is tx.committed
        assert 0 == pg.value("SELECT count(*) FROM items")
        assert "IDLE" == _status(conn)

    @pytest.mark.parametrize("autocommit", MODES)
    def test_expected_error_in_a_nested_block_is_recovered(self, pg: Pg, autocommit: bool) -> None:
        """A statement error caught outside a nested transaction() leaves the outer one healthy."""
        conn = pg.connect(autocommit=autocommit)
        with transaction(conn):
            conn.execute("INSERT INTO items VALUES (1)")
            with pytest.raises(psycopg.errors.UniqueViolation), transaction(conn):
                conn.execute("INSERT INTO items VALUES (1)")
            conn.execute("INSERT INTO items VALUES (2)")
        assert [(1,), (2,)] == pg.rows("SELECT n FROM items ORDER BY n")

    @pytest.mark.parametrize("autocommit", MODES)
    def test_psycopg_block_inside_is_a_savepoint(self, pg: Pg, autocommit: bool) -> None:
        """psycopg's conn.transaction() first in the body is a savepoint: it cannot commit alone."""
        conn = pg.connect(autocommit=autocommit)

        def body() -> None:
            with transaction(conn):
                with conn.transaction() as inner:
                    conn.execute("INSERT INTO items VALUES (1)")
                assert inner.savepoint_name is not None
                raise ValueError("after the inner block")

        with pytest.raises(ValueError, match="after the inner block"):
            body()
        assert 0 == pg.value("SELECT count(*) FROM items")

    @pytest.mark.parametrize("autocommit", MODES)
    def test_inside_a_psycopg_block_is_refused(self, pg: Pg, autocommit: bool) -> None:
        """Entered inside psycopg's conn.transaction(), transaction() refuses: no second BEGIN."""
        conn = pg.connect(autocommit=autocommit)

        def body() -> None:
            with conn.transaction():
                conn.execute("INSERT INTO items VALUES (1)")
                with transaction(conn):
                    conn.execute("INSERT INTO items VALUES (2)")

        with pytest.raises(TransactionStateError, match="did not begin") as info:
            body()
        assert "psycopg.Connection" in str(info.value)
        assert 0 == pg.value("SELECT count(*) FROM items")

    def test_pending_statements_are_refused(self, pg: Pg) -> None:
        """Uncommitted statements before the block are refused and left alone."""
        conn = pg.connect()
        conn.execute("INSERT INTO items VALUES (1)")

        def body() -> None:
            with transaction(conn):
                pass

        with pytest.raises(TransactionStateError, match="did not begin"):
            body()
        assert "INTRANS" == _status(conn)
        conn.commit()
        assert 1 == pg.value("SELECT count(*) FROM items")

    @pytest.mark.parametrize("autocommit", MODES)
    def test_commit_in_the_body_is_refused(self, pg: Pg, autocommit: bool) -> None:
        """conn.commit() inside the block is psycopg's ProgrammingError; the block rolls back."""
        conn = pg.connect(autocommit=autocommit)

        def body() -> None:
            with transaction(conn):
                conn.execute("INSERT INTO items VALUES (1)")
                conn.commit()

        with pytest.raises(psycopg.ProgrammingError, match="commit"):
            body()
        assert 0 == pg.value("SELECT count(*) FROM items")

    @pytest.mark.parametrize("autocommit", MODES)
    def test_connection_settings_apply(self, pg: Pg, autocommit: bool) -> None:
        """isolation_level and read_only of the connection are those of the transaction."""
        conn = pg.connect(autocommit=autocommit)
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        conn.read_only = True
        with transaction(conn):
            assert "serializable" == conn.execute("SHOW transaction_isolation").fetchone()[0]  # type: ignore[index]
            assert "on" == conn.execute("SHOW transaction_read_only").fetchone()[0]  # type: ignore[index]

    def test_begin_argument_in_autocommit_mode(self, pg: Pg) -> None:
        """begin= is the statement sent on an autocommit connection."""
        conn = pg.connect(autocommit=True)
        with transaction(conn, begin="BEGIN ISOLATION LEVEL REPEATABLE READ"):
            conn.execute("INSERT INTO items VALUES (1)")
            assert "repeatable read" == conn.execute("SHOW transaction_isolation").fetchone()[0]  # type: ignore[index]
        assert 1 == pg.value("SELECT count(*) FROM items")

    def test_begin_argument_needs_autocommit(self, pg: Pg) -> None:
        """begin= on a connection whose driver begins is refused, naming the statement."""
        conn = pg.connect()

        def body() -> None:
            with transaction(conn, begin="BEGIN ISOLATION LEVEL SERIALIZABLE"):
                pass

        with pytest.raises(ConfigurationError, match="SERIALIZABLE"):
            body()


class HeldCommit:
    """Holds every COMMIT that inserted into ``items`` at a gate the test opens (a ``CommitGate``).

    A deferred constraint trigger runs inside COMMIT, before the commit record:
    it releases the session lock ``entered`` (``conn`` takes it here; the test
    waits for it, so it learns the COMMIT started), then waits for the
    advisory lock ``gate``, which the checking connection holds until
    ``release``.

    Args:
        pg: The test's schema.
        conn: The connection whose COMMIT is held; in autocommit mode here
            (its mode may be changed afterwards).
    """

    def __init__(self, pg: Pg, conn: psycopg.Connection[Any]) -> None:
        self.pg = pg
        self.entered, self.gate = (secrets.randbits(62) for _ in range(2))
        pg.check.execute(
            f"""
            CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_unlock({self.entered});
                PERFORM pg_advisory_xact_lock({self.gate});
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER items_hold AFTER INSERT ON items
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit();
            """
        )
        conn.execute(f"SELECT pg_advisory_lock({self.entered})")
        pg.check.execute(f"SELECT pg_advisory_lock({self.gate})")

    def wait_entered(self) -> None:
        """Return once a COMMIT released ``entered`` (it is running and held)."""
        waiter = self.pg.connect(autocommit=True)
        waiter.execute(f"SET lock_timeout = '{int(WAIT)}s'")
        waiter.execute(f"SELECT pg_advisory_lock({self.entered})")  # returns once COMMIT runs

    def release(self) -> None:
        """Open the gate: the held COMMIT finishes."""
        self.pg.check.execute(f"SELECT pg_advisory_unlock({self.gate})")


class TestInWorkflow:
    @pytest.mark.parametrize("autocommit", MODES)
    def test_kill_in_body_rolls_back(
        self, pg: Pg, make_term: Any, jobs: Any, autocommit: bool
    ) -> None:
        """A kill landing at a checkpoint in the body rolls back; the workflow is terminated."""
        term: Terminator = make_term()
        events = event_types(term)
        conn = pg.connect(autocommit=autocommit)
        job = start_in_body(
            term,
            jobs,
            conn,
            lambda: conn.cursor().executemany(
                "INSERT INTO items VALUES (%s)", [(i,) for i in range(100)]
            ),
        )
        assert 100 == conn.execute("SELECT count(*) FROM items").fetchone()[0]  # type: ignore[index]
        assert WorkflowState.TERMINATED == term.kill("w", by=ADMIN, reason="test").wait(WAIT)
        assert WorkflowState.TERMINATED == job.result()
        assert 0 == pg.value("SELECT count(*) FROM items")
        assert "IDLE" == _status(conn)
        assert term.flush(WAIT)
        assert "transaction_rolled_back" in events
        assert "transaction_committed" not in events

    @pytest.mark.parametrize("autocommit", MODES)
    def test_kill_during_commit_commits(
        self, pg: Pg, make_term: Any, jobs: Any, autocommit: bool
    ) -> None:
        """A kill during a COMMIT the server is running waits for it: committed, and said so."""
        term: Terminator = make_term()
        events = event_types(term)
        conn = pg.connect(autocommit=True)
        gate = HeldCommit(pg, conn)
        conn.autocommit = autocommit
        killed = kill_during_commit(term, jobs, conn, gate)
        assert WorkflowState.TERMINATED == killed.state
        assert isinstance(killed.error, Terminated) or killed.error is None
        assert 1 == pg.value("SELECT count(*) FROM items")
        assert "transaction_committed" in events
        assert "transaction_rolled_back" not in events

    def test_commit_outlives_an_expired_grace(self, pg: Pg, make_term: Any, jobs: Any) -> None:
        """Even a forced kill whose db grace ran out does not split the COMMIT."""
        term: Terminator = make_term(Phases(0.05, 30.0), section_grace={"db": 0.05})
        events = event_types(term)
        conn = pg.connect(autocommit=True)
        killed = kill_during_commit(term, jobs, conn, HeldCommit(pg, conn), force=True)
        assert 1 == pg.value("SELECT count(*) FROM items")
        assert True is killed.committed
        assert "transaction_rolled_back" not in events


# -- SIGKILL -------------------------------------------------------------------------------

BATCH_ROWS = 1000
BATCH_CHUNK = 100
MIG_ROWS = 300
SCENARIOS = [("batch", 40), ("migration", 40)]


def _setup_scenario(pg: Pg, scenario: str) -> None:
    if scenario == "batch":
        pg.check.execute("CREATE TABLE batch_items (batch int, n int, payload text)")
    else:
        pg.check.execute("CREATE TABLE mig (id int PRIMARY KEY)")
        pg.check.execute(f"INSERT INTO mig SELECT generate_series(0, {MIG_ROWS - 1})")
        pg.check.execute("CREATE TABLE schema_version (v int NOT NULL)")
        pg.check.execute("INSERT INTO schema_version VALUES (0)")


def _trial(spec: dict[str, Any], conninfo: str, fd: int) -> None:
    """The operation a forked child runs (then it is SIGKILLed, or completes)."""
    conn = psycopg.connect(conninfo, autocommit=True)
    # Held until this process's server session ends: the judge waits for it.
    conn.execute("SELECT pg_advisory_lock(%s)", (spec["lock"],))
    conn.autocommit = spec["autocommit"]
    with trial_workflow(spec):
        os.write(fd, b"R")
        with transaction(conn):
            if spec["scenario"] == "batch":
                # In chunks: one executemany() is a single pipeline sync, which
                # PostgreSQL already runs as one implicit transaction.
                cursor = conn.cursor()
                for start in range(0, BATCH_ROWS, BATCH_CHUNK):
                    cursor.executemany(
                        "INSERT INTO batch_items VALUES (%s, %s, %s)",
                        [(spec["trial"], n, "x" * 16) for n in range(start, start + BATCH_CHUNK)],
                    )
                    ts.checkpoint()
            else:
                row = conn.execute("SELECT v FROM schema_version").fetchone()
                assert row is not None
                v = row[0]
                conn.execute(f"ALTER TABLE mig ADD COLUMN c{v} int NOT NULL DEFAULT 0")
                conn.execute(f"UPDATE mig SET c{v} = id * {v + 1}")
                conn.execute(f"CREATE INDEX mig_c{v} ON mig (c{v})")
                conn.execute(f"CREATE TABLE side_{v} (id int PRIMARY KEY, val int)")
                conn.execute(f"INSERT INTO side_{v} SELECT id, c{v} FROM mig")
                conn.execute("UPDATE schema_version SET v = v + 1")
    conn.close()


def _worker(conninfo: str) -> None:
    """One process per scenario: forks a child per trial, SIGKILLs it after the given delay.

    The worker never opens a connection: a libpq connection must not cross a
    fork, so each child opens its own.
    """
    serve_trials(lambda spec, fd: _trial(spec, conninfo, fd))


class Judge(VersionJudge):
    """Reads a scenario's tables after each trial, once the trial's server session has ended."""

    def __init__(self, pg: Pg, scenario: str, lock: int) -> None:
        self.pg = pg
        self.lock = lock
        self.conn = pg.connect(autocommit=True)
        self.conn.execute(f"SET lock_timeout = '{int(WAIT * 3)}s'")
        super().__init__(scenario, BATCH_ROWS)

    def settle(self) -> None:
        """Wait until the last trial's server session is gone (its advisory lock is free).

        A SIGKILLed client's session ends, rolling back or finishing its
        COMMIT, only once the server notices; reading before that could see a
        COMMIT complete after the read.
        """
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.lock,))
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.lock,))

    def snapshot(self) -> Any:
        self.settle()
        pg = self.pg
        if self.scenario == "batch":
            return dict(pg.rows("SELECT batch, count(*) FROM batch_items GROUP BY batch"))
        v = pg.value("SELECT v FROM schema_version")
        cols = [
            r[0]
            for r in pg.rows(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                f"'{pg.schema}' AND table_name = 'mig' ORDER BY ordinal_position"
            )
        ]
        assert ["id"] + [f"c{k}" for k in range(v)] == cols, f"version {v}, columns {cols}"
        tables = {
            r[0]
            for r in pg.rows(
                "SELECT table_name FROM information_schema.tables "
                f"WHERE table_schema = '{pg.schema}' AND table_name LIKE 'side%'"
            )
        }
        assert {f"side_{k}" for k in range(v)} == tables
        indexes = {
            r[0]
            for r in pg.rows(
                f"SELECT indexname FROM pg_indexes WHERE schemaname = '{pg.schema}' "
                "AND tablename = 'mig' AND indexname LIKE 'mig_c%'"
            )
        }
        assert {f"mig_c{k}" for k in range(v)} == indexes
        if v:
            bad = " OR ".join(f"c{k} != id * {k + 1}" for k in range(v))
            assert 0 == pg.value(f"SELECT count(*) FROM mig WHERE {bad}")
            sides = " UNION ALL ".join(f"SELECT count(*) AS c FROM side_{k}" for k in range(v))
            assert [(MIG_ROWS,)] * v == pg.rows(f"SELECT c FROM ({sides}) AS s")
        return v


class TestSigkill:
    @pytest.mark.parametrize(("scenario", "kills"), SCENARIOS)
    def test_all_or_nothing(self, pg: Pg, kill_seed: int, scenario: str, kills: int) -> None:
        """Random SIGKILLs of the client leave each transaction all-or-nothing on the server."""
        seed = kill_seed + sum(map(ord, scenario))
        _setup_scenario(pg, scenario)
        lock = secrets.randbits(62)

        def spec(trial: int, rng: random.Random) -> dict[str, Any]:
            return {
                "scenario": scenario,
                "autocommit": trial % 2 == 0,
                "in_workflow": trial % 4 >= 2,
                "lock": lock,
            }

        outcomes, reports = run_trials(
            [sys.executable, __file__, "worker", pg.conninfo],
            seed=seed,
            kills=kills,
            spec=spec,
            judge=Judge(pg, scenario, lock).each_trial(),
        )
        print(f"{scenario}: seed {seed}, {len(reports)} trials, {outcomes}")
        assert outcomes["killed_before"] >= 5, (
            f"seed {seed}: kills must land mid-transaction: {outcomes}"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])
