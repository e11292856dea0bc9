"""Pre-kill validation: ``Terminator.can_kill`` with 10,000 live workflows (< 5 us median).

The workflows are real and live: 10,000 ``term.workflow(...)`` contexts held
open in one thread. Each measured call asks about a random one of them, for a
principal that exercises the longest path through the rules (a team lead of
the workflow's team, which is checked after the admin and owner rules), and
half of the calls for a workflow inside a critical section. The figure is the
median over many single calls, timed with ``perf_counter_ns`` and corrected
for the timer's own cost measured in the same run.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import sys
import time
from typing import Any

import termsafe

Row = dict[str, Any]


class NullSink:
    """Discards events: isolates the engine's cost."""

    def emit(self, event: termsafe.AuditEvent) -> None:
        """Discard ``event``."""

    def close(self) -> None:
        """Nothing to release."""


def bench_can_kill(live: int, calls: int) -> Row:
    """Median ``can_kill`` time with ``live`` workflows registered."""
    rng = random.Random(7)
    lead = termsafe.Principal("lead", roles=["team-lead"], teams=["t3"])
    with termsafe.Terminator(sink=NullSink()) as term, contextlib.ExitStack() as stack:
        ids = []
        for i in range(live):
            wid = f"wf-{i}"
            stack.enter_context(term.workflow(wid, owner=f"user-{i}", team=f"t{i % 7}"))
            ids.append(wid)
        # The last one opened is in scope: keep a section open in it for the
        # "in critical section" path.
        stack.enter_context(termsafe.critical_section("db"))
        targets = [ids[rng.randrange(live)] if i % 2 else ids[-1] for i in range(calls)]
        answers: dict[str, int] = {}
        samples = []
        overhead = []
        clock = time.perf_counter_ns
        can_kill = term.can_kill
        for wid in targets:
            t0 = clock()
            t1 = clock()
            overhead.append(t1 - t0)
            t0 = clock()
            decision = can_kill(wid, lead)
            t1 = clock()
            samples.append(t1 - t0)
            answers[decision.reason] = answers.get(decision.reason, 0) + 1
    timer = statistics.median(overhead)
    median_us = max(0.0, statistics.median(samples) - timer) / 1000
    p99_us = (sorted(samples)[int(len(samples) * 0.99)] - timer) / 1000
    return {
        "name": f"can_kill() median, {live} live workflows",
        "value": median_us,
        "target": "< 5",
        "unit": "us",
        "passed": median_us < 5,
        "detail": (
            f"{calls} calls; p99 {p99_us:.2f} us; timer cost {timer / 1000:.3f} us subtracted; "
            f"answers {answers}"
        ),
    }


def collect(quick: bool) -> list[Row]:
    """The can_kill benchmark row."""
    return [bench_can_kill(10_000, 20_000 if quick else 100_000)]


if __name__ == "__main__":
    for row in collect(quick="--quick" in sys.argv):
        print(row)
