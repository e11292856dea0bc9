"""OperationScope: the hooks every safe operation registers, and when nobody would run them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from _kills import in_taken_over_workflow
from conftest import Audit, Jobs, TermFactory

import termsafe as ts
from termsafe._safeop import OperationScope

#: A ladder that reaches the system phase at once.
SHORT = ts.Phases(0.05, 0.05)


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

        wf, error = in_taken_over_workflow(term, jobs, register)
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

        wf, error = in_taken_over_workflow(term, jobs, register)
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

        wf, error = in_taken_over_workflow(term, jobs, write)
        assert isinstance(error, ts.ForcedTermination), error
        assert [] == body_ran
        assert ["report.txt"] == sorted(p.name for p in tmp_path.iterdir())
        assert "old" == target.read_text()
        assert 0 == wf.pending_hooks


class TestScopeGivenItsWorkflow:
    def test_workflow_given_is_not_looked_up(self, term: ts.Terminator, tmp_path: Path) -> None:
        """A scope told its workflow uses it (None: outside one) and resolves its store as usual."""
        store = ts.SQLiteStore(tmp_path / "store.sqlite3")
        try:
            with term.workflow("given") as wf:
                looked_up = OperationScope("fs", "probe", store=False)
                told = OperationScope("fs", "probe", store=False, workflow=None)
                own = OperationScope("fs", "probe", store, workflow=None)
                undone: list[str] = []
                told.on_rollback(lambda: undone.append("told"))
                assert 0 == wf.pending_hooks
                told.failed()
            assert (wf, None) == (looked_up.workflow, looked_up.store)
            assert (None, None) == (told.workflow, told.store)
            assert (None, store) == (own.workflow, own.store)
            assert ["told"] == undone
        finally:
            store.close()

    @pytest.mark.parametrize("form", ["emit", "emit_built"])
    def test_events_name_the_operation(self, term: ts.Terminator, audit: Audit, form: str) -> None:
        """emit adds the operation's name to the details; emit_built takes details that have it."""
        with term.workflow("events"):
            scope = OperationScope("api", "probe op", store=False)
            if form == "emit":
                scope.emit("probe_happened", {"n": 1})
            else:
                scope.emit_built("probe_happened", {"operation": scope.name, "n": 1})
        [event] = audit.of("probe_happened", "events")
        assert {"operation": "probe op", "n": 1} == dict(event.details)
