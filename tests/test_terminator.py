"""Tests for termsafe._terminator: kills, the phase ladder, the system phase, permissions."""

from __future__ import annotations

import contextlib
import contextvars
import gc
import math
import os
import queue
import re
import select
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from conftest import WAIT, Audit, Jobs, TermFactory
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import termsafe
from termsafe import (
    AuditEvent,
    ConfigurationError,
    CriticalSection,
    Decision,
    ForcedTermination,
    InvalidArgumentType,
    KillHandle,
    KillRefused,
    MemorySink,
    Phases,
    Principal,
    Terminator,
    WaitTimeout,
    Workflow,
    WorkflowNotFound,
    WorkflowState,
    critical_section,
)
from termsafe._states import is_terminal
from termsafe._terminator import STORM_SWITCH_INTERVAL
from termsafe._timer import BATCH_SLOT

S = WorkflowState
ADMIN = Principal("root", roles=("admin",))
BACKENDS = ["asyncio", "trio"]


def recorder(log: list[str], label: str) -> Callable[[], None]:
    def hook() -> None:
        log.append(label)

    hook.__qualname__ = f"hook_{label}"
    return hook


def event_seen(term: Terminator, type_: str, **details: Any) -> threading.Event:
    """An Event set when ``term`` emits an event of ``type_`` whose details include ``details``."""
    seen = threading.Event()

    def listen(event: AuditEvent) -> None:
        if event.type == type_ and all(event.details.get(k) == v for k, v in details.items()):
            seen.set()

    term.add_event_listener(listen)
    return seen


class TestPhases:
    def test_defaults(self) -> None:
        """The ladder defaults to 5 s graceful and 5 s forced."""
        assert (5.0, 5.0) == (Phases().graceful, Phases().forced)

    @pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
    @pytest.mark.parametrize("field", ["graceful", "forced"])
    def test_bad_value(self, field: str, value: float) -> None:
        """A negative, NaN or infinite phase raises ConfigurationError naming field and value."""
        with pytest.raises(ConfigurationError, match=re.escape(f"{field} must be >= 0")) as info:
            Phases(**{field: value})
        assert f"(got {value!r})" in str(info.value)

    @pytest.mark.parametrize("value", ["5", None, True, [1.0]])
    def test_bad_type(self, value: object) -> None:
        """A phase that is not a number raises InvalidArgumentType naming it."""
        with pytest.raises(InvalidArgumentType, match=re.escape(f"(got {value!r})")):
            Phases(graceful=value)  # type: ignore[arg-type]

    def test_zero_allowed(self) -> None:
        """Zero-length phases are allowed (kill escalates at once)."""
        assert Phases(0, 0) == Phases(0.0, 0.0)


class TestConstruction:
    @pytest.mark.parametrize(
        ("kwargs", "error", "shown"),
        [
            ({"phases": (1, 2)}, InvalidArgumentType, "(1, 2)"),
            ({"sink": object}, InvalidArgumentType, "<class 'object'>"),
            ({"hook_timeout": -1}, ConfigurationError, "-1"),
            ({"hook_timeout": math.nan}, ConfigurationError, "nan"),
            ({"hook_timeout": "1"}, InvalidArgumentType, "'1'"),
            ({"history": -1}, ConfigurationError, "-1"),
            ({"history": 1.5}, ConfigurationError, "1.5"),
        ],
    )
    def test_bad_arguments(
        self, kwargs: dict[str, Any], error: type[Exception], shown: str
    ) -> None:
        """A bad constructor argument raises the fitting error naming the value."""
        kwargs.setdefault("sink", MemorySink())
        with pytest.raises(error, match=re.escape(f"(got {shown})")):
            Terminator(**kwargs)

    def test_closed_refuses_workflows(self, make_term: TermFactory) -> None:
        """A closed terminator accepts no new workflow."""
        term = make_term()
        term.close()
        with pytest.raises(termsafe.TerminatorClosed, match="'late'"), term.workflow("late"):
            pass

    def test_closed_refuses_kills(self, make_term: TermFactory) -> None:
        """A closed terminator refuses a kill instead of accepting one it cannot carry out."""
        term = make_term()
        term.close()
        with pytest.raises(termsafe.TerminatorClosed, match="'w'"):
            term.kill("w", by=ADMIN)

    def test_no_threads_until_needed(self) -> None:
        """Building a terminator starts no thread."""
        before = set(threading.enumerate())
        term = Terminator(sink=MemorySink())
        assert set() == set(threading.enumerate()) - before
        term.close()

    def test_deadline_thread_starts_with_the_first_workflow(self) -> None:
        """The first workflow starts the deadline thread, so the first kill() never waits for it."""
        with Terminator(sink=MemorySink()) as term:
            assert not term._timer.running
            with term.workflow("first"):
                assert term._timer.running


class TestKill:
    def test_returns_at_once(self, term: Terminator, jobs: Jobs) -> None:
        """kill() returns while the workflow is still busy; wait() then gives the final state."""
        inside, go = threading.Event(), threading.Event()

        def body() -> None:
            with term.workflow("busy"), critical_section("git"):
                inside.set()
                assert go.wait(WAIT)

        job = jobs.start(body)
        assert inside.wait(WAIT)
        started = time.monotonic()
        killer = jobs.start(lambda: term.kill("busy", by=ADMIN), name="killer")
        handle = killer.result(WAIT)
        assert time.monotonic() - started < WAIT / 2
        assert (False, S.TERMINATING) == (handle.done, handle.state)
        with pytest.raises(WaitTimeout, match="'busy'"):
            handle.wait(0.05)
        go.set()
        assert S.TERMINATED == handle.wait(WAIT)
        assert handle.done
        job.result()

    def test_does_not_wait_for_sink(self, make_term: TermFactory, jobs: Jobs) -> None:
        """kill() returns even while the audit sink is blocked."""
        unblock = threading.Event()

        class SlowSink(MemorySink):
            def emit(self, event: AuditEvent) -> None:
                assert unblock.wait(WAIT * 2)
                super().emit(event)

        term = make_term(sink=SlowSink())
        try:
            with term.workflow("slow-sink") as wf:
                killer = jobs.start(lambda: term.kill("slow-sink", by=ADMIN))
                killer.result(WAIT)
                termsafe.checkpoint()
        finally:
            unblock.set()
        assert S.TERMINATED == wf.state

    def test_unknown_id(self, term: Terminator, audit: Audit) -> None:
        """Killing an unknown id is refused with 'Workflow not found', and audited."""
        with pytest.raises(KillRefused) as info:
            term.kill("ghost", by=ADMIN, reason="cleanup")
        assert "Workflow not found" == info.value.decision.reason
        assert not info.value.decision.allowed
        assert "ghost" == info.value.workflow_id
        [refused] = audit.of("kill_refused")
        assert ("ghost", "Workflow not found", "root") == (
            refused.workflow_id,
            refused.details["decision"],
            refused.actor["id"] if refused.actor else None,
        )
        assert 1 == term.metrics().kills_refused

    def test_finished_workflow(self, term: Terminator) -> None:
        """Killing a finished workflow is refused with 'Cannot kill finished workflow'."""
        with term.workflow("old"):
            pass
        with pytest.raises(KillRefused) as info:
            term.kill("old", by=ADMIN)
        assert "Cannot kill finished workflow" == info.value.decision.reason
        assert S.COMPLETED == term.get("old").state

    @pytest.mark.parametrize(
        ("kwargs", "shown"),
        [
            ({"by": "root"}, "'root'"),
            ({"by": ADMIN, "reason": 5}, "5"),
            ({"by": ADMIN, "force": "yes"}, "'yes'"),
            ({"by": ADMIN, "force": 1}, "1"),
        ],
    )
    def test_bad_arguments(self, term: Terminator, kwargs: dict[str, Any], shown: str) -> None:
        """A bad argument raises InvalidArgumentType naming it, and kills nothing."""
        with term.workflow("target") as wf:
            with pytest.raises(InvalidArgumentType, match=re.escape(f"(got {shown})")):
                term.kill("target", **kwargs)
            assert wf.kill is None
        assert S.COMPLETED == wf.state

    def test_bad_id_type(self, term: Terminator) -> None:
        """A workflow id that is not a string raises InvalidArgumentType naming it."""
        with pytest.raises(InvalidArgumentType, match=re.escape("(got 42)")):
            term.kill(42, by=ADMIN)  # type: ignore[arg-type]

    def test_same_handle_twice(self, term: Terminator, audit: Audit) -> None:
        """A second kill of a terminating workflow returns the first handle and is audited."""
        with term.workflow("twice"):
            with critical_section("db"):
                first = term.kill("twice", by=ADMIN, reason="one")
                second = term.kill("twice", by=Principal("other", roles=("admin",)), reason="two")
            assert first is second
        assert "one" == first.reason
        assert 2 == len(audit.of("kill_requested"))

    def test_metrics_after_kill(self, term: Terminator) -> None:
        """A kill that ends in terminated counts as requested and succeeded."""
        with term.workflow("m"):
            term.kill("m", by=ADMIN)
            termsafe.checkpoint()
        metrics = term.metrics()
        assert (1, 1, 0, 0) == (
            metrics.kills_requested,
            metrics.kills_succeeded,
            metrics.kills_failed,
            metrics.kills_in_flight,
        )
        assert 1.0 == metrics.success_rate

    def test_a_noop_hook_subclass_is_called(self, make_term: TermFactory) -> None:
        """A metrics hook that subclasses NoopMetricsHook has its overrides called."""
        outcomes: list[str] = []

        class Counting(termsafe.NoopMetricsHook):
            def kill_requested(self, *, outcome: str) -> None:
                outcomes.append(outcome)

        term = make_term(metrics_hook=Counting())
        with term.workflow("counted"):
            term.kill("counted", by=ADMIN)
            termsafe.checkpoint()
        with pytest.raises(KillRefused):
            term.kill("counted", by=ADMIN)
        assert ["accepted", "refused"] == outcomes

    def test_kill_latency_is_the_time_from_request_to_final(self, make_term: TermFactory) -> None:
        """The recorded kill latency lies between zero and the wall time around kill and wait."""
        hooked: list[float] = []

        class Hook(termsafe.NoopMetricsHook):
            def kill_finished(self, *, final_state: str, latency_s: float) -> None:
                hooked.append(latency_s)

        sink = MemorySink()
        term = make_term(sink=sink, metrics_hook=Hook())
        audit = Audit(term, sink)
        ready, go = threading.Event(), threading.Event()

        def body() -> None:
            with term.workflow("lat"):
                ready.set()
                assert go.wait(WAIT)
                termsafe.checkpoint()

        thread = threading.Thread(target=body)
        thread.start()
        try:
            assert ready.wait(WAIT)
            before = time.monotonic()
            handle = term.kill("lat", by=ADMIN)
            go.set()
            assert S.TERMINATED == handle.wait(WAIT)
            elapsed = time.monotonic() - before
        finally:
            go.set()
            thread.join(WAIT)
        metrics = term.metrics()
        [latency] = hooked
        assert 0.0 < latency <= elapsed
        assert latency == metrics.kill_latency_p50 == metrics.kill_latency_p99
        [finished] = audit.of("workflow_finished", "lat")
        assert round(latency * 1000, 3) == finished.details["kill_latency_ms"]


class TestPermissions:
    @pytest.mark.parametrize(
        ("principal", "reason"),
        [
            (Principal("alice"), "OK"),
            (Principal("bob"), "Insufficient permissions"),
            (Principal("root", roles=("admin",)), "OK"),
            (Principal("lead", roles=("team-lead",), teams=("data",)), "OK"),
            (Principal("lead", roles=("team-lead",), teams=("web",)), "Insufficient permissions"),
            (Principal("ro", roles=("admin", "read-only")), "Insufficient permissions"),
            (Principal("ext", kind="external", roles=("admin",)), "Insufficient permissions"),
            (Principal("wf", kind="workflow", roles=("admin",)), "Insufficient permissions"),
            (Principal("cron", kind="system"), "Insufficient permissions"),
            (Principal("janitor", kind="system"), "OK"),
        ],
    )
    def test_can_kill(self, term: Terminator, principal: Principal, reason: str) -> None:
        """can_kill follows the permission model of the design."""
        term.register_policy("janitor", lambda wf, p: wf.team == "data")
        with term.workflow("perm", owner="alice", team="data"):
            assert Decision(reason == "OK", reason) == term.can_kill("perm", principal)
            if reason == "OK":
                term.kill("perm", by=principal)
            else:
                with pytest.raises(KillRefused) as info:
                    term.kill("perm", by=principal)
                assert reason == info.value.decision.reason
            termsafe.checkpoint()

    def test_order_of_checks(self, term: Terminator) -> None:
        """can_kill checks existence, then permission, then finished, then sections."""
        stranger = Principal("stranger")
        assert "Workflow not found" == term.can_kill("nope", stranger).reason
        with term.workflow("order", owner="alice"):
            with critical_section("db"):
                assert "Insufficient permissions" == term.can_kill("order", stranger).reason
                assert "Workflow in critical section" == term.can_kill("order", ADMIN).reason
            assert "OK" == term.can_kill("order", ADMIN).reason
        assert "Insufficient permissions" == term.can_kill("order", stranger).reason
        assert "Cannot kill finished workflow" == term.can_kill("order", ADMIN).reason

    def test_crashing_policy_refuses(self, term: Terminator) -> None:
        """A policy that raises counts as a refusal."""

        def policy(wf: Workflow, p: Principal) -> bool:
            raise RuntimeError("policy bug")

        term.register_policy("flaky", policy)
        with term.workflow("pol"):
            decision = term.can_kill("pol", Principal("flaky", kind="system"))
        assert Decision(False, "Insufficient permissions") == decision

    def test_kill_all_skips_refused(self, term: Terminator, jobs: Jobs) -> None:
        """kill_all kills what the principal may kill and leaves the rest."""
        ready, go = threading.Event(), threading.Event()

        def theirs() -> WorkflowState:
            with term.workflow("theirs", owner="bob") as wf:
                ready.set()
                assert go.wait(WAIT)
            return wf.state

        job = jobs.start(theirs)
        assert ready.wait(WAIT)
        try:
            with term.workflow("mine", owner="alice") as mine:
                handles = term.kill_all(by=Principal("alice"))
                assert ["mine"] == [h.workflow_id for h in handles]
                assert mine.kill_pending
                assert term.get("theirs").kill is None
                termsafe.checkpoint()
        finally:
            go.set()
        assert S.TERMINATED == mine.state
        assert S.COMPLETED == job.result()


class TestEscalation:
    def _stuck(
        self, term: Terminator, jobs: Jobs, name: str
    ) -> tuple[threading.Event, list[type[BaseException]], Callable[[], None]]:
        """Start a workflow that waits on a gate (no cancellation point), then checkpoints."""
        ready, gate = threading.Event(), threading.Event()
        caught: list[type[BaseException]] = []

        def body() -> None:
            with term.workflow(name):
                ready.set()
                assert gate.wait(WAIT)
                try:
                    termsafe.checkpoint()
                except BaseException as exc:
                    caught.append(type(exc))
                    raise

        job = jobs.start(body)
        assert ready.wait(WAIT)
        return gate, caught, job.result

    def test_graceful_expiry_forces(self, make_term: TermFactory, jobs: Jobs) -> None:
        """When the graceful phase runs out the kill lands as ForcedTermination."""
        sink = MemorySink()
        term = make_term(phases=Phases(0.1, 30), sink=sink)
        forced = event_seen(term, "phase_changed", phase="forced")
        gate, caught, result = self._stuck(term, jobs, "slowpoke")
        handle = term.kill("slowpoke", by=ADMIN)
        try:
            assert forced.wait(WAIT)
            assert "forced" == handle.phase
        finally:
            gate.set()
        result()
        assert [ForcedTermination] == caught
        assert S.TERMINATED == handle.wait(WAIT)
        [changed] = Audit(term, sink).of("phase_changed")
        assert changed.details["escalated"] is False

    def test_second_kill_with_force(self, term: Terminator, audit: Audit, jobs: Jobs) -> None:
        """A second kill with force=True escalates a graceful kill to the forced phase."""
        gate, caught, result = self._stuck(term, jobs, "esc")
        try:
            first = term.kill("esc", by=ADMIN)
            assert "graceful" == first.phase
            second = term.kill("esc", by=ADMIN, force=True)
            assert first is second
            assert "forced" == first.phase
        finally:
            gate.set()
        result()
        assert [ForcedTermination] == caught
        assert S.TERMINATED == first.wait(WAIT)
        requests = audit.of("kill_requested")
        assert [False, True] == [e.details["force"] for e in requests]
        assert requests[1].details["escalated"] is True
        [changed] = audit.of("phase_changed")
        assert {"phase": "forced", "escalated": True} == dict(changed.details)

    def test_escalate(self, term: Terminator, jobs: Jobs) -> None:
        """escalate() moves every graceful kill to the forced phase and says how many."""
        gate, caught, result = self._stuck(term, jobs, "e1")
        try:
            handle = term.kill("e1", by=ADMIN)
            assert 1 == term.escalate()
            assert 0 == term.escalate()
            assert "forced" == handle.phase
        finally:
            gate.set()
        result()
        assert [ForcedTermination] == caught

    @pytest.mark.parametrize(
        ("call", "bad"),
        [
            (lambda t: t.kill_all(by="root"), "'root'"),
            (lambda t: t.kill_all(by=ADMIN, reason=7), "7"),
            (lambda t: t.kill_all(by=ADMIN, force="yes"), "'yes'"),
            (lambda t: t.terminate_all(None), "None"),
            (lambda t: t.terminate_all("stop", force=1), "1"),
        ],
    )
    def test_bulk_kills_refuse_bad_arguments(
        self, term: Terminator, call: Callable[[Terminator], object], bad: str
    ) -> None:
        """kill_all and terminate_all name a bad argument and kill nothing."""
        with term.workflow("untouched") as wf:
            with pytest.raises(InvalidArgumentType, match=re.escape(f"(got {bad})")):
                call(term)
            assert wf.kill is None

    def test_a_storm_shares_its_phase_deadlines(self, make_term: TermFactory) -> None:
        """Kills due in the same millisecond share a timer entry; each still reaches its phase."""
        count = 300
        # A graceful phase long enough that no entry comes due while the storm
        # is counted, even on a loaded machine.
        term = make_term(phases=Phases(2.0, 30))
        forced: list[str] = []
        all_forced = threading.Event()

        def listen(event: AuditEvent) -> None:
            if event.type == "phase_changed" and event.details.get("phase") == "forced":
                forced.append(str(event.workflow_id))
                if len(forced) == count:
                    all_forced.set()

        term.add_event_listener(listen)
        with contextlib.ExitStack() as stack:
            for i in range(count):
                stack.enter_context(term.workflow(f"storm-{i}"))
            started = time.monotonic()
            handles = term.kill_all(by=ADMIN)
            spanned = time.monotonic() - started
            with term._timer._lock:
                entries = [e for e in term._timer._heap if e[2] == term._on_forced_due]
            # One entry per millisecond the storm spanned, not one per kill.
            assert len(entries) <= spanned / BATCH_SLOT + 2
            assert count == sum(len(e[3]) for e in entries)
            assert all_forced.wait(WAIT)
            assert sorted(f"storm-{i}" for i in range(count)) == sorted(forced)
            assert {"forced"} == {h.phase for h in handles}
            # The system phase is queued the same way.
            with term._timer._lock:
                systems = [e for e in term._timer._heap if e[2] == term._on_system_due]
            assert count == sum(len(e[3]) for e in systems)

    def test_kill_all_on_a_closed_terminator(self, make_term: TermFactory) -> None:
        """kill_all on a closed terminator raises TerminatorClosed, even with nothing live."""
        term = make_term()
        term.close()
        with pytest.raises(termsafe.TerminatorClosed, match="closed"):
            term.kill_all(by=ADMIN)

    def test_a_kill_does_not_wait_for_an_ending_workflows_metrics(
        self, term: Terminator, jobs: Jobs
    ) -> None:
        """kill() returns while the lock that records workflow ends is held elsewhere."""
        with term.workflow("k"):
            with term._recorder._lock:  # as an ending workflow's thread would hold it
                job = jobs.start(lambda: term.kill("k", by=ADMIN))
                handle = job.result()
            assert "k" == handle.workflow_id
            termsafe.checkpoint()

    def test_terminate_all(self, term: Terminator, audit: Audit, jobs: Jobs) -> None:
        """terminate_all kills every live workflow as the process, without a permission check."""
        ready = threading.Barrier(3, timeout=WAIT)

        def run(name: str) -> WorkflowState:
            with term.workflow(name, owner="someone") as wf:
                with term.workflow(f"{name}-child"):
                    ready.wait()
                    termsafe.sleep(WAIT * 6)
                termsafe.checkpoint()
            return wf.state

        first = jobs.start(lambda: run("a"))
        second = jobs.start(lambda: run("b"))
        ready.wait()
        handles = term.terminate_all("shutting down")
        assert {"a", "b"} == {h.workflow_id for h in handles}
        assert (S.TERMINATED, S.TERMINATED) == (first.result(), second.result())
        assert S.TERMINATED == term.get("a-child").state
        actors = {e.actor["id"] for e in audit.of("kill_requested") if e.actor}
        assert {"termsafe"} == actors


class TestSystemPhase:
    def test_stuck_thread_is_killed(self, make_term: TermFactory, jobs: Jobs) -> None:
        """A thread that never comes back is marked killed, hooks run once, it counts as orphan."""
        sink = MemorySink()
        term = make_term(phases=Phases(0.2, 0.2), sink=sink)
        audit = Audit(term, sink)
        ready, gate = threading.Event(), threading.Event()
        ran: list[str] = []
        after: list[str] = []

        def body() -> WorkflowState:
            with term.workflow("stuck") as wf:
                termsafe.on_rollback(recorder(ran, "r1"))
                termsafe.on_cleanup(recorder(ran, "c2"))
                ready.set()
                assert gate.wait(WAIT * 2)  # not a cancellation point: the thread is stuck
                after.append("came back")
                termsafe.checkpoint()
                after.append("not reached")
            return wf.state

        job = jobs.start(body, name="stuck-thread")
        assert ready.wait(WAIT)
        requested = time.monotonic()
        handle = term.kill("stuck", by=ADMIN, reason="hung")
        try:
            assert S.KILLED == handle.wait(WAIT)
            assert time.monotonic() - requested >= 0.4
            assert ["c2", "r1"] == ran
            metrics = term.metrics()
            assert (1, 1, 1) == (metrics.orphans, metrics.orphans_alive, metrics.kills_failed)
            [orphan] = audit.of("orphan_detected")
            assert {"kind": "thread", "thread": "stuck-thread"} == dict(orphan.details)
            assert {"terminator"} == {e.details["ran_by"] for e in audit.of("hook_ran")}
        finally:
            gate.set()
        assert S.KILLED == job.result()
        assert ["came back"] == after
        assert ["c2", "r1"] == ran
        assert S.KILLED == term.get("stuck").state
        [late] = audit.of("late_finish")
        assert "terminated" == late.details["would_have_been"]
        assert "killed" == late.state
        assert 1 == len(audit.of("workflow_finished"))
        assert 0 == term.metrics().orphans_alive

    def test_returning_thread_does_not_race_terminator_hooks(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A stuck thread that returns while the terminator runs its hooks leaves them LIFO."""
        term = make_term(phases=Phases(0.1, 0.1), hook_timeout=WAIT * 2)
        ready, gate, in_hook, hook_gate = (threading.Event() for _ in range(4))
        log: list[str] = []

        def slow_rollback() -> None:
            log.append("h2 start")
            in_hook.set()
            assert hook_gate.wait(WAIT * 2)
            log.append("h2 end")

        def body() -> None:
            with term.workflow("race"):
                termsafe.on_rollback(recorder(log, "h1"))
                termsafe.on_rollback(slow_rollback)
                ready.set()
                assert gate.wait(WAIT * 2)

        job = jobs.start(body)
        assert ready.wait(WAIT)
        handle = term.kill("race", by=ADMIN)
        try:
            assert in_hook.wait(WAIT)  # the system phase is running h2 for the thread
            gate.set()
            job.result()  # the thread came back and finished its exit path
        finally:
            gate.set()
            hook_gate.set()
        assert S.KILLED == handle.wait(WAIT)
        assert ["h2 start", "h2 end", "h1"] == log

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_stuck_async_workflow(self, make_term: TermFactory, backend: str) -> None:
        """An async workflow shielded from its cancellation is killed by the system phase."""
        sink = MemorySink()
        term = make_term(phases=Phases(0.1, 0.1), sink=sink)
        ran: list[str] = []

        async def main() -> tuple[WorkflowState, WorkflowState]:
            async with term.workflow("astuck") as wf:
                termsafe.on_rollback(recorder(ran, "r1"))
                handle = term.kill("astuck", by=ADMIN)
                with anyio.CancelScope(shield=True):
                    final = await handle.wait_async(WAIT)
                    assert ["r1"] == ran
            return final, wf.state

        assert (S.KILLED, S.KILLED) == anyio.run(main, backend=backend)
        assert ["r1"] == ran
        metrics = term.metrics()
        assert (0, 1) == (metrics.orphans, metrics.kills_failed)
        assert 1 == Audit(term, sink).types().count("late_finish")

    def test_cleanup_jobs_and_forced_actions(self, make_term: TermFactory, jobs: Jobs) -> None:
        """Forced actions run when the forced phase starts; cleanup jobs after the system phase."""
        term = make_term(phases=Phases(0.05, 0.05))
        seen: list[tuple[str, str]] = []
        term.add_forced_action(lambda wf: seen.append(("forced", wf.id)))
        term.add_cleanup_job(lambda wf: seen.append(("cleanup", wf.id)))
        ready, gate = threading.Event(), threading.Event()

        def body() -> None:
            with term.workflow("jobs"):
                ready.set()
                assert gate.wait(WAIT * 2)

        job = jobs.start(body)
        assert ready.wait(WAIT)
        try:
            assert S.KILLED == term.kill("jobs", by=ADMIN).wait(WAIT)
        finally:
            gate.set()
        job.result()
        assert [("forced", "jobs"), ("cleanup", "jobs")] == seen

    @pytest.mark.parametrize("force", [True, False])
    def test_emergency_save_of_the_last_checkpoint(
        self, make_term: TermFactory, jobs: Jobs, force: bool
    ) -> None:
        """The forced phase records the last checkpoint in an emergency_save event."""
        sink = MemorySink()
        term = make_term(phases=Phases(0.05 if not force else 30.0, 30.0), sink=sink)
        saved = event_seen(term, "emergency_save")
        ready, gate = threading.Event(), threading.Event()

        def body() -> None:
            with term.workflow("saver"):
                termsafe.checkpoint({"step": 3, "rows": [1, 2]})
                ready.set()
                assert gate.wait(WAIT)  # no cancellation point until released
                termsafe.checkpoint()

        job = jobs.start(body)
        assert ready.wait(WAIT)
        try:
            handle = term.kill("saver", by=ADMIN, reason="deploy", force=force)
            assert saved.wait(WAIT)
        finally:
            gate.set()
        job.result()
        assert S.TERMINATED == handle.wait(WAIT)
        [save] = Audit(term, sink).of("emergency_save", "saver")
        assert {"checkpoint": {"step": 3, "rows": [1, 2]}} == dict(save.details)
        assert "deploy" == save.reason

    def test_no_emergency_save_without_a_checkpoint(self, term: Terminator, audit: Audit) -> None:
        """A workflow that never checkpointed gets no emergency_save event."""
        with term.workflow("plain"):
            term.kill("plain", by=ADMIN, force=True)
            termsafe.checkpoint()
        assert [] == audit.of("emergency_save")
        assert ["forced"] == [e.details["phase"] for e in audit.of("kill_requested", "plain")]

    def test_get_unknown(self, term: Terminator) -> None:
        """get() of an unknown id raises WorkflowNotFound."""
        with pytest.raises(WorkflowNotFound, match="'nobody'"):
            term.get("nobody")


# -- the stateful test -----------------------------------------------------------------

PRINCIPALS = [
    Principal("alice"),
    Principal("bob", roles=("admin",)),
    Principal("carol", roles=("team-lead",), teams=("t1",)),
    Principal("mallory"),
    Principal("eve", roles=("admin", "read-only")),
    Principal("ext", kind="external", roles=("admin",)),
    Principal("flow", kind="workflow"),
    Principal("cron", kind="system"),
    Principal("janitor", kind="system"),
]


def permitted(principal: Principal, owner: str, team: str) -> bool:
    """The permission model of DESIGN.md, written independently of the code under test."""
    if principal.kind in ("external", "workflow") or "read-only" in principal.roles:
        return False
    if principal.kind == "system":
        return principal.id == "janitor"  # the only one with a registered policy
    if "admin" in principal.roles or principal.id == owner:
        return True
    return "team-lead" in principal.roles and team in principal.teams


#: The grace of the machine's critical sections.
GRACE = 0.15


class Command:
    def __init__(self, op: str) -> None:
        self.op = op
        self.outcome = ""
        self.done = threading.Event()

    def finish(self, outcome: str) -> None:
        self.outcome = outcome
        self.done.set()


class Worker:
    """A thread workflow that loops on termsafe.sleep and obeys commands from the machine."""

    def __init__(self, term: Terminator, wid: str, owner: str, team: str, hooks: int) -> None:
        self.term = term
        self.id = wid
        self.owner = owner
        self.team = team
        self.hooks = hooks
        self.log: list[int] = []
        self.open = 0  # sections the machine knows to be open
        self.error: BaseException | None = None
        self.cut_in_section: float | None = None  # when a kill cut an open section
        self.ready = threading.Event()
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.exited = False
        self.wf: Workflow | None = None
        self.thread = threading.Thread(target=self._run, name=f"machine-{wid}", daemon=True)

    @property
    def workflow(self) -> Workflow:
        assert self.wf is not None
        return self.wf

    def submit(self, op: str) -> str:
        """Have the worker run ``op``; return ``ok``, ``raised`` or ``dropped``."""
        command = Command(op)
        with self.lock:
            if self.exited:
                return "dropped"
            self.commands.put(command)
        assert command.done.wait(WAIT)
        return command.outcome

    def _run(self) -> None:
        try:
            with self.term.workflow(self.id, owner=self.owner, team=self.team) as wf:
                self.wf = wf
                for n in range(self.hooks):
                    register = termsafe.on_cleanup if n % 2 == 0 else termsafe.on_rollback
                    register(lambda n=n: self.log.append(n))  # type: ignore[misc]
                self.ready.set()
                self._loop()
        except BaseException as exc:  # the workflow absorbs its own kill: nothing gets here
            self.error = exc
        finally:
            with self.lock:
                self.exited = True
                while not self.commands.empty():
                    self.commands.get().finish("dropped")
            self.ready.set()

    def _loop(self) -> None:
        opened: list[CriticalSection] = []
        current: Command | None = None
        try:
            while True:
                try:
                    current = self.commands.get_nowait()
                except queue.Empty:
                    current = None
                    termsafe.sleep(0.002)
                    continue
                if current.op == "open":
                    section = critical_section("step")
                    section.__enter__()
                    opened.append(section)
                elif current.op == "close":
                    opened.pop().__exit__(None, None, None)
                else:  # finish
                    while opened:
                        opened.pop().__exit__(None, None, None)
                    current.finish("ok")
                    return
                current.finish("ok")
                current = None
        except BaseException as exc:
            if current is not None:
                current.finish("raised")
            elif opened:
                self.cut_in_section = time.monotonic()
            while opened:
                opened.pop().__exit__(type(exc), exc, exc.__traceback__)
            raise


class TerminatorMachine(RuleBasedStateMachine):
    """Workflows start, open and close sections, finish, and are killed by anyone."""

    workers = Bundle("workers")

    def __init__(self) -> None:
        super().__init__()
        self.sink = MemorySink()
        self.term = Terminator(phases=Phases(0.2, 0.2), sink=self.sink, hook_timeout=WAIT)
        self.term.register_section_kind("step", GRACE)
        self.term.register_policy("janitor", lambda wf, p: True)
        self.all: list[Worker] = []
        self.handles: list[KillHandle] = []
        self.terminal_seen: dict[str, WorkflowState] = {}
        self.kill_at: dict[str, float] = {}

    @initialize(
        target=workers,
        owner=st.sampled_from(["alice", "zed"]),
        team=st.sampled_from(["t1", "t2"]),
        hooks=st.integers(min_value=0, max_value=4),
    )
    def first(self, owner: str, team: str, hooks: int) -> Worker:
        return self._spawn(owner, team, hooks)

    @precondition(lambda self: len(self.all) < 4)
    @rule(
        target=workers,
        owner=st.sampled_from(["alice", "zed"]),
        team=st.sampled_from(["t1", "t2"]),
        hooks=st.integers(min_value=0, max_value=4),
    )
    def start(self, owner: str, team: str, hooks: int) -> Worker:
        return self._spawn(owner, team, hooks)

    def _spawn(self, owner: str, team: str, hooks: int) -> Worker:
        worker = Worker(self.term, f"w{len(self.all)}", owner, team, hooks)
        self.all.append(worker)
        worker.thread.start()
        assert worker.ready.wait(WAIT)
        assert worker.error is None
        return worker

    @rule(worker=workers)
    def open_section(self, worker: Worker) -> None:
        pending = worker.workflow.kill is not None
        nested = worker.open > 0
        outcome = worker.submit("open")
        if outcome == "ok":
            # A section nested in the one a kill waits for finishes that work;
            # anything else opening while a kill is pending is new work.
            assert not pending or nested, "a section opened although a kill was pending"
            worker.open += 1
        else:
            assert pending or outcome == "dropped", "opening a section raised without a kill"
            worker.open = 0

    @rule(worker=workers)
    def close_section(self, worker: Worker) -> None:
        if not worker.open or not worker.thread.is_alive():
            return
        pending = worker.workflow.kill is not None
        outcome = worker.submit("close")
        if not pending:
            assert "ok" == outcome
        elif worker.open == 1:
            assert outcome in ("raised", "dropped"), "the outermost section let a kill pass"
        worker.open = worker.open - 1 if outcome == "ok" else 0

    @rule(worker=workers)
    def finish(self, worker: Worker) -> None:
        if not worker.thread.is_alive():
            return
        pending = worker.workflow.kill is not None
        outcome = worker.submit("finish")
        worker.thread.join(WAIT)
        assert not worker.thread.is_alive()
        worker.open = 0
        if not pending:
            assert "ok" == outcome
            assert S.COMPLETED == worker.workflow.state

    @rule(worker=workers, who=st.sampled_from(PRINCIPALS), force=st.booleans())
    def kill(self, worker: Worker, who: Principal, force: bool) -> None:
        wf = worker.workflow
        allowed = permitted(who, worker.owner, worker.team)
        settled = not worker.thread.is_alive() and wf.state.is_terminal
        asked = time.monotonic()
        try:
            handle = self.term.kill(worker.id, by=who, reason="machine", force=force)
        except KillRefused as exc:
            refusal: str | None = exc.decision.reason
        else:
            refusal = None
        if refusal is not None:
            if allowed:
                assert "Cannot kill finished workflow" == refusal
                assert wf.state.is_terminal
            else:
                assert "Insufficient permissions" == refusal
            return
        assert allowed, f"{who} may not kill {worker.id}"
        assert not settled, "a finished workflow accepted a kill"
        self.kill_at.setdefault(worker.id, asked)
        self.handles.append(handle)
        if not worker.open:
            assert handle.wait(WAIT).is_terminal

    @rule()
    def escalate(self) -> None:
        self.term.escalate()

    @invariant()
    def terminal_is_terminal(self) -> None:
        for worker in self.all:
            if worker.wf is None:
                continue
            state = worker.wf.state
            seen = self.terminal_seen.get(worker.id)
            if seen is not None:
                assert seen == state, f"{worker.id} left terminal state {seen}"
            elif state.is_terminal:
                self.terminal_seen[worker.id] = state

    @invariant()
    def hooks_once_and_lifo(self) -> None:
        for worker in self.all:
            log = list(worker.log)
            assert sorted(set(log), reverse=True) == log

    @invariant()
    def sections_get_their_grace(self) -> None:
        for worker in self.all:
            if worker.cut_in_section is not None:
                waited = worker.cut_in_section - self.kill_at[worker.id]
                assert waited >= GRACE, f"{worker.id}: section cut {waited:.3f}s after the kill"

    @invariant()
    def workers_healthy(self) -> None:
        for worker in self.all:
            assert worker.error is None

    def teardown(self) -> None:
        try:
            for worker in self.all:
                if worker.thread.is_alive():
                    asked = time.monotonic()
                    # A worker may finish on its own meanwhile: then kill() refuses it.
                    with contextlib.suppress(KillRefused):
                        self.handles.append(self.term.kill(worker.id, by=ADMIN, reason="teardown"))
                        self.kill_at.setdefault(worker.id, asked)
            for handle in self.handles:
                assert handle.wait(WAIT).is_terminal
            self.sections_get_their_grace()
            finals: dict[str, WorkflowState] = {}
            for worker in self.all:
                worker.thread.join(WAIT)
                assert not worker.thread.is_alive()
                state = worker.workflow.state
                assert state.is_terminal
                finals[worker.id] = state
                everything = list(range(worker.hooks))[::-1]
                expected = [n for n in everything if n % 2 == 0 or state is not S.COMPLETED]
                assert expected == worker.log
            assert self.term.flush(WAIT)
            for wid, final in finals.items():
                events = [e for e in self.sink.events if e.workflow_id == wid]
                finished = [i for i, e in enumerate(events) if e.type == "workflow_finished"]
                assert 1 == len(finished)
                after = [(e.type, e.state) for e in events[finished[0] :]]
                assert {final.value} == {state for _, state in after}, after
        finally:
            for worker in self.all:
                worker.thread.join(WAIT)
            self.term.close()


TestTerminatorMachine = TerminatorMachine.TestCase
TestTerminatorMachine.settings = settings(
    max_examples=15,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TestBatchedDelivery:
    def test_flush_cuts_a_linger_short(
        self, make_term: TermFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """flush() wakes a dispatcher that lingers for more events instead of waiting it out."""
        monkeypatch.setattr(termsafe._events, "LINGER", 60.0)
        term = make_term()
        sink = term.sink
        assert isinstance(sink, termsafe.MemorySink)
        with term.workflow("first"):
            pass
        assert term.flush(WAIT)  # delivered; the dispatcher now lingers for 60 s
        with term.workflow("second"):
            pass
        assert term.flush(WAIT)
        assert 2 == len([e for e in sink.events if e.type == "workflow_finished"])


class TestFlushFromListener:
    def test_listener_that_flushes_does_not_deadlock(self, make_term: TermFactory) -> None:
        """A listener calling flush() on the audit thread gets False, not a wait on itself."""
        term = make_term()
        answers: list[bool] = []
        done = threading.Event()

        def listener(event: termsafe.AuditEvent) -> None:
            if event.type == "workflow_finished":
                answers.append(term.flush())  # no timeout: waiting on itself would hang
                done.set()

        term.add_event_listener(listener)
        with term.workflow("w"):
            pass
        assert done.wait(WAIT)
        assert [False] == answers
        assert term.flush(WAIT)

    def test_flush_waits_for_events_a_listener_emits(self, make_term: TermFactory) -> None:
        """flush() also covers events the dispatcher's own callbacks emitted while draining."""

        class SlowForSecond(termsafe.MemorySink):
            def emit(self, event: termsafe.AuditEvent) -> None:
                if event.workflow_id == "second":
                    # Widens the window only: without the wait in flush() the
                    # caller looks long before this returns; with it, after.
                    time.sleep(0.2)
                super().emit(event)

        sink = SlowForSecond()
        term = make_term(sink=sink)
        started = threading.Event()
        release = threading.Event()

        def listener(event: termsafe.AuditEvent) -> None:
            if event.type == "workflow_started" and event.workflow_id == "first":
                started.set()
                assert release.wait(WAIT)  # hold the dispatcher until flush() queued its marker
                with term.workflow("second"):  # emitted from the dispatcher, behind the marker
                    pass

        term.add_event_listener(listener)
        with term.workflow("first"):
            pass
        assert started.wait(WAIT)
        seen: list[tuple[bool, list[tuple[str, str | None]]]] = []

        def flusher() -> None:
            ok = term.flush(WAIT)
            seen.append((ok, [(e.type, e.workflow_id) for e in sink.events]))

        thread = threading.Thread(target=flusher)
        thread.start()
        # The marker must be queued before the listener is released.
        deadline = time.monotonic() + WAIT
        while not any(isinstance(i, threading.Event) for i in list(term._pipe._queue)):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        release.set()
        thread.join(WAIT)
        assert 1 == len(seen)
        ok, delivered = seen[0]
        assert ok
        assert ("workflow_finished", "second") in delivered

    def test_listener_can_kill_and_wait(self, make_term: TermFactory) -> None:
        """A listener that kills a workflow and waits for it gets its final state, no deadlock."""
        term = make_term(phases=termsafe.Phases(5, 5))
        entered = threading.Event()
        answers: list[termsafe.WorkflowState] = []
        done = threading.Event()
        admin = termsafe.Principal("ops", roles=("admin",))

        def victim() -> None:
            with term.workflow("victim"):
                entered.set()
                while True:
                    termsafe.sleep(0.01)

        def listener(event: termsafe.AuditEvent) -> None:
            if event.type == "workflow_started" and event.workflow_id == "trigger":
                answers.append(term.kill("victim", by=admin, reason="cascade").wait(WAIT))
                done.set()

        thread = threading.Thread(target=victim)
        thread.start()
        assert entered.wait(WAIT)
        term.add_event_listener(listener)
        with term.workflow("trigger"):
            pass
        assert done.wait(WAIT)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert [termsafe.WorkflowState.TERMINATED] == answers


class TestKillHandleWait:
    def test_wait_returns_after_the_final_event_reached_the_sink(
        self, make_term: TermFactory
    ) -> None:
        """Once wait() returns, the workflow's events up to workflow_finished are in the sink."""
        term = make_term(phases=termsafe.Phases(5, 5))
        entered = threading.Event()
        admin = termsafe.Principal("ops", roles=("admin",))

        def body() -> None:
            with term.workflow("w"):
                termsafe.on_cleanup(lambda: None)
                entered.set()
                while True:
                    termsafe.sleep(0.01)

        thread = threading.Thread(target=body)
        thread.start()
        assert entered.wait(WAIT)
        handle = term.kill("w", by=admin, reason="r")
        assert termsafe.WorkflowState.TERMINATED == handle.wait(WAIT)
        assert handle.done
        sink = term.sink
        assert isinstance(sink, termsafe.MemorySink)
        types = [e.type for e in sink.events if e.workflow_id == "w"]  # no flush() here
        assert "workflow_finished" == types[-1]
        assert {"kill_requested", "hook_ran"} <= set(types)
        thread.join(WAIT)


class TestCloseWaitsForTakenOverHooks:
    def test_close_lets_system_phase_hooks_finish(self, make_term: TermFactory) -> None:
        """close() waits (within its timeout) for hooks the system phase is running."""
        term = make_term(phases=termsafe.Phases(0.05, 0.05))
        entered = threading.Event()
        stuck = threading.Event()
        hook_started = threading.Event()
        release = threading.Event()
        hook_finished = threading.Event()

        def cleanup() -> None:
            hook_started.set()
            assert release.wait(WAIT)
            hook_finished.set()

        def body() -> None:
            with term.workflow("w"):
                termsafe.on_cleanup(cleanup)
                entered.set()
                stuck.wait(WAIT)  # no cancellation point: the system phase takes over

        thread = threading.Thread(target=body)
        thread.start()
        try:
            assert entered.wait(WAIT)
            admin = termsafe.Principal("ops", roles=("admin",))
            handle = term.kill("w", by=admin)
            assert hook_started.wait(WAIT)
            # Released only after close() has begun; a close() that did not
            # wait would return before the hook finished.
            releaser = threading.Timer(0.2, release.set)
            releaser.start()
            term.close(timeout=WAIT)
            assert hook_finished.is_set()
            assert termsafe.WorkflowState.KILLED == handle.state
            releaser.join(WAIT)
        finally:
            release.set()
            stuck.set()
            thread.join(WAIT)
        assert not thread.is_alive()


@contextlib.contextmanager
def switch_interval(seconds: float) -> Any:
    """Set the interpreter's switch interval for the block; restore it after."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


class TestKillStorm:
    """``kill_all`` and ``terminate_all`` run as one storm (see ``_terminator._storm``)."""

    def test_interval_raised_while_killing_then_restored(self, term: Terminator) -> None:
        """kill_all holds the storm interval while it kills and restores the old one after."""
        seen: list[float] = []

        def policy(wf: Workflow, p: Principal) -> bool:
            seen.append(sys.getswitchinterval())
            return True

        term.register_policy("reaper", policy)
        with switch_interval(0.004), term.workflow("w1") as w1:
            handles = term.kill_all(by=Principal("reaper", kind="system"))
            assert 0.004 == pytest.approx(sys.getswitchinterval(), abs=1e-5)
            termsafe.checkpoint()
        assert [w1.id] == [h.workflow_id for h in handles]
        assert [STORM_SWITCH_INTERVAL] == pytest.approx(seen, abs=1e-5)
        assert S.TERMINATED == w1.state

    def test_terminate_all_too(self, term: Terminator) -> None:
        """terminate_all raises the interval the same way (seen from a forced action)."""
        seen: list[float] = []
        term.add_forced_action(lambda wf: seen.append(sys.getswitchinterval()))
        with switch_interval(0.004), term.workflow("w2") as w2:
            term.terminate_all("host stopping", force=True)
            assert 0.004 == pytest.approx(sys.getswitchinterval(), abs=1e-5)
            termsafe.checkpoint()
        assert [STORM_SWITCH_INTERVAL] == pytest.approx(seen, abs=1e-5)
        assert S.TERMINATED == w2.state

    def test_longer_interval_kept(self, term: Terminator) -> None:
        """An interval already longer than the storm's is not shortened."""
        seen: list[float] = []
        term.add_forced_action(lambda wf: seen.append(sys.getswitchinterval()))
        with switch_interval(0.2), term.workflow("w3"):
            term.terminate_all("host stopping", force=True)
            assert 0.2 == pytest.approx(sys.getswitchinterval(), abs=1e-5)
        assert [0.2] == pytest.approx(seen, abs=1e-5)

    def test_changed_meanwhile_is_left_alone(self, term: Terminator) -> None:
        """If someone set the interval during the storm, the storm does not undo it."""

        def policy(wf: Workflow, p: Principal) -> bool:
            sys.setswitchinterval(0.123)
            return True

        term.register_policy("tuner", policy)
        with switch_interval(0.004), term.workflow("w4"):
            term.kill_all(by=Principal("tuner", kind="system"))
            assert 0.123 == pytest.approx(sys.getswitchinterval(), abs=1e-5)

    def test_nested_storms_restore_once(self, make_term: TermFactory) -> None:
        """A storm inside a storm leaves the interval raised until the outer one ends."""
        outer, inner = make_term(), make_term()
        after_inner: list[float] = []

        def policy(wf: Workflow, p: Principal) -> bool:
            inner.terminate_all("nested")
            after_inner.append(sys.getswitchinterval())
            return True

        outer.register_policy("nester", policy)
        with switch_interval(0.004), outer.workflow("o"), inner.workflow("i") as i:
            outer.kill_all(by=Principal("nester", kind="system"))
            assert 0.004 == pytest.approx(sys.getswitchinterval(), abs=1e-5)
            assert i.kill_pending
        assert [STORM_SWITCH_INTERVAL] == pytest.approx(after_inner, abs=1e-5)

    def test_child_forked_during_a_storm(self, term: Terminator) -> None:
        """A child forked inside a storm starts outside it and runs storms of its own.

        The child goes on through the rest of the parent's storm (its exit must
        not count against the child), then checks the interval: the old one
        right after the fork and after that storm, the storm's during a storm
        of its own, the old one after it.
        """
        parent = os.getpid()
        r, w = os.pipe()
        pids: list[int] = []
        at_fork: list[float] = []

        def policy(wf: Workflow, p: Principal) -> bool:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                pids.append(os.fork())
            if pids[-1] == 0:
                at_fork.append(sys.getswitchinterval())  # still inside the storm here
            return True

        term.register_policy("forker", policy)
        try:
            with switch_interval(0.004), term.workflow("w5"):
                term.kill_all(by=Principal("forker", kind="system"))
                if os.getpid() != parent:
                    self._child_checks(w, at_fork[0])
                termsafe.checkpoint()
        finally:
            if os.getpid() != parent:
                os._exit(1)  # never run the parent's test session in the child
        os.close(w)
        [pid] = pids
        ready, _, _ = select.select([r], [], [], WAIT)
        answer = os.read(r, 200).decode() if ready else "no answer"
        os.close(r)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert f"0.004 0.004 {STORM_SWITCH_INTERVAL:.3f} 0.004" == answer

    @staticmethod
    def _child_checks(w: int, at_fork: float) -> None:
        """In the forked child: report the interval around a storm of its own; exit."""
        msg = "child failed"
        try:
            after_fork = sys.getswitchinterval()
            seen: list[float] = []
            own = Terminator()
            own.add_forced_action(lambda wf: seen.append(sys.getswitchinterval()))
            ctx, cm = contextvars.Context(), own.workflow("x")
            ctx.run(cm.__enter__)
            own.terminate_all("child storm", force=True)
            msg = f"{at_fork:.3f} {after_fork:.3f} {seen[0]:.3f} {sys.getswitchinterval():.3f}"
        except BaseException as exc:
            msg = f"child failed: {exc!r}"
        finally:
            os.write(w, msg.encode())
            os._exit(0)

    @staticmethod
    def _enter(term: Terminator, *ids: str) -> list[tuple[contextvars.Context, Any, Workflow]]:
        """Enter workflows without a thread each: each id nests in the one before it if
        it starts with "/" (a child), else gets a context of its own."""
        entered: list[tuple[contextvars.Context, Any, Workflow]] = []
        ctx = contextvars.Context()
        for wid in ids:
            if not wid.startswith("/"):
                ctx = contextvars.Context()
            cm = term.workflow(wid.lstrip("/"))
            entered.append((ctx, cm, ctx.run(cm.__enter__)))
        return entered

    @staticmethod
    def _unwind(entered: list[tuple[contextvars.Context, Any, Workflow]]) -> None:
        """Leave the workflows ``_enter`` entered, innermost first, as a kill would."""
        for ctx, cm, wf in reversed(entered):
            if not is_terminal(wf.state):
                exc = termsafe.Terminated(wf.id, "storm")
                with contextlib.suppress(termsafe.Terminated):
                    ctx.run(cm.__exit__, type(exc), exc, None)

    def _hold_until_killed(
        self, term: Terminator, locked_wf: Workflow, other: str
    ) -> tuple[threading.Thread, threading.Event, list[str]]:
        """Hold ``locked_wf``'s lock from a thread until ``other``'s kill is delivered.

        The holder gives up after a deadline, so a storm that waits on the lock
        first fails the test instead of hanging it.
        """
        locked, seen = threading.Event(), threading.Event()
        said: list[str] = []

        def listen(event: termsafe.AuditEvent) -> None:
            if event.type == "kill_requested" and event.workflow_id == other:
                seen.set()

        term.add_event_listener(listen)

        def holder() -> None:
            with locked_wf.lock:
                locked.set()
                said.append("released" if seen.wait(WAIT) else "gave up")

        thread = threading.Thread(target=holder)
        thread.start()
        assert locked.wait(WAIT)
        return thread, seen, said

    def test_workflow_with_busy_lock_is_killed_last(self, term: Terminator, audit: Audit) -> None:
        """A workflow whose lock is held is killed after the rest, not waited for first.

        "held" is registered first, so a storm that blocked on its lock would
        reach "free" only once the lock is released; the holder releases it
        only once the kill of "free" was delivered.
        """
        entered = self._enter(term, "held", "free")
        held = entered[0][2]
        thread, seen, said = self._hold_until_killed(term, held, "free")
        try:
            handles = term.kill_all(by=ADMIN, reason="storm")
        finally:
            seen.set()
            thread.join(WAIT)
            self._unwind(entered)
        assert ["released"] == said
        assert ["held", "free"] == [h.workflow_id for h in handles]
        assert {S.TERMINATED} == {wf.state for _, _, wf in entered}
        assert ["free", "held"] == [e.workflow_id for e in audit.of("kill_requested")]

    def test_children_wait_with_their_parent(self, term: Terminator, audit: Audit) -> None:
        """The child of a workflow left to the end is killed by its parent's cascade, once."""
        entered = self._enter(term, "p", "/c", "w")
        thread, seen, said = self._hold_until_killed(term, entered[0][2], "w")
        try:
            handles = term.terminate_all("host stopping")
        finally:
            seen.set()
            thread.join(WAIT)
            self._unwind(entered)
        assert ["released"] == said
        assert ["p", "w"] == [h.workflow_id for h in handles]
        [child_kill] = audit.of("kill_requested", "c")
        assert "parent workflow 'p' killed: host stopping" == child_kill.reason
        assert ["w", "p", "c"] == [e.workflow_id for e in audit.of("kill_requested")]

    def test_a_workflow_that_finished_during_the_storm_is_skipped(
        self, term: Terminator, audit: Audit
    ) -> None:
        """terminate_all skips, without a refusal, a workflow that ended before it got there."""
        entered = self._enter(term, "first", "second")
        ctx, cm, second = entered[1]

        def end_second(wf: Workflow) -> None:
            if wf.id == "first":
                ctx.run(cm.__exit__, None, None, None)  # "second" ends on its own

        term.add_forced_action(end_second)
        try:
            handles = term.terminate_all("host stopping", force=True)
        finally:
            self._unwind(entered)
        assert ["first"] == [h.workflow_id for h in handles]
        assert S.COMPLETED == second.state
        assert [] == audit.of("kill_refused")


class TestMemoryFreed:
    """What a finished workflow held is freed once it is out of the history."""

    class Payload:
        """Something a hook holds on to (weak-referenceable)."""

    def _run(self, term: Terminator, kill: bool) -> list[weakref.ref[Any]]:
        payload = self.Payload()
        with term.workflow("done") as wf:
            termsafe.on_cleanup(lambda: payload)  # runs at the exit: its watchdog is armed
            if kill:
                term.kill("done", by=ADMIN)  # its forced-phase deadline is 30 s away
                termsafe.checkpoint()
        return [weakref.ref(wf), weakref.ref(payload)]

    @pytest.mark.parametrize("kill", [False, True])
    def test_workflow_and_hooks_freed_before_their_deadlines(
        self, make_term: TermFactory, kill: bool
    ) -> None:
        """Neither a pending phase deadline nor a hook watchdog keeps a finished workflow alive."""
        term = make_term(history=0)
        refs = self._run(term, kill)
        assert term.flush(WAIT)
        gc.collect()
        assert [None, None] == [ref() for ref in refs]
        assert 0 == len(term)
