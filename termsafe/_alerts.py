"""Alert rules over the kill metrics.

The rules of the requirements, with their thresholds configurable:

=================  ==========================  ========
rule               fires when                  severity
=================  ==========================  ========
``failed_kills``   failed / finished > 1 %     warning
``failed_kills``   failed / finished > 5 %     critical
``cleanup_time``   a cleanup took > 60 s       warning
``orphans``        orphans alive > 0           critical
``audit_sink``     the sink failed an event    critical
=================  ==========================  ========

"Failed" kills are those the system phase had to take over (``killed``).
Rules are edge-triggered: an alert is raised when a rule's level changes
(none -> warning -> critical, or back, which raises a ``resolved`` alert), not
on every evaluation. Evaluation uses running counters, so it is O(1) and
cheap enough to run on every kill.
"""

from __future__ import annotations

import threading
from typing import Final, Literal

import attrs

from ._exceptions import ConfigurationError
from ._sections import validate_seconds

__all__ = ["Alert", "AlertEngine", "AlertThresholds"]

Severity = Literal["warning", "critical", "resolved"]
_LEVEL: Final = {None: 0, "warning": 1, "critical": 2}


@attrs.frozen
class AlertThresholds:
    """Where the alert rules fire (strictly above each value).

    Args:
        failed_kills_warning: Fraction of finished kills that failed (default 0.01).
        failed_kills_critical: Fraction for the critical level (default 0.05).
        cleanup_warning_s: Seconds a workflow's cleanup may take (default 60).
        orphans_critical: Orphans alive tolerated (default 0).

    Raises:
        InvalidArgumentType: a value is not a number.
        ConfigurationError: a value is negative, NaN, or a fraction above 1.
    """

    failed_kills_warning: float = 0.01
    failed_kills_critical: float = 0.05
    cleanup_warning_s: float = 60.0
    orphans_critical: int = 0

    def __attrs_post_init__(self) -> None:
        # validate_seconds does the generic number checks (type, sign, NaN).
        for name in ("failed_kills_warning", "failed_kills_critical"):
            value = validate_seconds(name, getattr(self, name))
            if value is not None and value > 1:
                raise ConfigurationError(f"{name} must be a fraction in [0, 1] (got {value!r})")
        validate_seconds("cleanup_warning_s", self.cleanup_warning_s)
        validate_seconds("orphans_critical", self.orphans_critical)


@attrs.frozen
class Alert:
    """One alert: a rule changed level.

    Attributes:
        rule: ``failed_kills``, ``cleanup_time``, ``orphans`` or ``audit_sink``.
        severity: ``warning``, ``critical``, or ``resolved`` (back under threshold).
        value: The observed value that crossed the threshold.
        threshold: The threshold crossed.
        message: A sentence for humans.
    """

    rule: str
    severity: Severity
    value: float
    threshold: float
    message: str


class AlertEngine:
    """Holds each rule's current level and reports changes."""

    def __init__(self, thresholds: AlertThresholds | None = None) -> None:
        self.thresholds = thresholds if thresholds is not None else AlertThresholds()
        self._levels: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def _change(
        self, rule: str, level: str | None, value: float, threshold: float, message: str
    ) -> Alert | None:
        if self._levels.get(rule) == level:
            return None  # the common case, decided without the lock
        with self._lock:
            old = self._levels.get(rule)
            if old == level:
                return None
            self._levels[rule] = level
        if level is None:
            return Alert(rule, "resolved", value, threshold, f"{rule} back under threshold")
        severity: Severity = "critical" if level == "critical" else "warning"
        return Alert(rule, severity, value, threshold, message)

    def level(self, rule: str) -> str | None:
        """The current level of ``rule`` (``None``, ``warning`` or ``critical``)."""
        # One dict read: atomic under the GIL, and a level only ever is replaced
        # whole, so the lock would add nothing but a cost on every audit event.
        return self._levels.get(rule)

    def failed_kills(self, failed: int, finished: int) -> Alert | None:
        """Evaluate the failed-kill rate."""
        if finished <= 0:
            return None
        t = self.thresholds
        rate = failed / finished
        if rate > t.failed_kills_critical:
            level, threshold = "critical", t.failed_kills_critical
        elif rate > t.failed_kills_warning:
            level, threshold = "warning", t.failed_kills_warning
        else:
            level, threshold = None, t.failed_kills_warning
        if self._levels.get("failed_kills") == level:
            return None  # unchanged (every finished kill asks): no message to format
        return self._change(
            "failed_kills",
            level,
            rate,
            threshold,
            f"{failed} of {finished} kills failed ({rate:.1%} > {threshold:.1%}): "
            "the system phase had to take over",
        )

    def cleanup_time(self, seconds: float) -> Alert | None:
        """Evaluate one finished cleanup's duration."""
        threshold = self.thresholds.cleanup_warning_s
        level = "warning" if seconds > threshold else None
        if self._levels.get("cleanup_time") == level:
            return None
        return self._change(
            "cleanup_time",
            level,
            seconds,
            threshold,
            f"cleanup took {seconds:.1f}s (> {threshold:g}s)",
        )

    def orphans(self, alive: int) -> Alert | None:
        """Evaluate the number of orphans alive."""
        threshold = self.thresholds.orphans_critical
        level = "critical" if alive > threshold else None
        return self._change(
            "orphans",
            level,
            alive,
            threshold,
            f"{alive} orphan(s) outlived their workflow (> {threshold})",
        )

    def audit_sink(self, ok: bool, dropped: int) -> Alert | None:
        """Evaluate the audit sink's health after one delivery."""
        return self._change(
            "audit_sink",
            None if ok else "critical",
            dropped,
            0,
            f"the audit sink failed; {dropped} event(s) not written",
        )
