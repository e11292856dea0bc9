"""Tests for termsafe._hooks: the one LIFO stack, alone and through real workflows."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest
from conftest import WAIT, Audit, Jobs, TermFactory
from hypothesis import given, settings
from hypothesis import strategies as st

import termsafe
from termsafe import (
    Hook,
    InvalidArgumentType,
    MemorySink,
    NoActiveWorkflow,
    Phases,
    Principal,
    Terminator,
    Workflow,
    WorkflowState,
)
from termsafe._hooks import RUNNING, HookStack, HookStackClosed

S = WorkflowState
ADMIN = Principal("root", roles=("admin",))
BACKENDS = ["asyncio", "trio"]


def recorder(log: list[str], label: str) -> Callable[[], None]:
    """A hook that appends ``label`` to ``log``, named after the label."""

    def hook() -> None:
        log.append(label)

    hook.__qualname__ = f"hook_{label}"
    return hook


class TestHookStack:
    def test_claims_lifo(self) -> None:
        """Hooks are claimed newest first."""
        stack = HookStack()
        hooks = [stack.push(lambda: None, "cleanup") for _ in range(3)]
        claimed = [stack.claim(include_rollback=True) for _ in range(3)]
        assert hooks[::-1] == claimed
        assert stack.claim(include_rollback=True) is None

    def test_success_discards_rollback_for_good(self) -> None:
        """Rollback hooks skipped on success are discarded, never claimable later."""
        stack = HookStack()
        stack.push(lambda: None, "rollback")
        cleanup = stack.push(lambda: None, "cleanup")
        stack.push(lambda: None, "rollback")
        assert cleanup is stack.claim(include_rollback=False)
        assert stack.claim(include_rollback=False) is None
        assert stack.claim(include_rollback=True) is None
        assert 0 == len(stack)

    def test_remove_pending(self) -> None:
        """A hook removed before it ran is never claimed, and a second removal is a no-op."""
        stack = HookStack()
        first = stack.push(lambda: None, "rollback")
        second = stack.push(lambda: None, "rollback")
        assert stack.remove(second)
        assert not stack.remove(second)
        assert first is stack.claim(include_rollback=True)
        assert stack.claim(include_rollback=True) is None

    def test_remove_claimed(self) -> None:
        """A hook that has been claimed can no longer be removed."""
        stack = HookStack()
        hook = stack.push(lambda: None, "cleanup")
        assert hook is stack.claim(include_rollback=True)
        assert not stack.remove(hook)

    def test_non_callable(self) -> None:
        """Pushing something that is not callable raises and registers nothing."""
        stack = HookStack()
        with pytest.raises(InvalidArgumentType, match="got 42"):
            stack.push(42, "rollback")  # type: ignore[arg-type]
        assert 0 == len(stack)

    def test_snapshot_bottom_first(self) -> None:
        """snapshot() lists pending hooks in registration order."""
        stack = HookStack()
        hooks = [stack.push(lambda: None, "cleanup"), stack.push(lambda: None, "rollback")]
        assert hooks == stack.snapshot()

    def test_taken_over_stack_is_claimed_only_by_the_terminator(self) -> None:
        """After take_over() only the terminator claims; a push meanwhile joins its sweep, LIFO."""
        stack = HookStack()
        first = stack.push(lambda: None, "rollback")
        stack.take_over()
        assert stack.claim(include_rollback=True) is None  # the workflow's own thread
        late = stack.push(lambda: None, "cleanup")  # the sweep has not finished: accepted
        assert not stack.closed
        assert late is stack.claim(include_rollback=True, by_terminator=True)
        assert first is stack.claim(include_rollback=True, by_terminator=True)
        assert [] == stack.snapshot()

    def test_sweep_closes_the_stack_as_it_finds_it_empty(self) -> None:
        """The terminator's claim that finds the stack empty closes it; a later push is refused."""
        stack = HookStack()
        stack.take_over()
        assert stack.claim(include_rollback=True, by_terminator=True) is None
        assert stack.closed
        late = recorder([], "late")
        with pytest.raises(HookStackClosed) as refused:
            stack.push(late, "cleanup")
        assert (late, "cleanup", RUNNING) == (
            refused.value.hook.fn,
            refused.value.hook.kind,
            refused.value.hook.state,
        )
        assert [] == stack.snapshot()

    def test_watchdog_takes_the_stack_over_with_the_hung_hook(self) -> None:
        """abandon_if_running(take_over=True) leaves the hung hook's thread nothing to claim."""
        stack = HookStack()
        below = stack.push(lambda: None, "rollback")
        hung = stack.push(lambda: None, "rollback")
        assert hung is stack.claim(include_rollback=True)
        assert stack.abandon_if_running(hung, take_over=True)
        assert stack.claim(include_rollback=True) is None
        assert below is stack.claim(include_rollback=True, by_terminator=True)

    def test_closed_stack_still_checks_the_hook(self) -> None:
        """A closed stack still names a hook that is not callable, before refusing anything."""
        stack = HookStack(taken=True, closed=True)
        with pytest.raises(InvalidArgumentType, match="got 42"):
            stack.push(42, "rollback")  # type: ignore[arg-type]


# One operation of the hook-order property: register a hook of a kind, or remove
# the i-th still registered one (modulo how many there are).
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from(["rollback", "cleanup"])),
        st.tuples(st.just("remove"), st.integers(min_value=0, max_value=20)),
    ),
    max_size=12,
)


class TestHookOrderProperty:
    @settings(max_examples=60, deadline=None)
    @given(ops=OPS, ending=st.sampled_from(["complete", "fail", "kill", "kill_in_section"]))
    def test_lifo_exactly_once(self, ops: list[tuple[str, object]], ending: str) -> None:
        """Whatever is registered and removed, the hooks that run are the model's, LIFO, once."""
        ran: list[str] = []
        model: list[tuple[str, str]] = []  # (label, kind), bottom first
        seen: list[Workflow] = []

        def body(term: Terminator) -> None:
            with term.workflow("prop") as wf:
                seen.append(wf)
                registered: list[Hook] = []
                for n, (op, arg) in enumerate(ops):
                    if op == "push":
                        assert isinstance(arg, str)
                        label = f"{arg}{n}"
                        push = termsafe.on_rollback if arg == "rollback" else termsafe.on_cleanup
                        registered.append(push(recorder(ran, label)))
                        model.append((label, arg))
                    elif registered:
                        assert isinstance(arg, int)
                        hook = registered.pop(arg % len(registered))
                        assert wf.hooks.remove(hook)
                        model.remove((hook.name.removeprefix("hook_"), hook.kind))
                assert len(model) == wf.pending_hooks
                if ending == "fail":
                    raise ValueError("boom")
                if ending == "kill":
                    term.kill("prop", by=ADMIN)
                    termsafe.checkpoint()
                if ending == "kill_in_section":
                    with termsafe.critical_section("db"):
                        term.kill("prop", by=ADMIN)
                        termsafe.checkpoint()  # deferred: does not raise here
                assert ending == "complete"

        sink = MemorySink()
        with Terminator(phases=Phases(30, 30), sink=sink) as term:
            if ending == "fail":
                with pytest.raises(ValueError, match="boom"):
                    body(term)
            else:
                body(term)
            assert term.flush(WAIT)
        [wf] = seen
        expected_state = {
            "complete": S.COMPLETED,
            "fail": S.FAILED,
            "kill": S.TERMINATED,
            "kill_in_section": S.TERMINATED,
        }[ending]
        assert expected_state == wf.state
        if ending == "complete":
            expected = [label for label, kind in reversed(model) if kind == "cleanup"]
        else:
            expected = [label for label, _ in reversed(model)]
        assert expected == ran
        assert 0 == wf.pending_hooks
        assert len(expected) == sink.types().count("hook_ran")


class TestHooksInWorkflows:
    def test_success_runs_cleanup_lifo_and_drops_rollback(self, term: Terminator) -> None:
        """On success the cleanup hooks run newest first and rollback hooks never run."""
        ran: list[str] = []
        with term.workflow("ok") as wf:
            termsafe.on_cleanup(recorder(ran, "c1"))
            termsafe.on_rollback(recorder(ran, "r2"))
            termsafe.on_cleanup(recorder(ran, "c3"))
        assert ["c3", "c1"] == ran
        assert S.COMPLETED == wf.state
        assert 0 == wf.pending_hooks

    def test_failure_runs_all_lifo(self, term: Terminator) -> None:
        """On an error every hook runs newest first, then the error propagates."""
        ran: list[str] = []

        def body() -> None:
            with term.workflow("bad"):
                termsafe.on_rollback(recorder(ran, "r1"))
                termsafe.on_cleanup(recorder(ran, "c2"))
                termsafe.on_rollback(recorder(ran, "r3"))
                raise KeyError("x")

        with pytest.raises(KeyError, match="x"):
            body()
        assert ["r3", "c2", "r1"] == ran
        assert S.FAILED == term.get("bad").state

    def test_kill_runs_all_lifo(self, term: Terminator, audit: Audit) -> None:
        """A killed workflow runs every hook newest first, each once, and is terminated."""
        ran: list[str] = []
        with term.workflow("killed") as wf:
            termsafe.on_rollback(recorder(ran, "r1"))
            termsafe.on_cleanup(recorder(ran, "c2"))
            term.kill("killed", by=ADMIN)
            termsafe.checkpoint()
            ran.append("not reached")
        assert ["c2", "r1"] == ran
        assert S.TERMINATED == wf.state
        assert ["hook_c2", "hook_r1"] == [e.details["hook"] for e in audit.of("hook_ran")]

    def test_removed_hook_does_not_run(self, term: Terminator) -> None:
        """A hook removed with hooks.remove() never runs."""
        ran: list[str] = []

        def body() -> None:
            with term.workflow("rm") as wf:
                termsafe.on_rollback(recorder(ran, "r1"))
                hook = termsafe.on_rollback(recorder(ran, "r2"))
                assert wf.hooks.remove(hook)
                raise RuntimeError("fail to roll back")

        with pytest.raises(RuntimeError, match="fail to roll back"):
            body()
        assert ["r1"] == ran

    def test_failing_hook_recorded_rest_run(self, term: Terminator, audit: Audit) -> None:
        """A hook that raises is recorded (event and hook_failures) and the others still run."""
        ran: list[str] = []

        def broken() -> None:
            raise ValueError("disk on fire")

        with term.workflow("hf") as wf:
            termsafe.on_cleanup(recorder(ran, "c1"))
            termsafe.on_cleanup(broken)
            termsafe.on_cleanup(recorder(ran, "c3"))
        assert ["c3", "c1"] == ran
        assert S.COMPLETED == wf.state
        name = broken.__qualname__
        assert [(name, "ValueError: disk on fire")] == wf.hook_failures
        [failed] = audit.of("hook_failed")
        assert name == failed.details["hook"]
        assert "ValueError: disk on fire" == failed.details["error"]
        assert 1 == term.metrics().hook_failures
        [finished] = audit.of("workflow_finished")
        assert 1 == finished.details["hook_failures"]

    def test_keyboard_interrupt_in_hook_reraised_after_rest(self, term: Terminator) -> None:
        """A KeyboardInterrupt in a hook is re-raised only after the other hooks ran."""
        ran: list[str] = []

        def interrupted() -> None:
            raise KeyboardInterrupt

        def body() -> None:
            with term.workflow("ki"):
                termsafe.on_cleanup(recorder(ran, "c1"))
                termsafe.on_cleanup(interrupted)

        with pytest.raises(KeyboardInterrupt):
            body()
        assert ["c1"] == ran

    def test_hanging_hook_bounded(self, make_term: TermFactory, jobs: Jobs) -> None:
        """A hook that hangs is given up after hook_timeout; the rest run; it is recorded."""
        sink = MemorySink()
        term = make_term(sink=sink, hook_timeout=0.2)
        audit = Audit(term, sink)
        release = threading.Event()
        started = threading.Event()
        ran: list[str] = []

        def hangs() -> None:
            ran.append("hangs")
            release.wait(WAIT * 3)

        def body() -> WorkflowState:
            with term.workflow("hang") as wf:
                termsafe.on_cleanup(recorder(ran, "c1"))
                termsafe.on_cleanup(hangs)
                started.set()
            return wf.state

        job = jobs.start(body)
        try:
            assert started.wait(WAIT)
            wf = term.get("hang")
            assert wf.done_event().wait(WAIT)
            assert ["hangs", "c1"] == ran
            assert S.COMPLETED == wf.state
            assert [(hangs.__qualname__, "timed out after 0.2s")] == wf.hook_failures
            [failed] = audit.of("hook_failed")
            assert failed.details["hung"] is True
        finally:
            release.set()
        assert S.COMPLETED == job.result()
        assert ["hangs", "c1"] == ran
        assert "late_finish" in audit.types("hang")

    def test_hanging_hook_of_killed_workflow(self, make_term: TermFactory, jobs: Jobs) -> None:
        """A killed workflow whose hook hangs still ends (killed), with every other hook run."""
        term = make_term(hook_timeout=0.2)
        release = threading.Event()
        ready = threading.Event()
        ran: list[str] = []

        def hangs() -> None:
            release.wait(WAIT * 3)

        def body() -> None:
            with term.workflow("hangk"):
                termsafe.on_rollback(recorder(ran, "r1"))
                termsafe.on_rollback(hangs)
                ready.set()
                termsafe.sleep(WAIT * 3)

        job = jobs.start(body)
        try:
            assert ready.wait(WAIT)
            handle = term.kill("hangk", by=ADMIN)
            assert S.KILLED == handle.wait(WAIT)
            assert ["r1"] == ran
        finally:
            release.set()
        job.result()
        assert S.KILLED == term.get("hangk").state
        assert ["r1"] == ran

    def test_non_callable_hook(self, term: Terminator) -> None:
        """A non-callable hook raises InvalidArgumentType naming it, and nothing is registered."""
        with term.workflow("nc") as wf:
            with pytest.raises(InvalidArgumentType, match="'not a function'"):
                termsafe.on_rollback("not a function")  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentType, match="None"):
                termsafe.on_cleanup(None)  # type: ignore[arg-type]
            assert 0 == wf.pending_hooks

    @pytest.mark.parametrize("register", [termsafe.on_rollback, termsafe.on_cleanup])
    def test_outside_workflow(self, register: Callable[[Callable[[], None]], object]) -> None:
        """Registering a hook with no workflow in scope raises NoActiveWorkflow."""
        with pytest.raises(NoActiveWorkflow):
            register(lambda: None)


class TestAsyncHooks:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_hooks_awaited_lifo(self, make_term: TermFactory, backend: str) -> None:
        """Async hooks are awaited in the workflow's task, in LIFO order with sync ones."""
        term = make_term()
        ran: list[str] = []

        async def async_hook() -> None:
            await anyio.sleep(0)
            ran.append("async")

        async def body() -> None:
            async with term.workflow("ah"):
                termsafe.on_rollback(recorder(ran, "r1"))
                termsafe.on_rollback(async_hook)
                termsafe.on_cleanup(recorder(ran, "c3"))
                raise OSError("disk gone")

        async def main() -> WorkflowState:
            with pytest.raises(OSError, match="disk gone"):
                await body()
            return term.get("ah").state

        assert S.FAILED == anyio.run(main, backend=backend)
        assert ["c3", "async", "r1"] == ran

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_hooks_on_kill(self, make_term: TermFactory, backend: str) -> None:
        """A killed async workflow awaits its async hooks even though its scope is cancelled."""
        term = make_term()
        ran: list[str] = []

        async def async_hook() -> None:
            await anyio.sleep(0.01)
            ran.append("async")

        async def main() -> WorkflowState:
            async with term.workflow("ak") as wf:
                termsafe.on_cleanup(recorder(ran, "c1"))
                termsafe.on_rollback(async_hook)
                term.kill("ak", by=ADMIN)
                await anyio.sleep(WAIT * 3)
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert ["async", "c1"] == ran

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_hanging_async_hook_bounded(self, make_term: TermFactory, backend: str) -> None:
        """An async hook that hangs is cancelled after hook_timeout and recorded; the rest run."""
        term = make_term(hook_timeout=0.2)
        ran: list[str] = []

        async def hangs() -> None:
            await anyio.sleep(WAIT * 3)

        async def main() -> WorkflowState:
            async with term.workflow("ahang") as wf:
                termsafe.on_cleanup(recorder(ran, "c1"))
                termsafe.on_cleanup(hangs)
            return wf.state

        assert S.COMPLETED == anyio.run(main, backend=backend)
        assert ["c1"] == ran
        wf = term.get("ahang")
        assert [(hangs.__qualname__, "TimeoutError: timed out after 0.2s")] == wf.hook_failures

    def test_async_hook_in_thread_workflow(self, term: Terminator) -> None:
        """An async hook registered in a thread workflow is run to completion too."""
        ran: list[str] = []

        async def async_hook() -> None:
            await anyio.sleep(0)
            ran.append("async")

        with term.workflow("ath"):
            termsafe.on_cleanup(async_hook)
        assert ["async"] == ran
