"""The termination timeline: SVG drawn from the audit trail of real killed workflows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import termsafe as ts

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
WAIT = 30.0
ALICE = ts.Principal("alice")


def _classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def _of_class(root: ET.Element, cls: str, tag: str | None = None) -> list[ET.Element]:
    return [
        e for e in root.iter() if cls in _classes(e) and (tag is None or e.tag == f"{SVG}{tag}")
    ]


def _texts(root: ET.Element, cls: str) -> list[str]:
    return [e.text or "" for e in _of_class(root, cls, "text")]


def _all_text(root: ET.Element) -> str:
    return "\n".join(e.text or "" for e in root.iter(f"{SVG}text"))


def _x(element: ET.Element, attribute: str = "x") -> float:
    return float(element.get(attribute, "nan"))


class Killed:
    """A thread workflow killed inside a ``db`` section, its kill escalated, written to a trail.

    The workflow registers a rollback hook and two cleanup hooks, opens the
    section and waits there; the test kills it (deferred), escalates to the
    forced phase, then lets the section end: the kill lands, the hooks run
    LIFO, the workflow ends ``terminated``. Every step waits on an event.
    """

    def __init__(self, folder: Path, workflow_id: str = "nightly-export") -> None:
        self.trail = folder / "audit.jsonl"
        self.workflow_id = workflow_id
        self.ran: list[str] = []
        self.term = ts.Terminator(
            phases=ts.Phases(graceful=30, forced=30), sink=ts.JsonlSink(self.trail)
        )
        self._in_section = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._work)

    def _work(self) -> None:
        ran = self.ran

        def roll_back_batch() -> None:
            ran.append("roll_back_batch")

        def remove_temp_files() -> None:
            ran.append("remove_temp_files")

        def close_connection() -> None:
            ran.append("close_connection")

        with self.term.workflow(self.workflow_id, owner="alice", team="data"):
            ts.on_cleanup(close_connection)
            ts.on_cleanup(remove_temp_files)
            ts.on_rollback(roll_back_batch)
            ts.checkpoint({"batch": 41})
            with ts.critical_section("db"):
                self._in_section.set()
                self._release.wait(WAIT)
            ts.checkpoint()

    def run(self, reason: str = "deploy 2026.11") -> ts.WorkflowState:
        self._thread.start()
        try:
            assert self._in_section.wait(WAIT)
            handle = self.term.kill(self.workflow_id, by=ALICE, reason=reason)
            assert handle.deferred
            assert 1 == self.term.escalate()
            self._release.set()
            return handle.wait(WAIT)
        finally:
            self._release.set()
            self._thread.join(WAIT)
            self.term.close()

    def events(self) -> list[ts.AuditEvent]:
        return list(ts.replay_audit(self.trail)[self.workflow_id].timeline)


@pytest.fixture
def killed(tmp_path: Path) -> Killed:
    scenario = Killed(tmp_path)
    assert ts.WorkflowState.TERMINATED == scenario.run()
    assert ["roll_back_batch", "remove_temp_files", "close_connection"] == scenario.ran
    return scenario


@pytest.fixture
def drawn(killed: Killed) -> ET.Element:
    return ET.fromstring(ts.render_timeline_svg(killed.events()))


def _stuck_killed() -> list[ts.AuditEvent]:
    """A thread that never comes back: the system phase marks it killed and runs its hooks."""
    sink = ts.MemorySink()
    term = ts.Terminator(phases=ts.Phases(graceful=0.05, forced=0.05), sink=sink)
    started, release = threading.Event(), threading.Event()

    def stuck() -> None:
        with term.workflow("stuck-job", owner="alice"):
            ts.on_rollback(lambda: None)
            started.set()
            release.wait(WAIT)

    thread = threading.Thread(target=stuck)
    thread.start()
    try:
        assert started.wait(WAIT)
        assert ts.WorkflowState.KILLED == term.kill("stuck-job", by=ALICE, reason="hung").wait(WAIT)
    finally:
        release.set()
        thread.join(WAIT)
        term.close()
    return sink.events


class TestRenderTimeline:
    def test_svg_is_well_formed_and_standalone(self, killed: Killed) -> None:
        """The SVG parses as XML, has an svg root with a title, and links to nothing outside."""
        svg = ts.render_timeline_svg(killed.events())
        root = ET.fromstring(svg)
        assert f"{SVG}svg" == root.tag
        title = root.find(f"{SVG}title")
        assert title is not None
        assert "'nightly-export'" in (title.text or "")
        assert "http" not in svg.replace("http://www.w3.org/2000/svg", "")

    def test_title_names_workflow_killer_reason_and_final_state(self, drawn: ET.Element) -> None:
        """The heading says which workflow, who asked for the kill, why, and how it ended."""
        text = _all_text(drawn)
        assert "Termination timeline of 'nightly-export'" in text
        (subtitle,) = _texts(drawn, "subtitle")
        assert "kill requested by alice, reason: \u201cdeploy 2026.11\u201d" in subtitle
        assert subtitle.endswith("final state: terminated")

    def test_phases_are_bands_in_order_with_the_escalation(self, drawn: ET.Element) -> None:
        """The graceful band comes first, the escalated forced band after it; no system band."""
        graceful = _of_class(drawn, "graceful", "rect")
        forced = _of_class(drawn, "forced", "rect")
        assert (1, 1) == (len(graceful), len(forced))
        assert [] == _of_class(drawn, "system", "rect")
        assert _x(graceful[0]) <= _x(forced[0])  # the escalation may come within the same ms
        assert ["graceful", "forced (escalated)"] == _texts(drawn, "phase-label")

    def test_deadlines_from_the_kill_request_are_shown(self, drawn: ET.Element) -> None:
        """The system phase's deadline (db grace 10 s + forced 30 s) is named, as not reached."""
        deadlines = " ".join(_texts(drawn, "deadline"))
        assert "system due +40 s (not reached)" in deadlines

    def test_deferral_bar_runs_from_the_kill_to_the_section_end(self, drawn: ET.Element) -> None:
        """The hatched deferral starts at the kill request and ends where the kill took effect."""
        (kill_line,) = _of_class(drawn, "kill-requested", "line")
        (deferral,) = _of_class(drawn, "deferral", "rect")
        (effective,) = _of_class(drawn, "effective", "line")
        assert _x(kill_line, "x1") == _x(deferral)
        assert _x(effective, "x1") == pytest.approx(_x(deferral) + _x(deferral, "width"), abs=0.02)
        (label,) = _texts(drawn, "deferral-label")
        assert label.startswith("kill deferred ")
        assert label.endswith("until the section ended, grace 10 s")
        assert "db section" in _all_text(drawn)

    def test_every_hook_is_labelled_in_lifo_order(self, drawn: ET.Element) -> None:
        """Hook labels are numbered in the order they ran: the last registered first."""
        labels = _texts(drawn, "hook")
        assert 3 == len(labels)
        expected = [
            ("#1 rollback ", "roll_back_batch"),
            ("#2 cleanup ", "remove_temp_files"),
            ("#3 cleanup ", "close_connection"),
        ]
        for (prefix, name), label in zip(expected, labels, strict=True):
            assert label.startswith(prefix), label
            assert name in label, label
        marks = [_x(m, "cx") for m in _of_class(drawn, "hook-mark", "circle")]
        assert sorted(marks) == marks

    def test_final_state_is_drawn(self, drawn: ET.Element) -> None:
        """The final state is a labelled mark at the end of the workflow lane."""
        assert ["terminated"] == _texts(drawn, "final-state")
        assert 1 == len(_of_class(drawn, "final-state-mark", "path"))

    def test_other_events_of_the_kill_are_listed(self, drawn: ET.Element) -> None:
        """The forced phase's emergency save of the last checkpoint appears as an event."""
        assert ["emergency save: {'batch': 41}"] == _texts(drawn, "event")

    def test_system_phase_and_hooks_run_by_the_terminator(self) -> None:
        """A thread that never returned: system band, final state killed, hooks run for it."""
        root = ET.fromstring(ts.render_timeline_svg(_stuck_killed()))
        assert ["graceful", "forced", "system"] == [
            t.split()[0] for t in _texts(root, "phase-label")
        ]
        assert ["killed"] == _texts(root, "final-state")
        (hook,) = _texts(root, "hook")
        assert hook.startswith("#1 rollback ")
        assert "run by the terminator" in hook
        assert any(t.startswith("orphan detected") for t in _texts(root, "event"))

    def test_default_is_the_last_workflow_killed(self, tmp_path: Path) -> None:
        """Without an id, the latest kill request is drawn; with one, that workflow."""
        sink = ts.MemorySink()
        term = ts.Terminator(sink=sink)
        with term.workflow("never-killed"):
            pass
        for wid in ("first", "second"):
            with term.workflow(wid):
                term.kill(wid, by=ts.Principal("root", roles=["admin"]), reason=f"stop {wid}")
                with pytest.raises(ts.Terminated):
                    ts.checkpoint()
        term.close()
        default = ET.fromstring(ts.render_timeline_svg(sink.events))
        assert "Termination timeline of 'second'" in _all_text(default)
        chosen = ET.fromstring(ts.render_timeline_svg(sink.events, "first"))
        assert "reason: \u201cstop first\u201d" in _texts(chosen, "subtitle")[0]
        plain = ET.fromstring(ts.render_timeline_svg(sink.events, "never-killed"))
        assert _texts(plain, "subtitle")[0].startswith("not killed; final state: completed")

    def test_a_child_killed_with_its_parent_yields_to_the_parent(self) -> None:
        """The cascade kills the child after the parent; the default is still the parent."""
        sink = ts.MemorySink()
        term = ts.Terminator(sink=sink)
        with term.workflow("parent"), term.workflow("child"):
            term.kill("parent", by=ts.Principal("root", roles=["admin"]), reason="stop")
            with pytest.raises(ts.Terminated):
                ts.checkpoint()
        term.close()
        assert "child" in {e.workflow_id for e in sink.events if e.type == "kill_requested"}
        root = ET.fromstring(ts.render_timeline_svg(sink.events))
        assert "Termination timeline of 'parent'" in _all_text(root)

    def test_text_is_escaped(self) -> None:
        """Ids and reasons full of markup stay text: the SVG parses and shows them verbatim."""
        sink = ts.MemorySink()
        term = ts.Terminator(sink=sink)
        wid = "a<b>&\"c'"
        with term.workflow(wid, owner="x&y"):
            term.kill(wid, by=ts.Principal("x&y"), reason="</svg><script>")
            with pytest.raises(ts.Terminated):
                ts.checkpoint()
        term.close()
        root = ET.fromstring(ts.render_timeline_svg(sink.events))
        assert f"Termination timeline of {wid!r}" in _all_text(root)
        assert "reason: \u201c</svg><script>\u201d" in _texts(root, "subtitle")[0]

    def test_errors_name_the_bad_value(self, killed: Killed) -> None:
        """An unknown id, no killed workflow, or a wrong type is refused, naming it."""
        events = killed.events()
        with pytest.raises(ts.WorkflowNotFound, match="'nope'"):
            ts.render_timeline_svg(events, "nope")
        started = [e for e in events if e.type == "workflow_started"]
        with pytest.raises(ts.ConfigurationError, match="nightly-export"):
            ts.render_timeline_svg(started)
        with pytest.raises(ts.InvalidArgumentType, match="42"):
            ts.render_timeline_svg(events, 42)  # type: ignore[arg-type]
        with pytest.raises(ts.InvalidArgumentType, match="'not an event'"):
            ts.render_timeline_svg([*events, "not an event"])  # type: ignore[list-item]
        bad = ts.AuditEvent(seq=1, timestamp="yesterday", type="kill_requested", workflow_id="w")
        with pytest.raises(ts.ConfigurationError, match="'yesterday'"):
            ts.render_timeline_svg([bad])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "termsafe", "timeline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def trail(killed: Killed) -> Path:
    return killed.trail


class TestTimelineCommand:
    def test_writes_the_svg_of_the_last_killed_workflow(self, trail: Path, tmp_path: Path) -> None:
        """``termsafe timeline TRAIL -o OUT`` writes a well-formed SVG of the killed workflow."""
        out = tmp_path / "timeline.svg"
        result = _cli(str(trail), "-o", str(out), cwd=tmp_path)
        assert 0 == result.returncode, result.stderr
        assert f"timeline of 'nightly-export' written to {str(out)!r}\n" == result.stdout
        root = ET.parse(out).getroot()
        assert ["terminated"] == _texts(root, "final-state")
        assert 3 == len(_texts(root, "hook"))

    def test_prints_to_stdout_and_takes_a_workflow(self, trail: Path, tmp_path: Path) -> None:
        """Without -o the SVG goes to standard output; --workflow picks the workflow."""
        result = _cli(str(trail), "--workflow", "nightly-export", cwd=tmp_path)
        assert 0 == result.returncode, result.stderr
        root = ET.fromstring(result.stdout)
        assert "Termination timeline of 'nightly-export'" in _all_text(root)

    def test_unknown_workflow_is_exit_4_naming_it(self, trail: Path, tmp_path: Path) -> None:
        """A workflow id not in the trail: exit 4, the message names it and what the trail has."""
        result = _cli(str(trail), "--workflow", "nope", cwd=tmp_path)
        assert 4 == result.returncode
        assert f"termsafe: no workflow 'nope' in {str(trail)!r} (it has: nightly-export)\n" == (
            result.stderr
        )
        assert "" == result.stdout

    def test_bad_path_is_exit_2_naming_it(self, tmp_path: Path) -> None:
        """A path with no trail: exit 2 and a message naming the path."""
        result = _cli("missing.jsonl", cwd=tmp_path)
        assert 2 == result.returncode
        assert "termsafe: error: no audit trail at 'missing.jsonl'\n" == result.stderr

    def test_tampered_trail_is_exit_1(self, trail: Path, tmp_path: Path) -> None:
        """A trail whose chain does not verify is refused (exit 1), naming the bad line."""
        lines = trail.read_text(encoding="utf-8").splitlines(keepends=True)
        record = json.loads(lines[1])
        record["event"]["reason"] = "nothing to see"
        lines[1] = json.dumps(record) + "\n"
        trail.write_text("".join(lines), encoding="utf-8")
        result = _cli(str(trail), cwd=tmp_path)
        assert 1 == result.returncode
        assert "does not verify" in result.stderr
        assert "line 2" in result.stderr

    def test_keyed_trail_needs_its_key(self, tmp_path: Path) -> None:
        """An HMAC-keyed trail is drawn with --key-file, and refused (exit 1) without it."""
        path, key_file = tmp_path / "keyed.jsonl", tmp_path / "key"
        key_file.write_bytes(b"s3cret-key")
        term = ts.Terminator(sink=ts.JsonlSink(path, key=b"s3cret-key"))
        with term.workflow("keyed-job"):
            term.kill("keyed-job", by=ts.Principal("root", roles=["admin"]), reason="stop")
            with pytest.raises(ts.Terminated):
                ts.checkpoint()
        term.close()
        assert 1 == _cli(str(path), cwd=tmp_path).returncode
        result = _cli(str(path), "--key-file", str(key_file), cwd=tmp_path)
        assert 0 == result.returncode, result.stderr
        assert "Termination timeline of 'keyed-job'" in _all_text(ET.fromstring(result.stdout))

    def test_no_killed_workflow_asks_for_one(self, tmp_path: Path) -> None:
        """A trail where nothing was killed: exit 4, asking for --workflow and listing the ids."""
        path = tmp_path / "quiet.jsonl"
        term = ts.Terminator(sink=ts.JsonlSink(path))
        with term.workflow("quiet-job"):
            pass
        term.close()
        result = _cli(str(path), cwd=tmp_path)
        assert 4 == result.returncode
        assert "choose one with --workflow (it has: quiet-job)" in result.stderr


class TestDemoPicture:
    def test_example_draws_the_demo_picture(self, tmp_path: Path) -> None:
        """examples/timeline_example.py runs a killed workflow and draws a well-formed SVG."""
        out = tmp_path / "demo.svg"
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "timeline_example.py"), str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert 0 == result.returncode, result.stderr
        root = ET.parse(out).getroot()
        assert ["terminated"] == _texts(root, "final-state")
        assert 1 == len(_of_class(root, "deferral", "rect"))

    def test_docs_embed_the_committed_picture(self) -> None:
        """docs/timeline.md embeds docs/assets/timeline-demo.svg, a well-formed timeline."""
        assert "](assets/timeline-demo.svg)" in (ROOT / "docs" / "timeline.md").read_text()
        root = ET.parse(ROOT / "docs" / "assets" / "timeline-demo.svg").getroot()
        assert "Termination timeline of 'nightly-export'" in _all_text(root)
        assert ["terminated"] == _texts(root, "final-state")
