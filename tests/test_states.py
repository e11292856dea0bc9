"""Tests for termsafe._states: the one transition table."""

from __future__ import annotations

import pickle

import pytest
from conftest import TermFactory
from hypothesis import given, settings
from hypothesis import strategies as st

import termsafe
from termsafe import InvalidTransition, WorkflowState
from termsafe._states import TERMINAL_STATES, TRANSITIONS, check_transition, is_terminal

S = WorkflowState
STATES = list(WorkflowState)


class TestWorkflowState:
    def test_string_enum(self) -> None:
        """WorkflowState members compare equal to, and print as, their value."""
        terminated: str = S.TERMINATED
        assert "terminated" == terminated
        assert "terminated" == str(S.TERMINATED)
        assert S.KILLED is S("killed")

    def test_all_states(self) -> None:
        """The states are exactly the seven of the design."""
        expected = {
            "pending",
            "running",
            "terminating",
            "completed",
            "failed",
            "terminated",
            "killed",
        }
        assert expected == {s.value for s in S}

    def test_pickles(self) -> None:
        """A state survives pickling as the same member."""
        for state in STATES:
            assert state is pickle.loads(pickle.dumps(state))

    def test_public_table_is_the_table(self) -> None:
        """termsafe.TRANSITIONS is the table check_transition consults."""
        assert TRANSITIONS is termsafe.TRANSITIONS


class TestTransitionTable:
    def test_matches_design(self) -> None:
        """The table is the one DESIGN.md draws."""
        expected = {
            S.PENDING: {S.RUNNING},
            S.RUNNING: {S.COMPLETED, S.FAILED, S.TERMINATING},
            S.TERMINATING: {S.TERMINATED, S.KILLED, S.COMPLETED, S.FAILED},
            S.COMPLETED: set(),
            S.FAILED: set(),
            S.TERMINATED: set(),
            S.KILLED: set(),
        }
        assert expected == {k: set(v) for k, v in TRANSITIONS.items()}

    def test_terminal_states(self) -> None:
        """The terminal states are completed, failed, terminated and killed."""
        assert {S.COMPLETED, S.FAILED, S.TERMINATED, S.KILLED} == set(TERMINAL_STATES)

    @settings(deadline=None)
    @given(st.sampled_from(STATES))
    def test_terminal_states_have_no_exits(self, state: WorkflowState) -> None:
        """A state is terminal exactly when the table gives it no way out."""
        assert (not TRANSITIONS[state]) == is_terminal(state) == state.is_terminal

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_every_path_from_pending_ends_terminal(self, data: st.DataObject) -> None:
        """Any walk along the table from pending reaches a terminal state without looping."""
        state = S.PENDING
        seen = [state]
        while not is_terminal(state):
            state = data.draw(st.sampled_from(sorted(TRANSITIONS[state])))
            assert state not in seen, f"cycle through {state}: {seen}"
            seen.append(state)
        assert is_terminal(seen[-1])
        assert len(seen) <= len(STATES)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(STATES), st.sampled_from(STATES), st.text(min_size=1, max_size=8))
    def test_check_transition(self, old: WorkflowState, new: WorkflowState, wid: str) -> None:
        """check_transition allows exactly the table's edges and names the states otherwise."""
        if new in TRANSITIONS[old]:
            check_transition(wid, old, new)
            return
        with pytest.raises(InvalidTransition) as info:
            check_transition(wid, old, new)
        assert (wid, old.value, new.value) == (
            info.value.workflow_id,
            info.value.old,
            info.value.new,
        )
        assert f"{old.value!r}" in str(info.value)
        assert f"{new.value!r}" in str(info.value)


class TestWorkflowTransitions:
    @pytest.mark.parametrize("new", STATES)
    def test_finished_workflow_cannot_change(
        self, make_term: TermFactory, new: WorkflowState
    ) -> None:
        """A completed workflow refuses every further transition and keeps its state."""
        term = make_term()
        with term.workflow("done") as wf:
            pass
        assert S.COMPLETED == wf.state
        with wf.lock, pytest.raises(InvalidTransition):
            wf.transition(new)
        assert S.COMPLETED == wf.state
