"""Random SIGKILL trials: an operation killed at a random moment, then judged all-or-nothing.

The test (``run_trials``) starts a worker, its own test module run as a
script (``python tests/test_x.py worker ...``), and sends it one trial spec a
line. The worker (``serve_trials``) forks a child per trial that runs the
operation, SIGKILLs the child ``delay`` seconds after it said it is ready, and
prints a JSON report a line. The test then judges what the kill left: the
trial's change all there, or none of it.

The first ``CALIBRATION`` trials are not killed: they measure how long the
operation takes. Later delays are drawn from 0 to 1.25 times the median
duration of the trials that completed, so kills land all over the operation
and a little after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from conftest import WAIT

import termsafe as ts

#: Trials run to completion first, to measure the operation.
CALIBRATION = 3

Spec = dict[str, Any]
Report = dict[str, Any]


def trial_workflow(spec: Spec) -> AbstractContextManager[object]:
    """The workflow a trial runs in, on a terminator of its own; none unless ``in_workflow``."""
    if not spec["in_workflow"]:
        return contextlib.nullcontext()
    return ts.Terminator(sink=ts.MemorySink()).workflow(f"trial-{spec['trial']}")


def fork_child(run: Callable[[int], object]) -> tuple[int, int]:
    """Fork a child that runs ``run(fd)``, ``fd`` the write end of a pipe to this process.

    The child exits 0 once ``run`` returns; if it raises, the child writes
    ``E`` and the exception's repr to ``fd`` and exits 1.

    Args:
        run: What the child runs.

    Returns:
        The child's pid and the read end of the pipe (``read_to_end`` closes it).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            run(w)
        except BaseException as exc:
            os.write(w, b"E" + repr(exc).encode()[:400])
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def read_to_end(fd: int) -> bytes:
    """Everything left to read from ``fd`` (until every writer closed it); ``fd`` is closed."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


def fork_trial(trial: Callable[[Spec, int], None], spec: Spec) -> Report:
    """Run ``trial(spec, fd)`` in a forked child; SIGKILL it ``spec["delay"]`` s after it is ready.

    The trial writes ``R`` to ``fd`` just before the operation starts; the
    child writes ``D`` once it returns (``fork_child`` says what it writes if
    it raises).

    Args:
        trial: What the child runs.
        spec: The trial's spec (``delay``: seconds from ``R`` to the SIGKILL).

    Returns:
        ``killed`` (whether the SIGKILL was sent), ``status`` (the child's wait
        status), ``elapsed`` (seconds from ``R`` to its exit), ``out`` (what it
        wrote).
    """

    def run(fd: int) -> None:
        trial(spec, fd)
        os.write(fd, b"D")

    pid, r = fork_child(run)
    first = os.read(r, 1)
    start = time.monotonic()
    killed = False
    if first == b"R":
        ready, _, _ = select.select([r], [], [], spec["delay"])
        if not ready:
            os.kill(pid, signal.SIGKILL)
            killed = True
    _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - start
    out = (first + read_to_end(r)).decode(errors="replace")
    return {"killed": killed, "status": status, "elapsed": elapsed, "out": out}


def serve_trials(
    trial: Callable[[Spec, int], None],
    after: Callable[[Spec, Report], Report] | None = None,
) -> None:
    """The worker: for each spec read from stdin, ``fork_trial`` and print its report.

    Args:
        trial: What each forked child runs.
        after: Runs in the worker after each trial (recovery, say); what it
            returns is added to the report.
    """
    for line in sys.stdin:
        spec = json.loads(line)
        report = fork_trial(trial, spec)
        if after is not None:
            report.update(after(spec, report))
        print(json.dumps(report), flush=True)


def run_trials(
    argv: Sequence[str],
    *,
    seed: int,
    kills: int,
    spec: Callable[[int, random.Random], Spec],
    judge: Callable[[Spec, Report], bool],
    calibration_delay: float = 30.0,
) -> tuple[dict[str, int], list[Report]]:
    """Run trials in the worker ``argv`` until ``kills`` of them were SIGKILLed.

    Args:
        argv: The worker's command line (it runs ``serve_trials``).
        seed: Seeds the delays, and what ``spec`` draws.
        kills: How many trials to kill.
        spec: Trial ``n``'s spec, from ``n`` and the random generator; its
            number (``trial``) and ``delay`` are added to it.
        judge: Checks the state after a trial, from its spec and report:
            returns whether its change is all there, raises AssertionError if
            the change is torn.
        calibration_delay: The delay of the calibration trials, long enough
            that they complete.

    Returns:
        The outcomes (``killed_before``: killed, nothing applied;
        ``killed_after``: killed, all applied; ``completed``) and every
        trial's report.

    Raises:
        AssertionError: A judge found a torn change, a trial that was not
            killed failed, the worker died, or too few kills landed.
    """
    rng = random.Random(seed)
    outcomes = {"killed_before": 0, "killed_after": 0, "completed": 0}
    reports: list[Report] = []
    durations: list[float] = []
    worker = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None
    assert worker.stdout is not None
    try:
        while outcomes["killed_before"] + outcomes["killed_after"] < kills:
            trial = len(reports)
            assert trial < CALIBRATION + 4 * kills, f"seed {seed}: too few kills: {outcomes}"
            span = 1.25 * statistics.median(durations) if durations else 1.0
            delay = calibration_delay if trial < CALIBRATION else rng.uniform(0.0, span)
            trial_spec = {"trial": trial, "delay": delay, **spec(trial, rng)}
            worker.stdin.write(json.dumps(trial_spec) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            assert line, f"worker died (seed {seed})"
            report: Report = json.loads(line)
            reports.append(report)
            context = f"seed {seed}, trial {trial}, spec {trial_spec}, report {report}"
            try:
                applied = judge(trial_spec, report)
            except AssertionError as exc:
                raise AssertionError(f"{context}: {exc}") from exc
            if report["killed"]:
                outcomes["killed_after" if applied else "killed_before"] += 1
            else:
                assert 0 == report["status"], context
                assert True is applied, context
                outcomes["completed"] += 1
                durations.append(report["elapsed"])
    finally:
        worker.stdin.close()
        try:
            worker.wait(WAIT)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        worker.stdout.close()
    return outcomes, reports


class VersionJudge:
    """Judges a database trial by what changed since the trial before it.

    A ``batch`` trial inserts ``batch_rows`` rows tagged with its number:
    ``snapshot`` returns the row count per trial number. Any other trial
    moves the database one version on: ``snapshot`` returns the version.
    ``snapshot`` also checks the database is consistent.

    Args:
        scenario: ``"batch"`` or the name of a versioned scenario.
        batch_rows: How many rows a ``batch`` trial inserts.
    """

    def __init__(self, scenario: str, batch_rows: int) -> None:
        self.scenario = scenario
        self.batch_rows = batch_rows

    def snapshot(self) -> Any:
        """The rows per trial (``batch``) or the version; raise AssertionError if inconsistent."""
        raise NotImplementedError

    def applied(self, before: Any, after: Any, trial: int) -> bool:
        """Whether the trial's change is all there (True) or not at all (False); raise if torn."""
        if self.scenario == "batch":
            rows = after.get(trial, 0)
            assert rows in (0, self.batch_rows), f"batch {trial} torn: {rows} rows"
            return bool(rows)
        assert after in (before, before + 1), f"{self.scenario}: {before} -> {after}"
        return bool(after == before + 1)

    def each_trial(self) -> Callable[[Spec, Report], bool]:
        """A ``run_trials`` judge: ``applied`` from the snapshots before and after each trial.

        Returns:
            The judge; the first snapshot is taken now.
        """
        state = self.snapshot()

        def judge(spec: Spec, report: Report) -> bool:
            nonlocal state
            before, state = state, self.snapshot()
            return self.applied(before, state, spec["trial"])

        return judge


#: Source of a real ``SQLiteStore`` subclass for scripts run in a child process:
#: just before it journals the pid of a child the script started (one that
#: ``wanted(payload)``, defined by the script, accepts), it reports the pid on
#: stdout ("recording PID") and blocks reading stdin, which stays silent until
#: the test SIGKILLs the process: what a SIGKILL between start and journal
#: leaves. The script imports ``os`` and ``SQLiteStore`` first.
PAUSED_BEFORE_THE_PID_STORE = """
class PausedBeforeThePid(SQLiteStore):
    def journal_add(self, kind, payload, workflow_id=None):
        self._pause(kind, payload)
        return super().journal_add(kind, payload, workflow_id)

    def journal_update(self, entry_id, payload):
        self._pause("child_process", payload)
        super().journal_update(entry_id, payload)

    def _pause(self, kind, payload):
        if kind == "child_process" and "pid" in payload and wanted(payload):
            os.write(1, b"recording %d\\n" % payload["pid"])
            os.read(0, 1)
"""
