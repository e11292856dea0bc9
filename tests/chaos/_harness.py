"""What the chaos tests share: seeds and the tally, the worker driver, the partitioning
counting server, and what every trial ends with (recover, then the judges).

The judges are tools nobody here wrote (``git fsck``, ``PRAGMA integrity_check``,
``zipfile.testzip()``, ``tarfile``, ``verify_audit_log``, psutil) and the judges
of the per-operation kill tests, imported from their modules rather than
copied: ``test_atomic`` (files and archives), ``test_transaction`` (SQLite),
``test_git`` (repositories), ``test_idempotency`` (the counting server).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import psutil
import test_atomic
import test_git
import test_idempotency
import test_transaction
from conftest import WAIT

import termsafe as ts
from chaos._workload import charge
from termsafe._procs import identity_alive
from termsafe._store import SQLiteStore

JSON = dict[str, Any]

#: The ``tests`` folder: on the workers' ``sys.path``, as it is on pytest's.
TESTS = Path(__file__).resolve().parents[1]

#: How long whatever a killed workflow left running may take to end on its own.
LEFTOVER_DEADLINE = 10.0


# -- seeds, violations and the tally ------------------------------------------------------------


class Tally:
    """What the chaos tests of this run really did, summed from the trials' results."""

    def __init__(self) -> None:
        self.sigkill = 0
        self.sigterm = 0
        self.storage_faults = 0
        self.partitions = 0
        self.supervisor_crashes = 0
        self.violations = 0
        self.trials = 0
        self.tests = 0
        self.seconds = 0.0
        self.base_seed: int | None = None
        self.runs = 1
        self.known_bugs = 0
        #: One line per test: what its trials saw (shown with ``-v``).
        self.notes: list[str] = []

    @property
    def kills(self) -> int:
        """Signals that ended (or began ending) a live process: SIGKILL, SIGTERM, supervisor."""
        return self.sigkill + self.sigterm + self.supervisor_crashes

    def line(self) -> str:
        """The summary line."""
        return (
            f"termsafe chaos: {self.kills} kills injected (SIGKILL {self.sigkill}, "
            f"SIGTERM {self.sigterm}, storage faults {self.storage_faults}, "
            f"partitions {self.partitions}, supervisor crashes {self.supervisor_crashes}), "
            f"violations {self.violations}"
        )

    def details(self) -> str:
        """The second line: how to get the same run again (and known bugs hit, if any)."""
        known = (
            f"; known bugs hit {self.known_bugs} (tests/chaos/test_chaos_regressions.py)"
            if self.known_bugs
            else ""
        )
        return (
            f"termsafe chaos: {self.trials} trials in {self.tests} tests, {self.seconds:.1f} s; "
            f"seed {self.base_seed} (reproduce with --chaos-seed={self.base_seed} "
            f"--chaos-runs={self.runs}){known}"
        )


class ChaosRun:
    """One chaos test's seed, trial count, violations and counts.

    The test's seed is derived from the run's base seed (``--chaos-seed``, or
    the random one the termsafe plugin shows in the report header) and the
    test's id, and each trial's plan from the test's seed and the trial's
    number: a trial's plan is the same whatever ``--chaos-runs`` is. Kill
    *timing* follows the machine (delays are fractions of measured durations),
    so a seed replays the same plan, not the same instant.
    """

    def __init__(self, base_seed: int, runs: int, nodeid: str, tally: Tally) -> None:
        self.base_seed = base_seed
        self.runs = runs
        self.nodeid = nodeid
        self.tally = tally
        self.seed = zlib.crc32(f"{base_seed}:{nodeid}".encode())
        self.violations: list[str] = []
        self.trials = 0
        self.stats: dict[str, int] = {}
        #: This test's share of the tally's faults (``count()``).
        self.counts: dict[str, int] = {}
        self._started = time.monotonic()
        self._recorded = False

    def size(self, base: int) -> int:
        """How many trials: ``base`` per ``--chaos-runs``."""
        return base * self.runs

    def rng(self, trial: int) -> random.Random:
        """The random plan of trial ``trial``."""
        return random.Random(f"{self.seed}:{trial}")

    def where(self, trial: int) -> str:
        return (
            f"chaos seed {self.base_seed}, {self.nodeid} trial {trial} "
            f"(reproduce: python -m pytest '{self.nodeid}' --chaos-seed={self.base_seed} "
            f"--chaos-runs={self.runs})"
        )

    def violation(self, trial: int, message: str) -> None:
        """Record a broken invariant; the test fails at its end."""
        self.violations.append(f"{self.where(trial)}: {message}")

    def note(self, stat: str, n: int = 1) -> None:
        """Count something that happened (shown when the test fails)."""
        self.stats[stat] = self.stats.get(stat, 0) + n

    def count(self, what: str) -> None:
        """Count a fault that really happened: ``storage_faults``, ``partitions``,
        ``supervisor_crashes`` or ``known_bugs`` (this test's and the run's tally)."""
        setattr(self.tally, what, getattr(self.tally, what) + 1)
        self.counts[what] = self.counts.get(what, 0) + 1

    def count_signals(self, report: JSON) -> None:
        """Count the signals a worker sent to a live workflow process."""
        for sent in report.get("sent", ()):
            if sent["signal"] == "SIGKILL":
                self.tally.sigkill += 1
            else:
                self.tally.sigterm += 1
            self.note(sent["signal"])

    def record(self) -> None:
        """Add this test's trials and violations to the run's tally (once)."""
        if self._recorded:
            return
        self._recorded = True
        self.tally.tests += 1
        self.tally.trials += self.trials
        self.tally.violations += len(self.violations)
        seconds = time.monotonic() - self._started
        self.tally.seconds += seconds
        seen = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()))
        self.tally.notes.append(f"{self.nodeid}: {self.trials} trials, {seconds:.1f} s; {seen}")

    def finish(self) -> None:
        """Fail if any invariant broke.

        Raises:
            AssertionError: naming every violation with its seed and trial.
        """
        self.record()
        shown = "\n".join(self.violations[:20])
        more = len(self.violations) - 20
        assert [] == self.violations, (
            f"{len(self.violations)} violation(s) in {self.trials} trials "
            f"(seen: {self.stats}):\n{shown}" + (f"\n... and {more} more" if more > 0 else "")
        )


# -- the worker ---------------------------------------------------------------------------------


class WorkerDied(AssertionError):
    """The worker process ended or stopped answering."""


def worker_env(tmp_path: Path, home: Path) -> dict[str, str]:
    """A hermetic environment for workers and the commands they run."""
    env = {**os.environ, **test_git._git_env(tmp_path)}
    env["TERMSAFE_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


class Worker:
    """A ``chaos._workload`` worker: one JSON command per line, one JSON answer per line.

    Args:
        tmp_path: Where its stderr goes.
        env: Its environment.
        prefix: A command to run it under (``unshare ...``).
        pass_fds: Descriptors it inherits.

    Raises:
        WorkerDied: it did not say it is ready.
    """

    def __init__(
        self,
        tmp_path: Path,
        env: dict[str, str],
        *,
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        name: str = "worker",
    ) -> None:
        self.err_path = tmp_path / f"{name}.stderr"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "chaos._workload"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        self._buf = b""
        try:
            self.ready = self._read(WAIT * 6)
        except WorkerDied:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The worker's pid (the ``unshare`` prefix execs into it)."""
        return int(self.ready["pid"])

    def ask(self, command: str, timeout: float = 170.0, **spec: Any) -> JSON:
        """Send one command and return the answer.

        Raises:
            WorkerDied: no answer within ``timeout``.
        """
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"command": command, **spec}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerDied(f"the worker is gone:\n{self.stderr_tail()}") from None
        return self._read(timeout)

    def _read(self, timeout: float) -> JSON:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerDied(f"no answer within {timeout:g} s:\n{self.stderr_tail()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise WorkerDied(f"the worker exited:\n{self.stderr_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer: JSON = json.loads(line)
        return answer

    def descendants(self) -> list[psutil.Process]:
        """The worker's live descendants: what killed workflow processes left it."""
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [p for p in procs if _running(p)]

    def stderr_tail(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        """End the worker (it stops and reaps what it inherited); kill it all if it hangs."""
        stranded = self.descendants() if self.proc.poll() is None else []
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(WAIT * 3)
        except subprocess.TimeoutExpired:
            for proc in stranded:
                try:
                    proc.kill()
                except psutil.Error:
                    continue
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def running(pid: int, start_time: float | None) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` still runs (not a zombie)."""
    try:
        proc = psutil.Process(pid)
        if start_time is not None and abs(proc.create_time() - start_time) > 0.01:
            return False
    except psutil.Error:
        return False
    return _running(proc)


# -- the counting server, with partitions ----------------------------------------------------------

#: What the server can do to the first request under a key instead of answering it.
PARTITIONS = (
    "drop_before",  # close the connection; no side effect
    "reset_before",  # reset the connection (RST); no side effect
    "stall_before",  # hold the request (no side effect) until released, then drop it
    "drop_after",  # perform the side effect, then close without an answer
    "reset_after",  # perform the side effect, then reset the connection
    "stall_mid",  # perform it, send the headers and half the body, hold until released
)


class PartitionServer(test_idempotency.CountingServer):
    """test_idempotency's counting server, whose first request under a key can be partitioned.

    ``plan(key, action, token, hold)`` arms one of ``PARTITIONS`` for the key;
    when a request stalls, ``token`` is written as a line to ``notify_fd`` (the
    worker waits for it to time its kill), and the request is held for
    ``hold`` seconds (or until ``release()``), then dropped. ``applied`` says
    which partitions really happened.
    """

    def __init__(self, notify_fd: int | None = None) -> None:
        super().__init__()
        self.notify_fd = notify_fd
        self.plans: dict[str, tuple[str, str, float]] = {}
        self.applied: dict[str, str] = {}
        self._stalled: list[threading.Event] = []
        self.httpd.RequestHandlerClass = _partition_handler(self)

    def plan(self, key: str, action: str, token: str = "", hold: float = WAIT * 6) -> None:
        assert action in PARTITIONS, action
        with self.lock:
            self.plans[key] = (action, token, hold)

    def take(self, key: str) -> tuple[str, str, float] | None:
        with self.lock:
            return self.plans.pop(key, None)

    def stall(self, key: str, action: str, token: str, hold: float) -> None:
        """Hold the calling handler for ``hold`` seconds, or until ``release()``."""
        gate = threading.Event()
        with self.lock:
            self.applied[key] = action
            self._stalled.append(gate)
        if self.notify_fd is not None:
            os.write(self.notify_fd, f"{token}\n".encode())
        gate.wait(hold)

    def release(self) -> None:
        """Let stalled requests go, and forget partitions that never happened."""
        with self.lock:
            self.plans.clear()
            gates, self._stalled = self._stalled, []
        for gate in gates:
            gate.set()

    def close(self) -> None:
        self.release()
        super().close()


def _partition_handler(server: PartitionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
            except (OSError, ValueError):
                return  # the client died while sending: no effect
            key = self.headers["Idempotency-Key"]
            planned = server.take(key)
            action, token, hold = planned if planned is not None else ("", "", 0.0)
            if action.endswith("_before"):
                if action == "stall_before":
                    server.stall(key, action, token, hold)
                else:
                    with server.lock:
                        server.applied[key] = action
                self._drop(reset=action == "reset_before")
                return
            answer = server.charge(key, body, self.headers.get("X-Dedupe") == "1")
            data = json.dumps(answer).encode()
            try:
                if action in ("drop_after", "reset_after"):
                    with server.lock:
                        server.applied[key] = action
                    self._drop(reset=action == "reset_after")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action == "stall_mid":
                    self.wfile.write(data[: len(data) // 2])
                    server.stall(key, action, token, hold)
                    self._drop(reset=False)
                    return
                self.wfile.write(data)
            except OSError:
                pass  # the client was killed before it read the answer

        def _drop(self, *, reset: bool) -> None:
            self.close_connection = True
            if reset:
                try:
                    # Linger 0: close() sends RST instead of FIN.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                except OSError:
                    pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# -- the site: files, store, trail --------------------------------------------------------------


class Site:
    """The folders, termsafe store and audit trail of one chaos test.

    Args:
        tmp_path: The test's folder.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.home = tmp_path / "ts"
        self.home.mkdir()
        self.store_path = self.home / "store.sqlite3"
        self.trail = self.home / "audit.jsonl"
        self.data = tmp_path / "data"
        self.data.mkdir()
        self.dbs = tmp_path / "db"
        self.dbs.mkdir()
        self.env = worker_env(tmp_path, self.home)
        self.store = SQLiteStore(self.store_path)
        self.anchor: ts.Anchor | None = None

    def spec(self, **extra: Any) -> JSON:
        """The fields every workflow process needs."""
        return {
            "store": str(self.store_path),
            "trail": str(self.trail),
            "data": str(self.data),
            "dbs": str(self.dbs),
            **extra,
        }

    def close(self) -> None:
        self.store.close()

    # -- after every trial -------------------------------------------------------------------

    def recover(
        self,
        worker: Worker | None,
        *,
        cli: bool,
        leftovers: str = "wait",
        known: Callable[[str], bool] | None = None,
    ) -> tuple[JSON, list[str]]:
        """Do what a supervisor and a later process do after a crash; check nothing is left.

        First the supervisor's part (the worker is the subreaper the dead
        process's children were left to): whatever it left running other than
        its helper (git, mostly) is left to end on its own (``leftovers="wait"``,
        within ``LEFTOVER_DEADLINE``) or SIGKILLed (``"kill"``: git then leaves
        its locks behind). Then ``termsafe.recover`` in this process, or the
        ``termsafe recover`` command. Then: recover is clean; no process
        journaled by a dead owner runs (the helper, even one whose workflow
        died before recording its pid: its entry names it by a token); no
        temp file, staging folder or backup is left; the journal holds nothing
        of a dead process; the audit trail verifies.

        Returns:
            The recover report (as JSON) and the problems found.
        """
        problems: list[str] = []
        if worker is not None:
            problems += self._leftovers(worker, kill=leftovers == "kill")
        journaled = [
            (e.payload.get("pid"), e.payload.get("start_time"))
            for e in self.store.journal_entries("child_process")
            if not identity_alive(e.owner)
        ]
        if cli:
            code, printed, err = recover_cli(self)
            if printed is None:
                return {}, [f"termsafe recover printed no report ({code}): {err}"]
            report: JSON = printed
            if code != (0 if report["clean"] else 1):
                problems.append(f"termsafe recover exited {code}: {err}")
        else:
            sink = ts.JsonlSink(self.trail, fsync="batch")
            try:
                report = ts.recover(self.store, sink=sink, kill_timeout=0.5).as_dict()
            finally:
                sink.close()
        if not report["clean"]:
            problems.append(f"recover is not clean: left {report['left']}, {report['survivors']}")
        for pid, start in journaled:
            if isinstance(pid, int) and running(pid, start):
                problems.append(f"orphan {pid}, journaled by a dead process, runs after recover")
        report["escaped"] = 0
        if worker is not None:
            for proc in worker.descendants():
                if _is_helper(proc):
                    # spawn journals a helper before it starts (by a token in its
                    # environment): however early the kill, recover must find it.
                    report["escaped"] += 1
                    problems.append(f"helper {proc.pid} ({_cmdline(proc)}) escaped recover")
                else:
                    problems.append(f"process {proc.pid} ({_cmdline(proc)}) runs after recover")
                _kill(proc)
        left = temps(self.data) if (self.data / "tree").exists() else test_atomic.ours(self.data)
        report["known"] = [name for name in left if known is not None and known(name)]
        for name in report["known"]:
            shutil.rmtree(self.data / name)
        left = [name for name in left if name not in report["known"]]
        if left:
            problems.append(f"temp files left after recover: {left}")
        stale = [e for e in self.store.journal_entries() if not identity_alive(e.owner)]
        if stale:
            problems.append(f"journal entries of dead processes left after recover: {stale}")
        problems += self.check_audit()
        return report, problems

    def _leftovers(self, worker: Worker, *, kill: bool) -> list[str]:
        """The supervisor's part: let what a dead process left end, or kill it (not the helper)."""
        deadline = time.monotonic() + LEFTOVER_DEADLINE
        while True:
            alive = [p for p in worker.descendants() if not _is_helper(p)]
            if not alive:
                return []
            if kill:
                for proc in alive:
                    _kill(proc)
                kill = False
                continue
            if time.monotonic() >= deadline:
                names = [f"{p.pid} {_cmdline(p)}" for p in alive]
                for proc in alive:
                    _kill(proc)
                return [f"left running {LEFTOVER_DEADLINE:g} s after the kill: {names}"]
            psutil.wait_procs(alive, timeout=0.2)

    def check_audit(self) -> list[str]:
        """The trail verifies; a torn line is allowed only as the very last one; and the
        head seen after the previous trial is still there (nothing complete was lost)."""
        if not self.trail.exists():
            return []
        report = ts.verify_audit_log(self.trail, anchor=self.anchor)
        problems = []
        if not report.ok:
            problems.append(
                f"audit trail: {report.kind} at line {report.first_bad_line}: {report.message}"
            )
        raw = self.trail.read_bytes()
        if report.torn_tail and report.first_bad_line != raw.count(b"\n") + 1:
            problems.append(f"audit trail torn at line {report.first_bad_line}, not the last")
        complete = raw[: raw.rfind(b"\n") + 1]
        if complete.strip():
            last = json.loads(complete.rstrip(b"\n").rsplit(b"\n", 1)[-1])
            self.anchor = ts.Anchor(seq=last["seq"], hash=last["hash"])
        return problems

    def audit_events(self, workflow_id: str) -> list[ts.AuditEvent]:
        """The events of one workflow in the trail (complete lines only)."""
        events = []
        for line in self.trail.read_bytes().split(b"\n"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            event = ts.AuditEvent.from_dict(rec["event"])
            if event.workflow_id == workflow_id:
                events.append(event)
        return events


def _is_helper(proc: psutil.Process) -> bool:
    try:
        return bool(proc.name() == "sleep")
    except psutil.Error:
        return False


def _kill(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "?"


# -- what the markers say ------------------------------------------------------------------------


class Marks:
    """A workflow process's markers, as the worker reported them."""

    def __init__(self, report: JSON) -> None:
        self.lines: list[str] = [line for _, line in report["markers"]]
        self.started: set[int] = set()
        self.done: dict[int, JSON] = {}
        self.failed: dict[int, JSON] = {}
        self.fault: JSON | None = None
        self.helper: int | None = None
        self.state: str | None = None
        self.last: JSON | None = None
        self.crash: str | None = None
        for line in self.lines:
            kind, _, rest = line.partition(" ")
            if kind == "S":
                self.started.add(int(rest.split(" ", 1)[0]))
            elif kind in ("D", "E"):
                index, _, data = rest.partition(" ")
                (self.done if kind == "D" else self.failed)[int(index)] = json.loads(data)
            elif kind == "X":
                self.fault = json.loads(rest)
            elif kind == "H":
                self.helper = int(rest)
            elif kind == "W":
                self.state = rest
            elif kind == "R":
                self.last = json.loads(rest)
            elif kind == "C":
                self.crash = json.loads(rest)

    def op(self, index: int) -> str:
        """``not started``, ``done``, ``failed`` or ``interrupted``."""
        if index in self.done:
            return "done"
        if index in self.failed:
            return "failed"
        if index in self.started:
            return "interrupted"
        return "not started"


def process_problems(
    report: JSON,
    marks: Marks,
    *,
    signal_planned: str | None,
    states: Sequence[str] = ("terminated", "completed"),
) -> list[str]:
    """What the workflow process's own ending says is wrong.

    A process no signal was sent to must end by itself with code 0; one sent
    SIGTERM must stop without needing a SIGKILL, its workflow in one of
    ``states`` (``killed`` is right only where a thread cannot come back in
    time: blocked on a stalled socket); no process may crash or hang.
    """
    problems = []
    if marks.crash is not None:
        problems.append(f"the workflow process crashed:\n{marks.crash}")
    if report["hung"]:
        problems.append("the workflow process did not end within its deadline")
    if report["escalated"]:
        problems.append("SIGTERM did not stop the workflow process: it needed a SIGKILL")
    if not report["sent"] and report["exit"] != 0 and marks.crash is None:
        problems.append(
            f"the workflow process ended with {report['exit']} / {report['signal']} "
            f"though nothing killed it"
        )
    if report["sent"] and signal_planned == "SIGTERM" and report["signal"] is None:
        if report["exit"] != 0:
            problems.append(f"after SIGTERM the workflow process exited {report['exit']}")
        elif marks.state not in states:
            problems.append(f"after SIGTERM the workflow ended {marks.state!r}")
    return problems


# -- resources the workflows change, and their judges -------------------------------------------


#: Kind -> (path under the data folder, test_atomic's judge): a file and two archives
#: written with ``atomic_file``, a directory with ``atomic_directory`` (alone in its
#: folder: its judge checks nothing is left beside it).
FILES = {
    "file": ("file.bin", test_atomic.judge_file),
    "zip": ("archive.zip", test_atomic.judge_zip),
    "tar": ("archive.tar", test_atomic.judge_tar),
    "dir": ("tree/site", test_atomic.judge_dir),
}


def temps(data: Path) -> list[str]:
    """termsafe's temps, staging folders and backups in the data folders."""
    return [*test_atomic.ours(data), *(f"tree/{n}" for n in test_atomic.ours(data / "tree"))]


class Files:
    """The files, archives and directory the workflows write; version 0 to start."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.version: dict[str, int] = {}
        (data / "tree").mkdir()
        for kind, (name, _) in FILES.items():
            test_atomic.write_version_zero(kind, str(data / name))
            self.version[kind] = 0

    def found(self, kind: str) -> int:
        """The version on disk (AssertionError if torn: the archive's own reader says)."""
        name, judge = FILES[kind]
        return judge(str(self.data / name))


class Databases:
    """The batch and migration databases, judged by test_transaction's ``Judge``.

    Args:
        dbs: Their folder.
        worker: Where the folder is visible, when it is not here (a tmpfs in
            the worker's private mount namespace): the worker then creates the
            databases and takes the snapshots.
    """

    SCENARIOS: ClassVar[dict[str, tuple[str, str]]] = {
        "batch": ("batch.db", "wal"),
        "migration": ("migration.db", "delete"),
    }

    def __init__(self, dbs: Path, worker: Worker | None = None) -> None:
        self.judges = {}
        self.worker = worker
        for scenario, (name, journal) in self.SCENARIOS.items():
            path = dbs / name
            if worker is None:
                test_transaction._setup_db(path, scenario, journal)
            else:
                worker.ask("setup", path=str(path), scenario=scenario, journal=journal)
            self.judges[scenario] = test_transaction.Judge(path, scenario)
        self.state = {s: self.snapshot(s) for s in self.SCENARIOS}

    def snapshot(self, scenario: str) -> Any:
        """The database's state (AssertionError if SQLite or the invariants disagree)."""
        judge = self.judges[scenario]
        if self.worker is None:
            return judge.snapshot()
        answer = self.worker.ask("snapshot", path=str(judge.path), scenario=scenario)
        assert "problem" not in answer, answer.get("problem")
        value = answer["value"]
        return {int(k): v for k, v in value.items()} if scenario == "batch" else value

    def applied(self, scenario: str, batch: int) -> bool:
        """Whether the op is all there (True) or not at all; AssertionError if torn."""
        before, after = self.state[scenario], self.snapshot(scenario)
        self.state[scenario] = after
        if scenario == "batch":
            others = {b: n for b, n in after.items() if b != batch}
            assert before == others, f"other batches changed: {before} -> {others}"
        return self.judges[scenario].applied(before, after, batch)

    def unchanged(self, scenario: str) -> bool:
        after = self.snapshot(scenario)
        same = bool(after == self.state[scenario])
        self.state[scenario] = after
        return same


class Repo:
    """A git repository (main, a branch ``moving``), judged by test_git's ``_judge``."""

    def __init__(self, path: Path) -> None:
        self.path = test_git._init(path)
        (path / "README").write_text("hello\n")
        test_git.git(path, "add", "README")
        test_git.git(path, "commit", "-q", "-m", "initial")
        test_git.git(path, "branch", "moving")
        self.refs = test_git.refs(path)

    def op(self, trial: int) -> JSON:
        prior = sorted(r for r in self.refs if r.startswith("refs/heads/t"))
        delete = prior[0].removeprefix("refs/heads/") if len(prior) > 2 else None
        return {"op": "git", "trial": trial, "delete": delete}

    def applied(self, op: JSON) -> bool:
        """fsck clean, no lock, HEAD and index sane, refs all old or all new (AssertionError)."""
        applied = test_git._judge(self.path, self.refs, op["trial"], {**op, "push": False})
        self.refs = test_git.refs(self.path)
        return applied

    def unchanged(self) -> bool:
        problem = test_git.fsck(self.path)
        assert "" == problem, problem
        assert [] == test_git.locks(self.path)
        return bool(test_git.refs(self.path) == self.refs)


def settle_key(store: SQLiteStore, server: PartitionServer, key: str, mode: str) -> list[str]:
    """What the idempotency record of ``key`` must be after a kill, and its resolution.

    Before anyone touches it: at most one side effect; ``done`` only with the
    first effect's result; ``released`` (or a claim not yet past its point of no
    return) only if nothing was sent. Then a later process retries the key the
    same way; an ``OutcomeUnknown`` is resolved from the server's own count (the
    operator's check) and retried. At the end the key is ``done``, with the one
    effect's result, and the server counted exactly one effect.

    Returns:
        The problems found.
    """
    problems: list[str] = []
    info = store.idem_info(key)
    status = None if info is None else info.status
    effects = server.effects[key]
    where = f"key {key!r} ({mode}, record {status!r}, {effects} effect(s))"
    if effects > 1:
        problems.append(f"{where}: the side effect happened {effects} times")
    charged = (effects, (info.result or {}).get("charge") if info is not None else None)
    if status == "done" and (1, f"ch_{key}_1") != charged:
        problems.append(f"{where}: recorded {charged[1]!r}")
    retryable = status == "released" or (
        info is not None and status == "in_flight" and not info.sent
    )
    if retryable and effects != 0:
        problems.append(f"{where}: retryable though the effect happened")
    outcome = retry(store, server.port, key, mode)
    if outcome["outcome"] == "unknown":
        if mode == "dedupes":
            problems.append(f"{where}: OutcomeUnknown though the service deduplicates")
        truth = server.effects[key]
        ts.resolve_outcome(
            key, succeeded=truth == 1, result=server.first.get(key) if truth else None, store=store
        )
        outcome = retry(store, server.port, key, mode)
        want = "replayed" if truth == 1 else "recorded"
        if want != outcome["outcome"]:
            problems.append(f"{where}: after resolving, the retry {outcome}")
    final = store.idem_info(key)
    effects = server.effects[key]
    result = final.result if final is not None else None
    if ("done", 1, f"ch_{key}_1") != (
        final.status if final is not None else None,
        effects,
        (result or {}).get("charge"),
    ):
        problems.append(
            f"{where}: after the retry {outcome}, record {final!r}, {effects} effect(s)"
        )
    return problems


def retry(store: SQLiteStore, port: int, key: str, mode: str) -> JSON:
    """A later process's attempt at ``key`` (in a workflow of a terminator of its own)."""
    term = ts.Terminator(sink=ts.MemorySink(), store=store)
    outcome: JSON = {}
    try:
        with term.workflow(f"settle-{key}", owner="chaos"):
            outcome = charge(port, key, mode, WAIT * 3)
    finally:
        term.close()
    return outcome


def recover_cli(site: Site) -> tuple[int, JSON | None, str]:
    """Run ``termsafe recover --json`` against ``site``; its exit code, report (if any), stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "termsafe", "recover", "--json", "--kill-timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=site.env,
    )
    try:
        report: JSON = json.loads(out.stdout)
    except ValueError:
        return out.returncode, None, out.stderr
    return out.returncode, report, out.stderr
