"""A workflow's termination timeline, drawn from its audit trail as a standalone SVG.

``render_timeline_svg(events)`` reads the events a terminator emitted (a
``MemorySink``'s list, or a ``JsonlSink`` trail read back with
``replay_audit``) and draws one workflow's kill on a time axis in milliseconds
from the kill request:

* the phases as bands (graceful, forced, system), and when the next phase was
  due (``kill_requested`` records the deadlines);
* the workflow's state (running, then terminating) and its final state;
* the critical sections the kill found open, each as a bar, with the deferral:
  the kill waited from its request until the section ended;
* each hook as a mark, numbered in the order it ran (LIFO: the last registered
  runs first), and the other events of the kill (emergency save, expired
  grace, rollbacks of safe operations, ...).

The trail records when a section *ended* (``kill_effective``) but not when it
opened (entering a section writes nothing, so sections stay cheap): a section
bar starts at the left edge, faded, meaning "open before the kill".
Timestamps have millisecond precision; the durations the events carry
(``deferred_for_ms``, ``kill_latency_ms``, a hook's ``ms``) are finer and are
used where they exist.

No dependencies: the SVG is written by hand, every text escaped.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final
from xml.sax.saxutils import escape, quoteattr

import attrs

from ._audit import AuditEvent
from ._exceptions import ConfigurationError, InvalidArgumentType, WorkflowNotFound

__all__ = ["render_timeline_svg", "select_workflow"]

WIDTH: Final = 980
PLOT_LEFT: Final = 150
PLOT_RIGHT: Final = WIDTH - 30
FONT: Final = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"

PHASE_FILL: Final = {"graceful": "#d4ecd4", "forced": "#ffdcae", "system": "#f6c0c0"}
PHASE_EDGE: Final = {"graceful": "#4e9a4e", "forced": "#d9801a", "system": "#c0392b"}
STATE_FILL: Final = {"running": "#dcdcdc", "terminating": "#fbe7a6"}
FINAL_COLOUR: Final = {
    "terminated": "#2e7d32",
    "killed": "#c0392b",
    "completed": "#4d4d4d",
    "failed": "#8b1a1a",
}
HOOK_COLOUR: Final = {"rollback": "#7d3c98", "cleanup": "#138d75"}
FAILED_COLOUR: Final = "#c0392b"
SECTION_COLOUR: Final = "#5b9bd5"
DEFERRAL_COLOUR: Final = "#1f4e79"
KILL_COLOUR: Final = "#c0392b"
INK: Final = "#222222"
MUTED: Final = "#6b6b6b"

#: Events drawn in their own lanes; every other event of the run goes to "events".
_DRAWN: Final = frozenset(
    {
        "workflow_started",
        "workflow_finished",
        "kill_deferred",
        "kill_effective",
        "phase_changed",
        "hook_ran",
        "hook_failed",
    }
)
_MAX_EVENT_ROWS: Final = 14


# -- what the trail says -------------------------------------------------------------------


@attrs.frozen
class _Section:
    kind: str
    grace_ms: float | None
    end_ms: float | None  # None: still open when the trail ends
    cut: bool  # its grace ran out


@attrs.frozen
class _HookMark:
    number: int
    name: str
    kind: str
    start_ms: float
    end_ms: float
    failed: bool
    error: str | None
    ran_by: str | None


@attrs.frozen
class _Note:
    at_ms: float
    text: str


@attrs.define
class _Story:
    workflow_id: str
    run: int
    runs: int
    owner: str | None = None
    team: str | None = None
    killed: bool = False
    killer: Mapping[str, Any] | None = None
    reason: str | None = None
    force: bool = False
    started_ms: float | None = None
    finished_ms: float | None = None
    final_state: str | None = None
    last_state: str | None = None
    last_ms: float = 0.0
    phases: list[tuple[str, float, bool]] = attrs.Factory(list)  # name, start, escalated
    forced_due_ms: float | None = None
    system_due_ms: float | None = None
    sections: list[_Section] = attrs.Factory(list)
    deferred_until_ms: float | None = None
    hooks: list[_HookMark] = attrs.Factory(list)
    notes: list[_Note] = attrs.Factory(list)


def _epoch_ms(event: AuditEvent) -> float:
    try:
        dt = datetime.datetime.strptime(event.timestamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise ConfigurationError(
            f"audit event #{event.seq} ({event.type}) has a timestamp that is not "
            f"ISO 8601 UTC with milliseconds (got {event.timestamp!r})"
        ) from None
    return dt.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000.0


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _is_fresh_kill(event: AuditEvent) -> bool:
    # A repeated request on a kill in progress carries "already" (its phase then).
    return event.type == "kill_requested" and "already" not in event.details


def _runs(events: list[AuditEvent]) -> list[list[AuditEvent]]:
    runs: list[list[AuditEvent]] = []
    for event in events:
        if event.type == "workflow_started" or not runs:
            runs.append([])
        runs[-1].append(event)
    return runs


def select_workflow(events: Iterable[AuditEvent]) -> str | None:
    """The workflow ``render_timeline_svg`` draws when it is given none.

    The workflow of the latest kill request (by timestamp, later in ``events``
    on a tie). A child workflow killed because its parent was is passed over
    for the parent, whose kill it was.

    Args:
        events: Audit events, in trail order.

    Returns:
        The workflow id, or ``None`` when no workflow was killed.
    """
    parents: dict[str, str | None] = {}
    best: tuple[float, int, str] | None = None
    best_top: tuple[float, int, str] | None = None
    for index, event in enumerate(events):
        wid = event.workflow_id
        if wid is None:
            continue
        if event.type == "workflow_started":
            parent = event.details.get("parent")
            parents[wid] = parent if isinstance(parent, str) else None
        elif _is_fresh_kill(event):
            key = (_epoch_ms(event), index, wid)
            if best is None or key[:2] >= best[:2]:
                best = key
            if parents.get(wid) is None and (best_top is None or key[:2] >= best_top[:2]):
                best_top = key
    chosen = best_top or best
    return None if chosen is None else chosen[2]


def _story(events: list[AuditEvent], workflow_id: str) -> _Story:
    runs = _runs(events)
    killed_runs = [i for i, run in enumerate(runs) if any(_is_fresh_kill(e) for e in run)]
    index = killed_runs[-1] if killed_runs else len(runs) - 1
    run = runs[index]
    story = _Story(workflow_id=workflow_id, run=index + 1, runs=len(runs))
    kill = next((e for e in run if _is_fresh_kill(e)), None)
    t0 = _epoch_ms(kill if kill is not None else run[0])
    if kill is not None:
        story.killed = True
        story.killer = kill.actor
        story.reason = kill.reason
        story.force = kill.details.get("force") is True
        first = kill.details.get("phase")
        first_phase = first if isinstance(first, str) else "forced" if story.force else "graceful"
        story.phases.append((first_phase, 0.0, False))
        forced_in = _number(kill.details.get("forced_deadline_in"))
        system_in = _number(kill.details.get("system_deadline_in"))
        story.forced_due_ms = None if forced_in is None else forced_in * 1000.0
        story.system_due_ms = None if system_in is None else system_in * 1000.0
    max_grace_ms = 0.0
    hook_floor = 0.0
    for event in run:
        at = _epoch_ms(event) - t0
        details = event.details
        story.last_ms = max(story.last_ms, at)
        if event.state is not None and event.type != "late_finish":
            story.last_state = event.state
        kind = event.type
        if kind == "workflow_started":
            story.started_ms = at
            actor = event.actor
            story.owner = str(actor["id"]) if actor and actor.get("id") else None
            team = details.get("team")
            story.team = team if isinstance(team, str) else None
        elif event is kill:
            continue
        elif kind == "kill_deferred":
            for section in details.get("sections") or ():
                if isinstance(section, Mapping):
                    grace = _number(section.get("grace"))
                    if grace is not None:
                        max_grace_ms = max(max_grace_ms, grace * 1000.0)
                    story.sections.append(
                        _Section(
                            str(section.get("kind", "?")),
                            None if grace is None else grace * 1000.0,
                            None,
                            False,
                        )
                    )
        elif kind == "kill_effective":
            waited = _number(details.get("deferred_for_ms"))
            end = waited if waited is not None else at
            story.deferred_until_ms = end
            hook_floor = max(hook_floor, end)
            story.sections = [
                attrs.evolve(s, end_ms=end) if s.end_ms is None else s for s in story.sections
            ]
        elif kind == "grace_expired":
            cut = str(details.get("kind", "?"))
            story.sections = [
                attrs.evolve(s, end_ms=at, cut=True) if s.kind == cut and s.end_ms is None else s
                for s in story.sections
            ]
            story.notes.append(_Note(at, f"grace of the {cut} section ran out: section cut"))
        elif kind == "phase_changed":
            phase = details.get("phase")
            if isinstance(phase, str) and (not story.phases or story.phases[-1][0] != phase):
                escalated = details.get("escalated") is True
                story.phases.append((phase, at, escalated))
                if phase == "forced" and escalated:
                    story.system_due_ms = _escalated_system_due(story, at, max_grace_ms)
        elif kind in ("hook_ran", "hook_failed"):
            took = _number(details.get("ms")) or 0.0
            end = max(at, hook_floor)
            story.hooks.append(
                _HookMark(
                    number=len(story.hooks) + 1,
                    name=str(details.get("hook", "?")),
                    kind=str(details.get("kind", "?")),
                    start_ms=max(end - took, hook_floor),
                    end_ms=end,
                    failed=kind == "hook_failed",
                    error=str(details["error"]) if details.get("error") is not None else None,
                    ran_by=str(details["ran_by"]) if details.get("ran_by") is not None else None,
                )
            )
            hook_floor = end
        elif kind == "workflow_finished":
            latency = _number(details.get("kill_latency_ms")) if kill is not None else None
            story.finished_ms = max(latency if latency is not None else at, hook_floor)
            story.final_state = event.state
            story.last_ms = max(story.last_ms, story.finished_ms)
        elif kind not in _DRAWN:
            story.notes.append(_Note(at, _note_text(event)))
    if story.finished_ms is not None:
        # Hooks and sections cannot end after the workflow did (ms timestamps vs. finer durations).
        end = story.finished_ms
        story.hooks = [
            attrs.evolve(h, start_ms=min(h.start_ms, end), end_ms=min(h.end_ms, end))
            for h in story.hooks
        ]
    return story


def _escalated_system_due(story: _Story, at: float, max_grace_ms: float) -> float | None:
    # The terminator's rule: after an escalation the system phase comes one forced
    # window later, never before a section's grace plus that window.
    if story.forced_due_ms is None or story.system_due_ms is None:
        return story.system_due_ms
    window = story.system_due_ms - max(story.forced_due_ms, max_grace_ms)
    return min(story.system_due_ms, max(at + window, max_grace_ms + window))


def _note_text(event: AuditEvent) -> str:
    details = event.details
    if event.type == "kill_requested":
        who = (event.actor or {}).get("id", "?")
        force = " (force)" if details.get("force") else ""
        return f"kill requested again by {who}{force}"
    if event.type == "kill_refused":
        who = (event.actor or {}).get("id", "?")
        return f"kill by {who} refused: {details.get('decision', '?')}"
    if event.type == "emergency_save":
        return f"emergency save: {_short(details.get('checkpoint'))}"
    shown = {
        k: v for k, v in details.items() if k not in ("operation", "run_id") and v not in ("", None)
    }
    text = event.type.replace("_", " ")
    if "operation" in details:
        text = f"{details['operation']}: {text}"
    if shown:
        text += " (" + ", ".join(f"{k}={_short(v, 24)}" for k, v in sorted(shown.items())) + ")"
    return text


def _short(value: object, limit: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# -- drawing -------------------------------------------------------------------------------


def _duration(ms: float) -> str:
    ms = abs(ms)
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + " s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _text_width(text: str, size: float) -> float:
    return len(text) * size * 0.58


def _nice_step(span: float, target: int = 8) -> float:
    raw = span / target
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


class _Canvas:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, text: str | None = None, **attributes: object) -> None:
        attrs_text = "".join(
            f" {name.rstrip('_').replace('_', '-')}={quoteattr(_fmt(value))}"
            for name, value in attributes.items()
            if value is not None
        )
        if text is None:
            self.parts.append(f"<{tag}{attrs_text}/>")
        else:
            self.parts.append(f"<{tag}{attrs_text}>{escape(text)}</{tag}>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def text(
        self,
        x: float,
        y: float,
        text: str,
        *,
        size: float = 11.5,
        anchor: str = "start",
        weight: str | None = None,
        fill: str = INK,
        class_: str | None = None,
    ) -> None:
        self.add(
            "text",
            text,
            x=x,
            y=y,
            font_size=size,
            text_anchor=anchor,
            font_weight=weight,
            fill=fill,
            class_=class_,
        )


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


class _Scale:
    def __init__(self, lo: float, hi: float) -> None:
        self.lo = lo
        self.hi = hi

    def __call__(self, t: float) -> float:
        t = min(max(t, self.lo), self.hi)
        return PLOT_LEFT + (t - self.lo) / (self.hi - self.lo) * (PLOT_RIGHT - PLOT_LEFT)


def _axis_range(story: _Story) -> tuple[float, float, bool]:
    """The visible time range, and whether the workflow's start is cut off on the left."""
    end = max(story.last_ms, story.finished_ms or 0.0, 1.0)
    hi = end
    for due in (story.forced_due_ms, story.system_due_ms):
        if due is not None and due <= end * 1.35:
            hi = max(hi, due)  # a deadline close by is worth showing in place
    hi *= 1.06
    start = story.started_ms if story.started_ms is not None else 0.0
    lo = min(start, 0.0)
    cut = False
    if story.killed and -lo > 0.25 * hi:
        lo, cut = -0.25 * hi, True
    lo -= 0.03 * (hi - lo)
    return lo, hi, cut


def render_timeline_svg(events: Iterable[AuditEvent], workflow_id: str | None = None) -> str:
    """Draw a workflow's termination timeline from its audit events, as an SVG document.

    The picture shows, on an axis in milliseconds from the kill request: the
    phases (graceful, forced, system) as bands with the deadlines the kill
    recorded; the workflow's state and its final state; the critical
    sections the kill found open, with the deferral (the kill waited until
    the section ended); every hook as a mark numbered in the order it ran
    (LIFO); and the other events of the kill. The title names the workflow,
    who asked for the kill and why. See ``docs/timeline.md``.

    When the workflow id ran several times, the last run that was killed is
    drawn (else its last run).

    Args:
        events: Audit events in trail order: a ``MemorySink``'s ``events``, or
            the ``timeline`` of a ``replay_audit`` history. Events of other
            workflows are ignored.
        workflow_id: The workflow to draw; default: the one of the latest
            kill request (a child killed with its parent yields to the parent).

    Returns:
        A standalone SVG document (UTF-8 text, no external references).

    Raises:
        InvalidArgumentType: ``events`` holds something that is not an
            ``AuditEvent``, or ``workflow_id`` is not a string.
        WorkflowNotFound: no event concerns ``workflow_id``.
        ConfigurationError: ``workflow_id`` is ``None`` and no workflow in
            ``events`` was killed, or an event's timestamp is malformed.
    """
    if workflow_id is not None and not isinstance(workflow_id, str):
        raise InvalidArgumentType(f"workflow_id must be a str or None (got {workflow_id!r})")
    if isinstance(events, (str, bytes, Mapping)):
        raise InvalidArgumentType(f"events must be an iterable of AuditEvent (got {events!r})")
    trail = list(events)
    for event in trail:
        if not isinstance(event, AuditEvent):
            raise InvalidArgumentType(f"events must hold AuditEvent objects (got {event!r})")
    if workflow_id is None:
        workflow_id = select_workflow(trail)
        if workflow_id is None:
            ids = sorted({e.workflow_id for e in trail if e.workflow_id is not None})
            raise ConfigurationError(
                "no workflow was killed in these events: give a workflow id"
                + (f" (they concern: {', '.join(ids)})" if ids else " (they concern no workflow)")
            )
    mine = [e for e in trail if e.workflow_id == workflow_id]
    if not mine:
        raise WorkflowNotFound(workflow_id)
    return _draw(_story(mine, workflow_id))


def _draw(story: _Story) -> str:
    lo, hi, cut = _axis_range(story)
    x = _Scale(lo, hi)
    c = _Canvas()
    end_ms = story.finished_ms if story.finished_ms is not None else story.last_ms

    # Title and what happened, in words.
    c.text(20, 30, f"Termination timeline of {story.workflow_id!r}", size=18, weight="bold")
    c.text(20, 52, _subtitle(story), size=12.5, fill=INK, class_="subtitle")
    c.text(20, 70, _summary(story), size=12, fill=MUTED, class_="summary")

    y: float = 92
    lanes_top = y
    # Notes in empty lanes start right of the kill line, so it never crosses them.
    note_x = max(PLOT_LEFT + 6.0, x(0) + 6.0) if story.killed else PLOT_LEFT + 6.0
    grid_at = len(c.parts)  # the grid goes under the lanes, drawn once their height is known

    # Lane: phases.
    lane_h = 34
    c.text(PLOT_LEFT - 12, y + 21, "phase", anchor="end", weight="bold")
    if story.phases:
        for index, (name, start, escalated) in enumerate(story.phases):
            stop = story.phases[index + 1][1] if index + 1 < len(story.phases) else end_ms
            x0, x1 = x(start), x(max(stop, start))
            c.add(
                "rect",
                x=x0,
                y=y,
                width=max(x1 - x0, 2.0),
                height=lane_h,
                fill=PHASE_FILL.get(name, "#eeeeee"),
                stroke=PHASE_EDGE.get(name, MUTED),
                stroke_width=1,
                class_=f"phase {name}",
            )
            label = name + (" (escalated)" if escalated else "")
            if _text_width(label, 12) + 8 <= x1 - x0:
                c.text(x0 + 6, y + 21, label, size=12, weight="bold", class_="phase-label")
            else:
                c.text(x0 + 2, y - 4, label, size=11, weight="bold", class_="phase-label")
        _deadlines(c, story, x, y, lane_h, hi, end_ms)
    else:
        c.text(PLOT_LEFT + 6, y + 21, "not killed: no termination phase", fill=MUTED)
    y += lane_h + 26  # room for the deadlines' labels

    # Lane: the workflow's state.
    lane_h = 22
    c.text(PLOT_LEFT - 12, y + 15, "workflow", anchor="end", weight="bold")
    start = story.started_ms if story.started_ms is not None else lo
    if story.killed and start < 0:
        x0 = x(start)
        c.add(
            "rect",
            x=x0,
            y=y,
            width=max(x(0) - x0, 1.0),
            height=lane_h,
            fill=STATE_FILL["running"],
            class_="state running",
        )
        if cut and story.started_ms is not None:
            c.text(
                x0 + 4,
                y + 15,
                f"\u2039 started {_duration(story.started_ms)} earlier",
                size=10.5,
                fill=MUTED,
            )
        elif x(0) - x0 > 60:
            c.text(x0 + 4, y + 15, "running", size=10.5, fill=MUTED)
    if story.killed:
        x1 = x(end_ms)
        c.add(
            "rect",
            x=x(0),
            y=y,
            width=max(x1 - x(0), 2.0),
            height=lane_h,
            fill=STATE_FILL["terminating"],
            class_="state terminating",
        )
        if x1 - x(0) > 90:
            c.text(x(0) + 4, y + 15, "terminating", size=10.5, fill=MUTED)
    else:
        x0, x1 = x(start), x(end_ms)
        c.add(
            "rect",
            x=x0,
            y=y,
            width=max(x1 - x0, 2.0),
            height=lane_h,
            fill=STATE_FILL["running"],
            class_="state running",
        )
    _final_state(c, story, x, y, lane_h, end_ms)
    y += lane_h + 14

    # Lane: critical sections and the deferral.
    c.text(PLOT_LEFT - 12, y + 15, "sections", anchor="end", weight="bold")
    if not story.sections:
        empty = (
            "no critical section was open at the kill request"
            if story.killed
            else "no kill, no deferral"
        )
        c.text(note_x, y + 15, empty, fill=MUTED)
        y += 22 + 14
    for section in story.sections:
        y = _section_bar(c, story, section, x, y, end_ms) + 8
    y += 6

    # Lane: hooks, one row each, numbered in the order they ran.
    c.text(PLOT_LEFT - 12, y + 13, "hooks (LIFO)", anchor="end", weight="bold")
    if not story.hooks:
        c.text(note_x, y + 13, "no hook ran", fill=MUTED)
        y += 20
    for hook in story.hooks:
        _hook_row(c, hook, x, y)
        y += 20
    y += 12

    # Lane: the other events of the run.
    c.text(PLOT_LEFT - 12, y + 13, "events", anchor="end", weight="bold")
    notes = sorted(story.notes, key=lambda n: n.at_ms)
    shown = notes[:_MAX_EVENT_ROWS]
    if not shown:
        c.text(note_x, y + 13, "none", fill=MUTED)
        y += 20
    for note in shown:
        _mark_row(c, x(note.at_ms), y, note.text, MUTED, class_="event")
        y += 20
    if len(notes) > len(shown):
        c.text(note_x, y + 13, f"\u2026 and {len(notes) - len(shown)} more", fill=MUTED)
        y += 20
    lanes_bottom = y + 4

    # Under everything: the grid; over everything: the kill markers.
    grid = _Canvas()
    ticks = _axis(grid, x, lo, hi, lanes_top - 8, lanes_bottom, story.killed)
    c.parts[grid_at:grid_at] = grid.parts
    if story.killed:
        _vline(c, x(0), lanes_top - 8, lanes_bottom, KILL_COLOUR, 2.0, None, "kill-requested")
        c.text(x(0), lanes_bottom + 34, "kill requested", anchor="middle", fill=KILL_COLOUR)
    y = lanes_bottom + ticks + 24
    y = _legend(c, y)

    height = math.ceil(y + 12)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family={quoteattr(FONT)} role="img" '
        f'aria-labelledby="ts-title">'
    )
    title = f"Termination timeline of {story.workflow_id!r}: {_subtitle(story)}"
    defs = (
        '<defs><pattern id="ts-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#dbe8f5"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{DEFERRAL_COLOUR}" stroke-width="2.4"/>'
        "</pattern>"
        '<linearGradient id="ts-open-before"><stop offset="0" stop-color="#ffffff" '
        f'stop-opacity="1"/><stop offset="1" stop-color="{SECTION_COLOUR}" stop-opacity="1"/>'
        "</linearGradient></defs>"
    )
    body = "\n".join(c.parts)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'{head}\n<title id="ts-title">{escape(title)}</title>\n{defs}\n'
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>\n{body}\n</svg>\n'
    )


def _subtitle(story: _Story) -> str:
    if not story.killed:
        text = "not killed"
    else:
        who = story.killer or {}
        name = str(who.get("id", "?"))
        kind = who.get("kind")
        by = f"{name} ({kind})" if kind and kind != "user" else name
        text = f"kill requested by {by}"
        if story.reason:
            text += f", reason: \u201c{story.reason}\u201d"
        if story.force:
            text += ", force"
    state = story.final_state
    text += f"; final state: {state}" if state else "; not finished in this trail"
    return text


def _summary(story: _Story) -> str:
    parts: list[str] = []
    if story.owner:
        parts.append(f"owner {story.owner}" + (f", team {story.team}" if story.team else ""))
    if story.runs > 1:
        parts.append(f"run {story.run} of {story.runs} under this id")
    if story.deferred_until_ms is not None:
        kinds = ", ".join(s.kind for s in story.sections)
        parts.append(f"deferred {_duration(story.deferred_until_ms)} by the {kinds} section")
    if story.killed and story.finished_ms is not None:
        parts.append(f"gone {_duration(story.finished_ms)} after the request")
    if story.hooks:
        failed = sum(h.failed for h in story.hooks)
        parts.append(f"{len(story.hooks)} hook(s) ran" + (f", {failed} failed" if failed else ""))
    if story.finished_ms is None:
        parts.append(f"last state seen: {story.last_state or '?'}")
    return " \u00b7 ".join(parts) or "\u00a0"


def _vline(
    c: _Canvas,
    at: float,
    top: float,
    bottom: float,
    colour: str,
    width: float,
    dash: str | None,
    class_: str,
) -> None:
    c.add(
        "line",
        x1=at,
        y1=top,
        x2=at,
        y2=bottom,
        stroke=colour,
        stroke_width=width,
        stroke_dasharray=dash,
        class_=class_,
    )


def _deadlines(
    c: _Canvas, story: _Story, x: _Scale, y: float, lane_h: float, hi: float, end_ms: float
) -> None:
    began = {name: start for name, start, _ in story.phases}
    beyond: list[str] = []
    for phase, due in (("forced", story.forced_due_ms), ("system", story.system_due_ms)):
        if due is None or (phase in began and began[phase] < due - 1):
            continue  # no deadline recorded, or the phase began earlier (escalated)
        reached = phase in began or due <= end_ms
        label = f"{phase} due +{_duration(due)}" + ("" if reached else " (not reached)")
        if due <= hi:
            _vline(c, x(due), y - 6, y + lane_h + 6, PHASE_EDGE[phase], 1.5, "5 3", "deadline")
            anchor = "end" if x(due) > PLOT_RIGHT - _text_width(label, 10.5) else "start"
            dx = -4 if anchor == "end" else 4
            c.text(x(due) + dx, y + lane_h + 15, label, size=10.5, anchor=anchor, class_="deadline")
        else:
            beyond.append(label)
    if beyond:
        text = "\u2192 " + "; ".join(beyond)
        c.text(PLOT_RIGHT, y - 6, text, size=10.5, anchor="end", fill=INK, class_="deadline")


def _final_state(c: _Canvas, story: _Story, x: _Scale, y: float, lane_h: float, end: float) -> None:
    state = story.final_state
    at = x(end)
    if state is None:
        c.text(at + 6, y + 15, f"{story.last_state or '?'} (no final state)", fill=MUTED)
        return
    colour = FINAL_COLOUR.get(state, INK)
    cy = y + lane_h / 2
    c.add(
        "path",
        d=f"M{_fmt(at)},{_fmt(cy - 9)} l9,9 l-9,9 l-9,-9 z",
        fill=colour,
        stroke="#ffffff",
        stroke_width=1,
        class_="final-state-mark",
    )
    label = state
    if at + 14 + _text_width(label, 13) > WIDTH - 4:
        c.text(
            at - 13,
            cy + 5,
            label,
            size=13,
            weight="bold",
            fill=colour,
            anchor="end",
            class_="final-state",
        )
    else:
        c.text(at + 13, cy + 5, label, size=13, weight="bold", fill=colour, class_="final-state")


def _section_bar(
    c: _Canvas, story: _Story, section: _Section, x: _Scale, y: float, end_ms: float
) -> float:
    bar_h = 22
    end = section.end_ms if section.end_ms is not None else end_ms
    # When it opened is not recorded, but not before the workflow started.
    x0 = x(story.started_ms) if story.started_ms is not None else float(PLOT_LEFT)
    x1 = max(x(end), x0 + 4)
    fade = min(40.0, max(x(0) - x0, 0.0))
    if fade > 0:
        c.add("rect", x=x0, y=y, width=fade, height=bar_h, fill="url(#ts-open-before)")
    c.add(
        "rect",
        x=x0 + fade,
        y=y,
        width=max(x1 - x0 - fade, 2.0),
        height=bar_h,
        fill=SECTION_COLOUR,
        class_="section",
    )
    c.text(x0 + 4, y + 15, f"{section.kind} section", size=11, weight="bold", fill="#0d2a45")
    grace = f", grace {_duration(section.grace_ms)}" if section.grace_ms is not None else ""
    if story.deferred_until_ms is not None or section.cut:
        d0 = x(0)
        c.add(
            "rect",
            x=d0,
            y=y + 4,
            width=max(x1 - d0, 3.0),
            height=bar_h - 8,
            fill="url(#ts-hatch)",
            stroke=DEFERRAL_COLOUR,
            stroke_width=1,
            class_="deferral",
        )
        if section.cut:
            label = f"kill deferred {_duration(end)}, then the section was cut: its grace ran out"
        else:
            label = f"kill deferred {_duration(end)} until the section ended{grace}"
    else:
        label = f"open at the kill request{grace}" + (
            "" if section.end_ms is not None else ", still open"
        )
    y_label = y + bar_h + 13
    if x(0) + _text_width(label, 11) > PLOT_RIGHT:
        c.text(PLOT_RIGHT, y_label, label, size=11, anchor="end", class_="deferral-label")
    else:
        c.text(x(0), y_label, label, size=11, class_="deferral-label")
    if section.end_ms is not None:
        _vline(c, x(section.end_ms), y - 4, y + bar_h + 4, DEFERRAL_COLOUR, 2.0, None, "effective")
    return y + bar_h + 18


def _mark_row(
    c: _Canvas, at: float, y: float, label: str, colour: str, *, class_: str, x_end: float = -1.0
) -> None:
    right = max(at, x_end)
    if x_end > at:
        c.add("rect", x=at, y=y + 4, width=right - at, height=10, fill=colour, opacity=0.35)
    c.add("circle", cx=right, cy=y + 9, r=4.5, fill=colour, class_=f"{class_}-mark")
    width = _text_width(label, 11)
    if right + 10 + width <= WIDTH - 6:
        c.text(right + 10, y + 13, label, size=11, class_=class_)
    else:
        c.text(at - 9, y + 13, label, size=11, anchor="end", class_=class_)


def _hook_row(c: _Canvas, hook: _HookMark, x: _Scale, y: float) -> None:
    colour = FAILED_COLOUR if hook.failed else HOOK_COLOUR.get(hook.kind, MUTED)
    took = hook.end_ms - hook.start_ms
    label = f"#{hook.number} {hook.kind} {_short(hook.name, 48)}"
    extra = [f"{_duration(took)}"] if took >= 0.01 else []
    if hook.ran_by and hook.ran_by != "workflow":
        extra.append(f"run by the {hook.ran_by}")
    if hook.failed:
        extra.append(f"FAILED: {_short(hook.error or '?', 40)}")
    if extra:
        label += " (" + ", ".join(extra) + ")"
    _mark_row(c, x(hook.start_ms), y, label, colour, class_="hook", x_end=x(hook.end_ms))


def _axis(
    c: _Canvas, x: _Scale, lo: float, hi: float, top: float, bottom: float, killed: bool
) -> float:
    step = _nice_step(hi - lo)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    if step * 10**decimals % 1:
        decimals += 1  # a step of 2.5 needs one more digit
    c.add("line", x1=PLOT_LEFT, y1=bottom, x2=PLOT_RIGHT, y2=bottom, stroke=INK, stroke_width=1)
    for index in range(math.ceil(lo / step), math.floor(hi / step) + 1):
        tick = index * step
        at = x(tick)
        c.add("line", x1=at, y1=top, x2=at, y2=bottom, stroke="#ececec", stroke_width=1)
        c.add("line", x1=at, y1=bottom, x2=at, y2=bottom + 5, stroke=INK, stroke_width=1)
        c.text(at, bottom + 18, f"{tick:.{decimals}f}", size=10.5, anchor="middle", class_="tick")
    since = "the kill request" if killed else "the workflow started"
    c.text(PLOT_RIGHT, bottom + 34, f"ms since {since}", size=10.5, anchor="end", fill=MUTED)
    return 40.0


def _legend(c: _Canvas, y: float) -> float:
    items: list[tuple[str, str]] = [
        ("graceful phase", f'fill="{PHASE_FILL["graceful"]}" stroke="{PHASE_EDGE["graceful"]}"'),
        ("forced phase", f'fill="{PHASE_FILL["forced"]}" stroke="{PHASE_EDGE["forced"]}"'),
        ("system phase", f'fill="{PHASE_FILL["system"]}" stroke="{PHASE_EDGE["system"]}"'),
        ("critical section (open before the kill)", f'fill="{SECTION_COLOUR}"'),
        ("kill deferred", f'fill="url(#ts-hatch)" stroke="{DEFERRAL_COLOUR}"'),
        ("rollback hook", f'fill="{HOOK_COLOUR["rollback"]}"'),
        ("cleanup hook", f'fill="{HOOK_COLOUR["cleanup"]}"'),
        ("failed hook", f'fill="{FAILED_COLOUR}"'),
        ("other event", f'fill="{MUTED}"'),
    ]
    c.text(20, y + 11, "Legend", size=11.5, weight="bold")
    x, row_y = 90.0, y
    for label, paint in items:
        width = 22 + _text_width(label, 11) + 18
        if x + width > WIDTH - 20:
            x, row_y = 90.0, row_y + 20
        c.raw(
            f'<rect x="{_fmt(x)}" y="{_fmt(row_y + 1)}" width="14" height="12" {paint} '
            'class="legend-swatch"/>'
        )
        c.text(x + 20, row_y + 11, label, size=11, class_="legend")
        x += width
    x, row_y = 90.0, row_y + 22
    for label, colour, dash in (
        ("kill requested (t = 0)", KILL_COLOUR, None),
        ("kill took effect", DEFERRAL_COLOUR, None),
        ("phase deadline", PHASE_EDGE["forced"], "5 3"),
    ):
        c.add(
            "line",
            x1=x,
            y1=row_y + 7,
            x2=x + 14,
            y2=row_y + 7,
            stroke=colour,
            stroke_width=2,
            stroke_dasharray=dash,
        )
        c.text(x + 20, row_y + 11, label, size=11, class_="legend")
        x += 22 + _text_width(label, 11) + 18
    c.add(
        "path",
        d=f"M{_fmt(x + 7)},{_fmt(row_y - 1)} l7,7 l-7,7 l-7,-7 z",
        fill=FINAL_COLOUR["terminated"],
    )
    c.text(x + 20, row_y + 11, "final state", size=11, class_="legend")
    return row_y + 20
