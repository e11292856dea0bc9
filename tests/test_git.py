"""git_operation(repo): real git repositories rolled back on errors, kills and SIGKILLs."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import random
import select
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _kills import event_types, kill_before, kill_in
from _sigkill import (
    PAUSED_BEFORE_THE_PID_STORE,
    Report,
    Spec,
    fork_child,
    read_to_end,
    run_trials,
    serve_trials,
    trial_workflow,
)
from conftest import ADMIN, WAIT

import termsafe as ts
from termsafe import (
    ConfigurationError,
    ForcedTermination,
    GitCommandFailed,
    GitOperation,
    InvalidArgumentType,
    NotAGitRepository,
    OperationClosed,
    Phases,
    Terminated,
    Terminator,
    WorkflowState,
    git_operation,
)
from termsafe._git import sweep_stale_lock
from termsafe._store import SQLiteStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="real git, fork and /proc")


def _git_env(tmp: Path) -> dict[str, str]:
    """A hermetic environment: no system or user git config, a private termsafe home."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return {
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
        "TERMSAFE_HOME": str(tmp / "termsafe"),
        "GIT_AUTHOR_NAME": "Test",
        "GIT_COMMITTER_NAME": "Test",
    }


def git(repo: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    """Run git in ``repo`` and return its output."""
    out = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=False, input=input
    )
    if check and out.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def refs(repo: Path) -> dict[str, str]:
    """Every ref of the repository and where it points."""
    lines = git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    return dict(line.split(" ", 1) for line in lines)


def head(repo: Path) -> str:
    """What HEAD is: ``ref: <name>`` or a commit id."""
    out = subprocess.run(
        ["git", "symbolic-ref", "-q", "HEAD"], cwd=repo, capture_output=True, text=True, check=False
    )
    if out.returncode == 0:
        return "ref: " + out.stdout.strip()
    return git(repo, "rev-parse", "HEAD").strip()


def fsck(repo: Path) -> str:
    """``git fsck --full``'s verdict: "" when clean, else what it reported."""
    out = subprocess.run(
        ["git", "fsck", "--full", "--no-dangling", "--no-progress"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if out.returncode == 0 and not out.stdout.strip() else out.stdout + out.stderr


def locks(repo: Path) -> list[str]:
    """Lock files left anywhere in the git dir."""
    git_dir = Path(git(repo, "rev-parse", "--absolute-git-dir").strip())
    return sorted(str(p.relative_to(git_dir)) for p in git_dir.rglob("*.lock"))


def staged_matches_head(repo: Path) -> bool:
    """Whether the index holds exactly HEAD's tree."""
    return (
        0
        == subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo, check=False).returncode
    )


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The hermetic git/termsafe environment, set for this process too."""
    values = _git_env(tmp_path)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _init(path: Path, *, bare: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main", *(["--bare"] if bare else []))
    if not bare:
        git(path, "config", "user.name", "Test")
        git(path, "config", "user.email", "test@example.invalid")
    return path


@pytest.fixture
def repo(tmp_path: Path, env: dict[str, str]) -> Path:
    """A repository with one commit on main and a branch ``moving`` at it."""
    path = _init(tmp_path / "repo")
    (path / "README").write_text("hello\n")
    git(path, "add", "README")
    git(path, "commit", "-q", "-m", "initial")
    git(path, "branch", "moving")
    return path


@pytest.fixture
def remote(tmp_path: Path, repo: Path) -> Path:
    """A bare repository as ``origin`` of ``repo``, holding main."""
    path = _init(tmp_path / "remote.git", bare=True)
    git(repo, "remote", "add", "origin", str(path))
    git(repo, "push", "-q", "origin", "main")
    return path


@pytest.fixture
def store(tmp_path: Path, env: dict[str, str]) -> Iterator[SQLiteStore]:
    """The journal store git_operation writes to here."""
    s = SQLiteStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def _no_git_running(repo: Path) -> list[int]:
    root = str(repo.resolve())
    alive = []
    for proc in psutil.process_iter(["name"]):
        try:
            if (proc.info["name"] or "").startswith("git") and proc.cwd().startswith(root):
                alive.append(proc.pid)
        except psutil.Error:
            continue
    return alive


class TestCommit:
    def test_commit_and_branch(self, repo: Path, store: SQLiteStore) -> None:
        """Commits and branches land; the journal is empty afterwards."""
        old = refs(repo)
        with git_operation(repo, store=store) as op:
            (repo / "a.txt").write_text("a\n")
            sha = op.commit("add a", ["a.txt"])
            assert sha == op.branch("topic")
        assert "committed" == op.state
        now = refs(repo)
        assert sha == now["refs/heads/main"]
        assert sha == now["refs/heads/topic"]
        assert old["refs/heads/main"] == git(repo, "rev-parse", "main^").strip()
        assert [] == store.journal_entries()
        assert "" == fsck(repo)

    def test_commit_only_given_paths(self, repo: Path, store: SQLiteStore) -> None:
        """commit(paths=...) commits exactly those paths."""
        (repo / "a.txt").write_text("a\n")
        (repo / "b.txt").write_text("b\n")
        with git_operation(repo, store=store) as op:
            op.commit("only a", ["a.txt"])
        assert "README\na.txt\n" == git(repo, "ls-tree", "--name-only", "HEAD")
        assert "?? b.txt\n" == git(repo, "status", "--porcelain")

    def test_commit_staged(self, repo: Path, store: SQLiteStore) -> None:
        """commit() without paths commits what is staged."""
        (repo / "a.txt").write_text("a\n")
        git(repo, "add", "a.txt")
        with git_operation(repo, store=store) as op:
            op.commit("staged")
        assert "README\na.txt\n" == git(repo, "ls-tree", "--name-only", "HEAD")

    def test_error_rolls_back(self, repo: Path, store: SQLiteStore) -> None:
        """An exception after commits restores every ref, HEAD and index; the work tree stays."""
        old = refs(repo)
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                (repo / "a.txt").write_text("a\n")
                op.commit("add a", ["a.txt"])
                op.branch("topic")
                op.branch("moving", force=True)
                raise RuntimeError("later step")

        with pytest.raises(RuntimeError, match="later step"):
            body()
        assert "rolled back" == op.state
        assert old == refs(repo)
        assert "ref: refs/heads/main" == head(repo)
        assert staged_matches_head(repo)
        assert "a\n" == (repo / "a.txt").read_text()
        assert [] == locks(repo)
        assert "" == fsck(repo)
        assert [] == store.journal_entries()

    def test_rollback_goes_on_when_the_store_fails(self, repo: Path, tmp_path: Path) -> None:
        """A store that cannot journal the rollback's git commands does not stop the rollback."""

        class Full(SQLiteStore):
            def journal_add(self, kind: Any, payload: Any, workflow_id: Any = None) -> int:
                if kind == "child_process" and payload.get("step") == "rollback":
                    raise sqlite3.OperationalError("database or disk is full")
                return super().journal_add(kind, payload, workflow_id)

        store = Full(tmp_path / "full.sqlite3")
        old = refs(repo)
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                (repo / "a.txt").write_text("a\n")
                op.commit("add a", ["a.txt"])
                raise RuntimeError("later step")

        try:
            with pytest.raises(RuntimeError, match="later step"):
                body()
            assert "rolled back" == op.state
            assert old == refs(repo)
            assert staged_matches_head(repo)
            assert [] == locks(repo)
            assert [] == store.journal_entries()
        finally:
            store.close()

    def test_failed_command_rolls_back(self, repo: Path, store: SQLiteStore) -> None:
        """A failing git command raises GitCommandFailed naming it; earlier changes are undone."""
        old = refs(repo)
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                op.branch("topic")
                op.commit("nothing to commit")

        with pytest.raises(GitCommandFailed) as info:
            body()
        assert ("git", "commit", "-q", "-m", "nothing to commit") == info.value.argv
        assert 1 == info.value.returncode
        assert "git commit -q -m nothing to commit" in str(info.value)
        assert old == refs(repo)
        assert "rolled back" == op.state

    def test_unborn_branch(self, tmp_path: Path, env: dict[str, str], store: SQLiteStore) -> None:
        """In an empty repository a rolled-back first commit leaves the branch unborn again."""
        repo = _init(tmp_path / "empty")
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                (repo / "a.txt").write_text("a\n")
                op.commit("first", ["a.txt"])
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert {} == refs(repo)
        assert "ref: refs/heads/main" == head(repo)
        assert "" == git(repo, "ls-files")
        assert "" == fsck(repo)

    def test_detached_head(self, repo: Path, store: SQLiteStore) -> None:
        """A commit on a detached HEAD is undone: HEAD is detached at the old commit again."""
        old_head = git(repo, "rev-parse", "HEAD").strip()
        git(repo, "checkout", "-q", "--detach")
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                (repo / "a.txt").write_text("a\n")
                op.commit("detached", ["a.txt"])
                assert old_head != git(repo, "rev-parse", "HEAD").strip()
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert old_head == head(repo)
        assert "" == fsck(repo)

    def test_switch_is_undone(self, repo: Path, store: SQLiteStore) -> None:
        """A run() that switches branch gets HEAD pointed back at the old branch."""
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                op.run("switch", "-q", "-c", "feature", refs=["refs/heads/feature"])
                assert "ref: refs/heads/feature" == head(repo)
                (repo / "a.txt").write_text("a\n")
                op.commit("on feature", ["a.txt"])
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert "ref: refs/heads/main" == head(repo)
        assert "refs/heads/feature" not in refs(repo)

    def test_deleted_branch_comes_back(self, repo: Path, store: SQLiteStore) -> None:
        """A deleted branch is recreated at its commit by the rollback."""
        old = refs(repo)
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                op.delete_branch("moving", force=True)
                assert "refs/heads/moving" not in refs(repo)
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert old == refs(repo)

    def test_declared_refs(self, repo: Path, store: SQLiteStore) -> None:
        """Refs declared on entry are restored even when moved by run()."""
        old = refs(repo)
        op = git_operation(repo, refs=["refs/tags/v1"], store=store)

        def body() -> None:
            with op:
                op.run("tag", "v1")
                op.track("refs/notes/x")
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert old == refs(repo)


class TestPush:
    def test_push(self, repo: Path, remote: Path, store: SQLiteStore) -> None:
        """A push of several refs lands on the remote and its tracking refs."""
        with git_operation(repo, store=store) as op:
            (repo / "a.txt").write_text("a\n")
            sha = op.commit("add a", ["a.txt"])
            op.branch("topic")
            result = op.push("origin", ["main", "topic"])
        assert "--atomic" in result.argv
        assert sha == refs(remote)["refs/heads/main"]
        assert sha == refs(remote)["refs/heads/topic"]
        assert sha == refs(repo)["refs/remotes/origin/topic"]

    def test_rejected_atomic_push_rolls_back(
        self, tmp_path: Path, repo: Path, remote: Path, store: SQLiteStore
    ) -> None:
        """A rejected atomic push moves nothing remotely; the local commit and branch are undone."""
        other = tmp_path / "other"
        git(tmp_path, "clone", "-q", str(remote), str(other))
        git(other, "config", "user.email", "other@example.invalid")
        (other / "b.txt").write_text("b\n")
        git(other, "add", "b.txt")
        git(other, "commit", "-q", "-m", "elsewhere")
        git(other, "push", "-q", "origin", "main")
        remote_before = refs(remote)
        local_before = refs(repo)
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                (repo / "a.txt").write_text("a\n")
                op.commit("add a", ["a.txt"])
                op.branch("topic")
                op.push("origin", ["main", "topic"])

        with pytest.raises(GitCommandFailed) as info:
            body()
        assert "push" in info.value.argv
        assert remote_before == refs(remote)
        assert local_before == refs(repo)
        assert "" == fsck(repo)
        assert "" == fsck(remote)

    def test_accepted_push_stays_on_the_remote(
        self, repo: Path, remote: Path, store: SQLiteStore
    ) -> None:
        """A push that was accepted is not undone remotely; locally the refs go back."""
        local_before = refs(repo)
        op = git_operation(repo, store=store)
        made: list[str] = []

        def body() -> None:
            with op:
                (repo / "a.txt").write_text("a\n")
                made.append(op.commit("add a", ["a.txt"]))
                op.push("origin", ["main"])
                raise KeyError("after the push")

        with pytest.raises(KeyError):
            body()
        assert made == [refs(remote)["refs/heads/main"]]
        assert local_before == refs(repo)

    def test_push_arguments(self, repo: Path, store: SQLiteStore) -> None:
        """push() refuses no refspecs and an option-like remote, naming them."""
        with git_operation(repo, store=store) as op:
            with pytest.raises(ConfigurationError, match="at least one refspec"):
                op.push("origin", [])
            with pytest.raises(ConfigurationError, match="'--mirror'"):
                op.push("--mirror", ["main"])
            with pytest.raises(InvalidArgumentType, match="3"):
                op.push("origin", [3])  # type: ignore[list-item]


class TestLocks:
    def test_stale_lock_is_removed(self, repo: Path, store: SQLiteStore) -> None:
        """Locks a dead git left during the operation are removed by the rollback."""
        git_dir = repo / ".git"
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                op.branch("topic")
                # What a SIGKILLed git leaves: its lock files.
                (git_dir / "index.lock").write_bytes(b"")
                (git_dir / "refs" / "heads" / "topic.lock").write_text("0" * 40 + "\n")
                (git_dir / "HEAD.lock").write_text("ref: refs/heads/topic\n")
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert [] == locks(repo)
        assert "refs/heads/topic" not in refs(repo)
        assert "" == fsck(repo)

    def test_sigkilled_git_leaves_a_real_lock(
        self, tmp_path: Path, repo: Path, store: SQLiteStore, make_term: Any, jobs: Any
    ) -> None:
        """A git SIGKILLed while it holds index.lock: the rollback removes the lock it left."""
        term: Terminator = make_term(store=store)
        events: list[ts.AuditEvent] = []
        term.add_event_listener(events.append)
        fifo = tmp_path / "hook.fifo"
        os.mkfifo(fifo)
        hook = repo / ".git" / "hooks" / "pre-commit"
        hook.write_text(HOOK)
        hook.chmod(0o755)
        old = refs(repo)

        def body() -> None:
            with (
                term.workflow("w", owner="alice"),
                git_operation(repo, env={"TERMSAFE_TEST_FIFO": str(fifo)}) as op,
            ):
                op.branch("topic")
                (repo / "a.txt").write_text("a\n")
                op.commit("git dies in its pre-commit hook", ["a.txt"])

        job = jobs.start(body)
        with fifo.open() as reader:
            hook_pid = int(reader.readline())
        # git commit holds index.lock while its hook runs: SIGKILL its whole group.
        os.killpg(os.getpgid(hook_pid), signal.SIGKILL)
        error = job.error()
        assert isinstance(error, GitCommandFailed)
        assert -signal.SIGKILL == error.returncode
        assert term.flush(WAIT)
        (rolled,) = [e for e in events if e.type == "git_operation_rolled_back"]
        assert str(repo / ".git" / "index.lock") in rolled.details["locks_removed"]
        assert [] == locks(repo)
        assert old == refs(repo)
        assert staged_matches_head(repo)
        assert "" == fsck(repo)
        assert [] == store.journal_entries()

    def test_older_lock_is_left_alone(self, repo: Path, store: SQLiteStore) -> None:
        """A lock that predates the operation is not ours: the rollback leaves it."""
        old_lock = repo / ".git" / "config.lock"
        old_lock.write_text("")
        past = time.time() - 3600
        os.utime(old_lock, (past, past))
        op = git_operation(repo, store=store)

        def body() -> None:
            with op:
                op.branch("topic")
                raise KeyError("x")

        with pytest.raises(KeyError):
            body()
        assert ["config.lock"] == locks(repo)
        assert "refs/heads/topic" not in refs(repo)

    def test_live_git_blocks_the_sweep(self, repo: Path) -> None:
        """While a git that started during the operation runs in the repo, the sweep waits."""
        old = refs(repo)
        payload = _crash(repo)
        lock = repo / ".git" / "index.lock"
        # A live git process working in the repository (it waits for its stdin).
        blocker = subprocess.Popen(
            ["git", "hash-object", "--stdin"],
            cwd=repo,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            lock.write_bytes(b"")
            assert False is sweep_stale_lock(payload)
            assert lock.exists()
        finally:
            blocker.communicate(b"data\n", timeout=WAIT)
        assert True is sweep_stale_lock(payload)
        assert not lock.exists()
        assert old == refs(repo)

    def test_lock_held_by_an_older_git_is_kept(self, repo: Path) -> None:
        """A git older than the operation may hold a new lock: it stays, the sweep retries."""
        blocker = subprocess.Popen(
            ["git", "hash-object", "--stdin"],
            cwd=repo,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            started = psutil.Process(blocker.pid).create_time()
            payload = _crash(repo)
            payload["started"] = started + 5.0
            lock = repo / ".git" / "index.lock"
            lock.write_bytes(b"")
            later = started + 10.0
            os.utime(lock, (later, later))
            assert False is sweep_stale_lock(payload)
            assert lock.exists()
        finally:
            blocker.communicate(b"data\n", timeout=WAIT)
        assert True is sweep_stale_lock(payload)
        assert [] == locks(repo)


CRASH = """
import json, os, signal, sys
from pathlib import Path
from termsafe import git_operation
from termsafe._store import SQLiteStore

repo, store_path = sys.argv[1], sys.argv[2]
store = SQLiteStore(store_path) if store_path else False
with git_operation(repo, store=store) as op:
    Path(repo, "a.txt").write_text("a\\n")
    op.commit("add a", ["a.txt"])
    op.branch("crashed")
    print(json.dumps(op._payload()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _crash(repo: Path, store_path: str = "") -> dict[str, Any]:
    """Run an operation that commits, branches and dies by SIGKILL; return its journal payload."""
    out = subprocess.run(
        [sys.executable, "-c", CRASH, str(repo), store_path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert -signal.SIGKILL == out.returncode, out.stderr
    payload: dict[str, Any] = json.loads(out.stdout)
    assert "refs/heads/crashed" in refs(repo)
    return payload


# A workflow process held just before it journals the pid of the git child it
# started ("commit"): what a SIGKILL at that moment leaves. Its store is a real
# SQLiteStore that, before that one write, reports the pid and blocks reading
# stdin (which stays silent) until the test kills it.
PAUSED_BEFORE_THE_PID = (
    """
import os, sys
from pathlib import Path
from termsafe import git_operation
from termsafe._store import SQLiteStore

def wanted(payload):
    return "commit" in payload["argv"]
"""
    + PAUSED_BEFORE_THE_PID_STORE
    + """
repo, store_path, git, fifo = sys.argv[1:5]
store = PausedBeforeThePid(store_path)
with git_operation(repo, store=store, git=git, env={"TERMSAFE_TEST_FIFO": fifo}) as op:
    Path(repo, "a.txt").write_text("a\\n")
    op.commit("add a", ["a.txt"])
"""
)


def _git_hanging_in(tmp_path: Path, subcommand: str, then: str, *, when: str = ":") -> Path:
    """A git wrapper that, on ``subcommand``, takes index.lock, runs ``then`` and hangs.

    It does so only where the shell condition ``when`` holds; any other
    command goes to the real git. Returns the wrapper's path.
    """
    real_git = shutil.which("git")
    assert real_git is not None
    wrapper = tmp_path / "git-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" {subcommand} "*)\n'
        f"  if {when}; then\n"
        f'    : > "$({shlex.quote(real_git)} rev-parse --git-dir)/index.lock"\n'
        f"    {then}\n"
        "    exec sleep 600\n"
        "  fi;;\n"
        "esac\n"
        f'exec {shlex.quote(real_git)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _read_line(fd: int, timeout: float = WAIT) -> str:
    """One line from ``fd``, within ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line within {timeout} s (read {data!r})"
        data += os.read(fd, 256)
    return data.decode().strip()


def _running(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie only waits to be reaped)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class TestSweep:
    def test_sweep_journal_restores_a_dead_operation(self, repo: Path, store: SQLiteStore) -> None:
        """After a SIGKILL mid-operation, sweep_journal hands the entry to sweep_stale_lock."""
        old = refs(repo)
        _crash(repo, str(store.path))
        assert old != refs(repo)
        assert ["git_lock"] == [e.kind for e in store.journal_entries()]
        report = ts.sweep_journal(store)
        assert report.clean, report.left
        assert old == refs(repo)
        assert staged_matches_head(repo)
        assert "" == fsck(repo)
        assert [] == store.journal_entries()

    def test_sigkill_while_reading_the_entry_state(
        self, tmp_path: Path, repo: Path, store: SQLiteStore
    ) -> None:
        """A SIGKILL while ``write-tree`` holds index.lock on entry: the sweep removes the lock."""
        mark = tmp_path / "mark"
        # write-tree takes index.lock on entry; this one takes it and then hangs there.
        wrapper = _git_hanging_in(tmp_path, "write-tree", f": > {shlex.quote(str(mark))}")
        code = (
            "import sys\n"
            "from termsafe import git_operation\n"
            "from termsafe._store import SQLiteStore\n"
            "with git_operation(sys.argv[1], store=SQLiteStore(sys.argv[2]), git=sys.argv[3]):\n"
            "    pass\n"
        )
        old = refs(repo)
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(repo), str(store.path), str(wrapper)],
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + WAIT
            while not mark.exists():  # the wrapper holds the lock once the mark exists
                assert child.poll() is None, "the operation ended before write-tree"
                assert time.monotonic() < deadline, "write-tree never ran"
                time.sleep(0.01)
        finally:
            # The workflow process and its git (which may lead its own session).
            try:
                kids = [p.pid for p in psutil.Process(child.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                kids = []
            for pid in [child.pid, *kids]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            child.wait(WAIT)
        assert ["index.lock"] == locks(repo)
        report = ts.sweep_journal(store)
        # The git child's own entry is the supervisor's to settle, not the sweep's.
        assert {"child_process"} >= {e.kind for e in report.left}, report.left
        assert [] == locks(repo)
        assert old == refs(repo)
        assert [] == [e.kind for e in store.journal_entries() if e.kind != "child_process"]

    def test_sigkill_before_a_git_childs_pid_is_journaled(
        self, tmp_path: Path, repo: Path, store: SQLiteStore
    ) -> None:
        """A git child whose parent died before journaling its pid is stopped by recover (token)."""
        # git commit takes index.lock; this one takes it, reports, and hangs there.
        wrapper = _git_hanging_in(tmp_path, "commit", 'echo "ready $$" > "$TERMSAFE_TEST_FIFO"')
        fifo = tmp_path / "ready.fifo"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDWR)  # never blocks, and never sees EOF
        old = refs(repo)
        parent = subprocess.Popen(
            [sys.executable, "-c", PAUSED_BEFORE_THE_PID]
            + [str(p) for p in (repo, store.path, wrapper, fifo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert parent.stdout is not None
        child: psutil.Process | None = None
        try:
            word, pid = parent.stdout.readline().split()
            assert "recording" == word
            child = psutil.Process(int(pid))
            assert f"ready {pid}" == _read_line(reader)
            parent.kill()  # SIGKILL, after Popen, before the pid is journaled
            assert -signal.SIGKILL == parent.wait(WAIT)
            assert ["index.lock"] == locks(repo)
            report = ts.recover(store, kill_timeout=0.2)
            assert (child.pid,) == report.processes_killed
            assert not _running(child)
            assert report.clean, report.left
            assert [] == locks(repo)
            assert old == refs(repo)
            assert "" == fsck(repo)
            assert [] == store.journal_entries()
        finally:
            if parent.poll() is None:
                parent.kill()
            parent.wait(WAIT)
            assert parent.stdin is not None
            parent.stdin.close()
            parent.stdout.close()
            os.close(reader)
            if child is not None:
                with contextlib.suppress(psutil.Error):
                    child.kill()  # psutil checks the start time: never a reused pid

    def test_payload_is_checked(self) -> None:
        """A payload that is not git_operation's is refused, naming it."""
        with pytest.raises(ConfigurationError, match="'lock'"):
            sweep_stale_lock({"lock": "/repo/.git/index.lock"})
        with pytest.raises(ConfigurationError, match="not a git_operation journal payload"):
            sweep_stale_lock({"version": 1, "repo": "/x"})

    def test_repository_gone(self, tmp_path: Path) -> None:
        """A repository that no longer exists has nothing to sweep."""
        payload = {
            "version": 1,
            "repo": str(tmp_path / "gone"),
            "git_dir": str(tmp_path / "gone" / ".git"),
            "common_dir": str(tmp_path / "gone" / ".git"),
            "started": time.time(),
            "head": {"ref": "refs/heads/main", "sha": None},
            "refs": {},
            "index_tree": None,
        }
        assert True is sweep_stale_lock(payload)


# A reference-transaction hook that, once armed (the file $TERMSAFE_TEST_ARMED
# exists), holds the next ref transaction in its "prepared" state (git has
# locked the refs), reports its pid and hangs there.
REF_HOOK = """#!/bin/sh
if [ "$1" = prepared ] && [ -n "$TERMSAFE_TEST_ARMED" ] && [ -e "$TERMSAFE_TEST_ARMED" ]; then
  echo "ready $$" > "$TERMSAFE_TEST_FIFO"
  exec sleep 600
fi
"""

# An operation that commits, then fails: its rollback runs, and the test's git
# (a hook, or a wrapper) hangs in one of the rollback's commands once armed.
FAILS_AFTER_ITS_COMMIT = """
import sys
from pathlib import Path
from termsafe import git_operation
from termsafe._store import SQLiteStore

repo, store_path, git, fifo, armed = sys.argv[1:6]
env = {"TERMSAFE_TEST_FIFO": fifo, "TERMSAFE_TEST_ARMED": armed}
with git_operation(repo, store=SQLiteStore(store_path), git=git, env=env) as op:
    Path(repo, "a.txt").write_text("a\\n")
    op.commit("add a", ["a.txt"])
    Path(armed).touch()
    raise RuntimeError("fails after its commit: the rollback runs")
"""

# The recovery sweep of a dead operation's entry, journaling its own git commands.
SWEEPS = """
import json, sys
from termsafe._git import sweep_stale_lock
from termsafe._store import SQLiteStore

sweep_stale_lock(json.loads(sys.argv[1]), store=SQLiteStore(sys.argv[2]))
"""


def _install_ref_hook(repo: Path) -> None:
    """Install ``REF_HOOK`` as the repository's reference-transaction hook."""
    hook = repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text(REF_HOOK)
    hook.chmod(0o755)


def _hung_command(reader: int, parent: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The processes of the git command that reported itself hung on ``reader``.

    The reporting process (a hook, or a wrapper in git's place), and the git
    that runs the hook, if there is one between it and ``parent``.
    """
    word, pid = _read_line(reader).split()
    assert "ready" == word
    hung = psutil.Process(int(pid))
    procs = [hung]
    above = hung.parent()
    if above is not None and above.pid != parent.pid:
        procs.append(above)
    return procs


def _stop(parent: subprocess.Popen[bytes], procs: list[psutil.Process], reader: int) -> None:
    """Whatever a failed test left: the parent, the hung command's processes, the FIFO."""
    if parent.poll() is None:
        parent.kill()
    parent.wait(WAIT)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil checks the start time: never a reused pid
    os.close(reader)


class TestKilledRollback:
    @pytest.mark.parametrize("hangs_in", ["update-ref", "read-tree"])
    def test_sigkill_while_a_rollback_runs_git(
        self, tmp_path: Path, repo: Path, store: SQLiteStore, hangs_in: str
    ) -> None:
        """A SIGKILL while a rollback's git runs: recover stops it, removes its locks, restores."""
        fifo = tmp_path / "ready.fifo"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDWR)  # never blocks, and never sees EOF
        armed = tmp_path / "armed"
        if hangs_in == "update-ref":
            # The real git, holding the ref locks of the rollback's transaction.
            _install_ref_hook(repo)
            git_exe, held = "git", "refs/heads/main.lock"
        else:
            # A git in read-tree's place: it takes index.lock and hangs (SIGTERM
            # does not make it remove the lock, as it would make git).
            wrapper = _git_hanging_in(
                tmp_path,
                "read-tree",
                'echo "ready $$" > "$TERMSAFE_TEST_FIFO"',
                when='[ -e "$TERMSAFE_TEST_ARMED" ]',
            )
            git_exe, held = str(wrapper), "index.lock"
        old = refs(repo)
        parent = subprocess.Popen(
            [sys.executable, "-c", FAILS_AFTER_ITS_COMMIT]
            + [str(p) for p in (repo, store.path, git_exe, fifo, armed)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs: list[psutil.Process] = []
        try:
            procs = _hung_command(reader, parent)
            if hangs_in == "update-ref":
                assert ["git"] == [p.name() for p in procs[1:]]  # the git running the hook
            parent.kill()
            assert -signal.SIGKILL == parent.wait(WAIT)
            assert held in locks(repo)
            assert all(_running(p) for p in procs)
            # The operation's entry, and the one its rollback's commands run under.
            assert ["child_process", "git_lock"] == sorted(e.kind for e in store.journal_entries())
            report = ts.recover(store, kill_timeout=0.2)
            assert report.clean, str(report)
            assert {p.pid for p in procs} <= set(report.processes_killed)
            assert not any(_running(p) for p in procs)
            assert [] == locks(repo)
            assert old == refs(repo)
            assert "ref: refs/heads/main" == head(repo)
            assert staged_matches_head(repo)
            assert "" == fsck(repo)
            assert [] == store.journal_entries()
        finally:
            _stop(parent, procs, reader)

    def test_sigkill_while_a_sweep_runs_git(
        self, tmp_path: Path, repo: Path, store: SQLiteStore
    ) -> None:
        """A sweep SIGKILLed while its git runs: the next recover stops that git and restores."""
        old = refs(repo)
        payload = _crash(repo, str(store.path))
        fifo = tmp_path / "ready.fifo"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDWR)
        armed = tmp_path / "armed"
        armed.touch()
        _install_ref_hook(repo)
        sweeper = subprocess.Popen(
            [sys.executable, "-c", SWEEPS, json.dumps(payload), str(store.path)],
            env={**os.environ, "TERMSAFE_TEST_FIFO": str(fifo), "TERMSAFE_TEST_ARMED": str(armed)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs: list[psutil.Process] = []
        try:
            procs = _hung_command(reader, sweeper)
            assert ["git"] == [p.name() for p in procs[1:]]
            sweeper.kill()
            assert -signal.SIGKILL == sweeper.wait(WAIT)
            assert "refs/heads/main.lock" in locks(repo)
            assert all(_running(p) for p in procs)
            assert ["child_process", "git_lock"] == sorted(e.kind for e in store.journal_entries())
            report = ts.recover(store, kill_timeout=0.2)
            assert report.clean, str(report)
            assert not any(_running(p) for p in procs)
            assert [] == locks(repo)
            assert old == refs(repo)
            assert staged_matches_head(repo)
            assert "" == fsck(repo)
            assert [] == store.journal_entries()
        finally:
            _stop(sweeper, procs, reader)

    def test_a_rollback_is_journaled_as_one_entry(self, tmp_path: Path, repo: Path) -> None:
        """Every git command of a rollback carries the token of one child_process entry."""
        real_git = shutil.which("git")
        assert real_git is not None
        calls = tmp_path / "calls"
        wrapper = tmp_path / "git-logging"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'echo "${{TERMSAFE_SPAWN_TOKEN:-none}} $*" >> {shlex.quote(str(calls))}\n'
            f'exec {shlex.quote(real_git)} "$@"\n'
        )
        wrapper.chmod(0o755)
        store = _RecordingStore(tmp_path / "store.sqlite3")
        seen: list[int] = []

        def body() -> None:
            with git_operation(repo, store=store, git=str(wrapper)) as op:
                (repo / "a.txt").write_text("a\n")
                op.commit("add a", ["a.txt"])
                seen[:] = [len(calls.read_text().splitlines()), len(store.added)]
                raise KeyError("x")

        try:
            with pytest.raises(KeyError):
                body()
            lines = calls.read_text().splitlines()[seen[0] :]
            added = store.added[seen[1] :]
            assert ["child_process"] == [kind for kind, _ in added]
            token = added[0][1]["token"]
            assert ["for-each-ref", "symbolic-ref", "update-ref", "write-tree", "read-tree"] == [
                _subcommand(line) for line in lines
            ]
            assert {token} == {line.split()[0] for line in lines}
            assert [] == store.journal_entries()
        finally:
            store.close()


class _RecordingStore(SQLiteStore):
    """A store that remembers what was journaled, in order."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.added: list[tuple[str, dict[str, Any]]] = []

    def journal_add(
        self, kind: Any, payload: dict[str, Any], workflow_id: str | None = None
    ) -> int:
        entry = super().journal_add(kind, payload, workflow_id)
        self.added.append((kind, payload))
        return entry


def _subcommand(line: str) -> str:
    """The git subcommand of a line the logging wrapper wrote (after the token and ``-c`` pairs)."""
    words = line.split()[1:]
    while words[0] == "-c":
        words = words[2:]
    return words[0]


class TestArguments:
    def test_not_a_repository(self, tmp_path: Path, env: dict[str, str]) -> None:
        """A path outside any repository raises NotAGitRepository naming it."""
        plain = tmp_path / "plain"
        plain.mkdir()

        def body() -> None:
            with git_operation(plain, store=False):
                pass

        with pytest.raises(NotAGitRepository, match="plain"):
            body()

    def test_missing_path(self, tmp_path: Path, env: dict[str, str]) -> None:
        """A path that does not exist raises NotAGitRepository naming it."""

        def body() -> None:
            with git_operation(tmp_path / "nowhere", store=False):
                pass

        with pytest.raises(NotAGitRepository, match="nowhere"):
            body()

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"refs": "refs/heads/x"}, InvalidArgumentType, "not a string"),
            ({"refs": ["heads/x"]}, ConfigurationError, "'heads/x'"),
            ({"refs": [7]}, InvalidArgumentType, "7"),
            ({"grace": -1}, ConfigurationError, "-1"),
            ({"restore_index": "yes"}, InvalidArgumentType, "'yes'"),
            ({"git": ""}, InvalidArgumentType, "''"),
        ],
    )
    def test_bad_arguments(
        self, repo: Path, kwargs: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        """Bad arguments are refused before anything runs, naming the value."""
        with pytest.raises(error, match=match):
            git_operation(repo, **kwargs)

    def test_repo_must_be_a_path(self) -> None:
        """repo must be a path."""
        with pytest.raises(InvalidArgumentType, match="42"):
            git_operation(42)  # type: ignore[arg-type]

    def test_closed_after_exit(self, repo: Path) -> None:
        """The operation object cannot run git once the block ended."""
        with git_operation(repo, store=False) as op:
            pass
        with pytest.raises(OperationClosed, match="committed"):
            op.run("status")

        def body() -> None:
            with op:
                pass

        with pytest.raises(OperationClosed):
            body()

    def test_bad_branch_name(self, repo: Path) -> None:
        """A branch name that looks like an option is refused, naming it."""
        with (
            git_operation(repo, store=False) as op,
            pytest.raises(ConfigurationError, match="'-f'"),
        ):
            op.branch("-f")

    def test_run_arguments(self, repo: Path) -> None:
        """run() takes strings only."""
        with git_operation(repo, store=False) as op, pytest.raises(InvalidArgumentType, match="1"):
            op.run("log", 1)  # type: ignore[arg-type]

    def test_repr_and_recorded(self, repo: Path) -> None:
        """The operation shows its repository and state, and what it recorded."""
        with git_operation(repo, store=False) as op:
            assert isinstance(op, GitOperation)
            assert f"<GitOperation {str(repo)!r} open>" == repr(op)
            assert {"refs/heads/main": refs(repo)["refs/heads/main"]} == op.recorded
            assert ("refs/heads/main", refs(repo)["refs/heads/main"]) == op.head


HOOK = """#!/bin/sh
echo $$ > "$TERMSAFE_TEST_FIFO"
exec sleep 600
"""


class TestInWorkflow:
    def test_kill_waits_for_the_operation(
        self, repo: Path, store: SQLiteStore, make_term: Any, jobs: Any
    ) -> None:
        """A kill during the operation is deferred; the operation commits, then the kill lands."""
        term: Terminator = make_term(store=store)
        events = event_types(term)

        def body(pause: Callable[[], None]) -> None:
            with git_operation(repo) as op:
                op.branch("topic")
                pause()
                op.branch("topic2")

        assert kill_in(term, jobs, body, reason="deploy").deferred
        assert {"refs/heads/topic", "refs/heads/topic2"} <= set(refs(repo))
        assert term.flush(WAIT)
        assert "kill_deferred" in events
        assert "git_operation_committed" in events
        assert [] == store.journal_entries()

    def test_expired_grace_stops_git_and_rolls_back(
        self, tmp_path: Path, repo: Path, store: SQLiteStore, make_term: Any, jobs: Any
    ) -> None:
        """When the git grace runs out, the hung git tree is stopped and the refs restored."""
        term: Terminator = make_term(Phases(0.05, 30.0), store=store)
        events: list[ts.AuditEvent] = []
        term.add_event_listener(events.append)
        fifo = tmp_path / "hook.fifo"
        os.mkfifo(fifo)
        hook = repo / ".git" / "hooks" / "pre-commit"
        hook.write_text(HOOK)
        hook.chmod(0o755)
        old = refs(repo)
        outcome: list[BaseException | None] = []

        def body() -> None:
            with term.workflow("w", owner="alice"):
                try:
                    with git_operation(
                        repo, grace=0.2, env={"TERMSAFE_TEST_FIFO": str(fifo)}
                    ) as op:
                        op.branch("topic")
                        (repo / "a.txt").write_text("a\n")
                        op.commit("hangs in its hook", ["a.txt"])
                except BaseException as exc:
                    outcome.append(exc)
                    raise

        job = jobs.start(body)
        with fifo.open() as reader:
            hook_pid = int(reader.readline())
        handle = term.kill("w", by=ADMIN, reason="deploy")
        assert WorkflowState.TERMINATED == handle.wait(WAIT)
        assert job.error() is None
        assert isinstance(outcome[0], ForcedTermination)
        assert (
            not psutil.pid_exists(hook_pid)
            or psutil.Process(hook_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert old == refs(repo)
        assert [] == locks(repo)
        assert staged_matches_head(repo)
        assert "" == fsck(repo)
        assert [] == _no_git_running(repo)
        assert term.flush(WAIT)
        rolled = [e for e in events if e.type == "git_operation_rolled_back"]
        assert 1 == len(rolled)
        assert "ForcedTermination" == rolled[0].details["error"]
        assert [] == store.journal_entries()

    def test_terminator_rolls_back_for_a_stuck_thread(
        self, repo: Path, store: SQLiteStore, make_term: Any, jobs: Any
    ) -> None:
        """A thread stuck outside git past the system phase: the terminator restores the refs."""
        term: Terminator = make_term(Phases(0.05, 0.05), store=store)
        rolled_back = threading.Event()
        term.add_event_listener(
            lambda e: rolled_back.set() if e.type == "git_operation_rolled_back" else None
        )
        old = refs(repo)
        inside = threading.Event()
        release = threading.Event()

        def body() -> None:
            with term.workflow("w", owner="alice"), git_operation(repo, grace=0.1) as op:
                op.branch("topic")
                inside.set()
                assert release.wait(WAIT)  # stuck where no kill can land
                op.branch("after-the-kill")

        job = jobs.start(body)
        assert inside.wait(WAIT)
        assert WorkflowState.KILLED == term.kill("w", by=ADMIN, reason="stuck").wait(WAIT)
        assert rolled_back.wait(WAIT)
        assert old == refs(repo)
        release.set()
        assert isinstance(job.error(), (OperationClosed, ForcedTermination))
        assert old == refs(repo)
        assert "" == fsck(repo)
        assert [] == store.journal_entries()

    def test_pending_kill_refuses_to_start(
        self, repo: Path, store: SQLiteStore, make_term: Any, jobs: Any
    ) -> None:
        """With a kill pending, git_operation does not start: nothing is journaled or run."""
        term: Terminator = make_term(store=store)

        def start() -> None:
            with git_operation(repo):
                pass

        assert isinstance(kill_before(term, jobs, start), Terminated)
        assert [] == store.journal_entries()


# -- SIGKILL -------------------------------------------------------------------------------

KILL_RUNS = [
    # (name, kills, push every n-th trial (0: never))
    ("branches", 120, 0),
    ("with-push", 85, 2),
]


def _git_trial(spec: dict[str, Any], repo: str, fd: int) -> None:
    """The operation a forked child runs: commit, create, move and delete branches, push."""
    k = spec["trial"]
    with trial_workflow(spec):
        os.write(fd, b"R")
        with git_operation(repo) as op:
            Path(repo, f"f{k}.txt").write_text(f"trial {k}\n")
            op.commit(f"trial {k}", [f"f{k}.txt"])
            op.branch(f"t{k}")
            op.branch("moving", force=True)
            if spec["delete"]:
                op.delete_branch(spec["delete"], force=True)
            if spec["push"]:
                op.push("origin", ["main", "moving"], force=True)


def _in_child(fn: Callable[[], object]) -> tuple[int, str]:
    """Run ``fn()`` in a forked child (a later process); return its exit status and output."""
    pid, r = fork_child(lambda fd: os.write(fd, str(fn()).encode()))
    out = read_to_end(r)
    _, status = os.waitpid(pid, 0)
    return status, out.decode(errors="replace")


def _kill_orphans() -> int:
    """What a supervisor does to a dead workflow's process tree: SIGKILL what is left of it.

    The worker is a child subreaper, so the git processes the SIGKILLed child
    left running are the worker's children now (and nothing else is).
    """
    killed = 0
    for proc in psutil.Process().children():
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def _recover(store_path: str) -> str:
    """The recovery sweep, as a later process runs it."""
    store = SQLiteStore(store_path)
    report = ts.sweep_journal(store)
    for entry in store.journal_entries("child_process"):
        # No pid: the child was journaled by its token and the kill came before
        # its pid was recorded; the worker stopped the orphans already.
        pid = entry.payload.get("pid")
        if pid is None or not psutil.pid_exists(pid):
            store.journal_remove(entry.id)
    # Not closed: the child _exit()s, and a close would checkpoint the WAL each time.
    left = [e for e in report.left if e.kind != "child_process"]
    if left:
        raise AssertionError(f"sweep left {left}")
    return "ok"


def _git_worker(repo: str, store_path: str) -> None:
    """Forks a child per trial, SIGKILLs it after the delay, then recovers as a later process."""
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_CHILD_SUBREAPER: orphaned git processes become our children, so
    # they can be waited for (or killed) and reaped, not left to init.
    assert 0 == libc.prctl(36, 1, 0, 0, 0)
    # Loaded once here, not in every forked child: importing the recovery
    # (filelock and all) was most of each recovery child's run. Imports only:
    # nothing is opened, so nothing crosses the forks.
    for module in ("termsafe._audit", "termsafe._recovery"):
        importlib.import_module(module)
    serve_trials(
        lambda spec, fd: _git_trial(spec, repo, fd),
        lambda spec, report: _after_trial(spec, report, repo, store_path),
    )


def _after_trial(spec: Spec, report: Report, repo: str, store_path: str) -> Report:
    """After a trial, in the worker: stop or reap what the child left; recover if it was killed."""
    orphans_killed = 0
    if report["killed"] and spec["orphans"] == "kill":
        orphans_killed = _kill_orphans()
    # Whatever git the dead child left running finishes (or died above): reap it all.
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    # What the crash left for the recovery to clean (the judge checks it is gone).
    git_dir = Path(repo, ".git")
    leftovers = len(list(git_dir.rglob("*.lock")))
    leftovers += len(list(git_dir.glob("objects/??/tmp_obj_*")))
    killed = report["killed"]
    rstatus, rout = _in_child(lambda: _recover(store_path)) if killed else (0, "ok")
    return {"orphans_killed": orphans_killed, "leftovers": leftovers, "recovery": [rstatus, rout]}


def _judge(repo: Path, old: dict[str, str], k: int, spec: dict[str, Any]) -> bool:
    """Check the repository after trial ``k``; return whether the operation is all there.

    Raises AssertionError when anything is torn: fsck, locks, HEAD, index, or a
    mix of old and new refs.
    """
    assert "" == fsck(repo)
    assert [] == locks(repo)
    assert "ref: refs/heads/main" == head(repo)
    assert staged_matches_head(repo)
    now = refs(repo)
    if now == old:
        return False
    main = now["refs/heads/main"]
    parent, subject = git(repo, "log", "-1", "--format=%P%n%s", main).splitlines()
    new = dict(old)
    new["refs/heads/main"] = main
    new[f"refs/heads/t{k}"] = main
    new["refs/heads/moving"] = main
    if spec["delete"]:
        del new[f"refs/heads/{spec['delete']}"]
    if spec["push"]:
        new["refs/remotes/origin/main"] = main
        new["refs/remotes/origin/moving"] = main
    assert (old["refs/heads/main"], f"trial {k}") == (parent, subject)
    assert new == now, "refs are neither all old nor all new"
    return True


class TestSigkill:
    @pytest.mark.parametrize(("name", "kills", "push_every"), KILL_RUNS)
    def test_refs_old_or_new(
        self,
        tmp_path: Path,
        repo: Path,
        remote: Path,
        kill_seed: int,
        name: str,
        kills: int,
        push_every: int,
    ) -> None:
        """Random SIGKILLs, then recovery: fsck clean, no locks, refs all old or all new."""
        seed = kill_seed + (1 if push_every else 0)
        store_path = str(tmp_path / "termsafe" / "store.sqlite3")
        before: dict[int, dict[str, str]] = {}

        def spec(trial: int, rng: random.Random) -> Spec:
            old = before[trial] = refs(repo)
            prior = sorted(r for r in old if r.startswith("refs/heads/t"))
            return {
                "in_workflow": trial % 2 == 1,
                "delete": prior[0].removeprefix("refs/heads/") if prior else None,
                "push": bool(push_every) and trial % push_every == 0,
                "orphans": rng.choice(["kill", "wait"]),
            }

        def judge(spec: Spec, report: Report) -> bool:
            assert [0, "ok"] == report["recovery"]
            return _judge(repo, before.pop(spec["trial"]), spec["trial"], spec)

        outcomes, reports = run_trials(
            [sys.executable, __file__, "worker", str(repo), store_path],
            seed=seed,
            kills=kills,
            spec=spec,
            judge=judge,
            calibration_delay=60.0,
        )
        killed = [report for report in reports if report["killed"]]
        swept = {
            "orphans_killed": sum(max(0, report["orphans_killed"]) for report in killed),
            "leftovers_swept": sum(report["leftovers"] for report in killed),
        }
        assert "" == fsck(remote)
        assert [] == _no_git_running(repo)
        assert outcomes["killed_before"] >= 10, (
            f"seed {seed}: kills must land mid-operation: {outcomes | swept}"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _git_worker(sys.argv[2], sys.argv[3])
