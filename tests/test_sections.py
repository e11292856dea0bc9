"""Tests for termsafe._sections: deferral, nesting, grace expiry, shielding, kinds."""

from __future__ import annotations

import math
import re
import threading
import time

import anyio
import pytest
from conftest import WAIT, Audit, Jobs, TermFactory

import termsafe
from termsafe import (
    ConfigurationError,
    Decision,
    ForcedTermination,
    InvalidArgumentType,
    MemorySink,
    Phases,
    Principal,
    Terminated,
    Terminator,
    UnknownSectionKind,
    WorkflowState,
    critical_section,
)

S = WorkflowState
ADMIN = Principal("root", roles=("admin",))
BACKENDS = ["asyncio", "trio"]


def event_seen(term: Terminator, type_: str) -> threading.Event:
    """An Event set when ``term`` emits an audit event of ``type_``."""
    seen = threading.Event()
    term.add_event_listener(lambda e: seen.set() if e.type == type_ else None)
    return seen


class TestDeferral:
    def test_kill_waits_for_section(self, term: Terminator, audit: Audit, jobs: Jobs) -> None:
        """A kill inside a section waits for it and lands as it ends, audited as deferred."""
        inside, go = threading.Event(), threading.Event()
        trace: list[str] = []

        def body() -> None:
            with term.workflow("defer"):
                with critical_section("db"):
                    inside.set()
                    assert go.wait(WAIT)
                    termsafe.checkpoint()  # a deferred kill does not land inside
                    trace.append("section finished")
                trace.append("after section")

        job = jobs.start(body)
        assert inside.wait(WAIT)
        assert Decision(False, "Workflow in critical section") == term.can_kill("defer", ADMIN)
        handle = term.kill("defer", by=ADMIN, reason="maintenance")
        assert handle.deferred
        assert S.TERMINATING == handle.state
        go.set()
        assert S.TERMINATED == handle.wait(WAIT)
        job.result()
        assert ["section finished"] == trace
        types = audit.types("defer")
        assert types.index("kill_requested") < types.index("kill_deferred")
        assert types.index("kill_deferred") < types.index("kill_effective")
        [deferred] = audit.of("kill_deferred")
        assert [{"kind": "db", "grace": 10.0}] == deferred.details["sections"]
        [effective] = audit.of("kill_effective")
        assert "db" == effective.details["after_section"]
        assert "maintenance" == effective.reason

    def test_kill_outside_section_not_deferred(self, term: Terminator, audit: Audit) -> None:
        """A kill outside any section is not deferred and lands at the next checkpoint."""
        with term.workflow("nodefer") as wf:
            handle = term.kill("nodefer", by=ADMIN)
            with pytest.raises(Terminated) as info:
                termsafe.checkpoint()
            raise info.value
        assert not handle.deferred
        assert S.TERMINATED == wf.state
        assert "kill_deferred" not in audit.types()

    def test_nested_sections(self, term: Terminator, audit: Audit) -> None:
        """With nested sections the kill takes effect when the outermost one ends."""
        trace: list[str] = []
        with term.workflow("nested") as wf:
            with critical_section("git"):
                with critical_section("db"):
                    term.kill("nested", by=ADMIN)
                    termsafe.checkpoint()
                trace.append("after inner")
                termsafe.checkpoint()
                trace.append("outer finishing")
            trace.append("after outer")
        assert ["after inner", "outer finishing"] == trace
        assert S.TERMINATED == wf.state
        [effective] = audit.of("kill_effective")
        assert "git" == effective.details["after_section"]
        [deferred] = audit.of("kill_deferred")
        assert 30.0 == deferred.details["grace_deadline_in"]

    def test_section_nested_in_a_deferring_section_may_open(
        self, term: Terminator, audit: Audit
    ) -> None:
        """A section opened inside the section a kill waits for is part of finishing its work."""
        trace: list[str] = []
        with term.workflow("commit-inside") as wf:
            with critical_section("fs"):
                term.kill("commit-inside", by=ADMIN)
                with critical_section("db"):  # e.g. a transaction's COMMIT
                    trace.append("inner committed")
                trace.append("outer finishing")
            trace.append("after outer")
        assert ["inner committed", "outer finishing"] == trace
        assert S.TERMINATED == wf.state
        assert [] == audit.of("section_refused")

    def test_entering_section_while_kill_pending(self, term: Terminator, audit: Audit) -> None:
        """Entering a section while a kill is pending raises Terminated: no new work starts."""
        trace: list[str] = []
        with term.workflow("late") as wf:
            term.kill("late", by=ADMIN, reason="stop")
            with pytest.raises(Terminated) as info, critical_section("fs"):
                trace.append("section body")
            assert "stop" == info.value.reason
            assert not wf.in_critical_section
            raise info.value
        assert [] == trace
        assert S.TERMINATED == wf.state
        [refused] = audit.of("section_refused")
        assert "fs" == refused.details["kind"]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_entering_section_while_kill_pending(
        self, make_term: TermFactory, backend: str
    ) -> None:
        """An async section entered after the kill raises Terminated and never runs its body."""
        term = make_term()
        trace: list[str] = []

        async def main() -> WorkflowState:
            async with term.workflow("alate") as wf:
                term.kill("alate", by=ADMIN)
                async with critical_section("db"):
                    trace.append("section body")
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert [] == trace

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_deferral(self, make_term: TermFactory, backend: str) -> None:
        """An async section is shielded from the kill and finishes; the kill lands after it."""
        sink = MemorySink()
        term = make_term(sink=sink)
        trace: list[str] = []

        async def main() -> WorkflowState:
            async with term.workflow("adefer") as wf:
                async with critical_section("db"):
                    term.kill("adefer", by=ADMIN)
                    await anyio.sleep(0.05)
                    trace.append("section finished")
                trace.append("after section")
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert ["section finished"] == trace
        types = Audit(term, sink).types()
        assert types.index("kill_deferred") < types.index("kill_effective")


class TestGraceExpiry:
    def test_thread_section_cut_at_checkpoint(
        self, term: Terminator, audit: Audit, jobs: Jobs
    ) -> None:
        """When the grace runs out a thread section's next checkpoint raises ForcedTermination."""
        inside = threading.Event()
        ran: list[str] = []
        caught: list[tuple[type[BaseException], float]] = []

        def body() -> None:
            with term.workflow("cut"):
                termsafe.on_rollback(lambda: ran.append("rollback"))
                try:
                    with critical_section("db", grace=0.3):
                        inside.set()
                        while True:
                            termsafe.sleep(0.01)
                except BaseException as exc:
                    caught.append((type(exc), time.monotonic()))
                    raise

        job = jobs.start(body)
        assert inside.wait(WAIT)
        requested = time.monotonic()
        handle = term.kill("cut", by=ADMIN)
        assert S.TERMINATED == handle.wait(WAIT)
        job.result()
        [(exc_type, when)] = caught
        assert ForcedTermination is exc_type
        assert when - requested >= 0.3
        assert ["rollback"] == ran
        [expired] = audit.of("grace_expired")
        assert {"kind": "db", "grace": 0.3} == dict(expired.details)

    def test_grace_measured_from_kill_request(self, term: Terminator, jobs: Jobs) -> None:
        """A section open longer than its grace before the kill still gets the full grace after."""
        inside, killed = threading.Event(), threading.Event()
        caught: list[tuple[type[BaseException], float]] = []
        checkpoints_after_kill: list[float] = []

        def body() -> None:
            with term.workflow("fromkill"), critical_section("api", grace=0.3):
                opened = time.monotonic()
                while time.monotonic() - opened < 0.5:
                    termsafe.sleep(0.01)
                inside.set()
                assert killed.wait(WAIT)
                try:
                    termsafe.checkpoint()
                    checkpoints_after_kill.append(time.monotonic())
                    while True:
                        termsafe.sleep(0.01)
                except BaseException as exc:
                    caught.append((type(exc), time.monotonic()))
                    raise

        job = jobs.start(body)
        assert inside.wait(WAIT)
        requested = time.monotonic()
        handle = term.kill("fromkill", by=ADMIN)
        killed.set()
        assert S.TERMINATED == handle.wait(WAIT)
        job.result()
        assert 1 == len(checkpoints_after_kill)
        [(exc_type, when)] = caught
        assert ForcedTermination is exc_type
        assert when - requested >= 0.3

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_section_shield_cancelled(self, make_term: TermFactory, backend: str) -> None:
        """When an async section's grace runs out its shield is cancelled and rollback runs."""
        term = make_term()
        ran: list[str] = []
        caught: list[tuple[type[BaseException], float]] = []
        requested: list[float] = []

        async def main() -> WorkflowState:
            async with term.workflow("acut") as wf:
                termsafe.on_rollback(lambda: ran.append("rollback"))
                try:
                    async with critical_section("db", grace=0.3):
                        requested.append(time.monotonic())
                        term.kill("acut", by=ADMIN)
                        await anyio.sleep(WAIT)
                        ran.append("section finished")
                except BaseException as exc:
                    caught.append((type(exc), time.monotonic()))
                    raise
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert ["rollback"] == ran
        [(exc_type, when)] = caught
        assert ForcedTermination is exc_type
        assert when - requested[0] >= 0.3

    def test_forced_phase_does_not_cut_section(self, make_term: TermFactory, jobs: Jobs) -> None:
        """The forced phase (force=True) still leaves a section its grace."""
        term = make_term(phases=Phases(0.05, 30))
        inside = threading.Event()
        caught: list[tuple[type[BaseException], float]] = []

        def body() -> None:
            with term.workflow("forcecut"):
                try:
                    with critical_section("db", grace=0.3):
                        inside.set()
                        while True:
                            termsafe.sleep(0.01)
                except BaseException as exc:
                    caught.append((type(exc), time.monotonic()))
                    raise

        job = jobs.start(body)
        assert inside.wait(WAIT)
        requested = time.monotonic()
        handle = term.kill("forcecut", by=ADMIN, force=True)
        assert S.TERMINATED == handle.wait(WAIT)
        job.result()
        [(exc_type, when)] = caught
        assert ForcedTermination is exc_type
        assert when - requested >= 0.3


class TestShielded:
    def test_suppresses_delivery(self, term: Terminator) -> None:
        """Inside shielded() a pending kill does not land; right after it, it does."""
        trace: list[str] = []
        with term.workflow("shield") as wf:
            term.kill("shield", by=ADMIN)
            with termsafe.shielded():
                termsafe.checkpoint()
                trace.append("committed")
            trace.append("after commit")
            termsafe.checkpoint()
            trace.append("not reached")
        assert ["committed", "after commit"] == trace
        assert S.TERMINATED == wf.state

    def test_survives_expired_grace(self, term: Terminator, jobs: Jobs) -> None:
        """A commit step inside a section whose grace ran out is still not cut."""
        expired = event_seen(term, "grace_expired")
        inside, killed = threading.Event(), threading.Event()
        trace: list[str] = []

        def body() -> None:
            with term.workflow("commit"), critical_section("db", grace=0.05):
                with termsafe.shielded():
                    inside.set()
                    assert killed.wait(WAIT)
                    termsafe.checkpoint()
                    termsafe.sleep(0.01)
                    trace.append("recorded")
                trace.append("after commit")
                termsafe.checkpoint()
                trace.append("not reached")

        job = jobs.start(body)
        assert inside.wait(WAIT)
        handle = term.kill("commit", by=ADMIN)
        assert expired.wait(WAIT)
        killed.set()
        assert S.TERMINATED == handle.wait(WAIT)
        job.result()
        assert ["recorded", "after commit"] == trace

    def test_outside_workflow(self) -> None:
        """shielded() outside a workflow is a plain block."""
        trace = []
        with termsafe.shielded():
            trace.append("ran")
        assert ["ran"] == trace


class TestKinds:
    def test_unknown_kind(self, term: Terminator) -> None:
        """An unknown kind raises UnknownSectionKind naming it and the known kinds."""
        with term.workflow("kinds") as wf:
            with pytest.raises(UnknownSectionKind) as info, critical_section("gti"):
                pass
            assert not wf.in_critical_section
        assert "gti" == info.value.kind
        assert ("api", "db", "fs", "git") == info.value.known
        assert "unknown critical section kind 'gti' (known: api, db, fs, git)" == str(info.value)

    def test_unknown_kind_from_terminator(self, term: Terminator) -> None:
        """Terminator.critical_section checks the kind at once."""
        with pytest.raises(UnknownSectionKind, match="'gti'"):
            term.critical_section("gti")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_unknown_kind_async(self, make_term: TermFactory, backend: str) -> None:
        """An async section of an unknown kind raises on entry as well."""
        term = make_term()

        async def main() -> None:
            async with term.workflow("akinds"):
                with pytest.raises(UnknownSectionKind, match="'gti'"):
                    async with critical_section("gti"):
                        pass

        anyio.run(main, backend=backend)

    @pytest.mark.parametrize("grace", [-1.0, -0.001, math.nan, math.inf])
    def test_bad_grace_value(self, grace: float) -> None:
        """A negative, NaN or infinite grace raises ConfigurationError naming the value."""
        with pytest.raises(ConfigurationError, match=re.escape(f"(got {grace!r})")):
            critical_section("db", grace=grace)

    @pytest.mark.parametrize("grace", ["10", True, [1]])
    def test_bad_grace_type(self, grace: object) -> None:
        """A grace that is not a number raises InvalidArgumentType naming the value."""
        with pytest.raises(InvalidArgumentType, match=re.escape(f"(got {grace!r})")):
            critical_section("db", grace=grace)  # type: ignore[arg-type]

    def test_bad_kind_type(self) -> None:
        """A kind that is not a string raises InvalidArgumentType naming it."""
        with pytest.raises(InvalidArgumentType, match="got 7"):
            critical_section(7)  # type: ignore[arg-type]

    def test_default_graces(self, term: Terminator) -> None:
        """The built-in kinds have the design's default graces."""
        with term.workflow("defaults"):
            graces = {}
            for kind in ("api", "db", "fs", "git"):
                with critical_section(kind) as section:
                    graces[kind] = section.grace
        assert {"api": 10.0, "db": 10.0, "fs": 10.0, "git": 30.0} == graces

    def test_custom_kind(self, make_term: TermFactory, jobs: Jobs) -> None:
        """A kind registered on a terminator works there, with its grace, and nowhere else."""
        sink = MemorySink()
        term = make_term(sink=sink)
        other = make_term()
        term.register_section_kind("payment", 0.2)
        inside = threading.Event()
        caught: list[type[BaseException]] = []

        def body() -> None:
            with term.workflow("pay"):
                try:
                    with critical_section("payment") as section:
                        assert 0.2 == section.grace
                        inside.set()
                        while True:
                            termsafe.sleep(0.01)
                except BaseException as exc:
                    caught.append(type(exc))
                    raise

        job = jobs.start(body)
        assert inside.wait(WAIT)
        assert S.TERMINATED == term.kill("pay", by=ADMIN).wait(WAIT)
        job.result()
        assert [ForcedTermination] == caught
        [deferred] = Audit(term, sink).of("kill_deferred")
        assert [{"kind": "payment", "grace": 0.2}] == deferred.details["sections"]
        with (
            other.workflow("elsewhere"),
            pytest.raises(UnknownSectionKind, match="'payment'"),
            critical_section("payment"),
        ):
            pass

    def test_override_builtin_grace(self, make_term: TermFactory) -> None:
        """section_grace and register_section_kind change a built-in kind's grace."""
        term = make_term(section_grace={"git": 60})
        term.register_section_kind("db", 1.5)
        with term.workflow("override"):
            with critical_section("git") as git:
                assert 60.0 == git.grace
            with critical_section("db") as db:
                assert 1.5 == db.grace
            with critical_section("db", grace=2) as explicit:
                assert 2.0 == explicit.grace

    @pytest.mark.parametrize("grace", [-1, math.nan])
    def test_register_bad_grace(self, term: Terminator, grace: float) -> None:
        """Registering a kind with a bad grace raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match=re.escape(f"(got {grace!r})")):
            term.register_section_kind("mq", grace)
        with pytest.raises(ConfigurationError, match=re.escape(f"(got {grace!r})")):
            Terminator(section_grace={"mq": grace}, sink=MemorySink())

    def test_register_bad_kind(self, term: Terminator) -> None:
        """Registering an empty or non-string kind is refused."""
        with pytest.raises(ConfigurationError):
            term.register_section_kind("", 1.0)
        with pytest.raises(InvalidArgumentType):
            term.register_section_kind(None, 1.0)  # type: ignore[arg-type]


class TestDecorator:
    def test_sync(self, term: Terminator) -> None:
        """A decorated function runs inside a section of its kind and keeps its name."""

        @critical_section("db")
        def step(x: int) -> tuple[int, bool]:
            wf = termsafe.current_workflow()
            assert wf is not None
            return x * 2, wf.in_critical_section

        with term.workflow("deco") as wf:
            assert (4, True) == step(2)
            assert not wf.in_critical_section
        assert "step" == step.__name__

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async(self, make_term: TermFactory, backend: str) -> None:
        """A decorated coroutine function runs inside a section and defers a kill."""
        term = make_term()
        trace: list[str] = []

        @critical_section("db")
        async def step() -> str:
            term.kill("adeco", by=ADMIN)
            await anyio.sleep(0.01)
            trace.append("step finished")
            return "done"

        async def main() -> WorkflowState:
            async with term.workflow("adeco") as wf:
                await step()
                trace.append("after step")
            return wf.state

        assert S.TERMINATED == anyio.run(main, backend=backend)
        assert ["step finished"] == trace
        assert "step" == step.__name__

    def test_fresh_section_per_call(self, term: Terminator, jobs: Jobs) -> None:
        """The decorator opens a fresh section per call, so concurrent calls do not clash."""
        barrier = threading.Barrier(2, timeout=WAIT)

        @critical_section("fs")
        def step() -> int:
            barrier.wait()
            wf = termsafe.current_workflow()
            assert wf is not None
            return len(wf.sections)

        def run(name: str) -> int:
            with term.workflow(name):
                return step()
            raise AssertionError("the workflow absorbed a kill nobody sent")

        first = jobs.start(lambda: run("d1"))
        second = jobs.start(lambda: run("d2"))
        assert (1, 1) == (first.result(), second.result())


class TestOutsideWorkflow:
    def test_sync_is_noop(self) -> None:
        """A section outside a workflow just runs its body."""
        trace = []
        with critical_section("db"):
            trace.append("ran")
        assert ["ran"] == trace

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_shields(self, backend: str) -> None:
        """An async section outside a workflow shields its body from cancellation."""
        trace: list[str] = []

        async def main() -> None:
            with anyio.CancelScope() as scope:
                async with critical_section("db"):
                    scope.cancel()
                    await anyio.sleep(0)
                    trace.append("finished")
                await anyio.sleep(0)
                trace.append("not reached")

        anyio.run(main, backend=backend)
        assert ["finished"] == trace
