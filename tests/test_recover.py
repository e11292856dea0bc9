"""recover() and ``termsafe recover``: what dead processes left, settled by a later one.

Every leftover is made by a real process that really dies by SIGKILL; the
judges are tools nobody here wrote (``json.loads`` on the files written,
``os.listdir``, psutil for processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import termsafe as ts
from termsafe._atomic import TEMP_PREFIX
from termsafe._control import socket_path_for
from termsafe._procs import current_identity
from termsafe._store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ts-rec-", dir="/tmp"))
    monkeypatch.setenv("TERMSAFE_HOME", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(home: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(home / "store.sqlite3")
    yield s
    ts.recover(s, kill_timeout=0.2)  # whatever a failed test left running
    s.close()


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TERMSAFE_HOME": str(home)}


def python(code: str, home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env(home),
    )


def dies_by_sigkill(code: str, home: Path, *args: str) -> list[str]:
    """Run ``code``, which ends by SIGKILLing itself; return what it printed."""
    proc = python(code, home, *args)
    out, _ = proc.communicate(timeout=60)
    assert -signal.SIGKILL == proc.returncode, out
    return out.splitlines()


def wait_dead(pid: int) -> None:
    """Wait (bounded) until ``pid`` is gone or a zombie: SIGKILL is delivered asynchronously."""
    try:
        proc = psutil.Process(pid)
        for _ in range(3000):
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
            psutil.wait_procs([proc], timeout=0.01)
    except psutil.NoSuchProcess:
        return
    raise AssertionError(f"pid {pid} still alive")


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "termsafe", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env(home),
    )


REGISTER_AND_DIE = """
import os, signal, sys
from termsafe._store import SQLiteStore
store = SQLiteStore(os.environ["TERMSAFE_HOME"] + "/store.sqlite3")
for i in range(int(sys.argv[1])):
    store.run_register(f"dead-{i}", f"wf-{i}", owner="alice", team=None, state="running", info={})
os.kill(os.getpid(), signal.SIGKILL)
"""


class TestDeadRuns:
    def test_runs_of_a_dead_process_are_marked_killed_once(
        self, home: Path, store: SQLiteStore
    ) -> None:
        """A dead process's runs are marked killed and audited, live ones left; again: no-op."""
        dies_by_sigkill(REGISTER_AND_DIE, home, "2")
        store.run_register("mine", "live-wf", owner="me", team=None, state="running")
        sink = ts.MemorySink()
        report = ts.recover(store, sink=sink)
        assert ["dead-0", "dead-1"] == sorted(r.run_id for r in report.runs)
        assert {"its process is gone"} == {r.why for r in report.runs}
        states = {r.run_id: r.state for r in store.runs()}
        assert {"dead-0": "killed", "dead-1": "killed", "mine": "running"} == states
        finished = [e for e in sink.events if e.type == "workflow_finished"]
        assert [("killed", True)] * 2 == [(e.state, e.details["recovered"]) for e in finished]
        assert report.clean
        assert () == ts.recover(store).runs

    def test_concurrent_recovers_settle_each_run_once(self, home: Path, store: SQLiteStore) -> None:
        """Three `termsafe recover` processes at once: every dead run is reported exactly once."""
        dies_by_sigkill(REGISTER_AND_DIE, home, "60")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "termsafe", "recover", "--json"],
                stdout=subprocess.PIPE,
                text=True,
                env=env(home),
            )
            for _ in range(3)
        ]
        reported: list[str] = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert 0 == proc.returncode, out
            reported.extend(r["run_id"] for r in json.loads(out)["runs"])
        assert sorted(f"dead-{i}" for i in range(60)) == sorted(reported)
        assert {"killed"} == {r.state for r in store.runs()}

    def test_report_prints_and_serialises(self, home: Path, store: SQLiteStore) -> None:
        """The report reads as sentences and as JSON; exit 0 when clean."""
        dies_by_sigkill(REGISTER_AND_DIE, home, "1")
        result = cli(home, "recover")
        assert 0 == result.returncode, result.stderr
        assert "run dead-0 of 'wf-0'" in result.stdout
        assert "marked killed: its process is gone" in result.stdout
        assert result.stdout.rstrip().endswith("clean")
        assert json.loads(cli(home, "recover", "--json").stdout)["clean"] is True


# A process tree journaled by a process that then dies:
#   leader    spawned with termsafe.spawn (journaled, leads a session); ignores SIGTERM
#   stubborn  its child, same session; ignores SIGTERM
#   hidden    its child that called setsid(); ignores SIGTERM
TREE = """
import os, signal, subprocess, sys
role = sys.argv[1]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if role == "leader":
    subprocess.Popen([sys.executable, __file__, "stubborn"])
    subprocess.Popen([sys.executable, __file__, "hidden"])
if role == "hidden":
    os.setsid()
# One write: with PYTHONUNBUFFERED, print() would write each piece apart and
# the lines of the processes sharing this pipe could interleave.
os.write(1, f"{role} {os.getpid()}\\n".encode())
while True:
    signal.pause()
"""

OWNER = """
import os, signal, subprocess, sys
from termsafe._children import spawn
leader = spawn([sys.executable, sys.argv[1], "leader"], stdout=subprocess.PIPE, text=True)
for _ in range(3):
    print(leader.stdout.readline().strip(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


class TestOrphans:
    @pytest.fixture
    def tree(self, tmp_path: Path) -> str:
        path = tmp_path / "tree.py"
        path.write_text(textwrap.dedent(TREE))
        return str(path)

    def _orphaned_tree(self, home: Path, tree: str) -> dict[str, int]:
        lines = dies_by_sigkill(OWNER, home, tree)
        return {role: int(pid) for role, pid in (line.split() for line in lines)}

    def test_tree_journaled_by_a_dead_owner_is_stopped(
        self, home: Path, store: SQLiteStore, tree: str
    ) -> None:
        """Every process of a dead owner's journaled tree is stopped, setsid and SIGTERM-proof."""
        pids = self._orphaned_tree(home, tree)
        assert 3 == len(alive(list(pids.values())))
        report = ts.recover(store, kill_timeout=0.2)
        assert [] == alive(list(pids.values()))
        assert set(pids.values()) == set(report.processes_killed)
        assert [] == store.journal_entries("child_process")
        assert report.clean

    def test_session_of_a_dead_leader_is_found(
        self, home: Path, store: SQLiteStore, tree: str
    ) -> None:
        """When the journaled process itself is gone, members of its session are still stopped."""
        pids = self._orphaned_tree(home, tree)
        try:
            os.kill(pids["leader"], signal.SIGKILL)
            wait_dead(pids["leader"])
            ts.recover(store, kill_timeout=0.2)
            assert [] == alive([pids["stubborn"]])
        finally:
            # "hidden" left the session and lost its parent: only a supervisor
            # (a subreaper) can still find it. Stop it here.
            os.kill(pids["hidden"], signal.SIGKILL)

    def test_reused_pid_is_not_touched(self, store: SQLiteStore) -> None:
        """An entry whose start time does not match the live process with that pid kills nothing."""
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
        try:
            # A dead owner journaled "pid N, started at 1.0": N is now someone else.
            script = (
                "import os, signal\n"
                "from termsafe._store import SQLiteStore\n"
                f"s = SQLiteStore({str(store.path)!r})\n"
                f"s.journal_add('child_process', {{'pid': {child.pid}, 'start_time': 1.0}})\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n"
            )
            subprocess.run([sys.executable, "-c", script], check=False, env=env(store.path.parent))
            report = ts.recover(store, kill_timeout=0.2)
            assert child.poll() is None
            assert () == report.processes_killed
            assert [] == store.journal_entries("child_process")
        finally:
            child.kill()
            child.communicate()

    def test_stale_control_sockets_are_removed(self, home: Path, store: SQLiteStore) -> None:
        """Socket files named for dead processes go; this process's stays."""
        control = home / "control"
        control.mkdir()
        dead = control / "1-100.sock"  # pid 1 never started at t=1s: a dead identity
        dead.touch()
        mine = socket_path_for(home, current_identity())
        mine.touch()
        report = ts.recover(store)
        assert (str(dead),) == report.sockets_removed
        assert mine.exists()


# A parent caught inside spawn(), after the entry that names its child by a token
# and before the entry gets the child's pid. preexec_fn (a Popen argument spawn
# passes on) runs in the forked child before its exec, while the parent waits
# inside Popen; it reports and waits for "g" on the FIFO. The child, once
# exec'd, reports "ready" and waits for a signal.
SPAWN_IN_WINDOW = """
import os, sys
from termsafe._children import spawn

def hold():
    os.write(1, b"forked %d\\n" % os.getpid())
    with open(sys.argv[1], "rb") as go:
        go.read(1)

child = "import os, signal; os.write(1, b'ready\\\\n'); signal.pause()"
spawn([sys.executable, "-c", child], preexec_fn=hold)
os.write(1, b"recorded\\n")
"""


@contextlib.contextmanager
def spawn_in_window(
    home: Path, store: SQLiteStore
) -> Iterator[tuple[subprocess.Popen[str], psutil.Process, sqlite3.Connection]]:
    """A parent inside spawn() whose child has exec'd and whose pid it cannot journal.

    The store's write lock, taken while the child waits to exec, keeps the
    parent from recording the pid for as long as the test holds it.

    Yields:
        The parent, the child and the connection holding the lock.
    """
    go = home / "go"
    os.mkfifo(go)
    # Read-write: never blocks, and keeps the FIFO open until the child has read.
    fifo = os.open(go, os.O_RDWR)
    parent = python(SPAWN_IN_WINDOW, home, str(go))
    assert parent.stdout is not None
    lock = sqlite3.connect(store.path, isolation_level=None, timeout=WAIT)
    child: psutil.Process | None = None
    forked: int | None = None
    try:
        word, pid = parent.stdout.readline().split()
        assert "forked" == word
        forked = int(pid)
        lock.execute("BEGIN IMMEDIATE")  # no journal write gets through from here on
        os.write(fifo, b"g")
        assert "ready\n" == parent.stdout.readline()
        child = psutil.Process(forked)
        yield parent, child, lock
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(WAIT)
        parent.stdout.close()
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        os.close(fifo)
        if child is None and forked is not None:
            with contextlib.suppress(psutil.Error):
                child = psutil.Process(forked)  # still waiting to exec
        if child is not None:
            with contextlib.suppress(psutil.Error):
                child.kill()  # psutil checks the start time: never a reused pid


class TestSpawnWindow:
    @pytest.mark.parametrize("via", ["api", "cli"])
    def test_child_of_a_parent_killed_before_its_pid_was_journaled_is_stopped(
        self, home: Path, store: SQLiteStore, via: str
    ) -> None:
        """A child whose parent died before journaling its pid is found by its token and stopped."""
        with spawn_in_window(home, store) as (parent, child, lock):
            [entry] = store.journal_entries("child_process")
            token = entry.payload["token"]
            assert {"token": token} == entry.payload
            assert parent.pid == entry.owner.pid
            assert token == child.environ()["TERMSAFE_SPAWN_TOKEN"]
            parent.kill()  # SIGKILL, inside spawn(), before the pid is recorded
            assert -signal.SIGKILL == parent.wait(WAIT)
            lock.execute("ROLLBACK")
            assert [{"token": token}] == [e.payload for e in store.journal_entries()]
            if via == "api":
                report = ts.recover(store, kill_timeout=0.2).as_dict()
            else:
                result = cli(home, "recover", "--json", "--kill-timeout", "0.2")
                assert 0 == result.returncode, result.stderr
                report = json.loads(result.stdout)
            assert [child.pid] == report["processes_killed"]
            assert [] == alive([child.pid])
            assert [] == store.journal_entries()
            assert report["clean"] is True

    def test_entry_of_a_live_parent_is_left_alone(self, home: Path, store: SQLiteStore) -> None:
        """While the parent lives, recover leaves its child and entry; then the pid is recorded."""
        with spawn_in_window(home, store) as (parent, child, lock):
            before = store.journal_entries("child_process")
            report = ts.recover(store, kill_timeout=0.2)
            assert () == report.processes_killed
            assert [child.pid] == alive([child.pid])
            assert before == store.journal_entries("child_process")
            assert report.clean
            lock.execute("ROLLBACK")  # the parent records the pid now
            assert parent.stdout is not None
            assert "recorded\n" == parent.stdout.readline()
            assert 0 == parent.wait(WAIT)
            [entry] = store.journal_entries("child_process")
            expected = {
                "pid": child.pid,
                "start_time": child.create_time(),
                "token": before[0].payload["token"],
            }
            assert (before[0].id, expected) == (entry.id, entry.payload)

    def test_token_nobody_carries_is_dropped(self, home: Path, store: SQLiteStore) -> None:
        """An entry of a dead parent whose child is already gone is settled; nothing is stopped."""
        script = (
            "from termsafe._store import SQLiteStore\n"
            f"s = SQLiteStore({str(store.path)!r})\n"
            f"s.journal_add('child_process', {{'token': {'0' * 32!r}}})\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True, env=env(home), timeout=WAIT)
        report = ts.recover(store, kill_timeout=0.2)
        assert () == report.processes_killed
        assert [] == store.journal_entries()
        assert report.clean


# The chaos worker: imports termsafe once, then forks one writer per trial and
# SIGKILLs it after a seeded random delay (no termsafe thread runs in the worker).
# The delay runs from the writer's first finished write, so on a loaded machine
# too the kill lands inside its write loop, not before it has started.
WORKER = """
import json, os, random, select, signal, sys, time
import termsafe as ts
import termsafe._procs, termsafe._store  # what atomic_file imports on first use
ts.atomic_file, ts.recover  # load the lazily imported modules before forking

seed, trials, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
for trial in range(trials):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            i = 0
            while True:
                target = os.path.join(folder, f"file-{i % 4}.json")
                with ts.atomic_file(target) as f:
                    f.write(json.dumps({"trial": trial, "i": i, "pad": "x" * 4096}))
                if i == 0:
                    os.write(w, b"w")
                i += 1
        finally:
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    if not (ready and os.read(r, 1) == b"w"):
        sys.exit(f"writer {trial} wrote nothing in 60 s")
    os.close(r)
    time.sleep(rng.uniform(0.0, 0.04))  # the kill schedule, not synchronisation
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print("done", flush=True)
"""


class TestAtomicWritersKilled:
    def test_recover_removes_every_temp_of_sigkilled_writers(
        self, home: Path, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """40 writers SIGKILLed at random points: recover leaves no temp and every file whole."""
        seed = random.randrange(2**32)
        folder = tmp_path / "out"
        folder.mkdir()
        for n in range(4):
            (folder / f"file-{n}.json").write_text(json.dumps({"trial": -1}))
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(WORKER), str(seed), "40", str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env(home),
        )
        assert "done\n" == proc.stdout, f"seed {seed}: {proc.stderr}"
        temps = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
        assert temps, f"seed {seed}: no kill landed mid-write, the test tested nothing"
        report = ts.recover(store)
        assert [] == [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)], f"seed {seed}"
        for n in range(4):
            json.loads((folder / f"file-{n}.json").read_text())  # whole: old or new, never torn
        assert [] == store.journal_entries("temp_file"), f"seed {seed}"
        assert report.clean, f"seed {seed}: {report}"
        assert len(temps) <= len(report.sweep.removed), f"seed {seed}"


class TestResume:
    def test_restarted_workflow_resumes_and_replays_recorded_calls(
        self, home: Path, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """After a SIGKILL, the same workflow id gets its last checkpoint and no call runs twice."""
        effects = tmp_path / "effects.log"
        first = f"""
        import os, signal, termsafe as ts
        from termsafe._store import SQLiteStore
        term = ts.Terminator(sink=ts.MemorySink(), store=SQLiteStore({str(store.path)!r}))
        with term.workflow("nightly") as wf:
            assert wf.last_checkpoint is None
            with ts.idempotent_call("charge-1", request={{"amount": 5}}) as call:
                call.run(lambda: open({str(effects)!r}, "a").write("charged\\n"))
            ts.checkpoint({{"step": 2}})
            print("checkpointed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
        assert ["checkpointed"] == dies_by_sigkill(textwrap.dedent(first), home)
        with ts.Terminator(sink=ts.MemorySink(), store=store) as term:
            with term.workflow("nightly") as wf:
                assert {"step": 2} == wf.last_checkpoint
                with ts.idempotent_call("charge-1", request={"amount": 5}) as call:
                    result = call.run(lambda: effects.open("a").write("charged\n"))
                assert call.replayed
                assert 8 == result
            assert ["charged"] == effects.read_text().splitlines()
            assert store.load_checkpoint("nightly") is None  # completed: the next run starts afresh
            with term.workflow("nightly") as wf:
                assert wf.last_checkpoint is None
