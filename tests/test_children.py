"""Child process trees: spawned, journaled, and stopped whole with the workflow."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _kills import in_taken_over_workflow
from conftest import WAIT, Audit, Jobs, TermFactory

import termsafe as ts
from termsafe._children import spawn, track_process
from termsafe._procs import _await_env, _scan_env, _send, kill_tree, processes_with_env
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


# Started with an empty environment: waits for a byte on stdin, then execs
# Python again with only the token set (what a child inside its exec looks
# like from outside: a new process whose environment reads empty, then set).
EXEC_LATER = (
    "import os, sys\n"
    "sys.stdin.buffer.read(1)\n"
    "code = 'import sys; sys.stdin.read()'\n"
    "os.execve(sys.executable, [sys.executable, '-c', code], {'TS_TEST_TOKEN': sys.argv[1]})\n"
)


class TestProcessesWithEnv:
    def _start(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()", *args],
            stdin=subprocess.PIPE,
            env=env,
        )

    def _end(self, *procs: subprocess.Popen[bytes]) -> None:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(30)

    def test_finds_the_carriers_of_a_value_and_no_other(self) -> None:
        """Only the processes whose environment holds one of the values are found."""
        a = self._start({**os.environ, "TS_TEST_TOKEN": "a"})
        b = self._start({**os.environ, "TS_TEST_TOKEN": "b"})
        try:
            found = processes_with_env("TS_TEST_TOKEN", ["a", "zz"])
        finally:
            self._end(a, b)
        assert {"a": [a.pid]} == {k: [p.pid for p in v] for k, v in found.items()}

    def test_process_inside_its_exec_is_read_again(self) -> None:
        """A young process whose environment reads empty is read again until it is set."""
        proc = subprocess.Popen(
            [sys.executable, "-c", EXEC_LATER, "tok"], stdin=subprocess.PIPE, env={}
        )
        assert proc.stdin is not None
        try:
            found: dict[str, list[psutil.Process]] = {}
            wanted = frozenset(["tok"])
            unread = _scan_env("TS_TEST_TOKEN", wanted, time.time() - 5.0, found)
            assert ({}, True) == (found, proc.pid in [p.pid for p in unread])
            proc.stdin.write(b"g")
            proc.stdin.flush()
            _await_env("TS_TEST_TOKEN", wanted, unread, found, time.monotonic() + 30.0)
            assert [proc.pid] == [p.pid for p in found["tok"]]
        finally:
            self._end(proc)

    def test_process_older_than_born_after_is_read_once(self) -> None:
        """An empty environment of a process started before born_after is not waited for."""
        proc = self._start({})
        try:
            unread = _scan_env("TS_TEST_TOKEN", frozenset(["tok"]), time.time() + 60.0, {})
        finally:
            self._end(proc)
        assert proc.pid not in [p.pid for p in unread]


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

    def test_child_started_after_the_terminator_took_over_is_stopped(
        self, store: SQLiteStore
    ) -> None:
        """A child whose start outlasted the kill ladder is stopped by spawn, which raises."""
        run = subprocess.run(
            [sys.executable, "-c", TAKEN_OVER, str(store.path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 0 == run.returncode, run.stderr
        report = json.loads(run.stdout)
        try:
            assert ("killed", ["ForcedTermination"]) == (report["state"], report["outcome"])
            assert [] == _alive([report["child"]])
            assert [] == report["journal"]
        finally:
            if _alive([report["child"]]):
                os.kill(report["child"], signal.SIGKILL)

    def test_process_tracked_after_the_terminator_took_over_is_stopped(
        self, store: SQLiteStore, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """track_process after the system phase swept the hooks SIGKILLs the tree and raises."""
        sink = ts.MemorySink()
        term = make_term(ts.Phases(0.05, 0.05), sink=sink, store=store)
        child = subprocess.Popen(
            [sys.executable, "-c", IGNORES_SIGTERM],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert child.stdout is not None
            assert "ready\n" == child.stdout.readline()
            # At once: not after stop_timeout, which a SIGTERM-proof child would take.
            wf, error = in_taken_over_workflow(
                term, jobs, lambda: track_process(child, stop_timeout=60.0)
            )
            assert isinstance(error, ts.ForcedTermination), error
            assert child.returncode is not None, "stopped and reaped by track_process"
            assert [] == _alive([child.pid])
            assert 0 == wf.pending_hooks
            assert [] == store.journal_entries()
            [stopped] = Audit(term, sink).of("process_tree_stopped", "w")
            assert child.pid == stopped.details["pid"]
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(WAIT)
            assert child.stdout is not None
            child.stdout.close()


IGNORES_SIGTERM = (
    "import os, signal\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "os.write(1, b'ready\\n')\n"
    "signal.pause()\n"
)


TAKEN_OVER = """
import json, os, subprocess, sys, threading
import termsafe as ts
from termsafe._children import spawn
from termsafe._store import SQLiteStore

store = SQLiteStore(sys.argv[1])
term = ts.Terminator(phases=ts.Phases(0.05, 0.05), sink=ts.MemorySink(), store=store)
forked_r, forked_w = os.pipe()
go_r, go_w = os.pipe()

def hold():
    os.write(forked_w, b"%d\\n" % os.getpid())
    os.read(go_r, 1)

outcome = []

def body():
    with term.workflow("w"):
        try:
            spawn(
                [sys.executable, "-c", "import signal; signal.pause()"],
                preexec_fn=hold,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(type(exc).__name__)
            raise

thread = threading.Thread(target=body)
thread.start()
child = int(os.read(forked_r, 64))
state = term.kill("w", by=ts.Principal("root", roles=["admin"])).wait(30)
os.write(go_w, b"g")
thread.join(30)
journal = [e.payload for e in store.journal_entries()]
print(json.dumps({"child": child, "state": state.value, "outcome": outcome, "journal": journal}))
"""


# Prints the spawn token and FOO from its environment, and how many times the
# token's name is in the environment it was started with; then waits for stdin.
SHOW_ENV = (
    "import os, sys\n"
    "with open('/proc/self/environ', 'rb') as f:\n"
    "    names = f.read().count(b'TERMSAFE_SPAWN_TOKEN=')\n"
    "print(os.environ['TERMSAFE_SPAWN_TOKEN'], os.environ.get('FOO'), names, flush=True)\n"
    "sys.stdin.read()\n"
)


class TestSpawnJournal:
    def _spawn(self, store: SQLiteStore, **kwargs: Any) -> tuple[subprocess.Popen[str], str]:
        popen = spawn(
            [sys.executable, "-c", SHOW_ENV],
            store=store,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        assert popen.stdout is not None
        return popen, popen.stdout.readline()

    def _stop(self, popen: subprocess.Popen[str]) -> None:
        popen.termsafe.stop(timeout=1.0)  # type: ignore[attr-defined]
        for stream in (popen.stdin, popen.stdout):
            assert stream is not None
            stream.close()

    def test_entry_holds_pid_start_time_and_the_childs_token(self, store: SQLiteStore) -> None:
        """A spawned child's one entry names its pid, its start time and its environment's token."""
        popen, line = self._spawn(store)
        try:
            token = line.split()[0]
            [entry] = store.journal_entries()
            expected = {
                "pid": popen.pid,
                "start_time": psutil.Process(popen.pid).create_time(),
                "token": token,
            }
            assert ("child_process", expected) == (entry.kind, entry.payload)
            assert 32 == len(token)
        finally:
            self._stop(popen)
        assert [] == store.journal_entries()

    def test_tokens_differ_between_children(self, store: SQLiteStore) -> None:
        """Each spawned child gets a token of its own."""
        first, line1 = self._spawn(store)
        try:
            second, line2 = self._spawn(store)
            self._stop(second)
        finally:
            self._stop(first)
        assert line1.split()[0] != line2.split()[0]

    def test_given_env_is_kept_and_left_unchanged(self, store: SQLiteStore) -> None:
        """An env given to spawn reaches the child, token added; the caller's dict is unchanged."""
        given = {**os.environ, "FOO": "bar"}
        popen, line = self._spawn(store, env=given)
        try:
            assert "bar" == line.split()[1]
            assert "TERMSAFE_SPAWN_TOKEN" not in given
        finally:
            self._stop(popen)

    @pytest.mark.parametrize("given", [None, "str", "bytes"])
    def test_inherited_token_is_replaced(
        self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, given: str | None
    ) -> None:
        """A process itself spawned passes its child one token, the child's own, in any env."""
        monkeypatch.setenv("TERMSAFE_SPAWN_TOKEN", "outer")
        env: dict[Any, Any] | None = None
        if given == "str":
            env = dict(os.environ)
        elif given == "bytes":
            env = dict(os.environb)
        popen, line = self._spawn(store, env=env)
        try:
            token, _, names = line.split()
            [entry] = store.journal_entries()
            assert (entry.payload["token"], "1") == (token, names)
        finally:
            self._stop(popen)

    def test_program_that_cannot_start_leaves_no_entry(
        self, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """When Popen cannot start the program, its entry is gone too."""
        with pytest.raises(FileNotFoundError):
            spawn([str(tmp_path / "no-such-program")], store=store)
        assert [] == store.journal_entries()
