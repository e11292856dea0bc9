"""explore_kills finds a torn file, then shows the fixed writer passing.

``save_report_unsafe`` writes a report in two steps (the header, a progress
checkpoint, then the body) straight into the target file: a kill between the
steps leaves a torn file. ``save_report_safe`` writes to a temp file in the
same folder, inside an ``fs`` critical section, and ``os.replace``-s it over
the target: the file holds the old report or the new one, whatever kill
arrives when, and the temp file never outlives the workflow.

``explore_kills(run, check)`` runs the workflow once to count its cancellation
points, then once per point (gracefully, forced, and with the section's grace
running out there) with a kill landing exactly at that point, and calls
``check`` after each run. Run it: ``python examples/explore_kills_example.py``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import termsafe as ts
from termsafe.testing import ExplorationReport, explore_kills

OLD = "report v1\nall good\n"
HEADER = "report v2\n"
BODY = "all better\n"
TEMP_PREFIX = ".report-"


def save_report_unsafe(path: Path) -> None:
    """Write the header, report progress, then the body: two steps, no atomicity."""
    with path.open("w") as f:
        f.write(HEADER)
        f.flush()
        ts.checkpoint(state={"step": "header written"})
        f.write(BODY)


def save_report_safe(path: Path) -> None:
    """Write a temp file beside the target and swap it in, inside an ``fs`` section."""
    with ts.critical_section("fs"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(HEADER)
                f.flush()
                # Inside the section a kill waits for the section to end, unless
                # its grace runs out: then this raises and the except below
                # removes the temp file, leaving the old report in place.
                ts.checkpoint(state={"step": "header written"})
                f.write(BODY)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def explore(save: Callable[[Path], None], folder: Path) -> ExplorationReport:
    """Explore every kill point of one writer against the 'never torn' invariant."""
    target = folder / "report.txt"

    def run(term: ts.Terminator) -> None:
        target.write_text(OLD)  # fresh state for every run
        for leftover in folder.glob(TEMP_PREFIX + "*"):
            leftover.unlink()
        with term.workflow("nightly-report", owner="alice"):
            save(target)

    def check() -> None:
        content = target.read_text()
        assert content in (OLD, HEADER + BODY), f"torn report: {content!r}"
        leftovers = sorted(p.name for p in folder.glob(TEMP_PREFIX + "*"))
        assert not leftovers, f"temp files left behind: {leftovers}"

    return explore_kills(run, check)


def main() -> None:
    """Show the unsafe writer caught and the safe one passing."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        unsafe = explore(save_report_unsafe, folder)
        assert not unsafe.ok, "explore_kills should have found the torn file"
        assert any("torn report" in f.message for f in unsafe.failures)
        print(unsafe.summary())
        print(unsafe.failures[0])
        print()

        safe = explore(save_report_safe, folder)
        safe.raise_on_failure()
        print(safe.summary())


if __name__ == "__main__":
    main()
