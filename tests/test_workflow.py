"""Tests for termsafe._workflow: workflows in threads, asyncio and trio, and their calls."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from conftest import WAIT, Audit, Jobs, TermFactory

import termsafe
from termsafe import (
    ConfigurationError,
    DuplicateWorkflow,
    ForcedTermination,
    InvalidArgumentType,
    MemorySink,
    Principal,
    Terminated,
    Terminator,
    Workflow,
    WorkflowState,
    critical_section,
)

S = WorkflowState
ADMIN = Principal("root", roles=("admin",))
BACKENDS = ["asyncio", "trio"]


class TestThreadWorkflow:
    def test_completes(self, term: Terminator, audit: Audit) -> None:
        """A workflow that returns is completed, in scope inside and out of scope after."""
        assert termsafe.current_workflow() is None
        with term.workflow("ok", owner="alice", team="data") as wf:
            assert wf is termsafe.current_workflow()
            assert S.RUNNING == wf.state
            assert [wf] == term.workflows()
        assert termsafe.current_workflow() is None
        assert S.COMPLETED == wf.state
        assert [] == term.workflows()
        assert ["workflow_started", "workflow_finished"] == audit.types("ok")
        started = audit.of("workflow_started")[0]
        assert "thread" == started.details["backend"]
        assert "alice" == wf.owner
        assert "data" == wf.team

    def test_error_fails_and_propagates(self, term: Terminator) -> None:
        """An exception fails the workflow and propagates unchanged."""
        error = LookupError("missing")
        with pytest.raises(LookupError) as info, term.workflow("bad") as wf:
            raise error
        assert error is info.value
        assert S.FAILED == wf.state

    def test_killed_at_checkpoint(self, term: Terminator, jobs: Jobs) -> None:
        """A thread workflow looping on checkpoint() is terminated by a kill, which it absorbs."""
        ready = threading.Event()

        def body() -> WorkflowState:
            with term.workflow("loop") as wf:
                ready.set()
                while True:
                    termsafe.checkpoint()
                    time.sleep(0.001)  # stands for a unit of real work
            return wf.state

        job = jobs.start(body)
        assert ready.wait(WAIT)
        handle = term.kill("loop", by=ADMIN, reason="test")
        assert S.TERMINATED == handle.wait(WAIT)
        assert S.TERMINATED == job.result()

    def test_sleep_wakes_on_kill(self, term: Terminator, jobs: Jobs) -> None:
        """termsafe.sleep() returns early with Terminated when a kill arrives."""
        ready = threading.Event()
        caught: list[BaseException] = []

        def body() -> None:
            with term.workflow("sleepy"):
                ready.set()
                try:
                    termsafe.sleep(WAIT * 6)
                except BaseException as exc:
                    caught.append(exc)
                    raise

        job = jobs.start(body)
        assert ready.wait(WAIT)
        started = time.monotonic()
        term.kill("sleepy", by=ADMIN, reason="wake up")
        job.result(WAIT)
        assert time.monotonic() - started < WAIT
        [exc] = caught
        assert Terminated is type(exc)
        assert ("sleepy", "wake up") == (exc.workflow_id, exc.reason)

    def test_except_exception_does_not_swallow_kill(self, term: Terminator) -> None:
        """``except Exception`` in workflow code does not catch the kill."""
        swallowed: list[object] = []
        with term.workflow("stubborn") as wf:
            term.kill("stubborn", by=ADMIN)
            try:
                termsafe.checkpoint()
            except Exception as exc:
                swallowed.append(exc)
            swallowed.append("still running")
        assert [] == swallowed
        assert S.TERMINATED == wf.state

    def test_duplicate_live_id(self, term: Terminator) -> None:
        """A second live workflow with the same id is refused and nothing is registered."""
        trace = []
        with term.workflow("dup") as first:
            with pytest.raises(DuplicateWorkflow, match="'dup'"), term.workflow("dup"):
                trace.append("second body")
            assert first is termsafe.current_workflow()
            assert [first] == term.workflows()
            assert first is term.get("dup")
        assert [] == trace
        assert S.COMPLETED == first.state
        with term.workflow("dup") as again:
            pass
        assert S.COMPLETED == again.state

    def test_same_id_on_two_terminators(self, make_term: TermFactory) -> None:
        """Ids are unique per terminator, not per process."""
        one, two = make_term(), make_term()
        with one.workflow("same"), two.workflow("same") as inner:
            assert inner is two.get("same")

    @pytest.mark.parametrize(
        ("kwargs", "shown"),
        [
            ({"workflow_id": 5}, "5"),
            ({"workflow_id": None}, "None"),
            ({"workflow_id": ""}, "''"),
            ({"workflow_id": "w", "owner": 7}, "7"),
            ({"workflow_id": "w", "team": ["a"]}, "['a']"),
            ({"workflow_id": "w", "depends_on": "other"}, "'other'"),
            ({"workflow_id": "w", "depends_on": [1]}, "1"),
            ({"workflow_id": "w", "depends_on": 3}, "3"),
            ({"workflow_id": "w", "terminator": "default"}, "'default'"),
            ({"workflow_id": "w", "cascade": "yes"}, "'yes'"),
        ],
    )
    def test_bad_arguments(self, term: Terminator, kwargs: dict[str, Any], shown: str) -> None:
        """A bad argument raises InvalidArgumentType naming the value, and registers nothing."""
        with pytest.raises(InvalidArgumentType, match=re.escape(f"(got {shown})")):
            termsafe.workflow(**kwargs)
        assert [] == term.workflows()

    @pytest.mark.parametrize(
        ("kwargs", "shown"),
        [
            ({"workflow_id": 5}, "5"),
            ({"workflow_id": "w", "owner": 7}, "7"),
            ({"workflow_id": "w", "depends_on": "other"}, "'other'"),
            ({"workflow_id": "w", "cascade": 1}, "1"),
        ],
    )
    def test_bad_arguments_through_the_terminator(
        self, term: Terminator, kwargs: dict[str, Any], shown: str
    ) -> None:
        """Terminator.workflow checks its arguments as termsafe.workflow does, naming the value."""
        with pytest.raises(InvalidArgumentType, match=re.escape(f"(got {shown})")):
            term.workflow(**kwargs)
        assert [] == term.workflows()

    def test_context_reused_while_in_use(self, term: Terminator) -> None:
        """Entering one workflow context object twice at once is refused."""
        ctx = term.workflow("once")
        with ctx, pytest.raises(InvalidArgumentType, match="already in use"), ctx:
            pass

    def test_resumed_checkpoint_is_kept_by_a_retention_prune(self, tmp_path: Path) -> None:
        """A workflow resuming from an old checkpoint makes it current: a prune by age keeps it."""
        path = tmp_path / "store.sqlite3"
        store = termsafe.SQLiteStore(path)
        store.save_checkpoint("nightly", {"step": 41})
        month = 30 * 86400
        with sqlite3.connect(path) as conn:  # saved 40 days ago
            conn.execute("UPDATE checkpoints SET saved_at = saved_at - ?", (40 * 86400,))
        term = Terminator(store=store)
        try:
            with term.workflow("nightly") as wf:
                assert {"step": 41} == wf.last_checkpoint
                assert 0 == store.checkpoint_prune(month)
                assert {"step": 41} == store.load_checkpoint("nightly")
        finally:
            term.close()
            store.close()

    def test_checkpoint_saves_state(self, term: Terminator) -> None:
        """checkpoint(state) records the state as the workflow's last checkpoint."""
        with term.workflow("cp") as wf:
            termsafe.checkpoint({"row": 10})
            termsafe.checkpoint()
        assert {"row": 10} == wf.last_checkpoint

    def test_calls_outside_workflow(self) -> None:
        """checkpoint() and sleep() outside a workflow do nothing but sleep."""
        termsafe.checkpoint({"ignored": True})
        termsafe.sleep(0)
        assert termsafe.current_workflow() is None

    @pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf")])
    def test_sleep_bad_value(self, seconds: float) -> None:
        """sleep() refuses a negative, NaN or infinite duration, naming it."""
        with pytest.raises(ConfigurationError, match=re.escape(f"(got {seconds!r})")):
            termsafe.sleep(seconds)

    def test_sleep_bad_type(self) -> None:
        """sleep() refuses a duration that is not a number."""
        with pytest.raises(InvalidArgumentType, match="got '1'"):
            termsafe.sleep("1")  # type: ignore[arg-type]


class TestChildWorkflows:
    def test_killed_with_parent(self, term: Terminator, audit: Audit, jobs: Jobs) -> None:
        """Killing a workflow kills the workflows started inside it."""
        ready = threading.Event()
        states: dict[str, WorkflowState] = {}

        after_child: list[str] = []

        def body() -> None:
            with term.workflow("parent") as parent:
                with term.workflow("child") as child:
                    assert [child] == parent.children()
                    assert parent is child.parent
                    ready.set()
                    termsafe.sleep(WAIT * 6)
                # Leaving the child is a cancellation point of the killed parent.
                after_child.append("parent ran on")
            states["child"] = child.state
            states["parent"] = parent.state

        job = jobs.start(body)
        assert ready.wait(WAIT)
        handle = term.kill("parent", by=ADMIN, reason="abort")
        assert S.TERMINATED == handle.wait(WAIT)
        job.result()
        assert {"child": S.TERMINATED, "parent": S.TERMINATED} == states
        assert [] == after_child
        [child_kill] = audit.of("kill_requested", "child")
        assert "parent workflow 'parent' killed: abort" == child_kill.reason

    def test_no_child_after_kill(self, term: Terminator) -> None:
        """Starting a child workflow inside a workflow being killed raises Terminated."""
        trace = []
        with term.workflow("p2") as parent:
            term.kill("p2", by=ADMIN)
            with pytest.raises(Terminated) as info, term.workflow("c2"):
                trace.append("child body")
            assert [parent] == term.workflows()
            raise info.value
        assert [] == trace
        assert S.TERMINATED == parent.state

    def test_deep_nesting_killed_from_the_root(self, term: Terminator, audit: Audit) -> None:
        """A chain of nested workflows deeper than the recursion limit is killed whole."""
        depth = sys.getrecursionlimit() + 100
        with contextlib.ExitStack() as stack:
            chain = [stack.enter_context(term.workflow(f"level-{i}")) for i in range(depth)]
            handle = term.kill("level-0", by=ADMIN, reason="abort")
            assert all(wf.kill is not None for wf in chain)
            deepest = chain[-1].kill
            assert deepest is not None
            assert deepest.reason.endswith("parent workflow 'level-0' killed: abort")
            assert deepest.reason.count("parent workflow") == depth - 1
            termsafe.checkpoint()  # raises Terminated: the stack unwinds every level
        assert S.TERMINATED == handle.wait(WAIT)
        assert {S.TERMINATED} == {wf.state for wf in chain}
        assert depth == len(audit.of("kill_requested"))

    def test_a_child_killed_before_is_not_cascaded_again(
        self, term: Terminator, audit: Audit
    ) -> None:
        """Killing the parent of a child already killed does not kill the grandchild twice."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(term.workflow("p"))
            stack.enter_context(term.workflow("c"))
            stack.enter_context(term.workflow("g"))
            term.kill("c", by=ADMIN, reason="first")
            term.kill("p", by=ADMIN, reason="second")
            termsafe.checkpoint()  # raises Terminated: the stack unwinds every level
        assert term.flush(WAIT)
        assert [{"force": False, "already": "graceful", "escalated": False}] == [
            dict(e.details) for e in audit.of("kill_requested", "c") if "already" in e.details
        ]
        [g_kill] = audit.of("kill_requested", "g")
        assert "parent workflow 'c' killed: first" == g_kill.reason
        assert {S.TERMINATED} == {term.get(w).state for w in ("p", "c", "g")}

    def test_a_child_that_finished_meanwhile_is_skipped(
        self, term: Terminator, audit: Audit, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A child that finished after the cascade listed it is skipped: no kill, no refusal."""
        with term.workflow("p4") as parent:
            with term.workflow("c4") as child:
                pass
            # The cascade's list of children taken just before the child ended.
            listed = Workflow.children
            monkeypatch.setattr(
                Workflow, "children", lambda wf: [child] if wf is parent else listed(wf)
            )
            handle = term.kill("p4", by=ADMIN, reason="abort")
            monkeypatch.undo()
            termsafe.checkpoint()
        assert S.TERMINATED == handle.wait(WAIT)
        assert S.COMPLETED == child.state
        assert [] == audit.of("kill_requested", "c4")
        assert [] == audit.of("kill_refused", "c4")  # nobody asked to kill it

    def test_child_kill_leaves_parent(self, term: Terminator) -> None:
        """Killing a child ends only the child; the parent goes on."""
        with term.workflow("p3") as parent:
            with term.workflow("c3") as child:
                term.kill("c3", by=ADMIN)
                termsafe.checkpoint()
            termsafe.checkpoint()
        assert S.TERMINATED == child.state
        assert S.COMPLETED == parent.state


class TestDecorator:
    def test_sync(self, term: Terminator) -> None:
        """A decorated function runs as a fresh workflow on every call and returns its value."""
        seen: list[Workflow] = []

        @term.workflow("deco")
        def job(x: int) -> int:
            wf = termsafe.current_workflow()
            assert wf is not None
            seen.append(wf)
            return x + 1

        assert 2 == job(1)
        assert 3 == job(2)
        assert 2 == len(seen)
        assert seen[0] is not seen[1]
        assert [S.COMPLETED, S.COMPLETED] == [wf.state for wf in seen]
        assert "job" == job.__name__

    def test_sync_killed_returns_none(self, term: Terminator) -> None:
        """A decorated function whose workflow is killed returns None."""

        @term.workflow("deco-kill")
        def job() -> str:
            term.kill("deco-kill", by=ADMIN)
            termsafe.checkpoint()
            return "finished"

        assert job() is None
        assert S.TERMINATED == term.get("deco-kill").state

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async(self, make_term: TermFactory, backend: str) -> None:
        """A decorated coroutine function runs as a workflow; killed, it returns None."""
        term = make_term()

        @term.workflow("adeco")
        async def job(kill: bool) -> str:
            if kill:
                term.kill("adeco", by=ADMIN)
                # The cancellation reaches the loop "soon" (call_soon_threadsafe /
                # run_sync_soon), so wait on something only it can end.
                await anyio.sleep(WAIT * 6)
            await anyio.sleep(0)
            return "finished"

        assert "finished" == anyio.run(job, False, backend=backend)
        assert S.COMPLETED == term.get("adeco").state
        assert anyio.run(job, True, backend=backend) is None
        assert S.TERMINATED == term.get("adeco").state

    def test_module_level_function(self, make_term: TermFactory) -> None:
        """termsafe.workflow(..., terminator=) is the same as Terminator.workflow."""
        term = make_term()
        with termsafe.workflow("mod", terminator=term) as wf:
            assert wf is term.get("mod")


class TestAsyncWorkflow:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_completes(self, make_term: TermFactory, backend: str) -> None:
        """An async workflow that returns is completed and its rollback hooks do not run."""
        sink = MemorySink()
        term = make_term(sink=sink)
        ran: list[str] = []

        async def main() -> Workflow:
            async with term.workflow("acomplete") as wf:
                termsafe.on_rollback(lambda: ran.append("rollback"))
                termsafe.on_cleanup(lambda: ran.append("cleanup"))
                await anyio.sleep(0)
            return wf

        wf = anyio.run(main, backend=backend)
        assert S.COMPLETED == wf.state
        assert ["cleanup"] == ran
        assert backend == wf.backend
        [started] = Audit(term, sink).of("workflow_started")
        assert backend == started.details["backend"]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_error_fails(self, make_term: TermFactory, backend: str) -> None:
        """An exception in an async workflow fails it and propagates."""
        term = make_term()

        async def body() -> None:
            async with term.workflow("afail"):
                await anyio.sleep(0)
                _ = 1 / 0

        async def main() -> None:
            with pytest.raises(ZeroDivisionError):
                await body()

        anyio.run(main, backend=backend)
        assert S.FAILED == term.get("afail").state

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("force", [False, True])
    def test_killed_from_another_task(
        self, make_term: TermFactory, backend: str, force: bool
    ) -> None:
        """An async workflow awaiting something is cancelled by a kill from another task."""
        term = make_term()
        ran: list[str] = []

        async def main() -> tuple[WorkflowState, WorkflowState]:
            ready = anyio.Event()
            result: list[WorkflowState] = []

            async def run() -> None:
                async with term.workflow("atask") as wf:
                    termsafe.on_rollback(lambda: ran.append("rollback"))
                    ready.set()
                    await anyio.sleep(WAIT * 6)
                    ran.append("not reached")
                result.append(wf.state)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await ready.wait()
                handle = term.kill("atask", by=ADMIN, force=force)
                final = await handle.wait_async(WAIT)
            return final, result[0]

        assert (S.TERMINATED, S.TERMINATED) == anyio.run(main, backend=backend)
        assert ["rollback"] == ran

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_killed_in_section(self, make_term: TermFactory, backend: str) -> None:
        """A kill inside an async section is deferred until the section ends."""
        term = make_term()
        trace: list[str] = []

        async def main() -> WorkflowState:
            ready, go = anyio.Event(), anyio.Event()
            handles = []

            async def run() -> None:
                async with term.workflow("asec"):
                    async with critical_section("db"):
                        ready.set()
                        await go.wait()
                        await anyio.sleep(0)
                        trace.append("section finished")
                    trace.append("after section")

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await ready.wait()
                handles.append(term.kill("asec", by=ADMIN))
                await anyio.sleep(0.05)
                assert S.TERMINATING == handles[0].state
                go.set()
            assert handles[0].deferred
            return await handles[0].wait_async(WAIT)

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert ["section finished"] == trace

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_except_exception_does_not_swallow_kill(
        self, make_term: TermFactory, backend: str
    ) -> None:
        """``except Exception`` around an await does not swallow the kill."""
        term = make_term()
        swallowed: list[object] = []

        async def main() -> WorkflowState:
            async with term.workflow("astubborn") as wf:
                term.kill("astubborn", by=ADMIN)
                try:
                    await anyio.sleep(WAIT * 6)
                except Exception as exc:
                    swallowed.append(exc)
                swallowed.append("still running")
                await anyio.sleep(0)
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert [] == swallowed

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_current_workflow_follows_to_thread(self, make_term: TermFactory, backend: str) -> None:
        """current_workflow() is the same in anyio.to_thread.run_sync and in child tasks."""
        term = make_term()

        async def main() -> None:
            async with term.workflow("ctx") as wf:
                in_thread = await anyio.to_thread.run_sync(termsafe.current_workflow)
                assert wf is in_thread
                found: list[Workflow | None] = []

                async def child() -> None:
                    found.append(termsafe.current_workflow())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(child)
                assert [wf] == found
            assert termsafe.current_workflow() is None

        anyio.run(main, backend=backend)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_checkpoint_in_worker_thread(self, make_term: TermFactory, backend: str) -> None:
        """A checkpoint in a worker thread of an async workflow sees the workflow's kill."""
        term = make_term()
        caught: list[type[BaseException]] = []

        def work() -> None:
            term.kill("worker", by=ADMIN)
            try:
                termsafe.checkpoint()
            except BaseException as exc:
                caught.append(type(exc))
                raise

        async def main() -> WorkflowState:
            async with term.workflow("worker") as wf:
                await anyio.to_thread.run_sync(work)
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert [Terminated] == caught

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_many_workflows_killed_fast(self, make_term: TermFactory, backend: str) -> None:
        """Hundreds of live async workflows are all terminated by kill_all within a deadline."""
        term = make_term()
        count = 300

        async def main() -> list[WorkflowState]:
            started = 0
            all_started = anyio.Event()

            async def run(n: int) -> None:
                nonlocal started
                async with term.workflow(f"many-{n}"):
                    started += 1
                    if started == count:
                        all_started.set()
                    await anyio.sleep(WAIT * 6)

            async with anyio.create_task_group() as tg:
                for n in range(count):
                    tg.start_soon(run, n)
                await all_started.wait()
                handles = term.kill_all(by=ADMIN, reason="shutdown")
                assert count == len(handles)
            return [await h.wait_async(WAIT) for h in handles]

        began = time.monotonic()
        states = anyio.run(main, backend=backend)
        assert [S.TERMINATED] * count == states
        assert time.monotonic() - began < WAIT

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_caught_cancellation_comes_back(self, make_term: TermFactory, backend: str) -> None:
        """An async workflow that catches its cancellation is cancelled again at its next await."""
        term = make_term()
        trace: list[str] = []

        async def main() -> WorkflowState:
            async with term.workflow("acatch") as wf:
                term.kill("acatch", by=ADMIN)
                try:
                    await anyio.sleep(WAIT * 6)
                except anyio.get_cancelled_exc_class():
                    trace.append("caught")
                await anyio.sleep(WAIT * 6)
                trace.append("not reached")
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert ["caught"] == trace


class TestForcedThread:
    def test_forced_termination_type(self, term: Terminator) -> None:
        """With force=True the kill lands as ForcedTermination."""
        caught: list[type[BaseException]] = []
        with term.workflow("forced") as wf:
            term.kill("forced", by=ADMIN, force=True)
            try:
                termsafe.checkpoint()
            except BaseException as exc:
                caught.append(type(exc))
                raise
        assert [ForcedTermination] == caught
        assert S.TERMINATED == wf.state


class TestLoopBatch:
    """Calls handed to an event loop from other threads, one wake-up per batch."""

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_calls_from_threads_run_in_order_and_a_failure_spares_the_rest(
        self, backend: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each fn(arg) runs once in the loop's thread, in order; one that raises is logged."""
        from termsafe._workflow import _call, _loop_caller

        ran: list[tuple[object, bool]] = []
        finished: list[anyio.Event] = []
        loop_thread: threading.Thread | None = None

        def record(arg: object) -> None:
            if arg == "boom":
                raise RuntimeError("boom")
            ran.append((arg, threading.current_thread() is loop_thread))
            if arg == "last":
                finished[0].set()  # in the loop's thread

        def failing() -> None:
            raise ValueError("plain call failed")

        async def main() -> None:
            nonlocal loop_thread
            loop_thread = threading.current_thread()
            finished.append(anyio.Event())
            _, batch = _loop_caller()

            def from_thread() -> None:
                for i in range(50):
                    batch.call(record, i)
                batch.call(record, "boom")
                batch.call(_call, failing)
                batch.call(_call, lambda: record("plain"))
                batch.call(record, "last")

            await anyio.to_thread.run_sync(from_thread)
            with anyio.fail_after(WAIT):
                await finished[0].wait()

        with caplog.at_level("ERROR", logger="termsafe"):
            anyio.run(main, backend=backend)
        assert [*range(50), "plain", "last"] == [arg for arg, _ in ran]
        assert all(on_loop for _, on_loop in ran)
        failures = [r.getMessage() for r in caplog.records if "loop callback" in r.getMessage()]
        assert 2 == len(failures)
        assert "failing" in failures[1]
