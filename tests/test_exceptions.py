"""Tests for termsafe._exceptions: the error tree, control-flow exceptions, pickling."""

from __future__ import annotations

import pickle

import pytest

import termsafe
from termsafe import (
    ConfigurationError,
    Decision,
    DuplicateWorkflow,
    ForcedTermination,
    InvalidArgumentType,
    InvalidTransition,
    KillRefused,
    NoActiveWorkflow,
    Terminated,
    TermsafeError,
    UnknownSectionKind,
    VerifyReport,
    WaitTimeout,
    WorkflowNotFound,
    _exceptions,
)

INSTANCES: list[BaseException] = [
    TermsafeError("something"),
    ConfigurationError("grace must be >= 0 and finite (got -1.0)"),
    UnknownSectionKind("gti", ("api", "db", "fs", "git")),
    InvalidArgumentType("workflow id must be a str (got 5)"),
    WorkflowNotFound("nightly"),
    DuplicateWorkflow("nightly"),
    NoActiveWorkflow("on_rollback() needs a workflow in scope"),
    InvalidTransition("nightly", "completed", "running"),
    KillRefused("nightly", Decision(False, "Insufficient permissions")),
    WaitTimeout("nightly", 1.5),
    _exceptions.TerminatorClosed("cannot kill 'w': this terminator is closed"),
    _exceptions.StoreCorrupt("/tmp/store.db", "is not a SQLite database"),
    _exceptions.IdempotencyKeyReused("pay-42"),
    _exceptions.IdempotencyConflict("pay-42", 1234, "host-a"),
    _exceptions.OutcomeUnknown("pay-42"),
    _exceptions.LeaseLost("pay-42", 3, 4),
    _exceptions.LeaseLost("pay-42", 3, None),
    _exceptions.AlreadyRecorded("pay-42", "record"),
    _exceptions.AtomicWriteError("/srv/out.json", "fsync", 28, "No space left on device"),
    _exceptions.AtomicWriteError("/srv/out.json", "fsync folder", 5, "I/O error", committed=True),
    _exceptions.TransactionStateError("sqlite3.Connection#1", "already in a transaction"),
    _exceptions.NotAGitRepository("/srv/x", "fatal: not a git repository"),
    _exceptions.GitCommandFailed(("git", "commit", "-m", "x"), 128, "fatal: bad\n", "/srv/repo"),
    _exceptions.GitRollbackFailed("/srv/repo", "ref is locked"),
    _exceptions.OperationClosed("git_operation '/srv/repo'", "committed"),
    _exceptions.ControlError("/run/ts/control/1-2.sock", "cannot connect: Connection refused", 111),
    _exceptions.ControlError("/run/ts/control/1-2.sock", "answer is not JSON: b'?'"),
    _exceptions.AuditTampered(
        "/var/log/audit.jsonl",
        VerifyReport(False, 3, 3, "edited", "line 3 was edited", path="/var/log/audit.jsonl"),
    ),
    Terminated("nightly", "operator asked"),
    Terminated(),
    ForcedTermination("nightly", "grace ran out"),
]


def _ids(exc: BaseException) -> str:
    return type(exc).__name__


class TestPickling:
    @pytest.mark.parametrize("exc", INSTANCES, ids=_ids)
    def test_round_trip(self, exc: BaseException) -> None:
        """Every exception pickles to an equal one: same type, args, attributes and message."""
        copy = pickle.loads(pickle.dumps(exc))
        assert type(exc) is type(copy)
        assert exc.args == copy.args
        assert vars(exc) == vars(copy)
        assert str(exc) == str(copy)
        if isinstance(exc, OSError):
            assert isinstance(copy, OSError)
            assert (exc.errno, exc.strerror) == (copy.errno, copy.strerror)

    def test_covers_every_exception(self) -> None:
        """The round-trip cases include every exception the module exports."""
        assert set(_exceptions.__all__) == {type(e).__name__ for e in INSTANCES}


class TestControlFlow:
    @pytest.mark.parametrize("cls", [Terminated, ForcedTermination])
    def test_not_an_exception(self, cls: type[BaseException]) -> None:
        """Terminated and ForcedTermination derive from BaseException, not Exception."""
        assert issubclass(cls, BaseException)
        assert not issubclass(cls, Exception)
        assert not issubclass(cls, TermsafeError)

    def test_except_exception_does_not_catch(self) -> None:
        """An ``except Exception`` block lets a Terminated through."""
        caught = []

        def user_code() -> None:
            try:
                raise Terminated("w", "r")
            except Exception as exc:  # the kind of block user code is full of
                caught.append(exc)

        with pytest.raises(Terminated):
            user_code()
        assert [] == caught

    def test_forced_is_a_termination(self) -> None:
        """ForcedTermination is a Terminated, so one ``except Terminated`` handles both."""
        assert issubclass(ForcedTermination, Terminated)

    def test_message_names_workflow_and_reason(self) -> None:
        """The message says which workflow and why."""
        expected = "workflow 'w' terminated: deploy cancelled"
        assert expected == str(Terminated("w", "deploy cancelled"))
        assert "workflow 'w' terminated: no reason given" == str(Terminated("w"))


class TestErrorTree:
    @pytest.mark.parametrize(
        ("cls", "builtin"),
        [
            (TermsafeError, Exception),
            (ConfigurationError, ValueError),
            (UnknownSectionKind, KeyError),
            (UnknownSectionKind, ConfigurationError),
            (InvalidArgumentType, TypeError),
            (WorkflowNotFound, LookupError),
            (DuplicateWorkflow, ValueError),
            (NoActiveWorkflow, RuntimeError),
            (InvalidTransition, RuntimeError),
            (KillRefused, PermissionError),
            (WaitTimeout, TimeoutError),
            (_exceptions.StoreCorrupt, RuntimeError),
            (_exceptions.IdempotencyKeyReused, ValueError),
            (_exceptions.IdempotencyConflict, RuntimeError),
            (_exceptions.OutcomeUnknown, RuntimeError),
            (_exceptions.LeaseLost, RuntimeError),
            (_exceptions.AlreadyRecorded, RuntimeError),
            (_exceptions.AtomicWriteError, OSError),
            (_exceptions.TransactionStateError, RuntimeError),
            (_exceptions.NotAGitRepository, ConfigurationError),
            (_exceptions.GitCommandFailed, RuntimeError),
            (_exceptions.GitRollbackFailed, RuntimeError),
            (_exceptions.OperationClosed, RuntimeError),
            (_exceptions.ControlError, ConnectionError),
            (_exceptions.AuditTampered, ValueError),
        ],
    )
    def test_leaf_subclasses_builtin(self, cls: type[Exception], builtin: type[Exception]) -> None:
        """Each error also subclasses the builtin that fits, so plain handlers still work."""
        assert issubclass(cls, builtin)

    @pytest.mark.parametrize(
        "exc", [e for e in INSTANCES if not isinstance(e, Terminated)], ids=_ids
    )
    def test_one_root(self, exc: BaseException) -> None:
        """Every error termsafe raises derives from TermsafeError."""
        assert isinstance(exc, TermsafeError)

    def test_exported(self) -> None:
        """Every exception is reachable as ``termsafe.<Name>``, so callers can catch it."""
        missing = [name for name in _exceptions.__all__ if not hasattr(termsafe, name)]
        assert [] == missing
        for name in _exceptions.__all__:
            assert getattr(_exceptions, name) is getattr(termsafe, name)


class TestMessages:
    def test_unknown_section_kind(self) -> None:
        """UnknownSectionKind names the kind and the known ones (not KeyError's repr)."""
        exc = UnknownSectionKind("gti", ("api", "db", "fs", "git"))
        assert "unknown critical section kind 'gti' (known: api, db, fs, git)" == str(exc)

    def test_kill_refused_carries_decision(self) -> None:
        """KillRefused carries the Decision and says its reason."""
        decision = Decision(False, "Workflow not found")
        exc = KillRefused("ghost", decision)
        assert decision == exc.decision
        assert "kill of workflow 'ghost' refused: Workflow not found" == str(exc)
