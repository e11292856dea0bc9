"""The path from "something happened" to the audit sink.

Emitting must never block a kill (a ``JsonlSink`` may fsync every line), so
``emit`` only appends a tuple to a queue; one dispatcher thread (started with
the first event) builds the ``AuditEvent`` and hands it to the sink. A sink that
raises never stops anything: the failure is logged, counted, and reported to
the ``on_sink_error`` callback (which raises the alert).
"""

from __future__ import annotations

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

__all__ = ["EventPipe"]

log = logging.getLogger("termsafe")

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
    """A queue of events served by one dispatcher thread."""

    def __init__(
        self,
        sink: AuditSink,
        on_delivered: Callable[[bool], None],
        on_sink_error: Callable[[AuditEvent, BaseException], None],
    ) -> None:
        self.sink = sink
        self._on_delivered = on_delivered
        self._on_sink_error = on_sink_error
        self._queue: collections.deque[tuple[int, _Item]] = collections.deque()
        self._seq = 0
        self._delivered = 0
        self._closed = False
        self._listeners: list[Callable[[AuditEvent], None]] = []
        self._reset_threading()
        _track_for_fork(self)

    def _reset_threading(self) -> None:
        # Two conditions on one lock: emit wakes only the dispatcher, and only
        # when it is idle; the dispatcher wakes flushers after each batch.
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._idle = False
        self._thread: threading.Thread | None = None

    def _after_fork_in_child(self) -> None:
        # The parent's queued events and dispatcher thread are the parent's:
        # the child starts clean (a lock held at fork time would deadlock it).
        self._queue.clear()
        self._delivered = self._seq
        self._reset_threading()

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
    ) -> int:
        """Queue an event; return its sequence number. Never blocks on the sink."""
        item = (time.time(), type_, workflow_id, actor, reason, state, details)
        with self._cond:
            if self._closed:
                return -1
            self._seq += 1
            seq = self._seq
            self._queue.append((seq, item))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="termsafe-audit", daemon=True
                )
                self._thread.start()
            elif self._idle:
                self._idle = False
                self._work.notify()
        return seq

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far reached the sink; return whether it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._seq
            while self._delivered < target and self._thread is not None:
                if self._closed and not self._thread.is_alive():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._delivered >= target

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver what is queued, stop the thread and close the sink."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._work.notify_all()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        try:
            self.sink.close()
        except Exception:
            log.exception("termsafe: closing the audit sink failed")

    def _run(self) -> None:
        from ._audit import AuditEvent, utc_timestamp

        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._idle = True
                    self._work.wait()
                self._idle = False
                if not self._queue and self._closed:
                    return
                batch = list(self._queue)
                self._queue.clear()
            for seq, (ts, type_, wid, actor, reason, state, details) in batch:
                event = AuditEvent(
                    seq=seq,
                    timestamp=utc_timestamp(ts),
                    type=type_,
                    workflow_id=wid,
                    actor=actor,
                    reason=reason,
                    state=state,
                    details=details,
                )
                try:
                    self.sink.emit(event)
                except Exception as exc:
                    log.exception("termsafe: audit sink failed on event %s %s", seq, type_)
                    self._on_delivered(False)
                    try:
                        self._on_sink_error(event, exc)
                    except Exception:
                        log.exception("termsafe: sink-error callback failed")
                else:
                    self._on_delivered(True)
                for listener in self._listeners:
                    try:
                        listener(event)
                    except Exception:
                        log.exception("termsafe: audit listener %r failed", listener)
            with self._cond:
                self._delivered = batch[-1][0]
                self._cond.notify_all()


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
