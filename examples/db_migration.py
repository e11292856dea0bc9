"""A SQLite schema migration killed half-way: nothing of it stays, and a re-run completes it.

Migration 2 of a shop's database adds a ``label`` column to ``items``, fills
it in batches (a cancellation point after each batch), indexes it and sets
``PRAGMA user_version = 2``, all inside one ``transaction()``. An operator
kills the workflow half-way through the ten batches: the kill lands at the
next checkpoint, the transaction rolls back (DDL included: ``transaction()`` sends
an explicit ``BEGIN``), and the database is exactly as before: version 1, no
``label`` column, no index. Running the migration again applies all of it.

Run it: ``python examples/db_migration.py``.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from pathlib import Path

import termsafe as ts

ROWS = 10_000
BATCH = 1_000
OPERATOR = ts.Principal("ops", roles=["admin"])
WAIT = 30.0


def create_shop(path: Path) -> None:
    """Version 1 of the schema, with some rows."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO items (id, name) VALUES (?, ?)", ((i, f"item {i}") for i in range(ROWS))
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()


def migrate_to_2(
    conn: sqlite3.Connection,
    halfway: threading.Event | None = None,
    go_on: threading.Event | None = None,
) -> None:
    """Add, fill and index ``items.label``; one transaction, a checkpoint per batch."""
    with ts.transaction(conn):
        conn.execute("ALTER TABLE items ADD COLUMN label TEXT")
        for start in range(0, ROWS, BATCH):
            conn.execute(
                "UPDATE items SET label = upper(name) WHERE id >= ? AND id < ?",
                (start, start + BATCH),
            )
            ts.checkpoint({"labelled_up_to": start + BATCH})  # a kill lands here
            if halfway is not None and go_on is not None and start + BATCH == ROWS // 2:
                halfway.set()  # tell the operator we are half-way ...
                go_on.wait(WAIT)  # ... and carry on once the kill was sent
        conn.execute("CREATE INDEX items_label ON items(label)")
        conn.execute("PRAGMA user_version = 2")


def describe(path: Path) -> dict[str, object]:
    """What the database looks like, read through a fresh connection."""
    conn = sqlite3.connect(path)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(items)")]
        return {
            "user_version": conn.execute("PRAGMA user_version").fetchone()[0],
            "columns": columns,
            "labelled": conn.execute(
                "SELECT count(*) FROM items WHERE label IS NOT NULL"
            ).fetchone()[0]
            if "label" in columns
            else 0,
            "indexes": [row[1] for row in conn.execute("PRAGMA index_list(items)")],
            "integrity": conn.execute("PRAGMA integrity_check").fetchone()[0],
        }
    finally:
        conn.close()


def killed_run(path: Path) -> ts.WorkflowState:
    """Run the migration in a workflow thread; kill it half-way."""
    halfway, go_on = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def run() -> None:
        conn = sqlite3.connect(path)
        try:
            with term.workflow("migrate-shop-db", owner="ops") as wf:
                migrate_to_2(conn, halfway, go_on)
            seen["checkpoint"] = wf.last_checkpoint
        finally:
            conn.close()

    with ts.Terminator(phases=ts.Phases(graceful=5, forced=5)) as term:
        worker = threading.Thread(target=run)
        worker.start()
        try:
            assert halfway.wait(WAIT), "the migration never got half-way"
            handle = term.kill("migrate-shop-db", by=OPERATOR, reason="maintenance window over")
            go_on.set()
            final = handle.wait(WAIT)
        finally:
            go_on.set()
            worker.join(WAIT)
    print(f"killed run: final state {final}; the kill landed at checkpoint {seen['checkpoint']}")
    return final


def main() -> None:
    """Create the database, kill the migration half-way, check it, re-run it, check again."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shop.sqlite3"
        create_shop(path)
        before = describe(path)
        print(f"before:       {before}")

        assert killed_run(path) == ts.WorkflowState.TERMINATED
        after_kill = describe(path)
        print(f"after kill:   {after_kill}")
        assert after_kill == before, "the half-done migration left something behind"

        conn = sqlite3.connect(path)
        try:
            with ts.Terminator() as term, term.workflow("migrate-shop-db", owner="ops") as wf:
                migrate_to_2(conn)
        finally:
            conn.close()
        after_rerun = describe(path)
        print(f"after re-run: {after_rerun} ({wf.state})")
        assert wf.state == ts.WorkflowState.COMPLETED
        assert after_rerun == {
            "user_version": 2,
            "columns": ["id", "name", "label"],
            "labelled": ROWS,
            "indexes": ["items_label"],
            "integrity": "ok",
        }
        print("the migration was applied all or nothing: OK")


if __name__ == "__main__":
    main()
