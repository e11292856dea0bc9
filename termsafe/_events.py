"""The path from "something happened" to the audit sink.

Emitting must never block a kill (a ``JsonlSink`` may fsync every line), so
``emit`` only appends a tuple to a queue; one dispatcher thread (started with
the first event) builds the ``AuditEvent`` and hands it to the sink. A sink that
raises never stops anything: the failure is logged, counted, and reported to
the ``on_sink_error`` callback (which raises the alert).

Waking a sleeping thread costs the emitter far more than the append (a
condition notify, and the woken thread then competes for the GIL), so after
delivering a batch the dispatcher lingers for ``LINGER`` seconds before it
goes idle: events emitted meanwhile join the next batch without waking it.
Only the first event after an idle spell wakes it; ``flush`` and ``close``
also cut a linger short, so a caller waiting for delivery never waits for
the linger to run out. The dispatcher is a daemon thread; an ``atexit`` hook
(installed when the first dispatcher starts) delivers what is still queued
when the interpreter exits normally.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._audit import AuditEvent, AuditSink

__all__ = ["LINGER", "EventPipe"]

log = logging.getLogger("termsafe")

#: Seconds the dispatcher waits for more events after a batch before it idles:
#: the most a delivery lags an emit while events keep coming (``flush`` does
#: not wait for it).
LINGER = 0.002

_Item = tuple[
    float,  # wall-clock time of the event
    str,  # type
    "str | None",  # workflow id
    "Mapping[str, Any] | None",  # actor
    "str | None",  # reason
    "str | None",  # state
    "Mapping[str, Any]",  # details
]


class EventPipe:
    """A queue of events served by one dispatcher thread.

    ``emit`` takes no lock: ``deque.append`` is atomic, and a lock here was
    the convoy point of kill storms (a workflow thread preempted while holding
    it stalled every other emitter for a whole switch interval). The
    dispatcher numbers events in queue order, so ``seq`` follows the trail.
    """

    def __init__(
        self,
        sink: AuditSink,
        on_delivered: Callable[[bool], None],
        on_sink_error: Callable[[AuditEvent, BaseException], None],
    ) -> None:
        self.sink = sink
        self._on_delivered = on_delivered
        self._on_sink_error = on_sink_error
        # Items: events, flush markers (Events to set) and calls to make once
        # everything queued before them was delivered.
        self._queue: collections.deque[_Item | threading.Event | Callable[[], object]] = (
            collections.deque()
        )
        self._seq = 0
        self._closed = False
        self._listeners: list[Callable[[AuditEvent], None]] = []
        # Events the dispatcher emits from its own callbacks (an alert raised
        # by a failing sink, a listener that kills): flush() waits for them too.
        self._in_callbacks = False
        self._derived = 0
        self._reset_threading()
        _track_for_fork(self)

    def _reset_threading(self) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the idle dispatcher waits here
        self._idle = False  # waiting for work: any new item must wake it
        self._lingering = False  # waiting briefly for more: only flush/close wake it
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _after_fork_in_child(self) -> None:
        # The parent's queued events and dispatcher thread are the parent's:
        # the child starts clean (a lock held at fork time would deadlock it).
        self._queue.clear()
        self._reset_threading()
        _running.discard(self)

    def add_listener(self, fn: Callable[[AuditEvent], None]) -> None:
        """Call ``fn`` with every event after the sink took it (dispatcher thread)."""
        self._listeners.append(fn)

    def emit(
        self,
        type_: str,
        workflow_id: str | None,
        actor: Mapping[str, Any] | None,
        reason: str | None,
        state: str | None,
        details: Mapping[str, Any],
    ) -> None:
        """Queue an event. Never blocks on the sink, takes no lock on the hot path."""
        if self._closed:
            return
        if self._in_callbacks and threading.current_thread() is self._thread:
            self._derived += 1
        self._queue.append((time.time(), type_, workflow_id, actor, reason, state, details))
        if self._thread is None:
            self._start()
        elif self._idle:
            self._wake()

    def on_dispatcher(self) -> bool:
        """Whether the calling thread is the dispatcher (an audit listener)."""
        thread = self._thread
        return thread is not None and thread is threading.current_thread()

    def call_when_delivered(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` on the dispatcher once every event emitted so far was delivered.

        Never blocks. On a closed pipe ``fn`` is called at once. ``fn`` may be
        called twice if the pipe closes meanwhile: it must be idempotent.
        """
        if not self._closed:
            self._queue.append(fn)
            if self._thread is None:
                self._start()
            elif self._idle:
                self._wake()
            if not self._closed:
                return
            # Closed meanwhile: the dispatcher may have left without it.
        fn()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="termsafe-audit", daemon=True)
                thread.start()
                self._thread = thread
                _flush_at_exit(self)

    def _wake(self, urgent: bool = False) -> None:
        with self._work:
            if self._idle or (urgent and self._lingering):
                self._idle = False
                self._lingering = False
                self._work.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far reached the sink; return whether it did."""
        thread = self._thread
        if thread is None and not self._queue:
            return True
        if thread is threading.current_thread():
            return False  # a listener flushing would wait for itself
        if self._closed and (thread is None or not thread.is_alive()):
            return not self._queue
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            derived = self._derived
            marker = threading.Event()
            self._queue.append(marker)  # behind every event emitted before this call
            if self._thread is None:
                self._start()
            else:
                # Under the lock, not by peeking at the flags: a dispatcher about
                # to linger either sees the marker or is woken from the linger.
                self._wake(urgent=True)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not marker.wait(left):
                return False
            if self._derived == derived:
                return True
            # Delivering what was ahead of the marker emitted more (behind it).

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver what is queued, stop the thread and close the sink."""
        self.flush(timeout)
        self._closed = True
        with self._work:
            self._lingering = False
            self._work.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        try:
            self.sink.close()
        except Exception:
            log.exception("termsafe: closing the audit sink failed")

    def _run(self) -> None:
        from ._audit import AuditEvent, utc_timestamp

        last_ms, stamp = -1, ""
        queue = self._queue
        work = self._work
        linger = False
        while True:
            with work:
                if linger and not queue and not self._closed:
                    # Emitters append without waking us; flush/close cut this short.
                    self._lingering = True
                    work.wait(LINGER)
                    self._lingering = False
                while True:
                    # Idle first, then look: an emitter that appended before
                    # seeing the flag is found by the look, the rest wake us.
                    self._idle = True
                    if queue or self._closed:
                        break
                    work.wait()
                self._idle = False
            if self._closed and not queue:
                return
            linger = True
            while queue:
                item = queue.popleft()
                if not isinstance(item, tuple):
                    if isinstance(item, threading.Event):
                        item.set()
                    else:
                        try:
                            item()
                        except Exception:
                            log.exception("termsafe: delivery callback %r failed", item)
                    continue
                ts, type_, wid, actor, reason, state, details = item
                self._seq += 1
                seq = self._seq
                ms = int(ts * 1000)
                if ms != last_ms:
                    # Events of a burst share their millisecond: format it once.
                    last_ms, stamp = ms, utc_timestamp(ts)
                event = AuditEvent._trusted(seq, stamp, type_, wid, actor, reason, state, details)
                error: Exception | None = None
                try:
                    self.sink.emit(event)
                except Exception as exc:
                    log.exception("termsafe: audit sink failed on event %s %s", seq, type_)
                    error = exc
                ok = error is None
                self._in_callbacks = True
                try:
                    # Callbacks must never kill the dispatcher: flush() waits on it.
                    self._on_delivered(ok)
                    if error is not None:
                        self._on_sink_error(event, error)
                except Exception:
                    log.exception("termsafe: audit delivery callback failed")
                for listener in self._listeners:
                    try:
                        listener(event)
                    except Exception:
                        log.exception("termsafe: audit listener %r failed", listener)
                self._in_callbacks = False


#: Seconds the interpreter's exit waits, in all, for events still queued.
EXIT_FLUSH_TIMEOUT = 5.0

_running: weakref.WeakSet[EventPipe] = weakref.WeakSet()
_exit_hook_installed = False


def _flush_at_exit(pipe: EventPipe) -> None:
    """Have the interpreter's exit deliver what ``pipe`` still holds (hook installed once).

    The dispatcher is a daemon thread: without this, events emitted just
    before a normal exit (a ``workflow_finished``) would die with it.
    """
    global _exit_hook_installed
    _running.add(pipe)
    if not _exit_hook_installed:
        _exit_hook_installed = True
        atexit.register(_deliver_before_exit)


def _deliver_before_exit() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
    for pipe in list(_running):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            pipe.flush(left)
        except Exception:
            log.exception("termsafe: delivering audit events at exit failed")


_forkable: weakref.WeakSet[Any] = weakref.WeakSet()
_fork_hook_installed = False


def _track_for_fork(obj: Any) -> None:
    """Reset ``obj``'s threads and locks in a forked child (hook installed on first use)."""
    global _fork_hook_installed
    _forkable.add(obj)
    if not _fork_hook_installed:
        _fork_hook_installed = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    for obj in list(_forkable):
        obj._after_fork_in_child()
