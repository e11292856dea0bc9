"""Kills at chosen points of a safe operation, shared by the transaction, git and scope tests.

Each helper runs workflow ``"w"`` in a test thread (``jobs``), kills it with
``ADMIN``'s authority where the test asks and returns what the test asserts
on; the transaction helpers work the same on a sqlite3 and a psycopg
connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from conftest import ADMIN, WAIT, Job, Jobs

import termsafe as ts
from termsafe import KillHandle, Terminator, WorkflowState, transaction


def event_types(term: Terminator) -> list[str]:
    """A list that gets the type of every audit event ``term`` emits from now on."""
    types: list[str] = []
    term.add_event_listener(lambda event: types.append(event.type))
    return types


def kill_in(
    term: Terminator,
    jobs: Jobs,
    body: Callable[[Callable[[], None]], None],
    *,
    reason: str = "test",
) -> KillHandle:
    """Run ``body(pause)`` as workflow ``"w"`` and kill it while ``body`` is in ``pause()``.

    ``pause()`` returns once the kill was sent; where the kill then lands is
    up to ``body`` (the next checkpoint, the end of a critical section, ...).

    Args:
        term: The terminator to run the workflow on.
        jobs: Runs the workflow's thread.
        body: The workflow's body; it calls ``pause`` once.
        reason: The kill's reason.

    Returns:
        The kill's handle, once the workflow ended.

    Raises:
        AssertionError: The workflow did not end ``terminated``, or its
            thread raised (a ``Terminated`` that ended the workflow does not
            leave it).
    """
    paused = threading.Event()
    go_on = threading.Event()

    def pause() -> None:
        paused.set()
        assert go_on.wait(WAIT)

    def run() -> None:
        with term.workflow("w", owner="alice"):
            body(pause)

    job = jobs.start(run)
    assert paused.wait(WAIT)
    handle = term.kill("w", by=ADMIN, reason=reason)
    go_on.set()
    assert WorkflowState.TERMINATED == handle.wait(WAIT)
    assert job.error() is None
    return handle


def kill_before(term: Terminator, jobs: Jobs, operation: Callable[[], None]) -> BaseException:
    """Kill workflow ``"w"`` while it waits, then let it run ``operation``.

    Args:
        term: The terminator to run the workflow on.
        jobs: Runs the workflow's thread.
        operation: What the workflow runs once the kill is pending.

    Returns:
        What ``operation`` raised (the workflow itself ends ``terminated``).

    Raises:
        AssertionError: The workflow did not end ``terminated``, or
            ``operation`` raised nothing.
    """
    errors: list[BaseException] = []

    def body(pause: Callable[[], None]) -> None:
        pause()
        try:
            operation()
        except BaseException as exc:
            errors.append(exc)
            raise

    kill_in(term, jobs, body)
    assert 1 == len(errors), "the operation ran to its end under a pending kill"
    return errors[0]


def start_in_body(
    term: Terminator, jobs: Jobs, conn: Any, insert: Callable[[], object]
) -> Job[WorkflowState]:
    """Start workflow ``"w"``: ``transaction(conn)`` runs ``insert``, then waits at checkpoints.

    Args:
        term: The terminator to run the workflow on.
        jobs: Runs the workflow's thread.
        conn: The connection (``check_same_thread=False`` for sqlite3).
        insert: The body's writes.

    Returns:
        The workflow's thread, once ``insert`` returned; its result is the
        workflow's final state.
    """
    inserted = threading.Event()

    def body() -> WorkflowState:
        with term.workflow("w", owner="alice") as wf, transaction(conn):
            insert()
            inserted.set()
            while True:
                ts.sleep(0.05)
        return wf.state

    job = jobs.start(body)
    assert inserted.wait(WAIT)
    return job


class CommitGate(Protocol):
    """Holds a transaction's COMMIT (on the database side) until the test lets it go."""

    def wait_entered(self) -> None:
        """Return once a COMMIT is running and held; raise AssertionError after ``WAIT``."""

    def release(self) -> None:
        """Let the held COMMIT finish."""


@attrs.frozen
class CommitKill:
    """How ``kill_during_commit`` ended.

    Attributes:
        state: The workflow's final state.
        error: What the workflow's thread raised, if anything.
        committed: ``Transaction.committed``.
    """

    state: WorkflowState
    error: BaseException | None
    committed: bool


def kill_during_commit(
    term: Terminator, jobs: Jobs, conn: Any, gate: CommitGate, *, force: bool = False
) -> CommitKill:
    """Kill workflow ``"w"`` while ``gate`` holds the COMMIT of its transaction on ``conn``.

    The transaction inserts ``1`` into ``items``. An unforced kill must be
    deferred; a forced one is let go once the ``db`` grace expired. The
    audit trail is flushed before this returns.

    Args:
        term: The terminator to run the workflow on.
        jobs: Runs the workflow's thread.
        conn: The connection whose COMMIT ``gate`` holds.
        gate: Holds the COMMIT until the kill was sent.
        force: Send a forced kill.

    Returns:
        The final state, the thread's error and whether the transaction committed.
    """
    grace_expired = threading.Event()
    term.add_event_listener(
        lambda event: grace_expired.set() if event.type == "grace_expired" else None
    )
    tx = transaction(conn)

    def body() -> None:
        with term.workflow("w", owner="alice"), tx:
            conn.execute("INSERT INTO items VALUES (1)")

    job = jobs.start(body)
    gate.wait_entered()
    handle = term.kill("w", by=ADMIN, reason="test", force=force)
    if force:
        assert grace_expired.wait(WAIT)
    else:
        assert handle.deferred
    gate.release()
    state = handle.wait(WAIT)
    error = job.error()
    assert term.flush(WAIT)
    return CommitKill(state, error, tx.committed)


def in_taken_over_workflow(
    term: ts.Terminator,
    jobs: Jobs,
    fn: Callable[[], object],
    *,
    before: Callable[[], object] | None = None,
) -> tuple[ts.Workflow, BaseException | None]:
    """Run ``fn`` in a thread workflow once the system phase has taken it over and swept its hooks.

    ``before``, if given, runs in the workflow first, before the kill.

    Returns:
        The workflow and what ``fn`` raised (``None`` if it returned).
    """
    entered = threading.Event()
    go = threading.Event()
    seen: list[ts.Workflow] = []
    raised: list[BaseException] = []

    def body() -> None:
        with term.workflow("w") as wf:
            seen.append(wf)
            if before is not None:
                before()
            entered.set()
            go.wait(WAIT)  # stuck: never reaches a cancellation point
            try:
                fn()
            except BaseException as exc:
                raised.append(exc)
                raise

    job = jobs.start(body)
    try:
        assert entered.wait(WAIT)
        assert ts.WorkflowState.KILLED == term.kill("w", by=ADMIN).wait(WAIT)
    finally:
        go.set()
    job.result()
    return seen[0], (raised[0] if raised else None)
