"""The supervisor: run a command as a workflow process and clean up after it however it ends.

``termsafe run -- CMD ...`` (or ``Supervisor(argv).run()``) starts CMD in a
session of its own, registers the run in the store (the child's pid and start
time), and hosts a control socket for it, so ``termsafe kill ID`` works on it
like on any workflow (the run's owner and team decide who may).

A kill (from the socket, ``Supervisor.kill()``, or SIGTERM/SIGINT to the
supervisor) climbs the ladder with the configured ``Phases``:

1. *graceful*: SIGTERM to the child's process group; wait ``graceful`` seconds
   for the child to exit (its own termsafe handlers unwind its workflows);
2. *forced*: SIGTERM to every process of the tree, wherever it went (the
   supervisor is a child subreaper on Linux, so grandchildren that called
   ``setsid`` or lost their parent are still its descendants); wait
   ``forced`` seconds;
3. *system*: SIGKILL to whatever is left.

A second signal escalates one phase at once. When the child has exited,
anything left of its tree is an orphan: it gets SIGTERM, ``forced`` seconds,
then SIGKILL. Then comes the cleanup no process can do for itself after a
SIGKILL: ``recover()`` (temp files, staging folders and git locks of dead
processes, their journaled child trees, the runs they hosted), the run's
final state, the audit events, the dependents' notification, and the
registered cleanup jobs.

Everything the supervisor is about to act on is journaled first (a
``child_process`` entry per process of the tree, owned by the supervisor,
kept up to date every ``JOURNAL_EVERY`` seconds while the command runs; the
command's own entry is written before the command starts, holding a token
its environment carries as ``TERMSAFE_SPAWN_TOKEN``, and gets its pid once
it runs), and
the run stays non-final until the cleanup is done: if the supervisor
itself is SIGKILLed at any point, ``termsafe recover`` finds a run whose
supervisor is gone, stops what is left of the tree and finishes the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import attrs
import psutil

from . import _permissions as perms
from ._control import (
    AccessPolicy,
    ControlServer,
    Peer,
    kill_answer,
    notify_dependents,
    user_name,
)
from ._exceptions import InvalidArgumentType, KillRefused
from ._permissions import Decision, Principal
from ._procs import Identity, current_identity, process_start_time

# At import, not when the command has exited: loading recovery there (~20 ms)
# sat between a kill and the run's final state.
from ._recovery import RecoverReport, recover, stop_processes
from ._states import WorkflowState

if TYPE_CHECKING:
    from ._audit import AuditEvent, AuditSink
    from ._store import SQLiteStore
    from ._terminator import Phases

__all__ = ["RunResult", "Supervisor"]

S = WorkflowState

#: The principal the supervisor acts as for signals and dependency cascades.
SUPERVISOR_PRINCIPAL: Final = Principal("termsafe-supervisor", kind="system", roles=("process",))
PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37
#: Exit codes of a command that could not be started (as a POSIX shell's).
EXIT_NOT_FOUND: Final = 127
EXIT_NOT_EXECUTABLE: Final = 126
_WAKE: Final = b"\0"
#: Seconds between journal updates of the tree while the command runs: what a
#: supervisor SIGKILLed at any moment leaves unjournaled is at most this old.
JOURNAL_EVERY: Final = 1.0
#: ``has_kill_permission`` hands the workflow only to a system principal's policy;
#: a supervised run has no policies, so no workflow object is ever needed.
_NO_WF: Any = None


def _prctl(option: int, value: int) -> int | None:
    """``prctl(option, value)`` on Linux; ``None`` elsewhere or when it fails."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if option == PR_GET_CHILD_SUBREAPER:
        out = ctypes.c_int(0)
        if libc.prctl(option, ctypes.byref(out), 0, 0, 0) != 0:
            return None
        return out.value
    return None if libc.prctl(option, value, 0, 0, 0) != 0 else value


@attrs.frozen
class RunResult:
    """How a supervised run ended (``Supervisor.result``; given to cleanup jobs).

    Attributes:
        run_id: The run.
        workflow_id: The workflow id it ran under.
        state: Its final state: ``completed``, ``failed``, ``terminated`` or ``killed``.
        exit_code: The supervisor's exit code: the child's, 128 + N when signal N
            ended it, 127/126 when it could not be started.
        returncode: ``Popen.returncode`` (negative: the signal), or ``None``
            when the command never started.
        pid: The child's pid (``None`` if it never started).
        survivors: Pids of the tree still alive at the end (should be empty).
        recovery: What the cleanup's ``recover()`` did, if it ran.
    """

    run_id: str
    workflow_id: str
    state: str
    exit_code: int
    returncode: int | None
    pid: int | None
    survivors: tuple[int, ...] = ()
    recovery: RecoverReport | None = None


class _Kill:
    __slots__ = ("by", "escalations", "force", "reason", "requested_at")

    def __init__(self, by: Principal, reason: str, force: bool) -> None:
        self.by = by
        self.reason = reason
        self.force = force
        self.requested_at = time.monotonic()
        self.escalations = 0


class _PipeSink:
    """An ``AuditSink`` that forwards to the supervisor's event pipe (for ``recover``)."""

    def __init__(self, emit: Callable[..., object]) -> None:
        self._emit = emit

    def emit(self, event: AuditEvent) -> None:
        self._emit(event.type, event.workflow_id, event.reason, event.state, dict(event.details))

    def close(self) -> None:
        pass


class Supervisor:
    """Run a command as a supervised workflow process (what ``termsafe run`` does).

    Run it as the main job of a process of its own: ``run()`` makes this
    process a child subreaper (Linux) and reaps the processes of the command's
    tree. Signal forwarding needs the main thread; elsewhere kills come only
    through ``kill()`` and the control socket.

    The child's environment gets ``TERMSAFE_HOME`` (absolute),
    ``TERMSAFE_WORKFLOW_ID`` and ``TERMSAFE_RUN_ID``: a Python child can start
    ``workflow(os.environ["TERMSAFE_WORKFLOW_ID"])`` on a terminator with the
    store to resume from its last checkpoint. It also gets
    ``TERMSAFE_SPAWN_TOKEN``, the token of its journal entry, written before
    it starts: if the supervisor dies before recording the child's pid,
    ``recover()`` finds the child (and descendants that kept it) by the token.

    Args:
        argv: The command and its arguments.
        workflow_id: The run's workflow id (default: the command's name and a
            random suffix).
        owner: The owner's principal id (default: the OS user running this).
        team: The team.
        depends_on: Workflow ids this run depends on: when one of them is
            terminated or killed (anywhere), this run is notified and, with
            ``cascade``, killed.
        cascade: Kill this run when a dependency is terminated or killed.
        phases: The ladder's timing (default ``Phases()``: 5 s + 5 s).
        store: The store (default: the one under ``TERMSAFE_HOME``).
        sink: The audit sink (default: a ``JsonlSink`` at ``<home>/audit.jsonl``);
            ``run()`` closes it when it returns.
        policy: The control socket's access policy (see ``serve_control``).
        control: Host a control socket for the run.
        env: The child's environment (default: this process's), before the
            ``TERMSAFE_*`` variables are added.
        cwd: The child's working directory.
        stderr: Where ``verbose`` progress lines go (default ``sys.stderr``).
        verbose: Print each step (started, phases, cleanup) to ``stderr``.

    Raises:
        InvalidArgumentType: ``argv`` is not a non-empty sequence of strings, or
            another argument has the wrong type.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workflow_id: str | None = None,
        owner: str | None = None,
        team: str | None = None,
        depends_on: Iterable[str] = (),
        cascade: bool = True,
        phases: Phases | None = None,
        store: SQLiteStore | None = None,
        sink: AuditSink | None = None,
        policy: AccessPolicy | str | os.PathLike[str] | None = None,
        control: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stderr: TextIO | None = None,
        verbose: bool = False,
    ) -> None:
        from ._terminator import Phases
        from ._workflow import _check_depends, _check_opt_str

        if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
            raise InvalidArgumentType(
                f"argv must be a sequence of strings, not {type(argv).__name__} (got {argv!r})"
            )
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidArgumentType(
                f"argv must be a non-empty sequence of strings (got {list(argv)!r})"
            )
        if phases is None:
            phases = Phases()
        elif not isinstance(phases, Phases):
            raise InvalidArgumentType(f"phases must be a Phases (got {phases!r})")
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
            raise InvalidArgumentType(f"workflow_id must be a non-empty str (got {workflow_id!r})")
        self.argv = tuple(argv)
        self.run_id = uuid.uuid4().hex
        self.workflow_id = workflow_id or f"{Path(argv[0]).name}-{self.run_id[:8]}"
        self.owner = _check_opt_str("owner", owner) or user_name(os.geteuid())
        self.team = _check_opt_str("team", team)
        self.depends_on = _check_depends(depends_on)
        self.cascade = bool(cascade)
        self.phases = phases
        self.result: RunResult | None = None
        self._store_arg = store
        self._sink_arg = sink
        self._policy = policy
        self._control = bool(control)
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._stderr = stderr
        self._verbose = bool(verbose)
        self._cleanup_jobs: list[Callable[[RunResult], object]] = []
        self._lock = threading.Lock()
        self._kill: _Kill | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._child: Identity | None = None
        self._state = S.PENDING
        self._phase: str | None = None
        self._deadline: float | None = None
        self._escalations_done = 0
        self._sigkilled_child = False
        self._journaled: dict[int, tuple[float, int | None]] = {}
        self._wake_w: int | None = None
        self._emit: Callable[..., object] = _drop
        self._store: SQLiteStore | None = None
        self._tree_signalled: list[int] = []
        self._tree_killed: list[int] = []

    def __repr__(self) -> str:
        return f"<Supervisor {self.workflow_id!r} {self._state.value}>"

    # -- public --------------------------------------------------------------------------

    @property
    def state(self) -> WorkflowState:
        """The run's state."""
        return self._state

    @property
    def pid(self) -> int | None:
        """The child's pid, once it started."""
        return self._popen.pid if self._popen is not None else None

    def add_cleanup_job(self, fn: Callable[[RunResult], object]) -> None:
        """Run ``fn(result)`` after the run ended and was cleaned up (a failure is audited).

        Jobs run in the supervisor; ``termsafe recover`` does not re-run them if
        the supervisor itself died.

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"cleanup job must be callable (got {fn!r})")
        self._cleanup_jobs.append(fn)

    def kill(self, *, by: Principal, reason: str = "", force: bool = False) -> Decision:
        """Ask for the run to be killed; returns at once (the ladder runs in ``run()``).

        Args:
            by: Who asks: the owner, an admin, or a team lead of the run's team.
            reason: Why; recorded in the audit trail.
            force: Start at the forced phase (or escalate a graceful kill to it).

        Returns:
            The ``Decision`` (``allowed``).

        Raises:
            InvalidArgumentType: an argument has the wrong type.
            KillRefused: ``by`` may not kill the run, or it is not running (not
                started, or finished); the refusal is audited.
        """
        perms.check_kill_args(by, reason, force)
        return self._request_kill(by, reason, force, check=True)

    def run(self) -> int:
        """Start the command, supervise it, clean up after it; return the exit code.

        Returns:
            The child's exit code, 128 + N when signal N ended it, 127 when the
            command was not found, 126 when it could not be executed.

        Raises:
            StoreCorrupt: the store's file is not a termsafe store.
            ConfigurationError: the control socket cannot be set up (see
                ``serve_control``).
        """
        from ._audit import JsonlSink
        from ._children import ChildEntry
        from ._events import EventPipe
        from ._store import open_default_store

        store = self._store_arg if self._store_arg is not None else open_default_store()
        self._store = store
        home = store.path.parent.resolve()
        sink = self._sink_arg or JsonlSink(home / "audit.jsonl", fsync="batch")
        pipe = EventPipe(sink, _ignore, _ignore_error)
        actor = {"id": self.owner, "kind": "user", "roles": [], "teams": []}

        def emit(
            type_: str,
            workflow_id: str | None,
            reason: str | None,
            state: str | None,
            details: dict[str, Any],
            who: Mapping[str, Any] | None = None,
        ) -> None:
            pipe.emit(type_, workflow_id, who, reason, state, details)

        self._emit = emit
        previous_reaper = _prctl(PR_GET_CHILD_SUBREAPER, 0)
        if previous_reaper == 0:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        self._wake_w = wake_w
        restore_signals = self._install_signals(wake_w)
        server: ControlServer | None = None
        pidfd: int | None = None
        try:
            if self._control:
                server = ControlServer(_SupervisorTarget(self), home, self._policy, store=store)
            env = dict(self._env if self._env is not None else os.environ)
            env.update(
                TERMSAFE_HOME=str(home),
                TERMSAFE_WORKFLOW_ID=self.workflow_id,
                TERMSAFE_RUN_ID=self.run_id,
            )
            # Journaled before the child exists: a SIGKILL of this process
            # between the fork and the record below leaves an entry that
            # recover() finds the child by, through the token in its environment.
            journal = ChildEntry(store, self.workflow_id, {"run_id": self.run_id})
            try:
                popen = journal.popen(self.argv, env=env, cwd=self._cwd, start_new_session=True)
            except OSError as exc:
                code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
                self._say(f"cannot start {self.argv[0]!r}: {exc}")
                emit(
                    "workflow_failed_to_start",
                    self.workflow_id,
                    str(exc),
                    S.FAILED.value,
                    {"run_id": self.run_id, "argv": list(self.argv), "exit_code": code},
                    actor,
                )
                self._state = S.FAILED
                self.result = RunResult(self.run_id, self.workflow_id, "failed", code, None, None)
                return code
            start = process_start_time(popen.pid)
            child = Identity(current_identity().host, popen.pid, start or 0.0)
            with self._lock:
                self._popen = popen
                self._child = child
                self._state = S.RUNNING
            journal.record(popen.pid, child.start_time)
            self._journaled[popen.pid] = (child.start_time, journal.entry)
            me = current_identity()
            info: dict[str, Any] = {
                "kind": "supervised",
                "supervisor": me.as_dict(),
                "argv": list(self.argv),
                "depends_on": list(self.depends_on),
                "cascade": self.cascade,
            }
            if server is not None:
                info["socket"] = server.path
            store.run_register(
                self.run_id,
                self.workflow_id,
                owner=self.owner,
                team=self.team,
                state=S.RUNNING.value,
                process=child,
                info=info,
            )
            emit(
                "workflow_started",
                self.workflow_id,
                None,
                S.RUNNING.value,
                {
                    "team": self.team,
                    "depends_on": list(self.depends_on),
                    "backend": "process",
                    "parent": None,
                    "run_id": self.run_id,
                    "pid": popen.pid,
                    "argv": list(self.argv),
                },
                actor,
            )
            self._say(f"started {self.workflow_id!r} (run {self.run_id}, pid {popen.pid})")
            pidfd = _pidfd(popen.pid)
            self._supervise(wake_r, pidfd)
            return self._finish()
        finally:
            if server is not None:
                server.close()
            restore_signals()
            self._wake_w = None
            for opened in (wake_r, wake_w, pidfd):
                if opened is not None:
                    with contextlib.suppress(OSError):
                        os.close(opened)
            if previous_reaper == 0:
                _prctl(PR_SET_CHILD_SUBREAPER, 0)
            pipe.close()
            self._emit = _drop

    # -- kill requests (any thread) -----------------------------------------------------

    def _request_kill(
        self, by: Principal, reason: str, force: bool, *, check: bool, signal_: bool = False
    ) -> Decision:
        with self._lock:
            decision = perms.OK
            if check and not perms.has_kill_permission(by, self.owner, self.team, None, _NO_WF):
                decision = perms.NO_PERMISSION
            elif self._popen is None:
                decision = perms.NOT_FOUND
            elif self._state not in (S.RUNNING, S.TERMINATING):
                decision = perms.FINISHED
            fresh = False
            escalate = False
            if decision.allowed:
                kill = self._kill
                if kill is None:
                    self._kill = _Kill(by, reason, force)
                    self._state = S.TERMINATING
                    fresh = True
                elif force or signal_:
                    # A forced kill, or a further signal, escalates one phase.
                    kill.escalations += 1
                    escalate = True
            state = self._state.value
        if not decision.allowed:
            self._emit(
                "kill_refused",
                self.workflow_id,
                reason,
                state,
                {"decision": decision.reason, "run_id": self.run_id},
                by.as_dict(),
            )
            raise KillRefused(self.workflow_id, decision)
        self._emit(
            "kill_requested",
            self.workflow_id,
            reason,
            state,
            {"force": force, "run_id": self.run_id}
            if fresh
            else {"force": force, "already": self._phase, "escalated": escalate},
            by.as_dict(),
        )
        self._wake()
        return decision

    def _wake(self) -> None:
        fd = self._wake_w
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, _WAKE)

    # -- signals --------------------------------------------------------------------------

    def _install_signals(self, wake_w: int) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return _noop
        old_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old: dict[int, Any] = {}

        def nothing(signum: int, frame: object) -> None:
            # The C handler already wrote the signal number to the wake-up fd;
            # the main loop acts on it (never work in a signal handler).
            pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            old[sig] = signal.signal(sig, nothing)

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)

        return restore

    def _drain(self, wake_r: int) -> None:
        try:
            data = os.read(wake_r, 4096)
        except (BlockingIOError, InterruptedError):
            return
        for byte in data:
            if byte in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(byte).name
                self._say(f"{name} received")
                with contextlib.suppress(KillRefused):
                    self._request_kill(
                        SUPERVISOR_PRINCIPAL, f"signal {name}", False, check=False, signal_=True
                    )

    # -- the main loop --------------------------------------------------------------------

    def _supervise(self, wake_r: int, pidfd: int | None) -> None:
        popen = self._popen
        assert popen is not None
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ, "child")
        # Without pidfd, SIGCHLD wakes the loop (main thread); elsewhere, poll.
        poll = None if pidfd is not None else 0.05
        next_sync = time.monotonic() + JOURNAL_EVERY
        try:
            while popen.poll() is None:
                self._advance()
                now = time.monotonic()
                if now >= next_sync:
                    self._journal_sync()
                    next_sync = now + JOURNAL_EVERY
                timeout = next_sync - now if poll is None else min(poll, next_sync - now)
                if self._deadline is not None:
                    timeout = min(timeout, max(0.0, self._deadline - now))
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        self._drain(wake_r)
            self._drain(wake_r)
        finally:
            sel.close()

    def _advance(self) -> None:
        """Start the ladder, climb it on deadlines and escalations."""
        with self._lock:
            kill = self._kill
        if kill is None:
            return
        now = time.monotonic()
        if self._phase is None:
            self._enter_forced(kill) if kill.force else self._enter_graceful(kill)
            return
        if kill.escalations > self._escalations_done:
            self._escalations_done = kill.escalations
            self._next_phase(kill, escalated=True)
        elif self._deadline is not None and now >= self._deadline:
            self._next_phase(kill, escalated=False)

    def _next_phase(self, kill: _Kill, *, escalated: bool) -> None:
        if self._phase == "graceful":
            self._enter_forced(kill, escalated=escalated)
        elif self._phase == "forced":
            self._enter_system(kill, escalated=escalated)

    def _enter_graceful(self, kill: _Kill) -> None:
        popen = self._popen
        assert popen is not None
        self._phase = "graceful"
        self._deadline = kill.requested_at + self.phases.graceful
        self._store_state(S.TERMINATING)
        self._journal_procs(self._tree())
        # The child leads its own process group (start_new_session), and it is
        # not reaped yet, so its pid still names that group.
        if popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGTERM)
        self._say(f"graceful: SIGTERM to process group {popen.pid}")
        self._phase_event(kill, "graceful", {"signal": "SIGTERM", "to": "process group"})

    def _enter_forced(self, kill: _Kill, *, escalated: bool = False) -> None:
        self._phase = "forced"
        self._deadline = time.monotonic() + self.phases.forced
        self._store_state(S.TERMINATING)
        procs = self._tree()
        self._journal_procs(procs)
        pids = self._signal(procs, signal.SIGTERM)
        self._tree_signalled.extend(pids)
        self._say(f"forced: SIGTERM to the whole tree {pids}")
        self._phase_event(
            kill, "forced", {"signal": "SIGTERM", "pids": pids, "escalated": escalated}
        )

    def _enter_system(self, kill: _Kill, *, escalated: bool = False) -> None:
        self._phase = "system"
        self._deadline = None
        procs = self._tree()
        self._journal_procs(procs)
        pids = self._signal(procs, signal.SIGKILL)
        self._tree_killed.extend(pids)
        popen = self._popen
        if popen is not None and popen.pid in pids:
            self._sigkilled_child = True
        self._say(f"system: SIGKILL to {pids}")
        self._phase_event(
            kill, "system", {"signal": "SIGKILL", "pids": pids, "escalated": escalated}
        )

    def _phase_event(self, kill: _Kill, phase: str, details: dict[str, Any]) -> None:
        self._emit(
            "phase_changed",
            self.workflow_id,
            kill.reason,
            S.TERMINATING.value,
            {"phase": phase, "run_id": self.run_id, **details},
        )

    # -- the tree ----------------------------------------------------------------------------

    def _tree(self) -> list[psutil.Process]:
        """Every live process of the command's tree: this process's descendants (a
        subreaper's include reparented orphans) and the child's session."""
        from ._procs import snapshot_tree

        found: dict[int, psutil.Process] = {}
        child = self._child
        popen = self._popen
        born = child.start_time - 0.01 if child is not None else 0.0
        try:
            descendants = psutil.Process().children(recursive=True)
        except psutil.Error:
            descendants = []
        for proc in descendants:
            try:
                # Never a process this host started before the command.
                if proc.create_time() >= born:
                    found.setdefault(proc.pid, proc)
            except psutil.Error:
                continue
        if child is not None and popen is not None and popen.returncode is None:
            for proc in snapshot_tree(child.pid, child.start_time):
                found.setdefault(proc.pid, proc)
        return [p for p in found.values() if _running(p)]

    def _signal(self, procs: list[psutil.Process], sig: int) -> list[int]:
        done = []
        for proc in procs:
            try:
                proc.send_signal(sig)  # checks the start time: never a reused pid
            except psutil.Error:
                continue
            done.append(proc.pid)
        return done

    def _journal_procs(self, procs: Iterable[psutil.Process | tuple[int, float]]) -> None:
        store = self._store
        assert store is not None
        for proc in procs:
            if isinstance(proc, tuple):
                pid, start = proc
            else:
                try:
                    pid, start = proc.pid, proc.create_time()
                except psutil.Error:
                    continue
            if pid in self._journaled:
                continue
            entry = store.journal_add(
                "child_process",
                {"pid": pid, "start_time": start, "run_id": self.run_id},
                self.workflow_id,
            )
            self._journaled[pid] = (start, entry)

    def _journal_sync(self) -> None:
        """Keep the journal naming the tree as it is now (for recover(), should we die)."""
        store = self._store
        child = self._child
        assert store is not None
        procs = self._tree()
        live = {p.pid for p in procs}
        for pid, (start, entry) in list(self._journaled.items()):
            if child is not None and pid == child.pid:
                continue  # the command's own entry stays until the end
            if pid not in live and process_start_time(pid) != start and entry is not None:
                store.journal_remove(entry)
                del self._journaled[pid]
        before = set(self._journaled)
        self._journal_procs(procs)
        added = sorted(set(self._journaled) - before)
        if added:
            self._say(f"journaled {added}")

    def _store_state(self, state: WorkflowState) -> None:
        store = self._store
        assert store is not None
        store.run_set_state(self.run_id, state.value)

    # -- after the child exited -----------------------------------------------------------

    def _stop_leftovers(self) -> list[int]:
        """Stop what is left of the tree (orphans now); return the survivors."""
        leftovers = self._tree()
        if not leftovers:
            return []
        self._journal_procs(leftovers)
        pids = [p.pid for p in leftovers]
        self._say(f"orphans left by the command: {pids}")
        self._emit(
            "orphan_detected",
            self.workflow_id,
            "processes left after the command exited",
            self._state.value,
            {"kind": "process", "pids": pids, "run_id": self.run_id},
        )
        grace = 0.0 if self._phase == "system" else self.phases.forced
        survivors: list[int] = []
        for _round in range(3):
            stopped, survivors = stop_processes(leftovers, grace)
            self._tree_signalled.extend(stopped)
            # Anything forked meanwhile by the orphans is stopped too.
            leftovers = [p for p in self._tree() if p.pid not in survivors]
            if not leftovers:
                break
            grace = 0.0
        return survivors

    def _finish(self) -> int:
        popen = self._popen
        store = self._store
        assert popen is not None
        assert store is not None
        rc = popen.returncode
        assert rc is not None
        exit_code = 128 - rc if rc < 0 else rc
        self._say(f"command exited with {exit_code}")
        survivors = self._stop_leftovers()
        self._emit(
            "process_tree_stopped",
            self.workflow_id,
            self._kill.reason if self._kill is not None else None,
            self._state.value,
            {
                "pid": popen.pid,
                "returncode": rc,
                "signalled": sorted(set(self._tree_signalled)),
                "killed": sorted(set(self._tree_killed)),
                "survivors": survivors,
                "run_id": self.run_id,
            },
        )
        # The tree is dead: forget the journal entries that named it (a
        # survivor's entry stays for recover()).
        for pid, (_start, entry) in list(self._journaled.items()):
            if pid not in survivors and entry is not None:
                store.journal_remove(entry)
                del self._journaled[pid]
        kill = self._kill
        if kill is None:
            final = S.COMPLETED if rc == 0 else S.FAILED
        elif self._sigkilled_child or rc == -signal.SIGKILL:
            final = S.KILLED
        else:
            final = S.TERMINATED
        self._say("cleanup: recovering what dead processes left")
        self._emit(
            "cleanup_started",
            self.workflow_id,
            kill.reason if kill is not None else None,
            self._state.value,
            {"run_id": self.run_id},
        )
        report: RecoverReport | None = None
        try:
            report = recover(store, sink=_PipeSink(self._emit))
        except Exception as exc:
            # The run still gets its final state; what is left stays journaled
            # for the next ``termsafe recover``.
            self._say(f"cleanup failed: {exc}")
            self._emit(
                "cleanup_failed",
                self.workflow_id,
                None,
                self._state.value,
                {"error": f"{type(exc).__name__}: {exc}", "run_id": self.run_id},
            )
        store.run_set_state(self.run_id, final.value, final=True)
        self._state = final
        details: dict[str, Any] = {
            "run_id": self.run_id,
            "exit_code": exit_code,
            "returncode": rc,
            "backend": "process",
        }
        if kill is not None:
            details["kill_latency_ms"] = round((time.monotonic() - kill.requested_at) * 1000, 3)
        self._emit(
            "workflow_finished",
            self.workflow_id,
            kill.reason if kill is not None else None,
            final.value,
            details,
        )
        self._say(f"{self.workflow_id!r} {final.value}")
        result = RunResult(
            self.run_id,
            self.workflow_id,
            final.value,
            exit_code,
            rc,
            popen.pid,
            tuple(survivors),
            report,
        )
        self.result = result
        if final in (S.TERMINATED, S.KILLED):
            told = notify_dependents(store, self.workflow_id)
            if told:
                self._emit(
                    "dependents_notified",
                    self.workflow_id,
                    None,
                    final.value,
                    {"runs": list(told), "run_id": self.run_id},
                )
        for job in self._cleanup_jobs:
            try:
                job(result)
            except Exception as exc:
                self._emit(
                    "cleanup_job_failed",
                    self.workflow_id,
                    None,
                    final.value,
                    {"job": repr(job), "error": repr(exc), "run_id": self.run_id},
                )
        return exit_code

    def _say(self, message: str) -> None:
        if self._verbose:
            out = self._stderr if self._stderr is not None else sys.stderr
            out.write(f"termsafe run[{os.getpid()}]: {message}\n")
            out.flush()

    # -- what the control socket asks -------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        kill = self._kill
        return {
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "owner": self.owner,
            "team": self.team,
            "state": self._state.value,
            "phase": self._phase,
            "kill_reason": kill.reason if kill is not None else None,
            "deferred": False,
            "sections": [],
            "pending_hooks": 0,
            "depends_on": list(self.depends_on),
            "backend": "process",
            "pid": self.pid,
            "argv": list(self.argv),
        }


class _SupervisorTarget:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def _ours(self, workflow_id: str) -> bool:
        return workflow_id in (self.sup.workflow_id, self.sup.run_id)

    def control_kill(
        self,
        who: Principal,
        peer: Peer,
        workflow_id: str,
        reason: str,
        force: bool,
        note: str | None,
    ) -> dict[str, Any]:
        sup = self.sup
        if not self._ours(workflow_id):
            decision, why = "refused", perms.NOT_FOUND.reason
            sup._emit("kill_refused", workflow_id, reason, None, {"decision": why}, who.as_dict())
        else:
            try:
                sup._request_kill(who, reason, force, check=True)
            except KillRefused as exc:
                decision, why = "refused", exc.decision.reason
            else:
                decision, why = "allowed", perms.OK.reason
        details: dict[str, Any] = {
            "op": "kill",
            "peer": peer.as_dict(),
            "decision": decision,
            "why": why,
            "force": force,
            "run_id": sup.run_id,
        }
        if note:
            details["note"] = note
        sup._emit("control_request", workflow_id, reason, None, details, who.as_dict())
        return kill_answer(workflow_id, decision, why, who, peer, note)

    def control_status(self, workflow_id: str) -> dict[str, Any] | None:
        return self.sup._status() if self._ours(workflow_id) else None

    def control_ps(self) -> list[dict[str, Any]]:
        return [self.sup._status()]

    def control_dependency_ended(self, dependency_id: str, state: str) -> list[str]:
        sup = self.sup
        if dependency_id not in sup.depends_on:
            return []
        sup._emit(
            "dependency_ended",
            sup.workflow_id,
            f"dependency {dependency_id!r} was {state}",
            sup.state.value,
            {
                "dependency": dependency_id,
                "dependency_state": state,
                "cascade": sup.cascade,
                "run_id": sup.run_id,
            },
        )
        if sup.cascade:
            with contextlib.suppress(KillRefused):
                sup._request_kill(
                    SUPERVISOR_PRINCIPAL,
                    f"dependency {dependency_id!r} was {state}",
                    False,
                    check=False,
                )
        return [sup.workflow_id]


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _drop(*args: object, **kwargs: object) -> None:
    pass


def _noop() -> None:
    pass


def _ignore(ok: bool) -> None:
    pass


def _ignore_error(event: AuditEvent, exc: BaseException) -> None:
    pass
