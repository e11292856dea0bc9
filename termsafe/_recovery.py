"""Crash recovery: settle what dead processes left in the journal.

A safe operation journals what a SIGKILL would leave behind *before* it exists
(``_atomic.py``: a temp file's or staging folder's name prefix, a backup
name). ``sweep_journal`` walks the journal and, for every entry whose owner
process is gone (``identity_alive``: pid *and* start time, so a reused pid does
not count), undoes the leftover and removes the entry:

``temp_file``
    removes the temp (whatever starts with the journaled prefix).
``temp_dir``
    if the target directory is missing and the backup exists (a kill between
    the two renames of the portable swap), renames the backup back to the
    target; then removes the staging folder (or the old tree parked under
    the staging prefix) and any backup left beside a target that exists.
``git_lock``
    hands the entry to ``termsafe._git.sweep_stale_lock`` (left with a note if
    that module is not there).
``child_process``
    left alone: stopping a dead owner's child processes is ``recover()``'s
    step before the sweep (the supervisor runs ``recover()`` when its command
    ends, and so does ``termsafe recover``); an entry still here afterwards
    names a process that survived SIGKILL.
``lock``
    left (nothing journals one yet).

Every step is idempotent and the whole sweep runs under a file lock next to
the store, so sweeps may run at once from several processes, and again after
a sweep that was itself killed.

Temps whose journal entry was lost (a store deleted, ``store=False``) are
found only by the opt-in name sweep (``orphans_in``): files and staging folders
with termsafe's prefixes, untouched for ``orphan_age`` seconds, and not named
by any journal entry still open.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import filelock

from ._atomic import BACKUP_PREFIX, STAGE_PREFIX, TEMP_PREFIX, _fsync_dir, _iter_prefixed
from ._exceptions import ConfigurationError, InvalidArgumentType
from ._procs import Identity, current_identity, identity_alive

if TYPE_CHECKING:
    from ._store import JournalEntry, Store

__all__ = ["LeftEntry", "SweepReport", "sweep_journal"]


@attrs.frozen
class LeftEntry:
    """Something the sweep saw and left in place, and why.

    Attributes:
        entry_id: The journal entry, or ``None`` for a file found by the name sweep.
        kind: The journal kind (``temp_file``, ...), or ``orphan`` for the name sweep.
        path: The path concerned, if there is one.
        reason: Why it was left.
    """

    entry_id: int | None
    kind: str
    path: str | None
    reason: str


@attrs.frozen
class SweepReport:
    """What ``sweep_journal`` did.

    Attributes:
        removed: Paths removed (temps, staging folders, old trees).
        restored: Directories put back from their backup.
        settled: Journal entries removed because nothing is left to do.
        left: Entries and files left in place, each with the reason.
    """

    removed: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()
    settled: tuple[int, ...] = ()
    left: tuple[LeftEntry, ...] = ()

    @property
    def clean(self) -> bool:
        """Whether nothing was left."""
        return not self.left


class _Sweep:
    def __init__(self, store: Store) -> None:
        #: Journals the git commands the sweep itself runs (a recovery killed
        #: mid-sweep leaves them to the next one).
        self.store = store
        self.removed: list[str] = []
        self.restored: list[str] = []
        self.settled: list[int] = []
        self.left: list[LeftEntry] = []
        self._alive: dict[Identity, bool] = {}
        self._listings: dict[str, dict[str, bool]] = {}

    def report(self) -> SweepReport:
        return SweepReport(
            tuple(self.removed), tuple(self.restored), tuple(self.settled), tuple(self.left)
        )

    def alive(self, owner: Identity) -> bool:
        known = self._alive.get(owner)
        if known is None:
            known = self._alive[owner] = identity_alive(owner)
        return known

    # -- one entry -------------------------------------------------------------------

    def settle(self, entry: JournalEntry) -> str | None:
        """Undo what ``entry`` names; ``None`` when done, else why it stays."""
        payload = entry.payload
        if entry.kind == "temp_file":
            return self._temp_file(payload)
        if entry.kind == "temp_dir":
            return self._temp_dir(payload)
        if entry.kind == "git_lock":
            return self._git_lock(payload)
        if entry.kind == "child_process":
            return "child processes are stopped by recover() (the supervisor runs it), not here"
        return f"journal kind {entry.kind!r} is not handled by sweep_journal"

    def _remove(self, path: str, *, tree: bool) -> str | None:
        try:
            if tree:
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"could not remove {path!r}: {exc}"
        self.removed.append(path)
        return None

    def _listing(self, folder: str) -> dict[str, bool]:
        """The termsafe-prefixed names in ``folder`` (name -> is a directory), listed
        once per sweep: 10,000 entries in one folder must not mean 10,000 listings."""
        listing = self._listings.get(folder)
        if listing is None:
            found = _iter_prefixed(folder, ".termsafe-")
            listing = self._listings[folder] = {
                e.name: e.is_dir(follow_symlinks=False) for e in found
            }
        return listing

    def _remove_prefixed(self, folder: str, prefix: str) -> str | None:
        try:
            listing = self._listing(folder)
            for name in [n for n in listing if n.startswith(prefix)]:
                problem = self._remove(os.path.join(folder, name), tree=listing[name])
                if problem is not None:
                    return problem
                del listing[name]
        except OSError as exc:
            return f"cannot list {folder!r}: {exc}"
        return None

    def _temp_file(self, payload: dict[str, Any]) -> str | None:
        folder, prefix = payload.get("folder"), payload.get("prefix")
        if not isinstance(folder, str) or not isinstance(prefix, str) or not prefix:
            return f"malformed temp_file payload {payload!r}"
        return self._remove_prefixed(folder, prefix)

    def _temp_dir(self, payload: dict[str, Any]) -> str | None:
        folder, prefix = payload.get("folder"), payload.get("prefix")
        target, backup = payload.get("target"), payload.get("backup")
        if not all(isinstance(v, str) and v for v in (folder, prefix, target, backup)):
            return f"malformed temp_dir payload {payload!r}"
        assert isinstance(folder, str)
        assert isinstance(prefix, str)
        assert isinstance(target, str)
        assert isinstance(backup, str)
        if os.path.lexists(backup) and not os.path.lexists(target):
            # Killed between "old -> backup" and "staging -> target": the old tree wins.
            try:
                os.rename(backup, target)
                _fsync_dir(folder)
            except OSError as exc:
                return f"could not restore {target!r} from {backup!r}: {exc}"
            self.restored.append(target)
        problem = self._remove_prefixed(folder, prefix)
        if problem is not None:
            return problem
        if os.path.lexists(backup):
            return self._remove(backup, tree=os.path.isdir(backup))
        return None

    def _git_lock(self, payload: dict[str, Any]) -> str | None:
        try:
            git = importlib.import_module("termsafe._git")
        except ImportError:
            return "termsafe._git is not available: git locks are not swept yet"
        sweep = getattr(git, "sweep_stale_lock", None)
        if sweep is None:
            return "termsafe._git has no sweep_stale_lock: git locks are not swept yet"
        try:
            result = sweep(dict(payload), store=self.store)
        except Exception as exc:
            return f"sweep_stale_lock failed: {type(exc).__name__}: {exc}"
        if result is False:
            return "the git lock is still held (a live git process has it open)"
        return None

    # -- the name sweep ----------------------------------------------------------------

    def orphans(self, folder: str, age: float, protected: list[tuple[str, str]]) -> None:
        now = time.time()
        for found in _iter_prefixed(folder, ""):
            name = found.name
            is_temp = name.startswith(TEMP_PREFIX)
            is_stage = name.startswith(STAGE_PREFIX)
            if name.startswith(BACKUP_PREFIX):
                self.left.append(
                    LeftEntry(
                        None,
                        "orphan",
                        found.path,
                        "the backup of a directory swap with no journal entry: "
                        "restore or remove it by hand",
                    )
                )
                continue
            if not (is_temp or is_stage):
                continue
            if any(f == folder and name.startswith(p) for f, p in protected):
                continue  # a journal entry still names it: not an orphan
            try:
                is_dir = found.is_dir(follow_symlinks=False)
                if is_temp and is_dir:
                    continue
                mtime = _newest_mtime(found.path) if is_dir else found.stat().st_mtime
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.left.append(LeftEntry(None, "orphan", found.path, f"cannot stat: {exc}"))
                continue
            if now - mtime < age:
                self.left.append(
                    LeftEntry(
                        None,
                        "orphan",
                        found.path,
                        f"changed {now - mtime:.0f}s ago, less than orphan_age ({age:g}s)",
                    )
                )
                continue
            problem = self._remove(found.path, tree=is_dir)
            if problem is not None:
                self.left.append(LeftEntry(None, "orphan", found.path, problem))


def _newest_mtime(root: str) -> float:
    newest = os.lstat(root).st_mtime
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
        newest = max(newest, os.lstat(dirpath).st_mtime)
    return newest


def _lock_path(store: Store) -> Path:
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.with_name(path.name + ".sweep.lock")
    from ._store import default_home

    home = default_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home / "sweep.lock"


def sweep_journal(
    store: Store | None = None,
    *,
    orphans_in: Iterable[str | os.PathLike[str]] = (),
    orphan_age: float = 3600.0,
    lock_timeout: float = 60.0,
) -> SweepReport:
    """Settle the journal entries of dead processes: remove their temps, restore swaps.

    Entries whose owner still runs (or runs on another host, which cannot be
    checked from here) are left alone. Safe to run at any time, repeatedly,
    and from several processes at once (a file lock next to the store
    serialises sweeps).

    Args:
        store: The store to sweep; default the one under ``TERMSAFE_HOME``.
        orphans_in: Folders to search by name for temps whose journal entry was
            lost (opt-in): ``.termsafe-tmp-*`` files and ``.termsafe-stage-*``
            folders untouched for ``orphan_age`` seconds and named by no open
            journal entry are removed. Backups (``.termsafe-old-*``) found this
            way are reported, never touched.
        orphan_age: Seconds since the last change before a temp found by name
            counts as abandoned.
        lock_timeout: Seconds to wait for another sweep to finish.

    Returns:
        A ``SweepReport``: what was removed and restored, which entries were
        settled, and what was left and why.

    Raises:
        InvalidArgumentType: ``orphans_in`` holds something that is not a path,
            or ``orphan_age``/``lock_timeout`` is not a number.
        ConfigurationError: ``orphan_age`` or ``lock_timeout`` is negative or NaN.
        TimeoutError: another sweep held the lock for ``lock_timeout`` seconds
            (``filelock.Timeout``, naming the lock file).
        StoreCorrupt: the default store's file is not a termsafe store.
    """
    age = _seconds("orphan_age", orphan_age)
    timeout = _seconds("lock_timeout", lock_timeout)
    if isinstance(orphans_in, (str, os.PathLike)):
        orphans_in = (orphans_in,)
    folders = []
    for given in orphans_in:
        folder = os.fspath(given) if isinstance(given, os.PathLike) else given
        if not isinstance(folder, str):
            raise InvalidArgumentType(f"orphans_in must hold folder paths (got {given!r})")
        folders.append(os.path.abspath(folder))
    if store is None:
        from ._store import open_default_store

        store = open_default_store()
    sweep = _Sweep(store)
    with filelock.FileLock(str(_lock_path(store)), timeout=timeout):
        protected: list[tuple[str, str]] = []
        host = current_identity().host
        for entry in store.journal_entries():
            reason: str | None
            owner = entry.owner
            if owner.host != host:
                reason = f"its owner (pid {owner.pid}) runs on {owner.host!r}: not checkable here"
            elif sweep.alive(owner):
                reason = f"its owner (pid {owner.pid}) is alive"
            else:
                reason = sweep.settle(entry)
            if reason is None:
                store.journal_remove(entry.id)
                sweep.settled.append(entry.id)
                continue
            sweep.left.append(LeftEntry(entry.id, entry.kind, _entry_path(entry.payload), reason))
            where, prefix = entry.payload.get("folder"), entry.payload.get("prefix")
            if isinstance(where, str) and isinstance(prefix, str) and prefix:
                protected.append((where, prefix))
        for folder in folders:
            sweep.orphans(folder, age, protected)
    return sweep.report()


def _entry_path(payload: dict[str, Any]) -> str | None:
    for key in ("target", "path", "lock", "repo", "folder"):
        value = payload.get(key)
        if isinstance(value, str):
            return value
    return None


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number of seconds (got {value!r})")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ConfigurationError(f"{name} must be >= 0 (got {value!r})")
    return seconds


# -- recover(): dead runs, orphan process trees, stale sockets, then the sweep ----------------
#
# ``sweep_journal`` above settles files; ``recover`` is the whole after-crash job that
# ``termsafe recover`` runs: it also finds the runs whose process died (marking them
# ``killed``), stops the process trees their dead owners journaled, removes the control
# sockets of dead processes, and tells the dependents of the runs it marked.

__all__ += ["RecoverReport", "RecoveredRun", "recover"]


@attrs.frozen
class RecoveredRun:
    """A run ``recover`` found dead and marked ``killed``.

    Attributes:
        run_id: The run.
        workflow_id: Its workflow.
        pid: The process that hosted it.
        why: ``"its process is gone"`` or ``"its supervisor is gone"`` (the
            process was still running, orphaned, and was stopped).
    """

    run_id: str
    workflow_id: str
    pid: int
    why: str


@attrs.frozen
class RecoverReport:
    """What ``recover`` did (``str()`` prints it for people, ``as_dict()`` for programs).

    Attributes:
        runs: Runs marked ``killed`` now.
        processes_killed: Pids of orphan processes stopped (journaled by a dead
            owner, or the tree of a run whose supervisor died).
        survivors: Orphan pids still alive at the end (could not be stopped).
        sockets_removed: Control sockets of dead processes removed.
        notified: Live runs told that a dependency of theirs was killed.
        sweep: The journal sweep (temp files, staging folders, git locks).
        left: Entries of dead owners left in place, each with the reason.
    """

    runs: tuple[RecoveredRun, ...] = ()
    processes_killed: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()
    sockets_removed: tuple[str, ...] = ()
    notified: tuple[str, ...] = ()
    sweep: SweepReport = attrs.field(factory=SweepReport)
    left: tuple[LeftEntry, ...] = ()

    @property
    def clean(self) -> bool:
        """Whether everything dead processes left behind is settled."""
        return not self.left and not self.survivors

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {
            "clean": self.clean,
            "runs": [attrs.asdict(r) for r in self.runs],
            "processes_killed": list(self.processes_killed),
            "survivors": list(self.survivors),
            "sockets_removed": list(self.sockets_removed),
            "notified": list(self.notified),
            "removed": list(self.sweep.removed),
            "restored": list(self.sweep.restored),
            "settled": list(self.sweep.settled),
            "left": [attrs.asdict(e) for e in self.left],
        }

    def __str__(self) -> str:
        lines = []
        for run in self.runs:
            lines.append(
                f"run {run.run_id} of {run.workflow_id!r} (pid {run.pid}) marked killed: {run.why}"
            )
        if self.processes_killed:
            lines.append(f"stopped orphan processes: {_pids(self.processes_killed)}")
        if self.survivors:
            lines.append(f"could NOT stop: {_pids(self.survivors)}")
        for path in self.sweep.removed:
            lines.append(f"removed {path}")
        for path in self.sweep.restored:
            lines.append(f"restored {path}")
        for path in self.sockets_removed:
            lines.append(f"removed stale control socket {path}")
        if self.notified:
            lines.append(f"notified dependents: {', '.join(self.notified)}")
        for left in self.left:
            what = left.path or f"journal entry {left.entry_id}"
            lines.append(f"left {left.kind} {what}: {left.reason}")
        settled = len(self.sweep.settled)
        verdict = "clean" if self.clean else "NOT clean"
        summary = (
            f"recover: {len(self.runs)} run(s) marked killed, {settled} journal entr"
            f"{'y' if settled == 1 else 'ies'} settled, {len(self.processes_killed)} orphan "
            f"process(es) stopped; {verdict}"
        )
        return "\n".join([*lines, summary])


def _pids(pids: Iterable[int]) -> str:
    return ", ".join(str(p) for p in pids)


def _proc_alive(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait until ``procs`` are dead (zombies count as dead; our own children are reaped)."""
    import psutil

    deadline = time.monotonic() + timeout
    me = os.getpid()
    while True:
        for proc in procs:
            try:
                if proc.ppid() == me and proc.is_running():
                    os.waitpid(proc.pid, os.WNOHANG)
            except (OSError, psutil.Error):
                continue  # not ours to reap, or already gone
        alive = [p for p in procs if _proc_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


def stop_processes(procs: list[Any], timeout: float) -> tuple[list[int], list[int]]:
    """SIGTERM ``procs``, wait ``timeout``, SIGKILL what is left; return (stopped, survivors).

    ``psutil.Process`` objects carry their start time, so a reused pid is never signalled.
    """
    import signal

    import psutil

    targets = [p for p in procs if _proc_alive(p)]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, max(1.0, timeout))):
        for proc in targets:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                continue
        targets = _wait_gone(targets, wait)
        if not targets:
            break
    gone = [p.pid for p in procs if p not in targets]
    return gone, [p.pid for p in targets]


class _Sessions:
    """Processes by session id, read once: finds what a dead session leader left."""

    def __init__(self) -> None:
        self._by_sid: dict[int, list[Any]] | None = None

    def members(self, sid: int, started_after: float) -> list[Any]:
        import psutil

        if self._by_sid is None:
            by_sid: dict[int, list[Any]] = {}
            for proc in psutil.process_iter(["create_time"]):
                try:
                    by_sid.setdefault(os.getsid(proc.pid), []).append(proc)
                except OSError:
                    continue
            self._by_sid = by_sid
        # A member started after the journaled leader: never a process that only
        # happens to reuse the number as its session id.
        return [
            p
            for p in self._by_sid.get(sid, [])
            if (p.info.get("create_time") or 0.0) >= started_after - 0.01
        ]


def _orphan_tree(pid: int, start: float, sessions: _Sessions) -> list[Any]:
    from ._procs import snapshot_tree

    tree = snapshot_tree(pid, start)
    if not tree:
        # The root is gone; descendants that left its process group (setsid)
        # and were reparented are still members of the session it led.
        tree = sessions.members(pid, start)
    return tree


#: Seconds to wait for the environment of a process caught inside its exec (it
#: may be the child a token names): the kernel sets the environment last.
EXEC_WAIT = 0.5


def _token_carriers(
    by_token: dict[str, int], born_after: float, sessions: _Sessions, targets: dict[int, Any]
) -> dict[int, list[int]]:
    """Add the trees of the processes carrying each token to ``targets``.

    Args:
        by_token: Journal entry ids by the spawn token they hold.
        born_after: A time before the oldest of those entries was written.
        sessions: The session listing shared with the rest of the recovery.
        targets: Processes to stop, by pid (added to).

    Returns:
        For each entry, the pids found through its token.
    """
    if not by_token:
        return {}
    import psutil

    from ._children import SPAWN_TOKEN_ENV
    from ._procs import processes_with_env

    found: dict[int, list[int]] = {entry_id: [] for entry_id in by_token.values()}
    carriers_of = processes_with_env(
        SPAWN_TOKEN_ENV, by_token, born_after=born_after, exec_wait=EXEC_WAIT
    )
    for token, carriers in carriers_of.items():
        pids = found[by_token[token]]
        for carrier in carriers:
            try:
                start = carrier.create_time()
            except psutil.Error:
                continue  # ended since it was found
            for proc in _orphan_tree(carrier.pid, start, sessions):
                targets.setdefault(proc.pid, proc)
                if proc.pid not in pids:
                    pids.append(proc.pid)
    return found


def _emitter(sink: Any) -> Any:
    from ._audit import AuditEvent, utc_timestamp

    seq = [0]

    def emit(
        type_: str,
        workflow_id: str | None,
        reason: str | None,
        state: str | None,
        details: dict[str, Any],
    ) -> None:
        if sink is None:
            return
        seq[0] += 1
        event = AuditEvent(
            seq=seq[0],
            timestamp=utc_timestamp(),
            type=type_,
            workflow_id=workflow_id,
            actor=None,
            reason=reason,
            state=state,
            details=details,
        )
        try:
            sink.emit(event)
        except Exception:
            import logging

            logging.getLogger("termsafe").exception("termsafe: recover could not audit %s", type_)

    return emit


def recover_lock_path(store: Store) -> Path:
    """The file lock that serialises ``recover`` runs on ``store`` (not the sweep's own)."""
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.with_name(path.name + ".recover.lock")
    from ._store import default_home

    home = default_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home / "recover.lock"


def recover(
    store: Store | None = None,
    *,
    sink: Any = None,
    kill_timeout: float = 1.0,
    lock_timeout: float = 60.0,
) -> RecoverReport:
    """Finish what dead processes left: mark their runs killed, stop orphans, sweep the journal.

    Under a file lock next to the store (so concurrent runs are safe, and a
    second run finds nothing left to do):

    1. every run not in a final state whose process is gone (pid *and* start
       time), or whose supervisor is gone (the process is then an orphan and is
       stopped), is marked ``killed``;
    2. every ``child_process`` journal entry of a dead owner has its tree
       stopped (SIGTERM, ``kill_timeout``, SIGKILL; start times guard against
       reused pids; a dead leader's session is searched for members that left
       its group) and our own children among them reaped; an entry ``spawn``
       wrote before its child existed and never completed with the pid is
       settled by finding the processes whose environment carries its token
       (``TERMSAFE_SPAWN_TOKEN``) and stopping their trees;
    3. ``sweep_journal`` settles temp files, staging folders and stale git locks
       of dead owners;
    4. control sockets of dead processes are removed, and the live runs that
       depend on a run marked in step 1 are told (their host checks the store).

    In-flight idempotency claims of a dead owner need nothing: the store
    treats a claim whose holder is dead as expired (the next claim retries it,
    or reports the outcome unknown if the side effect may have started).

    Args:
        store: The store (default: the one under ``TERMSAFE_HOME``).
        sink: An ``AuditSink`` for the events (``workflow_finished`` with state
            ``killed`` for each run, ``orphan_detected``, ``journal_swept``);
            ``None``: no events.
        kill_timeout: Seconds between SIGTERM and SIGKILL for orphans.
        lock_timeout: Seconds to wait for a recovery already under way.

    Returns:
        A ``RecoverReport``.

    Raises:
        InvalidArgumentType: ``kill_timeout``/``lock_timeout`` is not a number.
        ConfigurationError: ``kill_timeout``/``lock_timeout`` is negative or NaN.
        TimeoutError: another recovery held the lock for ``lock_timeout``
            seconds (``filelock.Timeout``, naming the lock file).
        StoreCorrupt: the default store's file is not a termsafe store.
    """
    from ._control import control_dir, identity_of_socket, notify_dependents

    grace = _seconds("kill_timeout", kill_timeout)
    wait = _seconds("lock_timeout", lock_timeout)
    if store is None:
        from ._store import open_default_store

        store = open_default_store()
    emit = _emitter(sink)
    host = current_identity().host
    alive_cache: dict[Identity, bool] = {}

    def alive(ident: Identity) -> bool:
        known = alive_cache.get(ident)
        if known is None:
            known = alive_cache[ident] = identity_alive(ident)
        return known

    sessions = _Sessions()
    recovered: list[RecoveredRun] = []
    targets: dict[int, Any] = {}
    left: list[LeftEntry] = []
    removed_sockets: list[str] = []
    with filelock.FileLock(str(recover_lock_path(store)), timeout=wait):
        for run in store.runs(live_only=True):
            if run.process.host != host:
                continue
            sup_raw = run.info.get("supervisor")
            sup = None
            if isinstance(sup_raw, dict):
                try:
                    sup = Identity.from_dict(sup_raw)
                except (KeyError, TypeError, ValueError):
                    sup = None
            if alive(run.process):
                if sup is None or alive(sup):
                    continue
                why = "its supervisor is gone"
                for proc in _orphan_tree(run.process.pid, run.process.start_time, sessions):
                    targets.setdefault(proc.pid, proc)
            else:
                if sup is not None and alive(sup):
                    continue  # its supervisor is cleaning up after it right now
                why = "its process is gone"
            if store.run_set_state(run.run_id, "killed", final=True):
                recovered.append(RecoveredRun(run.run_id, run.workflow_id, run.process.pid, why))
                emit(
                    "workflow_finished",
                    run.workflow_id,
                    f"recovered: {why}",
                    "killed",
                    {"run_id": run.run_id, "pid": run.process.pid, "recovered": True},
                )

        entries = store.journal_entries()
        dead_owned = {e.id for e in entries if e.owner.host == host and not alive(e.owner)}
        settle: list[int] = []
        by_token: dict[str, int] = {}
        oldest = math.inf
        for entry in entries:
            if entry.kind != "child_process" or entry.id not in dead_owned:
                continue
            pid, start = entry.payload.get("pid"), entry.payload.get("start_time")
            if not isinstance(pid, int) or not isinstance(start, (int, float)):
                token = entry.payload.get("token")
                if isinstance(token, str) and token:
                    # Journaled by spawn() before the child existed; its pid was
                    # never recorded (or the child was gone when it was): the
                    # token in the environment of the child and its descendants
                    # is what names them.
                    by_token[token] = entry.id
                    oldest = min(oldest, entry.created_at)
                else:
                    # No start time: the child was already gone when it was
                    # tracked, and a pid alone may name anyone by now.
                    settle.append(entry.id)
                continue
            for proc in _orphan_tree(pid, float(start), sessions):
                targets.setdefault(proc.pid, proc)
            settle.append(entry.id)
        # Start times from psutil may read up to a second early (the boot time
        # it adds is whole seconds): the margin keeps the entries' children in.
        carried = _token_carriers(by_token, oldest - 2.0, sessions, targets)
        settle.extend(by_token.values())
        stopped, survivors = stop_processes(list(targets.values()), grace)
        if stopped or survivors:
            emit(
                "orphan_detected",
                None,
                "processes left by dead owners",
                None,
                {"kind": "process", "pids": stopped + survivors, "survivors": survivors},
            )
        survivor_set = set(survivors)
        for entry_id in settle:
            entry = next(e for e in entries if e.id == entry_id)
            pid = entry.payload.get("pid")
            kept = [p for p in carried.get(entry_id, ()) if p in survivor_set]
            if entry_id not in carried and isinstance(pid, int) and pid in survivor_set:
                left.append(
                    LeftEntry(entry_id, "child_process", None, f"process {pid} survived SIGKILL")
                )
            elif kept:
                left.append(
                    LeftEntry(
                        entry_id,
                        "child_process",
                        None,
                        f"process(es) {_pids(kept)} carrying its spawn token survived SIGKILL",
                    )
                )
            else:
                store.journal_remove(entry_id)

        sweep = sweep_journal(store, lock_timeout=wait)
        left.extend(e for e in sweep.left if e.entry_id in dead_owned)
        if sweep.removed or sweep.restored or sweep.settled:
            emit(
                "journal_swept",
                None,
                "entries of dead owners",
                None,
                {
                    "removed": list(sweep.removed),
                    "restored": list(sweep.restored),
                    "settled": len(sweep.settled),
                },
            )

        folder = control_dir(getattr(store, "path", Path("store")).parent)
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            ident = identity_of_socket(name, host)
            if ident is None or alive(ident):
                continue
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                left.append(LeftEntry(None, "socket", path, f"could not remove: {exc}"))
                continue
            removed_sockets.append(path)

    notified: list[str] = []
    for dead in recovered:
        notified.extend(notify_dependents(store, dead.workflow_id))
    return RecoverReport(
        tuple(recovered),
        tuple(stopped),
        tuple(survivors),
        tuple(removed_sockets),
        tuple(notified),
        sweep,
        tuple(left),
    )
