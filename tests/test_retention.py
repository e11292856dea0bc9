"""Retention: what apply_retention removes, what it keeps, and that the trail still proves itself.

Real SQLite files and real trails in temporary folders; time is moved with
``now=``, never waited for. The concurrent-writer test and the command line
run real processes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import termsafe
from termsafe._audit import (
    AuditEvent,
    AuditTrailError,
    JsonlSink,
    utc_timestamp,
    verify_audit_log,
)
from termsafe._exceptions import (
    AuditTampered,
    ConfigurationError,
    InvalidArgumentType,
    OutcomeUnknown,
)
from termsafe._replay import replay_audit
from termsafe._retention import RetentionPolicy, RetentionReport, apply_retention
from termsafe._store import SQLiteStore
from termsafe._terminator import _set_default_terminator
from tests.conftest import ADMIN, TermFactory

REPO = Path(__file__).resolve().parents[1]
KEY = b"retention-test-key"
DAY = 86_400.0
HOUR = 3_600.0
#: Pads every event so that a trail with ``max_bytes=ONE_PER_FILE`` holds one event per file.
PAD = "x" * 600
ONE_PER_FILE = 1000


def base_time() -> float:
    """A whole second, 100 days ago: timestamps at it are exact in a trail."""
    return float(math.floor(time.time()) - 100 * DAY)


def old_event(t: float, i: int = 0, **details: Any) -> AuditEvent:
    """An event that happened at ``t``, padded so that it fills a file of its own."""
    return AuditEvent(
        seq=i,
        timestamp=utc_timestamp(t),
        type="hook_ran",
        workflow_id=f"wf-{i}",
        details={"pad": PAD, **details},
    )


def write_files(path: Path, stamps: list[float], key: bytes | None = None) -> None:
    """One event per file, at these times: the oldest rotated file holds ``stamps[0]``.

    The last stamp's event stays in the current file.
    """
    with JsonlSink(path, key=key, fsync="never", max_bytes=ONE_PER_FILE) as sink:
        for i, t in enumerate(stamps):
            sink.emit(old_event(t, i))


def rotated(path: Path) -> list[Path]:
    """The rotated files of a trail, oldest (highest number) first."""
    found = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")]
    numbered = [p for p in found if p.suffix[1:].isdigit()]
    return sorted(numbered, key=lambda p: -int(p.suffix[1:]))


def records(path: Path) -> list[dict[str, Any]]:
    """Every trail line of every file of the trail, oldest first."""
    out: list[dict[str, Any]] = []
    for name in [*rotated(path), path]:
        if name.exists():
            out.extend(json.loads(raw) for raw in name.read_bytes().splitlines() if raw)
    return out


def events_of(path: Path, kind: str) -> list[dict[str, Any]]:
    """The events of one type in the trail."""
    return [r["event"] for r in records(path) if r["event"]["type"] == kind]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def saved_at(store: SQLiteStore, workflow_id: str) -> float:
    """When the store last saved this checkpoint (read straight from the file)."""
    with sqlite3.connect(store.path) as conn:
        row = conn.execute(
            "SELECT saved_at FROM checkpoints WHERE workflow_id = ?", (workflow_id,)
        ).fetchone()
    assert row is not None
    return float(row[0])


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    """Where a test's trail goes."""
    return tmp_path / "audit.jsonl"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """A fresh store file."""
    st = SQLiteStore(tmp_path / "store.sqlite3")
    yield st
    st.close()


class TestRetentionPolicy:
    def test_keeps_everything_by_default(self) -> None:
        """A policy with no durations keeps every kind forever."""
        assert {"audit": None, "checkpoints": None, "idempotency": None, "runs": None} == (
            RetentionPolicy().as_dict()
        )

    def test_durations_become_float_seconds(self) -> None:
        """Seconds and timedeltas are both stored as float seconds."""
        policy = RetentionPolicy(
            audit=datetime.timedelta(days=90), checkpoints=30, idempotency=1.5, runs=0
        )
        assert {"audit": 7_776_000.0, "checkpoints": 30.0, "idempotency": 1.5, "runs": 0.0} == (
            policy.as_dict()
        )

    @pytest.mark.parametrize("kind", ["audit", "checkpoints", "idempotency", "runs"])
    @pytest.mark.parametrize("value", ["90d", True, [1], b"1"])
    def test_wrong_type_is_named(self, kind: str, value: object) -> None:
        """A duration of the wrong type raises InvalidArgumentType naming the field and value."""
        with pytest.raises(InvalidArgumentType) as info:
            RetentionPolicy(**{kind: value})
        assert f"RetentionPolicy.{kind} must be a number of seconds" in str(info.value)
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize(
        "value",
        [-1, -0.5, math.nan, math.inf, -math.inf, datetime.timedelta(seconds=-1)],
    )
    def test_bad_value_is_named(self, value: object) -> None:
        """A negative, NaN or infinite duration raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError) as info:
            RetentionPolicy(checkpoints=value)
        assert f"RetentionPolicy.checkpoints must be >= 0 and finite (got {value!r})" in str(
            info.value
        )

    def test_is_frozen(self) -> None:
        """A policy cannot be changed after it is made."""
        policy = RetentionPolicy(audit=1)
        with pytest.raises(AttributeError):
            policy.audit = 2.0  # type: ignore[misc]

    def test_exported(self) -> None:
        """The policy, the report and the function are public names of termsafe."""
        assert (RetentionPolicy, RetentionReport, apply_retention) == (
            termsafe.RetentionPolicy,
            termsafe.RetentionReport,
            termsafe.apply_retention,
        )


class TestCheckpoints:
    def test_boundary(self, store: SQLiteStore) -> None:
        """A checkpoint goes once it is older than the retention; at exactly that age it stays."""
        store.save_checkpoint("nightly", {"step": 2})
        t = saved_at(store, "nightly")
        policy = RetentionPolicy(checkpoints=HOUR)
        for now, expected in ((t + HOUR - 1, 0), (t + HOUR, 0)):
            assert expected == apply_retention(policy, store=store, now=now).checkpoints
            assert {"step": 2} == store.load_checkpoint("nightly")
        assert 1 == apply_retention(policy, store=store, now=t + HOUR + 1).checkpoints
        assert store.load_checkpoint("nightly") is None

    def test_live_run_keeps_its_checkpoint(self, store: SQLiteStore) -> None:
        """The checkpoint of a workflow with a live run stays whatever its age, until it ends."""
        store.save_checkpoint("nightly", {"step": 2})
        store.save_checkpoint("other", {"step": 1})
        store.run_register("r1", "nightly", owner=None, team=None, state="running")
        far = time.time() + 365 * DAY
        policy = RetentionPolicy(checkpoints=DAY)
        assert 1 == apply_retention(policy, store=store, now=far).checkpoints
        assert ({"step": 2}, None) == (
            store.load_checkpoint("nightly"),
            store.load_checkpoint("other"),
        )
        store.run_set_state("r1", "killed", final=True)
        assert 1 == apply_retention(policy, store=store, now=far).checkpoints
        assert store.load_checkpoint("nightly") is None

    def test_killed_workflow_keeps_its_data_until_past_the_policy(
        self, store: SQLiteStore, trail: Path
    ) -> None:
        """A killed workflow's checkpoint, recorded call and events stay within retention."""
        sink = JsonlSink(trail, fsync="never")
        with termsafe.Terminator(sink=sink, store=store) as term:
            with term.workflow("nightly"):
                with termsafe.idempotent_call("charge-1", request={"amount": 5}) as call:
                    call.run(lambda: "charged")
                termsafe.checkpoint({"step": 2})
                term.kill("nightly", by=ADMIN, reason="deploy")
                termsafe.checkpoint()
            term.flush()
        sink.close()
        killed = [e for e in events_of(trail, "workflow_finished") if e["workflow_id"] == "nightly"]
        assert ["terminated"] == [e["state"] for e in killed]
        policy = RetentionPolicy(checkpoints=30 * DAY, idempotency=30 * DAY, audit=30 * DAY)
        soon = time.time() + 29 * DAY
        report = apply_retention(policy, store=store, audit_path=trail, now=soon)
        assert (0, 0, 0) == (report.checkpoints, report.idempotency, report.audit_files)
        assert {"step": 2} == store.load_checkpoint("nightly")
        info = store.idem_info("charge-1")
        assert info is not None
        assert "done" == info.status
        later = time.time() + 31 * DAY
        report = apply_retention(policy, store=store, audit_path=trail, now=later)
        assert (1, 1) == (report.checkpoints, report.idempotency)
        assert (None, None) == (store.load_checkpoint("nightly"), store.idem_info("charge-1"))
        # The trail never rotated: the current file, and the killed run's story, stay.
        assert 0 == report.audit_files
        assert killed == [
            e for e in events_of(trail, "workflow_finished") if e["workflow_id"] == "nightly"
        ]


class TestIdempotency:
    def test_boundary(self, store: SQLiteStore) -> None:
        """A settled key goes once its last change is older than the retention."""
        claim = store.idem_claim("k", "fp", lease_seconds=60, retry_unknown=False)
        store.idem_record("k", claim.epoch, {"ok": True})
        info = store.idem_info("k")
        assert info is not None
        policy = RetentionPolicy(idempotency=DAY)
        for now in (info.updated_at + DAY - 1, info.updated_at + DAY):
            assert 0 == apply_retention(policy, store=store, now=now).idempotency
        assert store.idem_info("k") is not None
        assert 1 == apply_retention(policy, store=store, now=info.updated_at + DAY + 1).idempotency
        assert store.idem_info("k") is None

    def test_unknown_and_in_flight_are_kept(self, store: SQLiteStore) -> None:
        """Keys in flight or with an unknown outcome stay whatever their age; released ones go."""
        store.idem_claim("flying", "fp", lease_seconds=60, retry_unknown=False)
        unknown = store.idem_claim("unknown", "fp", lease_seconds=60, retry_unknown=False)
        store.idem_release("unknown", unknown.epoch, unknown=True)
        released = store.idem_claim("released", "fp", lease_seconds=60, retry_unknown=False)
        store.idem_release("released", released.epoch, unknown=False)
        far = time.time() + 10 * 365 * DAY
        report = apply_retention(RetentionPolicy(idempotency=0), store=store, now=far)
        assert 1 == report.idempotency
        assert ["in_flight", "unknown", None] == [
            None if (r := store.idem_info(k)) is None else r.status
            for k in ("flying", "unknown", "released")
        ]
        with pytest.raises(OutcomeUnknown):
            store.idem_claim("unknown", "fp", lease_seconds=60, retry_unknown=False)


class TestRuns:
    def test_boundary(self, store: SQLiteStore) -> None:
        """A run's record goes once it ended longer ago than the retention; live runs stay."""
        store.run_register("ended", "a", owner=None, team=None, state="running")
        store.run_register("live", "b", owner=None, team=None, state="running")
        assert store.run_set_state("ended", "killed", final=True)
        run = store.run_get("ended")
        assert run is not None
        assert run.ended_at is not None
        policy = RetentionPolicy(runs=7 * DAY)
        for now in (run.ended_at + 7 * DAY - 1, run.ended_at + 7 * DAY):
            assert 0 == apply_retention(policy, store=store, now=now).runs
        assert 1 == apply_retention(policy, store=store, now=run.ended_at + 7 * DAY + 1).runs
        assert ["live"] == [r.run_id for r in store.runs()]
        far = time.time() + 10 * 365 * DAY
        assert 0 == apply_retention(policy, store=store, now=far).runs


class TestStorePruneArguments:
    @pytest.mark.parametrize("method", ["checkpoint_prune", "run_prune", "idem_prune"])
    @pytest.mark.parametrize(
        ("kwargs", "error", "named"),
        [
            ({"older_than": -1.0}, ConfigurationError, "-1.0"),
            ({"older_than": math.inf}, ConfigurationError, "inf"),
            ({"older_than": "90d"}, InvalidArgumentType, "'90d'"),
            ({"older_than": True}, InvalidArgumentType, "True"),
            ({"now": math.inf}, ConfigurationError, "inf"),
            ({"now": math.nan}, ConfigurationError, "nan"),
            ({"now": "today"}, InvalidArgumentType, "'today'"),
            ({"dry_run": "yes"}, InvalidArgumentType, "'yes'"),
        ],
    )
    def test_bad_arguments_are_named(
        self,
        store: SQLiteStore,
        method: str,
        kwargs: dict[str, Any],
        error: type[Exception],
        named: str,
    ) -> None:
        """A bad age, time or flag raises naming the value, and deletes nothing."""
        store.save_checkpoint("nightly", {"step": 1})
        args: dict[str, Any] = {"older_than": 0.0, "now": time.time() + DAY, **kwargs}
        older_than = args.pop("older_than")
        with pytest.raises(error) as info:
            getattr(store, method)(older_than, **args)
        assert named in str(info.value)
        assert {"step": 1} == store.load_checkpoint("nightly")


class TestAudit:
    def test_boundary(self, trail: Path) -> None:
        """A rotated file goes once its newest event is older than the retention, oldest first."""
        t = base_time()
        write_files(trail, [t - 20, t, t + 50, t + 100])
        assert 3 == len(rotated(trail))
        policy = RetentionPolicy(audit=HOUR)
        report = apply_retention(policy, audit_path=trail, now=t + HOUR - 1)
        assert (1, 1) == (report.audit_files, report.audit_lines)  # the file of t - 20
        report = apply_retention(policy, audit_path=trail, now=t + HOUR)
        assert (0, 0) == (report.audit_files, report.audit_lines)  # t is exactly an hour old
        assert [t, t + 50] == [
            datetime.datetime.fromisoformat(e["timestamp"]).timestamp()
            for e in events_of(trail, "hook_ran")[:2]
        ]
        report = apply_retention(policy, audit_path=trail, now=t + HOUR + 1)
        assert (1, 1) == (report.audit_files, report.audit_lines)
        assert [t + 50, t + 100] == [
            datetime.datetime.fromisoformat(e["timestamp"]).timestamp()
            for e in events_of(trail, "hook_ran")
        ]
        verdict = verify_audit_log(trail)
        assert (True, 2) == (verdict.ok, verdict.pruned_through)

    def test_replay_of_a_pruned_trail_follows_verify(self, trail: Path) -> None:
        """replay_audit accepts a pruned trail as verify_audit_log does, allow_pruned included."""
        t = base_time()
        write_files(trail, [t + i for i in range(4)] + [time.time()])
        with JsonlSink(trail) as sink:
            anchor = sink.anchor()
        apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
        assert replay_audit(trail).verified
        with pytest.raises(AuditTampered):  # keyless and anchored: a recorded prune is not proof
            replay_audit(trail, anchor=anchor)
        assert replay_audit(trail, anchor=anchor, allow_pruned=True).verified

    def test_pruned_trail_verifies(self, trail: Path) -> None:
        """After a prune the rest verifies, and says which seqs the trail records as pruned."""
        t = base_time()
        write_files(trail, [t + i for i in range(10)] + [time.time()])
        with JsonlSink(trail) as sink:
            anchor = sink.anchor()
        report = apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
        assert (10, 10) == (report.audit_files, report.audit_lines)
        verdict = verify_audit_log(trail, anchor=anchor, allow_pruned=True)
        assert (True, None, 10) == (verdict.ok, verdict.kind, verdict.pruned_through)
        assert "seqs 1..10 pruned, as the trail records" in verdict.message
        [record] = events_of(trail, "audit_pruned")
        assert (10, 10, 1, 10) == (
            record["details"]["files"],
            record["details"]["lines"],
            record["details"]["first_seq"],
            record["details"]["last_seq"],
        )
        assert list(range(1, 11)) == [seq for seq, _ in record["details"]["heads"]]

    def test_current_file_is_never_removed(self, trail: Path) -> None:
        """Without rotation nothing is removed, however old the events are."""
        t = base_time()
        with JsonlSink(trail, fsync="never") as sink:
            for i in range(5):
                sink.emit(old_event(t + i, i))
        report = apply_retention(RetentionPolicy(audit=0), audit_path=trail, now=time.time())
        assert (0, 0) == (report.audit_files, report.audit_lines)
        assert 5 == len(events_of(trail, "hook_ran"))
        assert [] == events_of(trail, "audit_pruned")

    def test_a_newer_file_stops_the_prune(self, trail: Path) -> None:
        """Only a prefix of the trail goes: an old file after a recent one stays."""
        t = base_time()
        write_files(trail, [t, time.time(), t + 1, t + 2])
        report = apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
        assert 1 == report.audit_files
        assert [t + 1] == [
            datetime.datetime.fromisoformat(e["timestamp"]).timestamp()
            for e in events_of(trail, "hook_ran")
            if e["workflow_id"] == "wf-2"
        ]
        assert verify_audit_log(trail).ok

    def test_hand_deleted_file_is_detected(self, trail: Path) -> None:
        """A rotated file deleted by hand, with no recorded prune, is still reported deleted."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 2, t + 3])
        rotated(trail)[0].unlink()
        report = verify_audit_log(trail)
        assert (False, "deleted", 1) == (report.ok, report.kind, report.first_bad_line)

    def test_deletion_beyond_the_recorded_prune_is_detected(self, trail: Path) -> None:
        """After a prune, deleting the next file by hand is reported, naming the recorded prune."""
        t = base_time()
        write_files(trail, [t, t + 1, t + DAY, t + DAY + 1, time.time()])
        report = apply_retention(RetentionPolicy(audit=DAY), audit_path=trail, now=t + DAY + 2)
        assert 2 == report.audit_files
        assert verify_audit_log(trail).ok
        rotated(trail)[0].unlink()
        verdict = verify_audit_log(trail)
        assert (False, "deleted") == (verdict.ok, verdict.kind)
        assert "the trail records a prune of seqs up to 2, not up to seq 3" in verdict.message

    def test_forged_prune_record_is_detected(self, trail: Path) -> None:
        """A prune record whose head does not match the first remaining line proves nothing."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 2, time.time()])
        oldest = rotated(trail)[0]
        first = json.loads(oldest.read_bytes().splitlines()[0])
        oldest.unlink()
        with JsonlSink(trail, fsync="never") as sink:
            sink.emit(
                AuditEvent(
                    seq=0,
                    timestamp=utc_timestamp(),
                    type="audit_pruned",
                    details={"files": 1, "heads": [[1, "0" * 64], [2, first["hash"]]]},
                )
            )
        verdict = verify_audit_log(trail)
        assert (False, "deleted", 1) == (verdict.ok, verdict.kind, verdict.first_bad_line)

    def test_torn_forged_prune_record_is_not_trusted(self, trail: Path) -> None:
        """A prune record left as an unterminated last line never excuses a missing start."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 2, t + 3, time.time()], key=KEY)
        files = rotated(trail)
        for f in files[:2]:
            f.unlink()
        first = json.loads(files[2].read_bytes().splitlines()[0])
        forged = {
            "event": {
                "type": "audit_pruned",
                "details": {"heads": [[first["seq"] - 1, first["prev"]]]},
            },
            "hash": "0" * 64,
            "mac": "hmac-sha256",
            "prev": "0" * 64,
            "seq": 999,
        }
        with trail.open("ab") as fh:
            fh.write(json.dumps(forged, separators=(",", ":")).encode())  # no line ending
        verdict = verify_audit_log(trail, key=KEY)
        assert (False, "deleted", 1, str(files[2])) == (
            verdict.ok,
            verdict.kind,
            verdict.first_bad_line,
            verdict.path,
        )

    def test_prune_record_must_itself_verify(self, trail: Path) -> None:
        """A complete prune record whose own HMAC is forged is named as the edit it is."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 2, time.time()], key=KEY)
        files = rotated(trail)
        files[0].unlink()
        first = json.loads(files[1].read_bytes().splitlines()[0])
        last = json.loads(trail.read_bytes().splitlines()[-1])
        forged = {
            "event": {
                "type": "audit_pruned",
                "details": {"heads": [[first["seq"] - 1, first["prev"]]]},
            },
            "hash": "0" * 64,
            "mac": "hmac-sha256",
            "prev": last["hash"],
            "seq": last["seq"] + 1,
        }
        with trail.open("ab") as fh:
            fh.write(json.dumps(forged, separators=(",", ":"), sort_keys=True).encode() + b"\n")
        verdict = verify_audit_log(trail, key=KEY)
        assert (False, "edited") == (verdict.ok, verdict.kind)

    def test_keyless_trail_with_an_anchor_refuses_recorded_prunes(self, trail: Path) -> None:
        """Against an anchor, a keyless trail's recorded prune is refused unless allowed."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 2, t + 3, time.time()])
        with JsonlSink(trail) as sink:
            anchor = sink.anchor()
        files = rotated(trail)
        for f in files[:3]:
            f.unlink()
        first = json.loads(files[3].read_bytes().splitlines()[0])
        with JsonlSink(trail, fsync="never") as sink:  # anyone who can write the file
            sink.emit(
                AuditEvent(
                    seq=0,
                    timestamp=utc_timestamp(),
                    type="audit_pruned",
                    details={"heads": [[first["seq"] - 1, first["prev"]]]},
                )
            )
        verdict = verify_audit_log(trail, anchor=anchor)
        assert (False, "deleted", 1) == (verdict.ok, verdict.kind, verdict.first_bad_line)
        assert "allow_pruned=True" in verdict.message
        assert (False, "deleted") == (
            verify_audit_log(trail, allow_pruned=False).ok,
            verify_audit_log(trail, allow_pruned=False).kind,
        )
        # What accepting any recorded prune means: the forgery passes.
        assert verify_audit_log(trail, anchor=anchor, allow_pruned=True).ok
        assert verify_audit_log(trail).ok  # no anchor, no key: internal consistency only

    def test_signed_trail_with_an_anchor_accepts_its_prunes(self, trail: Path) -> None:
        """With a key a recorded prune is accepted against an anchor by default."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()], key=KEY)
        with JsonlSink(trail, key=KEY) as sink:
            anchor = sink.anchor()
        apply_retention(RetentionPolicy(audit=DAY), audit_path=trail, audit_key=KEY)
        verdict = verify_audit_log(trail, key=KEY, anchor=anchor)
        assert (True, 2) == (verdict.ok, verdict.pruned_through)
        refused = verify_audit_log(trail, key=KEY, anchor=anchor, allow_pruned=False)
        assert (False, "deleted") == (refused.ok, refused.kind)

    def test_allow_pruned_must_be_a_bool(self, trail: Path) -> None:
        """allow_pruned that is not a bool or None is named."""
        write_files(trail, [time.time()])
        with pytest.raises(InvalidArgumentType, match="'yes'"):
            verify_audit_log(trail, allow_pruned="yes")  # type: ignore[arg-type]

    def test_crash_before_the_files_went(self, trail: Path, tmp_path: Path) -> None:
        """A record with all, or only the newest, of its files still there verifies too."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 2, time.time()])
        kept = tmp_path / "kept"
        kept.mkdir()
        old = [shutil.copy2(p, kept / p.name) for p in rotated(trail)]  # oldest first
        assert 3 == apply_retention(RetentionPolicy(audit=DAY), audit_path=trail).audit_files
        # What a crash right after the record leaves: every planned file still there,
        # numbered above the files that stay (the record's append may have rotated).
        top = len(rotated(trail))
        restored = [trail.with_name(f"{trail.name}.{top + 3 - i}") for i in range(3)]
        for copy, name in zip(old, restored, strict=True):
            shutil.copy2(copy, name)
        whole = verify_audit_log(trail)
        assert (True, 0) == (whole.ok, whole.pruned_through)
        # ... and a crash after the oldest went: the trail starts at a recorded head.
        restored[0].unlink()
        partial = verify_audit_log(trail)
        assert (True, 1) == (partial.ok, partial.pruned_through)
        # The next prune finishes the job.
        assert 2 == apply_retention(RetentionPolicy(audit=DAY), audit_path=trail).audit_files
        assert (True, 3) == (verify_audit_log(trail).ok, verify_audit_log(trail).pruned_through)

    def test_numbering_stays_contiguous(self, trail: Path) -> None:
        """After a prune, later rotations number the files 1..N with no gap, and it all verifies."""
        t = base_time()
        write_files(trail, [t + i for i in range(6)] + [time.time()])
        apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
        with JsonlSink(trail, fsync="never", max_bytes=ONE_PER_FILE) as sink:
            for i in range(3):
                sink.emit(old_event(time.time(), 100 + i))
        numbers = sorted(int(p.suffix[1:]) for p in rotated(trail))
        assert list(range(1, len(numbers) + 1)) == numbers
        assert verify_audit_log(trail).ok

    def test_second_prune(self, trail: Path) -> None:
        """A second prune removes the files the first one kept, and the trail still verifies."""
        t = base_time()
        write_files(trail, [t, t + 1, t + 10 * DAY, t + 10 * DAY + 1, time.time()])
        policy = RetentionPolicy(audit=DAY)
        assert 2 == apply_retention(policy, audit_path=trail, now=t + 2 * DAY).audit_files
        assert 2 == apply_retention(policy, audit_path=trail).audit_files
        verdict = verify_audit_log(trail)
        assert (True, 4) == (verdict.ok, verdict.pruned_through)
        assert 2 == len(events_of(trail, "audit_pruned"))

    def test_signed_trail(self, trail: Path) -> None:
        """A signed trail is pruned with its key, and the record is signed with it too."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()], key=KEY)
        report = apply_retention(RetentionPolicy(audit=DAY), audit_path=trail, audit_key=KEY)
        assert 2 == report.audit_files
        verdict = verify_audit_log(trail, key=KEY)
        assert (True, 2) == (verdict.ok, verdict.pruned_through)
        assert {"hmac-sha256"} == {r["mac"] for r in records(trail)}

    def test_signed_trail_without_its_key(self, trail: Path) -> None:
        """A signed trail pruned without its key is left alone."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()], key=KEY)
        before = snapshot(trail.parent)
        with pytest.raises(ConfigurationError, match="signed with HMAC-SHA-256"):
            apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
        assert before == {k: v for k, v in snapshot(trail.parent).items() if k in before}

    def test_tampered_trail_is_not_pruned(self, trail: Path, store: SQLiteStore) -> None:
        """A trail that does not verify is kept as it is, and the store is not touched either."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()])
        oldest = rotated(trail)[0]
        oldest.write_bytes(oldest.read_bytes().replace(b'"wf-0"', b'"wf-9"'))
        store.save_checkpoint("nightly", {"step": 1})
        before = snapshot(trail.parent)
        policy = RetentionPolicy(audit=DAY, checkpoints=0)
        with pytest.raises(AuditTrailError, match="does not verify \\(edited"):
            apply_retention(policy, store=store, audit_path=trail, now=time.time() + 1)
        after = snapshot(trail.parent)
        assert {k: before[k] for k in before if "sqlite" not in k} == {
            k: after[k] for k in before if "sqlite" not in k
        }
        assert {"step": 1} == store.load_checkpoint("nightly")

    def test_unsealed_file_is_sealed_before_it_goes(self, trail: Path) -> None:
        """A sink still holding a rotated file whose seal a crash lost moves on, losing nothing."""
        t = base_time()
        stale = JsonlSink(trail, fsync="never")
        stale.emit(old_event(t, 0))
        rotating = JsonlSink(trail, fsync="never", max_bytes=ONE_PER_FILE)
        rotating.emit(old_event(time.time(), 1))  # rotates the stale sink's file to .1
        rotating.close()
        old = rotated(trail)[0]
        old.write_bytes(old.read_bytes()[:-1])  # a rotation that died before its seal
        assert 1 == apply_retention(RetentionPolicy(audit=DAY), audit_path=trail).audit_files
        stale.emit(old_event(time.time(), 2))
        stale.close()
        assert ["wf-1", "wf-2"] == [e["workflow_id"] for e in events_of(trail, "hook_ran")]
        assert verify_audit_log(trail).ok

    def test_missing_trail(self, trail: Path, store: SQLiteStore) -> None:
        """Pruning a trail that does not exist raises, before the store is touched."""
        store.save_checkpoint("nightly", {"step": 1})
        policy = RetentionPolicy(audit=DAY, checkpoints=0)
        with pytest.raises(FileNotFoundError):
            apply_retention(policy, store=store, audit_path=trail, now=time.time() + 1)
        assert {"step": 1} == store.load_checkpoint("nightly")
        assert not trail.exists()

    def test_concurrent_writer(self, trail: Path) -> None:
        """Another process appending and rotating during a prune leaves a trail that verifies."""
        t = base_time()
        write_files(trail, [t + i for i in range(40)])
        code = (
            "import sys, time\n"
            "from termsafe._audit import AuditEvent, JsonlSink, utc_timestamp\n"
            "sink = JsonlSink(sys.argv[1], fsync='always', max_bytes=1000)\n"
            "def emit(i):\n"
            "    sink.emit(AuditEvent(seq=i, timestamp=utc_timestamp(), type='hook_ran',"
            " workflow_id='writer', details={'pad': 'x' * 600}))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read(1)\n"
            "for i in range(20):\n"
            "    emit(i)\n"
            "print('writing', flush=True)\n"
            "for i in range(20, 300):\n"
            "    emit(i)\n"
            "sink.close()\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(trail)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdin is not None
            assert "ready\n" == proc.stdout.readline()
            proc.stdin.write("g")
            proc.stdin.close()
            assert "writing\n" == proc.stdout.readline()
            report = apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
            assert 0 == proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        assert 40 == report.audit_files  # the writer's first event rotated the last old one
        verdict = verify_audit_log(trail)
        assert (True, 40) == (verdict.ok, verdict.pruned_through)
        writer = [e["seq"] for e in events_of(trail, "hook_ran") if e["workflow_id"] == "writer"]
        assert list(range(300)) == writer


WRITER = (
    "import sys\n"
    "from termsafe._audit import AuditEvent, JsonlSink, utc_timestamp\n"
    "sink = JsonlSink(sys.argv[1], fsync='never', max_bytes=3000)\n"
    "for i in range(int(sys.argv[2])):\n"
    "    sink.emit(AuditEvent(seq=i, timestamp=utc_timestamp(), type='x',"
    " details={'pad': 'y' * 200}))\n"
    "sink.close()\n"
)


class TestWithoutTheLock:
    def test_dry_run_takes_no_lock(self, trail: Path) -> None:
        """A dry run completes while another process holds the trail's lock."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()])
        code = (
            "import sys, filelock\n"
            "with filelock.FileLock(sys.argv[1] + '.lock'):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read(1)\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(trail)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        result: list[RetentionReport] = []
        thread = threading.Thread(
            target=lambda: result.append(
                apply_retention(RetentionPolicy(audit=DAY), audit_path=trail, dry_run=True)
            )
        )
        try:
            assert holder.stdout is not None
            assert holder.stdin is not None
            assert "held\n" == holder.stdout.readline()
            thread.start()
            thread.join(60)
            done_while_held = not thread.is_alive()
        finally:
            if holder.stdin is not None:
                holder.stdin.close()
            holder.wait(60)
            if holder.stdout is not None:
                holder.stdout.close()
            thread.join(60)
        assert done_while_held
        assert [RetentionReport(2, 2, dry_run=True)] == result

    def test_lines_appended_after_the_verification(self, trail: Path) -> None:
        """Lines appended, and rotations, between verification and lock are checked and kept."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()])
        sink = JsonlSink(trail, fsync="never")
        try:
            prep = sink._prepare_prune(DAY, time.time())
            assert 2 == len(prep.plan)
            with JsonlSink(trail, fsync="never", max_bytes=ONE_PER_FILE) as other:
                for i in range(3):
                    other.emit(old_event(time.time(), 10 + i))
            pruned = sink._prune(DAY, time.time(), dry_run=False, prep=prep)
        finally:
            sink.close()
        assert (2, 2) == pruned
        verdict = verify_audit_log(trail)
        assert (True, 2) == (verdict.ok, verdict.pruned_through)
        assert ["wf-2", "wf-10", "wf-11", "wf-12"] == [
            e["workflow_id"] for e in events_of(trail, "hook_ran")
        ]

    def test_a_planned_file_edited_after_the_verification(self, trail: Path) -> None:
        """A planned file edited before the lock is taken is not removed: the edit is reported."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()])
        sink = JsonlSink(trail, fsync="never")
        try:
            prep = sink._prepare_prune(DAY, time.time())
            oldest = rotated(trail)[0]
            oldest.write_bytes(oldest.read_bytes().replace(b'"wf-0"', b'"wf-9"'))
            before = snapshot(trail.parent)
            with pytest.raises(AuditTrailError, match="does not verify \\(edited"):
                sink._prune(DAY, time.time(), dry_run=False, prep=prep)
        finally:
            sink.close()
        assert before == snapshot(trail.parent)

    def test_files_renamed_while_verifying(self, trail: Path) -> None:
        """Rotations between the listing of a trail and its reading do not upset the verifier."""
        from termsafe._audit import _verify

        write_files(trail, [time.time() for _ in range(4)])
        verifier = _verify(os.fspath(trail), None, None, True)
        with JsonlSink(trail, fsync="never", max_bytes=ONE_PER_FILE) as sink:
            for i in range(3):
                sink.emit(old_event(time.time(), 10 + i))  # every file moves up three numbers
        report = verifier.run()
        assert (True, 4) == (report.ok, report.lines)

    def test_files_pruned_while_verifying(self, trail: Path) -> None:
        """A verification that finds its oldest files pruned under it starts over, and agrees."""
        from termsafe._audit import _TrailChanged, _verify

        t = base_time()
        write_files(trail, [t, t + 1, time.time()])
        verifier = _verify(os.fspath(trail), None, None, True)
        apply_retention(RetentionPolicy(audit=DAY), audit_path=trail)
        with pytest.raises(_TrailChanged):
            verifier.run()
        verdict = verify_audit_log(trail)
        assert (True, 2) == (verdict.ok, verdict.pruned_through)

    def test_prunes_and_verifies_while_writers_rotate(self, trail: Path) -> None:
        """Prunes and verifications race two rotating writer processes without an error."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with JsonlSink(trail, fsync="never") as sink:
            sink.emit(old_event(time.time(), 0))
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(trail), "1500"], env=env)
            for _ in range(2)
        ]
        verdicts = []
        pruned = 0
        try:
            while any(w.poll() is None for w in writers):
                report = apply_retention(
                    RetentionPolicy(audit=DAY), audit_path=trail, now=time.time() + 10 * DAY
                )
                pruned += report.audit_files or 0
                verdicts.append(verify_audit_log(trail))
        finally:
            for w in writers:
                w.wait(120)
        assert [0, 0] == [w.returncode for w in writers]
        assert [] == [v for v in verdicts if not v.ok]
        final = verify_audit_log(trail)
        assert (True, True) == (final.ok, pruned > 0)
        head = records(trail)[-1]["seq"]
        assert head == final.pruned_through + final.lines


class TestApplyRetention:
    def test_nothing_set_touches_nothing(self, store: SQLiteStore, trail: Path) -> None:
        """A policy that keeps everything removes nothing and reports every kind as kept."""
        store.save_checkpoint("nightly", {"step": 1})
        report = apply_retention(RetentionPolicy(), store=store, now=time.time() + 365 * DAY)
        assert RetentionReport() == report
        assert {"step": 1} == store.load_checkpoint("nightly")
        assert [
            "audit: kept (no retention set)",
            "checkpoints: kept (no retention set)",
            "idempotency: kept (no retention set)",
            "runs: kept (no retention set)",
        ] == report.lines()

    def test_dry_run_removes_and_writes_nothing(self, store: SQLiteStore, trail: Path) -> None:
        """A dry run counts what would go, and leaves every file byte for byte as it was."""
        t = base_time()
        write_files(trail, [t, t + 1, time.time()])
        store.save_checkpoint("nightly", {"step": 1})
        claim = store.idem_claim("k", "fp", lease_seconds=60, retry_unknown=False)
        store.idem_record("k", claim.epoch, 1)
        store.run_register("r", "nightly", owner=None, team=None, state="running")
        store.run_set_state("r", "killed", final=True)
        store.close()
        before = snapshot(trail.parent)
        policy = RetentionPolicy(audit=DAY, checkpoints=0, idempotency=0, runs=0)
        with SQLiteStore(store.path) as reopened:
            report = apply_retention(
                policy, store=reopened, audit_path=trail, now=time.time() + 1, dry_run=True
            )
            assert RetentionReport(2, 2, 1, 1, 1, dry_run=True) == report
            assert "audit: 2 rotated file(s) (2 lines) would be removed" == report.lines()[0]
            assert {"step": 1} == reopened.load_checkpoint("nightly")
        after = snapshot(trail.parent)
        assert {k: v for k, v in before.items() if "sqlite" not in k} == {
            k: v for k, v in after.items() if "sqlite" not in k
        }

    def test_records_what_it_removed(self, store: SQLiteStore, trail: Path) -> None:
        """The trail gets a retention_applied event with every count, after the prune record."""
        t = base_time()
        write_files(trail, [t, time.time()])
        store.save_checkpoint("a", 1)
        store.save_checkpoint("b", 2)
        policy = RetentionPolicy(audit=DAY, checkpoints=HOUR)
        report = apply_retention(policy, store=store, audit_path=trail, now=time.time() + DAY)
        assert RetentionReport(1, 1, 2, None, None) == report
        types = [r["event"]["type"] for r in records(trail)]
        assert ["hook_ran", "retention_started", "audit_pruned", "retention_applied"] == types
        [started] = events_of(trail, "retention_started")
        assert {"audit": DAY, "checkpoints": HOUR, "idempotency": None, "runs": None} == (
            started["details"]["policy_s"]
        )
        [applied] = events_of(trail, "retention_applied")
        assert (1, 1, 2, None, None) == tuple(
            applied["details"][k]
            for k in ("audit_files", "audit_lines", "checkpoints", "idempotency", "runs")
        )
        assert {"audit": DAY, "checkpoints": HOUR, "idempotency": None, "runs": None} == (
            applied["details"]["policy_s"]
        )
        assert verify_audit_log(trail).ok

    def test_signed_trail_without_its_key_keeps_the_store(
        self, store: SQLiteStore, trail: Path
    ) -> None:
        """A trail the records cannot be appended to stops the run before a store row goes."""
        write_files(trail, [time.time()], key=KEY)
        store.save_checkpoint("nightly", {"step": 1})
        before = snapshot(trail.parent)
        with pytest.raises(ConfigurationError, match="signed with HMAC-SHA-256"):
            apply_retention(
                RetentionPolicy(checkpoints=0), store=store, audit_path=trail, now=time.time() + 1
            )
        assert {"step": 1} == store.load_checkpoint("nightly")
        assert {k: v for k, v in before.items() if "sqlite" not in k} == {
            k: v for k, v in snapshot(trail.parent).items() if "sqlite" not in k
        }

    def test_tampered_trail_stops_a_store_only_prune(self, store: SQLiteStore, trail: Path) -> None:
        """Given a trail, a policy that keeps it still verifies it before touching the store."""
        write_files(trail, [time.time(), time.time()])
        raw = trail.read_bytes()
        trail.write_bytes(raw.replace(b'"wf-1"', b'"wf-7"'))
        store.save_checkpoint("nightly", {"step": 1})
        with pytest.raises(AuditTrailError, match="does not verify \\(edited"):
            apply_retention(
                RetentionPolicy(checkpoints=0), store=store, audit_path=trail, now=time.time() + 1
            )
        assert {"step": 1} == store.load_checkpoint("nightly")

    def test_without_a_trail_the_terminator_records_it(
        self, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """With no trail given, the run is recorded through the default terminator's audit."""
        sink = termsafe.MemorySink()
        term = make_term(sink=sink)
        old = _set_default_terminator(term)
        try:
            store.save_checkpoint("nightly", {"step": 1})
            report = apply_retention(
                RetentionPolicy(checkpoints=0), store=store, now=time.time() + 1
            )
            assert term.flush(60)
        finally:
            _set_default_terminator(old)
        assert 1 == report.checkpoints
        events = [e for e in sink.events if e.type.startswith("retention_")]
        assert ["retention_started", "retention_applied"] == [e.type for e in events]
        assert (0.0, None) == (
            events[0].details["policy_s"]["checkpoints"],
            events[0].details.get("checkpoints"),
        )
        assert 1 == events[1].details["checkpoints"]

    def test_dry_run_without_a_trail_records_nothing(
        self, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """A dry run emits no event at all."""
        sink = termsafe.MemorySink()
        term = make_term(sink=sink)
        old = _set_default_terminator(term)
        try:
            store.save_checkpoint("nightly", {"step": 1})
            report = apply_retention(
                RetentionPolicy(checkpoints=0), store=store, now=time.time() + 1, dry_run=True
            )
            assert term.flush(60)
        finally:
            _set_default_terminator(old)
        assert 1 == report.checkpoints
        assert [] == [e.type for e in sink.events if e.type.startswith("retention_")]
        assert {"step": 1} == store.load_checkpoint("nightly")

    def test_max_bytes_without_a_trail(self, store: SQLiteStore) -> None:
        """max_bytes with no trail to apply it to is named."""
        with pytest.raises(ConfigurationError, match="1000"):
            apply_retention(RetentionPolicy(checkpoints=0), store=store, max_bytes=1000)

    def test_default_home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a store or a trail, those of $TERMSAFE_HOME are pruned."""
        monkeypatch.setenv("TERMSAFE_HOME", str(tmp_path / "home"))
        home = tmp_path / "home"
        home.mkdir()
        t = base_time()
        write_files(home / "audit.jsonl", [t, time.time()])
        with SQLiteStore(home / "store.sqlite3") as st:
            st.save_checkpoint("nightly", 1)
        report = apply_retention(RetentionPolicy(audit=DAY, checkpoints=0), now=time.time() + 1)
        assert (1, 1) == (report.audit_files, report.checkpoints)
        assert verify_audit_log(home / "audit.jsonl").ok
        termsafe.open_default_store().close()

    @pytest.mark.parametrize(
        ("kwargs", "error", "named"),
        [
            ({"policy": {"audit": 1}}, InvalidArgumentType, "{'audit': 1}"),
            ({"now": math.nan}, ConfigurationError, "nan"),
            ({"now": "today"}, InvalidArgumentType, "'today'"),
            ({"store": "store.sqlite3"}, InvalidArgumentType, "'store.sqlite3'"),
            ({"dry_run": "yes"}, InvalidArgumentType, "'yes'"),
            ({"audit_path": 42}, InvalidArgumentType, "42"),
            ({"audit_path": "x", "audit_key": "k"}, InvalidArgumentType, "str"),
        ],
    )
    def test_bad_arguments_are_named(
        self, tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], named: str
    ) -> None:
        """A bad argument raises naming the value, before anything is touched."""
        args: dict[str, Any] = {"policy": RetentionPolicy(), **kwargs}
        if args.get("audit_path") == "x":
            args["audit_path"] = tmp_path / "audit.jsonl"
        with pytest.raises(error) as info:
            apply_retention(**args)
        assert named in str(info.value)
        assert [] == list(tmp_path.iterdir())


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m termsafe ARGS`` with ``TERMSAFE_HOME=home``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMSAFE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "termsafe", *args],
        cwd=home.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestPruneCommand:
    @pytest.fixture
    def home(self, tmp_path: Path) -> Path:
        """A TERMSAFE_HOME with a rotated trail (two old files) and a store with a checkpoint."""
        home = tmp_path / "home"
        home.mkdir()
        t = base_time()
        write_files(home / "audit.jsonl", [t, t + 1, time.time()])
        with SQLiteStore(home / "store.sqlite3") as st:
            st.save_checkpoint("nightly", {"step": 1})
        return home

    def test_prunes_and_prints_one_line_per_kind(self, home: Path) -> None:
        """`termsafe prune` removes what is past each retention and says so, kind by kind."""
        done = run_cli(home, "prune", "--audit", "90d", "--checkpoints", "0s", "--runs", "12h")
        assert (0, "") == (done.returncode, done.stderr)
        assert [
            "audit: 2 rotated file(s) (2 lines) removed",
            "checkpoints: 1 checkpoint(s) removed",
            "idempotency: kept (no retention set)",
            "runs: 0 ended run(s) removed",
        ] == done.stdout.splitlines()
        assert (True, 2) == (
            verify_audit_log(home / "audit.jsonl").ok,
            verify_audit_log(home / "audit.jsonl").pruned_through,
        )
        verified = run_cli(home, "audit", "verify", str(home / "audit.jsonl"), "--json")
        assert (0, True, 2) == (
            verified.returncode,
            json.loads(verified.stdout)["ok"],
            json.loads(verified.stdout)["pruned_through"],
        )
        head = records(home / "audit.jsonl")[-1]
        anchor = json.dumps({"hash": head["hash"], "seq": head["seq"]})
        refused = run_cli(home, "audit", "verify", str(home / "audit.jsonl"), "--anchor", anchor)
        assert 1 == refused.returncode
        assert "deleted" in refused.stdout
        allowed = run_cli(
            home, "audit", "verify", str(home / "audit.jsonl"), "--anchor", anchor, "--allow-pruned"
        )
        assert (0, "OK") == (allowed.returncode, allowed.stdout.split(":")[0])
        with SQLiteStore(home / "store.sqlite3") as st:
            assert st.load_checkpoint("nightly") is None

    def test_dry_run(self, home: Path) -> None:
        """`--dry-run` reports what would go and changes no file."""
        before = snapshot(home)
        done = run_cli(home, "prune", "--audit", "30m", "--checkpoints", "0", "--dry-run", "--json")
        assert (0, "") == (done.returncode, done.stderr)
        assert {
            "audit_files": 2,
            "audit_lines": 2,
            "checkpoints": 1,
            "idempotency": None,
            "runs": None,
            "dry_run": True,
        } == json.loads(done.stdout)
        after = snapshot(home)
        assert {k: v for k, v in before.items() if "sqlite" not in k} == {
            k: v for k, v in after.items() if "sqlite" not in k
        }
        with SQLiteStore(home / "store.sqlite3") as st:
            assert {"step": 1} == st.load_checkpoint("nightly")

    @pytest.mark.parametrize("bad", ["90y", "-1d", "d", "1e999s", "nan"])
    def test_bad_duration(self, home: Path, bad: str) -> None:
        """A duration that is not one exits 2, naming it."""
        done = run_cli(home, "prune", f"--checkpoints={bad}")
        assert 2 == done.returncode
        assert repr(bad) in done.stderr

    def test_no_retention_given(self, home: Path) -> None:
        """Without any retention there is nothing to do: exit 2 with a usage message."""
        done = run_cli(home, "prune")
        assert 2 == done.returncode
        assert "--audit" in done.stderr

    def test_tampered_trail(self, home: Path) -> None:
        """A trail that does not verify is not pruned: exit 1, and nothing else is pruned."""
        trail = home / "audit.jsonl"
        oldest = rotated(trail)[0]
        oldest.write_bytes(oldest.read_bytes().replace(b'"wf-0"', b'"wf-9"'))
        done = run_cli(home, "prune", "--audit", "1d", "--checkpoints", "0s")
        assert 1 == done.returncode
        assert "does not verify" in done.stderr
        assert 2 == len(rotated(trail))
        with SQLiteStore(home / "store.sqlite3") as st:
            assert {"step": 1} == st.load_checkpoint("nightly")

    def test_signed_trail_without_key_file_prunes_nothing(self, home: Path) -> None:
        """A signed trail and no --key-file exits 2 before any run record is deleted."""
        trail = home / "audit.jsonl"
        for p in [*rotated(trail), trail]:
            p.unlink()
        write_files(trail, [time.time()], key=KEY)
        ended = time.time() - 200 * DAY
        with SQLiteStore(home / "store.sqlite3") as st:
            st.run_register("r1", "nightly", owner=None, team=None, state="running")
            st.run_set_state("r1", "killed", final=True)
        with sqlite3.connect(home / "store.sqlite3") as conn:
            conn.execute("UPDATE runs SET started_at = ?, ended_at = ?", (ended, ended + 1))
        done = run_cli(home, "prune", "--runs", "90d")
        assert 2 == done.returncode
        assert "HMAC" in done.stderr
        with SQLiteStore(home / "store.sqlite3") as st:
            assert ["r1"] == [r.run_id for r in st.runs()]
        key_file = home / "key"
        key_file.write_bytes(KEY)
        done = run_cli(home, "prune", "--runs", "90d", "--key-file", str(key_file))
        assert (0, "runs: 1 ended run(s) removed") == (
            done.returncode,
            done.stdout.splitlines()[-1],
        )
        assert verify_audit_log(trail, key=KEY).ok
        assert ["retention_started", "retention_applied"] == [
            r["event"]["type"] for r in records(trail)[-2:]
        ]

    def test_max_bytes(self, home: Path) -> None:
        """`--max-bytes` makes the prune's own records rotate the trail as its writers do."""
        done = run_cli(home, "prune", "--audit", "90d", "--max-bytes", str(ONE_PER_FILE))
        assert (0, "") == (done.returncode, done.stderr)
        trail = home / "audit.jsonl"
        sizes = [p.stat().st_size for p in [*rotated(trail), trail]]
        assert [] == [size for size in sizes if size > ONE_PER_FILE]
        assert len(sizes) >= 3  # the three records did not fit in one file
        assert verify_audit_log(trail).ok

    def test_no_store(self, tmp_path: Path) -> None:
        """Store retentions without a store say so, and create none."""
        home = tmp_path / "empty"
        home.mkdir()
        done = run_cli(home, "prune", "--checkpoints", "1d", "--idempotency", "24h")
        assert (0, "") == (done.returncode, done.stderr)
        store = home / "store.sqlite3"
        assert [
            "audit: kept (no retention set)",
            f"checkpoints: no store at {store}",
            f"idempotency: no store at {store}",
            "runs: kept (no retention set)",
        ] == done.stdout.splitlines()
        assert [] == list(home.iterdir())

    def test_missing_trail(self, tmp_path: Path) -> None:
        """Audit retention for a trail that does not exist exits 2, naming the path."""
        home = tmp_path / "empty"
        home.mkdir()
        done = run_cli(home, "prune", "--audit", "90d")
        assert 2 == done.returncode
        assert "audit.jsonl" in done.stderr
