"""``git_operation(repo)``: commit, push and branch work that a kill cannot tear.

git already updates each ref atomically (write ``<ref>.lock``, rename). What a
killed git leaves behind is the rest: stale ``*.lock`` files that make every
later git command fail, several refs of one operation of which some moved and
some did not, an index that no longer matches ``HEAD``. ``git_operation``
adds the missing half:

    enter   open a critical section of kind ``"git"`` (30 s grace by default);
            record the last good state: ``HEAD`` (symbolic or detached), every
            branch and remote-tracking ref, the refs the caller names, the
            index as a tree; journal what will be restored (kind
            ``git_lock``) before any git command can change anything
    body    git commands through the real ``git``, each in its own session
            (a terminal's Ctrl-C or a group SIGTERM does not reach it half-way
            through a commit), journaled as ``child_process`` before it
            starts, by a token in its environment (``ChildEntry``), and by
            its pid once it runs;
            every ref a helper is about to touch is recorded (and journaled)
            first
    commit  nothing to do but forget the journal entries, shielded: each git
            command already committed its own refs
    exit    on error, or when the grace ran out: stop the git child's whole
            tree (SIGTERM, which makes git delete its own locks, then SIGKILL),
            remove the stale locks and temp objects it left (only those no
            live git may hold), put the recorded refs, ``HEAD`` and the index
            back, and audit it; the git commands of this step are journaled
            too, all under one ``child_process`` entry written before the
            first starts (its token in the environment of each)

After a SIGKILL of the whole process, the recovery sweeper does the exit step
from the journal: ``sweep_stale_lock(payload)``. Every git command termsafe
runs in a repository goes through ``_popen``, a ``ChildEntry``'s token in its
environment: ``recover()`` stops whatever a dead process left running there.

The working tree is never touched: a rolled-back commit's changes stay in the
files, uncommitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import attrs
import psutil

from ._children import ChildEntry
from ._exceptions import (
    ConfigurationError,
    GitCommandFailed,
    GitRollbackFailed,
    InvalidArgumentType,
    NotAGitRepository,
    OperationClosed,
)
from ._procs import kill_tree, process_start_time
from ._safeop import OperationScope
from ._sections import CriticalSection, critical_section
from ._workflow import checkpoint

__all__ = ["GitOperation", "GitResult", "git_operation", "sweep_stale_lock"]

log = logging.getLogger("termsafe")

#: Version of the ``git_lock`` journal payload.
PAYLOAD_VERSION: Final = 1

#: Seconds of slack between file-system timestamps and process start times
#: (they come from different clocks and are rounded differently). Every use
#: errs on the side of leaving a lock alone.
CLOCK_SLACK: Final = 1.0

#: How often a git command's wait checks for an expired grace (in a workflow).
POLL_SECONDS: Final = 0.05

#: Seconds between SIGTERM and SIGKILL when a git child is stopped.
STOP_TIMEOUT: Final = 2.0

#: Seconds a rollback waits for git processes still working in the repository.
BUSY_WAIT: Final = 5.0

#: Upper bound on one git command run by a rollback or a sweep.
RESTORE_TIMEOUT: Final = 60.0

# Variables git sets for the repository it runs in (``git rev-parse
# --local-env-vars``). Inherited from a hook or a parent git, they would point
# our commands at another repository.
_LOCAL_ENV: Final = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_CONFIG",
        "GIT_CONFIG_COUNT",
        "GIT_CONFIG_PARAMETERS",
        "GIT_DIR",
        "GIT_GRAFT_FILE",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_INTERNAL_SUPER_PREFIX",
        "GIT_NO_REPLACE_OBJECTS",
        "GIT_OBJECT_DIRECTORY",
        "GIT_PREFIX",
        "GIT_REPLACE_REF_BASE",
        "GIT_SHALLOW_FILE",
        "GIT_WORK_TREE",
    }
)

# Auto-gc/maintenance would otherwise detach into the background, outside the
# child's process tree, and take locks (packed-refs.lock) nobody tracks.
_GIT_OPTIONS: Final = ("-c", "gc.autoDetach=false", "-c", "maintenance.autoDetach=false")

_REMOTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA: Final = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


@attrs.frozen
class GitResult:
    """What a git command run by ``git_operation`` did.

    Attributes:
        argv: The command line.
        returncode: Its exit status.
        stdout: Its standard output (text).
        stderr: Its standard error (text).
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in _LOCAL_ENV}
    # A workflow has nobody at a terminal: fail instead of waiting for a password.
    base.setdefault("GIT_TERMINAL_PROMPT", "0")
    if env is not None:
        base.update(env)
    return base


def _popen(
    child: ChildEntry,
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    input_text: str | None,
) -> subprocess.Popen[str]:
    """Start one git command in its own session, ``child``'s token in its environment.

    Every git command termsafe runs in a repository starts here, with its
    journal entry (``child``) written before: a SIGKILL of this process at
    any moment leaves an entry by which ``recover()`` finds and stops it.

    Raises:
        OSError: git could not be started (``child``'s entry is forgotten).
    """
    return child.popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="surrogateescape",
        start_new_session=True,
    )


class _PlainRuns:
    """The git commands of one rollback or sweep, each run to its end, under one journal entry.

    One ``child_process`` entry, written on creation (before the first
    command), covers them all: each command gets its token in its
    environment, so a SIGKILL of this process while one runs leaves an entry
    by which ``recover()`` finds and stops it, and what it started. Neither
    an entry nor a pid per command: the token finds each command as well,
    and a rollback's five commands cost two store writes, not fifteen.
    ``close()`` forgets the entry once no command of it can still run.

    Called as ``run(args, input_text=None) -> GitResult``. A command that
    cannot start (``OSError``) ends the entry with it (``ChildEntry.popen``);
    its caller runs no further command.
    """

    __slots__ = ("_child", "_cwd", "_env", "_git", "_unreaped")

    def __init__(
        self,
        git: str,
        cwd: str,
        env: Mapping[str, str],
        store: Any,
        workflow_id: str | None,
        step: str,
    ) -> None:
        self._git = git
        self._cwd = cwd
        self._env = env
        self._unreaped = False
        payload = {"argv": [git], "cwd": cwd, "step": step}
        try:
            self._child = ChildEntry(store, workflow_id, payload)
        except Exception:
            # The store failed (disk full, locked, gone): putting the repository
            # back matters more than journaling the commands that do it.
            log.exception("termsafe: could not journal the git commands of a %s in %s", step, cwd)
            self._child = ChildEntry(None, workflow_id, payload)

    def __call__(self, args: Sequence[str], input_text: str | None = None) -> GitResult:
        """Run ``git <args>`` to its end (a rollback or sweep is never interrupted)."""
        # Until the child is known reaped: a start cut short by a BaseException
        # may have left one about to exec, which only the entry still finds.
        self._unreaped = True
        proc = _popen(
            self._child, (self._git, *_GIT_OPTIONS, *args), self._cwd, self._env, input_text
        )
        try:
            out, err = proc.communicate(input_text, timeout=RESTORE_TIMEOUT)
        except BaseException:
            kill_tree(proc.pid, None, timeout=STOP_TIMEOUT)
            proc.wait()
            _close_pipes(proc)
            raise
        finally:
            self._unreaped = proc.poll() is None
        return GitResult((self._git, *args), proc.returncode, out, err)

    def close(self) -> None:
        """Forget the journal entry, unless a command of it may still run.

        A store that fails here only leaves the entry behind (logged): the next
        recovery finds no process by its token and drops it.
        """
        if self._unreaped:
            return
        try:
            self._child.forget()
        except Exception:
            log.exception(
                "termsafe: could not forget the journal entry of git commands in %s", self._cwd
            )


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _check(result: GitResult, repo: str) -> GitResult:
    if result.returncode != 0:
        raise GitCommandFailed(result.argv, result.returncode, result.stderr, repo)
    return result


def _parse_refs(stdout: str, wanted: Iterable[str]) -> dict[str, str | None]:
    """``for-each-ref`` output to {ref: sha or None}, for exactly the refs wanted."""
    wanted = list(wanted)
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        sha, _, name = line.partition(" ")
        found[name] = sha
    return {ref: found.get(ref) for ref in wanted}


def _for_each_ref_args(refs: Sequence[str]) -> list[str]:
    # Patterns match whole refs or prefixes up to a slash; _parse_refs keeps exact names.
    return ["for-each-ref", "--format=%(objectname) %(refname)", *refs]


# -- the state a rollback restores -------------------------------------------------------


def _lock_candidates(git_dir: Path, common_dir: Path) -> list[Path]:
    """Lock files and temp objects a killed git may have left, in both git dirs."""
    found: dict[str, Path] = {}

    def add(path: Path) -> None:
        found.setdefault(str(path), path)

    for base in dict.fromkeys((git_dir, common_dir)):
        with contextlib.suppress(OSError):
            for entry in os.scandir(base):
                if entry.name.endswith(".lock") and entry.is_file(follow_symlinks=False):
                    add(Path(entry.path))
    for sub in ("refs", "logs"):
        top = common_dir / sub
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if name.endswith(".lock"):
                    add(Path(dirpath) / name)
    objects = common_dir / "objects"
    with contextlib.suppress(OSError):
        for entry in os.scandir(objects):
            if entry.name.endswith(".lock"):  # maintenance.lock
                add(Path(entry.path))
    for sub in ("info", "pack"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(objects / sub):
                if entry.name.endswith(".lock") or entry.name.startswith("tmp_"):
                    add(Path(entry.path))
    with contextlib.suppress(OSError):
        for entry in os.scandir(objects):
            if len(entry.name) != 2 or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                for obj in os.scandir(entry.path):
                    if obj.name.startswith("tmp_obj_"):
                        add(Path(obj.path))
    return list(found.values())


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


@attrs.frozen
class _GitProcess:
    pid: int
    start_time: float


def _git_processes(roots: Sequence[str]) -> list[_GitProcess]:
    """Live git processes working in the repository: cwd inside it, or a file open in it.

    Processes this one may not inspect (another user's, without privileges)
    are not seen: counting them in would let one long-running ``git daemon``
    of another user block every sweep on the host.
    """
    me = os.getpid()
    out: list[_GitProcess] = []
    for proc in psutil.process_iter(["name", "create_time"]):
        name = proc.info.get("name") or ""
        if proc.pid == me or not name.startswith("git"):
            continue
        start = float(proc.info.get("create_time") or 0.0)
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            inside = _inside(os.path.realpath(proc.cwd()), roots) or any(
                _inside(f.path, roots) for f in proc.open_files()
            )
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if inside:
            out.append(_GitProcess(proc.pid, start))
    return out


@attrs.define
class _Sweep:
    """What one pass over a repository's leftovers did."""

    removed: list[str] = attrs.Factory(list)
    held: list[str] = attrs.Factory(list)


def _remove_leftovers(
    git_dir: Path, common_dir: Path, since: float, procs: Sequence[_GitProcess]
) -> _Sweep:
    """Remove the locks and temp objects created since ``since`` that no live git can hold.

    A lock older than ``since`` predates the operation: it is not ours and is
    left alone. A live git process in the repository may hold a lock it
    created, so a lock is kept while any such process started before the
    lock was last written (git creates locks with ``O_EXCL``: a process that
    started after the lock existed cannot be its creator).
    """
    sweep = _Sweep()
    for path in _lock_candidates(git_dir, common_dir):
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if mtime < since - CLOCK_SLACK:
            continue
        if any(p.start_time <= mtime + CLOCK_SLACK for p in procs):
            sweep.held.append(str(path))
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        sweep.removed.append(str(path))
    return sweep


def _restore_state(run: Any, state: Mapping[str, Any], repo: str) -> list[str]:
    """Put the recorded refs, ``HEAD`` and index back; return the refs that changed.

    ``run(args, input_text=None) -> GitResult`` runs git in the repository.

    Raises:
        GitCommandFailed: a git command of the restore failed.
    """
    refs: dict[str, str | None] = dict(state["refs"])
    head: dict[str, Any] = dict(state["head"])
    restored: list[str] = []
    current = (
        _parse_refs(_check(run(_for_each_ref_args(list(refs))), repo).stdout, refs) if refs else {}
    )
    lines: list[str] = []
    for ref, old in refs.items():
        if current.get(ref) == old:
            continue
        restored.append(ref)
        lines.append(f"delete {ref}\n" if old is None else f"update {ref} {old}\n")
    head_ref = head.get("ref")
    head_sha = head.get("sha")
    now_ref_result = run(["symbolic-ref", "-q", "HEAD"])
    now_ref = now_ref_result.stdout.strip() if now_ref_result.returncode == 0 else None
    if head_ref is None and head_sha is not None:
        now_sha = run(["rev-parse", "-q", "--verify", "HEAD"]).stdout.strip() or None
        if now_ref is not None or now_sha != head_sha:
            restored.append("HEAD")
            lines.append(f"option no-deref\nupdate HEAD {head_sha}\n")
    if lines:
        _check(
            run(["update-ref", "-m", "termsafe: rollback", "--stdin"], input_text="".join(lines)),
            repo,
        )
    if head_ref is not None and now_ref != head_ref:
        _check(run(["symbolic-ref", "-m", "termsafe: rollback", "HEAD", head_ref]), repo)
        restored.append("HEAD")
    tree = state.get("index_tree")
    if tree is not None:
        now_tree = run(["write-tree"])
        if now_tree.returncode != 0 or now_tree.stdout.strip() != tree:
            _check(run(["read-tree", tree]), repo)
            restored.append("index")
    return restored


def _payload_paths(payload: Mapping[str, Any]) -> tuple[str, Path, Path, list[str]]:
    repo = str(payload["repo"])
    git_dir = Path(payload["git_dir"])
    common_dir = Path(payload["common_dir"])
    roots = [os.path.realpath(p) for p in dict.fromkeys((repo, str(git_dir), str(common_dir)))]
    return repo, git_dir, common_dir, roots


def sweep_stale_lock(payload: dict[str, Any], *, store: Any = None) -> bool:
    """Recover a repository whose ``git_operation`` died with its process.

    The recovery sweeper calls this for each journal entry of kind
    ``git_lock``. It rolls the dead operation back the way the operation
    would have: it waits for no git process (returns ``False`` while one
    that started since the operation began still works in the repository:
    retry later, or stop it from its ``child_process`` entry first), removes
    the ``*.lock`` files and temp objects created since the operation began
    that no live git can hold, and puts the recorded refs, ``HEAD`` and index
    back. It runs no threads and writes no audit events (the sweeper does).

    With a ``store``, its own git commands are journaled there first (one
    ``child_process`` entry for them all), so that if the sweeping process
    is SIGKILLed while one runs, ``recover()`` stops it before sweeping again.

    Args:
        payload: The journal entry's payload, as ``git_operation`` wrote it.
        store: Where to journal the sweep's git commands; ``None``: nowhere.

    Returns:
        ``True`` when the repository is restored (or gone): the entry can be
        dropped. ``False`` when it must be retried later: a git process still
        works in the repository, or the restore failed (logged).

    Raises:
        ConfigurationError: ``payload`` is not a ``git_lock`` payload.
    """
    if not isinstance(payload, dict) or payload.get("version") != PAYLOAD_VERSION:
        raise ConfigurationError(f"not a git_operation journal payload (got {payload!r})")
    try:
        repo, git_dir, common_dir, roots = _payload_paths(payload)
        since = float(payload["started"])
        git = str(payload.get("git") or "git")
        refs = payload["refs"]
        head = payload["head"]
    except (KeyError, TypeError, ValueError):
        raise ConfigurationError(f"not a git_operation journal payload (got {payload!r})") from None
    if not isinstance(refs, dict) or not isinstance(head, dict):
        raise ConfigurationError(f"not a git_operation journal payload (got {payload!r})")
    if not git_dir.is_dir() or not os.path.isdir(repo):
        return True
    procs = _git_processes(roots)
    if any(p.start_time >= since - CLOCK_SLACK for p in procs):
        return False
    sweep = _remove_leftovers(git_dir, common_dir, since, procs)
    if sweep.removed:
        log.info("termsafe: removed stale git leftovers in %s: %s", repo, sweep.removed)
    runs = _PlainRuns(git, repo, _environment(None), store, None, "sweep")
    try:
        _restore_state(runs, payload, repo)
    except (GitCommandFailed, OSError, subprocess.SubprocessError) as exc:
        log.warning("termsafe: restoring git repository %s failed: %s", repo, exc)
        return False
    finally:
        runs.close()
    return True


# -- the operation ----------------------------------------------------------------------


class GitOperation:
    """An open ``git_operation``; see ``git_operation()``.

    Attributes:
        repo: The directory git commands run in (the work tree's top, or the
            git dir of a bare repository).
        git_dir: The repository's git dir.
        common_dir: Its common dir (differs from ``git_dir`` in a linked work tree).
        head: The recorded ``HEAD``: ``(ref, sha)``; ``ref`` is ``None`` when
            detached, ``sha`` is ``None`` on an unborn branch.
        state: ``"new"``, ``"open"``, ``"committed"``, ``"rolled back"``,
            ``"rollback failed"``, or ``"not started"`` (entering failed).
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        *,
        refs: Iterable[str],
        grace: float | None,
        restore_index: bool,
        git: str,
        env: Mapping[str, str] | None,
        store: Any,
    ) -> None:
        self._path = os.fspath(repo)
        self._extra_refs = list(refs)
        self._grace = grace
        self._restore_index = restore_index
        self._git = git
        self._env = _environment(env)
        self._store = store
        self.repo = self._path
        self.git_dir = Path()
        self.common_dir = Path()
        self.bare = False
        self.head: tuple[str | None, str | None] = (None, None)
        self.state = "new"
        self._refs: dict[str, str | None] = {}
        self._snapshot: dict[str, str] = {}
        self._index_tree: str | None = None
        self._started = 0.0
        self._lock = threading.RLock()
        self._child: tuple[subprocess.Popen[str], float | None] | None = None
        self._closed = False
        self._entry: int | None = None
        self._scope: OperationScope | None = None
        self._section: CriticalSection | None = None
        self._head_may_move = False
        self._error: BaseException | None = None
        self._problem = ""

    def __repr__(self) -> str:
        return f"<GitOperation {self.repo!r} {self.state}>"

    @property
    def name(self) -> str:
        """The operation's name in events and errors."""
        return f"git_operation {self.repo!r}"

    @property
    def recorded(self) -> dict[str, str | None]:
        """The refs recorded so far and their values on entry (``None``: did not exist)."""
        with self._lock:
            return dict(self._refs)

    # -- running git -----------------------------------------------------------------

    def _spawn(
        self, args: Sequence[str], *, input_text: str | None = None, check: bool = True
    ) -> GitResult:
        """Run git in the repository as a tracked child; wait, honouring an expired grace."""
        argv = (self._git, *_GIT_OPTIONS, *args)
        scope = self._scope
        assert scope is not None
        wf = scope.workflow
        # Journaled before the child exists (and outside the lock a rollback
        # takes): a SIGKILL between the fork and the record below leaves an
        # entry that still finds git, and what it started, by its token.
        child = ChildEntry(
            scope.store, wf.id if wf is not None else None, {"argv": list(argv), "cwd": self.repo}
        )
        with self._lock:
            if self._closed:
                child.forget()
                raise OperationClosed(self.name, self.state)
            proc = _popen(child, argv, self.repo, self._env, input_text)
            start = process_start_time(proc.pid)
            self._child = (proc, start)
        try:
            child.record(proc.pid, start, pgid=proc.pid)
            if wf is None:
                out, err = proc.communicate(input_text)
            else:
                while True:
                    try:
                        out, err = proc.communicate(input_text, timeout=POLL_SECONDS)
                        break
                    except subprocess.TimeoutExpired:
                        # Raises ForcedTermination once the grace ran out (or the
                        # terminator abandoned this thread); a deferred kill
                        # waits: the operation is a critical section.
                        checkpoint()
        except BaseException:
            self._stop_child()
            _close_pipes(proc)
            raise
        finally:
            with self._lock:
                if self._child is not None and self._child[0] is proc:
                    self._child = None
            if proc.poll() is not None:
                # Reaped: nothing of it is left for a recovery to find.
                child.forget()
        if self._is_closed():
            # The terminator rolled the operation back under us (abandoned thread).
            checkpoint()
            raise OperationClosed(self.name, self.state)
        result = GitResult((self._git, *args), proc.returncode, out, err)
        if check:
            _check(result, self.repo)
        return result

    def _is_closed(self) -> bool:
        with self._lock:
            return self._closed

    def _stop_child(self) -> None:
        """Stop the running git child's whole tree, if there is one, and reap it."""
        with self._lock:
            child = self._child
        if child is None:
            return
        proc, start = child
        if proc.poll() is None:
            kill_tree(proc.pid, start, timeout=STOP_TIMEOUT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)

    # -- recording -----------------------------------------------------------------

    def _locate(self) -> None:
        try:
            result = self._spawn(
                [
                    "rev-parse",
                    "--is-bare-repository",
                    "--is-inside-work-tree",
                    "--absolute-git-dir",
                    "--git-common-dir",
                    "--show-cdup",
                ],
                check=False,
            )
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotAGitRepository(self._path, str(exc)) from None
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) < 4:
            raise NotAGitRepository(self._path, result.stderr.strip() or "git rev-parse failed")
        self.bare = lines[0].strip() == "true"
        self.git_dir = Path(lines[2])
        common_path = Path(lines[3])
        if not common_path.is_absolute():
            common_path = Path(self._path) / common_path
        self.common_dir = Path(os.path.realpath(common_path))
        if lines[1].strip() == "true":
            # --show-cdup prints nothing outside a work tree, so it comes last.
            cdup = lines[4] if len(lines) > 4 else ""
            self.repo = os.path.realpath(os.path.join(self._path, cdup))

    def _record_entry_state(self) -> None:
        """Record ``HEAD``, the branches and remote-tracking refs, the given refs, the index.

        Every branch and remote-tracking ref is read now, in one command, so a
        helper that touches one later restores its value *on entry* (the last
        good state) without running git again.
        """
        sym = self._spawn(["symbolic-ref", "-q", "HEAD"], check=False)
        head_ref = sym.stdout.strip() if sym.returncode == 0 else None
        if head_ref is None:
            sha = self._spawn(["rev-parse", "-q", "--verify", "HEAD"], check=False).stdout.strip()
            self.head = (None, sha or None)
        listed = ["refs/heads/", "refs/remotes/", *self._extra_refs]
        out = self._spawn(_for_each_ref_args(listed)).stdout
        for line in out.splitlines():
            sha, _, name = line.partition(" ")
            self._snapshot[name] = sha
        refs = list(dict.fromkeys([*([head_ref] if head_ref else []), *self._extra_refs]))
        values = {ref: self._snapshot.get(ref) for ref in refs}
        if head_ref is not None:
            self.head = (head_ref, values.get(head_ref))
        self._refs.update(values)
        if self._restore_index and not self.bare:
            tree = self._spawn(["write-tree"], check=False)
            if tree.returncode == 0 and _SHA.fullmatch(tree.stdout.strip()):
                self._index_tree = tree.stdout.strip()

    def _entry_value(self, ref: str) -> tuple[bool, str | None]:
        """``(known, value on entry)`` of ``ref`` from the entry snapshot."""
        if ref in self._snapshot:
            return True, self._snapshot[ref]
        if ref.startswith(("refs/heads/", "refs/remotes/")) or ref in self._extra_refs:
            return True, None  # listed on entry and absent: it did not exist
        return False, None

    def _read_refs(self, refs: Sequence[str]) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        unknown = []
        for ref in refs:
            known, value = self._entry_value(ref)
            if known:
                values[ref] = value
            else:
                unknown.append(ref)
        if unknown:
            values.update(_parse_refs(self._spawn(_for_each_ref_args(unknown)).stdout, unknown))
        return values

    def _payload(self) -> dict[str, Any]:
        return {
            "version": PAYLOAD_VERSION,
            "repo": self.repo,
            "path": str(self.git_dir),  # what a recovery report names
            "git_dir": str(self.git_dir),
            "common_dir": str(self.common_dir),
            "git": self._git,
            "started": self._started,
            "head": {"ref": self.head[0], "sha": self.head[1]},
            "refs": dict(self._refs),
            "index_tree": self._index_tree,
        }

    def _journal_state(self) -> None:
        """(Re)write the ``git_lock`` entry: the new one first, so one always exists."""
        scope = self._scope
        assert scope is not None
        old = self._entry
        self._entry = scope.journal("git_lock", self._payload())
        scope.unjournal(old)

    def track(self, *refs: str) -> None:
        """Record refs the operation is about to change, so a rollback restores them.

        Helpers record what they touch themselves; use this before ``run()``
        commands that move other refs (or pass ``refs=`` to ``run``).

        Args:
            *refs: Full ref names (``refs/heads/topic``, ``refs/tags/v1``).

        Raises:
            InvalidArgumentType: a ref is not a string.
            ConfigurationError: a ref is not a full name under ``refs/``.
            OperationClosed: the operation has ended.
            GitCommandFailed: reading the refs failed.
        """
        for ref in refs:
            if not isinstance(ref, str):
                raise InvalidArgumentType(f"a ref must be a str (got {ref!r})")
            if not ref.startswith("refs/") or ref.endswith("/") or " " in ref:
                raise ConfigurationError(
                    f"a ref must be a full name like 'refs/heads/x' (got {ref!r})"
                )
        new = [ref for ref in dict.fromkeys(refs) if ref not in self._refs]
        if not new:
            return
        values = self._read_refs(new)
        with self._lock:
            if self._closed:
                raise OperationClosed(self.name, self.state)
            self._refs.update(values)
        self._journal_state()

    def _track_head(self) -> None:
        """Record the branch ``HEAD`` points to now, if a ``run()`` may have switched it.

        Otherwise ``HEAD`` and its branch (or the detached ``HEAD``) were
        recorded on entry.
        """
        if not self._head_may_move:
            return
        sym = self._spawn(["symbolic-ref", "-q", "HEAD"], check=False)
        if sym.returncode == 0:
            self.track(sym.stdout.strip())

    # -- the public helpers ------------------------------------------------------------

    def run(
        self,
        *args: str,
        refs: Iterable[str] = (),
        input: str | None = None,
        check: bool = True,
    ) -> GitResult:
        """Run ``git <args>`` in the repository as a tracked child process.

        Args:
            *args: The arguments after ``git``.
            refs: Full names of refs the command will change, recorded first
                (``HEAD`` and the refs given on entry always are).
            input: Text for the command's standard input.
            check: Raise ``GitCommandFailed`` on a non-zero exit status.

        Returns:
            The ``GitResult``.

        Raises:
            InvalidArgumentType: an argument is not a string.
            GitCommandFailed: the command failed (with ``check``).
            OperationClosed: the operation has ended.
            ForcedTermination: the grace ran out while the command ran (the
                child is stopped and the operation rolls back).
        """
        for arg in args:
            if not isinstance(arg, str):
                raise InvalidArgumentType(f"git arguments must be str (got {arg!r})")
        if input is not None and not isinstance(input, str):
            raise InvalidArgumentType(f"input must be a str or None (got {input!r})")
        self.track(*refs)
        self._head_may_move = True
        return self._spawn(args, input_text=input, check=check)

    def commit(
        self,
        message: str,
        paths: Iterable[str | os.PathLike[str]] | None = None,
        *,
        allow_empty: bool = False,
    ) -> str:
        """Commit on the current branch (or detached ``HEAD``).

        Args:
            message: The commit message.
            paths: Commit exactly these paths as they are in the work tree
                (new, changed or deleted: they are staged first); ``None``
                commits what is staged.
            allow_empty: Allow a commit that changes nothing.

        Returns:
            The new commit's id.

        Raises:
            InvalidArgumentType: ``message`` is not a string, or a path not a path.
            GitCommandFailed: ``git add`` or ``git commit`` failed (nothing
                staged, a hook refused, ...).
            OperationClosed: the operation has ended.
            ForcedTermination: the grace ran out during the commit.
        """
        if not isinstance(message, str):
            raise InvalidArgumentType(f"message must be a str (got {message!r})")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        names = None if paths is None else [_path_arg(p) for p in paths]
        self._track_head()
        if names is not None:
            self._spawn(["add", "-A", "--", *names])
        argv = ["commit", "-q", "-m", message]
        if allow_empty:
            argv.append("--allow-empty")
        if names is not None:
            argv += ["--", *names]
        self._spawn(argv)
        return self._spawn(["rev-parse", "--verify", "HEAD"]).stdout.strip()

    def branch(self, name: str, start: str = "HEAD", *, force: bool = False) -> str:
        """Create branch ``name`` at ``start`` (or move it there, with ``force``).

        Args:
            name: The branch's short name (``topic``).
            start: A commit-ish to start it at.
            force: Move the branch if it exists (``git branch --force``).

        Returns:
            The commit id the branch points to.

        Raises:
            InvalidArgumentType: ``name`` or ``start`` is not a string.
            ConfigurationError: ``name`` is empty or starts with ``-``.
            GitCommandFailed: git refused (exists without ``force``, bad name, ...).
            OperationClosed: the operation has ended.
        """
        ref = _branch_ref(name)
        if not isinstance(start, str):
            raise InvalidArgumentType(f"start must be a str (got {start!r})")
        self.track(ref)
        sha = self._spawn(
            ["rev-parse", "--verify", "--end-of-options", f"{start}^{{commit}}"]
        ).stdout.strip()
        # The start point as given (not the id): git sets up tracking from it.
        self._spawn(["branch", *(["--force"] if force else []), "--", name, start])
        return sha

    def delete_branch(self, name: str, *, force: bool = False) -> None:
        """Delete branch ``name`` (``git branch -d``, or ``-D`` with ``force``).

        A rollback recreates it at its recorded commit; its reflog and its
        ``branch.<name>.*`` configuration are not restored.

        Raises:
            InvalidArgumentType: ``name`` is not a string.
            ConfigurationError: ``name`` is empty or starts with ``-``.
            GitCommandFailed: git refused (not merged without ``force``, ...).
            OperationClosed: the operation has ended.
        """
        ref = _branch_ref(name)
        self.track(ref)
        self._spawn(["branch", "-D" if force else "-d", "--", name])

    def push(
        self,
        remote: str,
        refspecs: Iterable[str],
        *,
        atomic: bool | None = None,
        force: bool = False,
    ) -> GitResult:
        """Push ``refspecs`` to ``remote``.

        Where several refs move, the push is ``--atomic`` (all or none on the
        remote). The remote-tracking refs it updates are recorded first, so a
        rollback puts them back; the remote itself is never rolled back (see
        the documentation).

        Args:
            remote: A configured remote's name, or a URL.
            refspecs: What to push (``main``, ``topic:topic``, ``:gone``).
            atomic: Ask for an atomic push; default: when there is more than one refspec.
            force: ``--force``.

        Returns:
            The ``GitResult`` of ``git push --porcelain``.

        Raises:
            InvalidArgumentType: ``remote`` or a refspec is not a string.
            ConfigurationError: no refspec given, or ``remote`` starts with ``-``.
            GitCommandFailed: the push failed or was rejected (an atomic push
                then changed nothing on the remote).
            OperationClosed: the operation has ended.
        """
        if not isinstance(remote, str):
            raise InvalidArgumentType(f"remote must be a str (got {remote!r})")
        if isinstance(refspecs, str):
            refspecs = [refspecs]
        specs = list(refspecs)
        for spec in specs:
            if not isinstance(spec, str):
                raise InvalidArgumentType(f"a refspec must be a str (got {spec!r})")
        if not specs:
            raise ConfigurationError("push needs at least one refspec (got none)")
        if not remote or remote.startswith("-"):
            raise ConfigurationError(f"remote must be a remote name or URL (got {remote!r})")
        if atomic is None:
            atomic = len(specs) > 1
        if _REMOTE_NAME.fullmatch(remote):
            tracking = [t for t in (_tracking_ref(remote, s) for s in specs) if t is not None]
            self.track(*tracking)
        argv = ["push", "--porcelain"]
        if atomic:
            argv.append("--atomic")
        if force:
            argv.append("--force")
        return self._spawn([*argv, "--", remote, *specs])

    # -- enter / exit --------------------------------------------------------------------

    def __enter__(self) -> GitOperation:
        if self.state != "new":
            raise OperationClosed(self.name, self.state)
        section = critical_section("git", self._grace)
        section.__enter__()  # raises Terminated if a kill is pending: nothing started
        self._section = section
        try:
            self._scope = OperationScope("git", self.name, self._store)
            # The whole operation is the section: its commit step only shields.
            self._scope.hold_section(section)
            self._started = time.time()
            self._locate()
            # Journaled before any git that can take a lock runs (``write-tree``
            # takes index.lock): a SIGKILL while the entry state is read leaves
            # an entry that removes such locks and restores nothing.
            self._journal_state()
            self._record_entry_state()
            self._journal_state()
            self._scope.on_rollback(self._rollback_hook)
            self.state = "open"
        except BaseException as exc:
            with self._lock:
                self._closed = True
            self.state = "not started"
            if self._scope is not None:
                self._scope.succeeded()  # nothing changed yet: drop the journal entries
            self._section = None
            section.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        section = self._section
        scope = self._scope
        assert section is not None
        assert scope is not None
        self._section = None
        try:
            if exc is None:
                # The commit step: only shielded, since the operation is held
                # in its own section (a nested one would refuse a deferred kill).
                with scope.committing():
                    with self._lock:
                        if self.state != "open":
                            # The terminator rolled it back for an abandoned thread.
                            raise OperationClosed(self.name, self.state)
                        self._closed = True
                        self.state = "committed"
                    scope.succeeded()
                    scope.emit("git_operation_committed", {"refs": sorted(self._refs)})
            else:
                self._error = exc
                # Runs our hook (the rollback) now, unless the terminator
                # claimed it; _rollback() then waits for that one to finish.
                scope.rollback_now()
                self._rollback_quietly()
                if self.state == "rollback failed" and isinstance(exc, Exception):
                    # Worse news than the error itself; a kill (BaseException)
                    # still propagates as it is, the failure is audited.
                    raise GitRollbackFailed(self.repo, self._problem) from exc
        finally:
            scope.hold_section(None)
            # A kill deferred by the operation lands here, after it committed
            # (or rolled back) and recorded it.
            section.__exit__(exc_type, exc, tb)

    # -- rollback ----------------------------------------------------------------------

    def _rollback_hook(self) -> None:
        self._rollback()

    def _rollback_quietly(self) -> None:
        try:
            self._rollback()
        except GitRollbackFailed:
            pass  # recorded in self.state / self._problem and audited

    def _rollback(self) -> None:
        """Stop the git child, sweep its leftovers, restore the recorded state (once).

        Raises:
            GitRollbackFailed: the state could not be restored; the journal
                entry stays for the recovery sweep.
        """
        scope = self._scope
        assert scope is not None
        with self._lock:
            if self.state in ("rolled back", "rollback failed", "committed"):
                return
            self._closed = True
            self._stop_child()
            roots = [
                os.path.realpath(p)
                for p in dict.fromkeys((self.repo, str(self.git_dir), str(self.common_dir)))
            ]
            since = self._started
            procs = [p for p in _git_processes(roots) if p.start_time >= since - CLOCK_SLACK]
            if procs:
                # Git processes that started during the operation and are not
                # our child (its tree is stopped): wait for them a little.
                handles = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        handles.append(psutil.Process(p.pid))
                psutil.wait_procs(handles, timeout=BUSY_WAIT)
            procs = _git_processes(roots)
            sweep = _remove_leftovers(self.git_dir, self.common_dir, since, procs)
            error = self._error
            details: dict[str, Any] = {
                "error": type(error).__name__ if error is not None else None,
                "locks_removed": sweep.removed,
            }
            try:
                if any(p.start_time >= since - CLOCK_SLACK for p in procs):
                    raise GitRollbackFailed(
                        self.repo,
                        "git processes still work in the repository: "
                        + ", ".join(str(p.pid) for p in procs),
                    )
                wf = scope.workflow
                runs = _PlainRuns(
                    self._git,
                    self.repo,
                    self._env,
                    scope.store,
                    wf.id if wf is not None else None,
                    "rollback",
                )
                try:
                    restored = _restore_state(runs, self._payload(), self.repo)
                finally:
                    runs.close()
            except (
                GitCommandFailed,
                GitRollbackFailed,
                OSError,
                subprocess.SubprocessError,
            ) as exc:
                self.state = "rollback failed"
                self._problem = str(exc)
                details["problem"] = str(exc)
                scope.emit("git_rollback_failed", details)
                if isinstance(exc, GitRollbackFailed):
                    raise
                raise GitRollbackFailed(self.repo, str(exc)) from exc
            self.state = "rolled back"
            details["restored"] = restored
            scope.unjournal(self._entry)
            self._entry = None
            scope.emit("git_operation_rolled_back", details)


def _path_arg(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentType(f"a path must be a str or os.PathLike (got {path!r})")
    return os.fspath(path)


def _branch_ref(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentType(f"branch name must be a str (got {name!r})")
    if not name or name.startswith("-"):
        raise ConfigurationError(
            f"branch name must be non-empty and not start with '-' (got {name!r})"
        )
    return name if name.startswith("refs/heads/") else f"refs/heads/{name}"


def _tracking_ref(remote: str, spec: str) -> str | None:
    """The remote-tracking ref a push of ``spec`` to ``remote`` updates (default layout)."""
    spec = spec.removeprefix("+")
    src, sep, dst = spec.partition(":")
    target = dst if sep else src
    if target.startswith("refs/heads/"):
        branch = target.removeprefix("refs/heads/")
    elif target.startswith("refs/") or not target or target == "HEAD":
        return None
    else:
        branch = target
    return f"refs/remotes/{remote}/{branch}"


def git_operation(
    repo: str | os.PathLike[str],
    *,
    refs: Iterable[str] = (),
    grace: float | None = None,
    restore_index: bool = True,
    git: str = "git",
    env: Mapping[str, str] | None = None,
    store: Any = None,
) -> GitOperation:
    """Run commit, push and branch operations on a repository as one undoable unit.

    ``with git_operation(repo) as op:`` records the last good state (``HEAD``,
    its branch, the ``refs`` given here, the index) and journals it, then
    yields a ``GitOperation`` whose ``commit``, ``branch``, ``delete_branch``,
    ``push`` and ``run`` run the real ``git`` in the repository. The whole
    block is a critical section of kind ``"git"``: a kill waits for it up to
    ``grace`` seconds (default 30, see ``Terminator(section_grace=...)``),
    then lands as it ends. On an exception, or when the grace runs out
    (``ForcedTermination`` from the command being waited for), the git child
    is stopped, the stale locks it left are removed (only those no live git
    can hold), the recorded refs, ``HEAD`` and index are put back, and the
    exception propagates. After a SIGKILL the recovery sweep does the same
    from the journal (``sweep_stale_lock``).

    One ``git_operation`` per repository at a time; the work tree is never
    touched by a rollback; a push already accepted by the remote is not undone.

    Args:
        repo: A path inside the repository (work tree or bare git dir).
        refs: Full names of further refs to record and restore (helpers record
            what they touch themselves).
        grace: Seconds a kill waits for the operation; default: the ``git`` kind's.
        restore_index: Record the index on entry and put it back on rollback.
        git: The git executable.
        env: Extra environment variables for every git command (the
            repository-local ``GIT_DIR``-like variables of the caller are dropped;
            ``GIT_TERMINAL_PROMPT`` defaults to ``0``).
        store: Where to journal (default: the workflow's terminator's store,
            else the default store); ``False`` to skip journaling.

    Returns:
        A ``GitOperation`` context manager.

    Raises:
        InvalidArgumentType: an argument has the wrong type.
        ConfigurationError: ``grace`` is negative, NaN or infinite, or a ref
            is not a full ref name.
        NotAGitRepository: on entry, ``repo`` is not in a git repository.
        GitCommandFailed: on entry, recording the state failed.
        StoreCorrupt: on entry, the journal's store file is not a termsafe store.
        GitRollbackFailed: on exit, a rollback could not restore the
            repository (the journal entry is kept for the recovery sweep).
        Terminated: on entry when a kill is pending; on exit when a kill was
            deferred by the operation.
    """
    if not isinstance(repo, (str, os.PathLike)):
        raise InvalidArgumentType(f"repo must be a path (got {repo!r})")
    if isinstance(refs, str):
        raise InvalidArgumentType(
            f"refs must be an iterable of ref names, not a string (got {refs!r})"
        )
    ref_list = list(refs)
    for ref in ref_list:
        if not isinstance(ref, str):
            raise InvalidArgumentType(f"a ref must be a str (got {ref!r})")
        if not ref.startswith("refs/") or ref.endswith("/") or " " in ref:
            raise ConfigurationError(f"a ref must be a full name like 'refs/heads/x' (got {ref!r})")
    if not isinstance(restore_index, bool):
        raise InvalidArgumentType(f"restore_index must be a bool (got {restore_index!r})")
    if not isinstance(git, str) or not git:
        raise InvalidArgumentType(f"git must be the git executable's name or path (got {git!r})")
    if env is not None and not isinstance(env, Mapping):
        raise InvalidArgumentType(f"env must be a mapping of str to str (got {env!r})")
    from ._sections import validate_seconds

    validate_seconds("grace", grace, allow_none=True)
    return GitOperation(
        repo,
        refs=ref_list,
        grace=grace,
        restore_index=restore_index,
        git=git,
        env=env,
        store=store,
    )
