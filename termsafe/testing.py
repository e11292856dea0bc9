"""Test tooling: land a kill at an exact cancellation point, and try every one.

Two layers:

* ``KillScheduler``, ``Chaos`` and ``AuditEvents`` arm kills on one
  ``Terminator`` and read its audit trail. The pytest plugin
  (``termsafe.pytest_plugin``) hands them out as the ``kill``, ``chaos`` and
  ``audit_events`` fixtures; they work without pytest too.
* ``explore_kills(run, check)`` runs a workflow once to count its
  cancellation points, then once more per point with a kill landing exactly
  there (gracefully, forced, and with the grace of an open critical section
  running out there), and checks the caller's invariant after each run.

How a kill lands *exactly* there: the terminator calls a probe at every
termsafe cancellation point, in the workflow's own thread and before the kill
check (``Terminator._set_probe``). The probe requests the kill synchronously,
so the very cancellation point that called it raises ``Terminated`` (or defers
the kill, inside a critical section). No second thread, no timing: the same
workflow gets the same kill at the same place every time.

The counted cancellation points, in the order a workflow reaches them:
``checkpoint()``, ``sleep()``, entering a critical section (``section_enter``,
before the section opens: a kill there refuses the section), leaving one
(``section_exit``, while it is still open: a kill there is deferred to the
exit), and starting or leaving a child workflow (``workflow_enter``,
``workflow_exit``, counted in the parent). A bare ``await`` in an async
workflow is a cancellation point too, but it is not counted: put a
``checkpoint()`` where a kill should be tried.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from . import _terminator
from ._audit import AuditEvent, MemorySink
from ._exceptions import ConfigurationError, InvalidArgumentType, TermsafeError, WorkflowNotFound
from ._permissions import Principal
from ._sections import validate_seconds
from ._states import WorkflowState, is_terminal
from ._terminator import KillHandle, Phases, Terminator
from ._workflow import Workflow

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "INJECTOR",
    "POINT_KINDS",
    "AuditEvents",
    "CancellationPoint",
    "Chaos",
    "ExplorationReport",
    "KillFailure",
    "KillPoint",
    "KillRun",
    "KillSafetyError",
    "KillScheduler",
    "ScheduledKill",
    "explore_kills",
    "format_event",
    "format_timeline",
    "kill_points",
    "run_with_kill",
]

#: The principal every injected kill is requested as (an admin: it may kill anything).
INJECTOR: Final = Principal("termsafe-testing", roles=("admin",))

#: The kinds of cancellation point the probe counts.
POINT_KINDS: Final = (
    "checkpoint",
    "sleep",
    "section_enter",
    "section_exit",
    "workflow_enter",
    "workflow_exit",
)

#: How long a read of the audit trail waits for the audit queue by default.
FLUSH_TIMEOUT: Final = 10.0

#: Points kept per terminator when locations are not recorded (counting goes on).
_POINT_RECORD_LIMIT: Final = 100_000

#: Frames of these modules are skipped when naming where workflow code was.
_INTERNAL_MODULES: Final = ("termsafe", "contextlib", "functools")

BACKENDS: Final = ("asyncio", "trio")

#: ``run(terminator)``: sync, or ``async def`` (run with ``anyio.run``).
RunFn = Callable[[Terminator], object]
#: ``check()``: raises ``AssertionError`` when the invariant does not hold.
CheckFn = Callable[[], object]


# -- where workflow code was ------------------------------------------------------------


def _is_internal(module: object) -> bool:
    if not isinstance(module, str):
        return False
    return any(module == m or module.startswith(m + ".") for m in _INTERNAL_MODULES)


def _short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def _caller_location() -> str:
    """``file:line in function`` of the innermost frame outside termsafe."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if not _is_internal(frame.f_globals.get("__name__")):
            code = frame.f_code
            return f"{_short_path(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return "<unknown>"


# -- values --------------------------------------------------------------------------------


@attrs.frozen
class CancellationPoint:
    """One cancellation point a workflow reached, as the probe saw it.

    Attributes:
        index: 1-based position among every point the terminator's workflows
            reached (the numbering ``KillPoint.index`` uses).
        workflow_index: 1-based position among the points of its own workflow
            (the numbering ``KillScheduler.at_point`` uses).
        kind: One of ``POINT_KINDS``.
        detail: The section kind for section points, the child's id for
            ``workflow_enter`` and ``workflow_exit``, else ``None``.
        workflow_id: The workflow that reached it.
        sections: Kinds of the critical sections open at that moment,
            outermost first (a section is open at its own ``section_exit``,
            not yet at its ``section_enter``).
        location: ``file:line in function`` of the workflow code that got
            there, or ``""`` when not recorded.
    """

    index: int
    workflow_index: int
    kind: str
    detail: str | None
    workflow_id: str
    sections: tuple[str, ...] = ()
    location: str = ""

    def __str__(self) -> str:
        what = self.kind if self.detail is None else f"{self.kind}({self.detail!r})"
        text = f"cancellation point #{self.workflow_index} of {self.workflow_id!r}: {what}"
        if self.sections:
            text += f" inside {'/'.join(self.sections)}"
        if self.location:
            text += f" at {self.location}"
        return text

    def _identity(self) -> tuple[object, ...]:
        return (self.kind, self.detail, self.workflow_id, self.sections, self.location)


def _check_index(_inst: object, _attr: object, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"index must be an int (got {value!r})")
    if value < 1:
        raise ConfigurationError(f"index must be >= 1 (got {value!r})")


def _check_bool(name: str) -> Callable[[object, object, Any], None]:
    def check(_inst: object, _attr: object, value: Any) -> None:
        if not isinstance(value, bool):
            raise InvalidArgumentType(f"{name} must be a bool (got {value!r})")

    return check


@attrs.frozen
class KillPoint:
    """Where ``explore_kills`` lands one kill; pass it back as ``only=`` to replay it.

    Args:
        index: The 1-based cancellation point, counted over every workflow of
            the run in the order they were reached (``CancellationPoint.index``).
        force: Whether the kill starts at the forced phase (``kill(force=True)``).
        grace_expiry: Whether the grace of every critical section open at that
            point runs out right there, so the section is cut.

    Raises:
        InvalidArgumentType: ``index`` is not an int, or a flag not a bool.
        ConfigurationError: ``index`` is below 1.
    """

    index: int = attrs.field(validator=_check_index)
    force: bool = attrs.field(default=False, validator=_check_bool("force"))
    grace_expiry: bool = attrs.field(default=False, validator=_check_bool("grace_expiry"))


# -- the audit trail, readable -------------------------------------------------------------


def _brief(value: object, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_event(event: AuditEvent) -> str:
    """One audit event as one readable line (used in timelines and failure reports).

    Args:
        event: The event.

    Returns:
        ``seq  time  type  workflow  state  details``, the time in UTC.
    """
    extras = []
    if event.actor is not None and event.actor.get("id"):
        extras.append(f"by={event.actor['id']}")
    if event.reason:
        extras.append(f"reason={_brief(event.reason, 80)!r}")
    extras.extend(
        f"{k}={_brief(v, 40)}" for k, v in event.details.items() if v is not None and v != []
    )
    clock = event.timestamp[11:23] if len(event.timestamp) >= 23 else event.timestamp
    return (
        f"{event.seq:>5}  {clock}  {event.type:<20} {event.workflow_id or '-':<14} "
        f"{event.state or '-':<11}  {' '.join(extras)}"
    ).rstrip()


def format_timeline(events: Iterable[AuditEvent]) -> str:
    """Audit events as a readable timeline, one line each (see ``format_event``).

    Args:
        events: The events, oldest first.

    Returns:
        The lines joined with newlines, or ``"(no events)"``.
    """
    lines = [format_event(e) for e in events]
    return "\n".join(lines) if lines else "(no events)"


class AuditEvents:
    """The audit events of one terminator, read after waiting for its audit queue.

    Collects every event emitted from its creation on (through an event
    listener, so it works whatever the terminator's sink is). The pytest
    ``audit_events`` fixture is one of these.

    Args:
        terminator: The terminator to listen to.
        timeout: Seconds each read waits for queued events to arrive.

    Raises:
        InvalidArgumentType: ``terminator`` is not a ``Terminator``.
    """

    def __init__(self, terminator: Terminator, *, timeout: float = FLUSH_TIMEOUT) -> None:
        if not isinstance(terminator, Terminator):
            raise InvalidArgumentType(f"terminator must be a Terminator (got {terminator!r})")
        self._term = terminator
        self._timeout = timeout
        self._lock = threading.Lock()
        self._events: list[AuditEvent] = []
        terminator.add_event_listener(self._append)

    def _append(self, event: AuditEvent) -> None:
        with self._lock:
            self._events.append(event)

    def __repr__(self) -> str:
        return f"<AuditEvents: {len(self._events)} events>"

    def flush(self) -> None:
        """Wait until every event emitted so far has arrived.

        Raises:
            AssertionError: the audit queue did not drain within the timeout.
        """
        if not self._term.flush(self._timeout):
            raise AssertionError(f"the audit queue did not drain within {self._timeout:g}s")

    def events(self, workflow_id: str | None = None) -> list[AuditEvent]:
        """The events so far, oldest first, optionally of one workflow.

        Args:
            workflow_id: Keep only this workflow's events.

        Returns:
            A new list of events.

        Raises:
            AssertionError: the audit queue did not drain in time.
        """
        self.flush()
        with self._lock:
            events = list(self._events)
        if workflow_id is None:
            return events
        return [e for e in events if e.workflow_id == workflow_id]

    def types(self, workflow_id: str | None = None) -> list[str]:
        """The ``type`` of each event so far, oldest first.

        Args:
            workflow_id: Keep only this workflow's events.

        Returns:
            A list of event types.

        Raises:
            AssertionError: the audit queue did not drain in time.
        """
        return [e.type for e in self.events(workflow_id)]

    def of_type(self, type_: str, workflow_id: str | None = None) -> list[AuditEvent]:
        """The events of one type, oldest first.

        Args:
            type_: The event type, e.g. ``"kill_deferred"``.
            workflow_id: Keep only this workflow's events.

        Returns:
            A list of events.

        Raises:
            AssertionError: the audit queue did not drain in time.
        """
        return [e for e in self.events(workflow_id) if e.type == type_]

    def timeline(self, workflow_id: str | None = None) -> str:
        """The events so far as a readable timeline (see ``format_timeline``).

        Args:
            workflow_id: Keep only this workflow's events.

        Returns:
            One line per event.

        Raises:
            AssertionError: the audit queue did not drain in time.
        """
        return format_timeline(self.events(workflow_id))

    def assert_sequence(self, *types: str, workflow_id: str | None = None) -> None:
        """Assert that these event types occur in this order (other events may come between).

        Args:
            *types: Event types, e.g. ``"kill_requested", "kill_deferred"``.
            workflow_id: Look only at this workflow's events.

        Raises:
            AssertionError: the sequence is not there; the message shows how far
                it matched and the actual timeline.
            InvalidArgumentType: no type was given, or one is not a string.
        """
        if not types or not all(isinstance(t, str) for t in types):
            raise InvalidArgumentType(f"assert_sequence takes event type strings (got {types!r})")
        events = self.events(workflow_id)
        matched: list[AuditEvent] = []
        for event in events:
            if len(matched) < len(types) and event.type == types[len(matched)]:
                matched.append(event)
        if len(matched) == len(types):
            return
        whose = "" if workflow_id is None else f" of {workflow_id!r}"
        missing = types[len(matched)]
        if matched:
            where = f"matched up to {types[len(matched) - 1]!r} (seq {matched[-1].seq}); "
            where += f"no {missing!r} after it"
        else:
            where = f"no {missing!r} at all"
        raise AssertionError(
            f"the audit trail{whose} does not contain the sequence\n"
            f"    {' -> '.join(types)}\n"
            f"{where}. Actual timeline ({len(events)} events):\n"
            + textwrap.indent(format_timeline(events), "    ")
        )

    def __iter__(self) -> Iterator[AuditEvent]:
        return iter(self.events())

    def __len__(self) -> int:
        return len(self.events())


# -- injecting kills -------------------------------------------------------------------------


def _expire_grace(wf: Workflow, kinds: frozenset[str] | None) -> tuple[str, ...]:
    """Make the grace of ``wf``'s open sections (of ``kinds``) run out now.

    What the terminator's timer does when a grace period really runs out, but
    in the workflow's own thread, so it happens at a known point.
    """
    term = wf.terminator
    with wf.lock:
        if wf.kill is None or is_terminal(wf.state):
            return ()
        cut = [s for s in wf.sections if not s.expired and (kinds is None or s.kind in kinds)]
        for section in cut:
            section.expired = True
            # Queued under the lock, as the terminator does: never after the end.
            term._emit(
                "grace_expired",
                wf,
                reason=wf.kill_reason,
                details={"kind": section.kind, "grace": term._grace_of(section), "injected": True},
            )
        if cut:
            wf.wake()
    for section in cut:
        wf.call_in_loop(section.cancel_async)
    return tuple(s.kind for s in cut)


class ScheduledKill:
    """A kill armed by ``KillScheduler``, ``Chaos`` or ``explore_kills``; it fires once.

    Attributes:
        workflow_id: The workflow killed (for ``explore_kills``, set when it
            fires: the top-level workflow of the point).
        trigger: What fires it, in words.
        force: Whether the kill starts at the forced phase.
        reason: The kill's reason, as the audit trail records it.
        point: Where the workflow was when the kill was requested (``None``
            until it fires, and for a timed kill that fired between points).
        handle: The ``KillHandle``, once fired.
        error: What ``Terminator.kill`` raised instead, if it did (e.g.
            ``KillRefused``: the workflow had already finished).
        expired: Kinds of the sections whose grace was made to run out.
    """

    def __init__(
        self,
        terminator: Terminator,
        workflow_id: str | None,
        trigger: str,
        *,
        force: bool,
        reason: str | None = None,
        expire_grace: bool = False,
        expire_kinds: frozenset[str] | None = None,
    ) -> None:
        self._term = terminator
        self.workflow_id = workflow_id
        self.trigger = trigger
        self.force = force
        self.reason = reason or f"termsafe.testing: kill {trigger}"
        self._expire_grace = expire_grace
        self._expire_kinds = expire_kinds
        self._fired = threading.Event()
        self.point: CancellationPoint | None = None
        self.handle: KillHandle | None = None
        self.error: Exception | None = None
        self.expired: tuple[str, ...] = ()

    def __repr__(self) -> str:
        state = "fired" if self.fired else "armed"
        return f"<ScheduledKill {self.workflow_id!r} {self.trigger} force={self.force} {state}>"

    @property
    def fired(self) -> bool:
        """Whether the kill was requested (or tried and refused)."""
        return self._fired.is_set()

    def headline(self) -> str:
        """Say what this kill is, in one line.

        Returns:
            ``kill of 'job' at cancellation point #3 (force=False)``.
        """
        target = "the top-level workflow" if self.workflow_id is None else repr(self.workflow_id)
        return f"kill of {target} {self.trigger} (force={self.force})"

    def describe(self) -> str:
        """Say what this kill is and, once fired, where it was requested.

        Returns:
            One to three lines of text.
        """
        text = self.headline()
        if not self.fired:
            return text + ": not fired yet"
        if self.point is not None:
            text += f"\n  requested at {self.point}"
        else:
            text += "\n  requested from outside the workflow (between cancellation points)"
        if self.expired:
            text += f"; grace of {'/'.join(self.expired)} made to expire there"
        if self.error is not None:
            text += f"\n  refused: {type(self.error).__name__}: {self.error}"
        return text

    def wait(self, timeout: float = FLUSH_TIMEOUT) -> WorkflowState:
        """Wait for the kill to fire and the workflow to reach its final state.

        Args:
            timeout: Seconds to wait in all.

        Returns:
            The workflow's final state.

        Raises:
            AssertionError: the kill did not fire in time, or was refused.
            WaitTimeout: the workflow did not finish in time.
        """
        deadline = time.monotonic() + timeout
        if not self._fired.wait(timeout):
            raise AssertionError(f"{self.headline()} did not fire within {timeout:g}s")
        if self.handle is None:
            raise AssertionError(self.describe())
        return self.handle.wait(max(0.0, deadline - time.monotonic()))

    def _fire(self, at: Workflow | None, point: CancellationPoint | None) -> None:
        """Request the kill now; never raises into the workflow that called the probe."""
        self.point = point
        if self.workflow_id is None:
            root = at
            while root is not None and root.parent is not None:
                root = root.parent
            self.workflow_id = root.id if root is not None else None
        try:
            if self.workflow_id is None:
                raise WorkflowNotFound("<none>")
            self.handle = self._term.kill(
                self.workflow_id, by=INJECTOR, reason=self.reason, force=self.force
            )
        except Exception as exc:
            self.error = exc
        else:
            if self._expire_grace and at is not None:
                self.expired = _expire_grace(at, self._expire_kinds)
        finally:
            self._fired.set()


class _Trigger:
    """Decides, under the hub's lock, whether a point fires a kill."""

    done = False

    def check(self, wf: Workflow, point: CancellationPoint) -> ScheduledKill | None:
        raise NotImplementedError


class _AtPoint(_Trigger):
    def __init__(self, kill: ScheduledKill, n: int, *, overall: bool) -> None:
        self.kill = kill
        self.n = n
        self.overall = overall

    def check(self, wf: Workflow, point: CancellationPoint) -> ScheduledKill | None:
        if self.overall:
            hit = point.index == self.n
        else:
            hit = wf.id == self.kill.workflow_id and point.workflow_index == self.n
        if hit:
            self.done = True
            return self.kill
        return None


class _InSection(_Trigger):
    """At a section's entry (``before_entry``), else at the first point inside it."""

    def __init__(
        self, kill: ScheduledKill, kind: str, occurrence: int, *, before_entry: bool
    ) -> None:
        self.kill = kill
        self.kind = kind
        self.occurrence = occurrence
        self.before_entry = before_entry
        self.seen = 0
        self.inside: Workflow | None = None

    def check(self, wf: Workflow, point: CancellationPoint) -> ScheduledKill | None:
        if self.inside is not None:
            if wf is not self.inside:
                return None
            self.done = True
            return self.kill
        if (
            wf.id == self.kill.workflow_id
            and point.kind == "section_enter"
            and point.detail == self.kind
        ):
            self.seen += 1
            if self.seen == self.occurrence:
                if self.before_entry:
                    self.done = True
                    return self.kill
                # The section opens after this probe returns; the next point
                # of this workflow is inside it (or is its exit).
                self.inside = wf
        return None


class _FirstPoint(_Trigger):
    def __init__(self, kill: ScheduledKill) -> None:
        self.kill = kill

    def check(self, wf: Workflow, point: CancellationPoint) -> ScheduledKill | None:
        if wf.id == self.kill.workflow_id:
            self.done = True
            return self.kill
        return None


class _Hub:
    """The probe installed on one terminator: counts points and fires armed kills."""

    def __init__(self, term: Terminator, *, locations: bool) -> None:
        self.term = term
        self.locations = locations
        self._lock = threading.Lock()
        self.count = 0
        self._per_workflow: dict[Workflow, int] = {}
        self._reached: dict[str, int] = {}
        self.points: list[CancellationPoint] = []
        self._triggers: list[_Trigger] = []
        #: Every kill armed through this hub, in arming (or, for chaos, firing) order.
        self.kills: list[ScheduledKill] = []

    @classmethod
    def attach(cls, term: Terminator, *, locations: bool = False) -> _Hub:
        """The hub of ``term``, installing one if it has none yet."""
        with term._lock:
            probe = term._probe
        if isinstance(probe, _Hub):
            probe.locations = probe.locations or locations
            return probe
        hub = cls(term, locations=locations)
        term._set_probe(hub)
        return hub

    def detach(self) -> None:
        if self.term._probe is self:
            self.term._set_probe(None)

    def arm(self, trigger: _Trigger, kill: ScheduledKill | None = None) -> None:
        with self._lock:
            self._triggers.append(trigger)
            if kill is not None:
                self.kills.append(kill)

    def disarm(self, triggers: Iterable[_Trigger]) -> None:
        gone = set(map(id, triggers))
        with self._lock:
            self._triggers = [t for t in self._triggers if id(t) not in gone]

    def reached(self, workflow_id: str) -> int | None:
        """The most cancellation points one workflow with this id reached."""
        with self._lock:
            return self._reached.get(workflow_id)

    def recorded(self, workflow_id: str | None = None) -> list[CancellationPoint]:
        with self._lock:
            points = list(self.points)
        return [p for p in points if workflow_id is None or p.workflow_id == workflow_id]

    def __call__(self, wf: Workflow, kind: str, detail: str | None) -> None:
        with self._lock:
            self.count += 1
            n = self._per_workflow.get(wf, 0) + 1
            self._per_workflow[wf] = n
            if n > self._reached.get(wf.id, 0):
                self._reached[wf.id] = n
            point = CancellationPoint(
                self.count,
                n,
                kind,
                detail,
                wf.id,
                tuple(s.kind for s in wf.sections),
                _caller_location() if self.locations else "",
            )
            if self.locations or len(self.points) < _POINT_RECORD_LIMIT:
                self.points.append(point)
            due: list[ScheduledKill] = []
            for trigger in self._triggers:
                kill = trigger.check(wf, point)
                if kill is not None:
                    due.append(kill)
            if due:
                self._triggers = [t for t in self._triggers if not t.done]
        if due and not point.location:
            point = attrs.evolve(point, location=_caller_location())
        # Outside the lock: kill() takes the workflow's lock and emits events.
        for kill in due:
            kill._fire(wf, point)


def _check_workflow_id(workflow_id: object) -> str:
    if not isinstance(workflow_id, str) or not workflow_id:
        raise InvalidArgumentType(f"workflow_id must be a non-empty str (got {workflow_id!r})")
    return workflow_id


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{name} must be an int (got {value!r})")
    if value < 1:
        raise ConfigurationError(f"{name} must be >= 1 (got {value!r})")
    return value


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be a bool (got {value!r})")
    return value


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number (got {value!r})")
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{name} must be between 0 and 1 (got {value!r})")
    return float(value)


def _check_terminator(terminator: object) -> Terminator:
    if not isinstance(terminator, Terminator):
        raise InvalidArgumentType(f"terminator must be a Terminator (got {terminator!r})")
    return terminator


class KillScheduler:
    """Arms kills that land at exact places in a terminator's workflows.

    The pytest ``kill`` fixture is one of these, bound to the ``terminator``
    fixture. Every kill is requested by ``INJECTOR`` (an admin) from the
    workflow's own thread, at the cancellation point named (see the module
    docstring for what counts), so it lands there every time. A kill armed for
    a workflow that has not started yet waits for it.

    Args:
        terminator: The terminator whose workflows are targeted.

    Raises:
        InvalidArgumentType: ``terminator`` is not a ``Terminator``.
    """

    def __init__(self, terminator: Terminator) -> None:
        self._term = _check_terminator(terminator)
        self._hub = _Hub.attach(terminator)
        self._scheduled: list[ScheduledKill] = []

    def __repr__(self) -> str:
        return f"<KillScheduler: {len(self._scheduled)} kills>"

    @property
    def scheduled(self) -> list[ScheduledKill]:
        """The kills armed through this scheduler, in arming order."""
        return list(self._scheduled)

    def _new(
        self,
        workflow_id: object,
        trigger: str,
        force: object,
        reason: str | None,
        *,
        expire_kinds: frozenset[str] | None = None,
    ) -> ScheduledKill:
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgumentType(f"reason must be a str (got {reason!r})")
        kill = ScheduledKill(
            self._term,
            _check_workflow_id(workflow_id),
            trigger,
            force=_check_flag("force", force),
            reason=reason,
            expire_grace=expire_kinds is not None,
            expire_kinds=expire_kinds,
        )
        self._scheduled.append(kill)
        return kill

    def at_point(
        self, workflow_id: str, n: int, *, force: bool = False, reason: str | None = None
    ) -> ScheduledKill:
        """Kill ``workflow_id`` at its ``n``-th cancellation point.

        Outside a critical section the kill lands right there (``Terminated``,
        or ``ForcedTermination`` with ``force=True``); inside one it is deferred
        to the end of the outermost section.

        Args:
            workflow_id: The workflow to kill (it may start later).
            n: 1-based, counting that workflow's points in the order reached.
            force: Start at the forced phase.
            reason: The reason recorded in the audit trail.

        Returns:
            The ``ScheduledKill``.

        Raises:
            InvalidArgumentType: an argument has the wrong type.
            ConfigurationError: ``n`` is below 1.
        """
        count = _check_count("n", n)
        kill = self._new(workflow_id, f"at cancellation point #{count}", force, reason)
        self._hub.arm(_AtPoint(kill, count, overall=False), kill)
        return kill

    def on_section_entry(
        self,
        workflow_id: str,
        kind: str,
        *,
        occurrence: int = 1,
        before_entry: bool = False,
        force: bool = False,
        reason: str | None = None,
    ) -> ScheduledKill:
        """Kill ``workflow_id`` as it enters a critical section of ``kind``.

        By default the kill arrives just inside the section (at its first
        cancellation point, or at its exit when it has none), so it is
        deferred: ``kill_deferred``, then ``kill_effective`` when the
        outermost section ends. With ``before_entry=True`` it arrives just
        before the section opens, which refuses the section
        (``section_refused``, ``Terminated`` on entry).

        Args:
            workflow_id: The workflow to kill.
            kind: The section kind, e.g. ``"fs"``.
            occurrence: Which entry of that kind (1 = the first).
            before_entry: Arrive before the section opens instead of inside it.
            force: Start at the forced phase.
            reason: The reason recorded in the audit trail.

        Returns:
            The ``ScheduledKill``.

        Raises:
            InvalidArgumentType: an argument has the wrong type.
            ConfigurationError: ``occurrence`` is below 1.
        """
        if not isinstance(kind, str):
            raise InvalidArgumentType(f"kind must be a str (got {kind!r})")
        nth = _check_count("occurrence", occurrence)
        before = _check_flag("before_entry", before_entry)
        where = "before entering" if before else "inside"
        ordinal = "" if nth == 1 else f" #{nth}"
        kill = self._new(workflow_id, f"{where} section {kind!r}{ordinal}", force, reason)
        self._hub.arm(_InSection(kill, kind, nth, before_entry=before), kill)
        return kill

    def on_grace_expiry(
        self,
        workflow_id: str,
        kind: str,
        *,
        occurrence: int = 1,
        force: bool = False,
        reason: str | None = None,
    ) -> ScheduledKill:
        """Kill ``workflow_id`` inside a section of ``kind`` whose grace then runs out at once.

        The kill arrives at the section's first cancellation point (as with
        ``on_section_entry``) and the section's grace period expires right
        there (a ``grace_expired`` event with ``injected=True``), so that point
        raises ``ForcedTermination`` and the rollback hooks run. A section with
        no cancellation point inside cannot be cut in a thread: the kill then
        lands at its exit.

        Args:
            workflow_id: The workflow to kill.
            kind: The section kind, e.g. ``"db"``.
            occurrence: Which entry of that kind (1 = the first).
            force: Start at the forced phase.
            reason: The reason recorded in the audit trail.

        Returns:
            The ``ScheduledKill``.

        Raises:
            InvalidArgumentType: an argument has the wrong type.
            ConfigurationError: ``occurrence`` is below 1.
        """
        if not isinstance(kind, str):
            raise InvalidArgumentType(f"kind must be a str (got {kind!r})")
        nth = _check_count("occurrence", occurrence)
        ordinal = "" if nth == 1 else f" #{nth}"
        kill = self._new(
            workflow_id,
            f"inside section {kind!r}{ordinal}, grace expiring",
            force,
            reason,
            expire_kinds=frozenset({kind}),
        )
        self._hub.arm(_InSection(kill, kind, nth, before_entry=False), kill)
        return kill

    def after(
        self,
        workflow_id: str,
        seconds: float,
        *,
        force: bool = False,
        reason: str | None = None,
    ) -> ScheduledKill:
        """Kill ``workflow_id`` ``seconds`` from now, from the terminator's timer thread.

        This is the only kill here that is not tied to a cancellation point, so
        it lands wherever the workflow is: use it to test timing, not places.
        If the workflow has not started by then, it is killed at its first
        cancellation point; if it has already finished, the kill is refused
        (``ScheduledKill.error``).

        Args:
            workflow_id: The workflow to kill.
            seconds: The delay.
            force: Start at the forced phase.
            reason: The reason recorded in the audit trail.

        Returns:
            The ``ScheduledKill``.

        Raises:
            InvalidArgumentType: an argument has the wrong type.
            ConfigurationError: ``seconds`` is negative, NaN or infinite.
        """
        delay = validate_seconds("seconds", seconds)
        assert delay is not None
        kill = self._new(workflow_id, f"{delay:g}s after it was scheduled", force, reason)
        with self._hub._lock:
            self._hub.kills.append(kill)
        term = self._term

        def due() -> None:
            wid = kill.workflow_id
            assert wid is not None
            try:
                wf: Workflow | None = term.get(wid)
            except WorkflowNotFound:
                wf = None
            if wf is None:
                self._hub.arm(_FirstPoint(kill))
            else:
                kill._fire(None, None)

        term._timer.call_at(time.monotonic() + delay, due)
        return kill

    def points(self, workflow_id: str | None = None) -> list[CancellationPoint]:
        """The cancellation points reached so far, in order.

        Args:
            workflow_id: Keep only this workflow's points.

        Returns:
            A list of ``CancellationPoint`` (without locations: those are
            recorded for the points where a kill fired).
        """
        return self._hub.recorded(workflow_id)

    def unfired(self) -> list[ScheduledKill]:
        """The kills armed through this scheduler that have not fired.

        Returns:
            A list of ``ScheduledKill``.
        """
        return [k for k in self._scheduled if not k.fired]

    def explain_unfired(self, kill: ScheduledKill) -> str:
        """Why a kill never fired, in words (for teardown messages).

        Args:
            kill: One of ``scheduled``.

        Returns:
            One line.
        """
        wid = kill.workflow_id
        head = f"{kill.headline()} never fired"
        reached = self._hub.reached(wid) if wid is not None else None
        if reached is None:
            try:
                self._term.get(wid or "")
            except WorkflowNotFound:
                return f"{head}: workflow {wid!r} never started"
            return f"{head}: workflow {wid!r} reached no cancellation point"
        return f"{head}: workflow {wid!r} reached only {reached} cancellation point(s)"


class Chaos:
    """A seeded random kill injector.

    Once armed, each cancellation point of a matching workflow kills it with
    probability ``probability``. Each workflow draws from its own random
    stream, seeded from ``seed``, ``salt`` and the workflow id, so the same
    seed kills the same workflows at the same points whatever the threads'
    interleaving. The pytest ``chaos`` fixture takes its seed from
    ``--chaos-seed`` (or a random one, shown in the report header and in the
    failure report).

    Args:
        terminator: The terminator whose workflows are targeted.
        seed: The seed.
        salt: Mixed into every stream (the plugin passes the test's id).

    Raises:
        InvalidArgumentType: ``terminator`` is not a ``Terminator`` or ``seed``
            not an int.
    """

    def __init__(self, terminator: Terminator, seed: int, *, salt: str = "") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgumentType(f"seed must be an int (got {seed!r})")
        self._term = _check_terminator(terminator)
        self._hub = _Hub.attach(terminator)
        self._seed = seed
        self._salt = salt
        self._triggers: list[_ChaosTrigger] = []

    def __repr__(self) -> str:
        return f"<Chaos seed={self._seed} kills={len(self.kills)}>"

    @property
    def seed(self) -> int:
        """The seed."""
        return self._seed

    @property
    def armed(self) -> bool:
        """Whether kills may still be injected (``arm`` was called, ``disarm`` not since)."""
        return any(not t.done for t in self._triggers)

    @property
    def kills(self) -> list[ScheduledKill]:
        """The kills injected so far, in order."""
        return [k for t in self._triggers for k in t.kills]

    def arm(
        self,
        workflow_id: str | None = None,
        *,
        probability: float = 0.1,
        force: float = 0.0,
        grace_expiry: float = 0.0,
        max_kills: int | None = 1,
    ) -> None:
        """Start injecting kills.

        Args:
            workflow_id: Only this workflow; ``None`` for every workflow.
            probability: Chance, at each cancellation point, that the workflow
                is killed there (a workflow already being killed is skipped).
            force: Chance that an injected kill starts at the forced phase.
            grace_expiry: Chance, when the kill lands inside a critical
                section, that the section's grace runs out right there.
            max_kills: Stop after this many kills (``None``: no limit).

        Raises:
            InvalidArgumentType: an argument has the wrong type.
            ConfigurationError: a probability is outside [0, 1] or
                ``max_kills`` below 1.
        """
        if workflow_id is not None:
            _check_workflow_id(workflow_id)
        trigger = _ChaosTrigger(
            self._term,
            self._seed,
            self._salt,
            workflow_id,
            _check_probability("probability", probability),
            _check_probability("force", force),
            _check_probability("grace_expiry", grace_expiry),
            None if max_kills is None else _check_count("max_kills", max_kills),
        )
        self._triggers.append(trigger)
        self._hub.arm(trigger)

    def disarm(self) -> None:
        """Stop injecting kills (the ones injected stay in ``kills``)."""
        self._hub.disarm(self._triggers)
        for trigger in self._triggers:
            trigger.done = True

    def describe(self) -> str:
        """The seed and the kills injected, in words.

        Returns:
            A few lines of text.
        """
        lines = [f"chaos seed {self._seed} (rerun with --chaos-seed={self._seed})"]
        kills = self.kills
        if not kills:
            lines.append("chaos injected no kill")
        lines.extend(k.describe() for k in kills)
        return "\n".join(lines)


class _ChaosTrigger(_Trigger):
    def __init__(
        self,
        term: Terminator,
        seed: int,
        salt: str,
        workflow_id: str | None,
        probability: float,
        force: float,
        grace_expiry: float,
        max_kills: int | None,
    ) -> None:
        self.term = term
        self.seed = seed
        self.salt = salt
        self.workflow_id = workflow_id
        self.probability = probability
        self.force = force
        self.grace_expiry = grace_expiry
        self.max_kills = max_kills
        self.kills: list[ScheduledKill] = []
        self._streams: dict[str, random.Random] = {}

    def check(self, wf: Workflow, point: CancellationPoint) -> ScheduledKill | None:
        if self.done or (self.workflow_id is not None and wf.id != self.workflow_id):
            return None
        if wf.kill is not None:
            return None
        rng = self._streams.get(wf.id)
        if rng is None:
            rng = self._streams[wf.id] = random.Random(f"{self.seed}:{self.salt}:{wf.id}")
        if rng.random() >= self.probability:
            return None
        force = rng.random() < self.force
        expire = bool(point.sections) and rng.random() < self.grace_expiry
        trigger = f"by chaos (seed {self.seed}) at cancellation point #{point.workflow_index}"
        kill = ScheduledKill(
            self.term, wf.id, trigger, force=force, expire_grace=expire, expire_kinds=None
        )
        self.kills.append(kill)
        if self.max_kills is not None and len(self.kills) >= self.max_kills:
            self.done = True
        return kill


# -- settling a terminator after a run or a test -----------------------------------------------


def _settle(term: Terminator, audit: AuditEvents, timeout: float) -> list[str]:
    """End whatever still runs and list what went wrong: live workflows, hooks never run."""
    problems: list[str] = []
    live = term.workflows()
    if live:
        names = ", ".join(f"{wf.id!r} ({wf.state.value})" for wf in live)
        problems.append(f"workflow(s) still live: {names}; killed with force=True")
        term.terminate_all("termsafe.testing: still live at the end", force=True)
        deadline = time.monotonic() + timeout
        for wf in live:
            wf.done_event().wait(max(0.0, deadline - time.monotonic()))
        stuck = [wf.id for wf in live if not wf.done_event().is_set()]
        if stuck:
            problems.append(f"workflow(s) {stuck!r} did not end within {timeout:g}s of that kill")
    events = audit.events()
    for wid in dict.fromkeys(e.workflow_id for e in events if e.type == "workflow_started"):
        if wid is None:
            continue
        try:
            wf = term.get(wid)
        except WorkflowNotFound:
            continue
        if wf.pending_hooks and is_terminal(wf.state):
            names = ", ".join(h.name for h in wf.hooks.snapshot())
            problems.append(
                f"workflow {wid!r} ended {wf.state.value} with hook(s) that never ran: {names}"
            )
    for event in events:
        if event.type == "hook_failed" and event.details.get("hung"):
            problems.append(
                f"hook {event.details.get('hook')!r} of workflow {event.workflow_id!r} hung: "
                f"{event.details.get('error')} (it never finished)"
            )
    return problems


def _landing(kill: ScheduledKill, events: Sequence[AuditEvent]) -> str:
    """Where a fired kill took effect, read from the workflow's audit events."""
    wid = kill.workflow_id
    mine = [e for e in events if e.workflow_id == wid]
    start = next(
        (i for i, e in enumerate(mine) if e.type == "kill_requested" and e.reason == kill.reason),
        None,
    )
    if start is None:
        return "no kill_requested event found for it"
    after = mine[start:]
    types = [e.type for e in after]
    parts = []
    deferred = next((e for e in after if e.type == "kill_deferred"), None)
    if deferred is not None:
        kinds = "/".join(str(s.get("kind")) for s in deferred.details.get("sections", ()))
        parts.append(f"deferred: it arrived inside {kinds or 'a critical section'}")
    expired = [str(e.details.get("kind")) for e in after if e.type == "grace_expired"]
    if expired:
        parts.append(f"the grace of {'/'.join(expired)} ran out: the section was cut")
    effective = next((e for e in after if e.type == "kill_effective"), None)
    if effective is not None:
        parts.append(f"took effect when section {effective.details.get('after_section')!r} ended")
    if "section_refused" in types:
        parts.append("a new critical section was refused")
    if not parts and kill.point is not None:
        parts.append("landed right there")
    finished = next((e for e in after if e.type == "workflow_finished"), None)
    parts.append(
        f"final state: {finished.state}" if finished is not None else "the workflow had not ended"
    )
    return "; ".join(parts)


class _Harness:
    """What the pytest plugin keeps per test: the terminator and its instruments."""

    def __init__(
        self,
        phases: Phases,
        *,
        hook_timeout: float = 5.0,
        seed: int = 0,
        salt: str = "",
    ) -> None:
        self.term = Terminator(phases, sink=MemorySink(), hook_timeout=hook_timeout)
        self.audit = AuditEvents(self.term)
        self.hub = _Hub.attach(self.term)
        self.seed = seed
        self.salt = salt
        self._scheduler: KillScheduler | None = None
        self._chaos: Chaos | None = None
        self._previous = _terminator._set_default_terminator(self.term)
        self._closed = False

    def scheduler(self) -> KillScheduler:
        if self._scheduler is None:
            self._scheduler = KillScheduler(self.term)
        return self._scheduler

    def chaos(self) -> Chaos:
        if self._chaos is None:
            self._chaos = Chaos(self.term, self.seed, salt=self.salt)
        return self._chaos

    def close(self) -> list[str]:
        """End every workflow, restore the default terminator, close; return the problems."""
        if self._closed:
            return []
        self._closed = True
        term = self.term
        try:
            settle = term.phases.forced + term.hook_timeout + 5.0
            problems = _settle(term, self.audit, settle)
            if self._scheduler is not None:
                problems.extend(
                    self._scheduler.explain_unfired(k) for k in self._scheduler.unfired()
                )
        finally:
            if _terminator._default is term:
                _terminator._set_default_terminator(self._previous)
            self.hub.detach()
            term.close()
        return problems

    def report_section(self) -> str:
        """Where each injected kill landed, with the audit timeline of its workflow."""
        with self.hub._lock:
            kills = [k for k in self.hub.kills if k.fired]
        chaos = self._chaos
        if chaos is not None:
            kills.extend(k for k in chaos.kills if k.fired)
        if not kills and (chaos is None or not chaos._triggers):
            return ""
        try:
            events = self.audit.events()
        except AssertionError as exc:
            return f"(audit trail unreadable: {exc})"
        blocks = []
        if chaos is not None and chaos._triggers:
            blocks.append(
                f"chaos seed {chaos.seed} (rerun with --chaos-seed={chaos.seed})"
                + ("" if chaos.kills else "; chaos injected no kill")
            )
        for kill in kills:
            wid = kill.workflow_id
            timeline = format_timeline(e for e in events if e.workflow_id == wid)
            blocks.append(
                f"{kill.describe()}\n  where it landed: {_landing(kill, events)}\n"
                f"  audit timeline of {wid!r}:\n" + textwrap.indent(timeline, "    ")
            )
        return "\n\n".join(blocks)


# -- exploring every kill point ------------------------------------------------------------------


def _default_factory() -> Terminator:
    # A long ladder: a run is synchronous, so no phase deadline should fire
    # during it and make the outcome depend on timing; a stuck run is still
    # settled within the forced window.
    return Terminator(Phases(graceful=30.0, forced=5.0), sink=MemorySink(), hook_timeout=5.0)


def _check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ConfigurationError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    assert isinstance(backend, str)
    return backend


def _call(fn: Callable[..., object], args: tuple[object, ...], backend: str) -> None:
    """Call ``fn(*args)``; an ``async def`` (or a returned awaitable) runs under ``backend``."""
    if inspect.iscoroutinefunction(fn):
        anyio.run(fn, *args, backend=backend)
        return
    result = fn(*args)
    if inspect.isawaitable(result):
        awaitable = result

        async def wait() -> None:
            await awaitable

        anyio.run(wait, backend=backend)


@attrs.frozen
class KillRun:
    """What one run with (or without) an injected kill did; see ``run_with_kill``.

    Attributes:
        point: The kill point, or ``None`` for a run without a kill.
        fired: Whether the kill was requested (the run reached the point).
        where: Where the workflow was when the kill was requested.
        kill: The ``ScheduledKill`` (``None`` without a kill point).
        points: Every cancellation point the run reached, in order.
        events: The run's audit events, oldest first.
        final_states: Each workflow's final state, by id (the last run of an id).
        error: What ``run`` raised, if anything (a kill absorbed by its
            workflow raises nothing).
        problems: What the engine left wrong: workflows still live after
            ``run`` returned, hooks that never ran or hung.
    """

    point: KillPoint | None
    fired: bool
    where: CancellationPoint | None
    kill: ScheduledKill | None = attrs.field(eq=False, repr=False)
    points: tuple[CancellationPoint, ...] = attrs.field(repr=False)
    events: tuple[AuditEvent, ...] = attrs.field(repr=False)
    final_states: Mapping[str, str]
    error: BaseException | None = attrs.field(eq=False)
    problems: tuple[str, ...]

    def timeline(self, workflow_id: str | None = None) -> str:
        """The run's audit events as a readable timeline.

        Args:
            workflow_id: Keep only this workflow's events.

        Returns:
            One line per event.
        """
        return format_timeline(
            e for e in self.events if workflow_id is None or e.workflow_id == workflow_id
        )


def run_with_kill(
    run: RunFn,
    point: KillPoint | None = None,
    *,
    terminator_factory: Callable[[], Terminator] | None = None,
    backend: str = "asyncio",
) -> KillRun:
    """Run ``run(terminator)`` once, with a kill landing at ``point``.

    The building block of ``explore_kills`` (and of property tests that draw
    points from ``kill_points``). ``run`` is called in this thread with a fresh
    terminator, which is also the default terminator while it runs (so
    ``termsafe.workflow(...)`` without ``terminator=`` uses it). At
    cancellation point ``point.index`` the kill is requested, by ``INJECTOR``,
    against the top-level workflow of that point, and lands there. After
    ``run`` returns, whatever it left running is killed and reported, and the
    terminator is closed.

    Args:
        run: ``run(terminator)``, sync or ``async def``; it must do its work in
            workflows of that terminator and be deterministic (the same calls
            in the same order every time).
        point: Where to kill; ``None`` runs without a kill (to count points).
        terminator_factory: Builds each run's ``Terminator``; default: a
            30 s + 5 s ladder (nothing escalates during a quick run) and a
            ``MemorySink``.
        backend: ``"asyncio"`` or ``"trio"``, for an ``async def`` ``run``.

    Returns:
        A ``KillRun``.

    Raises:
        InvalidArgumentType: ``run`` is not callable, ``point`` not a
            ``KillPoint``, or the factory returned something else.
        ConfigurationError: ``backend`` is unknown.
        KeyboardInterrupt: from ``run``; other exceptions are recorded in
            ``KillRun.error``.
    """
    if not callable(run):
        raise InvalidArgumentType(f"run must be callable (got {run!r})")
    if point is not None and not isinstance(point, KillPoint):
        raise InvalidArgumentType(f"point must be a KillPoint or None (got {point!r})")
    name = _check_backend(backend)
    term = (terminator_factory or _default_factory)()
    if not isinstance(term, Terminator):
        raise InvalidArgumentType(f"terminator_factory must return a Terminator (got {term!r})")
    audit = AuditEvents(term)
    hub = _Hub.attach(term, locations=True)
    kill = None
    if point is not None:
        trigger = f"at cancellation point #{point.index} of the run"
        if point.grace_expiry:
            trigger += ", grace expiring there"
        kill = ScheduledKill(
            term, None, trigger, force=point.force, expire_grace=point.grace_expiry
        )
        hub.arm(_AtPoint(kill, point.index, overall=True), kill)
    error: BaseException | None = None
    previous = _terminator._set_default_terminator(term)
    try:
        try:
            _call(run, (term,), name)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            error = exc
        finally:
            if _terminator._default is term:
                _terminator._set_default_terminator(previous)
        problems = _settle(term, audit, term.phases.forced + term.hook_timeout + 5.0)
        events = tuple(audit.events())
    finally:
        hub.detach()
        term.close()
    final_states = {
        e.workflow_id: e.state or ""
        for e in events
        if e.type == "workflow_finished" and e.workflow_id is not None
    }
    return KillRun(
        point=point,
        fired=kill is not None and kill.fired,
        where=kill.point if kill is not None else None,
        kill=kill,
        points=tuple(hub.recorded()),
        events=events,
        final_states=final_states,
        error=error,
        problems=tuple(problems),
    )


def _plan(
    points: Sequence[CancellationPoint], forces: tuple[bool, ...], grace_expiry: bool
) -> list[KillPoint]:
    plan = [KillPoint(p.index, f) for f in forces for p in points]
    if grace_expiry:
        inside = [p for p in points if p.sections]
        plan.extend(KillPoint(p.index, f, grace_expiry=True) for f in forces for p in inside)
    return sorted(plan, key=lambda k: (k.index, k.grace_expiry, k.force))


def _check_forces(force: object) -> tuple[bool, ...]:
    if isinstance(force, bool):
        return (force,)
    values: tuple[object, ...] = tuple(force) if isinstance(force, Iterable) else ()
    if not values or not all(isinstance(v, bool) for v in values):
        raise InvalidArgumentType(f"force must be a bool or a tuple of bools (got {force!r})")
    return tuple(bool(v) for v in dict.fromkeys(values))


def _run_check(check: CheckFn, backend: str) -> str | None:
    try:
        _call(check, (), backend)
    except AssertionError as exc:
        text = str(exc)
        return f"AssertionError: {text}" if text else "AssertionError"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return f"check raised {type(exc).__name__}: {exc}"
    return None


def _name(fn: object, default: str) -> str:
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else default


@attrs.frozen
class KillFailure:
    """One kill point at which the invariant (or the engine) did not hold.

    Attributes:
        point: The kill point; ``None`` for the run without a kill.
        stage: ``"without a kill"``, ``"after the kill"``, ``"after resume"``
            or ``"determinism"`` (the run did not repeat itself).
        message: What failed: the ``AssertionError`` text, or the problem.
        run: The ``KillRun`` (or the resume run) that failed.
        reproduction: A call that replays just this kill.
    """

    point: KillPoint | None
    stage: str
    message: str
    run: KillRun = attrs.field(eq=False, repr=False)
    reproduction: str

    def __str__(self) -> str:
        head = "without a kill" if self.point is None else repr(self.point)
        lines = [f"{head} -- {self.stage}: {self.message}"]
        kill = self.run.kill
        if kill is not None and kill.fired:
            lines.append(textwrap.indent(kill.describe(), "  "))
            lines.append(f"  where it landed: {_landing(kill, self.run.events)}")
        if self.run.error is not None:
            error = self.run.error
            lines.append(f"  the run raised {type(error).__name__}: {error}")
        lines.append(f"  reproduce: {self.reproduction}")
        lines.append("  audit timeline:")
        lines.append(textwrap.indent(self.run.timeline(), "    "))
        return "\n".join(lines)


class KillSafetyError(TermsafeError, AssertionError):
    """``explore_kills`` found kill points where the invariant did not hold.

    An ``AssertionError`` so that a test using ``raise_on_failure()`` (or
    ``assert_safe=True``) fails rather than errors.

    Attributes:
        reproductions: One reproduction call per failure.
        report: The ``ExplorationReport`` (``None`` after unpickling).
    """

    def __init__(
        self,
        message: str,
        reproductions: tuple[str, ...] = (),
        report: ExplorationReport | None = None,
    ) -> None:
        super().__init__(message)
        self.reproductions = reproductions
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.reproductions))


@attrs.frozen
class ExplorationReport:
    """What ``explore_kills`` found.

    Attributes:
        call: The exploration, as ``explore_kills(run, check)``.
        points: The cancellation points the run without a kill reached.
        explored: The kill points tried, in order.
        failures: One ``KillFailure`` per kill point and stage that failed.
    """

    call: str
    points: tuple[CancellationPoint, ...] = attrs.field(repr=False)
    explored: tuple[KillPoint, ...] = attrs.field(repr=False)
    failures: tuple[KillFailure, ...]

    @property
    def ok(self) -> bool:
        """Whether every kill point was safe."""
        return not self.failures

    @property
    def failing_points(self) -> list[KillPoint | None]:
        """The kill points that failed, each once, in order (``None``: without a kill)."""
        return list(dict.fromkeys(f.point for f in self.failures))

    def summary(self) -> str:
        """One line: how many kill points were tried and how many failed.

        Returns:
            The line.
        """
        bad = len(self.failing_points)
        verdict = "all safe" if self.ok else f"{bad} unsafe"
        return (
            f"{self.call}: {len(self.explored)} kill point(s) tried over "
            f"{len(self.points)} cancellation point(s): {verdict}"
        )

    def __str__(self) -> str:
        parts = [self.summary()]
        parts.extend(f"\n{i}. {failure}" for i, failure in enumerate(self.failures, 1))
        return "\n".join(parts)

    def raise_on_failure(self) -> None:
        """Raise if any kill point failed.

        Raises:
            KillSafetyError: listing every failure with its timeline and
                reproduction call.
        """
        if self.failures:
            raise KillSafetyError(str(self), tuple(f.reproduction for f in self.failures), self)


def _mismatch(baseline: Sequence[CancellationPoint], run: KillRun, point: KillPoint) -> str | None:
    upto = point.index
    seen = run.points[:upto]
    if len(seen) < upto:
        return (
            f"this run reached only {len(seen)} cancellation point(s) "
            f"({len(baseline)} without a kill): run must do the same thing every time"
        )
    for before, now in zip(baseline[:upto], seen, strict=True):
        if before._identity() != now._identity():
            return (
                f"point #{now.index} was {before} without a kill but {now} in this run: "
                "run must do the same thing every time"
            )
    return None


def explore_kills(
    run: RunFn,
    check: CheckFn,
    *,
    resume: RunFn | None = None,
    force: bool | tuple[bool, ...] = (False, True),
    include_grace_expiry: bool = True,
    terminator_factory: Callable[[], Terminator] | None = None,
    only: KillPoint | Iterable[KillPoint] | None = None,
    backend: str = "asyncio",
    assert_safe: bool = False,
) -> ExplorationReport:
    """Kill a workflow at each of its cancellation points in turn and check an invariant.

    The protocol: ``run(terminator)`` sets up fresh state (say, writes the
    old version of a file), then does the work inside
    ``terminator.workflow(...)``; ``check()`` raises ``AssertionError`` when
    the invariant does not hold ("the file holds the old content or the new,
    and no temp file is left"). Both are called in this thread.

    1. ``run`` once without a kill, counting its cancellation points; ``check``.
    2. For each point and each ``force`` value: ``run`` again (fresh
       terminator) with a kill landing exactly at that point; ``check``. With
       ``include_grace_expiry``, each point inside a critical section is also
       tried with the section's grace running out right there (the section is
       cut, its rollback must restore the invariant).
    3. With ``resume``: after each killed run, ``resume(terminator)`` on a
       fresh terminator (a restart), then ``check`` again (e.g. "the payment
       was made exactly once").

    ``run`` must be deterministic: each kill run must reach the same points in
    the same order up to the kill, or the failure says so ("determinism").

    Args:
        run: ``run(terminator)``, sync or ``async def``.
        check: ``check()``, sync or ``async def``; raises ``AssertionError``
            when the invariant is broken.
        resume: ``resume(terminator)``, run after each kill; ``None`` to skip.
        force: The ``force=`` values to try at every point.
        include_grace_expiry: Also cut each open critical section at each of
            its points.
        terminator_factory: Builds each run's ``Terminator`` (default: a long
            ladder and a ``MemorySink``; see ``run_with_kill``).
        only: Try just these kill points (the reproduction call of a failure).
        backend: ``"asyncio"`` or ``"trio"``, for ``async def`` callables.
        assert_safe: Raise ``KillSafetyError`` instead of returning a failing
            report.

    Returns:
        An ``ExplorationReport``: ``report.ok``, ``report.failures`` (each with
        the audit timeline that led to it and a reproduction call), and
        ``report.raise_on_failure()``.

    Raises:
        InvalidArgumentType: a callable is not callable, or ``force``/``only``
            hold the wrong types.
        ConfigurationError: ``backend`` is unknown, or ``only`` names a point
            the run does not reach.
        KillSafetyError: with ``assert_safe=True``, when a kill point failed.
    """
    for label, fn in (("run", run), ("check", check)):
        if not callable(fn):
            raise InvalidArgumentType(f"{label} must be callable (got {fn!r})")
    if resume is not None and not callable(resume):
        raise InvalidArgumentType(f"resume must be callable or None (got {resume!r})")
    forces = _check_forces(force)
    grace = _check_flag("include_grace_expiry", include_grace_expiry)
    _check_flag("assert_safe", assert_safe)
    name = _check_backend(backend)
    wanted: list[KillPoint] | None = None
    if only is not None:
        wanted = [only] if isinstance(only, KillPoint) else list(only)
        if not all(isinstance(k, KillPoint) for k in wanted):
            raise InvalidArgumentType(f"only must hold KillPoint values (got {only!r})")

    names = f"{_name(run, 'run')}, {_name(check, 'check')}"
    if resume is not None:
        names += f", resume={_name(resume, 'resume')}"
    call = f"explore_kills({names})"

    def reproduce(point: KillPoint | None) -> str:
        if point is None:
            return f"run_with_kill({_name(run, 'run')}); {_name(check, 'check')}()"
        return f"explore_kills({names}, only={point!r})"

    def once(fn: RunFn, point: KillPoint | None) -> KillRun:
        return run_with_kill(fn, point, terminator_factory=terminator_factory, backend=name)

    failures: list[KillFailure] = []
    baseline = once(run, None)
    if baseline.error is not None:
        error = baseline.error
        raised = f"run raised {type(error).__name__}: {error}"
        failures.append(KillFailure(None, "without a kill", raised, baseline, reproduce(None)))
    failures.extend(
        KillFailure(None, "without a kill", problem, baseline, reproduce(None))
        for problem in baseline.problems
    )
    verdict = _run_check(check, name)
    if verdict is not None:
        failures.append(KillFailure(None, "without a kill", verdict, baseline, reproduce(None)))
    points = baseline.points
    if failures:
        # The invariant fails without any kill: exploring would only repeat that.
        report = ExplorationReport(call, points, (), tuple(failures))
        if assert_safe:
            report.raise_on_failure()
        return report

    if wanted is None:
        plan = _plan(points, forces, grace)
    else:
        beyond = [k for k in wanted if k.index > len(points)]
        if beyond:
            raise ConfigurationError(
                f"only names kill point(s) {beyond!r}, but run reaches "
                f"{len(points)} cancellation point(s)"
            )
        plan = wanted

    for point in plan:
        result = once(run, point)
        repro = reproduce(point)
        mismatch = _mismatch(points, result, point)
        if mismatch is not None:
            failures.append(KillFailure(point, "determinism", mismatch, result, repro))
        failures.extend(
            KillFailure(point, "after the kill", problem, result, repro)
            for problem in result.problems
        )
        verdict = _run_check(check, name)
        if verdict is not None:
            failures.append(KillFailure(point, "after the kill", verdict, result, repro))
        if resume is None:
            continue
        again = once(resume, None)
        if again.error is not None:
            error = again.error
            text = f"resume raised {type(error).__name__}: {error}"
            failures.append(KillFailure(point, "after resume", text, again, repro))
        failures.extend(
            KillFailure(point, "after resume", problem, again, repro) for problem in again.problems
        )
        verdict = _run_check(check, name)
        if verdict is not None:
            failures.append(KillFailure(point, "after resume", verdict, again, repro))

    report = ExplorationReport(call, points, tuple(plan), tuple(failures))
    if assert_safe:
        report.raise_on_failure()
    return report


def kill_points(
    run: RunFn | int,
    *,
    force: bool | tuple[bool, ...] = (False, True),
    include_grace_expiry: bool = True,
    terminator_factory: Callable[[], Terminator] | None = None,
    backend: str = "asyncio",
) -> SearchStrategy[KillPoint]:
    """A hypothesis strategy of ``KillPoint`` values, for your own property tests.

    Draw a point, then ``run_with_kill(run, point)`` and check what you like:

        @given(point=kill_points(run))
        def test_never_torn(point):
            run_with_kill(run, point)
            check()

    Args:
        run: The workflow callable (counted once, lazily, on the first draw),
            or the number of cancellation points if you know it (then no
            grace-expiry points are drawn: which points are inside sections is
            unknown).
        force: The ``force=`` values to draw from.
        include_grace_expiry: Also draw grace-expiry points (callable ``run`` only).
        terminator_factory: As for ``run_with_kill``.
        backend: As for ``run_with_kill``.

    Returns:
        A ``SearchStrategy[KillPoint]``.

    Raises:
        InvalidArgumentType: ``run`` is neither callable nor an int.
        ConfigurationError: an int below 1; on the first draw, a ``run`` that
            reaches no cancellation point or raises without a kill.
        ImportError: hypothesis is not installed.
    """
    from hypothesis import strategies as st

    forces = _check_forces(force)
    grace = _check_flag("include_grace_expiry", include_grace_expiry)
    name = _check_backend(backend)
    if isinstance(run, int) and not isinstance(run, bool):
        count = _check_count("the number of cancellation points", run)
        return st.builds(KillPoint, index=st.integers(1, count), force=st.sampled_from(forces))
    if not callable(run):
        raise InvalidArgumentType(f"run must be callable or an int (got {run!r})")
    fn = run

    def plan() -> SearchStrategy[KillPoint]:
        baseline = run_with_kill(fn, None, terminator_factory=terminator_factory, backend=name)
        if baseline.error is not None:
            raise ConfigurationError(
                f"{_name(fn, 'run')} raised without a kill: {baseline.error!r}"
            )
        points = _plan(baseline.points, forces, grace)
        if not points:
            raise ConfigurationError(f"{_name(fn, 'run')} reached no cancellation point")
        return st.sampled_from(points)

    return st.deferred(plan)
