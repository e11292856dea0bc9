"""The terminator: the registry of live workflows and the phase ladder of a kill.

A kill moves through three phases, timed from the request:

1. *graceful* (``Phases.graceful`` seconds): the workflow is ``terminating``; no
   new work starts; the kill lands at the next cancellation point outside any
   critical section (async workflows: their cancel scope is cancelled, and
   sections are shielded); hooks run as the workflow unwinds.
2. *forced* (``Phases.forced`` seconds): cancellation points raise
   ``ForcedTermination``; forced actions run (child process trees, emergency
   state save).
3. *system*: whatever still runs is abandoned: the terminator marks the
   workflow ``killed``, runs the remaining hooks itself (each bounded by
   ``hook_timeout``), and counts a thread that is still alive as an orphan.

An open critical section is never cut before its grace period (measured from
the request) has run out, whatever the phase; the system phase waits for
``grace + forced`` so a cut section has a forced window to roll back in.

Locking: the registry lock (``Terminator._lock``) may be taken before a
workflow's lock, never after it. Nothing here blocks a caller of ``kill()``:
deadlines go to the timer thread, events to the audit thread, and the hooks of
an abandoned workflow to a worker thread.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from . import _permissions as perms
from ._alerts import Alert, AlertEngine, AlertThresholds
from ._events import EventPipe
from ._exceptions import (
    ConfigurationError,
    DuplicateWorkflow,
    InvalidArgumentType,
    KillRefused,
    Terminated,
    TerminatorClosed,
    WaitTimeout,
    WorkflowNotFound,
)
from ._hooks import DONE, Hook, HookStack
from ._metrics import MetricsHook, MetricsSnapshot, Recorder
from ._permissions import Decision, KillPolicy, Principal
from ._sections import CriticalSection, SectionKinds, validate_seconds
from ._states import WorkflowState, is_terminal
from ._timer import DeadlineTimer, Entry
from ._workflow import Probe, Workflow, WorkflowContext, workflow_context

if TYPE_CHECKING:
    from ._audit import AuditEvent, AuditSink

__all__ = [
    "PROCESS_PRINCIPAL",
    "KillHandle",
    "KillRequest",
    "Phases",
    "Terminator",
    "TerminationRequest",
    "get_terminator",
]

log = logging.getLogger("termsafe")

S = WorkflowState
# State names as they go into events, read once (``.value`` is a property).
_RUNNING: Final = S.RUNNING._value_
_TERMINATING: Final = S.TERMINATING._value_

#: The principal the terminator acts as for signals and cascades.
PROCESS_PRINCIPAL: Final = Principal("termsafe", kind="system", roles=("process",))
#: The principal an approved ``request_termination()`` is carried out as.
REQUEST_POLICY_PRINCIPAL: Final = Principal("termination-request-policy", kind="system")

RequestVerdict = str  # "approve" | "deny" | "escalate"
RequestPolicy = Callable[[Workflow, str], RequestVerdict]
REQUEST_VERDICTS: Final = ("approve", "deny", "escalate")

#: The interpreter's switch interval (seconds) while ``kill_all`` or
#: ``terminate_all`` runs, if it was shorter: see ``_storm``.
STORM_SWITCH_INTERVAL: Final = 0.05

_storm_lock = threading.RLock()
_storm_depth = 0
_storm_saved = 0.0
_storm_set = 0.0
_storm_generation = 0  # a forked child's storms are not its parent's


@contextlib.contextmanager
def _storm() -> Iterator[None]:
    """Space out forced thread switches while one thread kills many workflows.

    With many busy workflow threads waiting for the GIL, the thread that kills
    them is made to drop it every switch interval (5 ms by default) and then
    waits behind all of them before it runs again: a storm of 10 ms of work
    took hundreds of milliseconds, while the threads it had not reached yet
    kept running. Raising the interval for the storm's duration lets it run
    through; other threads still run whenever it blocks. Concurrent storms
    share one saved value; the last to end restores it, unless someone else
    changed the interval meanwhile.
    """
    global _storm_depth, _storm_saved, _storm_set
    with _storm_lock:
        if _storm_depth == 0:
            _storm_saved = sys.getswitchinterval()
            if _storm_saved < STORM_SWITCH_INTERVAL:
                sys.setswitchinterval(STORM_SWITCH_INTERVAL)
            _storm_set = sys.getswitchinterval()
        _storm_depth += 1
        generation = _storm_generation
    try:
        yield
    finally:
        with _storm_lock:
            # A storm that was running when this process was forked from it
            # belongs to the parent: the child already left it.
            if generation == _storm_generation:
                _storm_depth -= 1
                if _storm_depth == 0 and sys.getswitchinterval() == _storm_set:
                    sys.setswitchinterval(_storm_saved)


def _storm_before_fork() -> None:
    # Held across the fork: a child never starts between a storm's interval
    # change and its count (the lock is only ever held for a few statements).
    _storm_lock.acquire()


def _storm_after_fork_in_parent() -> None:
    _storm_lock.release()


def _storm_after_fork_in_child() -> None:
    """A child forked during a storm starts with none (the storm stays the parent's)."""
    global _storm_depth, _storm_generation
    if _storm_depth and sys.getswitchinterval() == _storm_set:
        sys.setswitchinterval(_storm_saved)
    _storm_depth = 0
    _storm_generation += 1
    _storm_lock.release()  # taken by this thread before the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_storm_before_fork,
        after_in_parent=_storm_after_fork_in_parent,
        after_in_child=_storm_after_fork_in_child,
    )


@attrs.frozen
class TerminationRequest:
    """A workflow's request to be stopped, and what the policy decided.

    Attributes:
        workflow_id: The workflow that asked.
        reason: Why it asked.
        verdict: ``approve`` (the kill is under way), ``deny``, or ``escalate``
            (recorded for a human, who kills it through the normal path).
        handle: The ``KillHandle`` when approved, else ``None``.
    """

    workflow_id: str
    reason: str
    verdict: str
    handle: KillHandle | None = attrs.field(default=None, eq=False)


def _seconds(name: str) -> Callable[[object, attrs.Attribute[float], object], None]:
    def check(_inst: object, _attr: attrs.Attribute[float], value: object) -> None:
        validate_seconds(name, value)

    return check


@attrs.frozen
class Phases:
    """The timing of the phase ladder, in seconds.

    Args:
        graceful: How long the graceful phase lasts before the forced phase.
        forced: How long the forced phase lasts before the system phase.

    Raises:
        InvalidArgumentType: a value is not a number.
        ConfigurationError: a value is negative, NaN or infinite.
    """

    graceful: float = attrs.field(default=5.0, validator=_seconds("graceful"))
    forced: float = attrs.field(default=5.0, validator=_seconds("forced"))


class KillRequest:
    """The terminator's bookkeeping for one kill (internal)."""

    __slots__ = (
        "by",
        "deferred",
        "force",
        "grace_deadline",
        "handle",
        "phase",
        "reason",
        "requested_at",
        "section_timers",
        "system_at",
        "timer",
        "wf",
    )

    def __init__(
        self, wf: Workflow, by: Principal, reason: str, force: bool, requested_at: float
    ) -> None:
        self.wf = wf
        self.by = by
        self.reason = reason
        self.force = force
        self.requested_at = requested_at
        self.phase = "forced" if force else "graceful"
        self.deferred = False
        self.grace_deadline: float | None = None
        self.system_at = 0.0
        self.handle: KillHandle | None = None
        # Its pending deadlines, cancelled when the workflow ends (their
        # entries would otherwise keep it alive until they came due).
        self.timer: Entry | None = None  # the ladder's next: forced, then system
        self.section_timers: list[Entry] | None = None

    def cancel_timers(self, timer: DeadlineTimer) -> None:
        """Drop the deadlines still pending (the workflow ended)."""
        timer.cancel(self.timer, self)
        self.timer = None
        sections = self.section_timers
        if sections is not None:
            self.section_timers = None
            for entry in sections:
                timer.cancel(entry)


class KillHandle:
    """What ``Terminator.kill()`` returns, at once.

    Attributes:
        workflow_id: The workflow being killed.
        by: The principal who asked.
        reason: The reason given.
        force: Whether the kill started at the forced phase.
        deferred: Whether it arrived inside a critical section and waited.
    """

    __slots__ = ("_request", "_wf", "by", "force", "reason", "workflow_id")

    def __init__(self, wf: Workflow, request: KillRequest) -> None:
        self._wf = wf
        self._request = request
        self.workflow_id = wf.id
        self.by = request.by
        self.reason = request.reason
        self.force = request.force

    def __repr__(self) -> str:
        return f"<KillHandle {self.workflow_id!r} {self.state.value}>"

    @property
    def deferred(self) -> bool:
        """Whether the kill arrived inside a critical section."""
        return self._request.deferred

    @property
    def phase(self) -> str:
        """The phase the kill is in: ``graceful``, ``forced`` or ``system``."""
        return self._request.phase

    @property
    def state(self) -> WorkflowState:
        """The workflow's current state."""
        return self._wf.state

    @property
    def done(self) -> bool:
        """Whether the workflow reached its final state and its hooks ran."""
        return self._wf.done_event().is_set()

    def wait(self, timeout: float | None = None) -> WorkflowState:
        """Block until the workflow's final state, with its hooks run and audited.

        Args:
            timeout: Seconds to wait at most; ``None`` waits for the ladder.

        Returns:
            The final state: ``terminated``, ``killed``, or ``completed``/``failed``
            when the workflow ended on its own before the kill landed.

        Raises:
            WaitTimeout: the workflow had not finished within ``timeout``.
        """
        wf = self._wf
        if wf.terminator._pipe.on_dispatcher():
            # An audit listener waiting: the events it would wait for are
            # queued behind the one it is handling.
            if not wf.wait_ended(timeout):
                raise WaitTimeout(self.workflow_id, timeout)
            return wf.state
        if not wf.done_event().wait(timeout):
            raise WaitTimeout(self.workflow_id, timeout)
        return wf.state

    async def wait_async(self, timeout: float | None = None) -> WorkflowState:
        """``wait()`` for async code, without blocking the event loop.

        Raises:
            WaitTimeout: the workflow had not finished within ``timeout``.
        """
        return await anyio.to_thread.run_sync(self.wait, timeout, abandon_on_cancel=True)


class Terminator:
    """Receives kills and carries them out through the phase ladder.

    Args:
        phases: The ladder's timing (default ``Phases()``: 5 s + 5 s).
        sink: Where audit events go (an ``AuditSink``); default a ``LoggingSink``
            on the ``termsafe.audit`` logger.
        store: A durable store for checkpoints (optional).
        hook_timeout: Seconds one hook may run before it is recorded as hung
            and the rest run without it.
        section_grace: Grace overrides per section kind, e.g. ``{"git": 60}``.
        metrics_hook: A ``MetricsHook`` adapter (default: no-op).
        alert_thresholds: Where the alert rules fire (default: the requirements').
        history: How many finished workflows to remember for ``can_kill``.

    Raises:
        InvalidArgumentType: an argument has the wrong type.
        ConfigurationError: a number is out of range.
    """

    def __init__(
        self,
        phases: Phases | None = None,
        sink: AuditSink | None = None,
        store: Any = None,
        *,
        hook_timeout: float = 10.0,
        section_grace: Mapping[str, float] | None = None,
        metrics_hook: MetricsHook | None = None,
        alert_thresholds: AlertThresholds | None = None,
        history: int = 10_000,
    ) -> None:
        if phases is None:
            phases = Phases()
        elif not isinstance(phases, Phases):
            raise InvalidArgumentType(f"phases must be a Phases (got {phases!r})")
        timeout = validate_seconds("hook_timeout", hook_timeout)
        assert timeout is not None
        if alert_thresholds is not None and not isinstance(alert_thresholds, AlertThresholds):
            raise InvalidArgumentType(
                f"alert_thresholds must be an AlertThresholds (got {alert_thresholds!r})"
            )
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ConfigurationError(f"history must be an int >= 0 (got {history!r})")
        if sink is None:
            from ._audit import LoggingSink

            sink = LoggingSink()
        elif not (callable(getattr(sink, "emit", None)) and callable(getattr(sink, "close", None))):
            raise InvalidArgumentType(f"sink must have emit(event) and close() (got {sink!r})")
        self.phases = phases
        self.store = store
        self.hook_timeout = timeout
        self.section_kinds = SectionKinds(section_grace)
        self._history = history
        self._lock = threading.Lock()
        self._live: dict[str, Workflow] = {}
        self._finished: collections.OrderedDict[str, Workflow] = collections.OrderedDict()
        self._policies: dict[str, KillPolicy] = {}
        self._forced_actions: list[Callable[[Workflow], object]] = []
        self._cleanup_jobs: list[Callable[[Workflow], object]] = []
        self._orphans: list[Workflow] = []
        self._orphan_procs: list[Any] = []
        self._timer = DeadlineTimer()
        # Bound once: a kill storm schedules one deadline per kill.
        self._on_sections_due = self._sections_due
        self._on_forced_due = self._forced_due
        self._on_system_due = self._system_due
        self._recorder = Recorder(metrics_hook)
        self._pipe = EventPipe(sink, self._delivered, self._sink_failed)
        self._pipe.add_listener(self._dispatch_alert)
        self._alerts = AlertEngine(alert_thresholds)
        self._alert_listeners: list[Callable[[Alert], object]] = []
        self._dependents: dict[str, set[str]] = {}
        self._dependency_listeners: list[Callable[[Workflow, str, WorkflowState], object]] = []
        self._request_policy: RequestPolicy | None = None
        self._probe: Probe | None = None
        #: The owner of workflows started without one (``serve_control`` sets it
        #: to the OS user of this process).
        self._default_owner: str | None = None
        self._closed = False
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Terminator live={len(self._live)} phases={self.phases}>"

    @property
    def sink(self) -> AuditSink:
        """The audit sink events are delivered to."""
        return self._pipe.sink

    # -- configuration ------------------------------------------------------------

    def workflow(
        self,
        workflow_id: str,
        *,
        owner: str | None = None,
        team: str | None = None,
        depends_on: Iterable[str] = (),
        cascade: bool = True,
    ) -> WorkflowContext:
        """``termsafe.workflow(...)`` bound to this terminator.

        Raises:
            InvalidArgumentType: see ``termsafe.workflow``.
        """
        return workflow_context(workflow_id, owner, team, depends_on, self, cascade)

    def critical_section(self, kind: str, grace: float | None = None) -> CriticalSection:
        """``termsafe.critical_section(...)``, validating ``kind`` against this terminator.

        Raises:
            UnknownSectionKind: ``kind`` is not registered here.
            InvalidArgumentType: see ``termsafe.critical_section``.
            ConfigurationError: see ``termsafe.critical_section``.
        """
        from ._sections import critical_section

        section = critical_section(kind, grace)
        self.section_kinds.grace(kind)
        return section

    def register_section_kind(self, kind: str, grace: float) -> None:
        """Add a critical-section kind, or change a kind's default grace.

        Raises:
            InvalidArgumentType: ``kind`` is not a string or ``grace`` not a number.
            ConfigurationError: ``kind`` is empty or ``grace`` negative/NaN/infinite.
        """
        self.section_kinds.register(kind, grace)

    def register_policy(self, name: str, policy: KillPolicy) -> None:
        """Let ``system`` principals whose id is ``name`` kill when ``policy`` approves.

        ``policy(workflow, principal) -> bool`` is called on every such request;
        an exception counts as a refusal.

        Raises:
            InvalidArgumentType: ``name`` is not a non-empty string or ``policy``
                is not callable.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentType(f"policy name must be a non-empty str (got {name!r})")
        if not callable(policy):
            raise InvalidArgumentType(f"policy {name!r} must be callable (got {policy!r})")
        with self._lock:
            self._policies[name] = policy

    def add_forced_action(self, fn: Callable[[Workflow], object]) -> None:
        """Run ``fn(workflow)`` when a kill enters the forced phase (e.g. kill child trees).

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"forced action must be callable (got {fn!r})")
        self._forced_actions.append(fn)

    def add_cleanup_job(self, fn: Callable[[Workflow], object]) -> None:
        """Run ``fn(workflow)`` after the system phase cleaned up a ``killed`` workflow.

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"cleanup job must be callable (got {fn!r})")
        self._cleanup_jobs.append(fn)

    # -- queries ------------------------------------------------------------------

    def get(self, workflow_id: str) -> Workflow:
        """The live (or recently finished) workflow with this id.

        Raises:
            WorkflowNotFound: no such workflow is known.
        """
        wf = self._live.get(workflow_id) or self._finished.get(workflow_id)
        if wf is None:
            raise WorkflowNotFound(workflow_id)
        return wf

    def workflows(self) -> list[Workflow]:
        """The live workflows, in registration order."""
        with self._lock:
            return list(self._live.values())

    def __len__(self) -> int:
        return len(self._live)

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of the kill metrics (also re-evaluates the orphan alert)."""
        alive = self._orphans_alive()
        self._alert(self._alerts.orphans(alive))
        return self._recorder.snapshot(alive)

    def alert_level(self, rule: str) -> str | None:
        """The current level of an alert rule: ``None``, ``"warning"`` or ``"critical"``."""
        return self._alerts.level(rule)

    def can_kill(self, workflow_id: str, principal: Principal) -> Decision:
        """Pre-kill validation, in the seed's order.

        Checks that the workflow exists, that ``principal`` may kill it, that it
        has not finished, and that it is not inside a critical section.

        Returns:
            A ``Decision``; ``reason`` is "OK" or the first failed check.

        Raises:
            InvalidArgumentType: ``principal`` is not a ``Principal``.
        """
        if not isinstance(principal, Principal):
            raise InvalidArgumentType(f"principal must be a Principal (got {principal!r})")
        return self._decide(workflow_id, principal)[0]

    def _decide(self, workflow_id: str, principal: Principal) -> tuple[Decision, Workflow | None]:
        """``can_kill``'s decision, and the live workflow if it may be killed (else ``None``)."""
        live = self._live.get(workflow_id)
        wf = live if live is not None else self._finished.get(workflow_id)
        if wf is None:
            return perms.NOT_FOUND, None
        if not self._permitted(wf, principal):
            return perms.NO_PERMISSION, None
        if live is None or is_terminal(wf.state):
            return perms.FINISHED, None
        if wf.sections:
            return perms.IN_SECTION, wf
        return perms.OK, wf

    def _permitted(self, wf: Workflow, principal: Principal) -> bool:
        policy = self._policies.get(principal.id) if principal.kind == "system" else None
        return perms.has_kill_permission(principal, wf.owner, wf.team, policy, wf)

    # -- kills ----------------------------------------------------------------------

    def kill(
        self,
        workflow_id: str,
        *,
        by: Principal,
        reason: str = "",
        force: bool = False,
    ) -> KillHandle:
        """Ask for a workflow to be killed; returns at once.

        The kill is validated like ``can_kill`` (a workflow inside a critical
        section is not refused: the kill is deferred), audited, and carried out
        through the phase ladder in the background. Killing a workflow that is
        already terminating returns the same handle (``force=True`` escalates it
        to the forced phase). Workflows started inside it are killed too.

        Args:
            workflow_id: The workflow to kill.
            by: Who asks; checked against the permission model.
            reason: Why; recorded in the audit trail.
            force: Start at the forced phase.

        Returns:
            A ``KillHandle``; ``handle.wait()`` gives the final state.

        Raises:
            InvalidArgumentType: ``by`` is not a ``Principal``, ``reason`` not a
                string, or ``force`` not a bool.
            KillRefused: the workflow does not exist, ``by`` may not kill it, or
                it has finished; ``.decision`` says which. The refusal is audited.
            TerminatorClosed: the terminator is closed.
        """
        perms.check_kill_args(by, reason, force)
        if not isinstance(workflow_id, str):
            raise InvalidArgumentType(f"workflow id must be a str (got {workflow_id!r})")
        return self._kill_checked(workflow_id, by, reason, force)

    def _kill_checked(
        self, workflow_id: str, by: Principal, reason: str, force: bool
    ) -> KillHandle:
        """``kill()`` after its type checks."""
        if self._closed:
            raise TerminatorClosed(f"cannot kill {workflow_id!r}: this terminator is closed")
        # A workflow in a section is not refused: its kill is deferred.
        decision, wf = self._decide(workflow_id, by)
        if wf is None:
            self._refuse(workflow_id, by, reason, decision)
        assert wf is not None
        handle = self._start_kill(wf, by, reason, force)
        assert handle is not None  # a finished workflow was refused
        return handle

    def _refuse(self, workflow_id: str, by: Principal, reason: str, decision: Decision) -> None:
        self._recorder.kill_requested(False)
        wf = self._live.get(workflow_id) or self._finished.get(workflow_id)
        self._pipe.emit(
            "kill_refused",
            workflow_id,
            by.as_dict(),
            reason,
            wf.state.value if wf is not None else None,
            {"decision": decision.reason},
        )
        raise KillRefused(workflow_id, decision)

    def kill_all(self, *, by: Principal, reason: str = "", force: bool = False) -> list[KillHandle]:
        """Kill every live workflow ``by`` may kill; return their handles.

        Workflows ``by`` may not kill are refused (and audited), not raised.
        While it runs, the interpreter's switch interval is raised to
        ``STORM_SWITCH_INTERVAL`` if it was shorter (and set back after,
        unless something else changed it meanwhile): the workflow threads it
        is stopping would otherwise preempt it again and again. The interval
        is process-wide while the storm lasts. A workflow whose lock is held
        when the storm reaches it is killed after the others, with its
        children.

        Raises:
            InvalidArgumentType: as for ``kill()``.
            TerminatorClosed: the terminator is closed.
        """
        perms.check_kill_args(by, reason, force)
        if self._closed:
            raise TerminatorClosed("cannot kill: this terminator is closed")

        def kill(wf: Workflow) -> KillHandle | None:
            try:
                return self._kill_checked(wf.id, by, reason, force)
            except KillRefused:
                return None

        return self._kill_many(self.workflows(), kill)

    def _kill_many(
        self, targets: list[Workflow], kill: Callable[[Workflow], KillHandle | None]
    ) -> list[KillHandle]:
        """Call ``kill(wf)`` for each target as one storm; return the handles in order.

        A workflow whose lock is held (by its own thread, say, which may be
        waiting for the GIL this storm holds) is left until the rest are
        killed, and its children with it: a storm that blocked on it would let
        every other thread run first.
        """
        handles: list[KillHandle | None] = []
        busy: list[tuple[int, Workflow]] = []
        put_off: set[Workflow] = set()
        with _storm():
            for wf in targets:
                # A child waits with its parent, so that the parent's kill, not
                # the child's own, reaches it first (as the cascade's).
                if wf.lock.locked() or (wf.parent is not None and wf.parent in put_off):
                    busy.append((len(handles), wf))
                    put_off.add(wf)
                    handles.append(None)
                    continue
                handles.append(kill(wf))
            for index, wf in busy:
                handles[index] = kill(wf)
        return [h for h in handles if h is not None]

    def terminate_all(self, reason: str, *, force: bool = False) -> list[KillHandle]:
        """Kill every live workflow as the process itself (no permission check).

        For the host shutting down: signal handlers and supervisors call this.
        Only code that owns the process should; it is not reachable from a
        principal's request. Like ``kill_all``, it runs as one storm (the
        interpreter's switch interval raised while it runs). A workflow that
        ends on its own before the storm reaches it is skipped; children are
        killed with their parents.

        Raises:
            InvalidArgumentType: ``reason`` is not a string or ``force`` not a bool.
        """
        if not isinstance(reason, str):
            raise InvalidArgumentType(f"reason must be a str (got {reason!r})")
        if not isinstance(force, bool):
            raise InvalidArgumentType(f"force must be a bool (got {force!r})")

        def kill(wf: Workflow) -> KillHandle | None:
            if wf.parent is not None and wf.parent.kill is not None:
                return None  # killed with its parent
            # Quiet: one that finished since the list was taken has nothing left to kill.
            return self._start_kill(wf, PROCESS_PRINCIPAL, reason, force, quiet=True)

        return self._kill_many(self.workflows(), kill)

    def escalate(self) -> int:
        """Move every kill still in its graceful phase to the forced phase now.

        Returns:
            How many kills were escalated.
        """
        count = 0
        for wf in self.workflows():
            kill = wf.kill
            if kill is not None and kill.phase == "graceful":
                self._phase_forced(wf, kill, escalated=True)
                count += 1
        return count

    def _start_kill(
        self, wf: Workflow, by: Principal, reason: str, force: bool, *, quiet: bool = False
    ) -> KillHandle | None:
        """Kill ``wf`` and, if this is its first kill, the workflows started inside it.

        A workflow that finished without being killed is refused (``KillRefused``,
        audited), or with ``quiet`` skipped (``None``): for the terminator's own
        kills (a cascade, a shutdown, a dependency), where it only means the
        workflow ended between being listed and being reached.
        """
        handle, fresh = self._kill_one(wf, by, reason, force, quiet=quiet)
        if fresh and wf._children is not None:
            self._kill_children(wf, by, reason, force)
        return handle

    def _kill_one(
        self, wf: Workflow, by: Principal, reason: str, force: bool, *, quiet: bool = False
    ) -> tuple[KillHandle | None, bool]:
        """Kill ``wf`` alone; return its handle and whether this was its first kill.

        A workflow that finished without a kill: ``KillRefused``, or ``(None,
        False)`` if ``quiet``.
        """
        now = time.monotonic()
        escalate = False
        sections: Sequence[tuple[str, float]] = ()
        deadlines = (0.0, 0.0)
        with wf.lock:
            if is_terminal(wf.state):
                fresh = False
                request = wf.kill
                finished = request is None or request.handle is None
            else:
                finished = False
                request = wf.kill
                fresh = request is None
                if request is None:
                    request = KillRequest(wf, by, reason, force, now)
                    request.handle = KillHandle(wf, request)
                    wf.kill = request
                    if wf.state is S.PENDING:
                        wf.transition(S.RUNNING)
                    wf.transition(S.TERMINATING)
                    if wf.sections:
                        request.deferred = True
                        request.grace_deadline = now + max(self._grace_of(s) for s in wf.sections)
                    wf.wake()
                else:
                    escalate = force and request.phase == "graceful"
            if fresh and request is not None:
                if wf.sections:
                    sections = [(s.kind, self._grace_of(s)) for s in wf.sections]
                deadlines = self._deadlines_in(force, sections)
                # Emitted under the workflow's lock (emit only queues): once the
                # lock is released the workflow may finish at once, and its
                # "workflow_finished" must not precede the request in the trail.
                self._emit_fresh_kill(wf, by, reason, force, request, sections, deadlines)
        if finished:
            if quiet:
                return None, False
            self._refuse(wf.id, by, reason, perms.FINISHED)
        assert request is not None
        assert request.handle is not None
        if not fresh:
            self._pipe.emit(
                "kill_requested",
                wf.id,
                by.as_dict(),
                reason,
                wf.state.value,
                {"force": force, "already": request.phase, "escalated": escalate},
            )
            if escalate:
                self._phase_forced(wf, request, escalated=True)
            return request.handle, False
        self._recorder.kill_requested(True)
        if wf._loop_call is not None:
            wf.cancel_scope_soon()
        self._schedule(wf, request, now, sections, deadlines)
        return request.handle, True

    def _kill_children(self, wf: Workflow, by: Principal, reason: str, force: bool) -> None:
        # A loop, not recursion: a chain of nested workflows may be deeper than
        # Python's recursion limit.
        todo = [(wf, reason)]
        while todo:
            parent, why = todo.pop()
            for child in parent.children():
                child_why = f"parent workflow {parent.id!r} killed: {why}"
                # Quiet: a child that finished since it was listed has nothing left to kill.
                _, fresh = self._kill_one(child, by, child_why, force, quiet=True)
                if fresh and child._children is not None:
                    # A child killed before was cascaded then, not again now.
                    todo.append((child, child_why))

    def _emit_fresh_kill(
        self,
        wf: Workflow,
        by: Principal,
        reason: str,
        force: bool,
        request: KillRequest,
        sections: Sequence[tuple[str, float]],
        deadlines: tuple[float, float],
    ) -> None:
        actor = by.as_dict()
        forced_in, system_in = deadlines
        self._pipe.emit(
            "kill_requested",
            wf.id,
            actor,
            reason,
            _TERMINATING,
            {
                "force": force,
                "phase": request.phase,
                # Where the ladder stands, for post-mortems (``termsafe timeline``).
                "forced_deadline_in": round(float(forced_in), 3),
                "system_deadline_in": round(float(system_in), 3),
            },
        )
        if request.deferred:
            self._pipe.emit(
                "kill_deferred",
                wf.id,
                actor,
                reason,
                _TERMINATING,
                {
                    "sections": [{"kind": k, "grace": g} for k, g in sections],
                    "grace_deadline_in": round(max(g for _, g in sections), 3),
                },
            )

    def _grace_of(self, section: CriticalSection) -> float:
        try:
            return section.grace
        except Exception:
            # An unknown kind was refused at entry; this is belt and braces.
            return 0.0

    def _deadlines_in(
        self, force: bool, sections: Sequence[tuple[str, float]]
    ) -> tuple[float, float]:
        """Seconds from a kill request to its forced phase and to its system phase."""
        phases = self.phases
        forced_in = 0.0 if force else phases.graceful
        system_in = forced_in + phases.forced
        if sections:
            # A section is never cut before its grace, and then gets a forced window.
            system_in = max(system_in, max(g for _, g in sections) + phases.forced)
        return forced_in, system_in

    def _schedule(
        self,
        wf: Workflow,
        request: KillRequest,
        now: float,
        sections: Sequence[tuple[str, float]],
        deadlines: tuple[float, float],
    ) -> None:
        graces = sorted({g for _, g in sections}) if sections else ()
        forced_in, system_in = deadlines
        system_at = now + system_in
        # Set before any deadline is queued: a zero-length phase fires at once.
        request.system_at = system_at
        timer = self._timer
        if graces:
            request.section_timers = [
                timer.call_at(now + grace, self._on_sections_due, request) for grace in graces
            ]
        if request.force:
            request.timer = timer.call_batched(system_at, self._on_system_due, request)
            self._forced_actions_run(wf, request)
        else:
            # One deadline per kill: the forced phase queues the system phase.
            # Batched: the kills of a storm due in the same millisecond share
            # a heap entry (no entry, heap push or lock hold of their own).
            request.timer = timer.call_batched(now + forced_in, self._on_forced_due, request)

    # Deadline callbacks (timer thread): the request names its workflow.

    def _sections_due(self, request: KillRequest) -> None:
        self._expire_sections(request.wf, request)

    def _forced_due(self, request: KillRequest) -> None:
        self._phase_forced(request.wf, request, escalated=False)

    def _system_due(self, request: KillRequest) -> None:
        self._phase_system(request.wf, request)

    # -- the ladder ---------------------------------------------------------------

    def _phase_forced(self, wf: Workflow, request: KillRequest, *, escalated: bool) -> None:
        with wf.lock:
            if is_terminal(wf.state) or request.phase != "graceful":
                return
            request.phase = "forced"
            wf.wake()
            now = time.monotonic()
            if escalated:
                # The system phase comes a forced window from now, but never cuts
                # a section before its grace (+ forced window) is over.
                system_at = now + self.phases.forced
                if request.grace_deadline is not None:
                    system_at = max(system_at, request.grace_deadline + self.phases.forced)
                request.system_at = min(request.system_at, system_at)
            # The forced deadline, unless it is this call.
            self._timer.cancel(request.timer, request)
            request.timer = self._timer.call_batched(
                request.system_at, self._on_system_due, request
            )
            # Under the lock, so the trail never shows it after "workflow_finished".
            self._pipe.emit(
                "phase_changed",
                wf.id,
                None,
                request.reason,
                wf.state.value,
                {"phase": "forced", "escalated": escalated},
            )
        wf.cancel_scope_soon()
        self._forced_actions_run(wf, request)

    def _forced_actions_run(self, wf: Workflow, request: KillRequest, *, save: bool = True) -> None:
        if save and wf.last_checkpoint is not None:
            self._pipe.emit(
                "emergency_save",
                wf.id,
                None,
                request.reason,
                wf.state.value,
                {"checkpoint": _jsonable(wf.last_checkpoint)},
            )
        for action in self._forced_actions:
            try:
                action(wf)
            except Exception as exc:
                log.exception("termsafe: forced action %r failed for %s", action, wf.id)
                self._pipe.emit(
                    "forced_action_failed",
                    wf.id,
                    None,
                    request.reason,
                    wf.state.value,
                    {"action": repr(action), "error": repr(exc)},
                )

    def _expire_sections(self, wf: Workflow, request: KillRequest) -> None:
        now = time.monotonic()
        expired: list[CriticalSection] = []
        with wf.lock:
            if is_terminal(wf.state):
                return
            for section in wf.sections:
                if not section.expired and request.requested_at + self._grace_of(section) <= now:
                    section.expired = True
                    expired.append(section)
            if expired:
                wf.wake()
            # Queued under the lock so the trail never shows it after the end.
            for section in expired:
                self._pipe.emit(
                    "grace_expired",
                    wf.id,
                    None,
                    request.reason,
                    wf.state.value,
                    {"kind": section.kind, "grace": self._grace_of(section)},
                )
        for section in expired:
            wf.call_in_loop(section.cancel_async)
        if expired and request.phase != "graceful":
            # Forced actions held back by the section (its child processes) may act now.
            self._forced_actions_run(wf, request, save=False)

    def _phase_system(self, wf: Workflow, request: KillRequest) -> None:
        with wf.lock:
            if is_terminal(wf.state) or request.phase == "system":
                return
            if time.monotonic() < request.system_at - 0.001:
                return  # a stale deadline: an escalation moved it
            request.phase = "system"
            wf.take_over()
            wf.transition(S.KILLED)
            wf.wake()
            thread = wf.thread
            orphan = thread is not None and thread.is_alive() and wf.backend == "thread"
        self._pipe.emit(
            "phase_changed",
            wf.id,
            None,
            request.reason,
            S.KILLED.value,
            {"phase": "system", "orphan_thread": orphan},
        )
        if orphan:
            with self._lock:
                self._orphans.append(wf)
            self._observe_orphan("thread")
            self._pipe.emit(
                "orphan_detected",
                wf.id,
                None,
                request.reason,
                S.KILLED.value,
                {"kind": "thread", "thread": thread.name if thread is not None else None},
            )
        stack = wf._hooks
        if stack is not None:
            hung = stack.abandon_running()
            if hung is not None:
                self._hook_timed_out(wf, hung)
        self._start_worker(self._system_cleanup, wf, f"termsafe-cleanup-{wf.id}")

    def _system_cleanup(self, wf: Workflow) -> None:
        try:
            wf.run_hooks(include_rollback=True, by_terminator=True)
        finally:
            for job in self._cleanup_jobs:
                try:
                    job(wf)
                except Exception as exc:
                    log.exception("termsafe: cleanup job %r failed for %s", job, wf.id)
                    self._pipe.emit(
                        "cleanup_job_failed",
                        wf.id,
                        None,
                        wf.kill_reason,
                        wf.state.value,
                        {"job": repr(job), "error": repr(exc)},
                    )
            self._ended(wf, S.KILLED)

    # -- workflow lifecycle (called by _workflow) --------------------------------------

    def _register(
        self,
        workflow_id: str,
        owner: str | None,
        team: str | None,
        depends_on: tuple[str, ...],
        parent: Workflow | None,
    ) -> Workflow:
        if self._closed:
            raise TerminatorClosed(
                f"cannot start workflow {workflow_id!r}: this terminator is closed"
            )
        if owner is None:
            owner = self._default_owner
        wf = Workflow(workflow_id, owner, team, depends_on, self, parent)
        if self.store is not None:
            # Resume: a restarted workflow starts from its last durable checkpoint.
            wf.last_checkpoint = self.store.load_checkpoint(workflow_id)
        if self._timer._thread is None:
            # Now, not at the first kill: a thread started then makes the kill
            # wait until the new thread is scheduled, which under load is long.
            self._timer.start()
        with self._lock:
            if workflow_id in self._live:
                raise DuplicateWorkflow(workflow_id)
            wf.probe = self._probe
            self._live[workflow_id] = wf
            self._finished.pop(workflow_id, None)
            for dep in depends_on:
                self._dependents.setdefault(dep, set()).add(workflow_id)
        if wf.last_checkpoint is not None:
            # Resumed from it: saved again, so that its age counts from now. A
            # retention prune (``checkpoints``) must not take the resume point
            # of a run in progress, which the store cannot see unless a
            # supervisor or control socket registered the run.
            try:
                self.store.save_checkpoint(workflow_id, wf.last_checkpoint)
            except Exception:
                log.exception("termsafe: refreshing the checkpoint of %s failed", workflow_id)
        if parent is not None:
            with parent.lock:
                if parent._children is None:
                    parent._children = []
                parent._children.append(wf)
        return wf

    def _started(self, wf: Workflow) -> None:
        with wf.lock:
            if wf.state is S.PENDING:
                wf.transition(S.RUNNING)
        wf.started_at = time.monotonic()
        self._pipe.emit(
            "workflow_started",
            wf.id,
            {"id": wf.owner, "kind": "user", "roles": [], "teams": []} if wf.owner else None,
            None,
            _RUNNING,
            {
                "team": wf.team,
                "depends_on": list(wf.depends_on),
                "backend": wf.backend,
                "parent": wf.parent.id if wf.parent is not None else None,
            },
        )

    def _finish(self, wf: Workflow, outcome: WorkflowState) -> None:
        """The workflow's own exit path is done (hooks ran); record the final state."""
        with wf.lock:
            late = is_terminal(wf.state)
            if not late:
                if wf.state is S.PENDING:
                    wf.transition(S.RUNNING)
                if outcome is S.TERMINATED and wf.state is S.RUNNING:
                    outcome = S.FAILED
                wf.transition(outcome)
        if late:
            # Terminal is terminal: a workflow the system phase already declared
            # killed came back; record it, change nothing.
            self._pipe.emit(
                "late_finish",
                wf.id,
                None,
                wf.kill_reason,
                wf.state.value,
                {"would_have_been": outcome.value},
            )
            return
        self._ended(wf, outcome)

    def _ended(self, wf: Workflow, final: WorkflowState) -> None:
        wf._mark_ended()
        with self._lock:
            if self._live.get(wf.id) is wf:
                del self._live[wf.id]
                for dep in wf.depends_on:
                    ids = self._dependents.get(dep)
                    if ids is not None:
                        ids.discard(wf.id)
                        if not ids:
                            del self._dependents[dep]
            if self._history:
                self._finished[wf.id] = wf
                while len(self._finished) > self._history:
                    self._finished.popitem(last=False)
        request = wf.kill
        details: dict[str, Any] = {}
        value = final._value_  # not .value: a property, paid on every exit
        if request is not None:
            request.cancel_timers(self._timer)
            latency = time.monotonic() - request.requested_at
            details["kill_latency_ms"] = round(latency * 1000, 3)
            rec = self._recorder
            rec.kill_finished(value, latency)
            alerts = self._alerts
            if value == "killed" or alerts.level("failed_kills") is not None:
                # A kill that succeeded only lowers the failed rate: below the
                # warning level (no alert raised) it cannot raise one.
                self._alert(
                    alerts.failed_kills(rec.kills_failed, rec.kills_succeeded + rec.kills_failed)
                )
        if wf.hook_failures:
            details["hook_failures"] = len(wf.hook_failures)
        if final is S.COMPLETED and wf.last_checkpoint is not None and self.store is not None:
            # Done: a later run under the same id starts afresh, not from here.
            try:
                self.store.clear_checkpoint(wf.id)
            except Exception:
                log.exception("termsafe: clearing the checkpoint of %s failed", wf.id)
        self._pipe.emit(
            "workflow_finished",
            wf.id,
            None,
            (request.reason or None) if request is not None else None,
            value,
            details,
        )
        if final is S.TERMINATED or final is S.KILLED:
            self._notify_dependents(wf, final)
        # Waiters wake once everything up to here reached the sink.
        self._pipe.call_when_delivered(wf._set_done)

    def _kill_effective(self, wf: Workflow, section: CriticalSection) -> None:
        request = wf.kill
        if request is None:
            return
        waited = time.monotonic() - request.requested_at
        self._pipe.emit(
            "kill_effective",
            wf.id,
            None,
            request.reason,
            wf.state.value,
            {"after_section": section.kind, "deferred_for_ms": round(waited * 1000, 3)},
        )

    def _emit(
        self,
        type_: str,
        wf: Workflow | None,
        *,
        actor: Principal | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self._pipe.emit(
            type_,
            wf.id if wf is not None else None,
            actor.as_dict() if actor is not None else None,
            reason,
            wf.state.value if wf is not None else None,
            dict(details or {}),
        )

    # -- hooks ------------------------------------------------------------------------

    def _hook_event(
        self, wf: Workflow, hook: Hook, started: float, error: BaseException | None, ran_by: str
    ) -> None:
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        details = {"hook": hook.name, "kind": hook.kind, "ran_by": ran_by, "ms": duration_ms}
        if error is None:
            self._pipe.emit("hook_ran", wf.id, None, None, wf.state.value, details)
            return
        text = f"{type(error).__name__}: {error}"
        wf.hook_failures.append((hook.name, text))
        self._recorder.hook_failed()
        details["error"] = text
        self._pipe.emit("hook_failed", wf.id, None, None, wf.state.value, details)

    def _hook_timed_out(self, wf: Workflow, hook: Hook) -> None:
        text = f"timed out after {self.hook_timeout:g}s"
        wf.hook_failures.append((hook.name, text))
        self._recorder.hook_failed()
        self._pipe.emit(
            "hook_failed",
            wf.id,
            None,
            None,
            wf.state.value,
            {"hook": hook.name, "kind": hook.kind, "error": text, "hung": True},
        )

    def _call_hook(self, hook: Hook) -> None:
        result = hook.fn()
        if inspect.isawaitable(result):
            awaitable = result

            async def run() -> None:
                await awaitable

            anyio.run(run)

    def _run_hook_inline(
        self, wf: Workflow, stack: HookStack | None, hook: Hook
    ) -> BaseException | None:
        """Run a claimed hook in the calling thread: the unwinding workflow's, or a refused hook's.

        ``stack`` is ``None`` for a hook the closed stack refused: the
        terminator owns the workflow already, so no watchdog hands the rest over.

        Returns a ``BaseException`` that is not an ``Exception`` (KeyboardInterrupt,
        SystemExit) for the caller to re-raise after the remaining hooks.
        """
        started = time.monotonic()
        watchdog = None
        if self.hook_timeout and stack is not None:
            watchdog = self._timer.call_at(
                started + self.hook_timeout, lambda: self._hook_watchdog(wf, stack, hook)
            )
        error: BaseException | None = None
        wf.shield_depth += 1
        try:
            self._call_hook(hook)
        except BaseException as exc:
            error = exc
        finally:
            wf.shield_depth -= 1
            # Returned in time: the watchdog (and the workflow it holds) can go.
            self._timer.cancel(watchdog)
        if stack is None:
            hook.state = DONE
            self._hook_event(wf, hook, started, error, "workflow")
        elif stack.finish(hook):
            self._hook_event(wf, hook, started, error, "workflow")
        if error is not None and not isinstance(error, (Exception, Terminated)):
            return error
        return None

    async def _run_hook_async(self, wf: Workflow, stack: HookStack, hook: Hook) -> None:
        """Await a claimed async hook in the unwinding workflow's task, bounded."""
        started = time.monotonic()
        error: BaseException | None = None
        wf.shield_depth += 1
        try:
            with anyio.move_on_after(self.hook_timeout or None) as scope:
                await hook.fn()
            if scope.cancelled_caught:
                error = TimeoutError(f"timed out after {self.hook_timeout:g}s")
        except Exception as exc:
            error = exc
        finally:
            wf.shield_depth -= 1
        if stack.finish(hook):
            self._hook_event(wf, hook, started, error, "workflow")

    def _run_hook_bounded(self, wf: Workflow, stack: HookStack | None, hook: Hook) -> None:
        """Run a claimed hook for an abandoned workflow, giving up after hook_timeout.

        ``stack`` is ``None`` for a hook the closed stack refused (it was never on it).
        """
        started = time.monotonic()
        box: list[BaseException | None] = [None]

        def target() -> None:
            try:
                self._call_hook(hook)
            except BaseException as exc:
                box[0] = exc

        runner = threading.Thread(target=target, name=f"termsafe-hook-{hook.name}", daemon=True)
        runner.start()
        runner.join(self.hook_timeout or None)
        if runner.is_alive() and (stack is None or stack.abandon_if_running(hook)):
            self._hook_timed_out(wf, hook)
            return
        if stack is None:
            hook.state = DONE
        elif not stack.finish(hook):
            return
        self._hook_event(wf, hook, started, box[0], "terminator")

    def _run_refused_hook(self, wf: Workflow, hook: Hook) -> None:
        """Run a hook pushed after the terminator's sweep closed the stack: now, once, audited.

        A plain function runs here, in the caller's thread, as the workflow's
        own hooks do (shielded: a checkpoint inside it does not raise; no
        watchdog, as nothing is left for one to hand over); a coroutine
        function cannot be awaited from here, so a terminator worker runs it,
        bounded by ``hook_timeout``, as the sweep does. A
        ``KeyboardInterrupt``/``SystemExit`` from the hook propagates.
        """
        if hook.is_async:
            self._start_worker(
                lambda: self._run_hook_bounded(wf, None, hook), None, f"termsafe-hooks-{wf.id}"
            )
            return
        error = self._run_hook_inline(wf, None, hook)
        if error is not None:
            raise error

    def _hook_watchdog(self, wf: Workflow, stack: HookStack, hook: Hook) -> None:
        """A hook the workflow is running overran hook_timeout: run the rest without it."""
        if not stack.abandon_if_running(hook, take_over=True):
            return
        with wf.lock:
            # From now on the terminator owns the hooks: the workflow's thread,
            # when the hung hook returns, must not claim more beside take_over.
            wf.take_over()
        self._hook_timed_out(wf, hook)

        def take_over() -> None:
            outcome = wf.outcome
            include_rollback = outcome is not S.COMPLETED
            wf.run_hooks(include_rollback=include_rollback, by_terminator=True)
            with wf.lock:
                if is_terminal(wf.state):
                    return
                if wf.state is S.TERMINATING:
                    final = S.KILLED
                else:
                    final = outcome if outcome is not None else S.FAILED
                if wf.state is S.RUNNING and final is S.KILLED:
                    final = S.FAILED
                wf.transition(final)
                wf.abandoned = True
            self._ended(wf, final)

        self._start_worker(take_over, None, f"termsafe-hooks-{wf.id}")

    def _start_worker(self, fn: Callable[..., object], arg: Any, name: str) -> None:
        """Run hooks the terminator took over in a thread that ``close()`` waits for."""

        def run() -> None:
            try:
                fn() if arg is None else fn(arg)
            finally:
                with self._workers_lock:
                    self._workers.discard(thread)

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._workers_lock:
            # Started under the lock: close() never sees one it cannot join yet.
            self._workers.add(thread)
            thread.start()

    # -- audit --------------------------------------------------------------------------

    def _delivered(self, ok: bool) -> None:
        self._recorder.event(ok)
        if ok and self._alerts.level("audit_sink") is None:
            return
        self._alert(self._alerts.audit_sink(ok, self._recorder.events_dropped))

    def _sink_failed(self, event: AuditEvent, exc: BaseException) -> None:
        # Already logged and counted by the pipe; _delivered raised the alert.
        pass

    # -- alerts ---------------------------------------------------------------------

    def _observe_cleanup(self, seconds: float) -> None:
        self._recorder.cleanup_finished(seconds)
        self._alert(self._alerts.cleanup_time(seconds))

    def _observe_orphan(self, kind: str, pids: Iterable[int] = ()) -> None:
        """Count an orphan (a thread, or the process ``pids``) and re-evaluate the alert."""
        import psutil

        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        with self._lock:
            self._orphan_procs.extend(procs)
        self._recorder.orphan(kind)
        self._alert(self._alerts.orphans(self._orphans_alive()))

    def _orphans_alive(self) -> int:
        """Orphan threads and processes still alive (forgetting those that ended)."""
        import psutil

        with self._lock:
            keep = [wf for wf in self._orphans if wf.thread is not None and wf.thread.is_alive()]
            self._orphans = keep
            procs = list(self._orphan_procs)
        alive = []
        for proc in procs:
            try:
                # is_running() compares start times, so a reused pid is not "alive".
                if proc.is_running() and proc.status() != "zombie":
                    alive.append(proc)
            except psutil.Error:
                continue  # gone (or unreadable): not an orphan we can see
        with self._lock:
            self._orphan_procs = alive
        return len(keep) + len(alive)

    def _alert(self, alert: Alert | None) -> None:
        if alert is None:
            return
        self._pipe.emit(
            "alert",
            None,
            None,
            alert.message,
            None,
            {
                "rule": alert.rule,
                "severity": alert.severity,
                "value": alert.value,
                "threshold": alert.threshold,
            },
        )

    def _dispatch_alert(self, event: AuditEvent) -> None:
        if event.type != "alert" or not self._alert_listeners:
            return
        d = event.details
        alert = Alert(d["rule"], d["severity"], d["value"], d["threshold"], event.reason or "")
        for fn in list(self._alert_listeners):
            try:
                fn(alert)
            except Exception:
                log.exception("termsafe: alert listener %r failed", fn)

    def add_alert_listener(self, fn: Callable[[Alert], object]) -> None:
        """Call ``fn(alert)`` whenever an alert rule changes level (audit thread).

        Every alert is also an ``alert`` audit event.

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"alert listener must be callable (got {fn!r})")
        self._alert_listeners.append(fn)

    # -- dependents -----------------------------------------------------------------

    def add_dependency_listener(self, fn: Callable[[Workflow, str, WorkflowState], object]) -> None:
        """Call ``fn(dependent, dependency_id, final_state)`` when a dependency of a
        live workflow is terminated or killed (in the thread that ended it).

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"dependency listener must be callable (got {fn!r})")
        self._dependency_listeners.append(fn)

    def _notify_dependents(self, wf: Workflow | str, final: WorkflowState) -> None:
        # ``wf`` is a workflow id when the dependency ran in another process
        # (the control socket was told, see _control.py).
        if not self._dependents:
            return  # nobody depends on anything (changed only under the lock)
        wf_id = wf if isinstance(wf, str) else wf.id
        with self._lock:
            ids = sorted(self._dependents.get(wf_id, ()))
            dependents = [self._live[i] for i in ids if i in self._live]
        for dep in dependents:
            self._pipe.emit(
                "dependency_ended",
                dep.id,
                None,
                f"dependency {wf_id!r} was {final.value}",
                dep.state.value,
                {"dependency": wf_id, "dependency_state": final.value, "cascade": dep.cascade},
            )
            for fn in list(self._dependency_listeners):
                try:
                    fn(dep, wf_id, final)
                except Exception:
                    log.exception("termsafe: dependency listener %r failed", fn)
            if dep.cascade and dep.kill is None and not is_terminal(dep.state):
                # Each dependent is killed once however many paths lead to it;
                # it notifies its own dependents when it ends (transitively).
                self._start_kill(
                    dep,
                    PROCESS_PRINCIPAL,
                    f"dependency {wf_id!r} was {final.value}",
                    False,
                    quiet=True,
                )

    # -- requests from inside a workflow -------------------------------------------------

    def set_request_policy(self, policy: RequestPolicy | None) -> None:
        """Decide ``request_termination()`` calls: ``policy(workflow, reason)``
        returns ``"approve"``, ``"deny"`` or ``"escalate"``.

        Without a policy every request is escalated: recorded for a human.

        Raises:
            InvalidArgumentType: ``policy`` is not callable (or ``None``).
        """
        if policy is not None and not callable(policy):
            raise InvalidArgumentType(f"request policy must be callable (got {policy!r})")
        self._request_policy = policy

    def request_termination(self, wf: Workflow, reason: str) -> TerminationRequest:
        """Record ``wf``'s request to be stopped and apply the request policy.

        Raises:
            InvalidArgumentType: ``reason`` is not a string.
        """
        if not isinstance(reason, str):
            raise InvalidArgumentType(f"reason must be a str (got {reason!r})")
        actor = Principal(wf.id, kind="workflow").as_dict()
        self._pipe.emit("termination_requested", wf.id, actor, reason, wf.state.value, {})
        policy = self._request_policy
        verdict = "escalate"
        error = None
        if policy is not None:
            try:
                verdict = policy(wf, reason)
            except Exception as exc:
                error = repr(exc)
                verdict = "escalate"
            if verdict not in REQUEST_VERDICTS:
                error = f"policy returned {verdict!r} (known: {', '.join(REQUEST_VERDICTS)})"
                verdict = "escalate"
        details: dict[str, Any] = {"verdict": verdict}
        if error is not None:
            details["policy_error"] = error
        self._pipe.emit(
            "termination_request_decided",
            wf.id,
            REQUEST_POLICY_PRINCIPAL.as_dict(),
            reason,
            wf.state.value,
            details,
        )
        handle = None
        if verdict == "approve" and not is_terminal(wf.state):
            handle = self._start_kill(
                wf,
                REQUEST_POLICY_PRINCIPAL,
                f"requested by the workflow: {reason}",
                False,
                quiet=True,
            )
        return TerminationRequest(wf.id, reason, verdict, handle)

    def _set_probe(self, probe: Probe | None) -> None:
        """Call ``probe(workflow, point, detail)`` at every cancellation point.

        Test tooling only (``termsafe.testing``, the pytest plugin): the probe
        runs in the workflow's own thread, before the kill check, so a kill it
        requests lands exactly there. ``point`` is ``checkpoint``, ``sleep``,
        ``section_enter``, ``section_exit``, ``workflow_enter`` or
        ``workflow_exit`` (a child starting or ending, a point of the parent);
        ``detail`` is the section kind or the child's id. Unset, it costs
        ``checkpoint()`` one attribute test.
        """
        with self._lock:
            self._probe = probe
            for wf in self._live.values():
                wf.probe = probe

    def add_event_listener(self, fn: Callable[[AuditEvent], None]) -> None:
        """Call ``fn(event)`` for every audit event, after the sink (audit thread).

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"event listener must be callable (got {fn!r})")
        self._pipe.add_listener(fn)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event so far reached the sink; return whether it did."""
        return self._pipe.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush and close the sink and stop the background threads.

        Hooks the terminator is running for a workflow it took over (system
        phase) finish first, all within ``timeout`` seconds. Live workflows are
        not killed; call ``terminate_all`` first for that.
        """
        self._closed = True
        deadline = time.monotonic() + timeout
        # Hooks the terminator runs (system phase, a hung hook) finish first,
        # within the timeout: a process that exits next must not cut them off.
        with self._workers_lock:
            workers = list(self._workers)
        for thread in workers:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._pipe.close(max(0.0, deadline - time.monotonic()))
        self._timer.stop(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Terminator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _jsonable(value: object) -> object:
    """``value`` if it is plain JSON data, else its repr (events must serialise)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


_default: Terminator | None = None
_default_lock = threading.Lock()


def get_terminator() -> Terminator:
    """The process-wide terminator, created on first use (no threads until a kill)."""
    global _default
    term = _default
    if term is None:
        with _default_lock:
            term = _default
            if term is None:
                term = _default = Terminator()
    return term


def _set_default_terminator(term: Terminator | None) -> Terminator | None:
    """Swap the process-wide terminator (for tests and embedding); return the old one."""
    global _default
    with _default_lock:
        old, _default = _default, term
    return old
