"""The supervisor: ``termsafe run -- CMD`` with real process trees, real signals, real SIGKILLs.

Every supervisor here is a real ``termsafe run`` process; the commands are
small Python scripts that report their pids on stdout. The supervisor's
``--verbose`` lines on stderr are the markers the tests wait for.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import filelock
import psutil
import pytest
from _sigkill import PAUSED_BEFORE_THE_PID_STORE

import termsafe as ts
from termsafe._atomic import TEMP_PREFIX
from termsafe._store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0

# The command under supervision: a 3-level tree that tries every way to escape.
#   root      the command; ignores SIGTERM
#   stubborn  its child; ignores SIGTERM
#   detach    its child; calls setsid(), starts "orphan", exits at once
#   orphan    a grandchild whose parent is gone (reparented) in another session;
#             ignores SIGTERM
TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    role = sys.argv[1]
    if role in ("root", "stubborn", "orphan"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if role == "root":
        subprocess.Popen([sys.executable, __file__, "stubborn"])
        subprocess.Popen([sys.executable, __file__, "detach"])
    if role == "detach":
        os.setsid()
        subprocess.Popen([sys.executable, __file__, "orphan"])
    # One write: with PYTHONUNBUFFERED, print() would write each piece apart and
    # the lines of the processes sharing this pipe could interleave.
    os.write(1, f"{role} {os.getpid()}\\n".encode())
    if role == "detach":
        sys.exit(0)
    while True:
        signal.pause()
    """
)
ROLES = ("root", "stubborn", "detach", "orphan")


class Lines:
    """A pipe read line by line in a thread, so tests wait for markers with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._pipe = pipe
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        """The first line (from now) containing ``text``."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"pipe closed before {text!r}; saw {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def close(self) -> None:
        """Close the pipe once its writers are gone (never under a blocked reader)."""
        self._thread.join(WAIT)
        if not self._thread.is_alive():
            self._pipe.close()


class Supervised:
    """A ``termsafe run -v`` process with its stdout and stderr read line by line."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "termsafe", "run", "-v", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TERMSAFE_HOME": str(home)},
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def pids(self, roles: tuple[str, ...]) -> dict[str, int]:
        """The pids the command's processes report, by role."""
        found: dict[str, int] = {}
        while set(found) != set(roles):
            role, pid = self.out.wait_for(" ").split()
            found[role] = int(pid)
        return found

    def wait(self) -> int:
        return self.proc.wait(WAIT)

    def kill_hard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)

    def close(self) -> None:
        self.out.close()
        self.err.close()


@pytest.fixture
def home() -> Iterator[Path]:
    """A TERMSAFE_HOME other users can traverse (0o711) with a short path for sockets."""
    path = Path(tempfile.mkdtemp(prefix="ts-sup-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(home: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(home / "store.sqlite3")
    yield s
    s.close()


@pytest.fixture
def supervise(home: Path) -> Iterator[list[Supervised]]:
    """Starts supervisors; any still running at teardown is SIGKILLed and its tree recovered."""
    started: list[Supervised] = []
    yield started
    for sup in started:
        sup.kill_hard()
    if started:
        cli(home, "recover")  # stops whatever a failed test left of the trees
    for sup in started:
        sup.close()


def start(started: list[Supervised], home: Path, *args: str) -> Supervised:
    sup = Supervised(home, *args)
    started.append(sup)
    return sup


@pytest.fixture
def tree(tmp_path: Path) -> str:
    path = tmp_path / "tree.py"
    path.write_text(TREE)
    return str(path)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "termsafe", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TERMSAFE_HOME": str(home)},
    )


def alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie is dead: it only waits to be reaped)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def events(home: Path, workflow_id: str | None = None) -> list[ts.AuditEvent]:
    report = ts.verify_audit_log(home / "audit.jsonl")
    assert report.ok, report.message
    out = []
    for line in (home / "audit.jsonl").read_text().splitlines():
        event = ts.AuditEvent.from_dict(json.loads(line)["event"])
        if workflow_id is None or event.workflow_id == workflow_id:
            out.append(event)
    return out


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


class TestExit:
    def test_exit_code_and_state_mirror_the_command(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """Exit 0 is completed, exit 3 is failed, and the supervisor exits with the same code."""
        ok = start(supervise, home, "--id", "ok", "--", *py("pass"))
        bad = start(supervise, home, "--id", "bad", "--", *py("raise SystemExit(3)"))
        assert (0, 3) == (ok.wait(), bad.wait())
        states = {r.workflow_id: r.state for r in store.runs()}
        assert {"ok": "completed", "bad": "failed"} == states
        assert [] == store.journal_entries()
        assert ["workflow_started", "process_tree_stopped", "cleanup_started"] == [
            e.type for e in events(home, "ok")
        ][:3]

    def test_missing_command_exits_127(self, home: Path, supervise: list[Supervised]) -> None:
        """A command that does not exist exits 127, like a shell, and says which."""
        sup = start(supervise, home, "--", "/nonexistent/command")
        assert "/nonexistent/command" in sup.err.wait_for("cannot start")
        assert 127 == sup.wait()

    def test_bad_arguments_name_the_value(self, home: Path) -> None:
        """No command, or a bad phase time, is a usage error naming it."""
        no_cmd = cli(home, "run", "--id", "x")
        assert 2 == no_cmd.returncode
        assert "no command" in no_cmd.stderr
        bad_time = cli(home, "run", "--graceful", "-1", "--", "true")
        assert 2 == bad_time.returncode
        assert "'-1'" in bad_time.stderr
        with pytest.raises(ts.InvalidArgumentType, match="'sleep 1'"):
            ts.Supervisor("sleep 1")


class TestKill:
    def test_whole_tree_dies_setsid_and_sigterm_ignorers_included(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised], tree: str
    ) -> None:
        """termsafe kill by the owner leaves 0 of a 3-level escaping tree alive; state killed."""
        sup = start(
            supervise,
            home,
            "--id",
            "tree",
            "--graceful",
            "0.3",
            "--forced",
            "0.3",
            "--",
            sys.executable,
            tree,
            "root",
        )
        sup.err.wait_for("started")
        pids = sup.pids(ROLES)
        assert 2 <= len(alive(list(pids.values()))), "the tree is running"
        result = cli(home, "kill", "tree", "--reason", "tree test")
        assert 0 == result.returncode, result.stderr
        assert 128 + signal.SIGKILL == sup.wait()
        assert [] == alive(list(pids.values()))
        run = store.runs()[0]
        assert ("tree", "killed") == (run.workflow_id, run.state)
        assert [] == store.journal_entries()
        phases = [e.details["phase"] for e in events(home, "tree") if e.type == "phase_changed"]
        assert ["graceful", "forced", "system"] == phases

    def test_sigterm_is_forwarded_and_a_cooperative_child_is_terminated(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """SIGTERM to the supervisor reaches the child; it exits at once: terminated, exit 143."""
        sup = start(supervise, home, "--id", "sleeper", "--", "sleep", "60")
        sup.err.wait_for("started")
        sup.proc.send_signal(signal.SIGTERM)
        assert 128 + signal.SIGTERM == sup.wait()
        assert "terminated" == store.runs()[0].state
        (finished,) = [e for e in events(home, "sleeper") if e.type == "workflow_finished"]
        assert ("terminated", "signal SIGTERM") == (finished.state, finished.reason)

    def test_further_signals_escalate_one_phase_each(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """With 30 s phases, a second SIGTERM goes to forced and a third to SIGKILL at once."""
        cmd = py(
            """
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            while True:
                signal.pause()
            """
        )
        sup = start(
            supervise, home, "--id", "stuck", "--graceful", "30", "--forced", "30", "--", *cmd
        )
        sup.out.wait_for("ready")
        sup.err.wait_for("started")
        sup.proc.send_signal(signal.SIGTERM)
        sup.err.wait_for("graceful:")
        sup.proc.send_signal(signal.SIGTERM)
        sup.err.wait_for("forced:")
        sup.proc.send_signal(signal.SIGINT)
        sup.err.wait_for("system:")
        assert 128 + signal.SIGKILL == sup.wait()
        assert "killed" == store.runs()[0].state

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as uid 65534")
    def test_other_user_is_refused_through_the_supervisors_socket(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """Another OS user's kill is refused (exit 3), audited with uid 65534; the run goes on."""
        sup = start(supervise, home, "--id", "mine", "--", "sleep", "60")
        sup.err.wait_for("started")
        socket_path = store.runs()[0].info["socket"]
        script = textwrap.dedent(
            """
            import os, sys
            import termsafe._cli as cli
            import termsafe._control, termsafe._exceptions
            # Load what the command needs while root's Python install is readable.
            cli._parser().format_help()
            import termsafe._store, termsafe._recovery
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            sys.exit(cli.main(sys.argv[1:]))
            """
        )
        refused = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                "kill",
                "mine",
                "--reason",
                "x",
                "--socket",
                socket_path,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert 3 == refused.returncode, refused.stdout + refused.stderr
        assert "running" == store.runs()[0].state
        assert 0 == cli(home, "kill", "mine", "--reason", "owner").returncode
        assert 128 + signal.SIGTERM == sup.wait()
        requests = [e for e in events(home, "mine") if e.type == "control_request"]
        assert [(65534, "refused"), (0, "allowed")] == [
            (e.details["peer"]["uid"], e.details["decision"]) for e in requests
        ]
        (refusal,) = [e for e in events(home, "mine") if e.type == "kill_refused"]
        assert refusal.actor is not None
        assert "nobody" == refusal.actor["id"]

    def test_orphans_of_a_command_that_exited_are_stopped(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """A command that leaves a detached process behind completes; the orphan is stopped."""
        cmd = py(
            """
            import subprocess
            p = subprocess.Popen(["sleep", "300"], start_new_session=True)
            print("orphan", p.pid, flush=True)
            """
        )
        sup = start(supervise, home, "--id", "leaver", "--forced", "0.5", "--", *cmd)
        orphan = sup.pids(("orphan",))["orphan"]
        assert 0 == sup.wait()
        assert [] == alive([orphan])
        assert "completed" == store.runs()[0].state
        detected = [e for e in events(home, "leaver") if e.type == "orphan_detected"]
        assert [[orphan]] == [e.details["pids"] for e in detected]

    def test_dead_childs_idempotency_claim_is_taken_over(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """A claim held by a child the supervisor killed is no live lease: a new claim retries."""
        cmd = py(
            """
            import os, signal
            from termsafe._store import SQLiteStore
            store = SQLiteStore(os.environ["TERMSAFE_HOME"] + "/store.sqlite3")
            store.idem_claim("pay-1", "fp", lease_seconds=3600, retry_unknown=False)
            print("claimed", flush=True)
            while True:
                signal.pause()
            """
        )
        sup = start(supervise, home, "--id", "payer", "--", *cmd)
        sup.out.wait_for("claimed")
        sup.err.wait_for("started")
        assert 0 == cli(home, "kill", "payer", "--reason", "x").returncode
        sup.wait()
        claim = store.idem_claim("pay-1", "fp", lease_seconds=60, retry_unknown=False)
        assert (False, True, 2) == (claim.replay, claim.retried, claim.epoch)

    def test_dependents_are_killed_when_a_dependency_is(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised]
    ) -> None:
        """Killing run A kills run B that depends on it (across supervisors), once, recorded."""
        a = start(supervise, home, "--id", "A", "--", "sleep", "60")
        b = start(supervise, home, "--id", "B", "--depends-on", "A", "--", "sleep", "60")
        a.err.wait_for("started")
        b.err.wait_for("started")
        assert 0 == cli(home, "kill", "A", "--reason", "upstream broke").returncode
        assert (128 + signal.SIGTERM, 128 + signal.SIGTERM) == (a.wait(), b.wait())
        assert {"A": "terminated", "B": "terminated"} == {
            r.workflow_id: r.state for r in store.runs()
        }
        (ended,) = [e for e in events(home, "B") if e.type == "dependency_ended"]
        assert ("A", "terminated") == (
            ended.details["dependency"],
            ended.details["dependency_state"],
        )
        (finished,) = [e for e in events(home, "B") if e.type == "workflow_finished"]
        assert "dependency 'A' was terminated" == finished.reason

    def test_cleanup_commands_run_after_the_run_ended(
        self, home: Path, supervise: list[Supervised], tmp_path: Path
    ) -> None:
        """--cleanup commands run once the run is final, with its state in the environment."""
        out = tmp_path / "cleanup.txt"
        script = tmp_path / "cleanup.py"
        script.write_text(
            f"import os\nopen({str(out)!r}, 'w').write(os.environ['TERMSAFE_RUN_STATE'])\n"
        )
        job = f"{sys.executable} {script}"
        sup = start(supervise, home, "--cleanup", job, "--", "true")
        assert 0 == sup.wait()
        assert "completed" == out.read_text()


# A supervisor held just before it journals the pid of the command it started:
# what a SIGKILL at that moment leaves. Its store is a real SQLiteStore that,
# before that one write, reports the pid and blocks reading stdin (which stays
# silent) until the test kills it. The command reports its pid and waits.
PAUSED_BEFORE_THE_PID = (
    """
import os, sys
from termsafe._store import SQLiteStore
from termsafe._supervisor import Supervisor

def wanted(payload):
    return True
"""
    + PAUSED_BEFORE_THE_PID_STORE
    + """
command = "import os, signal; os.write(1, b'ready %d\\\\n' % os.getpid()); signal.pause()"
store = PausedBeforeThePid(sys.argv[1])
Supervisor([sys.executable, "-c", command], store=store, control=False).run()
"""
)


class TestSupervisorDies:
    def test_sigkill_mid_cleanup_then_recover_finishes(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised], tmp_path: Path
    ) -> None:
        """A supervisor SIGKILLed in its cleanup leaves a run and a temp that recover settles."""
        target = tmp_path / "report.json"
        target.write_text("old")
        cmd = py(
            f"""
            import signal, termsafe as ts
            with ts.atomic_file({str(target)!r}) as f:
                f.write("new, half written")
                print("writing", flush=True)
                while True:
                    signal.pause()
            """
        )
        sup = start(supervise, home, "--id", "writer", "--", *cmd)
        sup.out.wait_for("writing")
        sup.err.wait_for("started")
        assert 1 == len([n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)])
        # Hold recover's lock: the supervisor's cleanup blocks on it, then dies.
        with filelock.FileLock(str(store.path) + ".recover.lock"):
            sup.proc.send_signal(signal.SIGTERM)
            sup.err.wait_for("cleanup:")
            sup.proc.kill()
            assert -signal.SIGKILL == sup.wait()
        assert "terminating" == store.runs()[0].state
        result = cli(home, "recover", "--json")
        assert 0 == result.returncode, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert [("writer", "its process is gone")] == [
            (r["workflow_id"], r["why"]) for r in report["runs"]
        ]
        assert 1 == len(report["removed"])
        assert "killed" == store.runs()[0].state
        assert [] == [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]
        assert "old" == target.read_text()
        assert [] == store.journal_entries()
        again = json.loads(cli(home, "recover", "--json").stdout)
        assert ([], []) == (again["runs"], again["removed"])

    def test_sigkill_while_running_then_recover_stops_even_escapees(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised], tree: str
    ) -> None:
        """The tree is journaled as it grows: a supervisor SIGKILLed with no kill pending
        leaves nothing recover cannot find, not even a reparented setsid grandchild."""
        sup = start(supervise, home, "--id", "tree", "--", sys.executable, tree, "root")
        sup.err.wait_for("started")
        pids = sup.pids(ROLES)
        while str(pids["orphan"]) not in sup.err.wait_for("journaled"):
            pass
        sup.proc.kill()
        assert -signal.SIGKILL == sup.wait()
        result = cli(home, "recover", "--json")
        assert 0 == result.returncode, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert ["its supervisor is gone"] == [r["why"] for r in report["runs"]]
        assert [] == alive(list(pids.values()))
        assert [] == store.journal_entries()

    def test_sigkill_before_the_commands_pid_is_journaled_then_recover_stops_it(
        self, home: Path, store: SQLiteStore
    ) -> None:
        """A supervisor SIGKILLed after starting its command, before journaling the pid: recover
        finds the command by the token in its environment and stops it."""
        sup = subprocess.Popen(
            [sys.executable, "-c", PAUSED_BEFORE_THE_PID, str(store.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TERMSAFE_HOME": str(home)},
        )
        assert sup.stdout is not None
        command: psutil.Process | None = None
        try:
            said: dict[str, int] = {}
            while len(said) < 2:  # the supervisor's line and the command's, in any order
                line = sup.stdout.readline()
                assert line, f"output ended after {said}"
                word, pid = line.split()
                said[word] = int(pid)
                if command is None:
                    command = psutil.Process(int(pid))
            assert said["recording"] == said["ready"]
            assert command is not None
            sup.kill()  # SIGKILL, after Popen, before the pid is journaled
            assert -signal.SIGKILL == sup.wait(WAIT)
            report = ts.recover(store, kill_timeout=0.2)
            assert (command.pid,) == report.processes_killed
            assert [] == alive([command.pid])
            assert report.clean, report.left
            assert [] == store.journal_entries()
        finally:
            if sup.poll() is None:
                sup.kill()
            sup.wait(WAIT)
            assert sup.stdin is not None
            sup.stdin.close()
            if command is not None:
                with contextlib.suppress(psutil.Error):
                    command.kill()  # psutil checks the start time: never a reused pid
            sup.stdout.close()  # the command, its last writer, is gone

    def test_sigkill_mid_ladder_then_recover_stops_the_tree(
        self, home: Path, store: SQLiteStore, supervise: list[Supervised], tree: str
    ) -> None:
        """A supervisor SIGKILLed while its tree ignores SIGTERM: recover kills every process."""
        sup = start(
            supervise, home, "--id", "tree", "--graceful", "30", "--", sys.executable, tree, "root"
        )
        sup.err.wait_for("started")
        pids = sup.pids(ROLES)
        sup.proc.send_signal(signal.SIGTERM)
        sup.err.wait_for("graceful:")
        sup.proc.kill()
        proc = sup.proc
        assert -signal.SIGKILL == proc.wait(WAIT)
        assert 2 <= len(alive(list(pids.values()))), "SIGTERM-ignoring processes survive"
        result = cli(home, "recover", "--json")
        assert 0 == result.returncode, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert ["its supervisor is gone"] == [r["why"] for r in report["runs"]]
        assert [] == alive(list(pids.values()))
        assert "killed" == store.runs()[0].state
        assert [] == store.journal_entries()
