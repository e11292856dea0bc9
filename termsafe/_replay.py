"""Post-mortems: rebuild each workflow's final state and timeline from an audit trail.

``replay_audit(path)`` verifies the hash chain first and refuses a trail that
fails (``AuditTampered``): a post-mortem built on edited evidence would be
worse than none. ``allow_tampered=True`` rebuilds it anyway, for forensics,
with ``Replay.verified`` false and the verifier's report attached. A torn last
line (a crash mid-write) is not tampering: the trail verifies and the partial
line is skipped.

A trail may hold several runs of one workflow id (a restarted workflow, a
nightly job): the timeline keeps every event of that id in trail order, the
summary fields describe its last run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from ._audit import Anchor, AuditEvent, VerifyReport, _trail_files, verify_audit_log
from ._exceptions import AuditTampered, ConfigurationError, InvalidArgumentType

__all__ = ["Replay", "WorkflowHistory", "replay_audit"]

FINAL_STATES = frozenset({"completed", "failed", "terminated", "killed"})


@attrs.frozen
class WorkflowHistory:
    """One workflow id's story, rebuilt from the trail.

    Attributes:
        workflow_id: The workflow id.
        state: The final state of its last run when it finished, else the last
            state the trail shows (the process may have died: see ``finished``).
        finished: Whether the last run has a ``workflow_finished`` event.
        runs: How many runs started under this id.
        owner: The owner of the last run, if recorded.
        team: The team of the last run, if recorded.
        started_at: When the last run started (UTC timestamp), if recorded.
        ended_at: When it finished, if it did.
        killed_by: The actor of the kill that went ahead in the last run, if any.
        kill_reason: Its reason.
        deferred: Whether that kill waited for a critical section.
        phases: The phases the kill went through (``graceful``, ``forced``, ``system``).
        refused: Refused kill attempts (all runs): actor, reason and decision.
        hooks: Hook outcomes of the last run, in the order they ran.
        timeline: Every event of this workflow id, in trail order.
    """

    workflow_id: str
    state: str | None
    finished: bool
    runs: int
    owner: str | None
    team: str | None
    started_at: str | None
    ended_at: str | None
    killed_by: Mapping[str, Any] | None
    kill_reason: str | None
    deferred: bool
    phases: tuple[str, ...]
    refused: tuple[Mapping[str, Any], ...]
    hooks: tuple[Mapping[str, Any], ...]
    timeline: tuple[AuditEvent, ...]


@attrs.frozen
class Replay:
    """What ``replay_audit`` rebuilt.

    Attributes:
        path: The trail.
        report: The chain verification's report.
        verified: Whether the chain verified (always true unless ``allow_tampered``).
        workflows: Workflow id -> ``WorkflowHistory``, in order of first appearance.
        other: Events with no workflow id (alerts, recovery summaries), in order.
        events: How many events were read.
    """

    path: str
    report: VerifyReport
    verified: bool
    workflows: Mapping[str, WorkflowHistory]
    other: tuple[AuditEvent, ...]
    events: int

    def __getitem__(self, workflow_id: str) -> WorkflowHistory:
        return self.workflows[workflow_id]

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self.workflows

    def final_states(self) -> dict[str, str | None]:
        """Workflow id -> its ``state``."""
        return {wid: h.state for wid, h in self.workflows.items()}


class _Builder:
    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.timeline: list[AuditEvent] = []
        self.refused: list[Mapping[str, Any]] = []
        self.runs = 0
        self._new_run()

    def _new_run(self) -> None:
        self.state: str | None = None
        self.finished = False
        self.owner: str | None = None
        self.team: str | None = None
        self.started_at: str | None = None
        self.ended_at: str | None = None
        self.killed_by: Mapping[str, Any] | None = None
        self.kill_reason: str | None = None
        self.deferred = False
        self.phases: list[str] = []
        self.hooks: list[Mapping[str, Any]] = []

    def _phase(self, phase: object) -> None:
        if isinstance(phase, str) and phase not in self.phases:
            self.phases.append(phase)

    def add(self, event: AuditEvent) -> None:
        self.timeline.append(event)
        kind = event.type
        details = event.details
        if kind == "workflow_started":
            self._new_run()
            self.runs += 1
            self.started_at = event.timestamp
            actor = event.actor
            self.owner = str(actor["id"]) if actor and actor.get("id") else None
            team = details.get("team")
            self.team = team if isinstance(team, str) else None
        elif kind == "kill_requested" and self.killed_by is None:
            self.killed_by = dict(event.actor) if event.actor else None
            self.kill_reason = event.reason
            self._phase(details.get("phase") or ("forced" if details.get("force") else "graceful"))
        elif kind == "kill_deferred":
            self.deferred = True
        elif kind == "kill_refused":
            self.refused.append(
                {
                    "actor": dict(event.actor) if event.actor else None,
                    "reason": event.reason,
                    "decision": details.get("decision"),
                    "timestamp": event.timestamp,
                }
            )
            return  # a refusal reports the state, it does not change it
        elif kind == "phase_changed":
            self._phase(details.get("phase"))
        elif kind in ("hook_ran", "hook_failed"):
            self.hooks.append(
                {
                    "hook": details.get("hook"),
                    "kind": details.get("kind"),
                    "outcome": "ran" if kind == "hook_ran" else "failed",
                    "error": details.get("error"),
                }
            )
        elif kind == "workflow_finished" and not self.finished:
            self.finished = True
            self.ended_at = event.timestamp
            self.state = event.state
            return
        elif kind == "late_finish":
            return  # terminal is terminal: recorded, not applied
        if event.state is not None and not self.finished:
            self.state = event.state

    def build(self) -> WorkflowHistory:
        return WorkflowHistory(
            workflow_id=self.workflow_id,
            state=self.state,
            finished=self.finished,
            runs=self.runs,
            owner=self.owner,
            team=self.team,
            started_at=self.started_at,
            ended_at=self.ended_at,
            killed_by=self.killed_by,
            kill_reason=self.kill_reason,
            deferred=self.deferred,
            phases=tuple(self.phases),
            refused=tuple(self.refused),
            hooks=tuple(self.hooks),
            timeline=tuple(self.timeline),
        )


def _events(files: list[str]) -> Iterator[AuditEvent]:
    for name in files:
        try:
            fh = open(name, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            continue  # rotated files only; the verifier reported the gap
        with fh:
            for raw in fh:
                if not raw.endswith(b"\n") or not raw.strip():
                    continue  # a torn last line, or a rotated file's seal
                try:
                    rec = json.loads(raw)
                    yield AuditEvent.from_dict(rec["event"])
                except (ValueError, KeyError, TypeError, ConfigurationError, InvalidArgumentType):
                    continue  # only reachable with allow_tampered: the verifier named it


def replay_audit(
    path: str | os.PathLike[str],
    *,
    key: bytes | None = None,
    anchor: Anchor | None = None,
    allow_tampered: bool = False,
    allow_pruned: bool | None = None,
) -> Replay:
    """Rebuild each workflow's final state and timeline from a ``JsonlSink`` trail.

    The chain is verified first (rotated files included, as
    ``verify_audit_log`` does).

    Args:
        path: The trail (the current file of a rotated trail).
        key: The HMAC key the trail was written with, if any.
        anchor: A head anchor to check truncation against.
        allow_tampered: Rebuild a trail that fails verification anyway
            (``Replay.verified`` is then false); default: refuse it.
        allow_pruned: As for ``verify_audit_log``: whether a trail whose
            oldest files a recorded prune removed verifies (default: yes,
            unless a keyless trail is checked against an ``anchor``).

    Returns:
        The ``Replay``.

    Raises:
        AuditTampered: the chain does not verify (and ``allow_tampered`` is false);
            ``.report`` names the first bad line.
        FileNotFoundError: there is no trail at ``path``.
        InvalidArgumentType: ``key`` is not bytes, ``anchor`` not an ``Anchor``,
            or ``allow_pruned`` not a bool or ``None``.
        ConfigurationError: ``key`` is empty.
    """
    report = verify_audit_log(path, key=key, anchor=anchor, allow_pruned=allow_pruned)
    fspath = os.fspath(path)
    if not report.ok and not allow_tampered:
        raise AuditTampered(fspath, report)
    builders: dict[str, _Builder] = {}
    other: list[AuditEvent] = []
    count = 0
    for event in _events(_trail_files(fspath)):
        count += 1
        wid = event.workflow_id
        if wid is None:
            other.append(event)
            continue
        builder = builders.get(wid)
        if builder is None:
            builder = builders[wid] = _Builder(wid)
        builder.add(event)
    return Replay(
        path=fspath,
        report=report,
        verified=report.ok,
        workflows={wid: b.build() for wid, b in builders.items()},
        other=tuple(other),
        events=count,
    )
