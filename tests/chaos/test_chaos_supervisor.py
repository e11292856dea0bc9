"""Chaos: the supervisor itself SIGKILLed at random points of its cleanup.

Each trial runs a workflow command under ``termsafe run``: it holds an
``atomic_file`` temp open inside a workflow and either cooperates with SIGTERM
(its handlers unwind it) or ignores it (the ladder has to SIGKILL it); now
and then it also leaves a SIGTERM-proof grandchild behind. The test sends the
supervisor SIGTERM, waits for a step of its work (a line of ``--verbose``:
a phase, the command's exit, the orphans, the cleanup) and SIGKILLs it a
random moment later; in some trials the cleanup is held on recover's lock so
that the kill surely lands inside it. Then ``termsafe recover`` must finish
the job: every process of the tree gone, the run final, the journal empty,
no temp left, the old content in place, the audit chain intact, and a second
recover with nothing left to do.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
import test_atomic
import test_supervisor

import termsafe as ts
from chaos._harness import ChaosRun, Site, recover_cli, running

#: Trials per ``--chaos-runs`` (each starts three Python processes and runs ``recover``).
TRIALS = 8

#: The supervised workflow: holds a temp of ``atomic_file`` open until it is killed.
COMMAND = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    import termsafe as ts
    mode, target, orphan = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        ts.install_signal_handlers()
    if orphan:
        # Not tracked, ignores SIGTERM, outlives its parent: the supervisor's to stop.
        subprocess.Popen([sys.executable, "-c", (
            "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "os.write(1, f'orphan {os.getpid()}\\\\n'.encode()); signal.pause()"
        )])
    with ts.workflow("chaos-job", owner="chaos"):
        with ts.atomic_file(target) as f:
            f.write("new, half written")
            f.flush()
            os.write(1, f"writing {os.getpid()}\\n".encode())
            while True:
                ts.sleep(0.05)
    """
)

#: The supervisor's ``--verbose`` lines a kill can follow, by how the command meets SIGTERM.
STEPS = {
    "cooperative": ["graceful:", "command exited with", "cleanup:"],
    "stubborn": ["graceful:", "forced:", "system:", "command exited with", "cleanup:"],
}


@pytest.fixture
def site() -> Iterator[Site]:
    """A store and trail under a short path (control sockets have a length limit)."""
    path = Path(tempfile.mkdtemp(prefix="ts-chaos-", dir="/tmp"))
    path.chmod(0o711)
    sandbox = Site(path)
    yield sandbox
    sandbox.close()
    shutil.rmtree(path, ignore_errors=True)


class TestSupervisorCrash:
    def test_supervisor_killed_mid_cleanup(self, chaos_run: ChaosRun, site: Site) -> None:
        """SIGKILLed at a random step of its cleanup, recover finishes what it started."""
        script = site.root / "job.py"
        script.write_text(COMMAND)
        target = site.data / "report.txt"
        started: list[test_supervisor.Supervised] = []
        try:
            for trial in range(chaos_run.size(TRIALS)):
                rng = chaos_run.rng(trial)
                mode = rng.choice(["cooperative", "stubborn"])
                orphan = mode == "cooperative" and rng.random() < 0.6
                steps = [*STEPS[mode]]
                if orphan:
                    steps.insert(-1, "orphans left by the command")
                blocked = rng.random() < 0.5
                step = "cleanup:" if blocked else rng.choice(steps)
                delay = rng.uniform(0.0, 0.06)
                target.write_text("old")
                wid = f"sup-{trial}"
                sup = test_supervisor.Supervised(
                    site.home, "--id", wid, "--graceful", "0.3", "--forced", "0.3",
                    "--", sys.executable, str(script), mode, str(target), "1" if orphan else "0",
                )  # fmt: skip
                started.append(sup)
                pids: dict[str, int] = {}
                while set(pids) != ({"writing", "orphan"} if orphan else {"writing"}):
                    role, pid = sup.out.wait_for(" ").split()
                    pids[role] = int(pid)
                sup.err.wait_for("started")
                lock = filelock.FileLock(str(site.store_path) + ".recover.lock")
                with lock if blocked else contextlib.nullcontext():
                    sup.proc.send_signal(signal.SIGTERM)
                    sup.err.wait_for(step)
                    # The kill's moment: a random delay after the step's line.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        sup.proc.wait(delay)
                    if sup.proc.poll() is None:
                        sup.proc.kill()
                    crashed = -9 == sup.wait()
                chaos_run.trials += 1
                if crashed:
                    chaos_run.count("supervisor_crashes")
                    chaos_run.note(f"killed after {step!r}")
                else:
                    chaos_run.note("ended before the kill")
                problems = self.judge(site, wid, pids, target, crashed)
                for problem in problems:
                    chaos_run.violation(
                        trial,
                        f"{problem}\n    {mode}, orphan {orphan}, kill {delay:.3f} s "
                        f"after {step!r} (held: {blocked}), supervisor said {sup.err.seen}",
                    )
        finally:
            for sup in started:
                sup.kill_hard()
            if started:
                recover_cli(site)
            for sup in started:
                sup.close()
        chaos_run.finish()
        assert chaos_run.counts.get("supervisor_crashes", 0) > 0

    def judge(
        self, site: Site, wid: str, pids: dict[str, int], target: Path, crashed: bool
    ) -> list[str]:
        """What ``termsafe recover`` must leave after the supervisor died (or finished)."""
        problems = []
        code, printed, err = recover_cli(site)
        report = printed or {}
        if code != 0 or not report.get("clean"):
            problems.append(f"termsafe recover exited {code}: {report or err}")
        runs = {r.run_id: r for r in site.store.runs() if r.workflow_id == wid}
        states = sorted(r.state for r in runs.values())
        if states not in (["killed"], ["terminated"]):
            problems.append(f"run states after recover: {states}")
        recovered = [r for r in report.get("runs", []) if r["workflow_id"] == wid]
        if recovered and not crashed:
            problems.append(f"recover marked a run its live supervisor finished: {recovered}")
        alive = [f"{role} {pid}" for role, pid in pids.items() if running(pid, None)]
        if alive:
            problems.append(f"processes of the tree still run: {alive}")
        entries = site.store.journal_entries()
        if entries:
            problems.append(f"journal entries left: {entries}")
        left = test_atomic.ours(site.data)
        if left:
            problems.append(f"temp files left: {left}")
        if "old" != target.read_text():
            problems.append(f"the target holds {target.read_text()!r}")
        problems += site.check_audit()
        finished = [e for e in site.audit_events(wid) if e.type == "workflow_finished"]
        if len(finished) > 1:
            problems.append(f"{len(finished)} final events: {[e.state for e in finished]}")
        again = ts.recover(site.store, kill_timeout=0.5)
        if (again.runs, again.sweep.removed, again.processes_killed) != ((), (), ()):
            problems.append(f"a second recover still found work: {again}")
        return problems


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="the chaos suite needs Linux")
