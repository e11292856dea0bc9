"""Workflow states and the one transition table every state change goes through."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from ._exceptions import InvalidTransition

__all__ = ["TERMINAL_STATES", "TRANSITIONS", "WorkflowState", "check_transition", "is_terminal"]


class WorkflowState(str, enum.Enum):
    """The state of a workflow; a string enum (``WorkflowState.TERMINATED == "terminated"``).

    ``terminated`` means the workflow unwound and every hook ran; ``killed``
    means the system phase had to act on its behalf (the thread never came back,
    or the supervisor killed the process) and cleanup ran for it.
    """

    PENDING = "pending"
    RUNNING = "running"
    TERMINATING = "terminating"
    COMPLETED = "completed"
    FAILED = "failed"
    TERMINATED = "terminated"
    KILLED = "killed"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        """Whether no further change is allowed from this state."""
        return self in TERMINAL_STATES


S = WorkflowState

#: The transition table: each state maps to the states it may move to.
TRANSITIONS: Final[Mapping[WorkflowState, frozenset[WorkflowState]]] = {
    S.PENDING: frozenset({S.RUNNING}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.TERMINATING}),
    S.TERMINATING: frozenset({S.TERMINATED, S.KILLED, S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.TERMINATED: frozenset(),
    S.KILLED: frozenset(),
}

TERMINAL_STATES: Final = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)


def is_terminal(state: WorkflowState) -> bool:
    """Return whether ``state`` is terminal (completed, failed, terminated, killed)."""
    return state in TERMINAL_STATES


def check_transition(workflow_id: str, old: WorkflowState, new: WorkflowState) -> None:
    """Raise unless the table allows ``old -> new``.

    Raises:
        InvalidTransition: the table has no such edge (terminal states have none).
    """
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(workflow_id, old.value, new.value)
