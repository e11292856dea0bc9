"""Benchmark of ``transaction(conn)`` against the raw statements it wraps.

One sqlite3 file, one connection (``isolation_level=None``), one table. The
baseline is the hand-written transaction ``BEGIN; INSERT; COMMIT`` through
``conn.execute``; the subject is ``with transaction(conn): conn.execute(INSERT)``,
which sends the same three statements. Both run in the same process on the
same file, one transaction of each back to back (alternating which goes
first), so both see the same disk; each round compares the medians of its
per-transaction times, and the figure is the median of the per-round ratios.

Rows:

1. durable (sqlite3's defaults: rollback journal, ``synchronous=FULL``),
   outside any workflow: target ``<= 1.1``;
2. the same inside a thread workflow (the commit step opens a ``db``
   critical section, shields it and writes an audit event): ``<= 1.1``.

The detail of each row also gives the absolute overhead per transaction,
measured on a second file with ``journal_mode=WAL`` and ``synchronous=OFF``
(no fsync), where a commit costs microseconds and the wrapper's own cost
shows: that figure has no target, it is printed so nobody has to guess it.
"""

from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from termsafe import Phases, Terminator, transaction

__all__ = ["collect"]

Row = dict[str, Any]

TARGET = 1.1


class NullSink:
    """An audit sink that drops events: the benchmark measures the transaction, not a sink."""

    def emit(self, event: object) -> None:
        """Drop ``event``."""

    def close(self) -> None:
        """Nothing to close."""


def _open(path: str, *, durable: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    if not durable:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
    conn.execute("CREATE TABLE IF NOT EXISTS items (n INTEGER, payload TEXT)")
    return conn


def _raw_once(conn: sqlite3.Connection, i: int) -> float:
    execute = conn.execute
    start = time.perf_counter()
    execute("BEGIN")
    execute("INSERT INTO items VALUES (?, 'raw')", (i,))
    execute("COMMIT")
    return time.perf_counter() - start


def _wrapped_once(conn: sqlite3.Connection, i: int) -> float:
    execute = conn.execute
    start = time.perf_counter()
    with transaction(conn):
        execute("INSERT INTO items VALUES (?, 'tx')", (i,))
    return time.perf_counter() - start


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rounds(
    conn: sqlite3.Connection, rounds: int, n: int
) -> tuple[list[float], list[float], list[float]]:
    """Rounds of ``n`` pairs, raw and wrapped alternating which goes first (AB BA ...).

    A commit's fsync varies by an order of magnitude on a shared disk, so each
    pair runs back to back and each round compares the medians of its
    per-transaction times. Returns the per-round ratios and the per-round
    median seconds per transaction of each side.
    """
    ratios: list[float] = []
    raws: list[float] = []
    wrapped: list[float] = []
    for i in range(max(2, n // 4)):  # warm the file and the statement cache
        _raw_once(conn, i)
        _wrapped_once(conn, i)
    for _ in range(rounds):
        raw_times: list[float] = []
        sub_times: list[float] = []
        with _gc_paused():
            for i in range(n):
                if i % 2 == 0:
                    raw_times.append(_raw_once(conn, i))
                    sub_times.append(_wrapped_once(conn, i))
                else:
                    sub_times.append(_wrapped_once(conn, i))
                    raw_times.append(_raw_once(conn, i))
        raw = statistics.median(raw_times)
        sub = statistics.median(sub_times)
        raws.append(raw)
        wrapped.append(sub)
        ratios.append(sub / raw)
    return ratios, raws, wrapped


def _overhead_us(folder: str, rounds: int, n: int, in_workflow: bool) -> float:
    """Absolute cost of transaction() per commit, on a file that never fsyncs."""
    conn = _open(os.path.join(folder, f"fast-{in_workflow}.db"), durable=False)
    try:
        if in_workflow:
            with _workflow():
                _, raws, subs = _rounds(conn, rounds, n)
        else:
            _, raws, subs = _rounds(conn, rounds, n)
    finally:
        conn.close()
    return (statistics.median(subs) - statistics.median(raws)) * 1e6


@contextmanager
def _workflow() -> Iterator[None]:
    term = Terminator(phases=Phases(30.0, 30.0), sink=NullSink())
    try:
        with term.workflow("bench-transaction"):
            yield
    finally:
        term.close()


def _row(
    name: str, ratios: list[float], raws: list[float], subs: list[float], extra_us: float
) -> Row:
    value = statistics.median(ratios)
    return {
        "name": name,
        "value": round(value, 4),
        "target": f"<= {TARGET}",
        "unit": "x",
        "passed": value <= TARGET,
        "detail": (
            f"transaction() {statistics.median(subs) * 1e3:.2f} ms vs raw "
            f"BEGIN+INSERT+COMMIT {statistics.median(raws) * 1e3:.2f} ms per transaction; "
            f"ratio range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds; "
            f"wrapper cost without fsync {extra_us:.1f} us"
        ),
    }


def collect(quick: bool) -> list[Row]:
    """Measure ``transaction()`` against raw statements; one row per setting.

    Args:
        quick: Fewer, shorter rounds (a smoke run).

    Returns:
        The result rows.
    """
    rounds, n = (5, 24) if quick else (9, 60)
    fast_rounds, fast_n = (5, 1000) if quick else (9, 3000)
    folder = tempfile.mkdtemp(prefix="bench-transaction-")
    rows: list[Row] = []
    try:
        for in_workflow in (False, True):
            conn = _open(os.path.join(folder, f"durable-{in_workflow}.db"), durable=True)
            try:
                if in_workflow:
                    with _workflow():
                        ratios, raws, subs = _rounds(conn, rounds, n)
                else:
                    ratios, raws, subs = _rounds(conn, rounds, n)
            finally:
                conn.close()
            extra = _overhead_us(folder, fast_rounds, fast_n, in_workflow)
            name = "transaction_one_insert_vs_raw" + ("_in_workflow" if in_workflow else "")
            rows.append(_row(name, ratios, raws, subs, extra))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in collect(quick=False):
        print(row)
