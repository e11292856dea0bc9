"""Tests for termsafe._timer: the deadline thread behind the phase ladder."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
from conftest import WAIT

from termsafe._timer import BATCH_SLOT, DeadlineTimer


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


def _slot_ahead() -> float:
    """A deadline in the middle of a slot far enough ahead that the calls of a test all join it."""
    return (time.monotonic() + 1.0) // BATCH_SLOT * BATCH_SLOT + BATCH_SLOT / 2


class TestBatched:
    """call_batched: the calls of one callback due in the same slot share a heap entry."""

    def test_calls_in_one_slot_share_an_entry_and_each_runs_once(
        self, timer: DeadlineTimer
    ) -> None:
        """Many calls for one slot push one entry; each argument runs once, in order."""
        ran: list[int] = []
        done = threading.Event()

        def record(n: int) -> None:
            ran.append(n)
            if n == 99:
                done.set()

        # Far enough ahead that the slot cannot close while the calls join it.
        slot = _slot_ahead()
        entries = [timer.call_batched(slot, record, n) for n in range(100)]
        assert all(e is entries[0] for e in entries)
        assert 1 == len(timer._heap)
        assert done.wait(WAIT)
        assert list(range(100)) == ran

    def test_never_runs_before_its_deadline(self, timer: DeadlineTimer) -> None:
        """Each call runs at its deadline or after it (the slot's end), never before."""
        late: list[float] = []
        done = threading.Event()
        deadlines = [time.monotonic() + 0.01 + i * 0.0004 for i in range(40)]

        def check(deadline: float) -> None:
            late.append(time.monotonic() - deadline)
            if len(late) == len(deadlines):
                done.set()

        for deadline in deadlines:
            timer.call_batched(deadline, check, deadline)
        assert done.wait(WAIT)
        assert min(late) >= 0

    def test_other_slots_and_callbacks_get_their_own_entries(self, timer: DeadlineTimer) -> None:
        """Another slot, or another callback, is not folded into an open entry."""
        far = time.monotonic() + 3600
        a = timer.call_batched(far, print, 1)
        b = timer.call_batched(far + 10 * BATCH_SLOT, print, 2)
        c = timer.call_batched(far, repr, 3)
        assert a is not b
        assert a is not c
        assert 3 == len(timer._heap)

    def test_cancel_drops_one_argument_and_frees_it(self, timer: DeadlineTimer) -> None:
        """cancel(entry, arg) takes that call out; the entry's other calls still run."""
        ran: list[object] = []
        done = threading.Event()
        payload = Payload()
        gone = weakref.ref(payload)

        def record(p: object) -> None:
            ran.append(p)
            if p == "kept-2":
                done.set()

        slot = _slot_ahead()
        entry = timer.call_batched(slot, record, "kept-1")
        assert timer.call_batched(slot, record, payload) is entry
        assert timer.call_batched(slot, record, "kept-2") is entry
        timer.cancel(entry, payload)
        timer.cancel(entry, payload)  # twice: a no-op
        del payload
        gc.collect()
        assert gone() is None  # freed before the deadline came
        assert done.wait(WAIT)
        assert ["kept-1", "kept-2"] == ran

    def test_a_failing_call_does_not_stop_the_others(self, timer: DeadlineTimer) -> None:
        """One call that raises is logged; the rest of its entry still runs."""
        ran: list[int] = []
        done = threading.Event()

        def call(n: int) -> None:
            if n == 1:
                raise RuntimeError("boom")
            ran.append(n)
            if n == 2:
                done.set()

        slot = _slot_ahead()
        for n in range(3):
            timer.call_batched(slot, call, n)
        assert done.wait(WAIT)
        assert [0, 2] == ran

    def test_a_call_after_the_entry_ran_opens_a_new_one(self, timer: DeadlineTimer) -> None:
        """Once a shared entry ran, a call for the same slot gets an entry of its own and runs."""
        first = threading.Event()
        second = threading.Event()

        def set_it(event: threading.Event) -> None:
            event.set()

        deadline = time.monotonic()
        entry = timer.call_batched(deadline, set_it, first)
        assert first.wait(WAIT)
        again = timer.call_batched(deadline, set_it, second)
        assert again is not entry
        assert second.wait(WAIT)
        timer.cancel(entry, first)  # one that ran: a no-op

    def test_stop_drops_the_open_entries(self) -> None:
        """A stopped timer runs nothing more, and calls made after stop() are dropped."""
        timer = DeadlineTimer(name="termsafe-test-timer")
        timer.start()
        timer.call_batched(time.monotonic() + 3600, print, 1)
        timer.stop(WAIT)
        assert ([], {}) == (timer._heap, timer._batches)
        entry = timer.call_batched(time.monotonic(), print, 2)
        assert None is entry[2]
        assert [] == timer._heap
