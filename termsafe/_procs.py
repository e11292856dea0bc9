"""Process identity: who owns a lease, a journal entry or a run, and is it alive?

A pid alone is not an identity: pids are reused. An ``Identity`` is the pid
together with the process's start time and the host, so "the owner is alive"
means "a process with this pid exists on this host *and* started when the
owner did".
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any

import attrs
import psutil

__all__ = ["Identity", "current_identity", "identity_alive", "process_start_time"]

# psutil rounds create_time to the clock tick; two reads of the same process
# agree exactly, but allow for float noise when comparing stored values.
_START_TOLERANCE = 0.01


@attrs.frozen
class Identity:
    """A process, identified across pid reuse.

    Attributes:
        host: The host name.
        pid: The process id.
        start_time: The process's start time (seconds since the epoch, psutil).
    """

    host: str
    pid: int
    start_time: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {"host": self.host, "pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        """The inverse of ``as_dict``."""
        return cls(str(data["host"]), int(data["pid"]), float(data["start_time"]))


@functools.cache
def _host() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> float | None:
    """The start time of process ``pid``, or ``None`` if there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


_cached: tuple[int, Identity] | None = None


def current_identity() -> Identity:
    """This process's identity (recomputed after a fork)."""
    global _cached
    pid = os.getpid()
    cached = _cached
    if cached is not None and cached[0] == pid:
        return cached[1]
    start = process_start_time(pid)
    ident = Identity(_host(), pid, start if start is not None else 0.0)
    _cached = (pid, ident)
    return ident


def identity_alive(ident: Identity) -> bool:
    """Whether the process ``ident`` names is still running.

    A process on another host is assumed alive: it cannot be checked from
    here, and assuming it dead could hand its lease to a second runner.
    """
    if ident.host != _host():
        return True
    try:
        proc = psutil.Process(ident.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        start = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    return bool(abs(start - ident.start_time) <= _START_TOLERANCE)
