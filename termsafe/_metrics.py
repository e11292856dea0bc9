"""In-process kill metrics, readable as a snapshot.

Counters are plain ints updated under one lock; latencies and cleanup times
keep a bounded reservoir of the most recent samples for the percentiles, so
memory stays flat however long the process lives.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Final, Protocol, runtime_checkable

import attrs

__all__ = ["MetricsHook", "MetricsSnapshot", "NoopMetricsHook", "Recorder"]

RESERVOIR: Final = 4096

log = logging.getLogger("termsafe")


@runtime_checkable
class MetricsHook(Protocol):
    """What metric adapters implement (OpenTelemetry, Prometheus, ...).

    Every method is called synchronously on the path that observed the value:
    keep them cheap. An exception is caught and logged (the first one, with
    its traceback), never raised into the kill.
    """

    def kill_requested(self, *, outcome: str) -> None:
        """A kill was asked for; ``outcome`` is ``"accepted"`` or ``"refused"``."""

    def kill_finished(self, *, final_state: str, latency_s: float) -> None:
        """A killed workflow reached its final state ``latency_s`` after the request."""

    def cleanup_finished(self, *, duration_s: float) -> None:
        """A workflow's hooks finished running, taking ``duration_s``."""

    def orphan_detected(self, *, kind: str) -> None:
        """Something (``"thread"``, ``"process"``) outlived its workflow."""


class NoopMetricsHook:
    """The default hook: does nothing."""

    def kill_requested(self, *, outcome: str) -> None:
        """Ignore."""

    def kill_finished(self, *, final_state: str, latency_s: float) -> None:
        """Ignore."""

    def cleanup_finished(self, *, duration_s: float) -> None:
        """Ignore."""

    def orphan_detected(self, *, kind: str) -> None:
        """Ignore."""


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    # Nearest-rank: the smallest value with at least q of the samples at or below it.
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


@attrs.frozen
class MetricsSnapshot:
    """A point-in-time copy of a terminator's metrics.

    Attributes:
        kills_requested: Kill requests accepted (first request per workflow).
        kills_refused: Kill requests refused by validation or permission.
        kills_succeeded: Killed workflows that unwound themselves
            (``terminated``, or ``completed``/``failed`` before the kill landed).
        kills_failed: Killed workflows the system phase had to take over (``killed``).
        kills_in_flight: Kills not yet at a final state.
        success_rate: ``kills_succeeded / (succeeded + failed)``, or ``None``.
        failed_rate: ``kills_failed / (succeeded + failed)``, or ``None``.
        kill_latency_p50: Seconds from request to final state (median), or ``None``.
        kill_latency_p95: 95th percentile, or ``None``.
        kill_latency_p99: 99th percentile, or ``None``.
        cleanup_time_max: Longest hook run of a finished workflow, seconds.
        cleanup_time_p95: 95th percentile of hook run times, or ``None``.
        orphans: Threads/processes that outlived their workflow, total seen.
        orphans_alive: Of those, still alive at the time of the snapshot.
        hook_failures: Hooks that raised or timed out.
        events_emitted: Audit events handed to the sink.
        events_dropped: Audit events the sink failed to take.
    """

    kills_requested: int
    kills_refused: int
    kills_succeeded: int
    kills_failed: int
    kills_in_flight: int
    success_rate: float | None
    failed_rate: float | None
    kill_latency_p50: float | None
    kill_latency_p95: float | None
    kill_latency_p99: float | None
    cleanup_time_max: float | None
    cleanup_time_p95: float | None
    orphans: int
    orphans_alive: int
    hook_failures: int
    events_emitted: int
    events_dropped: int


class Recorder:
    """Collects the numbers behind ``Terminator.metrics()``."""

    def __init__(self, hook: MetricsHook | None = None) -> None:
        self.hook: MetricsHook = hook if hook is not None else NoopMetricsHook()
        # The default hook is skipped outright: these run on every kill's path.
        # Exactly it: a subclass that overrides some of its methods is a real hook.
        self._hooked = type(self.hook) is not NoopMetricsHook
        self.metrics_hook_failures = 0
        self._lock = threading.Lock()
        # Requests have a lock of their own: the thread issuing a kill storm
        # must not find it held by an ending workflow's thread (recording its
        # end under _lock) that is waiting for the GIL the storm holds.
        self._requests_lock = threading.Lock()
        self.kills_requested = 0
        self.kills_refused = 0
        self.kills_succeeded = 0
        self.kills_failed = 0
        self.orphans = 0
        self.hook_failures = 0
        self.events_emitted = 0
        self.events_dropped = 0
        self._latency: deque[float] = deque(maxlen=RESERVOIR)
        self._cleanup: deque[float] = deque(maxlen=RESERVOIR)
        self._cleanup_max: float | None = None

    def kill_requested(self, accepted: bool) -> None:
        with self._requests_lock:
            if accepted:
                self.kills_requested += 1
            else:
                self.kills_refused += 1
        if self._hooked:
            try:
                self.hook.kill_requested(outcome="accepted" if accepted else "refused")
            except Exception:
                self._hook_raised()

    def kill_finished(self, final_state: str, latency: float) -> None:
        with self._lock:
            if final_state == "killed":
                self.kills_failed += 1
            else:
                self.kills_succeeded += 1
            self._latency.append(latency)
        if self._hooked:
            try:
                self.hook.kill_finished(final_state=final_state, latency_s=latency)
            except Exception:
                self._hook_raised()

    def cleanup_finished(self, duration: float) -> None:
        with self._lock:
            self._cleanup.append(duration)
            if self._cleanup_max is None or duration > self._cleanup_max:
                self._cleanup_max = duration
        if self._hooked:
            try:
                self.hook.cleanup_finished(duration_s=duration)
            except Exception:
                self._hook_raised()

    def orphan(self, kind: str) -> None:
        with self._lock:
            self.orphans += 1
        if self._hooked:
            try:
                self.hook.orphan_detected(kind=kind)
            except Exception:
                self._hook_raised()

    def hook_failed(self) -> None:
        with self._lock:
            self.hook_failures += 1

    def _hook_raised(self) -> None:
        # A metrics adapter must never break a kill: log the first failure
        # with its traceback, count the rest.
        self.metrics_hook_failures += 1
        if self.metrics_hook_failures == 1:
            log.exception("termsafe: metrics hook %r failed (logged once)", self.hook)

    def event(self, delivered: bool) -> None:
        # Only the audit dispatcher thread writes these two: no lock needed.
        if delivered:
            self.events_emitted += 1
        else:
            self.events_dropped += 1

    def snapshot(self, orphans_alive: int) -> MetricsSnapshot:
        with self._requests_lock, self._lock:
            latency = sorted(self._latency)
            cleanup = sorted(self._cleanup)
            done = self.kills_succeeded + self.kills_failed
            return MetricsSnapshot(
                kills_requested=self.kills_requested,
                kills_refused=self.kills_refused,
                kills_succeeded=self.kills_succeeded,
                kills_failed=self.kills_failed,
                kills_in_flight=max(0, self.kills_requested - done),
                success_rate=self.kills_succeeded / done if done else None,
                failed_rate=self.kills_failed / done if done else None,
                kill_latency_p50=_percentile(latency, 0.50),
                kill_latency_p95=_percentile(latency, 0.95),
                kill_latency_p99=_percentile(latency, 0.99),
                cleanup_time_max=self._cleanup_max,
                cleanup_time_p95=_percentile(cleanup, 0.95),
                orphans=self.orphans,
                orphans_alive=orphans_alive,
                hook_failures=self.hook_failures,
                events_emitted=self.events_emitted,
                events_dropped=self.events_dropped,
            )
