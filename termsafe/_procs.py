"""Process identity: who owns a lease, a journal entry or a run, and is it alive?

A pid alone is not an identity: pids are reused. An ``Identity`` is the pid
together with the process's start time and the host, so "the owner is alive"
means "a process with this pid exists on this host *and* started when the
owner did".
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import psutil

__all__ = [
    "Identity",
    "TreeKill",
    "current_identity",
    "identity_alive",
    "kill_tree",
    "process_start_time",
    "processes_with_env",
    "snapshot_tree",
]

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
    import psutil

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
    import psutil

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


# -- child process trees ---------------------------------------------------------


@attrs.frozen
class TreeKill:
    """What ``kill_tree`` did.

    Attributes:
        signalled: Pids sent the first signal.
        killed: Pids that needed SIGKILL after the grace.
        survivors: Pids still alive at the end (orphans: report them).
    """

    signalled: tuple[int, ...]
    killed: tuple[int, ...]
    survivors: tuple[int, ...]


def _matches(proc: psutil.Process, start_time: float | None) -> bool:
    import psutil

    if start_time is None:
        return True
    try:
        return bool(abs(proc.create_time() - start_time) <= _START_TOLERANCE)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def snapshot_tree(pid: int, start_time: float | None = None) -> list[psutil.Process]:
    """The process ``pid`` (if it is still the one that started at ``start_time``)
    and every descendant, including members of its session when it leads one
    (which finds grandchildren reparented after their parent died).

    ``psutil.Process`` objects carry their start time, so signalling them later
    never hits a reused pid.
    """
    import psutil

    try:
        root = psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
    if not _matches(root, start_time):
        return []
    found: dict[int, psutil.Process] = {root.pid: root}
    try:
        for child in root.children(recursive=True):
            found.setdefault(child.pid, child)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    try:
        leads_session = os.getsid(pid) == pid
    except OSError:
        leads_session = False
    if leads_session:
        # Only a session the root leads: never the caller's own session.
        for proc in psutil.process_iter():
            try:
                if proc.pid not in found and os.getsid(proc.pid) == pid:
                    found[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
    return list(found.values())


def processes_with_env(
    name: str,
    values: Collection[str],
    *,
    born_after: float | None = None,
    exec_wait: float = 0.0,
) -> dict[str, list[psutil.Process]]:
    """The live processes whose environment sets ``name`` to one of ``values``.

    Reads the environment each process was started with (``/proc/PID/environ``
    on Linux, which ``setenv`` or ``os.environ`` changes made later do not
    alter; an exec with another environment does). Processes this user may not
    read (another user's), zombies and processes that end meanwhile are
    skipped; so is the caller.

    A process caught inside its exec already has its new name but not yet its
    environment (Linux sets it last): with ``born_after``, a process started
    since then whose environment reads empty is read again, for up to
    ``exec_wait`` seconds, unless every value has been found meanwhile.

    Args:
        name: The environment variable.
        values: The values looked for.
        born_after: Wall-clock time (seconds since the epoch) after which the
            processes looked for were started; ``None``: read each process once.
        exec_wait: Seconds to wait at most for such a process's environment.

    Returns:
        For each value found, the processes carrying it (``psutil.Process``
        objects, which carry their start time: signalling one later never hits
        a reused pid).
    """
    wanted = frozenset(values)
    found: dict[str, list[psutil.Process]] = {}
    if not wanted:
        return found
    unread = _scan_env(name, wanted, born_after, found)
    _await_env(name, wanted, unread, found, time.monotonic() + exec_wait)
    return found


def _scan_env(
    name: str,
    wanted: frozenset[str],
    born_after: float | None,
    found: dict[str, list[psutil.Process]],
) -> list[psutil.Process]:
    """Read every process's environment once into ``found``; return those started
    since ``born_after`` whose environment read empty (inside an exec, maybe)."""
    import psutil

    me = os.getpid()
    unread: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        env = _environ(proc)
        if env:
            value = env.get(name)
            if value in wanted:
                found.setdefault(value, []).append(proc)
        elif env is not None and born_after is not None and _born_since(proc, born_after):
            unread.append(proc)
    return unread


def _await_env(
    name: str,
    wanted: frozenset[str],
    unread: list[psutil.Process],
    found: dict[str, list[psutil.Process]],
    deadline: float,
) -> None:
    """Read ``unread`` again until each has an environment (added to ``found`` if it
    carries a wanted value) or is gone, every value is found, or ``deadline``."""
    while unread and len(found) < len(wanted) and time.monotonic() < deadline:
        still: list[psutil.Process] = []
        for proc in unread:
            env = _environ(proc)
            if env is None:
                continue
            if not env:
                still.append(proc)
            elif env.get(name) in wanted:
                found.setdefault(env[name], []).append(proc)
        unread = still
        if unread and len(found) < len(wanted):
            time.sleep(0.002)


def _environ(proc: psutil.Process) -> dict[str, str] | None:
    """``proc``'s environment (empty while it is inside an exec), or ``None`` when
    it has none to read: gone, a zombie, a kernel thread, another user's."""
    import psutil

    try:
        env = dict(proc.environ())
        if not env and (proc.status() == psutil.STATUS_ZOMBIE or proc.ppid() == 2):
            return None  # dead, or a kernel thread (a child of kthreadd): never one
    except (psutil.Error, OSError, NotImplementedError):
        return None
    return env


def _born_since(proc: psutil.Process, when: float) -> bool:
    import psutil

    try:
        return bool(proc.create_time() >= when)
    except psutil.Error:
        return False


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def _send(proc: psutil.Process, sig: int) -> bool:
    """Signal ``proc`` if it is still the process the snapshot saw; return whether sent.

    Where the system has pidfds (Linux >= 5.3), the check and the signal are
    one: a pidfd opened and then found to belong to the snapshot's process
    (same start time) keeps naming that process, so a pid reused between the
    check and the signal is never hit. Elsewhere psutil checks the start time
    just before signalling.
    """
    import psutil

    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(proc.pid)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # no pidfd support here (ENOSYS, EPERM in a sandbox): as below
        else:
            try:
                if not proc.is_running():  # the pid now names another process
                    return False
                signal.pidfd_send_signal(fd, sig)
                return True
            except ProcessLookupError:
                return False
            finally:
                os.close(fd)
    try:
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to end; return those still alive.

    Our own children are reaped (``psutil.wait_procs``). A zombie that is not
    ours counts as gone: it has died, and only its parent (or init, which in a
    container may take seconds) can reap it.
    """
    import psutil

    deadline = time.monotonic() + timeout
    delay = 0.001
    alive = procs
    while True:
        _, alive = psutil.wait_procs(alive, timeout=0)
        alive = _alive(alive)
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return alive
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)


def kill_tree(
    pid: int,
    start_time: float | None = None,
    *,
    timeout: float = 5.0,
    force: bool = False,
) -> TreeKill:
    """Stop a process and all its descendants.

    Snapshots the tree, sends SIGTERM (SIGKILL with ``force``), waits up to
    ``timeout`` seconds, SIGKILLs what is left, then snapshots again for
    processes forked meanwhile and SIGKILLs those. PID reuse is guarded by
    start times, and closed entirely by pidfds where the system has them.

    Args:
        pid: The root of the tree.
        start_time: The root's start time (``None``: trust the pid).
        timeout: Seconds to wait after the first signal.
        force: Skip SIGTERM and SIGKILL at once.

    Returns:
        A ``TreeKill``; its ``survivors`` are orphans to report.
    """
    import psutil

    first = signal.SIGKILL if force else signal.SIGTERM
    procs = snapshot_tree(pid, start_time)
    signalled: list[int] = []
    for proc in procs:
        try:
            if _send(proc, first):
                signalled.append(proc.pid)
        except (PermissionError, psutil.AccessDenied):
            continue
    alive = _wait_gone(procs, timeout)
    killed: list[int] = []
    for _round in range(3):
        # Anything still alive, plus anything the tree forked since the snapshot.
        extra = [p for p in snapshot_tree(pid, start_time) if p.pid not in {q.pid for q in alive}]
        targets = _alive(list(alive) + extra)
        if not targets:
            break
        for proc in targets:
            try:
                if _send(proc, signal.SIGKILL):
                    killed.append(proc.pid)
            except (PermissionError, psutil.AccessDenied):
                continue
        alive = _wait_gone(targets, max(1.0, timeout / 2))
    survivors = tuple(p.pid for p in _alive(list(alive)))
    return TreeKill(tuple(signalled), tuple(dict.fromkeys(killed)), survivors)
