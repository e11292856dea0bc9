"""Child processes of a workflow: started in their own session, journaled, and
stopped as a whole tree when the workflow ends or a kill reaches the forced phase.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidArgumentType
from ._procs import TreeKill, kill_tree, process_start_time
from ._safeop import OperationScope
from ._workflow import Workflow

if TYPE_CHECKING:
    from ._terminator import Terminator

__all__ = ["TrackedProcess", "spawn", "track_process"]

log = logging.getLogger("termsafe")

_tracked: weakref.WeakKeyDictionary[Workflow, list[TrackedProcess]] = weakref.WeakKeyDictionary()
_armed: weakref.WeakSet[Terminator] = weakref.WeakSet()
_lock = threading.Lock()


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

    Args:
        process: A ``subprocess.Popen`` or a pid.
        store: Where to journal (default: the workflow's terminator's store,
            else the default store); ``False`` to skip journaling.
        stop_timeout: Seconds between SIGTERM and SIGKILL when the workflow ends.

    Returns:
        The ``TrackedProcess``.

    Raises:
        InvalidArgumentType: ``process`` is neither a ``Popen`` nor a pid.
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
    tracked._scope = scope
    tracked._entry = scope.journal("child_process", {"pid": pid, "start_time": tracked.start_time})
    wf = scope.workflow
    if wf is not None:
        scope.on_cleanup(lambda: tracked.stop(timeout=stop_timeout))
        term = wf.terminator
        with _lock:
            _tracked.setdefault(wf, []).append(tracked)
            arm = term not in _armed
            if arm:
                _armed.add(term)
        if arm:
            term.add_forced_action(_kill_tracked)
    return tracked


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

    Args:
        args: As for ``subprocess.Popen``.
        store: As for ``track_process``.
        stop_timeout: As for ``track_process``.
        **popen_kwargs: Passed to ``subprocess.Popen`` (``start_new_session``
            defaults to ``True``).

    Returns:
        The ``Popen``; ``popen.termsafe`` is its ``TrackedProcess``.

    Raises:
        OSError: the program could not be started (as ``subprocess.Popen``).
        Terminated: a kill is pending in the current workflow (no new work).
    """
    from ._workflow import current_workflow

    wf = current_workflow()
    if wf is not None:
        wf.deliver()
        if wf.kill is not None:
            from ._exceptions import Terminated

            raise Terminated(wf.id, wf.kill_reason)
    popen_kwargs.setdefault("start_new_session", True)
    popen: subprocess.Popen[Any] = subprocess.Popen(args, **popen_kwargs)
    try:
        tracked = track_process(popen, store=store, stop_timeout=stop_timeout)
        popen.termsafe = tracked  # type: ignore[attr-defined]
    except BaseException:
        kill_tree(popen.pid, force=True, timeout=1.0)
        popen.wait()
        raise
    return popen
