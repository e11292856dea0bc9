"""Child process trees: spawned, journaled, and stopped whole with the workflow."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import termsafe as ts
from termsafe._children import spawn, track_process
from termsafe._procs import _send, kill_tree
from termsafe._store import SQLiteStore

ADMIN = ts.Principal("root", roles=["admin"])

# A 3-level tree: child -> grandchild that ignores SIGTERM, and a grandchild that
# calls setsid() (leaves the process group), each printing its pid when ready.
TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    level = int(sys.argv[1])
    if level == 0:
        kids = [
            subprocess.Popen([sys.executable, __file__, "1"]),
            subprocess.Popen([sys.executable, __file__, "2"]),
        ]
        os.write(1, b"%d\\n" % os.getpid())  # one write: lines never interleave
    elif level == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(1, b"%d\\n" % os.getpid())  # one write: lines never interleave
    else:
        os.setsid()
        os.write(1, b"%d\\n" % os.getpid())  # one write: lines never interleave
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def tree_script(tmp_path: Path) -> Path:
    path = tmp_path / "tree.py"
    path.write_text(TREE)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def _start_tree(script: Path, **kwargs: object) -> tuple[subprocess.Popen[str], list[int]]:
    popen = spawn(
        [sys.executable, str(script), "0"],
        stdout=subprocess.PIPE,
        text=True,
        stop_timeout=0.5,
        **kwargs,
    )
    assert popen.stdout is not None
    try:
        with popen.stdout:
            pids = [int(popen.stdout.readline()) for _ in range(3)]
    except BaseException:
        kill_tree(popen.pid, force=True, timeout=1.0)  # never leave the tree behind
        popen.wait(10)
        raise
    return popen, pids


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


class TestKillTree:
    def test_whole_tree_dies_including_setsid_and_sigterm_ignorers(self, tree_script: Path) -> None:
        """kill_tree leaves no process of a 3-level tree alive, whatever they did to escape."""
        popen = subprocess.Popen(
            [sys.executable, str(tree_script), "0"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert popen.stdout is not None
        try:
            with popen.stdout:
                pids = [int(popen.stdout.readline()) for _ in range(3)]
        finally:
            result = kill_tree(popen.pid, timeout=0.5)
        popen.wait(10)
        assert [] == _alive(pids)
        assert () == result.survivors
        assert set(result.killed), "the SIGTERM-ignoring grandchild needed SIGKILL"

    def test_reused_pid_is_not_touched(self) -> None:
        """A start time that does not match means the pid was reused: nothing is signalled."""
        result = kill_tree(os.getpid(), start_time=1.0, timeout=0.1)
        assert ((), (), ()) == (result.signalled, result.killed, result.survivors)


class TestSend:
    def test_signals_the_snapshot_process(self) -> None:
        """_send delivers the signal to a live process it snapshotted (via a pidfd here)."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert _send(psutil.Process(child.pid), signal.SIGKILL)
            assert -signal.SIGKILL == child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    def test_reaped_process_is_not_signalled(self) -> None:
        """A snapshot of a process that has exited and been reaped gets no signal."""
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        proc = psutil.Process(child.pid)
        assert 0 == child.wait(10)
        assert not _send(proc, signal.SIGKILL)


class TestSpawnInWorkflow:
    def test_tree_stopped_when_workflow_completes(
        self, tree_script: Path, store: SQLiteStore
    ) -> None:
        """A workflow that ends normally stops and reaps its children's whole tree."""
        with ts.Terminator(sink=ts.MemorySink(), store=store) as term, term.workflow("w"):
            popen, pids = _start_tree(tree_script)
            assert 1 == len(store.journal_entries("child_process"))
        assert [] == _alive(pids)
        assert popen.returncode is not None
        assert [] == store.journal_entries("child_process")

    def test_forced_phase_kills_tree_of_a_stuck_workflow(
        self, tree_script: Path, store: SQLiteStore
    ) -> None:
        """A kill with force=True SIGKILLs the tree at once, even while the workflow is stuck."""
        release = threading.Event()
        ready = threading.Event()
        pids: list[int] = []
        with ts.Terminator(phases=ts.Phases(5, 5), sink=ts.MemorySink(), store=store) as term:

            def body() -> None:
                with term.workflow("w"):
                    _, started = _start_tree(tree_script)
                    pids.extend(started)
                    ready.set()
                    release.wait(30)  # stuck: never reaches a cancellation point

            thread = threading.Thread(target=body)
            thread.start()
            assert ready.wait(30)
            term.kill("w", by=ADMIN, force=True)
            procs = []
            for pid in pids:
                # The SIGKILLs are on their way: a process may be reaped at any moment.
                with contextlib.suppress(psutil.NoSuchProcess):
                    procs.append(psutil.Process(pid))
            _, still = psutil.wait_procs(procs, timeout=20)
            assert [] == [p.pid for p in still if p.pid in _alive([p.pid])]
            release.set()
            thread.join(30)
            assert not thread.is_alive()
        assert [] == _alive(pids)

    def test_track_process_rejects_bad_input(self) -> None:
        """track_process names what it was given when it is not a process."""
        with pytest.raises(ts.InvalidArgumentType, match="'12'"):
            track_process("12")  # type: ignore[arg-type]
