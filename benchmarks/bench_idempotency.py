"""Cost of ``idempotent_call`` against the raw SQLite work it stands for.

First run: a durable ``idempotent_call`` (claim, record; no side effect in
the body) against two hand-written SQLite transactions with
``synchronous=FULL`` in WAL mode: the claim, one ``INSERT ... ON CONFLICT(key)
DO NOTHING`` (its row count says whether the key was new), and the record,
one ``UPDATE`` of the row with the result, each a statement on its own, so its
own transaction, durable when ``execute`` returns. That is the least a durable
claim-then-record can do (an explicit ``BEGIN IMMEDIATE ... COMMIT`` around
each would only add round trips), on the same table and index as the store
(the index on ``updated_at`` serves pruning) and with rows of the same size.
``idempotent_call`` does the same two statements, plus a read of the key
before the claim (so that a replay never waits for the write lock), the
request's fingerprint, its bookkeeping, the lease and an audit event. Each call
has its own request, as in real use (a key stands for one request); the
baseline gets the fingerprint for free.

Replay: ``idempotent_call`` of a key that already has a result, against one
raw read (one ``SELECT`` of the row by key on an open connection, and
``json.loads`` of the result). Two figures: a replay in the process that
recorded or replayed the key before (a store object keeps the done records it
read, since a done record never changes; and the request's fingerprint is
remembered) and a replay in a process that has not seen the key (one read of
the store, as after a restart: a fresh store object, and the remembered
fingerprints forgotten).

Both sides use files in the same folder, in the same run. Each round is a
pair of batches back to back, ours and the baseline's (first runs: 8 calls a
side, so that the audit thread's work after our calls stays on our side;
replays: 50; after a restart: 1), who goes first alternating, so that drift
in the machine's speed hits both alike. The value is the median of the
per-round ratios of the mean times per call; the detail gives the medians of
those mean times.

Run: ``python benchmarks/bench_idempotency.py [--quick]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from termsafe import _idempotency
from termsafe._idempotency import idempotent_call
from termsafe._store import SQLiteStore

REQUEST = {"amount": 4200, "currency": "eur", "customer": "cus_0042", "order": "ord-20240601-17"}
RESULT = {"id": "ch_3PXYZabc", "status": "succeeded", "amount": 4200, "paid": True}

SCHEMA = """
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    epoch INTEGER NOT NULL,
    owner TEXT NOT NULL,
    lease_expires REAL NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX idempotency_updated ON idempotency(updated_at)
"""


def _raw_conn(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for statement in SCHEMA.split(";"):
        conn.execute(statement)
    return conn


def _request(key: str) -> dict[str, object]:
    """The request a key stands for (each key its own, as in real use)."""
    return {**REQUEST, "order": key}


def _raw_first(conn: sqlite3.Connection, keys: list[str]) -> float:
    result = json.dumps(RESULT)
    fingerprint = hashlib.sha256(json.dumps(REQUEST).encode()).hexdigest()
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start_time": 1.5e9})
    execute = conn.execute
    started = time.perf_counter()
    for key in keys:
        now = time.time()
        claimed = execute(
            "INSERT INTO idempotency(key, fingerprint, status, epoch, owner, lease_expires, "
            "sent, created_at, updated_at) VALUES (?, ?, 'in_flight', 1, ?, ?, 1, ?, ?) "
            "ON CONFLICT(key) DO NOTHING",
            (key, fingerprint, owner, now + 60, now, now),
        )
        if claimed.rowcount != 1:
            raise AssertionError(f"{key!r} was claimed already")
        execute(
            "UPDATE idempotency SET status = 'done', result = ?, updated_at = ? WHERE key = ?",
            (result, time.time(), key),
        )
    return (time.perf_counter() - started) / len(keys)


def _ours_first(store: SQLiteStore, keys: list[str]) -> float:
    requests = [_request(key) for key in keys]
    started = time.perf_counter()
    for key, request in zip(keys, requests, strict=True):
        with idempotent_call(key, request=request, store=store) as call:
            call.record(RESULT)
    return (time.perf_counter() - started) / len(keys)


def _raw_read(conn: sqlite3.Connection, keys: list[str]) -> float:
    started = time.perf_counter()
    for key in keys:
        row = conn.execute(
            "SELECT fingerprint, result FROM idempotency WHERE key = ? AND status = 'done'",
            (key,),
        ).fetchone()
        json.loads(row[1])
    return (time.perf_counter() - started) / len(keys)


def _ours_replay(store: SQLiteStore, keys: list[str]) -> float:
    requests = [_request(key) for key in keys]
    started = time.perf_counter()
    for key, request in zip(keys, requests, strict=True):
        with idempotent_call(key, request=request, store=store) as call:
            if not call.replayed:
                raise AssertionError(f"{key!r} was not replayed")
    return (time.perf_counter() - started) / len(keys)


def _median_ratio(
    rounds: int, ours: Callable[[int], float], base: Callable[[int], float]
) -> tuple[float, float, float]:
    """``rounds`` pairs of small batches, back to back (who goes first alternates).

    Returns the median time of each side and the median of the per-pair
    ratios: the two batches of a pair meet the same machine, whereas the
    disk's fsync latency on a shared box drifts by an order of magnitude
    within seconds.
    """
    ours_t: list[float] = []
    base_t: list[float] = []
    for r in range(rounds):
        if r % 2:
            base_t.append(base(r))
            ours_t.append(ours(r))
        else:
            ours_t.append(ours(r))
            base_t.append(base(r))
    ratios = [o / b for o, b in zip(ours_t, base_t, strict=True)]
    return statistics.median(ours_t), statistics.median(base_t), statistics.median(ratios)


def collect(quick: bool) -> list[dict[str, object]]:
    """Measure both ratios; one row each (plus the replay after a restart)."""
    rounds = 61 if quick else 301
    # First runs go in batches of 8 calls a side: the audit event of a call is
    # delivered by a thread that runs on after the call returns, and with one
    # call a side that work lands in the baseline's timing half the time.
    per_round = 8
    reads = 50
    tmp = Path(tempfile.mkdtemp(prefix="termsafe-bench-idem-"))
    try:
        store = SQLiteStore(tmp / "store.sqlite3")
        raw = _raw_conn(tmp / "raw.sqlite3")
        try:
            # Warm both up (connections, statement caches, the file sizes).
            _ours_first(store, [f"warm-{i}" for i in range(10)])
            _raw_first(raw, [f"warm-{i}" for i in range(10)])

            def ours_first(r: int) -> float:
                return _ours_first(store, [f"first-{r}-{i}" for i in range(per_round)])

            def raw_first(r: int) -> float:
                return _raw_first(raw, [f"first-{r}-{i}" for i in range(per_round)])

            first = _median_ratio(rounds, ours_first, raw_first)

            done = [f"first-{r}-{i}" for r in range(rounds) for i in range(per_round)]
            hot = done[:reads]

            def ours_hot(r: int) -> float:
                return _ours_replay(store, hot)

            def raw_hot(r: int) -> float:
                return _raw_read(raw, hot)

            replay = _median_ratio(rounds, ours_hot, raw_hot)

            # Keys recorded through another store object, read by a fresh one
            # (and a fresh raw connection) each round: as in a process started
            # after the recording, with cold statement caches on both sides.
            def ours_cold(r: int) -> float:
                fresh = SQLiteStore(tmp / "store.sqlite3")
                try:
                    fresh.idem_status("warm-0")  # open the connection outside the timing
                    _idempotency._fingerprints.clear()  # as in a new process
                    return _ours_replay(fresh, [done[r * per_round]])
                finally:
                    fresh.close()

            def raw_cold(r: int) -> float:
                conn = sqlite3.connect(tmp / "raw.sqlite3", isolation_level=None)
                try:
                    conn.execute("SELECT 1 FROM idempotency LIMIT 1").fetchone()  # as above
                    return _raw_read(conn, [done[r * per_round]])
                finally:
                    conn.close()

            restart = _median_ratio(rounds, ours_cold, raw_cold)
        finally:
            raw.close()
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def row(
        name: str, figures: tuple[float, float, float], target: float, what: str
    ) -> dict[str, object]:
        ours, base, ratio = figures
        return {
            "name": name,
            "value": round(ratio, 3),
            "target": f"<= {target}",
            "unit": "x",
            "passed": ratio <= target,
            "detail": f"idempotent_call {ours * 1e6:.1f} us vs {what} {base * 1e6:.1f} us "
            f"(medians of {rounds} back-to-back pairs; value: median of their ratios)",
        }

    return [
        row("first run, durable / two raw SQLite transactions (FULL)", first, 1.2, "raw"),
        row("replay / one raw read", replay, 1.0, "raw read"),
        row("replay in a fresh process (same path) / one raw read", restart, 1.0, "raw read"),
    ]


def main() -> None:
    """Print the rows."""
    for r in collect("--quick" in sys.argv):
        status = "ok" if r["passed"] else "MISSED"
        print(f"{r['name']}: {r['value']}{r['unit']} (target {r['target']}) {status}")
        print(f"    {r['detail']}")


if __name__ == "__main__":
    main()
