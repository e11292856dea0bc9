"""What the metric adapters (``termsafe.otel``, ``termsafe.prometheus``) share.

An adapter sits on the kill path: the terminator calls it synchronously while
it carries a kill out, so an adapter must never raise (a broken exporter must
not break a kill) and must keep every attribute value to a small fixed set (a
workflow id or a principal as a label would make one time series per workflow
or per user, which is how metric backends run out of memory).

Importing this module imports no metrics library.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Final

from ._states import TERMINAL_STATES

__all__ = ["BUCKETS", "FINAL_STATES", "ORPHAN_KINDS", "OTHER", "OUTCOMES", "Guard"]

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
