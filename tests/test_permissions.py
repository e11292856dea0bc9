"""Permissions and pre-kill validation: the seed's rules, checked on real workflows."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import termsafe as ts
from termsafe import Decision, Principal

OWNER = "alice"
TEAM = "data"

# The seed, written as a table: (principal, expected "may kill" for a workflow
# owned by alice in team data, with a "max-runtime" policy that approves and a
# "never" policy that refuses).
PERSONAS: list[tuple[str, Principal, bool]] = [
    ("owner", Principal(OWNER), True),
    ("admin", Principal("root", roles=["admin"]), True),
    ("team lead of the team", Principal("tl", roles=["team-lead"], teams=[TEAM]), True),
    ("team lead of another team", Principal("tl2", roles=["team-lead"], teams=["web"]), False),
    ("member of the team", Principal("bob", teams=[TEAM]), False),
    ("another user", Principal("carol"), False),
    ("read-only user", Principal("ro", roles=["read-only"]), False),
    ("read-only admin", Principal("roa", roles=["read-only", "admin"]), False),
    ("read-only owner", Principal(OWNER, roles=["read-only"]), False),
    ("external user", Principal("partner", kind="external"), False),
    ("external admin", Principal("partner", kind="external", roles=["admin"]), False),
    ("workflow", Principal("wf-other", kind="workflow"), False),
    ("workflow with admin role", Principal("wf-other", kind="workflow", roles=["admin"]), False),
    ("workflow named like the owner", Principal(OWNER, kind="workflow"), False),
    ("system under an approving policy", Principal("max-runtime", kind="system"), True),
    ("system under a refusing policy", Principal("never", kind="system"), False),
    ("system without a policy", Principal("cron", kind="system"), False),
    ("system with admin role, no policy", Principal("cron", kind="system", roles=["admin"]), False),
    ("system under a crashing policy", Principal("broken", kind="system"), False),
]


def _crash(_wf: ts.Workflow, _p: Principal) -> bool:
    raise RuntimeError("policy bug")


class Fleet:
    """Real workflows in every state the validation distinguishes."""

    def __init__(self) -> None:
        # A long graceful phase lets the cooperative workflow unwind however
        # loaded the machine is; the stuck one is killed with force=True, which
        # skips that phase and reaches the system phase after 0.05 s.
        self.term = ts.Terminator(phases=ts.Phases(30, 0.05), sink=ts.MemorySink(), hook_timeout=1)
        self.term.register_policy("max-runtime", lambda wf, p: True)
        self.term.register_policy("never", lambda wf, p: False)
        self.term.register_policy("broken", _crash)
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        admin = Principal("root", roles=["admin"])

        # completed, failed
        with self.term.workflow("completed", owner=OWNER, team=TEAM):
            pass
        with (
            pytest.raises(ValueError, match="boom"),
            self.term.workflow("failed", owner=OWNER, team=TEAM),
        ):
            raise ValueError("boom")
        # running and in a section: threads that wait for the test to release them
        self._hold("running", section=False)
        self._hold("in-section", section=True)
        # terminated: a cooperative workflow, killed
        self._hold("terminated", section=False, cooperative=True)
        assert ts.WorkflowState.TERMINATED == self.term.kill("terminated", by=admin).wait(10)
        # killed: a thread that never reaches a cancellation point
        self._hold("killed", section=False)
        assert ts.WorkflowState.KILLED == self.term.kill("killed", by=admin, force=True).wait(10)

    def _hold(self, wid: str, *, section: bool, cooperative: bool = False) -> None:
        entered = threading.Event()

        def body() -> None:
            with self.term.workflow(wid, owner=OWNER, team=TEAM):
                if section:
                    with ts.critical_section("db"):
                        entered.set()
                        self.release.wait(30)
                elif cooperative:
                    entered.set()
                    while True:
                        ts.sleep(0.05)
                else:
                    entered.set()
                    self.release.wait(30)

        thread = threading.Thread(target=body, name=f"fleet-{wid}")
        thread.start()
        self.threads.append(thread)
        assert entered.wait(10)

    def close(self) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(10)
        self.term.close()
        assert [] == [t.name for t in self.threads if t.is_alive()], "fleet threads left running"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    yield f
    f.close()


def seed_decision(principal_may_kill: bool, wid: str) -> str:
    """The seed's can_kill_workflow, in its order, as a table of workflow states."""
    if wid == "missing":
        return "Workflow not found"
    if not principal_may_kill:
        return "Insufficient permissions"
    if wid in ("completed", "failed", "terminated", "killed"):
        return "Cannot kill finished workflow"
    if wid == "in-section":
        return "Workflow in critical section"
    return "OK"


WORKFLOW_IDS = ["missing", "running", "in-section", "completed", "failed", "terminated", "killed"]


class TestPrincipal:
    def test_roles_and_teams_are_frozen_sets(self) -> None:
        """Roles and teams accept any iterable of strings and are stored frozen."""
        p = Principal("a", roles=("admin", "admin"), teams=iter(["x"]))
        assert frozenset({"admin"}) == p.roles
        assert frozenset({"x"}) == p.teams
        with pytest.raises(AttributeError):
            p.id = "b"  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("kwargs", "error", "fragment"),
        [
            ({"id": ""}, ts.ConfigurationError, "must not be empty"),
            ({"id": 3}, ts.InvalidArgumentType, "got 3"),
            ({"id": "a", "kind": "robot"}, ts.ConfigurationError, "'robot'"),
            ({"id": "a", "roles": "admin"}, ts.InvalidArgumentType, "'admin'"),
            ({"id": "a", "teams": [1]}, ts.InvalidArgumentType, "got 1"),
        ],
    )
    def test_bad_principal_names_the_value(
        self, kwargs: dict[str, object], error: type[Exception], fragment: str
    ) -> None:
        """A bad principal raises a termsafe error whose message names the bad value."""
        with pytest.raises(error, match=fragment):
            Principal(**kwargs)  # type: ignore[arg-type]


class TestCanKill:
    @pytest.mark.parametrize(
        ("label", "principal", "may_kill"), PERSONAS, ids=[p[0] for p in PERSONAS]
    )
    @pytest.mark.parametrize("wid", WORKFLOW_IDS)
    def test_matrix_matches_the_seed(
        self, fleet: Fleet, label: str, principal: Principal, may_kill: bool, wid: str
    ) -> None:
        """can_kill answers what the seed's validation answers, check by check in its order."""
        decision = fleet.term.can_kill(wid, principal)
        expected = seed_decision(may_kill, wid)
        assert expected == decision.reason
        assert (expected == "OK") == decision.allowed

    @settings(deadline=None, max_examples=300)
    @given(
        kind=st.sampled_from(["user", "system", "external", "workflow"]),
        roles=st.sets(st.sampled_from(["admin", "team-lead", "read-only", "auditor"])),
        teams=st.sets(st.sampled_from([TEAM, "web", "ops"])),
        pid=st.sampled_from([OWNER, "bob", "max-runtime", "never", "cron"]),
        wid=st.sampled_from(WORKFLOW_IDS),
    )
    def test_random_principals_follow_the_rules(
        self, fleet: Fleet, kind: str, roles: set[str], teams: set[str], pid: str, wid: str
    ) -> None:
        """Any principal gets the decision the permission model's rules give."""
        principal = Principal(pid, kind=kind, roles=roles, teams=teams)  # type: ignore[arg-type]
        if kind in ("external", "workflow") or "read-only" in roles:
            may = False
        elif kind == "system":
            may = pid == "max-runtime"
        else:
            may = "admin" in roles or pid == OWNER or ("team-lead" in roles and TEAM in teams)
        assert seed_decision(may, wid) == fleet.term.can_kill(wid, principal).reason

    def test_decision_is_falsy_when_refused(self, fleet: Fleet) -> None:
        """A Decision is truthy exactly when the kill is allowed."""
        assert Decision(True, "OK")
        assert not fleet.term.can_kill("missing", Principal(OWNER))

    def test_principal_type_is_checked(self, fleet: Fleet) -> None:
        """can_kill refuses a principal that is not a Principal, naming it."""
        with pytest.raises(ts.InvalidArgumentType, match="'alice'"):
            fleet.term.can_kill("running", "alice")  # type: ignore[arg-type]


class TestKillRefusals:
    @pytest.mark.parametrize(
        ("wid", "principal", "reason"),
        [
            ("missing", Principal(OWNER), "Workflow not found"),
            ("running", Principal("carol"), "Insufficient permissions"),
            ("running", Principal("ro", roles=["read-only", "admin"]), "Insufficient permissions"),
            ("completed", Principal(OWNER), "Cannot kill finished workflow"),
        ],
    )
    def test_kill_refuses_and_audits(
        self, fleet: Fleet, wid: str, principal: Principal, reason: str
    ) -> None:
        """kill() raises KillRefused with the decision and audits it with the real actor."""
        with pytest.raises(ts.KillRefused) as info:
            fleet.term.kill(wid, by=principal, reason="try")
        assert reason == info.value.decision.reason
        assert wid == info.value.workflow_id
        assert fleet.term.flush(10)
        sink = fleet.term.sink
        assert isinstance(sink, ts.MemorySink)
        refusals = [
            e
            for e in sink.events
            if e.type == "kill_refused"
            and e.workflow_id == wid
            and e.actor is not None
            and e.actor["id"] == principal.id
            and e.details["decision"] == reason
        ]
        assert refusals, f"no kill_refused event for {wid} by {principal.id}"
        if wid != "missing":
            assert fleet.term.get(wid).state is not ts.WorkflowState.TERMINATING

    def test_refused_kill_leaves_workflow_running(self, fleet: Fleet) -> None:
        """A refused kill changes nothing about the workflow."""
        with pytest.raises(ts.KillRefused):
            fleet.term.kill("running", by=Principal("external", kind="external"))
        assert ts.WorkflowState.RUNNING == fleet.term.get("running").state


class TestDeferral:
    def test_kill_inside_section_is_deferred_not_refused(self) -> None:
        """can_kill says 'in critical section'; kill() accepts and defers to the section's end."""
        with ts.Terminator(phases=ts.Phases(5, 5), sink=ts.MemorySink()) as term:
            entered, release = threading.Event(), threading.Event()

            def body() -> None:
                with term.workflow("w", owner=OWNER):
                    with ts.critical_section("db"):
                        entered.set()
                        release.wait(30)
                    while True:
                        ts.sleep(0.05)

            thread = threading.Thread(target=body)
            thread.start()
            assert entered.wait(10)
            assert "Workflow in critical section" == term.can_kill("w", Principal(OWNER)).reason
            handle = term.kill("w", by=Principal(OWNER), reason="deploy")
            assert handle.deferred
            assert ts.WorkflowState.TERMINATING == handle.state
            release.set()
            assert ts.WorkflowState.TERMINATED == handle.wait(10)
            thread.join(10)
            assert term.flush(10)
            types = [e.type for e in term.sink.events if e.workflow_id == "w"]  # type: ignore[attr-defined]
            assert types.index("kill_deferred") < types.index("kill_effective")
