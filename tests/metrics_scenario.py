"""Real kills that the metric adapter tests (test_otel, test_prometheus) drive and read back."""

from __future__ import annotations

import threading
import uuid

import attrs
import pytest
from conftest import WAIT, Jobs

import termsafe as ts

ADMIN = ts.Principal("root", roles=["admin"])

#: Kills start in the graceful phase (30 s: a cooperative workflow always
#: unwinds first); a forced kill reaches the system phase after 0.2 s.
PHASES = ts.Phases(graceful=30.0, forced=0.2)


@attrs.frozen
class Scenario:
    """What ``run_kills`` did, and the strings no metric attribute may carry.

    Attributes:
        forced_window: Seconds the forced phase lasted before the system phase.
        secrets: Workflow ids, principal ids and reasons used.
    """

    forced_window: float
    secrets: frozenset[str]


def start_cooperative(term: ts.Terminator, jobs: Jobs, wid: str) -> None:
    """Start a workflow with one cleanup hook that reaches a cancellation point every 10 ms."""
    entered = threading.Event()

    def body() -> None:
        with term.workflow(wid, owner="alice"):
            ts.on_cleanup(lambda: None)
            entered.set()
            while True:
                ts.sleep(0.01)

    jobs.start(body, name=f"coop-{wid}")
    assert entered.wait(WAIT)


def run_kills(term: ts.Terminator, jobs: Jobs) -> Scenario:
    """Kill one workflow cooperatively, one through the system phase, and refuse one kill.

    The second workflow never reaches a cancellation point until released, so
    the system phase takes it over (``killed``, cleanup run for it) and counts
    its thread as an orphan. ``term`` must use ``PHASES``.
    """
    tag = uuid.uuid4().hex[:12]
    coop_id, stuck_id, intruder = f"coop-{tag}", f"stuck-{tag}", f"eve-{tag}"
    refused_reason = f"not yours {tag}"

    start_cooperative(term, jobs, coop_id)
    with pytest.raises(ts.KillRefused):
        term.kill(coop_id, by=ts.Principal(intruder), reason=refused_reason)
    handle = term.kill(coop_id, by=ADMIN, reason=f"deploy {tag}")
    assert ts.WorkflowState.TERMINATED == handle.wait(WAIT)

    release = threading.Event()
    stuck_entered = threading.Event()

    def stuck() -> None:
        with term.workflow(stuck_id, owner="alice"):
            ts.on_cleanup(lambda: None)
            stuck_entered.set()
            release.wait(3 * WAIT)  # not a cancellation point

    jobs.start(stuck, name="stuck")
    try:
        assert stuck_entered.wait(WAIT)
        handle = term.kill(stuck_id, by=ADMIN, reason=f"hung {tag}", force=True)
        assert ts.WorkflowState.KILLED == handle.wait(WAIT)
    finally:
        release.set()
    return Scenario(
        forced_window=PHASES.forced,
        secrets=frozenset(
            {coop_id, stuck_id, intruder, ADMIN.id, refused_reason, f"deploy {tag}", f"hung {tag}"}
        ),
    )
