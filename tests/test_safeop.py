"""OperationScope: the hooks every safe operation registers, and when nobody would run them."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest
from _kills import in_taken_over_workflow
from conftest import WAIT, Audit, Jobs, TermFactory

import termsafe as ts
from termsafe._hooks import HookStack, HookStackClosed
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


class TestPublicHooksAfterTakeover:
    """``on_rollback``/``on_cleanup`` in a workflow whose hooks the terminator took over."""

    def test_on_rollback_runs_the_hook_here_once(self, make_term: TermFactory, jobs: Jobs) -> None:
        """on_rollback() after the sweep runs the hook at once, audits it, then raises."""
        sink = ts.MemorySink()
        term = make_term(SHORT, sink=sink)
        ran: list[tuple[str, str]] = []

        def early() -> None:
            ran.append(("early", threading.current_thread().name))

        def undo() -> None:
            ran.append(("undo", threading.current_thread().name))

        # A hook registered before the takeover: the stack exists when it comes.
        wf, error = in_taken_over_workflow(
            term, jobs, lambda: ts.on_rollback(undo), before=lambda: ts.on_cleanup(early)
        )
        assert isinstance(error, ts.ForcedTermination), error
        assert ["early", "undo"] == [name for name, _thread in ran]
        assert "test-job" == ran[1][1]  # the late one, at once in the workflow's thread
        assert 0 == wf.pending_hooks
        by_hook = {
            e.details["hook"].rsplit(".", 1)[-1]: e.details["ran_by"]
            for e in Audit(term, sink).of("hook_ran", "w")
        }
        assert {"early": "terminator", "undo": "workflow"} == by_hook

    def test_stack_held_from_before_the_takeover_refuses_a_push_after_the_sweep(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A push reaching the stack after the sweep (checks done before) is refused, not lost."""
        term = make_term(SHORT)
        stacks: list[HookStack] = []

        def fetch() -> None:
            wf = ts.current_workflow()
            assert wf is not None
            stacks.append(wf.hooks)

        refused: list[HookStackClosed] = []

        def late_push() -> None:
            # Fetched while the workflow ran, pushed to once the sweep is over:
            # what a register call that looked before the takeover does next.
            try:
                stacks[0].push(lambda: None, "rollback")
            except HookStackClosed as exc:
                refused.append(exc)

        wf, error = in_taken_over_workflow(term, jobs, late_push, before=fetch)
        assert error is None
        assert 1 == len(refused)
        assert 0 == wf.pending_hooks

    def test_system_exit_from_a_refused_hook_propagates_audited(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A refused hook that raises SystemExit is audited as failed and the exit goes on."""
        sink = ts.MemorySink()
        term = make_term(SHORT, sink=sink)

        def undo() -> None:
            raise SystemExit(3)

        with pytest.raises(SystemExit):
            in_taken_over_workflow(term, jobs, lambda: ts.on_rollback(undo))
        [failed] = Audit(term, sink).of("hook_failed", "w")
        assert "SystemExit: 3" == failed.details["error"]

    def test_stack_made_after_the_takeover_is_closed(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A workflow with no hooks when taken over gets a closed stack, not a fresh open one."""
        term = make_term(SHORT)
        cleaned: list[bool] = []

        wf, error = in_taken_over_workflow(
            term, jobs, lambda: ts.on_cleanup(lambda: cleaned.append(True))
        )
        assert isinstance(error, ts.ForcedTermination), error
        assert wf.hooks.closed
        assert [True] == cleaned
        assert 0 == wf.pending_hooks

    def test_async_hook_runs_once_in_a_terminator_worker(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A coroutine function registered after the takeover is awaited once, by a worker."""
        sink = ts.MemorySink()
        term = make_term(SHORT, sink=sink)
        ran_in: list[str] = []
        done = threading.Event()

        async def undo() -> None:
            await anyio.sleep(0)
            ran_in.append(threading.current_thread().name)
            done.set()

        _wf, error = in_taken_over_workflow(term, jobs, lambda: ts.on_rollback(undo))
        assert isinstance(error, ts.ForcedTermination), error
        assert done.wait(WAIT)
        term.close()  # waits for the terminator's workers, then delivers their events
        assert 1 == len(ran_in)
        assert ran_in[0].startswith("termsafe-hook")
        [ran] = [e for e in sink.events if e.type == "hook_ran" and e.workflow_id == "w"]
        assert "terminator" == ran.details["ran_by"]


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
