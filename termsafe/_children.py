"""Child processes of a workflow: started in their own session, journaled, and
stopped as a whole tree when the workflow ends or a kill reaches the forced phase.

``spawn`` journals its child *before* starting it: a ``child_process`` entry
holding a random token, which the child gets in its environment as
``TERMSAFE_SPAWN_TOKEN``. Once ``Popen`` returns, the same entry is updated
with the child's pid and start time. A SIGKILL between the fork and that
update leaves an entry without a pid; ``recover()`` then finds the child (and
every descendant that kept the environment) by the token. ``ChildEntry`` is
that machinery on its own: ``git_operation`` starts each git command through
it, and the supervisor its command.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ._exceptions import ForcedTermination, InvalidArgumentType
from ._procs import TreeKill, kill_tree, process_start_time, processes_with_env
from ._safeop import OperationScope
from ._workflow import Workflow

if TYPE_CHECKING:
    from ._store import Store
    from ._terminator import Terminator

__all__ = ["SPAWN_TOKEN_ENV", "ChildEntry", "TrackedProcess", "spawn", "track_process"]

log = logging.getLogger("termsafe")

#: The environment variable ``spawn`` sets in every child it starts: the random
#: token of the child's journal entry, written before the child exists.
SPAWN_TOKEN_ENV: Final = "TERMSAFE_SPAWN_TOKEN"  # noqa: S105 (a variable's name, no secret)
_SPAWN_TOKEN_ENVB: Final = SPAWN_TOKEN_ENV.encode()

_tracked: weakref.WeakKeyDictionary[Workflow, list[TrackedProcess]] = weakref.WeakKeyDictionary()
_armed: weakref.WeakSet[Terminator] = weakref.WeakSet()
_lock = threading.Lock()


class ChildEntry:
    """The ``child_process`` journal entry of a child, written before the child exists.

    The entry holds a random token, which ``popen`` puts in the child's
    environment as ``TERMSAFE_SPAWN_TOKEN``; ``record`` adds the child's pid
    and start time once ``Popen`` returned. If this process dies (SIGKILL)
    in between, the entry has no pid, and ``recover()`` finds the child, and
    every descendant that kept the environment, by the token.

    Args:
        store: Where to journal (``None``: nowhere; the child still gets a token).
        workflow_id: The workflow the entry belongs to, if any.
        payload: More for the entry to hold, from the start (JSON data).

    Attributes:
        token: The child's token.
        entry: The journal entry's id (``None`` without a store, or once forgotten).

    Raises:
        InvalidArgumentType: ``payload`` is not JSON data (from the store).
    """

    __slots__ = ("_payload", "_store", "entry", "token")

    def __init__(
        self,
        store: Store | None,
        workflow_id: str | None,
        payload: Mapping[str, Any] | None = None,
    ) -> None:
        self.token = secrets.token_hex(16)
        self._store = store
        self._payload = {} if payload is None else dict(payload)
        self.entry: int | None = None
        if store is not None:
            self.entry = store.journal_add(
                "child_process", {**self._payload, "token": self.token}, workflow_id
            )

    def environment(self, given: Mapping[Any, Any] | None) -> dict[Any, Any]:
        """``given`` (default: this process's environment) with the token added.

        Args:
            given: The environment the child would get (str or bytes keys).

        Returns:
            A new mapping; ``given`` is left unchanged.
        """
        token = self.token
        if given is None and os.supports_bytes_environ:
            # The bytes view: Popen encodes every str pair again (twice the cost).
            return {**os.environb, _SPAWN_TOKEN_ENVB: token.encode()}
        # One name, one value: an inherited token (this process was spawned
        # too) in the other type would reach the child as a second entry.
        env: dict[Any, Any] = dict(os.environ if given is None else given)
        env.pop(_SPAWN_TOKEN_ENVB, None)
        env[SPAWN_TOKEN_ENV] = token
        return env

    def popen(self, args: Sequence[str] | str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(args, **popen_kwargs)`` with the token in the child's environment.

        Args:
            args: As for ``subprocess.Popen``.
            **popen_kwargs: As for ``subprocess.Popen``; ``env`` (default: this
                process's environment) is copied and gets the token.

        Returns:
            The ``Popen``.

        Raises:
            OSError: the program could not be started (the entry is forgotten).
        """
        popen_kwargs["env"] = self.environment(popen_kwargs.get("env"))
        try:
            return subprocess.Popen(args, **popen_kwargs)
        except Exception:
            # Popen raises an Exception only when no child runs: it failed before
            # the fork, or reaped a child whose exec (or preexec_fn) failed.
            self.forget()
            raise
        except BaseException:
            # Interrupted while waiting for the exec: a child may run, not yet
            # known by its pid. Stop what already carries the token; the entry
            # stays for recovery, should one still be about to exec.
            _stop_carriers(self.token)
            raise

    def record(self, pid: int, start_time: float | None, **more: Any) -> None:
        """Add the child's pid and start time (and ``more``) to the entry.

        Args:
            pid: The child's pid.
            start_time: Its start time (``None``: it is already gone).
            **more: More for the entry to hold (JSON data).
        """
        entry = self.entry
        if entry is None:
            return
        assert self._store is not None
        payload = {**self._payload, **more, "pid": pid, "start_time": start_time}
        payload["token"] = self.token
        self._store.journal_update(entry, payload)

    def forget(self) -> None:
        """Remove the entry (the child is gone, or was never started); idempotent."""
        entry, self.entry = self.entry, None
        if entry is not None:
            assert self._store is not None
            self._store.journal_remove(entry)


class TrackedProcess:
    """A child process registered with a workflow.

    Attributes:
        pid: The child's pid.
        start_time: Its start time (guards against pid reuse).
        popen: The ``Popen`` object, when termsafe started it or was given one.
        result: What stopping the tree did, once it was stopped.
    """

    def __init__(
        self, pid: int, start_time: float | None, popen: subprocess.Popen[Any] | None
    ) -> None:
        self.pid = pid
        self.start_time = start_time
        self.popen = popen
        self.result: TreeKill | None = None
        self._stop_lock = threading.Lock()
        self._scope: OperationScope | None = None
        self._entry: int | None = None

    def __repr__(self) -> str:
        return f"<TrackedProcess pid={self.pid}>"

    def stop(self, *, timeout: float = 5.0, force: bool = False) -> TreeKill:
        """Stop the whole tree (once; later calls return the first result) and reap the child.

        Survivors are reported as orphans on the workflow's terminator.
        """
        with self._stop_lock:
            if self.result is not None:
                return self.result
            result = kill_tree(self.pid, self.start_time, timeout=timeout, force=force)
            if self.popen is not None:
                try:
                    self.popen.wait(timeout=max(timeout, 1.0))
                except subprocess.TimeoutExpired:
                    pass
            self.result = result
        scope = self._scope
        if scope is not None:
            if result.survivors:
                scope.emit("orphan_detected", {"kind": "process", "pids": list(result.survivors)})
                wf = scope.workflow
                if wf is not None:
                    wf.terminator._observe_orphan("process", result.survivors)
            else:
                scope.unjournal(self._entry)
            scope.emit(
                "process_tree_stopped",
                {
                    "pid": self.pid,
                    "signalled": list(result.signalled),
                    "killed": list(result.killed),
                },
            )
        return result


def _kill_tracked(wf: Workflow) -> None:
    """Forced action: kill every tracked tree of ``wf`` at once.

    Not while a critical section is still within its grace: its children are
    part of the work the kill is waiting for. The terminator calls this again
    when the grace runs out.
    """
    with wf.lock:
        if any(not s.expired for s in wf.sections):
            return
    with _lock:
        procs = list(_tracked.get(wf, ()))
    for proc in reversed(procs):
        proc.stop(force=True, timeout=1.0)


def track_process(
    process: subprocess.Popen[Any] | int, *, store: Any = None, stop_timeout: float = 5.0
) -> TrackedProcess:
    """Register a child process (and its future descendants) with the current workflow.

    Its pid and start time go into the crash journal; when the workflow ends
    (however it ends) its whole tree is stopped (SIGTERM, a grace, SIGKILL)
    and reaped; in the forced phase it is SIGKILLed at once. Outside a workflow
    the child is only journaled; call ``stop()`` yourself.

    In a workflow the terminator has taken over (its system phase ran the
    hooks, or is running them), nothing would stop the tree later: it is
    SIGKILLed and reaped here, and ``ForcedTermination`` raised.

    Args:
        process: A ``subprocess.Popen`` or a pid.
        store: Where to journal (default: the workflow's terminator's store,
            else the default store); ``False`` to skip journaling.
        stop_timeout: Seconds between SIGTERM and SIGKILL when the workflow ends.

    Returns:
        The ``TrackedProcess``.

    Raises:
        InvalidArgumentType: ``process`` is neither a ``Popen`` nor a pid.
        ForcedTermination: the terminator has taken the workflow over (the
            tree is stopped).
    """
    if isinstance(process, subprocess.Popen):
        popen: subprocess.Popen[Any] | None = process
        pid = process.pid
    elif isinstance(process, int) and not isinstance(process, bool) and process > 0:
        popen, pid = None, process
    else:
        raise InvalidArgumentType(f"process must be a subprocess.Popen or a pid (got {process!r})")
    tracked = TrackedProcess(pid, process_start_time(pid), popen)
    scope = OperationScope("fs", f"process {pid}", store)
    tracked._entry = scope.journal("child_process", {"pid": pid, "start_time": tracked.start_time})
    _register(tracked, scope, stop_timeout)
    return tracked


def _register(tracked: TrackedProcess, scope: OperationScope, stop_timeout: float) -> None:
    """Hand ``tracked`` to the scope's workflow: stopped when it ends, killed when forced.

    Raises:
        ForcedTermination: the terminator has taken the workflow over; the
            tree is stopped (SIGKILL) already, since nothing would stop it later.
    """
    tracked._scope = scope
    wf = scope.workflow
    if wf is None:
        return

    def stop() -> None:
        # Once the terminator has taken the workflow over, nobody waits for
        # the tree to exit by itself: SIGKILL at once, as the forced phase does.
        tracked.stop(timeout=stop_timeout, force=wf.abandoned)

    # Run here (the tree stopped) and ForcedTermination raised if the takeover
    # came first: its sweep of the hooks may be over.
    scope.on_cleanup(stop)
    term = wf.terminator
    with _lock:
        _tracked.setdefault(wf, []).append(tracked)
        arm = term not in _armed
        if arm:
            _armed.add(term)
    if arm:
        term.add_forced_action(_kill_tracked)
    if wf.abandoned:
        # Taken over since the hook was pushed: the sweep runs it too (a
        # stop runs once), but the caller must not go on with the child.
        tracked.stop(force=True, timeout=1.0)
        raise ForcedTermination(wf.id, wf.kill_reason)


def spawn(
    args: Sequence[str] | str,
    *,
    store: Any = None,
    stop_timeout: float = 5.0,
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` in a new session, tracked by the current workflow.

    The child leads its own session and process group, so a signal to the
    workflow's terminal does not reach it and the whole tree can be stopped
    together. See ``track_process`` for what tracking does.

    The child is journaled before it is started: a ``child_process`` entry
    with a random token, which the child's environment carries as
    ``TERMSAFE_SPAWN_TOKEN`` (``SPAWN_TOKEN_ENV``); when ``Popen`` returns,
    the entry gets the child's pid and start time. If this process is
    SIGKILLed in between, ``recover()`` finds the child by the token.

    Args:
        args: As for ``subprocess.Popen``.
        store: As for ``track_process``.
        stop_timeout: As for ``track_process``.
        **popen_kwargs: Passed to ``subprocess.Popen`` (``start_new_session``
            defaults to ``True``; ``env``, default this process's environment,
            is copied and gets ``TERMSAFE_SPAWN_TOKEN``).

    Returns:
        The ``Popen``; ``popen.termsafe`` is its ``TrackedProcess``.

    Raises:
        OSError: the program could not be started (as ``subprocess.Popen``).
        Terminated: a kill is pending in the current workflow (no new work).
        ForcedTermination: the terminator took the workflow over while the
            child was starting (the child is stopped: nothing would stop it later).
    """
    from ._workflow import current_workflow

    wf = current_workflow()
    if wf is not None:
        _refuse_new_work(wf)
    popen_kwargs.setdefault("start_new_session", True)
    scope = OperationScope("fs", "process", store)
    # Journaled before the child exists: a SIGKILL between the fork and the
    # record below leaves an entry that still finds the child, by its token.
    child = ChildEntry(scope.store, wf.id if wf is not None else None)
    if wf is not None:
        try:
            _refuse_new_work(wf)  # again: a kill may have come during the write
        except BaseException:
            child.forget()
            raise
    popen = child.popen(args, **popen_kwargs)
    start: float | None = None
    try:
        start = process_start_time(popen.pid)
        tracked = TrackedProcess(popen.pid, start, popen)
        scope.name = f"process {popen.pid}"
        child.record(popen.pid, start)
        tracked._entry = child.entry
        # Raises ForcedTermination, the child stopped, if the system phase took
        # the hooks over while the child was starting.
        _register(tracked, scope, stop_timeout)
        popen.termsafe = tracked  # type: ignore[attr-defined]
    except BaseException:
        if popen.poll() is None:  # not reaped (by a stop the terminator ran): still ours
            kill_tree(popen.pid, start, force=True, timeout=1.0)
        popen.wait()
        child.forget()
        raise
    return popen


def _refuse_new_work(wf: Workflow) -> None:
    """Raise the pending kill of ``wf``: no child is started once one is asked for."""
    wf.deliver()
    if wf.kill is not None or wf.abandoned:
        from ._exceptions import Terminated

        raise (ForcedTermination if wf.abandoned else Terminated)(wf.id, wf.kill_reason)


def _stop_carriers(token: str) -> None:
    for proc in processes_with_env(SPAWN_TOKEN_ENV, (token,)).get(token, ()):
        try:
            kill_tree(proc.pid, proc.create_time(), force=True, timeout=1.0)
        except Exception:
            log.exception("termsafe: could not stop process %d started by spawn", proc.pid)
