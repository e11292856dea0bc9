"""One background thread that fires the phase deadlines of a terminator.

Started lazily (never at import): by the terminator when its first workflow
starts (a thread started by the first kill would make that kill wait for it
to be scheduled, which under load took over 100 ms), else by the first
deadline. It sleeps until the earliest deadline and runs its callback.
Callbacks must be short: anything that can block (running hooks of an
abandoned workflow) is handed to a worker thread.
``call_at`` returns the deadline's entry; ``cancel(entry)`` drops its
callback and argument at once (what they reference is freed: a finished
workflow is not kept alive until its kill's next deadline), and the empty
entry is skipped when its time comes, or compacted away when cancelled
entries fill half the heap. Callbacks still re-check the state they act on.
``call_batched`` is for callbacks scheduled by the thousand (a kill storm's
phase deadlines): calls of one callback due in the same millisecond share a
heap entry, and ``cancel(entry, arg)`` takes one argument out of it.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DeadlineTimer"]

log = logging.getLogger("termsafe")

_NO_ARG: Any = object()  # call_at without an argument: the callback takes none

#: A deadline in the heap: [deadline, sequence, callback or None, argument].
Entry = list[Any]
#: Cancelled entries tolerated before the heap is compacted (and at least half).
_COMPACT_AFTER = 1024
#: ``call_batched``: calls of one callback due in the same slot of this many
#: seconds share a heap entry, run at the slot's end (never before a deadline).
BATCH_SLOT = 0.001


class _Batch(dict):  # type: ignore[type-arg]
    """The arguments of a shared entry (keys; insertion order is run order)."""

    __slots__ = ()


class DeadlineTimer:
    """A heap of ``(deadline, callback)`` served by one daemon thread."""

    __slots__ = (
        "__weakref__",
        "_batches",
        "_cancelled",
        "_cond",
        "_heap",
        "_lock",
        "_name",
        "_seq",
        "_stopped",
        "_thread",
    )

    def __init__(self, name: str = "termsafe-timer") -> None:
        # call_at takes the bare lock: Condition's own __enter__/__exit__ are
        # Python calls, paid once per kill.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[Entry] = []
        self._batches: dict[Callable[..., object], Entry] = {}  # the open shared entry of each
        self._cancelled = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._name = name
        from ._events import _track_for_fork

        _track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        # Deadlines belong to the parent's kills; the thread did not survive the
        # fork, and a lock held at fork time would deadlock the child.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap = []
        self._batches = {}
        self._cancelled = 0
        self._thread = None

    def start(self) -> None:
        """Start the thread now, if it is not running (idempotent)."""
        if self._thread is None:
            with self._lock:
                self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def call_at(self, deadline: float, fn: Callable[..., object], arg: Any = _NO_ARG) -> Entry:
        """Run ``fn()`` (or ``fn(arg)``) in the timer thread at ``deadline`` (``time.monotonic``).

        Passing ``arg`` rather than a closure saves the closure: a kill storm
        schedules one deadline per kill, and each closure (function, cells) is
        more for the garbage collector to walk while thousands are pending.

        Returns:
            The entry, for ``cancel``.
        """
        entry = [deadline, 0, fn, arg]
        with self._lock:
            if not self._stopped:
                self._push_locked(entry)
        return entry

    def _push_locked(self, entry: Entry) -> None:
        entry[1] = next(self._seq)
        heapq.heappush(self._heap, entry)
        if self._thread is None:
            self._start_locked()
        elif self._heap[0] is entry:
            # Only an earlier deadline needs the thread to recompute its wait.
            self._cond.notify()

    def call_batched(self, deadline: float, fn: Callable[[Any], object], arg: Any) -> Entry:
        """Run ``fn(arg)`` in the timer thread at ``deadline``, or up to ``BATCH_SLOT`` after it.

        Calls of the same ``fn`` (the same object: keep a bound method in an
        attribute) due in the same slot share one heap entry: a storm of
        10,000 kills pushes one entry per slot instead of 10,000, and makes no
        new object per call. The arguments of an entry are the keys of a dict:
        ``arg`` must be hashable, and equal arguments count as one (an
        ``arg`` passed twice for one slot runs once). ``fn`` runs once per
        ``arg``, in the order they joined; one that raises is logged and the
        rest run.

        Returns:
            The shared entry, for ``cancel(entry, arg)``.
        """
        slot_end = (deadline // BATCH_SLOT + 1.0) * BATCH_SLOT
        with self._lock:
            if self._stopped:
                return [slot_end, 0, None, None]
            entry = self._batches.get(fn)
            if entry is not None and entry[0] == slot_end and entry[2] is not None:
                entry[3][arg] = None
                return entry
            batch = _Batch()
            batch[arg] = None
            entry = [slot_end, 0, fn, batch]
            self._batches[fn] = entry
            self._push_locked(entry)
        return entry

    def cancel(self, entry: Entry | None, arg: Any = _NO_ARG) -> None:
        """Drop a deadline's callback and argument (``None``, or one already run: no-op).

        For an entry of ``call_batched``, pass the ``arg`` to drop: only that
        call is dropped, the entry's others still run.

        Takes no lock (workflows call it as they end, and a lock here would be
        one more that a kill storm's thread can find held by a thread waiting
        for the GIL): the callback is cleared before the argument, and the
        timer thread reads the argument before the callback, so it either sees
        the callback gone or runs it with its argument. The count of cancelled
        entries is approximate; compacting recounts under the lock.
        """
        if entry is None:
            return
        batch = entry[3]  # before the callback: _run clears the callback first
        if entry[2] is None:
            return
        if type(batch) is _Batch:
            assert arg is not _NO_ARG, "cancel(entry, arg): a shared entry needs the arg to drop"
            batch.pop(arg, None)  # atomic; the timer thread copies the keys before running
            return
        entry[2] = entry[3] = None  # the callback first: see _run
        self._cancelled += 1
        if self._cancelled > _COMPACT_AFTER and 2 * self._cancelled > len(self._heap):
            with self._lock:
                heap = self._heap
                live = [e for e in heap if e[2] is not None]
                dead = len(heap) - len(live)
                if 2 * dead > len(heap):
                    heap[:] = live
                    heapq.heapify(heap)
                    dead = 0
                self._cancelled = dead

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the timer thread as soon as possible."""
        self.call_at(time.monotonic(), fn)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread; pending deadlines are dropped."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._batches.clear()
            self._cancelled = 0
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the timer thread has been started and not stopped."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopped

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            entry = heapq.heappop(self._heap)
                            arg = entry[3]  # before the callback: see cancel()
                            fn = entry[2]
                            if fn is None:
                                self._cancelled = max(0, self._cancelled - 1)
                                continue
                            entry[2] = entry[3] = None  # run: a later cancel() is a no-op
                            if type(arg) is _Batch:
                                if self._batches.get(fn) is entry:
                                    del self._batches[fn]  # closed: later calls open another
                                arg = list(arg)
                                fn = functools.partial(_run_batch, fn)
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
            try:
                if arg is _NO_ARG:
                    fn()
                else:
                    fn(arg)
            except Exception:
                log.exception("termsafe timer callback %r failed", fn)


def _run_batch(fn: Callable[[Any], object], args: list[Any]) -> None:
    for arg in args:
        try:
            fn(arg)
        except Exception:
            log.exception("termsafe timer callback %r failed", fn)
