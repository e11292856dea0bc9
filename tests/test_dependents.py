"""Dependent workflows and termination requests from inside a workflow."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import termsafe as ts
from termsafe import Principal, WorkflowState

ADMIN = Principal("root", roles=["admin"])


@pytest.fixture
def term() -> Iterator[ts.Terminator]:
    t = ts.Terminator(phases=ts.Phases(2, 2), sink=ts.MemorySink())
    yield t
    t.close()


class Runner:
    """Cooperative thread workflows, each looping on termsafe.sleep until killed."""

    def __init__(self, term: ts.Terminator) -> None:
        self.term = term
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.states: dict[str, WorkflowState] = {}

    def start(self, wid: str, depends_on: tuple[str, ...] = (), cascade: bool = True) -> None:
        entered = threading.Event()

        def body() -> None:
            with self.term.workflow(wid, depends_on=depends_on, cascade=cascade) as wf:
                entered.set()
                while not self.stop.is_set():
                    ts.sleep(0.01)
            self.states[wid] = wf.state

        thread = threading.Thread(target=body, name=f"runner-{wid}")
        thread.start()
        self.threads.append(thread)
        assert entered.wait(10)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()


def _events(term: ts.Terminator) -> list[ts.AuditEvent]:
    assert term.flush(10)
    sink = term.sink
    assert isinstance(sink, ts.MemorySink)
    return sink.events


class TestDependents:
    def test_termination_cascades_transitively(self, term: ts.Terminator) -> None:
        """Killing A terminates B (depends on A) and C (depends on B), each notified."""
        runner = Runner(term)
        runner.start("A")
        runner.start("B", ("A",))
        runner.start("C", ("B",))
        notified: list[tuple[str, str, WorkflowState]] = []
        term.add_dependency_listener(
            lambda dep, cause, state: notified.append((dep.id, cause, state))
        )
        assert WorkflowState.TERMINATED == term.kill("A", by=ADMIN, reason="bad input").wait(10)
        for wid in ("B", "C"):
            assert term.get(wid).done_event().wait(10)
            assert WorkflowState.TERMINATED == term.get(wid).state
        runner.join()
        assert [
            ("B", "A", WorkflowState.TERMINATED),
            ("C", "B", WorkflowState.TERMINATED),
        ] == notified
        ended = [
            (e.workflow_id, e.details["dependency"])
            for e in _events(term)
            if e.type == "dependency_ended"
        ]
        assert [("B", "A"), ("C", "B")] == ended

    def test_opt_out_is_notified_but_keeps_running(self, term: ts.Terminator) -> None:
        """A dependent with cascade=False gets the notification and is not killed."""
        runner = Runner(term)
        runner.start("A")
        runner.start("D", ("A",), cascade=False)
        notified: list[str] = []
        term.add_dependency_listener(lambda dep, cause, state: notified.append(dep.id))
        assert WorkflowState.TERMINATED == term.kill("A", by=ADMIN).wait(10)
        assert ["D"] == notified
        assert WorkflowState.RUNNING == term.get("D").state
        runner.join()
        assert WorkflowState.COMPLETED == runner.states["D"]

    def test_cycles_and_diamonds_kill_each_once(self, term: ts.Terminator) -> None:
        """A cycle (X<->Y) and a diamond (Z on X and Y) end with one kill per workflow."""
        runner = Runner(term)
        runner.start("X", ("Y",))
        runner.start("Y", ("X",))
        runner.start("Z", ("X", "Y"))
        assert WorkflowState.TERMINATED == term.kill("X", by=ADMIN).wait(10)
        for wid in ("Y", "Z"):
            assert term.get(wid).done_event().wait(10)
            assert WorkflowState.TERMINATED == term.get(wid).state
        runner.join()
        accepted = [
            str(e.workflow_id)
            for e in _events(term)
            if e.type == "kill_requested" and "phase" in e.details
        ]
        assert ["X", "Y", "Z"] == sorted(accepted)

    def test_completed_dependency_does_not_cascade(self, term: ts.Terminator) -> None:
        """Only a terminated or killed dependency stops its dependents."""
        runner = Runner(term)
        runner.start("B", ("A",))
        with term.workflow("A"):
            pass
        assert WorkflowState.RUNNING == term.get("B").state
        runner.join()


class TestRequestTermination:
    def _run(
        self, term: ts.Terminator, wid: str
    ) -> tuple[threading.Thread, list[ts.TerminationRequest]]:
        out: list[ts.TerminationRequest] = []
        done = threading.Event()

        def body() -> None:
            with term.workflow(wid):
                out.append(ts.request_termination("out of quota"))
                done.set()
                for _ in range(200):
                    ts.sleep(0.01)

        thread = threading.Thread(target=body)
        thread.start()
        assert done.wait(10)
        return thread, out

    def test_without_policy_the_request_is_escalated(self, term: ts.Terminator) -> None:
        """No policy: the request is recorded for a human and the workflow keeps running."""
        thread, out = self._run(term, "w")
        assert "escalate" == out[0].verdict
        assert out[0].handle is None
        assert WorkflowState.RUNNING == term.get("w").state
        term.kill("w", by=ADMIN)
        thread.join(10)
        types = [e.type for e in _events(term) if e.workflow_id == "w"]
        assert types.index("termination_requested") < types.index("termination_request_decided")

    def test_approved_request_terminates_the_workflow(self, term: ts.Terminator) -> None:
        """An approving policy starts the kill; it lands at the next cancellation point."""
        term.set_request_policy(lambda wf, reason: "approve")
        thread, out = self._run(term, "w")
        handle = out[0].handle
        assert handle is not None
        assert WorkflowState.TERMINATED == handle.wait(10)
        thread.join(10)
        kill = next(e for e in _events(term) if e.type == "kill_requested")
        assert kill.actor is not None
        assert ("termination-request-policy", "system") == (kill.actor["id"], kill.actor["kind"])

    def test_denied_request_changes_nothing(self, term: ts.Terminator) -> None:
        """A denying policy leaves the workflow running to completion."""
        term.set_request_policy(lambda wf, reason: "deny")
        thread, out = self._run(term, "w")
        assert "deny" == out[0].verdict
        thread.join(10)
        assert WorkflowState.COMPLETED == term.get("w").state

    def test_broken_policy_escalates_and_records_the_error(self, term: ts.Terminator) -> None:
        """A policy that raises or answers nonsense escalates, with the error in the trail."""
        term.set_request_policy(lambda wf, reason: "maybe")
        thread, out = self._run(term, "w")
        assert "escalate" == out[0].verdict
        term.kill("w", by=ADMIN)
        thread.join(10)
        decided = next(e for e in _events(term) if e.type == "termination_request_decided")
        assert "'maybe'" in decided.details["policy_error"]

    def test_outside_a_workflow_is_an_error(self) -> None:
        """request_termination needs a workflow in scope."""
        with pytest.raises(ts.NoActiveWorkflow):
            ts.request_termination("why")

    def test_a_workflow_principal_cannot_kill(self, term: ts.Terminator) -> None:
        """A workflow cannot kill another (or itself) by posing as a workflow principal."""
        runner = Runner(term)
        runner.start("victim")
        with pytest.raises(ts.KillRefused, match="Insufficient permissions"):
            term.kill("victim", by=Principal("victim", kind="workflow"))
        runner.join()
