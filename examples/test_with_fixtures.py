"""Testing workflows under kills with termsafe's pytest fixtures.

The plugin is loaded automatically once termsafe is installed; these tests
use its fixtures: ``terminator`` (an isolated terminator, also the default
one during the test), ``kill`` (a kill that lands at an exact place),
``audit_events`` (the audit trail, with ``assert_sequence``) and ``chaos``
(seeded random kills; ``--chaos-seed=N`` reproduces a run).

Run it: ``python -m pytest examples/test_with_fixtures.py`` (or
``python examples/test_with_fixtures.py``). See docs/testing.md.
"""

# ruff: noqa: SIM300 - tests in this project assert `expected == actual` (house style)

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import termsafe as ts
from termsafe.testing import AuditEvents, Chaos, KillScheduler

BATCHES = 5
ROWS_PER_BATCH = 20


def import_orders(conn: sqlite3.Connection) -> None:
    """Insert every batch in one transaction, with a cancellation point after each batch."""
    with ts.transaction(conn):
        for batch in range(BATCHES):
            conn.executemany(
                "INSERT INTO orders (batch, n) VALUES (?, ?)",
                ((batch, n) for n in range(ROWS_PER_BATCH)),
            )
            ts.checkpoint({"batch": batch})


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    """A SQLite database with an empty ``orders`` table."""
    connection = sqlite3.connect(tmp_path / "shop.sqlite3")
    connection.execute("CREATE TABLE orders (batch INTEGER, n INTEGER)")
    connection.commit()
    return connection


def count(conn: sqlite3.Connection) -> int:
    """How many orders the database holds."""
    rows: int = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return rows


class TestKillsAtExactPlaces:
    def test_kill_at_the_second_checkpoint(
        self, terminator: ts.Terminator, kill: KillScheduler
    ) -> None:
        """A kill at the second cancellation point stops the loop after its first step."""
        scheduled = kill.at_point("export", 2)
        reached = []
        with ts.workflow("export") as wf:
            for step in range(5):
                ts.checkpoint()
                reached.append(step)
        assert [0] == reached
        assert "terminated" == wf.state
        assert scheduled.fired

    def test_kill_inside_a_section_waits_for_it(
        self,
        terminator: ts.Terminator,
        kill: KillScheduler,
        audit_events: AuditEvents,
        tmp_path: Path,
    ) -> None:
        """A kill that arrives inside an fs section is deferred until the file is complete."""
        kill.on_section_entry("report", "fs")
        target = tmp_path / "report.txt"
        with ts.workflow("report") as wf:
            with ts.critical_section("fs"), target.open("w") as f:
                f.write("header\n")
                ts.checkpoint()  # the kill arrives here, and waits
                f.write("body\n")
            ts.checkpoint()  # never reached: the kill landed as the section ended
            target.write_text("overwritten\n")
        assert "header\nbody\n" == target.read_text()
        assert "terminated" == wf.state
        audit_events.assert_sequence(
            "kill_requested",
            "kill_deferred",
            "kill_effective",
            "workflow_finished",
            workflow_id="report",
        )

    def test_transaction_rolls_back_when_the_grace_runs_out(
        self, terminator: ts.Terminator, kill: KillScheduler, conn: sqlite3.Connection
    ) -> None:
        """A db section cut after its grace rolls the whole import back."""
        kill.on_grace_expiry("import", "db")
        with ts.workflow("import") as wf, ts.critical_section("db"):
            import_orders(conn)
        assert 0 == count(conn)
        assert "terminated" == wf.state


class TestChaos:
    def test_imports_are_all_or_nothing_under_random_kills(
        self, terminator: ts.Terminator, chaos: Chaos, conn: sqlite3.Connection
    ) -> None:
        """Whatever random kills land, each import leaves all its rows or none."""
        chaos.arm(probability=0.2, force=0.3, max_kills=None)
        outcomes = {}
        for run in range(10):
            before = count(conn)
            with ts.workflow(f"import-{run}") as wf:
                import_orders(conn)
            added = count(conn) - before
            assert added in (0, BATCHES * ROWS_PER_BATCH), f"run {run} left {added} rows"
            outcomes[run] = (wf.state, added)
        full = BATCHES * ROWS_PER_BATCH
        # A kill that arrived during the COMMIT waited for it: terminated, yet all rows are in.
        assert all(added == full for state, added in outcomes.values() if state == "completed")
        killed = {k.workflow_id for k in chaos.kills}
        terminated = {
            f"import-{run}" for run, (state, _) in outcomes.items() if state == "terminated"
        }
        assert killed == terminated


@pytest.mark.termsafe_backends
async def test_async_workflow_is_killed_at_its_checkpoint(
    terminator: ts.Terminator, kill: KillScheduler, termsafe_backend: str
) -> None:
    """On asyncio and on trio, the kill lands at the workflow's first checkpoint."""
    kill.at_point("sync-users", 1)
    async with ts.workflow("sync-users") as wf:
        ts.checkpoint()
        pytest.fail("the kill should have landed at the checkpoint")
    assert "terminated" == wf.state


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
