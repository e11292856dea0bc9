"""Cost of a ``JsonlSink`` append against a hand-written hash-chained append.

Both sides append the same ``AuditEvent`` objects to fresh files in the same
folder, in the same run, interleaved in small blocks so that load elsewhere on
the machine hits both alike. Each round gives a ratio of the mean times per
append; the figure is the median over the rounds.

The baseline is the least a hash chain can do, written the way a careful
person would by hand: a descriptor opened once in append mode, the event turned
into a dict, one canonical JSON encoding (sorted keys, compact, with an encoder
built once), SHA-256 over it, the hash spliced into the line, one unbuffered
``os.write``; no lock, no check of what else is in the file, and (second row)
``os.fsync`` per line.
The sink additionally takes the cross-process lock, checks that nobody else
appended, and writes canonical JSON.

Run: ``python benchmarks/bench_audit.py [--quick]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from termsafe._audit import GENESIS, AuditEvent, JsonlSink, utc_timestamp


def _events(n: int) -> list[AuditEvent]:
    actor = {"id": "alice", "kind": "user", "roles": ["admin"], "teams": ["data"]}
    return [
        AuditEvent(
            seq=i,
            timestamp=utc_timestamp(1_790_000_000.0 + i / 1000),
            type="phase_changed",
            workflow_id=f"wf-{i % 17}",
            actor=actor,
            reason="operator asked to stop the nightly export",
            state="terminating",
            details={"phase": "forced", "elapsed_s": i * 0.25, "pending_hooks": i % 5},
        )
        for i in range(n)
    ]


class _RawChain:
    """The baseline: a hand-written hash-chained append."""

    def __init__(self, path: str, fsync: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync = fsync
        # Built once: json.dumps(..., sort_keys=True) builds an encoder per
        # call, which would make the baseline slower than it needs to be.
        self.encode = json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode
        self.prev = GENESIS
        self.seq = 0

    def append(self, event: AuditEvent) -> None:
        self.seq += 1
        body = self.encode(
            {"event": event.as_dict(), "mac": "sha256", "prev": self.prev, "seq": self.seq}
        )
        digest = hashlib.sha256(body.encode()).hexdigest()
        os.write(self.fd, (body[:-1] + ',"hash":"' + digest + '"}\n').encode())
        if self.fsync:
            os.fsync(self.fd)
        self.prev = digest

    def close(self) -> None:
        os.close(self.fd)


def _round(folder: str, events: list[AuditEvent], fsync: bool, block: int) -> tuple[float, float]:
    """One round: both sides append the same events to fresh files, interleaved.

    Blocks of ``block`` appends alternate between the two sides (and which goes
    first), so that a burst of load elsewhere on the machine hits both alike.

    Returns:
        Mean seconds per append: (raw, sink).
    """
    raw_path = os.path.join(folder, "raw.jsonl")
    sink_path = os.path.join(folder, "sink.jsonl")
    raw = _RawChain(raw_path, fsync)
    sink = JsonlSink(sink_path, fsync="always" if fsync else "never")
    try:
        raw.append(events[0])  # warm-up: open files, first block of the file
        sink.emit(events[0])
        raw_t = sink_t = 0.0
        clock = time.perf_counter
        for i in range(0, len(events), block):
            chunk = events[i : i + block]
            for side in (0, 1) if (i // block) % 2 else (1, 0):
                start = clock()
                if side:
                    for event in chunk:
                        sink.emit(event)
                    sink_t += clock() - start
                else:
                    for event in chunk:
                        raw.append(event)
                    raw_t += clock() - start
        return raw_t / len(events), sink_t / len(events)
    finally:
        raw.close()
        sink.close()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))


def _ratio(folder: str, n: int, rounds: int, fsync: bool, block: int) -> tuple[float, float, float]:
    events = _events(n)
    results = sorted(
        (_round(folder, events, fsync, block) for _ in range(rounds)),
        key=lambda times: times[1] / times[0],
    )
    # The round with the median ratio, so that its two times match the ratio.
    raw, sink = results[len(results) // 2]
    return sink / raw, raw, sink


def collect(quick: bool) -> list[dict[str, object]]:
    """Measure the two ratios.

    Args:
        quick: Fewer events and rounds (well under 10 s).

    Returns:
        One row per figure: ``name``, ``value``, ``target``, ``unit``, ``passed``,
        plus the mean time per append of that median round, in microseconds
        (``raw_us``, ``sink_us``).
    """
    folder = tempfile.mkdtemp(prefix="termsafe-bench-audit-")
    try:
        n_plain, rounds_plain = (2000, 7) if quick else (10_000, 15)
        n_sync, rounds_sync = (300, 9) if quick else (1000, 11)
        rows: list[dict[str, object]] = []
        for name, target, n, rounds, fsync, block in (
            ("audit_append_fsync_never_vs_raw", 2.0, n_plain, rounds_plain, False, 50),
            ("audit_append_fsync_always_vs_raw_fsync", 1.1, n_sync, rounds_sync, True, 10),
        ):
            ratio, raw, sink = _ratio(folder, n, rounds, fsync, block)
            rows.append(
                {
                    "name": name,
                    "value": round(ratio, 3),
                    "target": f"<= {target}",
                    "unit": "x",
                    "passed": ratio <= target,
                    "raw_us": round(raw * 1e6, 2),
                    "sink_us": round(sink * 1e6, 2),
                }
            )
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    for row in collect(quick="--quick" in sys.argv[1:]):
        print(row)
