"""The audit trail: events, sinks, the hash-chained JSONL file and its verifier.

Everything runs on real files in temporary folders; the cross-process test runs
two real Python processes against one trail.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import filelock
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from termsafe._audit import (
    GENESIS,
    Anchor,
    AuditEvent,
    AuditSink,
    AuditTrailError,
    JsonlSink,
    LoggingSink,
    MemorySink,
    VerifyReport,
    redact_fields,
    utc_timestamp,
    verify_audit_log,
)
from termsafe._exceptions import ConfigurationError, InvalidArgumentType

REPO = Path(__file__).resolve().parents[1]
KEY = b"k3y-kept-somewhere-else"
ALICE = {"id": "alice", "kind": "user", "roles": ["admin"], "teams": ["data"]}

PROPERTY = settings(deadline=None, max_examples=40)


def event(i: int = 0, **overrides: Any) -> AuditEvent:
    """A realistic event; ``i`` varies the content."""
    fields: dict[str, Any] = {
        "seq": i,
        "timestamp": utc_timestamp(1_790_000_000.0 + i),
        "type": "kill_requested",
        "workflow_id": f"wf-{i}",
        "actor": ALICE,
        "reason": f"stuck for {i} minutes",
        "state": "terminating",
        "details": {"force": False, "attempt": i},
    }
    fields.update(overrides)
    return AuditEvent(**fields)


def canonical(obj: object) -> str:
    """Canonical JSON as the trail format defines it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rehash(rec: dict[str, Any], key: bytes | None = None) -> dict[str, Any]:
    """``rec`` with ``hash`` recomputed over everything else (what a forger does)."""
    body = canonical({k: v for k, v in rec.items() if k != "hash"}).encode()
    if key is None:
        digest = hashlib.sha256(body).hexdigest()
    else:
        digest = hmac.new(key, body, hashlib.sha256).hexdigest()
    return {**rec, "hash": digest}


def as_line(rec: dict[str, Any]) -> bytes:
    """Serialise a record the way the sink writes it."""
    return canonical(rec).encode() + b"\n"


def write_trail(path: Path, n: int, key: bytes | None = None, **kwargs: Any) -> Anchor:
    """Append ``n`` events with a fresh sink; return the head anchor."""
    with JsonlSink(path, key=key, fsync="never", **kwargs) as sink:
        for i in range(n):
            sink.emit(event(i))
        return sink.anchor()


def read_lines(path: Path) -> list[bytes]:
    """The raw lines of a file, line endings kept."""
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    """The parsed lines of a file (without a rotated file's seal)."""
    return [json.loads(line) for line in read_lines(path) if line != b"\n"]


def put(path: Path, lines: list[bytes]) -> None:
    """Overwrite ``path`` with ``lines``."""
    path.write_bytes(b"".join(lines))


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    """Where a test's trail goes."""
    return tmp_path / "audit.jsonl"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for hypothesis examples (tmp_path is per test, not per example)."""
    return tmp_path_factory.mktemp("examples")


def fresh(scratch: Path) -> Path:
    """A trail path in a new, empty folder of its own: one per hypothesis example."""
    return Path(tempfile.mkdtemp(dir=scratch)) / "audit.jsonl"


class State(str, enum.Enum):
    """A str enum like ``WorkflowState``."""

    KILLED = "killed"


class TestUtcTimestamp:
    def test_format(self) -> None:
        """A time becomes ISO 8601 UTC with milliseconds and a Z."""
        assert "2026-09-21T21:46:40.123Z" == utc_timestamp(1_790_027_200.1234)

    def test_epoch(self) -> None:
        """The epoch has three zero millisecond digits."""
        assert "1970-01-01T00:00:00.000Z" == utc_timestamp(0)

    def test_milliseconds_are_truncated(self) -> None:
        """Sub-millisecond digits are dropped, never rounded up into the next millisecond."""
        assert "1970-01-01T00:00:01.999Z" == utc_timestamp(1.9994)

    def test_default_is_now(self) -> None:
        """Without an argument the current time is formatted."""
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp())

    def test_rejects_non_numbers(self) -> None:
        """A string is refused with a message naming it."""
        with pytest.raises(InvalidArgumentType, match="'noon'"):
            utc_timestamp("noon")  # type: ignore[arg-type]

    def test_rejects_nan(self) -> None:
        """NaN is refused."""
        with pytest.raises(ConfigurationError, match="nan"):
            utc_timestamp(math.nan)


class TestAuditEvent:
    def test_round_trip(self) -> None:
        """from_dict(as_dict()) gives back an equal event."""
        ev = event(3)
        assert ev == AuditEvent.from_dict(ev.as_dict())

    def test_as_dict_is_plain_json(self) -> None:
        """as_dict returns plain dicts that json.dumps takes as they are."""
        d = event(1).as_dict()
        assert dict is type(d["details"])
        assert dict is type(d["actor"])
        assert d == json.loads(json.dumps(d))

    def test_details_are_a_frozen_copy(self) -> None:
        """Details are copied on construction and cannot be changed afterwards."""
        details = {"a": 1}
        ev = event(details=details)
        details["a"] = 2
        assert {"a": 1} == dict(ev.details)
        assert isinstance(ev.details, types.MappingProxyType)
        with pytest.raises(TypeError):
            ev.details["a"] = 3  # type: ignore[index]

    def test_defaults(self) -> None:
        """Only seq, timestamp and type are required; details default to empty."""
        ev = AuditEvent(seq=0, timestamp="t", type="alert")
        assert (None, None, None, None, {}) == (
            ev.workflow_id,
            ev.actor,
            ev.reason,
            ev.state,
            dict(ev.details),
        )

    def test_str_enum_state_becomes_plain_str(self) -> None:
        """A str enum state is stored as its plain value."""
        ev = event(state=State.KILLED)
        assert str is type(ev.state)
        assert "killed" == ev.state

    def test_is_frozen(self) -> None:
        """Events cannot be changed."""
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            event().reason = "x"  # type: ignore[misc]

    def test_is_hashable(self) -> None:
        """Equal events hash equally (details and actor take part in equality only)."""
        assert hash(event(2)) == hash(event(2))

    @pytest.mark.parametrize(
        ("field", "value"),
        [("seq", "1"), ("seq", True), ("type", 5), ("workflow_id", 7), ("details", [1])],
    )
    def test_bad_types_are_named(self, field: str, value: object) -> None:
        """A field of the wrong type is refused with a message naming field and value."""
        overrides: dict[str, Any] = {field: value}
        with pytest.raises(InvalidArgumentType, match=field):
            event(**overrides)

    def test_negative_seq(self) -> None:
        """A negative sequence number is refused."""
        with pytest.raises(ConfigurationError, match=r"seq must be >= 0 \(got -1\)"):
            event(seq=-1)

    def test_from_dict_missing_fields(self) -> None:
        """from_dict names the fields that are missing."""
        with pytest.raises(ConfigurationError, match="missing timestamp, type"):
            AuditEvent.from_dict({"seq": 1})


class TestMemorySink:
    def test_keeps_events_in_order(self) -> None:
        """Events come back in the order they were emitted, with their types."""
        sink = MemorySink()
        sink.emit(event(1, type="kill_requested"))
        sink.emit(event(2, type="state_changed"))
        assert ["kill_requested", "state_changed"] == sink.types()
        assert [1, 2] == [e.seq for e in sink.events]

    def test_events_is_a_copy(self) -> None:
        """Changing the returned list does not change the sink."""
        sink = MemorySink()
        sink.emit(event())
        sink.events.clear()
        assert 1 == len(sink.events)

    def test_clear_and_close(self) -> None:
        """clear() forgets; close() keeps what is there."""
        sink = MemorySink()
        sink.emit(event())
        sink.close()
        assert 1 == len(sink.events)
        sink.clear()
        assert [] == sink.events

    def test_thread_safe(self) -> None:
        """Eight threads emitting at once lose nothing."""
        sink = MemorySink()

        def work(t: int) -> None:
            for i in range(200):
                sink.emit(event(t * 1000 + i))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert 1600 == len(sink.events)

    def test_rejects_non_events(self) -> None:
        """A dict is not an event."""
        with pytest.raises(InvalidArgumentType, match="AuditEvent"):
            MemorySink().emit({"type": "x"})  # type: ignore[arg-type]

    def test_is_an_audit_sink(self) -> None:
        """MemorySink satisfies the AuditSink protocol."""
        assert isinstance(MemorySink(), AuditSink)


class TestLoggingSink:
    def test_one_record_per_event(self, caplog: pytest.LogCaptureFixture) -> None:
        """Each event is one record whose message is the event as JSON."""
        caplog.set_level(logging.INFO, logger="termsafe.audit")
        sink = LoggingSink()
        sink.emit(event(1))
        sink.emit(event(2))
        assert 2 == len(caplog.records)
        assert event(2).as_dict() == json.loads(caplog.records[1].getMessage())

    def test_structured_extra(self, caplog: pytest.LogCaptureFixture) -> None:
        """The record carries the event dict as ``audit_event``."""
        caplog.set_level(logging.INFO, logger="termsafe.audit")
        LoggingSink().emit(event(4))
        assert event(4).as_dict() == caplog.records[0].__dict__["audit_event"]

    def test_own_logger_and_level(self, caplog: pytest.LogCaptureFixture) -> None:
        """The logger and level given are used."""
        caplog.set_level(logging.DEBUG, logger="app.audit")
        LoggingSink(logging.getLogger("app.audit"), logging.WARNING).emit(event())
        assert [("app.audit", logging.WARNING)] == [(r.name, r.levelno) for r in caplog.records]

    def test_disabled_level_logs_nothing(self, caplog: pytest.LogCaptureFixture) -> None:
        """Below the logger's level nothing is logged."""
        caplog.set_level(logging.ERROR, logger="termsafe.audit")
        LoggingSink().emit(event())
        assert [] == caplog.records

    def test_redacts(self, caplog: pytest.LogCaptureFixture) -> None:
        """A redact function applies before the event is logged."""
        caplog.set_level(logging.INFO, logger="termsafe.audit")
        LoggingSink(redact=redact_fields("attempt")).emit(event(9))
        assert "[redacted]" == caplog.records[0].__dict__["audit_event"]["details"]["attempt"]

    def test_rejects_bad_logger(self) -> None:
        """A logger name is not a logger."""
        with pytest.raises(InvalidArgumentType, match="'app'"):
            LoggingSink("app")  # type: ignore[arg-type]

    def test_is_an_audit_sink(self) -> None:
        """LoggingSink satisfies the AuditSink protocol."""
        assert isinstance(LoggingSink(), AuditSink)


class TestJsonlSink:
    def test_line_format(self, trail: Path) -> None:
        """Each line holds seq, the event, prev, mac and a SHA-256 over the rest."""
        write_trail(trail, 3)
        recs = records(trail)
        assert [1, 2, 3] == [r["seq"] for r in recs]
        assert [GENESIS, recs[0]["hash"], recs[1]["hash"]] == [r["prev"] for r in recs]
        assert [event(i).as_dict() for i in range(3)] == [r["event"] for r in recs]
        assert {"sha256"} == {r["mac"] for r in recs}
        assert [rehash(r)["hash"] for r in recs] == [r["hash"] for r in recs]

    def test_lines_are_canonical_json(self, trail: Path) -> None:
        """A line is exactly the canonical JSON of its fields."""
        write_trail(trail, 2)
        assert [as_line(r) for r in records(trail)] == read_lines(trail)

    def test_hmac_lines(self, trail: Path) -> None:
        """With a key each line says hmac-sha256 and carries the HMAC."""
        write_trail(trail, 2, key=KEY)
        recs = records(trail)
        assert {"hmac-sha256"} == {r["mac"] for r in recs}
        assert [rehash(r, KEY)["hash"] for r in recs] == [r["hash"] for r in recs]

    def test_appends_continue_the_chain(self, trail: Path) -> None:
        """A second sink on an existing trail continues its chain."""
        write_trail(trail, 3)
        write_trail(trail, 2)
        assert VerifyReport(True, 5, None, None, "5 lines, chain intact") == verify_audit_log(trail)

    def test_two_sinks_interleaved(self, trail: Path) -> None:
        """Two open sinks appending in turn to one file make one chain."""
        a, b = JsonlSink(trail, fsync="never"), JsonlSink(trail, fsync="never")
        for i in range(10):
            (a if i % 3 else b).emit(event(i))
        a.close()
        b.close()
        assert (True, 10) == (verify_audit_log(trail).ok, verify_audit_log(trail).lines)

    def test_threads(self, trail: Path) -> None:
        """Eight threads sharing one sink produce one chain holding every event."""
        sink = JsonlSink(trail, fsync="never")

        def work(t: int) -> None:
            for i in range(50):
                sink.emit(event(t * 100 + i))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        sink.close()
        report = verify_audit_log(trail)
        assert (True, 400) == (report.ok, report.lines)
        assert sorted(t * 100 + i for t in range(8) for i in range(50)) == sorted(
            r["event"]["seq"] for r in records(trail)
        )

    def test_two_processes(self, trail: Path) -> None:
        """Two processes appending 200 events each at once make one valid chain of 400."""
        code = (
            "import sys\n"
            "from termsafe._audit import AuditEvent, JsonlSink, utc_timestamp\n"
            "path, who = sys.argv[1], sys.argv[2]\n"
            "sink = JsonlSink(path, fsync='always')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read(1)\n"
            "for i in range(200):\n"
            "    sink.emit(AuditEvent(seq=i, timestamp=utc_timestamp(), type='hook_ran',"
            " workflow_id=who))\n"
            "sink.close()\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(trail), who],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for who in ("p1", "p2")
        ]
        try:
            # The barrier: both have opened the sink before either may start.
            for proc in procs:
                assert proc.stdout is not None
                assert "ready\n" == proc.stdout.readline()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("g")
                proc.stdin.close()
            assert [0, 0] == [proc.wait(timeout=60) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        report = verify_audit_log(trail)
        assert (True, 400, "400 lines, chain intact") == (report.ok, report.lines, report.message)
        by_writer: dict[str, list[int]] = {"p1": [], "p2": []}
        for rec in records(trail):
            by_writer[rec["event"]["workflow_id"]].append(rec["event"]["seq"])
        assert {"p1": list(range(200)), "p2": list(range(200))} == by_writer

    def test_waits_for_a_filelock_holder(self, trail: Path) -> None:
        """While someone holds filelock.FileLock(path + '.lock'), emit waits for it."""
        holder = filelock.FileLock(str(trail) + ".lock")
        sink = JsonlSink(trail, fsync="never")
        done = threading.Event()

        def append() -> None:
            sink.emit(event())
            done.set()

        with holder:
            worker = threading.Thread(target=append)
            worker.start()
            assert not done.wait(0.3)
        worker.join(10)
        sink.close()
        assert done.is_set()
        assert 1 == verify_audit_log(trail).lines

    def test_deleted_lock_file_is_replaced(self, trail: Path) -> None:
        """After someone deletes the lock file, an open sink locks the new one again."""
        sink = JsonlSink(trail, fsync="never")
        sink.emit(event(0))
        Path(str(trail) + ".lock").unlink()
        write_trail(trail, 1)  # another writer creates a new lock file
        sink.emit(event(2))  # sees the foreign line, checks its lock file
        done = threading.Event()

        def append() -> None:
            sink.emit(event(3))
            done.set()

        with filelock.FileLock(str(trail) + ".lock"):
            worker = threading.Thread(target=append)
            worker.start()
            assert not done.wait(0.3)
        worker.join(10)
        sink.close()
        assert (True, 4) == (verify_audit_log(trail).ok, verify_audit_log(trail).lines)

    def test_reopen_after_torn_tail(self, trail: Path) -> None:
        """A sink opening a trail with a torn last line removes it, and the chain verifies."""
        write_trail(trail, 5)
        lines = read_lines(trail)
        put(trail, [*lines[:4], lines[4][:30]])
        write_trail(trail, 1)
        assert VerifyReport(True, 5, None, None, "5 lines, chain intact") == verify_audit_log(trail)
        assert lines[:4] == read_lines(trail)[:4]
        assert 5 == records(trail)[4]["seq"]

    def test_open_sink_repairs_a_tail_torn_by_another_writer(self, trail: Path) -> None:
        """A sink already open notices a torn line left by another writer and repairs it."""
        sink = JsonlSink(trail, fsync="never")
        sink.emit(event(0))
        with trail.open("ab") as f:
            f.write(b'{"event":{"seq":')  # a writer that died mid-line
        sink.emit(event(1))
        sink.close()
        assert (True, 2, False) == (
            verify_audit_log(trail).ok,
            verify_audit_log(trail).lines,
            verify_audit_log(trail).torn_tail,
        )

    def test_anchor(self, trail: Path) -> None:
        """The anchor is the seq and hash of the last line."""
        anchor = write_trail(trail, 4)
        last = records(trail)[-1]
        assert Anchor(4, last["hash"]) == anchor

    def test_anchor_of_an_empty_trail(self, trail: Path) -> None:
        """A trail with no lines is anchored at seq 0, genesis, and no file is created."""
        sink = JsonlSink(trail)
        assert Anchor(0, GENESIS) == sink.anchor()
        sink.close()
        assert not trail.exists()

    def test_anchor_sees_other_writers(self, trail: Path) -> None:
        """anchor() reads the head under the lock, including other sinks' lines."""
        sink = JsonlSink(trail, fsync="never")
        sink.emit(event(0))
        write_trail(trail, 2)
        assert 3 == sink.anchor().seq
        sink.close()

    def test_anchor_json_round_trip(self) -> None:
        """An anchor survives to_json/from_json."""
        anchor = Anchor(7, "ab" * 32)
        assert '{"hash":"' + "ab" * 32 + '","seq":7}' == anchor.to_json()
        assert anchor == Anchor.from_json(anchor.to_json())

    def test_anchor_from_bad_json(self) -> None:
        """Text that is not an anchor is refused with a message quoting it."""
        with pytest.raises(ConfigurationError, match="not an anchor"):
            Anchor.from_json('{"seq": 1}')

    def test_batch_mode(self, trail: Path) -> None:
        """In batch mode every line is in the file at once; flush and close work."""
        sink = JsonlSink(trail, fsync="batch")
        for i in range(150):
            sink.emit(event(i))
        assert 150 == len(read_lines(trail))
        sink.flush()
        sink.close()
        assert verify_audit_log(trail).ok

    def test_unusual_details_are_written(self, trail: Path) -> None:
        """Sets, paths, NaN, mixed key types and lone surrogates still make a valid line."""
        with JsonlSink(trail, fsync="never") as sink:
            sink.emit(event(details={"roles": {"b", "a"}, "path": Path("/x")}))
            sink.emit(event(details={"ratio": math.nan, 1: "one", "1x": 2}))
            sink.emit(event(reason="bad \udc80 byte"))
        trail.read_bytes().decode("utf-8")  # the file stays valid UTF-8
        assert (True, 3) == (verify_audit_log(trail).ok, verify_audit_log(trail).lines)
        assert ["a", "b"] == records(trail)[0]["event"]["details"]["roles"]
        assert "bad \udc80 byte" == records(trail)[2]["event"]["reason"]

    def test_emit_after_close(self, trail: Path) -> None:
        """A closed sink refuses to write; closing twice is fine."""
        sink = JsonlSink(trail)
        sink.close()
        sink.close()
        with pytest.raises(AuditTrailError, match="closed"):
            sink.emit(event())

    def test_refuses_a_damaged_head(self, trail: Path) -> None:
        """A trail whose last complete line is garbage is not appended to."""
        write_trail(trail, 2)
        with trail.open("ab") as f:
            f.write(b"not json\n")
        with pytest.raises(AuditTrailError, match="last line is not a trail line"):
            write_trail(trail, 1)

    def test_refuses_a_key_for_an_unsigned_trail(self, trail: Path) -> None:
        """A sink with a key will not append HMAC lines to a plain trail."""
        write_trail(trail, 1)
        with pytest.raises(ConfigurationError, match="signed with 'sha256'"):
            write_trail(trail, 1, key=KEY)

    def test_refuses_the_wrong_key(self, trail: Path) -> None:
        """A sink whose key does not verify the trail's last line refuses to append."""
        write_trail(trail, 1, key=KEY)
        with pytest.raises(ConfigurationError, match="key does not verify"):
            write_trail(trail, 1, key=b"another key")

    def test_bad_fsync_mode(self, trail: Path) -> None:
        """An unknown fsync mode is refused with the exact list of modes."""
        with pytest.raises(
            ConfigurationError,
            match=re.escape("fsync must be one of 'always', 'batch', 'never' (got 'sometimes')"),
        ):
            JsonlSink(trail, fsync="sometimes")  # type: ignore[arg-type]

    def test_key_must_be_bytes(self, trail: Path) -> None:
        """A str key is refused."""
        with pytest.raises(InvalidArgumentType, match="key must be bytes"):
            JsonlSink(trail, key="secret")  # type: ignore[arg-type]

    def test_empty_key(self, trail: Path) -> None:
        """An empty key is refused."""
        with pytest.raises(ConfigurationError, match="key must not be empty"):
            JsonlSink(trail, key=b"")

    def test_path_is_a_directory(self, tmp_path: Path) -> None:
        """A directory is refused with a message naming it."""
        with pytest.raises(ConfigurationError, match=re.escape(repr(str(tmp_path)))):
            JsonlSink(tmp_path)

    def test_missing_folder(self, tmp_path: Path) -> None:
        """A trail in a folder that does not exist is refused, naming the folder."""
        with pytest.raises(FileNotFoundError, match="nowhere"):
            JsonlSink(tmp_path / "nowhere" / "audit.jsonl")

    @pytest.mark.parametrize("value", [0, -5, True, 1.5])
    def test_bad_max_bytes(self, trail: Path, value: object) -> None:
        """max_bytes must be a positive int."""
        with pytest.raises((ConfigurationError, InvalidArgumentType), match="max_bytes"):
            JsonlSink(trail, max_bytes=value)  # type: ignore[arg-type]

    def test_nothing_opened_before_first_use(self, trail: Path) -> None:
        """Constructing a sink creates no file."""
        JsonlSink(trail).close()
        assert [] == list(trail.parent.iterdir())

    def test_is_an_audit_sink(self, trail: Path) -> None:
        """JsonlSink satisfies the AuditSink protocol."""
        assert isinstance(JsonlSink(trail), AuditSink)


def _tamper_report(path: Path, **kwargs: Any) -> tuple[bool, str | None, int | None]:
    report = verify_audit_log(path, **kwargs)
    return report.ok, report.kind, report.first_bad_line


class TestVerify:
    def test_intact(self, trail: Path) -> None:
        """An untouched trail is ok, and says how many lines it checked."""
        anchor = write_trail(trail, 6)
        assert VerifyReport(True, 6, None, None, "6 lines, chain intact") == verify_audit_log(
            trail, anchor=anchor
        )

    def test_empty_file(self, trail: Path) -> None:
        """An empty trail is intact."""
        trail.touch()
        assert (True, 0) == (verify_audit_log(trail).ok, verify_audit_log(trail).lines)

    def test_missing_file(self, trail: Path) -> None:
        """A missing trail raises FileNotFoundError naming the path."""
        with pytest.raises(FileNotFoundError, match=re.escape(str(trail))):
            verify_audit_log(trail)

    def test_bad_key_type(self, trail: Path) -> None:
        """The verifier's key must be bytes too."""
        trail.touch()
        with pytest.raises(InvalidArgumentType, match="key"):
            verify_audit_log(trail, key="k")  # type: ignore[arg-type]

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_edit_is_found(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """Changing a line's content without fixing its hash is "edited" at that line."""
        path = fresh(scratch)
        write_trail(path, n)
        i = data.draw(st.integers(0, n - 1))
        lines = read_lines(path)
        rec = json.loads(lines[i])
        rec["event"]["reason"] = "nothing to see here"
        lines[i] = as_line(rec)
        put(path, lines)
        assert (False, "edited", i + 1) == _tamper_report(path)

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_any_byte_changed_is_found(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """Whatever byte of a line is changed, to whatever, the line is reported."""
        path = fresh(scratch)
        write_trail(path, n)
        lines = read_lines(path)
        i = data.draw(st.integers(0, n - 1))
        pos = data.draw(st.integers(0, len(lines[i]) - 2))
        new = data.draw(st.integers(0, 255).filter(lambda b: b != lines[i][pos]))
        lines[i] = lines[i][:pos] + bytes([new]) + lines[i][pos + 1 :]
        put(path, lines)
        ok, _kind, bad = _tamper_report(path)
        assert (False, i + 1) == (ok, bad)

    @PROPERTY
    @given(n=st.integers(3, 30), data=st.data())
    def test_edit_with_recomputed_hash(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """An edit whose hash is recomputed (no key) breaks the next prev: "edited" at the line."""
        path = fresh(scratch)
        write_trail(path, n)
        i = data.draw(st.integers(0, n - 2))
        lines = read_lines(path)
        rec = json.loads(lines[i])
        rec["event"]["actor"] = None
        lines[i] = as_line(rehash(rec))
        put(path, lines)
        assert (False, "edited", i + 1) == _tamper_report(path)

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_deletion_is_found(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """Removing lines (not the last) is "deleted" where the gap is."""
        path = fresh(scratch)
        write_trail(path, n)
        i = data.draw(st.integers(0, n - 2))
        k = data.draw(st.integers(1, n - 1 - i))
        lines = read_lines(path)
        put(path, lines[:i] + lines[i + k :])
        assert (False, "deleted", i + 1) == _tamper_report(path)

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_insertion_is_found(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """A copy of a valid line inserted anywhere is "inserted" (at the second of twins)."""
        path = fresh(scratch)
        write_trail(path, n)
        j = data.draw(st.integers(0, n - 1), label="copied line")
        p = data.draw(st.integers(0, n), label="insert before index")
        lines = read_lines(path)
        put(path, [*lines[:p], lines[j], *lines[p:]])
        # Inserted right before its original, the copy is the one that fits and
        # the original is the duplicate.
        expected = p + 2 if p == j else p + 1
        assert (False, "inserted", expected) == _tamper_report(path)

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_swap_is_found(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """Two lines swapped are "reordered" at the first of them."""
        path = fresh(scratch)
        write_trail(path, n)
        pair = st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True)
        i, j = sorted(data.draw(pair))
        lines = read_lines(path)
        lines[i], lines[j] = lines[j], lines[i]
        put(path, lines)
        assert (False, "reordered", i + 1) == _tamper_report(path)

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_truncation_is_found(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """Cutting lines off the end is "truncated" given an anchor taken before."""
        path = fresh(scratch)
        anchor = write_trail(path, n)
        keep = data.draw(st.integers(0, n - 1))
        put(path, read_lines(path)[:keep])
        assert (True, None, None) == _tamper_report(path)  # without the anchor: invisible
        assert (False, "truncated", keep + 1) == _tamper_report(path, anchor=anchor)

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_torn_tail_is_not_tampering(self, scratch: Path, n: int, data: st.DataObject) -> None:
        """A last line cut mid-way is a torn tail: ok, not tampering."""
        path = fresh(scratch)
        write_trail(path, n)
        lines = read_lines(path)
        cut = data.draw(st.integers(1, len(lines[-1]) - 1))
        put(path, [*lines[:-1], lines[-1][:cut]])
        report = verify_audit_log(path)
        assert (True, True, "torn_tail", n, n - 1) == (
            report.ok,
            report.torn_tail,
            report.kind,
            report.first_bad_line,
            report.lines,
        )

    @PROPERTY
    @given(n=st.integers(2, 30), data=st.data())
    def test_hmac_defeats_a_recomputed_sha256(
        self, scratch: Path, n: int, data: st.DataObject
    ) -> None:
        """With a key, an edit carrying a freshly computed plain SHA-256 is "edited"."""
        path = fresh(scratch)
        write_trail(path, n, key=KEY)
        i = data.draw(st.integers(0, n - 1))
        downgrade = data.draw(st.booleans(), label="also claim mac sha256")
        lines = read_lines(path)
        rec = json.loads(lines[i])
        rec["event"]["reason"] = "approved by nobody"
        if downgrade:
            rec["mac"] = "sha256"
        lines[i] = as_line(rehash(rec))
        put(path, lines)
        assert (False, "edited", i + 1) == _tamper_report(path, key=KEY)

    def test_edited_last_line_with_anchor(self, trail: Path) -> None:
        """A rewritten last line is caught by the anchor, as truncated-and-rewritten."""
        anchor = write_trail(trail, 3)
        lines = read_lines(trail)
        rec = json.loads(lines[2])
        rec["event"]["reason"] = "x"
        put(trail, [*lines[:2], as_line(rehash(rec))])
        assert (True, None, None) == _tamper_report(trail)
        assert (False, "truncated", 3) == _tamper_report(trail, anchor=anchor)

    def test_torn_anchored_line_is_truncation(self, trail: Path) -> None:
        """If the torn line is one the anchor vouches for, it was cut: truncated."""
        anchor = write_trail(trail, 3)
        lines = read_lines(trail)
        put(trail, [*lines[:2], lines[2][:10]])
        assert (False, "truncated", 3) == _tamper_report(trail, anchor=anchor)

    def test_whitespace_edit(self, trail: Path) -> None:
        """Even a change that JSON parsing ignores (a space) is an edit."""
        write_trail(trail, 3)
        lines = read_lines(trail)
        lines[1] = lines[1].replace(b'{"event":', b'{ "event":', 1)
        put(trail, lines)
        assert (False, "edited", 2) == _tamper_report(trail)

    def test_malformed_middle_line(self, trail: Path) -> None:
        """A line in the middle that is not JSON is "malformed"."""
        write_trail(trail, 3)
        lines = read_lines(trail)
        put(trail, [lines[0], b"garbage\n", *lines[1:]])
        report = verify_audit_log(trail)
        assert (False, "malformed", 2) == (report.ok, report.kind, report.first_bad_line)
        assert "not valid JSON" in report.message

    def test_message_names_the_line(self, trail: Path) -> None:
        """The message names the file and the line."""
        write_trail(trail, 3)
        lines = read_lines(trail)
        put(trail, [lines[0], lines[2]])
        report = verify_audit_log(trail)
        assert f"line 2 of {trail}: seq 1 is followed by seq 3: seq 2 deleted" == report.message
        assert str(trail) == report.path

    def test_deleted_first_line(self, trail: Path) -> None:
        """A trail that does not start at seq 1 lost its first lines."""
        write_trail(trail, 3)
        put(trail, read_lines(trail)[1:])
        assert (False, "deleted", 1) == _tamper_report(trail)

    def test_forged_insertion_with_key(self, trail: Path) -> None:
        """A forged line (not a copy) inserted into a signed trail is "inserted"."""
        write_trail(trail, 4, key=KEY)
        lines = read_lines(trail)
        forged = rehash({**json.loads(lines[1]), "event": event(99).as_dict()}, b"guess")
        put(trail, [*lines[:2], as_line(forged), *lines[2:]])
        assert (False, "inserted", 3) == _tamper_report(trail, key=KEY)

    def test_wrong_key(self, trail: Path) -> None:
        """Verifying with another key is a bad signature, not an edit."""
        write_trail(trail, 3, key=KEY)
        report = verify_audit_log(trail, key=b"wrong")
        assert (False, "bad_signature", 1) == (report.ok, report.kind, report.first_bad_line)
        assert "wrong key" in report.message

    def test_signed_trail_without_key(self, trail: Path) -> None:
        """A signed trail verified without its key is a bad signature."""
        write_trail(trail, 2, key=KEY)
        assert (False, "bad_signature", 1) == _tamper_report(trail)

    def test_key_for_an_unsigned_trail(self, trail: Path) -> None:
        """A key given for a plain trail is a bad signature."""
        write_trail(trail, 2)
        assert (False, "bad_signature", 1) == _tamper_report(trail, key=KEY)

    def test_signed_trail_with_key(self, trail: Path) -> None:
        """A signed trail verifies with its key."""
        anchor = write_trail(trail, 5, key=KEY)
        assert (True, None, None) == _tamper_report(trail, key=KEY, anchor=anchor)


class TestRotation:
    def test_rotates_and_verifies(self, trail: Path) -> None:
        """Past max_bytes the file moves to .1, .2, ...; the set verifies as one chain."""
        write_trail(trail, 40, max_bytes=2000)
        rotated = sorted(trail.parent.glob("audit.jsonl.[0-9]*"))
        assert len(rotated) >= 3
        for name in [*rotated, trail]:
            assert name.stat().st_size <= 2000
        report = verify_audit_log(trail)
        assert (True, 40) == (report.ok, report.lines)
        assert report.message.startswith("40 lines, chain intact (")

    def test_chain_continues_across_files(self, trail: Path) -> None:
        """The new file's first prev is the old file's last hash, and seq goes on."""
        write_trail(trail, 6, max_bytes=2000)
        old = records(trail.with_name("audit.jsonl.1"))
        new = records(trail)
        assert old[-1]["hash"] == new[0]["prev"]
        assert old[-1]["seq"] + 1 == new[0]["seq"]

    def test_rotated_files_are_sealed(self, trail: Path) -> None:
        """A rotated file ends with one empty line, the seal."""
        write_trail(trail, 6, max_bytes=2000)
        assert trail.with_name("audit.jsonl.1").read_bytes().endswith(b"}\n\n")

    def test_missing_rotated_file(self, trail: Path) -> None:
        """A rotated file that disappeared shows as deleted lines in the next one."""
        write_trail(trail, 40, max_bytes=2000)
        middle = trail.with_name("audit.jsonl.2")
        middle.unlink()
        report = verify_audit_log(trail)
        assert (False, "deleted", 1, str(trail.with_name("audit.jsonl.1"))) == (
            report.ok,
            report.kind,
            report.first_bad_line,
            report.path,
        )

    def test_edit_in_a_rotated_file(self, trail: Path) -> None:
        """An edit in an old file is reported in that file."""
        write_trail(trail, 40, max_bytes=2000)
        oldest = max(trail.parent.glob("audit.jsonl.[0-9]*"), key=lambda p: int(p.suffix[1:]))
        lines = read_lines(oldest)
        rec = json.loads(lines[1])
        rec["event"]["reason"] = "x"
        lines[1] = as_line(rec)
        put(oldest, lines)
        report = verify_audit_log(trail)
        assert (False, "edited", 2, str(oldest)) == (
            report.ok,
            report.kind,
            report.first_bad_line,
            report.path,
        )

    def test_truncation_across_rotation(self, trail: Path) -> None:
        """An anchor still catches a current file cut back after rotation."""
        anchor = write_trail(trail, 20, max_bytes=2000)
        put(trail, read_lines(trail)[:1])
        assert (False, "truncated", 2) == _tamper_report(trail, anchor=anchor)

    def test_other_sink_follows_a_rotation(self, trail: Path) -> None:
        """A sink holding the old file open moves to the new one after another rotates."""
        steady = JsonlSink(trail, fsync="never")
        rotating = JsonlSink(trail, fsync="never", max_bytes=2000)
        for i in range(30):
            (rotating if i % 2 else steady).emit(event(i))
        steady.close()
        rotating.close()
        report = verify_audit_log(trail)
        assert (True, 30) == (report.ok, report.lines)

    def test_crash_between_rename_and_first_line(self, trail: Path) -> None:
        """After a rotation that died right after the rename, the next append continues."""
        write_trail(trail, 3)
        trail.rename(trail.with_name("audit.jsonl.1"))  # unsealed, no current file
        assert (True, 3) == (verify_audit_log(trail).ok, verify_audit_log(trail).lines)
        write_trail(trail, 2)
        assert trail.with_name("audit.jsonl.1").read_bytes().endswith(b"\n\n")
        report = verify_audit_log(trail)
        assert (True, 5) == (report.ok, report.lines)
        assert 4 == records(trail)[0]["seq"]


class TestRedaction:
    def test_replaces_named_fields(self) -> None:
        """Named keys in details are replaced, at any depth."""
        redact = redact_fields("email", "card")
        ev = event(details={"email": "a@b.io", "order": {"card": "4242"}, "items": [{"card": 1}]})
        assert {
            "email": "[redacted]",
            "order": {"card": "[redacted]"},
            "items": [{"card": "[redacted]"}],
        } == dict(redact(ev).details)

    def test_scrubs_emails_in_reason(self) -> None:
        """With scrub_emails, e-mail addresses in the reason are replaced."""
        redact = redact_fields(scrub_emails=True, replacement="<email>")
        ev = event(reason="asked by jane.doe+ops@example.co.uk and bob@corp.io")
        assert "asked by <email> and <email>" == redact(ev).reason

    def test_reason_kept_without_scrub_emails(self) -> None:
        """Without scrub_emails the reason is left alone."""
        ev = event(reason="asked by jane@example.com")
        assert ev.reason == redact_fields("email")(ev).reason

    def test_untouched_event_is_returned_as_is(self) -> None:
        """An event with nothing to redact is the same object."""
        ev = event()
        assert ev is redact_fields("email")(ev)

    def test_pii_never_reaches_the_disk(self, trail: Path) -> None:
        """With redact, the personal data is not in the file, and the chain verifies."""
        redact = redact_fields("email", scrub_emails=True)
        with JsonlSink(trail, redact=redact) as sink:
            sink.emit(event(details={"email": "jane@example.com"}, reason="jane@example.com"))
        assert b"jane" not in trail.read_bytes()
        assert verify_audit_log(trail).ok

    def test_failing_redact_writes_nothing(self, trail: Path) -> None:
        """If redact raises, the event is not written."""

        def broken(ev: AuditEvent) -> AuditEvent:
            raise RuntimeError("redactor down")

        with JsonlSink(trail, redact=broken) as sink, pytest.raises(RuntimeError):
            sink.emit(event())
        assert not trail.exists()

    def test_redact_must_return_an_event(self, trail: Path) -> None:
        """A redact function returning something else is an error naming it."""
        bad: Callable[[AuditEvent], Any] = lambda ev: ev.as_dict()  # noqa: E731
        with JsonlSink(trail, redact=bad) as sink, pytest.raises(InvalidArgumentType):
            sink.emit(event())

    def test_needs_something_to_do(self) -> None:
        """redact_fields() with no names and no scrub_emails is refused."""
        with pytest.raises(ConfigurationError, match="at least one field name"):
            redact_fields()

    def test_names_must_be_strings(self) -> None:
        """A non-string name is refused, naming it."""
        with pytest.raises(InvalidArgumentType, match="42"):
            redact_fields(42)  # type: ignore[arg-type]


class TestDeliveryAtExit:
    def test_queued_events_reach_the_sink_before_a_normal_exit(self, tmp_path: Path) -> None:
        """Events still queued when the program ends are delivered before the interpreter exits."""
        out = tmp_path / "events.txt"
        code = (
            "import sys, time\n"
            "from termsafe import Terminator\n"
            "class SlowSink:\n"
            "    def __init__(self, path):\n"
            "        self.f = open(path, 'a')\n"
            "    def emit(self, event):\n"
            "        if event.type == 'workflow_started':\n"
            "            time.sleep(0.3)  # a sink slower than the program's end\n"
            "        self.f.write(event.type + '\\n')\n"
            "        self.f.flush()\n"
            "    def close(self):\n"
            "        self.f.close()\n"
            "term = Terminator(sink=SlowSink(sys.argv[1]))\n"
            "with term.workflow('job'):\n"
            "    pass\n"
            "print('done', flush=True)\n"  # no flush(), no close(): a plain exit
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (0, "done\n", "") == (proc.returncode, proc.stdout, proc.stderr)
        assert ["workflow_started", "workflow_finished"] == out.read_text().split()
