"""Exceptions raised by termsafe.

Errors (something is wrong and the caller should know)::

    TermsafeError(Exception)
    ├── ConfigurationError(ValueError)       bad argument value: grace, phases, kinds
    │   └── UnknownSectionKind(KeyError)      a critical-section kind nobody registered
    ├── InvalidArgumentType(TypeError)       an argument of the wrong type
    ├── WorkflowNotFound(LookupError)        no live workflow has that id
    ├── DuplicateWorkflow(ValueError)        a live workflow already has that id
    ├── NoActiveWorkflow(RuntimeError)       a call that needs a workflow found none in scope
    ├── InvalidTransition(RuntimeError)      a state change the transition table forbids
    ├── KillRefused(PermissionError)         ``kill()`` refused: carries the ``Decision``
    ├── WaitTimeout(TimeoutError)            ``KillHandle.wait()`` ran out of time
    ├── TerminatorClosed(RuntimeError)       ``kill()``/``workflow()`` on a closed terminator
    ├── StoreCorrupt(RuntimeError)           the store path holds something else; untouched
    ├── IdempotencyKeyReused(ValueError)     same key, another request
    ├── IdempotencyConflict(RuntimeError)    the key is in flight under a live lease
    ├── OutcomeUnknown(RuntimeError)         a run died after its side effect may have started
    ├── AlreadyRecorded(RuntimeError)        a replayed (or recorded) call asked to send again
    ├── LeaseLost(RuntimeError)              fenced: another run took the lease over
    ├── AtomicWriteError(OSError)            an atomic write failed at a named step
    ├── TransactionStateError(RuntimeError)  a connection in a state transaction() cannot use
    ├── NotAGitRepository(ValueError)        git_operation() on a path that is no git repository
    ├── GitCommandFailed(RuntimeError)       a git command exited non-zero: argv, status, stderr
    ├── GitRollbackFailed(RuntimeError)      a repository could not be restored; journal kept
    ├── OperationClosed(RuntimeError)        a safe operation used after it ended
    ├── ControlError(ConnectionError)        a control socket unreachable, or a bad answer
    └── AuditTampered(ValueError)            replay_audit() refused a trail that fails verification

Control flow (not errors; derive from ``BaseException``)::

    Terminated(BaseException)                the workflow is being killed: unwind
    └── ForcedTermination                    ... and the forced phase (or an expired
                                             grace period) is cutting it short

``Terminated`` derives from ``BaseException`` for the same reason as
``asyncio.CancelledError`` and ``KeyboardInterrupt``: a kill must not be swallowed
by the ``except Exception:`` blocks that ordinary workflow code is full of.

Every exception survives pickling with its structured attributes, so it can cross
a process boundary (``concurrent.futures``, ``multiprocessing``): each passes its
constructor's arguments to ``super().__init__``, so ``BaseException``'s own
``__reduce__`` rebuilds it; only the ``OSError`` subclasses, whose ``args`` are
``(errno, strerror)``, define ``__reduce__``.
"""

from __future__ import annotations

# Not ``typing.TYPE_CHECKING``: ``import termsafe`` imports this module, and
# typing would cost it a few milliseconds for nothing (checkers treat the name as true).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from ._audit import VerifyReport
    from ._permissions import Decision

__all__ = [
    "AlreadyRecorded",
    "AtomicWriteError",
    "AuditTampered",
    "ConfigurationError",
    "ControlError",
    "DuplicateWorkflow",
    "ForcedTermination",
    "GitCommandFailed",
    "GitRollbackFailed",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "InvalidArgumentType",
    "InvalidTransition",
    "KillRefused",
    "LeaseLost",
    "NoActiveWorkflow",
    "NotAGitRepository",
    "OperationClosed",
    "OutcomeUnknown",
    "StoreCorrupt",
    "Terminated",
    "TerminatorClosed",
    "TermsafeError",
    "TransactionStateError",
    "UnknownSectionKind",
    "WaitTimeout",
    "WorkflowNotFound",
]


class TermsafeError(Exception):
    """Root of every error termsafe raises (never of ``Terminated``)."""


class ConfigurationError(TermsafeError, ValueError):
    """An argument has a value termsafe cannot accept (negative grace, NaN, ...)."""


class UnknownSectionKind(ConfigurationError, KeyError):
    """A critical-section kind that was never registered.

    Attributes:
        kind: The kind that was asked for.
        known: The kinds that are registered, sorted.
    """

    def __init__(self, kind: str, known: tuple[str, ...]) -> None:
        self.kind = kind
        self.known = known
        super().__init__(kind, known)

    def __str__(self) -> str:
        return f"unknown critical section kind {self.kind!r} (known: {', '.join(self.known)})"


class InvalidArgumentType(TermsafeError, TypeError):
    """An argument of the wrong type (a non-callable hook, a number for an id, ...)."""


class WorkflowNotFound(TermsafeError, LookupError):
    """No live workflow has this id.

    Attributes:
        workflow_id: The id that was looked up.
    """

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(workflow_id)

    def __str__(self) -> str:
        return f"no workflow with id {self.workflow_id!r}"


class DuplicateWorkflow(TermsafeError, ValueError):
    """A live workflow already uses this id.

    Attributes:
        workflow_id: The id that is taken.
    """

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(workflow_id)

    def __str__(self) -> str:
        return f"a live workflow already has id {self.workflow_id!r}"


class NoActiveWorkflow(TermsafeError, RuntimeError):
    """A call that needs a workflow in scope (``on_rollback``, ...) found none."""


class InvalidTransition(TermsafeError, RuntimeError):
    """A state change that the transition table does not allow.

    Attributes:
        workflow_id: The workflow whose state was to change.
        old: The state it is in.
        new: The state that was asked for.
    """

    def __init__(self, workflow_id: str, old: str, new: str) -> None:
        self.workflow_id = workflow_id
        self.old = old
        self.new = new
        super().__init__(workflow_id, old, new)

    def __str__(self) -> str:
        return f"workflow {self.workflow_id!r} cannot go from {self.old!r} to {self.new!r}"


class KillRefused(TermsafeError, PermissionError):
    """``Terminator.kill()`` refused the request.

    Attributes:
        workflow_id: The workflow that was to be killed.
        decision: The ``Decision`` that refused it (``decision.reason`` uses the
            wording of the pre-kill validation: "Workflow not found", ...).
    """

    def __init__(self, workflow_id: str, decision: Decision) -> None:
        self.workflow_id = workflow_id
        self.decision = decision
        super().__init__(workflow_id, decision)

    def __str__(self) -> str:
        return f"kill of workflow {self.workflow_id!r} refused: {self.decision.reason}"


class TerminatorClosed(TermsafeError, RuntimeError):
    """The terminator was closed: it starts no workflow and accepts no kill."""


class WaitTimeout(TermsafeError, TimeoutError):
    """``KillHandle.wait()`` gave up before the workflow reached its final state.

    Attributes:
        workflow_id: The workflow waited for.
        timeout: The seconds waited.
    """

    def __init__(self, workflow_id: str, timeout: float | None) -> None:
        self.workflow_id = workflow_id
        self.timeout = timeout
        super().__init__(workflow_id, timeout)

    def __str__(self) -> str:
        return f"workflow {self.workflow_id!r} did not finish within {self.timeout}s"


class StoreCorrupt(TermsafeError, RuntimeError):
    """The store's path holds something that is not a (readable) termsafe store.

    The file is never overwritten.

    Attributes:
        path: The path.
        problem: What is wrong with it.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(self.path, problem)

    def __str__(self) -> str:
        return f"store {self.path!r} {self.problem}; it was left untouched"


class IdempotencyKeyReused(TermsafeError, ValueError):
    """The idempotency key was already used with a different request.

    Attributes:
        key: The key.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return f"idempotency key {self.key!r} was already used with a different request"


class IdempotencyConflict(TermsafeError, RuntimeError):
    """Another live run holds the idempotency key right now.

    Attributes:
        key: The key.
        pid: The holder's pid.
        host: The holder's host.
    """

    def __init__(self, key: str, pid: int, host: str) -> None:
        self.key = key
        self.pid = pid
        self.host = host
        super().__init__(key, pid, host)

    def __str__(self) -> str:
        return f"idempotency key {self.key!r} is in flight in pid {self.pid} on {self.host!r}"


class OutcomeUnknown(TermsafeError, RuntimeError):
    """A run died after its side effect may have started: nobody knows if it happened.

    termsafe never guesses. Check the external system, then settle the key
    (``SQLiteStore.idem_resolve``), or declare that the external system
    deduplicates by key so the call may be retried.

    Attributes:
        key: The key.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return (
            f"the outcome of idempotent call {self.key!r} is unknown: its run died after "
            "the side effect may have started"
        )


class LeaseLost(TermsafeError, RuntimeError):
    """Fencing: this run's claim was taken over, so it may not record anything.

    Attributes:
        key: The key.
        epoch: This run's epoch.
        current_epoch: The epoch now holding the key (``None`` if it is gone).
    """

    def __init__(self, key: str, epoch: int, current_epoch: int | None) -> None:
        self.key = key
        self.epoch = epoch
        self.current_epoch = current_epoch
        super().__init__(key, epoch, current_epoch)

    def __str__(self) -> str:
        return (
            f"lease on {self.key!r} lost: this run holds epoch {self.epoch}, "
            f"the key is now at epoch {self.current_epoch}"
        )


class AlreadyRecorded(TermsafeError, RuntimeError):
    """An idempotent call whose result is recorded was asked to send or record again.

    On a replay (``call.replayed``) the body must not repeat the side effect;
    the result is ``call.result``. ``call.run(fn)`` and the decorator form skip
    the side effect on a replay by themselves.

    Attributes:
        key: The key.
        action: What was asked (``"mark_sent"``, ``"record"``, ...).
    """

    def __init__(self, key: str, action: str) -> None:
        self.key = key
        self.action = action
        super().__init__(key, action)

    def __str__(self) -> str:
        return (
            f"idempotent call {self.key!r} already has a recorded result, so {self.action}() "
            "must not run: check call.replayed (or use call.run(fn) / the decorator)"
        )


class AtomicWriteError(TermsafeError, OSError):
    """``atomic_file`` or ``atomic_directory`` failed at a named step.

    Unless ``committed`` is true the old file (or tree) is intact and the temp
    is removed. ``committed`` is true only for a failure after the new content
    was renamed into place (``fsync folder``): it is there, but may not survive
    a power loss.

    Attributes:
        path: The target path.
        step: What failed: ``stat``, ``create temp``, ``create staging``,
            ``write``, ``chmod``, ``fsync``, ``close``, ``rename`` or ``fsync folder``.
        errno: The OS error number (as ``OSError.errno``).
        strerror: The OS error text (as ``OSError.strerror``).
        committed: Whether the new content is already in place.
    """

    def __init__(
        self, path: str, step: str, errno: int, strerror: str, committed: bool = False
    ) -> None:
        super().__init__(errno, strerror)
        self.path = path
        self.step = step
        self.committed = committed
        self.filename = path

    @classmethod
    def from_os_error(
        cls, path: str, step: str, exc: OSError, *, committed: bool = False
    ) -> AtomicWriteError:
        """The error for ``exc`` raised by ``step`` of the write of ``path``."""
        return cls(path, step, exc.errno or 0, exc.strerror or str(exc), committed)

    def __str__(self) -> str:
        outcome = (
            "the new content is in place but may not survive a power loss"
            if self.committed
            else "the old content is intact"
        )
        return (
            f"atomic write of {self.path!r} failed at {self.step}: "
            f"[Errno {self.errno}] {self.strerror}; {outcome}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.path, self.step, self.errno, self.strerror, self.committed),
        )


class TransactionStateError(TermsafeError, RuntimeError):
    """A connection is in a state ``transaction()`` cannot work with.

    Attributes:
        connection: A description of the connection (driver class and id).
        problem: What is wrong.
    """

    def __init__(self, connection: str, problem: str) -> None:
        self.connection = connection
        self.problem = problem
        super().__init__(connection, problem)

    def __str__(self) -> str:
        return f"transaction() on {self.connection}: {self.problem}"


class NotAGitRepository(ConfigurationError):
    """``git_operation()`` was given a path that is not inside a git repository.

    Attributes:
        path: The path.
        detail: What git said.
    """

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(path, detail)

    def __str__(self) -> str:
        return f"{self.path!r} is not a git repository: {self.detail}"


class GitCommandFailed(TermsafeError, RuntimeError):
    """A git command run by ``git_operation()`` exited with a non-zero status.

    Attributes:
        argv: The command line (``("git", "commit", ...)``).
        returncode: Its exit status (negative: killed by that signal).
        stderr: What it wrote to standard error.
        repo: The repository it ran in.
    """

    def __init__(self, argv: tuple[str, ...], returncode: int, stderr: str, repo: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.repo = repo
        super().__init__(self.argv, returncode, stderr, repo)

    def __str__(self) -> str:
        tail = self.stderr.strip().splitlines()[-3:]
        said = f": {' | '.join(tail)}" if tail else ""
        return (
            f"{' '.join(self.argv)!r} in {self.repo!r} exited with status {self.returncode}{said}"
        )


class GitRollbackFailed(TermsafeError, RuntimeError):
    """A repository could not be put back to the state ``git_operation()`` recorded.

    Its journal entry is kept, so a later recovery sweep tries again.

    Attributes:
        repo: The repository.
        problem: What stood in the way.
    """

    def __init__(self, repo: str, problem: str) -> None:
        self.repo = repo
        self.problem = problem
        super().__init__(repo, problem)

    def __str__(self) -> str:
        return f"could not restore git repository {self.repo!r}: {self.problem}"


class OperationClosed(TermsafeError, RuntimeError):
    """A safe operation's object was used after the operation ended.

    Attributes:
        operation: The operation (``git_operation '/srv/repo'``).
        state: How it ended (``committed``, ``rolled back``).
    """

    def __init__(self, operation: str, state: str) -> None:
        self.operation = operation
        self.state = state
        super().__init__(operation, state)

    def __str__(self) -> str:
        return f"{self.operation} has already ended ({self.state}); start a new one"


class ControlError(TermsafeError, ConnectionError):
    """A control socket could not be reached, or did not answer as expected.

    Attributes:
        path: The socket's path.
        problem: What went wrong.
        errno: The OS error number, or ``None`` (a protocol problem).
    """

    def __init__(self, path: str, problem: str, errno: int | None = None) -> None:
        super().__init__(errno, problem)
        self.path = path
        self.problem = problem
        self.filename = path

    def __str__(self) -> str:
        return f"control socket {self.path!r}: {self.problem}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem, self.errno))


class AuditTampered(TermsafeError, ValueError):
    """``replay_audit()`` refused a trail whose hash chain does not verify.

    Attributes:
        path: The trail.
        report: The ``VerifyReport`` naming the first bad line.
    """

    def __init__(self, path: str, report: VerifyReport) -> None:
        self.path = path
        self.report = report
        super().__init__(path, report)

    def __str__(self) -> str:
        return (
            f"audit trail {self.path!r} does not verify ({self.report.kind}: "
            f"{self.report.message}); pass allow_tampered=True to replay it anyway"
        )


class Terminated(BaseException):
    """Raised inside a workflow at a cancellation point when it is being killed.

    It derives from ``BaseException`` (like ``asyncio.CancelledError``) so that
    ``except Exception:`` in workflow code cannot swallow a kill. Let it
    propagate: the enclosing ``workflow()`` catches it, runs the hooks and records
    the final state.

    Attributes:
        workflow_id: The workflow being killed.
        reason: The reason given with the kill.
    """

    def __init__(self, workflow_id: str = "", reason: str = "") -> None:
        self.workflow_id = workflow_id
        self.reason = reason
        super().__init__(workflow_id, reason)

    def __str__(self) -> str:
        return f"workflow {self.workflow_id!r} terminated: {self.reason or 'no reason given'}"


class ForcedTermination(Terminated):
    """The forced phase, or an expired grace period, cut the work short."""
