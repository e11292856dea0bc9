"""replay_audit(): post-mortems rebuilt from a real hash-chained trail."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import termsafe as ts
from termsafe._store import SQLiteStore

WAIT = 10.0
ADMIN = ts.Principal("ops", roles=["admin"])


def run_story(trail: Path) -> None:
    """Three workflows, written to ``trail`` by a real terminator.

    ``done`` completes; ``deferred`` is killed by its owner inside a critical
    section (refused first for a stranger); ``stuck`` never reaches a
    cancellation point and is killed by the system phase.
    """
    in_section = threading.Event()
    leave_section = threading.Event()
    stuck_running = threading.Event()
    release_stuck = threading.Event()
    term = ts.Terminator(phases=ts.Phases(0.05, 0.05), sink=ts.JsonlSink(trail))
    with term.workflow("done", owner="alice", team="data"):
        ts.on_cleanup(lambda: None)

    def deferred() -> None:
        with term.workflow("deferred", owner="bob", team="web"):
            ts.on_rollback(lambda: None)
            with ts.critical_section("fs", grace=30):
                in_section.set()
                assert leave_section.wait(WAIT)
            ts.checkpoint()

    def stuck() -> None:
        with term.workflow("stuck", owner="carol"):
            stuck_running.set()
            assert release_stuck.wait(WAIT)  # never a cancellation point

    threads = [threading.Thread(target=deferred), threading.Thread(target=stuck)]
    for t in threads:
        t.start()
    try:
        assert in_section.wait(WAIT)
        assert stuck_running.wait(WAIT)
        with pytest.raises(ts.KillRefused):
            term.kill("deferred", by=ts.Principal("mallory"), reason="mine")
        handle = term.kill("deferred", by=ts.Principal("bob"), reason="deploy")
        leave_section.set()
        assert ts.WorkflowState.TERMINATED == handle.wait(WAIT)
        assert ts.WorkflowState.KILLED == term.kill("stuck", by=ADMIN, reason="hung").wait(WAIT)
    finally:
        leave_section.set()
        release_stuck.set()
        for t in threads:
            t.join(WAIT)
        term.close()


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    run_story(path)
    return path


class TestReplay:
    def test_final_states_of_every_workflow(self, trail: Path) -> None:
        """Each workflow's final state is rebuilt from the trail alone."""
        replay = ts.replay_audit(trail)
        assert replay.verified
        assert {"done": "completed", "deferred": "terminated", "stuck": "killed"} == (
            replay.final_states()
        )
        assert all(h.finished and h.runs == 1 for h in replay.workflows.values())

    def test_kill_story_of_a_deferred_kill(self, trail: Path) -> None:
        """Who killed, why, the deferral, the refused stranger and the hooks are all there."""
        story = ts.replay_audit(trail)["deferred"]
        assert ("bob", "web") == (story.owner, story.team)
        assert story.killed_by is not None
        assert ("bob", "deploy", True) == (story.killed_by["id"], story.kill_reason, story.deferred)
        assert [("mallory", "Insufficient permissions")] == [
            (r["actor"]["id"], r["decision"]) for r in story.refused
        ]
        assert [("rollback", "ran")] == [(h["kind"], h["outcome"]) for h in story.hooks]
        types = [e.type for e in story.timeline]
        assert types.index("kill_deferred") < types.index("kill_effective")
        assert "workflow_finished" == types[-1]

    def test_system_phase_is_in_the_phases(self, trail: Path) -> None:
        """A workflow that never came back shows the whole ladder."""
        story = ts.replay_audit(trail)["stuck"]
        assert ("graceful", "forced", "system") == story.phases
        assert "killed" == story.state

    def test_tampered_trail_is_refused(self, trail: Path) -> None:
        """An edited line makes replay refuse, naming the line; allow_tampered rebuilds anyway."""
        lines = trail.read_text().splitlines()
        rec = json.loads(lines[2])
        rec["event"]["reason"] = "nothing to see"
        lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        trail.write_text("\n".join(lines) + "\n")
        with pytest.raises(ts.AuditTampered, match="line 3") as info:
            ts.replay_audit(trail)
        assert "edited" == info.value.report.kind
        replay = ts.replay_audit(trail, allow_tampered=True)
        assert not replay.verified
        assert "killed" == replay["stuck"].state

    def test_torn_tail_is_a_crash_not_tampering(self, trail: Path) -> None:
        """A half-written last line (a crash mid-write) is skipped; the rest replays."""
        with trail.open("a") as fh:
            fh.write('{"event":{"type":"workflow_fin')
        replay = ts.replay_audit(trail)
        assert replay.verified
        assert replay.report.torn_tail
        assert "killed" == replay["stuck"].state

    def test_restarts_and_a_run_closed_by_recover(self, tmp_path: Path) -> None:
        """An id that ran twice counts two runs; recover's verdict closes a SIGKILLed run."""
        trail = tmp_path / "audit.jsonl"
        with ts.Terminator(sink=ts.JsonlSink(trail)) as term:
            for _ in range(2):
                with term.workflow("nightly"):
                    pass
        store = SQLiteStore(tmp_path / "store.sqlite3")
        crash = textwrap.dedent(
            f"""
            import os, signal, termsafe as ts
            from termsafe._store import SQLiteStore
            term = ts.Terminator(sink=ts.JsonlSink({str(trail)!r}))
            with term.workflow("crashed", owner="dave"):
                SQLiteStore({str(store.path)!r}).run_register(
                    "r1", "crashed", owner="dave", team=None, state="running"
                )
                assert term.flush(10)
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
        try:
            died = subprocess.run([sys.executable, "-c", crash], check=False, timeout=60)
            assert -signal.SIGKILL == died.returncode
            assert ts.replay_audit(trail)["crashed"].finished is False
            sink = ts.JsonlSink(trail)
            ts.recover(store, sink=sink)
            sink.close()
        finally:
            store.close()
        replay = ts.replay_audit(trail)
        assert (2, "completed") == (replay["nightly"].runs, replay["nightly"].state)
        crashed = replay["crashed"]
        assert (True, "killed", "dave") == (crashed.finished, crashed.state, crashed.owner)

    def test_missing_trail(self, tmp_path: Path) -> None:
        """No trail at the path is a FileNotFoundError naming it."""
        with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
            ts.replay_audit(tmp_path / "nope.jsonl")
