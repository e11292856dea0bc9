"""Workflows: the unit a kill targets, and the calls workflow code makes.

A ``Workflow`` lives from ``workflow(...)``'s entry to its exit. Its mutable
kill bookkeeping (state, pending kill, open sections) is guarded by its own
lock; the terminator takes its registry lock first, never the other way round.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload

import anyio

from ._exceptions import (
    ForcedTermination,
    InvalidArgumentType,
    NoActiveWorkflow,
    Terminated,
)
from ._hooks import Hook, HookKind, HookStack, HookStackClosed
from ._states import WorkflowState, check_transition, is_terminal
from ._validate import validate_seconds

if TYPE_CHECKING:
    from ._sections import CriticalSection
    from ._terminator import KillRequest, TerminationRequest, Terminator

__all__ = [
    "Workflow",
    "WorkflowContext",
    "checkpoint",
    "current_workflow",
    "on_cleanup",
    "on_rollback",
    "request_termination",
    "sleep",
    "workflow",
]

P = ParamSpec("P")
R = TypeVar("R")

_current: ContextVar[Workflow | None] = ContextVar("termsafe_current_workflow", default=None)

#: A test probe, ``probe(workflow, point, detail)``, called at each cancellation
#: point before the kill check; see ``Terminator._set_probe`` (termsafe.testing).
Probe = Callable[["Workflow", str, "str | None"], None]

S = WorkflowState
#: A sleeper due to wake within this many seconds is not woken early by a kill.
_WAKE_SLACK: Final = 0.002
_INF: Final = float("inf")


class Workflow:
    """A live (or finished) workflow. Get it from ``with workflow(...) as wf`` or
    ``current_workflow()``; do not construct it directly.

    Attributes:
        id: The workflow id, unique among live workflows of its terminator.
        owner: The owner's principal id, or ``None``.
        team: The team the workflow belongs to, or ``None``.
        depends_on: Ids of the workflows this one depends on.
        terminator: The terminator it is registered with.
        parent: The workflow it was started inside, if any.
        last_checkpoint: The last state given to ``checkpoint(state)``.
        state: The current ``WorkflowState``.
        hook_failures: ``(hook name, error)`` of each hook that raised or hung.
    """

    __slots__ = (
        "__weakref__",
        "_children",
        "_cond",
        "_delivered",
        "_done",
        "_ended_ev",
        "_hooks",
        "_loop_call",
        "_scope",
        "_sleep_until",
        "_sleepers",
        "abandoned",
        "backend",
        "cascade",
        "depends_on",
        "ended_at",
        "hook_failures",
        "id",
        "kill",
        "last_checkpoint",
        "lock",
        "outcome",
        "owner",
        "parent",
        "probe",
        "sections",
        "shield_depth",
        "started_at",
        "state",
        "team",
        "terminator",
        "thread",
    )

    def __init__(
        self,
        workflow_id: str,
        owner: str | None,
        team: str | None,
        depends_on: tuple[str, ...],
        terminator: Terminator,
        parent: Workflow | None,
    ) -> None:
        self.id = workflow_id
        self.owner = owner
        self.team = team
        self.depends_on = depends_on
        #: Whether a terminated/killed dependency terminates this workflow too.
        self.cascade = True
        self.terminator = terminator
        self.parent = parent
        #: The terminator's test probe (``None`` unless termsafe.testing set one).
        self.probe: Probe | None = None
        self.state = S.PENDING
        self.lock = threading.Lock()
        self.kill: KillRequest | None = None
        self.sections: list[CriticalSection] = []
        self.shield_depth = 0
        self.abandoned = False
        self.last_checkpoint: Any = None
        self.hook_failures: list[tuple[str, str]] = []
        self.outcome: WorkflowState | None = None
        self.backend = "thread"
        self.thread: threading.Thread | None = None
        self.started_at = 0.0
        self.ended_at: float | None = None
        self._hooks: HookStack | None = None
        self._cond: threading.Condition | None = None
        self._sleepers = 0
        self._sleep_until = 0.0
        self._done: threading.Event | None = None
        self._delivered = False  # ended, and its events up to then reached the sink
        self._ended_ev: threading.Event | None = None  # only for waiters on the dispatcher
        self._loop_call: _LoopBatch | None = None  # async: its loop's batch of calls
        self._scope: anyio.CancelScope | None = None
        self._children: list[Workflow] | None = None

    def __repr__(self) -> str:
        return f"<Workflow {self.id!r} {self.state.value}>"

    # -- queries --------------------------------------------------------------

    @property
    def kill_pending(self) -> bool:
        """Whether a kill was requested and the workflow has not ended."""
        return self.kill is not None and not is_terminal(self.state)

    @property
    def kill_reason(self) -> str:
        """The reason of the pending kill, or ``""``."""
        kill = self.kill
        return kill.reason if kill is not None else ""

    @property
    def in_critical_section(self) -> bool:
        """Whether a critical section is open in this workflow."""
        return bool(self.sections)

    @property
    def hooks(self) -> HookStack:
        """The workflow's one LIFO hook stack."""
        stack = self._hooks
        if stack is None:
            with self.lock:
                stack = self._hooks
                if stack is None:
                    # Made after a takeover: the terminator's, as the one it took.
                    stack = self._hooks = HookStack(taken=self.abandoned)
        return stack

    def take_over(self) -> None:
        """The terminator owns the hooks from now on (lock held).

        The workflow's own thread claims no more of them (``abandoned``, and
        the stack's ``take_over``). The terminator's sweep runs them, LIFO,
        with any pushed meanwhile, and closes the stack when it finds it
        empty; ``push_hook`` runs a hook refused after that at once.
        """
        self.abandoned = True
        stack = self._hooks
        if stack is not None:
            stack.take_over()

    def push_hook(self, fn: Callable[[], Any], kind: HookKind) -> Hook:
        """Register a hook; in a workflow the terminator took over, stop the caller's work.

        Taken over, the caller's work stops with ``ForcedTermination``, as
        everything in such a workflow does, and the hook still runs exactly
        once: the terminator's sweep runs it (LIFO) if it is still going;
        after it, the stack refuses the hook, which is the undo of something
        already done that nobody else would run, so it runs here, now,
        audited like any hook the workflow runs (a coroutine function is
        handed to a terminator worker, bounded by ``hook_timeout``).

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
            ForcedTermination: the terminator took the hooks over (the hook ran
                already, or the sweep or a worker runs it).
            KeyboardInterrupt: raised by a refused hook run here (likewise
                ``SystemExit``).
        """
        try:
            hook = self.hooks.push(fn, kind)
        except HookStackClosed as closed:
            self.terminator._run_refused_hook(self, closed.hook)
            raise ForcedTermination(self.id, self.kill_reason) from None
        if self.abandoned:
            # Pushed before the sweep closed the stack: the sweep runs it.
            raise ForcedTermination(self.id, self.kill_reason)
        return hook

    def push_hook_if_open(self, fn: Callable[[], Any], kind: HookKind) -> Hook | None:
        """Register a hook, or drop it unrun (``None``) if the stack refuses it.

        For a hook that only matters when the workflow succeeds, which a
        workflow taken over never does.

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        try:
            return self.hooks.push(fn, kind)
        except HookStackClosed:
            return None

    @property
    def pending_hooks(self) -> int:
        """How many hooks are registered and not yet run."""
        stack = self._hooks
        return 0 if stack is None else len(stack)

    def children(self) -> list[Workflow]:
        """The live workflows started inside this one."""
        if self._children is None:
            return []
        with self.lock:
            return [c for c in self._children or () if not is_terminal(c.state)]

    # -- kill delivery ----------------------------------------------------------

    def _deliverable(self) -> BaseException | None:
        """The exception a cancellation point should raise now, if any (lock held)."""
        kill = self.kill
        if kill is None or self.shield_depth:
            return None
        if self.abandoned:
            return ForcedTermination(self.id, kill.reason)
        if self.sections:
            if any(s.expired for s in self.sections):
                return ForcedTermination(self.id, kill.reason)
            return None
        if kill.phase != "graceful":
            return ForcedTermination(self.id, kill.reason)
        return Terminated(self.id, kill.reason)

    def deliver(self) -> None:
        """Raise the pending kill if it may land here (a cancellation point)."""
        with self.lock:
            exc = self._deliverable()
        if exc is not None:
            raise exc

    def wake(self) -> None:
        """Wake ``sleep()`` callers so they re-check the kill (lock held)."""
        cond = self._cond
        if cond is None or not self._sleepers:
            return
        if self._sleepers == 1 and self._sleep_until - time.monotonic() <= _WAKE_SLACK:
            # It wakes on its own within the slack and sees the kill then; a
            # kill storm that woke every such thread at once would starve the
            # killing thread of the GIL.
            return
        cond.notify_all()

    def call_in_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` soon on the workflow's event loop (no-op for thread workflows)."""
        self._call_in_loop(_call, fn)

    def _call_in_loop(self, fn: Callable[[Any], object], arg: Any) -> None:
        """Run ``fn(arg)`` soon on the workflow's event loop (no-op for thread workflows)."""
        batch = self._loop_call
        if batch is None:
            return
        if self.thread is threading.current_thread():
            # Already on the loop's thread (a kill from the workflow's own loop):
            # act now, so no further await completes first.
            fn(arg)
            return
        try:
            batch.call(fn, arg)
        except RuntimeError:
            # The loop is closed: nothing left there to cancel.
            pass

    def cancel_scope_soon(self) -> None:
        """Cancel the async workflow's scope from any thread."""
        scope = self._scope
        if scope is not None:
            # The unbound method and the scope, not ``scope.cancel``: a kill
            # storm would make (and the collector walk) one bound method per kill.
            self._call_in_loop(type(scope).cancel, scope)

    # -- sections ---------------------------------------------------------------

    def open_section(self, section: CriticalSection) -> None:
        if self.probe is not None:
            self.probe(self, "section_enter", section.kind)
        with self.lock:
            exc: BaseException | None = None
            kill = self.kill
            if self.abandoned:
                exc = ForcedTermination(self.id, kill.reason if kill is not None else "")
            elif kill is not None:
                if not self.sections:
                    # No new work once a kill is pending...
                    exc = Terminated(self.id, kill.reason)
                elif any(s.expired for s in self.sections):
                    exc = ForcedTermination(self.id, kill.reason)
                # ...but a section nested in one the kill is waiting for is part
                # of the work being finished (a commit inside the caller's section).
            if exc is None:
                self.sections.append(section)
        if exc is not None:
            self.terminator._emit(
                "section_refused", self, details={"kind": section.kind}, reason=self.kill_reason
            )
            raise exc

    def close_section(self, section: CriticalSection, exc: BaseException | None) -> None:
        if self.probe is not None:
            self.probe(self, "section_exit", section.kind)
        with self.lock:
            sections = self.sections
            if sections and sections[-1] is section:
                sections.pop()  # the common, properly nested case
            else:
                try:
                    sections.remove(section)
                except ValueError:
                    pass
            kill = self.kill
            if kill is None:
                return
            effective = not sections
            deliver = self._deliverable() if exc is None else None
        if kill is not None and kill.deferred and effective:
            self.terminator._kill_effective(self, section)
        if deliver is not None:
            raise deliver

    # -- hooks ------------------------------------------------------------------

    def save_checkpoint(self, state: Any) -> None:
        self.last_checkpoint = state
        store = self.terminator.store
        if store is not None:
            store.save_checkpoint(self.id, state)

    def run_hooks(self, *, include_rollback: bool, by_terminator: bool = False) -> None:
        """Claim and run hooks LIFO until the stack is empty.

        ``by_terminator``: the terminator's sweep of a workflow it took over;
        it closes the stack as it finds it empty (see ``HookStack``).
        """
        stack = self._hooks
        if stack is None:
            if not by_terminator:
                return
            with self.lock:
                stack = self._hooks
                if stack is None:
                    # Nothing to sweep; whatever is pushed from now on is refused.
                    self._hooks = HookStack(taken=True, closed=True)
                    return
        term = self.terminator
        started = time.monotonic()
        ran = False
        reraise: BaseException | None = None
        try:
            while True:
                if self.abandoned and not by_terminator:
                    # The terminator took the hooks over (system phase, or a hook
                    # hung): a thread that comes back late must not run them
                    # beside it (LIFO) nor drop the rollbacks of a killed run.
                    return
                hook = stack.claim(include_rollback=include_rollback, by_terminator=by_terminator)
                if hook is None:
                    return
                ran = True
                if by_terminator:
                    term._run_hook_bounded(self, stack, hook)
                else:
                    # A KeyboardInterrupt/SystemExit in a hook is re-raised once
                    # every other hook has run.
                    exc = term._run_hook_inline(self, stack, hook)
                    reraise = reraise or exc
        finally:
            if ran:
                term._observe_cleanup(time.monotonic() - started)
            if reraise is not None:
                raise reraise

    # -- lifecycle ----------------------------------------------------------------

    def done_event(self) -> threading.Event:
        """Set once the workflow ended, its hooks ran and its events were delivered."""
        with self.lock:
            ev = self._done
            if ev is None:
                ev = self._done = threading.Event()
                if self._delivered:
                    ev.set()
            return ev

    def _mark_ended(self) -> None:
        """Record the end (hooks ran); waiters are woken by ``_set_done``."""
        with self.lock:
            self.ended_at = time.monotonic()
            ev = self._ended_ev
        if ev is not None:
            ev.set()

    def wait_ended(self, timeout: float | None) -> bool:
        """Wait for the end without waiting for its audit events (the dispatcher's own wait)."""
        with self.lock:
            ev = self._ended_ev
            if ev is None:
                ev = self._ended_ev = threading.Event()
                if self.ended_at is not None:
                    ev.set()
        return ev.wait(timeout)

    def _set_done(self) -> None:
        # Called by the audit dispatcher (EventPipe.call_when_delivered): waiters
        # need no flush round trip of their own. Idempotent.
        with self.lock:
            self._delivered = True
            ev = self._done
        if ev is not None:
            ev.set()

    def transition(self, new: WorkflowState) -> WorkflowState:
        """Move to ``new`` through the table (lock held); return the old state."""
        old = self.state
        check_transition(self.id, old, new)
        self.state = new
        return old


def _check_id(workflow_id: object) -> str:
    if not isinstance(workflow_id, str):
        raise InvalidArgumentType(f"workflow id must be a str (got {workflow_id!r})")
    if not workflow_id:
        raise InvalidArgumentType("workflow id must not be empty (got '')")
    return workflow_id


def _check_opt_str(name: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be a str or None (got {value!r})")
    return value


def _check_depends(depends_on: Iterable[str]) -> tuple[str, ...]:
    if isinstance(depends_on, str):
        raise InvalidArgumentType(
            f"depends_on must be an iterable of workflow ids, not a string (got {depends_on!r})"
        )
    try:
        ids = tuple(depends_on)
    except TypeError:
        raise InvalidArgumentType(
            f"depends_on must be an iterable of workflow ids (got {depends_on!r})"
        ) from None
    for dep in ids:
        if not isinstance(dep, str) or not dep:
            raise InvalidArgumentType(f"depends_on must hold non-empty strings (got {dep!r})")
    return ids


class WorkflowContext:
    """What ``workflow(...)`` returns: a sync/async context manager and a decorator.

    Entering registers a new ``Workflow`` with the terminator and yields it;
    leaving runs its hooks and records its final state. A ``Terminated`` raised
    by this workflow's own kill is absorbed here (the workflow is the kill's
    boundary, like a cancel scope); check ``wf.state`` afterwards. Any other
    exception propagates after the rollback hooks ran.
    """

    __slots__ = (
        "_cascade",
        "_depends_on",
        "_id",
        "_owner",
        "_team",
        "_terminator",
        "_token",
        "_wf",
    )

    def __init__(
        self,
        workflow_id: str,
        owner: str | None,
        team: str | None,
        depends_on: tuple[str, ...],
        terminator: Terminator | None,
        cascade: bool = True,
    ) -> None:
        self._id = workflow_id
        self._cascade = cascade
        self._owner = owner
        self._team = team
        self._depends_on = depends_on
        self._terminator = terminator
        self._wf: Workflow | None = None
        self._token: Any = None

    def _clone(self) -> WorkflowContext:
        return WorkflowContext(
            self._id, self._owner, self._team, self._depends_on, self._terminator, self._cascade
        )

    def _start(self) -> Workflow:
        if self._wf is not None:
            raise InvalidArgumentType(
                f"workflow {self._id!r} context is already in use; call workflow(...) again"
            )
        term = self._terminator
        if term is None:
            from ._terminator import get_terminator

            term = get_terminator()
        parent = _current.get(None)
        if parent is not None:
            if parent.probe is not None:
                parent.probe(parent, "workflow_enter", self._id)
            # No new work inside a workflow that is being killed.
            parent.deliver()
            if parent.kill is not None:
                raise Terminated(parent.id, parent.kill_reason)
        wf = term._register(self._id, self._owner, self._team, self._depends_on, parent)
        wf.cascade = self._cascade
        self._wf = wf
        self._token = _current.set(wf)
        return wf

    def _outcome(self, wf: Workflow, exc: BaseException | None) -> tuple[WorkflowState, bool]:
        """The final state the exit path aims for, and whether to absorb ``exc``."""
        if exc is None:
            return S.COMPLETED, False
        if isinstance(exc, Terminated) and wf.kill is not None:
            return S.TERMINATED, True
        if isinstance(exc, Terminated) and exc.workflow_id == wf.id:
            return S.TERMINATED, True
        return S.FAILED, False

    def _finish(self, wf: Workflow, outcome: WorkflowState) -> None:
        try:
            wf.run_hooks(include_rollback=outcome is not S.COMPLETED)
        finally:
            wf.terminator._finish(wf, outcome)

    # -- sync -------------------------------------------------------------------

    def __enter__(self) -> Workflow:
        wf = self._start()
        wf.thread = threading.current_thread()
        wf.terminator._started(wf)
        return wf

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        wf = self._wf
        assert wf is not None
        try:
            outcome, absorb = self._outcome(wf, exc)
            wf.outcome = outcome
            self._finish(wf, outcome)
        finally:
            _current.reset(self._token)
            self._wf = None
            self._token = None
        if (exc is None or absorb) and wf.parent is not None:
            # Leaving a child workflow is a cancellation point of the parent: a
            # parent killed meanwhile must not run on (and end "completed").
            _leave_child(wf.parent, wf.id)
        return absorb

    # -- async ------------------------------------------------------------------

    async def __aenter__(self) -> Workflow:
        wf = self._start()
        try:
            wf.backend, wf._loop_call = _loop_caller()
            wf.thread = threading.current_thread()
            scope = anyio.CancelScope()
            scope.__enter__()
            wf._scope = scope
        except BaseException:
            wf.terminator._finish(wf, S.FAILED)
            _current.reset(self._token)
            self._wf = None
            raise
        wf.terminator._started(wf)
        if wf.kill is not None:
            scope.cancel()
        return wf

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        wf = self._wf
        assert wf is not None
        scope = wf._scope
        assert scope is not None
        try:
            try:
                # trio's CancelScope.__exit__ returns True when there was no
                # exception at all; only a suppressed exception counts.
                swallowed = bool(scope.__exit__(exc_type, exc, tb)) and exc is not None
            except BaseException as inner:
                swallowed = False
                exc = inner
            if swallowed:
                # The scope swallowed this workflow's own cancellation: its
                # kill landed (what _outcome would say of a Terminated).
                outcome, absorb = S.TERMINATED, True
            else:
                outcome, absorb = self._outcome(wf, exc)
            wf.outcome = outcome
            try:
                if wf.pending_hooks:
                    with anyio.CancelScope(shield=True):
                        await self._run_hooks_async(wf, outcome)
            finally:
                wf.terminator._finish(wf, outcome)
        finally:
            wf._scope = None
            _current.reset(self._token)
            self._wf = None
            self._token = None
        if exc is not None and not absorb and exc_type is None:
            raise exc
        if (exc is None or absorb) and wf.parent is not None:
            _leave_child(wf.parent, wf.id)  # a cancellation point of the parent
        return absorb

    async def _run_hooks_async(self, wf: Workflow, outcome: WorkflowState) -> None:
        stack = wf._hooks
        if stack is None:
            return
        term = wf.terminator
        include_rollback = outcome is not S.COMPLETED
        while True:
            if wf.abandoned:
                return  # the terminator took the hooks over (see Workflow.run_hooks)
            hook = stack.claim(include_rollback=include_rollback)
            if hook is None:
                return
            if hook.is_async:
                await term._run_hook_async(wf, stack, hook)
            else:
                term._run_hook_inline(wf, stack, hook)

    # -- decorator --------------------------------------------------------------

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R | None]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R | None]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if not callable(fn):
            raise InvalidArgumentType(f"workflow(...) decorates a function (got {fn!r})")
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with self._clone():
                    return await fn(*args, **kwargs)
                return None  # the workflow was killed: the kill was absorbed

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with self._clone():
                return fn(*args, **kwargs)
            return None  # the workflow was killed: the kill was absorbed

        return wrapper


def _leave_child(parent: Workflow, child_id: str) -> None:
    """The parent's cancellation point after one of its children ended."""
    if parent.probe is not None:
        parent.probe(parent, "workflow_exit", child_id)
    parent.deliver()


def _call(fn: Callable[[], object]) -> object:
    return fn()


class _LoopBatch:
    """Coalesces cross-thread calls into one loop wake-up per batch.

    Killing 10,000 async workflows would otherwise write the loop's self-pipe
    10,000 times; here the first call of a batch schedules one drain and the
    rest join the list it will run. The list holds each call as two items,
    the function and its argument, so that a call needs no new object.
    """

    __slots__ = ("__weakref__", "_call", "_lock", "_pending")

    def __init__(self, call: Callable[[Callable[[], object]], object]) -> None:
        self._call = call
        self._lock = threading.Lock()
        self._pending: list[Any] = []  # fn, arg, fn, arg, ...

    def call(self, fn: Callable[[Any], object], arg: Any) -> None:
        """Run ``fn(arg)`` soon in the loop's thread.

        Raises:
            RuntimeError: the loop is closed.
        """
        with self._lock:
            pending = self._pending
            pending.append(fn)
            pending.append(arg)
            if len(pending) > 2:
                return
        try:
            self._call(self._drain)
        except BaseException:
            with self._lock:
                self._pending.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for i in range(0, len(items), 2):
            fn = items[i]
            try:
                fn(items[i + 1])
            except Exception:
                logging.getLogger("termsafe").exception(
                    "termsafe: loop callback %r failed", items[i + 1] if fn is _call else fn
                )


_batches: weakref.WeakKeyDictionary[Any, _LoopBatch] = weakref.WeakKeyDictionary()
_batches_lock = threading.Lock()


def _batch_for(key: Any, call: Callable[[Callable[[], object]], object]) -> _LoopBatch:
    with _batches_lock:
        try:
            batch = _batches.get(key)
        except TypeError:  # not weak-referenceable: no sharing, still correct
            return _LoopBatch(call)
        if batch is None:
            batch = _batches[key] = _LoopBatch(call)
        return batch


def _loop_caller() -> tuple[str, _LoopBatch]:
    """The running backend's name and its loop's batch of thread-safe, non-blocking calls."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio", _batch_for(loop, loop.call_soon_threadsafe)
    import trio

    token = trio.lowlevel.current_trio_token()
    return "trio", _batch_for(token, token.run_sync_soon)


def workflow(
    workflow_id: str,
    *,
    owner: str | None = None,
    team: str | None = None,
    depends_on: Iterable[str] = (),
    terminator: Terminator | None = None,
    cascade: bool = True,
) -> WorkflowContext:
    """Run a block or function as a workflow that can be killed safely.

    ``with workflow("nightly", owner="alice") as wf: ...``,
    ``async with workflow(...)``, or ``@workflow("nightly")`` on a sync or
    async function (each call runs a fresh workflow with that id). The body
    runs with the workflow in scope (``current_workflow()``), in threads
    started by ``anyio.to_thread`` and tasks it spawns too.

    On leaving: success runs the cleanup hooks (rollback hooks are dropped) and
    records ``completed``; an exception runs every hook LIFO, records
    ``failed`` and propagates; this workflow's own kill runs every hook LIFO,
    records ``terminated`` and is absorbed (a decorated function then returns
    ``None``).

    Args:
        workflow_id: Unique among the terminator's live workflows.
        owner: The owner's principal id; the owner may kill the workflow.
        team: The team; its team leads may kill the workflow.
        depends_on: Ids of workflows this one depends on. When one of them is
            terminated or killed, this workflow is notified (a
            ``dependency_ended`` event and the terminator's dependency
            listeners) and, with ``cascade=True``, terminated too.
        terminator: Defaults to ``get_terminator()``.
        cascade: ``False`` to be notified only, not terminated, when a
            dependency is terminated or killed.

    Returns:
        A ``WorkflowContext``.

    Raises:
        InvalidArgumentType: an argument has the wrong type or the id is empty.
        DuplicateWorkflow: on entry, when a live workflow already has the id.
        Terminated: on entry inside a workflow that is being killed.
    """
    if terminator is not None:
        from ._terminator import Terminator

        if not isinstance(terminator, Terminator):
            raise InvalidArgumentType(f"terminator must be a Terminator (got {terminator!r})")
    return workflow_context(workflow_id, owner, team, depends_on, terminator, cascade)


def workflow_context(
    workflow_id: str,
    owner: str | None,
    team: str | None,
    depends_on: Iterable[str],
    terminator: Terminator | None,
    cascade: bool,
) -> WorkflowContext:
    """``workflow()`` for a caller that knows ``terminator`` is a ``Terminator`` (or ``None``).

    ``Terminator.workflow`` calls it directly: an import statement in a
    function costs a lookup on every workflow started.

    Raises:
        InvalidArgumentType: as for ``workflow()``.
    """
    if not isinstance(cascade, bool):
        raise InvalidArgumentType(f"cascade must be a bool (got {cascade!r})")
    return WorkflowContext(
        _check_id(workflow_id),
        _check_opt_str("owner", owner),
        _check_opt_str("team", team),
        _check_depends(depends_on),
        terminator,
        cascade,
    )


def current_workflow() -> Workflow | None:
    """The workflow in scope in this thread or task, or ``None``."""
    return _current.get()


def checkpoint(state: Any = None) -> None:
    """A cancellation point; also saves ``state`` as the workflow's checkpoint.

    Cheap when no kill is pending. Outside a workflow it does nothing.

    Args:
        state: If not ``None``, recorded as ``current_workflow().last_checkpoint``
            (and in the durable store when the terminator has one).

    Raises:
        Terminated: a kill is pending and no critical section is open.
        ForcedTermination: the forced phase has begun, or an open section's
            grace period ran out.
    """
    wf = _current.get()
    if wf is None:
        return
    if state is not None:
        wf.save_checkpoint(state)
    if wf.probe is not None:
        wf.probe(wf, "checkpoint", None)
    if wf.kill is not None:
        wf.deliver()


def sleep(seconds: float) -> None:
    """Sleep in a thread workflow, waking at once when a kill may land.

    Outside a workflow this is ``time.sleep``. In async code use
    ``await anyio.sleep()``, which is already a cancellation point.

    Raises:
        InvalidArgumentType: ``seconds`` is not a number.
        ConfigurationError: ``seconds`` is negative, NaN or infinite.
        Terminated: a kill is pending (or arrives) and may land here.
        ForcedTermination: as for ``checkpoint()``.
    """
    if type(seconds) is float and 0.0 <= seconds < _INF:  # NaN fails the comparison
        duration = seconds  # the common case, without the general validation
    else:
        checked = validate_seconds("seconds", seconds)
        assert checked is not None
        duration = checked
    wf = _current.get()
    if wf is None:
        time.sleep(duration)
        return
    if wf.probe is not None:
        wf.probe(wf, "sleep", None)
    monotonic = time.monotonic
    deadline = monotonic() + duration
    with wf.lock:
        cond = wf._cond
        if cond is None:
            cond = wf._cond = threading.Condition(wf.lock)
        while True:
            if wf.kill is not None:
                exc = wf._deliverable()
                if exc is not None:
                    break
            remaining = deadline - monotonic()
            if remaining <= 0:
                return
            wf._sleepers += 1
            wf._sleep_until = deadline
            try:
                cond.wait(remaining)
            finally:
                wf._sleepers -= 1
    raise exc


def request_termination(reason: str) -> TerminationRequest:
    """Ask for the current workflow to be stopped (workflows may not kill themselves).

    The request is audited and decided by the terminator's request policy
    (``Terminator.set_request_policy``): approved, the kill starts and lands at
    the next cancellation point; denied, nothing happens; escalated (the
    default with no policy), it is recorded for a human to decide.

    Args:
        reason: Why the workflow wants to stop.

    Returns:
        The ``TerminationRequest`` with the policy's verdict.

    Raises:
        NoActiveWorkflow: no workflow is in scope.
        InvalidArgumentType: ``reason`` is not a string.
    """
    wf = _require_workflow("request_termination()")
    return wf.terminator.request_termination(wf, reason)


def _in_scope(what: str) -> Workflow:
    wf = _current.get()
    if wf is None:
        raise NoActiveWorkflow(f"{what} needs a workflow in scope; call it inside workflow(...)")
    return wf


def _require_workflow(what: str) -> Workflow:
    wf = _in_scope(what)
    if wf.abandoned:
        # The terminator took this workflow over: it takes no new request.
        raise ForcedTermination(wf.id, wf.kill_reason)
    return wf


def on_rollback(fn: Callable[[], Any]) -> Hook:
    """Register ``fn`` to run if the current workflow fails or is killed.

    Hooks of both kinds share one LIFO stack and each runs exactly once.
    ``fn`` may be an ``async def`` in an async workflow.

    Returns:
        The ``Hook``; ``current_workflow().hooks.remove(hook)`` deregisters it.

    Raises:
        NoActiveWorkflow: no workflow is in scope.
        InvalidArgumentType: ``fn`` is not callable.
        ForcedTermination: the terminator took the workflow's hooks over (its
            system phase, or a hook that hung). ``fn`` still runs exactly once:
            the terminator's sweep runs it if it is still going; after the
            sweep, it runs at once, here (a coroutine function: handed to a
            terminator worker), before this is raised.
        KeyboardInterrupt: raised by ``fn`` run here (likewise ``SystemExit``).
    """
    return _in_scope("on_rollback()").push_hook(fn, "rollback")


def on_cleanup(fn: Callable[[], Any]) -> Hook:
    """Register ``fn`` to run whenever the current workflow ends, however it ends.

    Returns:
        The ``Hook``; ``current_workflow().hooks.remove(hook)`` deregisters it.

    Raises:
        NoActiveWorkflow: no workflow is in scope.
        InvalidArgumentType: ``fn`` is not callable.
        ForcedTermination: the terminator took the workflow's hooks over (its
            system phase, or a hook that hung). ``fn`` still runs exactly once:
            the terminator's sweep runs it if it is still going; after the
            sweep, it runs at once, here (a coroutine function: handed to a
            terminator worker), before this is raised.
        KeyboardInterrupt: raised by ``fn`` run here (likewise ``SystemExit``).
    """
    return _in_scope("on_cleanup()").push_hook(fn, "cleanup")
