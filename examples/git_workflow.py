"""A release workflow killed while ``git commit`` runs, in a real temporary repository.

``git_operation`` makes the commit and the branch one unit a kill cannot tear.
The repository's ``pre-commit`` hook tells this script (through a named pipe)
that ``git commit`` is running, and waits for a go-ahead, so the kill lands
inside the commit every time.

1. Within the grace period (``git``: 30 s): the kill is deferred, the commit
   and the branch complete, the kill lands as the operation ends, and the
   workflow ends ``terminated`` with the release committed.
2. With a grace period shorter than the commit (``grace=0.3``, the hook never
   gets its go-ahead): the section is cut, git is stopped, its lock files are
   removed and the refs are put back to the last good commit.

Both times ``git fsck --full`` passes and no ``*.lock`` file is left.
Run it: ``python examples/git_workflow.py``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from pathlib import Path

import termsafe as ts

ALICE = ts.Principal("alice")
WAIT = 60.0


def git(repo: Path, env: dict[str, str], *args: str) -> str:
    """Run git in ``repo`` (the script's own checks, outside termsafe); return its output."""
    done = subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def make_repo(repo: Path, env: dict[str, str], entered: Path, go: Path) -> str:
    """A repository with one commit and a pre-commit hook that waits for a go-ahead."""
    repo.mkdir()
    git(repo, env, "init", "-q", "-b", "main")
    git(repo, env, "config", "user.name", "Release Bot")
    git(repo, env, "config", "user.email", "release@example.invalid")
    (repo / "CHANGELOG.md").write_text("# Changelog\n")
    git(repo, env, "add", "CHANGELOG.md")
    git(repo, env, "commit", "-q", "-m", "Initial commit")
    hook = repo / ".git" / "hooks" / "pre-commit"
    # Opening a named pipe blocks until the other end opens it: the first line
    # tells the script "git commit is running", the second waits for its go.
    hook.write_text(f"#!/bin/sh\necho running > '{entered}'\nread go < '{go}'\n")
    hook.chmod(0o755)
    return git(repo, env, "rev-parse", "HEAD")


def wait_for_line(fifo: Path, timeout: float) -> None:
    """Block until a line arrives on ``fifo`` (in a helper thread, so it can time out)."""
    arrived = threading.Event()

    def read() -> None:
        with fifo.open() as f:
            f.readline()
        arrived.set()

    threading.Thread(target=read, daemon=True).start()
    if not arrived.wait(timeout):
        raise TimeoutError(f"nothing arrived on {fifo} within {timeout} s")


def release(
    term: ts.Terminator, repo: Path, env: dict[str, str], grace: float | None, log: list[str]
) -> None:
    """The workflow: write the changelog, then commit it and branch, as one git operation."""
    with term.workflow("release-1.4", owner="alice"):
        ts.on_cleanup(lambda: log.append("cleanup: release notes draft removed"))
        (repo / "CHANGELOG.md").write_text("# Changelog\n\n## 1.4.0\n- faster exports\n")
        with ts.git_operation(repo, grace=grace, env=env) as op:
            commit = op.commit("Release 1.4.0", ["CHANGELOG.md"])
            log.append(f"committed {commit[:10]}")
            op.branch("release-1.4")
            log.append("branch release-1.4 created")


def scenario(base: Path, env: dict[str, str], *, grace: float | None) -> None:
    """Kill the release while ``git commit`` runs; check the repository afterwards."""
    entered, go = base / "entered.fifo", base / "go.fifo"
    os.mkfifo(entered)
    os.mkfifo(go)
    repo = base / "repo"
    initial = make_repo(repo, env, entered, go)
    log: list[str] = []
    with ts.Terminator(phases=ts.Phases(graceful=5, forced=5)) as term:
        worker = threading.Thread(target=release, args=(term, repo, env, grace, log))
        worker.start()
        try:
            wait_for_line(entered, WAIT)
            handle = term.kill("release-1.4", by=ALICE, reason="release cancelled")
            print(f"  kill requested while git commit runs; deferred: {handle.deferred}")
            if grace is None:
                go.write_text("go\n")  # the commit goes on; the kill waits for it
            final = handle.wait(WAIT)
        finally:
            worker.join(WAIT)
    for line in log:
        print(f"  {line}")
    head = git(repo, env, "rev-parse", "HEAD")
    branches = git(repo, env, "branch", "--format=%(refname:short)").split()
    git(repo, env, "fsck", "--full", "--strict")
    locks = sorted(str(p.relative_to(repo)) for p in (repo / ".git").rglob("*.lock"))
    print(f"  final state: {final}; HEAD {head[:10]}; branches {branches}")
    print(f"  git fsck --full: clean; lock files left: {locks or 'none'}")
    assert final == ts.WorkflowState.TERMINATED
    assert not locks, locks
    if grace is None:
        assert head != initial
        assert git(repo, env, "log", "-1", "--format=%s") == "Release 1.4.0"
        assert sorted(branches) == ["main", "release-1.4"]
    else:
        assert head == initial, "the refs are back at the last good commit"
        assert branches == ["main"]


def main() -> None:
    """Run both scenarios in a temporary folder, isolated from the user's git config."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        os.environ["TERMSAFE_HOME"] = str(base / "termsafe-home")  # the crash journal
        (base / "gitconfig").write_text("")
        env = {
            **os.environ,
            "GIT_CONFIG_GLOBAL": str(base / "gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        for title, grace in (
            ("kill inside the commit, within the grace", None),
            (
                "kill inside the commit, grace of 0.3 s runs out",
                0.3,
            ),
        ):
            print(title + ":")
            folder = base / ("within" if grace is None else "cut")
            folder.mkdir()
            scenario(folder, env, grace=grace)


if __name__ == "__main__":
    main()
