"""OperationScope: the hooks every safe operation registers, and when nobody would run them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from conftest import WAIT, Audit, Jobs, TermFactory

import termsafe as ts
from termsafe._safeop import OperationScope

ADMIN = ts.Principal("root", roles=["admin"])
#: A ladder that reaches the system phase at once.
SHORT = ts.Phases(0.05, 0.05)


def _in_taken_over_workflow(
    term: ts.Terminator, jobs: Jobs, fn: Callable[[], object]
) -> tuple[ts.Workflow, BaseException | None]:
    """Run ``fn`` in a thread workflow once the system phase has taken it over and swept its hooks.

    Returns:
        The workflow and what ``fn`` raised (``None`` if it returned).
    """
    entered = threading.Event()
    go = threading.Event()
    seen: list[ts.Workflow] = []
    raised: list[BaseException] = []

    def body() -> None:
        with term.workflow("w") as wf:
            seen.append(wf)
            entered.set()
            go.wait(WAIT)  # stuck: never reaches a cancellation point
            try:
                fn()
            except BaseException as exc:
                raised.append(exc)
                raise

    job = jobs.start(body)
    try:
        assert entered.wait(WAIT)
        assert ts.WorkflowState.KILLED == term.kill("w", by=ADMIN).wait(WAIT)
    finally:
        go.set()
    job.result()
    return seen[0], (raised[0] if raised else None)


class TestRegisterAfterTakeover:
    def test_hook_runs_here_once_and_the_operation_is_refused(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A hook registered after the terminator swept the stack runs here, once, audited."""
        sink = ts.MemorySink()
        term = make_term(SHORT, sink=sink)
        undone: list[str] = []

        def undo() -> None:
            undone.append(threading.current_thread().name)

        def register() -> None:
            OperationScope("fs", "probe", store=False).on_rollback(undo)

        wf, error = _in_taken_over_workflow(term, jobs, register)
        assert isinstance(error, ts.ForcedTermination), error
        assert "w" == error.workflow_id
        assert ["test-job"] == undone
        assert 0 == wf.pending_hooks
        [ran] = Audit(term, sink).of("hook_ran", "w")
        assert ("rollback", "workflow") == (ran.details["kind"], ran.details["ran_by"])

    def test_failing_hook_is_recorded_and_the_operation_still_refused(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A hook that fails when run at registration is audited as failed; the kill still lands."""
        sink = ts.MemorySink()
        term = make_term(SHORT, sink=sink)

        def undo() -> None:
            raise OSError("disk gone")

        def register() -> None:
            OperationScope("fs", "probe", store=False).on_cleanup(undo)

        wf, error = _in_taken_over_workflow(term, jobs, register)
        assert isinstance(error, ts.ForcedTermination), error
        assert 0 == wf.pending_hooks
        [failed] = Audit(term, sink).of("hook_failed", "w")
        assert "OSError: disk gone" == failed.details["error"]

    def test_atomic_file_never_starts(
        self, make_term: TermFactory, jobs: Jobs, tmp_path: Path
    ) -> None:
        """atomic_file in a workflow the terminator took over raises on entry and leaves no temp."""
        term = make_term(SHORT)
        target = tmp_path / "report.txt"
        target.write_text("old")
        body_ran: list[bool] = []

        def write() -> None:
            with ts.atomic_file(target, store=False) as f:
                body_ran.append(True)
                f.write("new")

        wf, error = _in_taken_over_workflow(term, jobs, write)
        assert isinstance(error, ts.ForcedTermination), error
        assert [] == body_ran
        assert ["report.txt"] == sorted(p.name for p in tmp_path.iterdir())
        assert "old" == target.read_text()
        assert 0 == wf.pending_hooks
