"""Kill a workflow inside a critical section, then draw its termination timeline as an SVG.

A thread workflow registers three hooks, opens a ``db`` critical section and
writes a batch for about 350 ms. The kill arrives just after the section
opened: it is deferred. The graceful phase is short (200 ms), so the forced
phase begins while the section is still writing; the section is never cut
before its grace (10 s), so the batch finishes, the kill lands as the section
ends, and the hooks run LIFO. The audit trail is a hash-chained ``JsonlSink``
file in a temporary folder; ``replay_audit`` verifies it and
``render_timeline_svg`` draws the picture.

Run it: ``python examples/timeline_example.py [OUT.svg]`` (default: an SVG in
the temporary folder, removed afterwards). ``docs/assets/timeline-demo.svg``
is made this way. The same picture from the command line:
``termsafe timeline AUDIT.jsonl -o OUT.svg``.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import termsafe as ts

WORKFLOW = "nightly-export"


def write_batch(seconds: float) -> None:
    """Stand-in for real work: rows written for ``seconds``, a cancellation point per row."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ts.checkpoint()
        time.sleep(0.005)


def export(term: ts.Terminator, in_section: threading.Event, ran: list[str]) -> None:
    """The workflow: three hooks, a checkpoint, then a batch inside a ``db`` section."""

    def close_connection() -> None:
        time.sleep(0.02)  # a real close takes a moment
        ran.append("close_connection")

    def remove_temp_files() -> None:
        time.sleep(0.01)
        ran.append("remove_temp_files")

    def roll_back_batch() -> None:
        time.sleep(0.03)
        ran.append("roll_back_batch")

    with term.workflow(WORKFLOW, owner="alice", team="data"):
        ts.on_cleanup(close_connection)
        ts.on_cleanup(remove_temp_files)
        ts.on_rollback(roll_back_batch)
        write_batch(0.05)
        ts.checkpoint({"batch": 41})
        with ts.critical_section("db"):
            in_section.set()
            write_batch(0.35)
        write_batch(5.0)  # never gets far: the kill lands as the section ends


def main() -> None:
    """Run the killed workflow, verify the trail, draw the timeline."""
    out = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        trail = Path(tmp) / "audit.jsonl"
        term = ts.Terminator(phases=ts.Phases(graceful=0.2, forced=5.0), sink=ts.JsonlSink(trail))
        in_section = threading.Event()
        ran: list[str] = []
        worker = threading.Thread(target=export, args=(term, in_section, ran))
        worker.start()
        try:
            assert in_section.wait(30), "the workflow never reached its critical section"
            handle = term.kill(WORKFLOW, by=ts.Principal("alice"), reason="deploy 2026.11")
            print(f"kill requested; deferred by the db section: {handle.deferred}")
            final = handle.wait(30)
        finally:
            worker.join(30)
            term.close()
        print(f"final state: {final}; hooks ran (LIFO): {', '.join(ran)}")
        assert final == ts.WorkflowState.TERMINATED
        assert ran == ["roll_back_batch", "remove_temp_files", "close_connection"]

        replay = ts.replay_audit(trail)  # verifies the hash chain first
        story = replay[WORKFLOW]
        print(f"audit trail verified: {replay.report.message}")
        print(f"phases: {' -> '.join(story.phases)}")
        svg = ts.render_timeline_svg(story.timeline)
        target = out or Path(tmp) / "timeline.svg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(svg, encoding="utf-8")
        print(f"timeline: {target} ({len(svg)} bytes)")


if __name__ == "__main__":
    main()
