"""Tests for termsafe._timer: the deadline thread behind the phase ladder."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
from conftest import WAIT

from termsafe._timer import DeadlineTimer


@pytest.fixture
def timer() -> Iterator[DeadlineTimer]:
    """A started timer, stopped at teardown."""
    t = DeadlineTimer(name="termsafe-test-timer")
    t.start()
    yield t
    t.stop(WAIT)


class Payload:
    """Something a deadline's argument can be (weak-referenceable)."""


class TestDeadlines:
    def test_run_in_deadline_order_with_their_argument(self, timer: DeadlineTimer) -> None:
        """Callbacks run in deadline order, each with its argument (or none)."""
        ran: list[object] = []
        done = threading.Event()

        def last() -> None:
            ran.append("last")
            done.set()

        now = time.monotonic()
        timer.call_at(now + 0.03, last)
        timer.call_at(now + 0.02, ran.append, "second")
        timer.call_at(now + 0.01, ran.append, "first")
        assert done.wait(WAIT)
        assert ["first", "second", "last"] == ran

    def test_a_failing_callback_does_not_stop_the_thread(self, timer: DeadlineTimer) -> None:
        """A callback that raises is logged; the next deadline still runs."""
        done = threading.Event()
        now = time.monotonic()
        timer.call_at(now, lambda: 1 / 0)
        timer.call_at(now + 0.01, done.set)
        assert done.wait(WAIT)


class TestCancel:
    def test_cancelled_deadline_never_runs_and_frees_its_argument(
        self, timer: DeadlineTimer
    ) -> None:
        """cancel() drops the callback and argument at once; the deadline is skipped."""
        ran: list[str] = []
        payload = Payload()
        gone = weakref.ref(payload)
        now = time.monotonic()
        entry = timer.call_at(now + 0.02, lambda p: ran.append("cancelled"), payload)
        after = threading.Event()
        timer.call_at(now + 0.04, after.set)  # runs only once the cancelled one's time passed
        timer.cancel(entry)
        del payload
        gc.collect()
        assert gone() is None  # freed before its deadline came
        assert after.wait(WAIT)
        assert [] == ran

    def test_cancel_after_it_ran_or_twice_is_a_no_op(self, timer: DeadlineTimer) -> None:
        """Cancelling a deadline that already ran, or None, or twice, changes nothing."""
        done = threading.Event()
        entry = timer.call_at(time.monotonic(), done.set)
        assert done.wait(WAIT)
        timer.cancel(entry)
        timer.cancel(entry)
        timer.cancel(None)
        assert 0 == timer._cancelled

    def test_cancel_takes_no_lock(self, timer: DeadlineTimer) -> None:
        """cancel() returns while another thread holds the timer's lock."""
        entry = timer.call_at(time.monotonic() + 3600, print)
        done = threading.Event()

        def cancel() -> None:
            timer.cancel(entry)
            done.set()

        with timer._lock:
            thread = threading.Thread(target=cancel)
            thread.start()
            cancelled = done.wait(WAIT)
        thread.join(WAIT)
        assert cancelled
        assert None is entry[2]

    def test_many_cancelled_entries_are_compacted(self, timer: DeadlineTimer) -> None:
        """Once cancelled entries pass a floor and fill half the heap, they are dropped."""
        far = time.monotonic() + 3600  # nothing here comes due during the test
        entries = [timer.call_at(far + i, print) for i in range(3000)]
        for entry in entries[:2000]:
            timer.cancel(entry)
        # The 1,501st cancel made them more than half of 3,000: compacted to the
        # 1,499 left; the 499 cancelled after stay until they come due.
        assert (1499, 499) == (len(timer._heap), timer._cancelled)
        assert entries[2000:] == sorted(e for e in timer._heap if e[2] is not None)
