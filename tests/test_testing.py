"""termsafe.testing: kills at exact cancellation points, chaos, and explore_kills."""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WAIT, Jobs, TermFactory
from hypothesis import HealthCheck, find, given, settings

import termsafe as ts
from termsafe import (
    ConfigurationError,
    ForcedTermination,
    InvalidArgumentType,
    KillRefused,
    MemorySink,
    Phases,
    Principal,
    Terminated,
    Terminator,
    TermsafeError,
    WorkflowState,
)
from termsafe.testing import (
    INJECTOR,
    POINT_KINDS,
    AuditEvents,
    CancellationPoint,
    Chaos,
    KillPoint,
    KillSafetyError,
    KillScheduler,
    explore_kills,
    format_event,
    format_timeline,
    kill_points,
    run_with_kill,
)

S = WorkflowState
ADMIN = Principal("root", roles=("admin",))

OLD = "old content\n"
NEW_HEAD = "new "
NEW_TAIL = "content\n"
NEW = NEW_HEAD + NEW_TAIL
PREFIX = ".tmp-test-"


# -- workflows under test ------------------------------------------------------------------


class Steps:
    """A workflow of ``n`` checkpoints that records how far it got."""

    def __init__(self, n: int, workflow_id: str = "steps") -> None:
        self.n = n
        self.workflow_id = workflow_id
        self.reached: list[int] = []
        self.final: WorkflowState | None = None
        self.raised: list[str] = []

    def __call__(self, term: Terminator) -> None:
        self.reached = []
        with term.workflow(self.workflow_id) as wf:
            try:
                for i in range(self.n):
                    ts.checkpoint()
                    self.reached.append(i)
            except Terminated as exc:
                self.raised.append(type(exc).__name__)
                raise
        self.final = wf.state


def write_unsafe(path: Path) -> None:
    """Two writes into the target with a cancellation point between them."""
    with path.open("w") as f:
        f.write(NEW_HEAD)
        f.flush()
        ts.checkpoint()
        f.write(NEW_TAIL)


def write_safe(path: Path) -> None:
    """A temp file beside the target, swapped in inside an ``fs`` section."""
    with ts.critical_section("fs"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PREFIX)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(NEW_HEAD)
                ts.checkpoint()
                f.write(NEW_TAIL)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


class FileJob:
    """``run`` and ``check`` for a writer: the target holds the old or the new content."""

    def __init__(self, folder: Path, write: Callable[[Path], None]) -> None:
        self.folder = folder
        self.target = folder / "out.txt"
        self.write = write

    def run(self, term: Terminator) -> None:
        self.target.write_text(OLD)
        for stale in self.folder.glob(PREFIX + "*"):
            stale.unlink()
        with term.workflow("writer"):
            self.write(self.target)

    def check(self) -> None:
        content = self.target.read_text()
        assert content in (OLD, NEW), f"torn file: {content!r}"
        left = [p.name for p in self.folder.glob(PREFIX + "*")]
        assert not left, f"temp files left: {left}"


class Payment:
    """Charge once, then record it; ``resume`` retries like a restarted process."""

    def __init__(self, *, shielded: bool) -> None:
        self.shielded = shielded
        self.charges = 0
        self.recorded = False

    def run(self, term: Terminator) -> None:
        self.charges = 0
        self.recorded = False
        self.pay(term)

    def pay(self, term: Terminator) -> None:
        with term.workflow("pay"):
            if self.recorded:
                return
            ts.checkpoint()
            with ts.critical_section("api"):
                if self.shielded:
                    with ts.shielded():
                        self.charge()
                else:
                    self.charge()

    def charge(self) -> None:
        self.charges += 1
        ts.checkpoint()  # between "the provider charged" and "we recorded it"
        self.recorded = True

    def check(self) -> None:
        assert self.charges <= 1, f"charged {self.charges} times"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty folder for file-writing workflows."""
    return tmp_path


def _factory(make_term: TermFactory) -> Callable[[], Terminator]:
    """Terminators like explore_kills' default, but tracked by conftest's thread check."""
    return lambda: make_term(Phases(30.0, 5.0), hook_timeout=5.0)


# -- values --------------------------------------------------------------------------------


class TestKillPoint:
    def test_repr_is_a_reproduction(self) -> None:
        """The repr of a KillPoint evaluates back to an equal KillPoint."""
        point = KillPoint(index=3, force=True, grace_expiry=True)
        assert point == eval(repr(point), {"KillPoint": KillPoint})

    def test_defaults(self) -> None:
        """A KillPoint is graceful and without grace expiry unless asked."""
        assert KillPoint(2, False, False) == KillPoint(index=2)

    @pytest.mark.parametrize("index", [0, -1])
    def test_index_below_one(self, index: int) -> None:
        """An index below 1 is refused, naming the value."""
        with pytest.raises(ConfigurationError, match=rf"index must be >= 1 \(got {index}\)"):
            KillPoint(index)

    @pytest.mark.parametrize("index", ["1", 1.0, True])
    def test_index_not_an_int(self, index: object) -> None:
        """A non-int index is refused."""
        with pytest.raises(InvalidArgumentType, match="index must be an int"):
            KillPoint(index)  # type: ignore[arg-type]

    def test_force_not_a_bool(self) -> None:
        """A non-bool force is refused."""
        with pytest.raises(InvalidArgumentType, match="force must be a bool"):
            KillPoint(1, force=1)  # type: ignore[arg-type]


class TestCancellationPoint:
    def test_str_names_kind_workflow_sections_and_location(self) -> None:
        """A point reads as where the workflow was."""
        point = CancellationPoint(5, 2, "section_exit", "fs", "job", ("db", "fs"), "x.py:3 in f")
        expected = "cancellation point #2 of 'job': section_exit('fs') inside db/fs at x.py:3 in f"
        assert expected == str(point)


# -- the probe: which points are counted -----------------------------------------------------


class TestCountedPoints:
    def test_every_kind_is_counted_in_order(self) -> None:
        """checkpoint, sleep, section entry/exit and child start/end are counted in order."""

        def run(term: Terminator) -> None:
            with term.workflow("parent"):
                ts.checkpoint()
                ts.sleep(0)
                with ts.critical_section("db"):
                    ts.checkpoint()
                with term.workflow("child"):
                    ts.checkpoint()

        points = run_with_kill(run).points
        expected = [
            ("parent", "checkpoint", None, ()),
            ("parent", "sleep", None, ()),
            ("parent", "section_enter", "db", ()),
            ("parent", "checkpoint", None, ("db",)),
            ("parent", "section_exit", "db", ("db",)),
            ("parent", "workflow_enter", "child", ()),
            ("child", "checkpoint", None, ()),
            ("parent", "workflow_exit", "child", ()),
        ]
        assert expected == [(p.workflow_id, p.kind, p.detail, p.sections) for p in points]
        assert list(range(1, 9)) == [p.index for p in points]
        assert [1, 2, 3, 4, 5, 6, 1, 7] == [p.workflow_index for p in points]
        assert set(POINT_KINDS) == {p.kind for p in points}

    def test_location_is_the_workflow_code(self) -> None:
        """A point's location is the user's line, not termsafe's."""

        def run(term: Terminator) -> None:
            with term.workflow("w"):
                ts.checkpoint()

        (point,) = run_with_kill(run).points
        assert point.location.startswith(f"{Path(__file__).relative_to(Path.cwd())}:")
        assert point.location.endswith(" in run")

    def test_no_probe_outside_test_tooling(self, term: Terminator) -> None:
        """A terminator nobody instruments gives its workflows no probe."""
        with term.workflow("plain") as wf:
            assert wf.probe is None

    def test_probe_reaches_live_workflows(self, term: Terminator) -> None:
        """A scheduler attached after a workflow started still sees its points."""
        with term.workflow("early") as wf:
            kill = KillScheduler(term)
            assert wf.probe is not None
            ts.checkpoint()
            assert 1 == len(kill.points("early"))


# -- run_with_kill ---------------------------------------------------------------------------


class TestRunWithKill:
    def test_kill_lands_at_exactly_that_point(self) -> None:
        """A kill at point 4 stops the workflow before its 4th step, every time."""
        steps = Steps(10)
        for _ in range(25):
            result = run_with_kill(steps, KillPoint(4))
            assert [0, 1, 2] == steps.reached
            assert S.TERMINATED == steps.final
            assert result.fired
            assert result.where is not None
            assert 4 == result.where.index
            assert {"steps": "terminated"} == dict(result.final_states)

    def test_forced_kill_raises_forced_termination(self) -> None:
        """force=True lands as ForcedTermination and starts at the forced phase."""
        steps = Steps(3)
        result = run_with_kill(steps, KillPoint(2, force=True))
        assert ["ForcedTermination"] == steps.raised
        (requested,) = [e for e in result.events if e.type == "kill_requested"]
        assert "forced" == requested.details["phase"]
        assert INJECTOR.id == (requested.actor or {})["id"]

    def test_graceful_kill_raises_terminated(self) -> None:
        """force=False lands as a plain Terminated."""
        steps = Steps(3)
        run_with_kill(steps, KillPoint(2))
        assert ["Terminated"] == steps.raised

    def test_kill_inside_a_section_is_deferred_to_its_exit(self) -> None:
        """A kill at a point inside a section lands when the section ends."""
        done: list[str] = []

        def run(term: Terminator) -> None:
            with term.workflow("w"), ts.critical_section("db"):
                ts.checkpoint()
                done.append("rest of the section")

        result = run_with_kill(run, KillPoint(2))
        assert ["rest of the section"] == done
        types = [e.type for e in result.events]
        assert ["kill_deferred", "kill_effective"] == [
            t for t in types if t in ("kill_deferred", "kill_effective")
        ]
        assert {"w": "terminated"} == dict(result.final_states)

    def test_grace_expiry_cuts_the_section(self) -> None:
        """With grace_expiry the point inside the section raises ForcedTermination."""
        seen: list[str] = []

        def run(term: Terminator) -> None:
            with term.workflow("w"):
                ts.on_rollback(lambda: seen.append("rolled back"))
                with ts.critical_section("db"):
                    try:
                        ts.checkpoint()
                    except ForcedTermination:
                        seen.append("cut")
                        raise
                    seen.append("finished the section")

        result = run_with_kill(run, KillPoint(2, grace_expiry=True))
        assert ["cut", "rolled back"] == seen
        (expired,) = [e for e in result.events if e.type == "grace_expired"]
        assert {"kind": "db", "grace": 10.0, "injected": True} == dict(expired.details)

    def test_kill_at_section_entry_refuses_the_section(self) -> None:
        """A kill at section_enter refuses the section: its body never runs."""
        body: list[str] = []

        def run(term: Terminator) -> None:
            with term.workflow("w"), ts.critical_section("fs"):
                body.append("ran")

        result = run_with_kill(run, KillPoint(1))
        assert [] == body
        assert "section_refused" in [e.type for e in result.events]

    def test_kill_at_child_start_keeps_the_child_from_starting(self) -> None:
        """A kill at workflow_enter lands in the parent before the child registers."""

        def run(term: Terminator) -> None:
            with term.workflow("parent"), term.workflow("child"):
                pass

        result = run_with_kill(run, KillPoint(1))
        assert {"parent": "terminated"} == dict(result.final_states)

    def test_kill_as_a_child_ends_lands_in_the_parent(self) -> None:
        """A kill at workflow_exit lands in the parent right after its child completed."""
        after: list[str] = []

        def run(term: Terminator) -> None:
            with term.workflow("parent"):
                with term.workflow("child"):
                    pass
                after.append("parent went on")

        result = run_with_kill(run, KillPoint(2))
        assert result.where is not None
        assert ("workflow_exit", "child") == (result.where.kind, result.where.detail)
        assert [] == after
        assert {"child": "completed", "parent": "terminated"} == dict(result.final_states)

    def test_kill_inside_a_child_kills_the_top_level_workflow(self) -> None:
        """A point reached in a child workflow kills its top-level workflow, and so the child."""

        def run(term: Terminator) -> None:
            with term.workflow("parent"), term.workflow("child"):
                ts.checkpoint()

        result = run_with_kill(run, KillPoint(2))
        assert result.kill is not None
        assert "parent" == result.kill.workflow_id
        assert {"child": "terminated", "parent": "terminated"} == dict(result.final_states)

    def test_point_beyond_the_run_does_not_fire(self) -> None:
        """A kill point the run never reaches does not fire."""
        result = run_with_kill(Steps(2), KillPoint(3))
        assert not result.fired
        assert {"steps": "completed"} == dict(result.final_states)

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_async_run(self, backend: str) -> None:
        """An async run is run with anyio and the kill lands at its checkpoint."""
        reached: list[int] = []

        async def run(term: Terminator) -> None:
            async with term.workflow("a"):
                for i in range(3):
                    ts.checkpoint()
                    reached.append(i)

        result = run_with_kill(run, KillPoint(2), backend=backend)
        assert [0] == reached
        assert {"a": "terminated"} == dict(result.final_states)

    def test_run_uses_its_terminator_as_the_default(self) -> None:
        """termsafe.workflow() without terminator= registers with the run's terminator."""
        seen: list[bool] = []
        before = ts.get_terminator()

        def run(term: Terminator) -> None:
            with ts.workflow("default") as wf:
                seen.append(wf.terminator is term)

        run_with_kill(run)
        assert [True] == seen
        assert before is ts.get_terminator()

    def test_error_from_run_is_recorded(self) -> None:
        """What run raises is kept in KillRun.error, not raised."""

        def run(term: Terminator) -> None:
            with term.workflow("w"):
                raise ValueError("boom")

        result = run_with_kill(run)
        assert isinstance(result.error, ValueError)
        assert {"w": "failed"} == dict(result.final_states)

    def test_workflow_left_running_is_killed_and_reported(self, jobs: Jobs) -> None:
        """A thread workflow still live when run returns is killed and reported."""
        entered = threading.Event()
        started: list[object] = []

        def body(term: Terminator) -> None:
            with term.workflow("left"):
                entered.set()
                ts.sleep(WAIT * 3)

        def run(term: Terminator) -> None:
            started.append(jobs.start(lambda: body(term), name="left-running"))
            assert entered.wait(WAIT)

        result = run_with_kill(run)
        assert 1 == len(result.problems)
        assert "still live: 'left' (running)" in result.problems[0]
        assert {"left": "terminated"} == dict(result.final_states)

    def test_terminator_is_closed_after_the_run(self, make_term: TermFactory) -> None:
        """Each run's terminator is closed: it accepts no new workflow."""
        built: list[Terminator] = []

        def factory() -> Terminator:
            built.append(make_term())
            return built[-1]

        run_with_kill(Steps(1), terminator_factory=factory)
        with pytest.raises(TermsafeError, match="closed"), built[0].workflow("again"):
            pass

    def test_factory_must_build_a_terminator(self) -> None:
        """A factory that returns something else is refused."""
        with pytest.raises(InvalidArgumentType, match="terminator_factory must return"):
            run_with_kill(Steps(1), terminator_factory=lambda: object())  # type: ignore[arg-type,return-value]

    def test_unknown_backend(self) -> None:
        """An unknown backend is refused, naming the known ones."""
        with pytest.raises(ConfigurationError, match="asyncio, trio"):
            run_with_kill(Steps(1), backend="curio")

    def test_timeline_is_readable(self) -> None:
        """KillRun.timeline() has one line per event, in order."""
        result = run_with_kill(Steps(2), KillPoint(1))
        lines = result.timeline("steps").splitlines()
        assert ["workflow_started", "kill_requested", "workflow_finished"] == [
            line.split()[2] for line in lines
        ]


# -- explore_kills ---------------------------------------------------------------------------


class TestExploreKills:
    def test_finds_the_torn_write(self, folder: Path, make_term: TermFactory) -> None:
        """The kill between two unsafe writes is found, with timeline and reproduction."""
        job = FileJob(folder, write_unsafe)
        report = explore_kills(job.run, job.check, terminator_factory=_factory(make_term))
        assert not report.ok
        assert [KillPoint(1, False), KillPoint(1, True)] == report.failing_points
        failure = report.failures[0]
        assert "after the kill" == failure.stage
        assert failure.message.startswith(f"AssertionError: torn file: {NEW_HEAD!r}")
        expected = (
            "explore_kills(run, check, only=KillPoint(index=1, force=False, grace_expiry=False))"
        )
        assert expected == failure.reproduction
        text = str(report)
        assert "kill_requested" in text
        assert "in write_unsafe" in text

    def test_reproduction_replays_one_point(self, folder: Path) -> None:
        """only= runs just the named kill point, which fails again the same way."""
        job = FileJob(folder, write_unsafe)
        report = explore_kills(job.run, job.check, only=KillPoint(1))
        assert (KillPoint(1),) == report.explored
        assert [KillPoint(1)] == report.failing_points

    def test_safe_write_passes_every_point(self, folder: Path, make_term: TermFactory) -> None:
        """The atomic write in a section is safe at every point, forced or cut."""
        job = FileJob(folder, write_safe)
        report = explore_kills(job.run, job.check, terminator_factory=_factory(make_term))
        assert report.ok, str(report)
        # section_enter, checkpoint, section_exit; x2 forces; grace at the 2 inner points x2.
        assert 3 == len(report.points)
        assert 10 == len(report.explored)
        assert "3 cancellation point(s): all safe" in report.summary()

    def test_force_and_grace_options_shape_the_plan(self, folder: Path) -> None:
        """force=False and include_grace_expiry=False try each point once."""
        job = FileJob(folder, write_safe)
        report = explore_kills(job.run, job.check, force=False, include_grace_expiry=False)
        assert [KillPoint(1), KillPoint(2), KillPoint(3)] == list(report.explored)

    def test_resume_finds_a_double_charge(self) -> None:
        """A kill between charging and recording makes the retry charge twice."""
        job = Payment(shielded=False)
        report = explore_kills(job.run, job.check, resume=job.pay)
        stages = {(f.point, f.stage) for f in report.failures}
        assert (KillPoint(3, grace_expiry=True), "after resume") in stages
        assert all(stage == "after resume" for _, stage in stages)
        assert "resume=pay" in report.failures[0].reproduction

    def test_shielded_commit_survives_every_kill_and_resume(self) -> None:
        """Charging and recording in one shielded step is safe, resumed or not."""
        job = Payment(shielded=True)
        report = explore_kills(job.run, job.check, resume=job.pay)
        assert report.ok, str(report)

    def test_nondeterministic_run_is_reported(self) -> None:
        """A run that reaches different points each time fails as 'determinism'."""
        calls = [0]

        def run(term: Terminator) -> None:
            calls[0] += 1
            with term.workflow("w"):
                for _ in range(3 if calls[0] == 1 else 1):
                    ts.checkpoint()

        report = explore_kills(run, lambda: None, force=False)
        assert [KillPoint(2), KillPoint(3)] == [
            f.point for f in report.failures if f.stage == "determinism"
        ]
        assert "reached only 1 cancellation point(s)" in report.failures[0].message

    def test_failing_without_a_kill_stops_early(self) -> None:
        """A check that fails without any kill is the one failure reported."""

        def check() -> None:
            raise AssertionError("broken from the start")

        report = explore_kills(Steps(3), check)
        assert () == report.explored
        assert [None] == report.failing_points
        assert "without a kill" == report.failures[0].stage

    def test_raise_on_failure(self, folder: Path) -> None:
        """raise_on_failure raises a KillSafetyError carrying the reproductions."""
        job = FileJob(folder, write_unsafe)
        report = explore_kills(job.run, job.check, force=False)
        with pytest.raises(KillSafetyError, match="torn file") as info:
            report.raise_on_failure()
        assert isinstance(info.value, AssertionError)
        assert isinstance(info.value, TermsafeError)
        assert report is info.value.report
        assert (report.failures[0].reproduction,) == info.value.reproductions

    def test_assert_safe(self, folder: Path) -> None:
        """assert_safe=True raises instead of returning a failing report."""
        job = FileJob(folder, write_unsafe)
        with pytest.raises(KillSafetyError, match="1 unsafe"):
            explore_kills(job.run, job.check, force=False, assert_safe=True)

    def test_safety_error_pickles(self) -> None:
        """KillSafetyError survives pickling with its message and reproductions."""
        error = KillSafetyError("2 unsafe", ("explore_kills(run, check, only=...)",))
        clone = pickle.loads(pickle.dumps(error))
        assert ("2 unsafe", error.reproductions) == (str(clone), clone.reproductions)

    def test_only_beyond_the_run(self) -> None:
        """only= naming a point the run never reaches is refused."""
        with pytest.raises(ConfigurationError, match="reaches 2 cancellation point"):
            explore_kills(Steps(2), lambda: None, only=[KillPoint(5)])

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_async_workflow(self, backend: str) -> None:
        """An async run and check are explored on the chosen backend."""
        state = {"a": 0, "b": 0}

        async def run(term: Terminator) -> None:
            state.update(a=0, b=0)
            async with term.workflow("async-job"):
                state["a"] = 1
                ts.checkpoint()
                state["b"] = 1

        async def check() -> None:
            assert state["a"] == state["b"], f"half done: {state}"

        report = explore_kills(run, check, backend=backend, force=False)
        assert [KillPoint(1)] == report.failing_points

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"run": 1}, InvalidArgumentType, "run must be callable"),
            ({"check": None}, InvalidArgumentType, "check must be callable"),
            ({"resume": "x"}, InvalidArgumentType, "resume must be callable"),
            ({"force": ()}, InvalidArgumentType, "force must be a bool or a tuple"),
            ({"force": (1,)}, InvalidArgumentType, "force must be a bool or a tuple"),
            ({"only": [3]}, InvalidArgumentType, "only must hold KillPoint"),
            ({"backend": "x"}, ConfigurationError, "backend must be one of"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, object], error: type, match: str) -> None:
        """Bad arguments are refused before anything runs, naming the value."""
        call: dict[str, object] = {"run": Steps(1), "check": lambda: None, **kwargs}
        run, check = call.pop("run"), call.pop("check")
        with pytest.raises(error, match=match):
            explore_kills(run, check, **call)  # type: ignore[arg-type]


class TestKillPointsStrategy:
    @given(point=kill_points(3, force=False))
    def test_counted_points(self, point: KillPoint) -> None:
        """With a count, indexes are drawn from 1 to that count."""
        assert 1 <= point.index <= 3
        assert not point.force

    def test_points_of_a_run(self) -> None:
        """With a run, points (and grace expiries inside sections) come from a counting run."""
        seen: set[KillPoint] = set()
        folder = Path(tempfile.mkdtemp())
        job = FileJob(folder, write_safe)

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(point=kill_points(job.run))
        def prop(point: KillPoint) -> None:
            seen.add(point)
            run_with_kill(job.run, point)
            job.check()

        prop()
        assert {p.index for p in seen} <= {1, 2, 3}
        assert all(p.index in (2, 3) for p in seen if p.grace_expiry)

    def test_run_without_points(self) -> None:
        """A run that reaches no cancellation point is refused on the first draw."""

        def run(term: Terminator) -> None:
            with term.workflow("idle"):
                pass

        with pytest.raises(ConfigurationError, match="reached no cancellation point"):
            find(kill_points(run), lambda _: True)

    def test_bad_count(self) -> None:
        """A count below 1 is refused."""
        with pytest.raises(ConfigurationError, match="must be >= 1"):
            kill_points(0)


# -- AuditEvents -----------------------------------------------------------------------------


@pytest.fixture
def events(term: Terminator) -> AuditEvents:
    """The events of the conftest ``term`` fixture."""
    return AuditEvents(term)


def _kill_one(term: Terminator, workflow_id: str = "job") -> None:
    KillScheduler(term).at_point(workflow_id, 1)
    with term.workflow(workflow_id):
        ts.checkpoint()


class TestAuditEvents:
    def test_types_and_filters(self, term: Terminator, events: AuditEvents) -> None:
        """types() lists every event in order; workflow_id keeps one workflow's."""
        with term.workflow("other"):
            pass
        _kill_one(term)
        assert ["workflow_started", "kill_requested", "workflow_finished"] == events.types("job")
        assert 5 == len(events)
        assert ["other", "job"] == [e.workflow_id for e in events.of_type("workflow_started")]

    def test_assert_sequence_matches_a_subsequence(
        self, term: Terminator, events: AuditEvents
    ) -> None:
        """Events in between do not break a sequence."""
        _kill_one(term)
        events.assert_sequence("workflow_started", "workflow_finished", workflow_id="job")

    def test_assert_sequence_failure_shows_the_timeline(
        self, term: Terminator, events: AuditEvents
    ) -> None:
        """A missing step names how far the sequence matched and prints the timeline."""
        _kill_one(term)
        with pytest.raises(AssertionError) as info:
            events.assert_sequence("kill_requested", "kill_deferred", workflow_id="job")
        message = str(info.value)
        assert "the audit trail of 'job' does not contain the sequence" in message
        assert "kill_requested -> kill_deferred" in message
        assert "matched up to 'kill_requested' (seq 2); no 'kill_deferred' after it" in message
        assert "Actual timeline (3 events):" in message
        assert "workflow_finished" in message.splitlines()[-1]

    def test_assert_sequence_out_of_order(self, term: Terminator, events: AuditEvents) -> None:
        """The order matters."""
        _kill_one(term)
        with pytest.raises(AssertionError, match="no 'kill_requested' after it"):
            events.assert_sequence("workflow_finished", "kill_requested")

    def test_assert_sequence_needs_types(self, events: AuditEvents) -> None:
        """assert_sequence without types is a usage error."""
        with pytest.raises(InvalidArgumentType):
            events.assert_sequence()

    def test_any_sink(self, make_term: TermFactory) -> None:
        """AuditEvents listens to the terminator, whatever its sink."""
        term = make_term(sink=ts.LoggingSink())
        events = AuditEvents(term)
        with term.workflow("w"):
            pass
        assert ["workflow_started", "workflow_finished"] == events.types()

    def test_format_event(self, term: Terminator, events: AuditEvents) -> None:
        """An event line has seq, time, type, workflow, state, actor, reason and details."""
        _kill_one(term)
        (event,) = events.of_type("kill_requested")
        line = format_event(event)
        assert line.startswith(f"{event.seq:>5}  {event.timestamp[11:23]}  kill_requested")
        assert "terminating" in line
        assert f"by={INJECTOR.id}" in line
        assert "phase=graceful" in line

    def test_format_timeline_empty(self) -> None:
        """An empty timeline says so."""
        assert "(no events)" == format_timeline([])


# -- KillScheduler ---------------------------------------------------------------------------


class TestKillScheduler:
    def test_at_point_counts_that_workflows_points(self, term: Terminator) -> None:
        """at_point counts only the named workflow's points."""
        kill = KillScheduler(term)
        scheduled = kill.at_point("b", 2)
        reached = []
        with term.workflow("a"):
            ts.checkpoint()
            ts.checkpoint()
        with term.workflow("b") as wf:
            for i in range(3):
                ts.checkpoint()
                reached.append(i)
        assert [0] == reached
        assert S.TERMINATED == scheduled.wait()
        assert scheduled.point is not None
        assert ("b", 2) == (scheduled.point.workflow_id, scheduled.point.workflow_index)
        assert S.TERMINATED == wf.state

    def test_inside_section_is_deferred(self, term: Terminator, events: AuditEvents) -> None:
        """on_section_entry arrives inside the section: deferred to its end."""
        KillScheduler(term).on_section_entry("job", "fs")
        body = []
        with term.workflow("job"):
            with ts.critical_section("fs"):
                body.append("section body")
            body.append("after the section")
        assert ["section body"] == body
        events.assert_sequence("kill_requested", "kill_deferred", "kill_effective")

    def test_before_entry_refuses_the_section(self, term: Terminator, events: AuditEvents) -> None:
        """before_entry=True arrives before the section opens: it is refused."""
        KillScheduler(term).on_section_entry("job", "fs", before_entry=True)
        body = []
        with term.workflow("job"), ts.critical_section("fs"):
            body.append("section body")
        assert [] == body
        events.assert_sequence("kill_requested", "section_refused", "workflow_finished")

    def test_occurrence(self, term: Terminator) -> None:
        """occurrence=2 waits for the second section of that kind."""
        scheduled = KillScheduler(term).on_section_entry("job", "db", occurrence=2)
        done = []
        with term.workflow("job"):
            for i in range(3):
                with ts.critical_section("db"):
                    done.append(i)
        assert [0, 1] == done
        assert scheduled.point is not None
        assert "section_exit" == scheduled.point.kind

    def test_grace_expiry_cuts_and_rolls_back(self, term: Terminator, events: AuditEvents) -> None:
        """on_grace_expiry cuts the section at its next point and the rollback runs."""
        KillScheduler(term).on_grace_expiry("job", "db")
        log = []
        with term.workflow("job") as wf:
            ts.on_rollback(lambda: log.append("rollback"))
            with ts.critical_section("db"):
                ts.checkpoint()
                log.append("not reached")
        assert ["rollback"] == log
        assert S.TERMINATED == wf.state
        events.assert_sequence("kill_deferred", "grace_expired", "hook_ran", workflow_id="job")

    def test_force(self, term: Terminator) -> None:
        """force=True lands as ForcedTermination."""
        KillScheduler(term).at_point("job", 1, force=True)
        raised: list[str] = []
        with term.workflow("job") as wf:
            try:
                ts.checkpoint()
            except Terminated as exc:
                raised.append(type(exc).__name__)
                raise
        assert (["ForcedTermination"], S.TERMINATED) == (raised, wf.state)

    def test_after_kills_a_sleeping_thread_workflow(self, term: Terminator, jobs: Jobs) -> None:
        """after() kills from the timer thread; the sleep wakes at once."""
        entered = threading.Event()

        def body() -> WorkflowState:
            with term.workflow("sleeper") as wf:
                entered.set()
                ts.sleep(WAIT * 3)
            return wf.state

        job = jobs.start(body)
        assert entered.wait(WAIT)
        scheduled = KillScheduler(term).after("sleeper", 0.01)
        assert S.TERMINATED == job.result()
        assert S.TERMINATED == scheduled.wait()
        assert scheduled.point is None

    def test_after_waits_for_a_workflow_to_start(self, term: Terminator) -> None:
        """after() for a workflow not started yet kills it at its first point."""
        scheduled = KillScheduler(term).after("later", 0.0)
        # The timer runs deadlines in order: once this one ran, the kill's did,
        # found no workflow, and armed the first point of "later" instead.
        timer_passed = threading.Event()
        term._timer.call_soon(timer_passed.set)
        assert timer_passed.wait(WAIT)
        assert not scheduled.fired
        with term.workflow("later") as wf:
            ts.checkpoint()
        assert S.TERMINATED == wf.state
        assert scheduled.point is not None
        assert 1 == scheduled.point.workflow_index

    def test_after_a_finished_workflow_is_refused(self, term: Terminator) -> None:
        """after() for a workflow that has finished records the refusal."""
        with term.workflow("gone"):
            pass
        scheduled = KillScheduler(term).after("gone", 0.0)
        with pytest.raises(AssertionError, match="refused: KillRefused"):
            scheduled.wait()
        assert isinstance(scheduled.error, KillRefused)

    def test_unfired_is_explained(self, term: Terminator) -> None:
        """A kill that never fired says how far the workflow got."""
        kill = KillScheduler(term)
        short = kill.at_point("short", 5)
        never = kill.at_point("never", 1)
        with term.workflow("short"):
            ts.checkpoint()
        assert [short, never] == kill.unfired()
        assert (
            "kill of 'short' at cancellation point #5 (force=False) never fired: "
            "workflow 'short' reached only 1 cancellation point(s)"
        ) == kill.explain_unfired(short)
        assert kill.explain_unfired(never).endswith("workflow 'never' never started")

    def test_wait_on_unfired(self, term: Terminator) -> None:
        """wait() on a kill that does not fire fails with its description."""
        scheduled = KillScheduler(term).at_point("nobody", 1)
        with pytest.raises(AssertionError, match="did not fire within 0s"):
            scheduled.wait(0.0)

    @pytest.mark.parametrize(
        ("call", "error"),
        [
            (lambda k: k.at_point("", 1), InvalidArgumentType),
            (lambda k: k.at_point("w", 0), ConfigurationError),
            (lambda k: k.at_point("w", 1, force="yes"), InvalidArgumentType),
            (lambda k: k.on_section_entry("w", 3), InvalidArgumentType),
            (lambda k: k.on_grace_expiry("w", "db", occurrence=0), ConfigurationError),
            (lambda k: k.after("w", -1), ConfigurationError),
        ],
    )
    def test_bad_arguments(
        self, term: Terminator, call: Callable[[KillScheduler], object], error: type
    ) -> None:
        """Bad arguments are refused when the kill is armed."""
        with pytest.raises(error):
            call(KillScheduler(term))

    def test_needs_a_terminator(self) -> None:
        """A KillScheduler needs a Terminator."""
        with pytest.raises(InvalidArgumentType, match="terminator must be a Terminator"):
            KillScheduler("term")  # type: ignore[arg-type]


# -- Chaos -----------------------------------------------------------------------------------


def _chaos_run(make_term: TermFactory, seed: int, **arm: object) -> tuple[int, Chaos]:
    term = make_term(sink=MemorySink())
    chaos = Chaos(term, seed, salt="test")
    chaos.arm(**arm)  # type: ignore[arg-type]
    reached = 0
    with term.workflow("job"):
        for _ in range(200):
            ts.checkpoint()
            reached += 1
    return reached, chaos


class TestChaos:
    def test_same_seed_same_kill(self, make_term: TermFactory) -> None:
        """The same seed kills at the same point."""
        first, _ = _chaos_run(make_term, 7, probability=0.05)
        second, _ = _chaos_run(make_term, 7, probability=0.05)
        assert first == second
        assert first < 200

    def test_seeds_differ(self, make_term: TermFactory) -> None:
        """Different seeds land at different points."""
        reached = {_chaos_run(make_term, seed, probability=0.05)[0] for seed in range(8)}
        assert len(reached) > 1

    def test_certain_and_never(self, make_term: TermFactory) -> None:
        """probability=1 kills at the first point; 0 never kills."""
        assert 0 == _chaos_run(make_term, 1, probability=1.0)[0]
        reached, chaos = _chaos_run(make_term, 1, probability=0.0)
        assert (200, []) == (reached, chaos.kills)

    def test_workflow_filter_and_max_kills(self, make_term: TermFactory) -> None:
        """Only the named workflow is killed, at most max_kills times."""
        term = make_term()
        chaos = Chaos(term, 3)
        chaos.arm("target", probability=1.0, max_kills=1)
        with term.workflow("bystander") as bystander:
            ts.checkpoint()
        with term.workflow("target") as target:
            ts.checkpoint()
        with term.workflow("target") as again:
            ts.checkpoint()
        assert [S.COMPLETED, S.TERMINATED, S.COMPLETED] == [
            bystander.state,
            target.state,
            again.state,
        ]
        assert 1 == len(chaos.kills)

    def test_grace_expiry_and_force(self, make_term: TermFactory) -> None:
        """grace_expiry=1 cuts the open section; force=1 forces the kill."""
        term = make_term()
        events = AuditEvents(term)
        chaos = Chaos(term, 5)
        with term.workflow("job"), ts.critical_section("db"):
            chaos.arm(probability=1.0, force=1.0, grace_expiry=1.0)
            with pytest.raises(ForcedTermination):
                ts.checkpoint()
            raise ForcedTermination("job", "re-raised for the workflow")
        (kill,) = chaos.kills
        assert (True, ("db",)) == (kill.force, kill.expired)
        events.assert_sequence("kill_requested", "kill_deferred", "grace_expired")

    def test_disarm(self, make_term: TermFactory) -> None:
        """After disarm no kill is injected."""
        term = make_term()
        chaos = Chaos(term, 5)
        chaos.arm(probability=1.0)
        chaos.disarm()
        with term.workflow("job") as wf:
            ts.checkpoint()
        assert S.COMPLETED == wf.state
        assert not chaos.armed

    def test_describe_names_the_seed(self, make_term: TermFactory) -> None:
        """describe() says how to rerun with the same seed."""
        _, chaos = _chaos_run(make_term, 42, probability=1.0)
        text = chaos.describe()
        assert text.startswith("chaos seed 42 (rerun with --chaos-seed=42)")
        assert "kill of 'job' by chaos (seed 42) at cancellation point #1" in text

    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"probability": 1.5}, ConfigurationError),
            ({"force": -0.1}, ConfigurationError),
            ({"grace_expiry": "often"}, InvalidArgumentType),
            ({"max_kills": 0}, ConfigurationError),
        ],
    )
    def test_bad_arguments(
        self, make_term: TermFactory, kwargs: dict[str, object], error: type
    ) -> None:
        """Probabilities outside [0, 1] and bad limits are refused."""
        with pytest.raises(error):
            Chaos(make_term(), 1).arm(**kwargs)  # type: ignore[arg-type]

    def test_seed_must_be_an_int(self, make_term: TermFactory) -> None:
        """A non-int seed is refused."""
        with pytest.raises(InvalidArgumentType, match="seed must be an int"):
            Chaos(make_term(), "42")  # type: ignore[arg-type]


@pytest.fixture
def _no_default_leak() -> Iterator[None]:
    """The process-wide terminator is the same before and after."""
    before = ts.get_terminator()
    yield
    assert before is ts.get_terminator()


@pytest.mark.usefixtures("_no_default_leak")
class TestDefaultTerminator:
    def test_explore_restores_the_default(self, folder: Path) -> None:
        """explore_kills leaves the process-wide terminator as it found it."""
        job = FileJob(folder, write_unsafe)
        explore_kills(job.run, job.check, force=False)

    def test_kill_via_admin_is_audited_as_the_injector(self) -> None:
        """Injected kills are requested by INJECTOR, an admin."""
        assert "admin" in INJECTOR.roles
        assert ADMIN.roles == INJECTOR.roles
