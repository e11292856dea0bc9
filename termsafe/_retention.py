"""Retention: how long the data of finished (and killed) workflows is kept.

termsafe itself never deletes a record of what happened: the audit trail only
grows (rotation renames, it does not delete), the registry keeps every run,
idempotency records stay until pruned. The one thing it removes on its own is
a checkpoint, when a later run of the same workflow id completes: the
checkpoint is resume state, and that run resumed from it and finished. What
the killed run did stays in the trail (``emergency_save`` holds its last
checkpoint when the kill reached the forced phase) and in its run record.

``apply_retention`` is the one place where that data goes, and only past the
ages a ``RetentionPolicy`` gives: whole rotated audit files (recorded in the
trail first, so the verifier still proves the rest), checkpoints, settled
idempotency records and the records of runs that ended. Anything the policy
leaves at ``None`` is kept forever.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Final

import attrs

from ._exceptions import ConfigurationError, InvalidArgumentType

TYPE_CHECKING = False

if TYPE_CHECKING:
    from ._audit import JsonlSink
    from ._store import Store

__all__ = ["RetentionPolicy", "RetentionReport", "apply_retention"]

#: The kinds of data a policy covers, in the order reports list them.
KINDS: Final = ("audit", "checkpoints", "idempotency", "runs")
#: The store methods ``apply_retention`` calls, by kind.
_STORE_PRUNE: Final = {
    "checkpoints": "checkpoint_prune",
    "idempotency": "idem_prune",
    "runs": "run_prune",
}


def _seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(
            f"RetentionPolicy.{name} must be a number of seconds, a datetime.timedelta "
            f"or None (got {value!r})"
        )
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(
            f"RetentionPolicy.{name} must be >= 0 and finite (got {value!r}); "
            "None keeps that data forever"
        )
    return seconds


# attrs converters must be named functions for mypy's attrs plugin.
def _audit_seconds(value: object) -> float | None:
    return _seconds("audit", value)


def _checkpoint_seconds(value: object) -> float | None:
    return _seconds("checkpoints", value)


def _idempotency_seconds(value: object) -> float | None:
    return _seconds("idempotency", value)


def _run_seconds(value: object) -> float | None:
    return _seconds("runs", value)


@attrs.frozen
class RetentionPolicy:
    """How long each kind of data is kept, for ``apply_retention``.

    Each field is a duration: seconds (int or float) or a
    ``datetime.timedelta``, stored as float seconds; ``None`` (the default)
    keeps that kind forever. Data goes once it is *older* than its duration:
    at exactly that age it is still kept.

    Args:
        audit: Rotated files of a ``JsonlSink`` trail (``path.1``, ``path.2``,
            ...), by their newest event. The current file is never removed;
            without ``max_bytes`` there is nothing rotated to remove.
        checkpoints: Checkpoints in the store, by when they were last saved.
            One whose workflow has a live run in the registry is kept.
        idempotency: Settled idempotency records (recorded or released), by
            their last change, with finished compensations of the same age.
            Records in flight or with an unknown outcome are kept until settled.
        runs: Records of runs that ended (completed, failed, terminated,
            killed), by when they ended. Live runs are kept.

    Raises:
        InvalidArgumentType: A duration is not a number, a timedelta or ``None``.
        ConfigurationError: A duration is negative, NaN or infinite.
    """

    audit: float | None = attrs.field(default=None, converter=_audit_seconds)
    checkpoints: float | None = attrs.field(default=None, converter=_checkpoint_seconds)
    idempotency: float | None = attrs.field(default=None, converter=_idempotency_seconds)
    runs: float | None = attrs.field(default=None, converter=_run_seconds)

    def as_dict(self) -> dict[str, float | None]:
        """Return the durations, in seconds, by kind.

        Returns:
            ``{"audit": ..., "checkpoints": ..., "idempotency": ..., "runs": ...}``.
        """
        return {kind: getattr(self, kind) for kind in KINDS}


_NOUNS: Final = {
    "checkpoints": "checkpoint(s)",
    "idempotency": "settled key(s)",
    "runs": "ended run(s)",
}


@attrs.frozen
class RetentionReport:
    """What ``apply_retention`` removed (or, in a dry run, would remove).

    A count is ``None`` when the policy keeps that kind forever (nothing was
    looked at).

    Args:
        audit_files: Rotated audit files.
        audit_lines: The trail lines those files held.
        checkpoints: Checkpoints.
        idempotency: Settled idempotency keys.
        runs: Records of ended runs.
        dry_run: Nothing was removed; the counts are what would go.
    """

    audit_files: int | None = None
    audit_lines: int | None = None
    checkpoints: int | None = None
    idempotency: int | None = None
    runs: int | None = None
    dry_run: bool = False

    def lines(self) -> list[str]:
        """Describe the outcome, one line per kind.

        Returns:
            For example ``["audit: 3 rotated file(s) (1200 lines) removed",
            "checkpoints: kept (no retention set)", ...]``.
        """
        done = "would be removed" if self.dry_run else "removed"
        out = []
        if self.audit_files is None:
            out.append("audit: kept (no retention set)")
        else:
            out.append(
                f"audit: {self.audit_files} rotated file(s) ({self.audit_lines} lines) {done}"
            )
        for kind in ("checkpoints", "idempotency", "runs"):
            count = getattr(self, kind)
            if count is None:
                out.append(f"{kind}: kept (no retention set)")
            else:
                out.append(f"{kind}: {count} {_NOUNS[kind]} {done}")
        return out

    def as_dict(self) -> dict[str, Any]:
        """Return the report as plain, JSON-ready data.

        Returns:
            A dict of the fields.
        """
        return attrs.asdict(self)

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _check_now(now: object) -> float:
    if now is None:
        return time.time()
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise InvalidArgumentType(f"now must be a number of seconds since the epoch (got {now!r})")
    if not math.isfinite(now):
        raise ConfigurationError(f"now must be finite (got {now!r})")
    return float(now)


def _check_store(store: object) -> Store:
    missing = [m for m in _STORE_PRUNE.values() if not callable(getattr(store, m, None))]
    if isinstance(store, bool) or missing:
        raise InvalidArgumentType(
            f"store must be a termsafe Store with {', '.join(_STORE_PRUNE.values())} "
            f"or None (got {store!r})"
        )
    return store  # type: ignore[return-value]


def apply_retention(
    policy: RetentionPolicy,
    *,
    store: Store | None = None,
    audit_path: str | os.PathLike[str] | None = None,
    audit_key: bytes | None = None,
    now: float | None = None,
    dry_run: bool = False,
    max_bytes: int | None = None,
) -> RetentionReport:
    """Remove what is past its retention, and report how much went, by kind.

    Only the kinds the policy gives a duration are looked at. Nothing is
    removed before it is recorded, in this order:

    1. With a trail (``audit_path``, or the default one when the policy prunes
       the trail), the trail is verified first, and the check that it is
       signed as ``audit_key`` says (so the records below can be appended).
       A trail that does not verify stops everything: nothing is removed,
       neither from the trail nor from the store (pruning would destroy the
       evidence).
    2. A ``retention_started`` event (the policy and ``now``) is recorded.
    3. The trail's rotated files go, whole, oldest first, after an
       ``audit_pruned`` event recording them was appended through the chain
       (so ``verify_audit_log`` still proves the rest and still reports a file
       deleted any other way); then the store's checkpoints, idempotency
       records and run records.
    4. A ``retention_applied`` event with every count is recorded.

    The events go to the trail; without one (no ``audit_path`` and the policy
    keeps the trail), to the current workflow's terminator, or the default
    one (``get_terminator()``), like every other audit event of the process,
    ``retention_started`` delivered to its sink before anything is removed.
    A dry run writes nothing and removes nothing. A run that fails half way
    leaves ``retention_started`` with no ``retention_applied`` after it.

    Safe to run at any time, from a cron job, while workflows run and write
    the trail: it takes the same locks as they do, and holds the trail's only
    to check what changed since it verified it, record and delete.

    Args:
        policy: How long to keep each kind.
        store: Where checkpoints, idempotency records and runs live; default
            ``$TERMSAFE_HOME``'s (opened only when the policy prunes one of them).
        audit_path: The trail (its current file); default
            ``$TERMSAFE_HOME/audit.jsonl`` when the policy prunes the trail.
        audit_key: The trail's HMAC key, if it is signed (the records are
            signed with it).
        now: The time ages are measured from, in seconds since the epoch;
            default ``time.time()``.
        dry_run: Remove nothing, write nothing; count what would go.
        max_bytes: The trail's ``max_bytes``, as its writers use it, so that
            the records rotate the trail as theirs do; default none (the few
            records may take the current file past the writers' limit).

    Returns:
        The counts, by kind (``None`` for a kind the policy keeps forever).

    Raises:
        InvalidArgumentType: ``policy`` is not a ``RetentionPolicy``, ``store``
            not a store, ``audit_path`` not a path, ``audit_key`` not bytes,
            ``now`` not a number or ``max_bytes`` not an int.
        ConfigurationError: ``now`` is NaN or infinite, ``audit_key`` is empty,
            ``max_bytes`` is not positive, or the trail is signed differently
            from ``audit_key`` (nothing was touched).
        FileNotFoundError: The policy prunes the trail and there is none at
            ``audit_path`` (nothing was touched).
        AuditTrailError: The trail does not verify (nothing was touched).
    """
    if not isinstance(policy, RetentionPolicy):
        raise InvalidArgumentType(f"policy must be a RetentionPolicy (got {policy!r})")
    when = _check_now(now)
    if not isinstance(dry_run, bool):
        raise InvalidArgumentType(f"dry_run must be a bool (got {dry_run!r})")
    store_kinds = [k for k in _STORE_PRUNE if getattr(policy, k) is not None]
    st = None if store is None else _check_store(store)
    if audit_path is None and policy.audit is not None:
        from ._store import default_home

        audit_path = default_home() / "audit.jsonl"
    sink = None
    if audit_path is not None:
        from ._audit import JsonlSink

        sink = JsonlSink(audit_path, key=audit_key, max_bytes=max_bytes)
    elif max_bytes is not None:
        raise ConfigurationError(f"max_bytes is for a trail, and there is none (got {max_bytes!r})")
    try:
        prep = None
        if sink is not None and (policy.audit is not None or _trail_exists(sink.path)):
            # Verified, and planned, without the trail's lock.
            prep = sink._prepare_prune(policy.audit, when)
        if not store_kinds and policy.audit is None and sink is None:
            return RetentionReport(dry_run=dry_run)
        if store_kinds and st is None:
            from ._store import open_default_store

            st = open_default_store()
        if not dry_run:
            _record(sink, st, "retention_started", policy, when, None)
        counts: dict[str, int | None] = dict.fromkeys(("audit_files", "audit_lines", *_STORE_PRUNE))
        if sink is not None and policy.audit is not None:
            pruned = sink._prune(policy.audit, when, dry_run=dry_run, prep=prep)
            counts["audit_files"], counts["audit_lines"] = pruned.files, pruned.lines
        for kind in store_kinds:
            prune = getattr(st, _STORE_PRUNE[kind])
            counts[kind] = int(prune(getattr(policy, kind), now=when, dry_run=dry_run))
        report = RetentionReport(**counts, dry_run=dry_run)
        if not dry_run:
            _record(sink, st, "retention_applied", policy, when, report)
        return report
    finally:
        if sink is not None:
            sink.close()


def _trail_exists(path: str) -> bool:
    from ._audit import _rotated

    return os.path.exists(path) or bool(_rotated(path))


def _record(
    sink: JsonlSink | None,
    store: Store | None,
    type_: str,
    policy: RetentionPolicy,
    now: float,
    report: RetentionReport | None,
) -> None:
    from ._audit import AuditEvent, utc_timestamp

    details: dict[str, Any] = {"policy_s": policy.as_dict(), "now": utc_timestamp(now)}
    if report is not None:
        details.update((k, v) for k, v in report.as_dict().items() if k != "dry_run")
    if sink is not None:
        sink.emit(AuditEvent(seq=0, timestamp=utc_timestamp(), type=type_, details=details))
        return
    from ._safeop import OperationScope
    from ._terminator import get_terminator

    scope = OperationScope("api", "apply_retention", store)
    scope.emit(type_, details)
    if type_ == "retention_started":
        # Delivered to the sink before anything is removed.
        term = scope.workflow.terminator if scope.workflow is not None else get_terminator()
        term.flush(_FLUSH_SECONDS)


#: How long ``apply_retention`` waits for its first event to reach a terminator's sink.
_FLUSH_SECONDS: Final = 5.0
