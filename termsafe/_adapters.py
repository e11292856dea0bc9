"""What the metric adapters (``termsafe.otel``, ``termsafe.prometheus``) share.

An adapter sits on the kill path: the terminator calls it synchronously while
it carries a kill out, so an adapter must never raise (a broken exporter must
not break a kill) and must keep every attribute value to a small fixed set (a
workflow id or a principal as a label would make one time series per workflow
or per user, which is how metric backends run out of memory).

``MetricsAdapter`` holds the ``MetricsHook`` methods both adapters run: a
backend's adapter builds its instruments, binds their updates per attribute
value (``Series``) and hands them over.

Importing this module imports no metrics library.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Final, Generic, TypeVar

from ._states import TERMINAL_STATES

__all__ = [
    "BUCKETS",
    "FINAL_STATES",
    "ORPHAN_KINDS",
    "OTHER",
    "OUTCOMES",
    "Guard",
    "Increment",
    "MetricsAdapter",
    "Observe",
    "Series",
]

log = logging.getLogger("termsafe.metrics")

#: ``kill_requested(outcome=...)``: whether the kill was accepted.
OUTCOMES: Final = ("accepted", "refused")
#: ``kill_finished(final_state=...)``: the terminal workflow states.
FINAL_STATES: Final = tuple(sorted(s.value for s in TERMINAL_STATES))
#: ``orphan_detected(kind=...)``: what outlived its workflow.
ORPHAN_KINDS: Final = ("process", "thread")
#: What any other value is reported as, so a caller cannot grow the label set.
OTHER: Final = "other"

#: Histogram bucket upper bounds in seconds, for kill latency and cleanup time:
#: from a cooperative kill (milliseconds) past the default ladder (5 s + 5 s)
#: to the 60 s cleanup alert, so the alert thresholds are bucket boundaries.
BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class Guard:
    """Counts an adapter's failed calls and logs only the first.

    Logging every failure would turn a broken exporter into a log flood on a
    kill storm; the count (an adapter's ``failures``) keeps the rest visible.
    """

    def __init__(self, adapter: str) -> None:
        self._adapter = adapter
        self._lock = threading.Lock()
        self.failures = 0

    def failed(self, method: str) -> None:
        """Record that ``method`` raised; call from the ``except`` block that caught it."""
        with self._lock:
            self.failures += 1
            first = self.failures == 1
        if not first:
            return
        # A logging filter or handler that raises must not reach the kill path either.
        with contextlib.suppress(Exception):
            log.warning(
                "termsafe: %s.%s raised; the kill goes on without this metric, and later "
                "failures of this adapter are counted in its .failures, not logged",
                self._adapter,
                method,
                exc_info=True,
            )


#: A counter's update for one attribute set: add one.
Increment = Callable[[], object]
#: A histogram's update for one attribute set: record a value in seconds.
Observe = Callable[[float], object]

_UpdateT_co = TypeVar("_UpdateT_co", bound=Callable[..., object], covariant=True)


class Series(Generic[_UpdateT_co]):
    """One instrument's update, bound once per known attribute value.

    Args:
        known: The update for each value of the fixed set.
        other: Makes the update for ``OTHER``, which any value outside the set
            is reported as; asked each time one is (so a backend that exports
            a label value from its first use shows ``other`` only once
            something reported it).
    """

    __slots__ = ("_known", "_other")

    def __init__(self, known: Mapping[str, _UpdateT_co], other: Callable[[], _UpdateT_co]) -> None:
        self._known = known
        self._other = other

    def __call__(self, value: str) -> _UpdateT_co:
        """The update for ``value``, or for ``OTHER`` if ``value`` is not in the set."""
        update = self._known.get(value)
        return update if update is not None else self._other()


class MetricsAdapter:
    """The ``MetricsHook`` methods of ``OTelMetricsHook`` and ``PrometheusMetricsHook``.

    Every method is one or two bound updates, and none raises: a failure
    inside the metrics library goes to ``Guard``. The terminator guards its
    metrics hook too, but this guard is what an adapter called on its own
    (outside a terminator) has, and it names the adapter and the method.

    Args:
        kills: ``kill_requested``'s counter, by outcome.
        finished: ``kill_finished``'s counter, by final state.
        latency: ``kill_finished``'s histogram, by final state.
        cleanup: ``cleanup_finished``'s histogram (no attributes).
        orphans: ``orphan_detected``'s counter, by kind.
    """

    def __init__(
        self,
        *,
        kills: Series[Increment],
        finished: Series[Increment],
        latency: Series[Observe],
        cleanup: Observe,
        orphans: Series[Increment],
    ) -> None:
        self._kills = kills
        self._finished = finished
        self._latency = latency
        self._cleanup = cleanup
        self._orphans = orphans
        self._guard = Guard(type(self).__name__)

    @property
    def failures(self) -> int:
        """How many calls failed inside the metrics library (the first one was logged)."""
        return self._guard.failures

    def kill_requested(self, *, outcome: str) -> None:
        """Count a kill request as ``accepted`` or ``refused``.

        Args:
            outcome: ``"accepted"`` or ``"refused"``.
        """
        try:
            self._kills(outcome)()
        except Exception:
            self._guard.failed("kill_requested")

    def kill_finished(self, *, final_state: str, latency_s: float) -> None:
        """Count a finished kill and record its latency.

        Args:
            final_state: The workflow's final state (``terminated``, ``killed``, ...).
            latency_s: Seconds from the kill request to that state.
        """
        try:
            # Both looked up before either is updated: a failing lookup counts nothing.
            finished = self._finished(final_state)
            latency = self._latency(final_state)
            finished()
            latency(latency_s)
        except Exception:
            self._guard.failed("kill_finished")

    def cleanup_finished(self, *, duration_s: float) -> None:
        """Record how long a workflow's hooks took.

        Args:
            duration_s: Seconds the hooks ran.
        """
        try:
            self._cleanup(duration_s)
        except Exception:
            self._guard.failed("cleanup_finished")

    def orphan_detected(self, *, kind: str) -> None:
        """Count a thread or process that outlived its workflow.

        Args:
            kind: ``"thread"`` or ``"process"``.
        """
        try:
            self._orphans(kind)()
        except Exception:
            self._guard.failed("orphan_detected")
