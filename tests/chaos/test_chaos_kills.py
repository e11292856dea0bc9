"""Chaos: workflows doing a random mix of safe operations, killed by real signals.

Each trial forks a workflow process that runs three to five ops picked at
random (a file and two archives written with ``atomic_file``, a directory
with ``atomic_directory``, a batch insert and a migration in SQLite
transactions, a git commit with branch moves, an idempotent charge to a local
counting server, a tracked helper process) and sends it a real signal at a
random moment inside a random op: SIGKILL (nothing of it runs) or SIGTERM
(its signal handlers start a graceful kill; in the ``SIGTERM-cut`` variant
the ladder is shorter than the ops, so sections are cut and stuck threads
abandoned). Then what a supervisor and a later process do runs
(``recover``), and every resource is judged by tools nobody here wrote: old
or new, never torn, nothing left behind, nothing twice, the audit chain
intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import test_git
import test_transaction

from chaos._harness import (
    FILES,
    JSON,
    ChaosRun,
    Databases,
    Files,
    Marks,
    PartitionServer,
    Repo,
    Site,
    Worker,
    process_problems,
    running,
    settle_key,
    temps,
)

OPS = ("file", "zip", "tar", "dir", "batch", "migration", "git", "api", "spawn")
MODES = ("auto", "explicit", "dedupes")

#: How each variant kills: the signal, the workflow process's phase ladder
#: (graceful, forced) and section graces. ``SIGTERM-cut``'s ladder is shorter than
#: the ops: graces run out inside sections, which are cut and rolled back, and
#: threads stuck between cancellation points are abandoned by the system phase
#: (the terminator runs their hooks).
VARIANTS: dict[str, tuple[str, list[float], dict[str, float] | None]] = {
    "SIGKILL": ("SIGKILL", [5.0, 5.0], None),
    "SIGTERM": ("SIGTERM", [5.0, 5.0], None),
    "SIGTERM-cut": ("SIGTERM", [0.0, 0.005], dict.fromkeys(("fs", "db", "git", "api"), 0.005)),
}

#: Trials per ``--chaos-runs``, by variant; the first two of each run every op once,
#: unkilled, to measure how long each op takes here.
TRIALS = {"SIGKILL": 30, "SIGTERM": 26, "SIGTERM-cut": 26}
CALIBRATION = 2

#: What an op of an abandoned workflow may raise when its thread comes back to find
#: the terminator rolled its operation back (it then counts as interrupted).
ABANDONED = {"OperationClosed", "TransactionStateError", "AtomicWriteError", "LeaseLost"}

#: How a SIGTERMed workflow may end: a cut ladder may abandon a thread (``killed``).
STATES = {
    "SIGKILL": ("terminated", "completed"),
    "SIGTERM": ("terminated", "completed"),
    "SIGTERM-cut": ("terminated", "completed", "killed"),
}

#: Which outcomes each op state allows: a kill inside an op may land before or after its
#: commit point; an op that never started changed nothing; one that ended is all there.
LEGAL = {
    "done": {"new"},
    "not started": {"old"},
    "interrupted": {"old", "new"},
}


class Mixed:
    """The resources the workflows change, what each trial plans, and the judging."""

    def __init__(self, site: Site, tmp_path: Path, server: PartitionServer) -> None:
        self.site = site
        self.server = server
        self.files = Files(site.data)
        self.dbs = Databases(site.dbs)
        self.repo = Repo(tmp_path / "repo")
        self.keys: dict[str, str] = {}

    def plan(self, rng: random.Random, trial: int, calibrating: bool) -> list[JSON]:
        if calibrating:
            kinds = list(OPS)
            rng.shuffle(kinds)
        else:
            kinds = rng.sample(OPS, rng.randint(3, 5))
        ops: list[JSON] = []
        for kind in kinds:
            if kind in FILES:
                ops.append({"op": kind, "version": trial + 1})
            elif kind == "batch":
                ops.append({"op": kind, "batch": trial, "rows": test_transaction.BATCH_ROWS})
            elif kind == "migration":
                ops.append({"op": kind})
            elif kind == "git":
                ops.append(self.repo.op(trial))
            elif kind == "api":
                if self.keys and rng.random() < 0.3:
                    # Again under a key already settled: it must replay, never charge.
                    key = rng.choice(sorted(self.keys))
                    mode = self.keys[key]
                else:
                    key, mode = f"k{trial}", rng.choice(MODES)
                ops.append({"op": kind, "key": key, "mode": mode})
            else:
                ops.append({"op": kind, "arg": str(600 + trial)})
        return ops

    def judge(self, trial: int, ops: list[JSON], marks: Marks) -> list[str]:
        """Each planned resource old or new as its op's state allows; the rest untouched."""
        problems = []
        planned = {op["op"] for op in ops}
        for j, op in enumerate(ops):
            state = marks.op(j)
            if state == "failed":
                error = marks.failed[j]
                if marks.state == "killed" and error["type"] in ABANDONED:
                    state = "interrupted"
                else:
                    problems.append(f"op {j} {op['op']} raised {error}")
            try:
                found = self._found(op, trial)
            except Exception as exc:  # a torn archive fails its reader in its own way
                problems.append(f"op {j} {op} ({state}): {type(exc).__name__}: {exc}")
                continue
            if found is not None and state != "failed" and found not in LEGAL[state]:
                problems.append(f"op {j} {op} was {state} but left the {found} state")
        try:
            for kind in FILES:
                if kind not in planned and self.files.found(kind) != self.files.version[kind]:
                    problems.append(f"{kind} changed though no op wrote it")
            for scenario in ("batch", "migration"):
                if scenario not in planned and not self.dbs.unchanged(scenario):
                    problems.append(f"{scenario} database changed though no op touched it")
            if "git" not in planned and not self.repo.unchanged():
                problems.append("the repository changed though no op touched it")
        except Exception as exc:
            problems.append(f"a resource no op touched is damaged: {type(exc).__name__}: {exc}")
        for op in ops:
            if op["op"] == "api":
                problems += settle_key(self.site.store, self.server, op["key"], op["mode"])
                self.keys[op["key"]] = op["mode"]
        return problems

    def _found(self, op: JSON, trial: int) -> str | None:
        """``old`` or ``new`` (AssertionError if neither); ``None`` when judged elsewhere."""
        kind = op["op"]
        if kind in FILES:
            old, found = self.files.version[kind], self.files.found(kind)
            self.files.version[kind] = found
            assert found in (old, op["version"]), f"holds version {found}"
            return "new" if found == op["version"] else "old"
        if kind in ("batch", "migration"):
            return "new" if self.dbs.applied(kind, trial) else "old"
        if kind == "git":
            return "new" if self.repo.applied(op) else "old"
        return None

    def unwound(self, marks: Marks) -> list[str]:
        """A workflow process that ended by itself (a graceful kill) cleaned up after itself."""
        problems = []
        left = temps(self.site.data)
        if left:
            problems.append(f"the workflow unwound but left temp files: {left}")
        locks = test_git.locks(self.repo.path)
        if locks:
            problems.append(f"the workflow unwound but left git locks: {locks}")
        if marks.helper is not None and running(marks.helper, None):
            problems.append(f"the workflow unwound but its helper {marks.helper} still runs")
        return problems


def kill_plan(rng: random.Random, ops: list[JSON], signame: str) -> JSON:
    """Where the kill lands: inside a random op, at a random fraction of its usual length
    (a little past its end too), or now and then right after the fork."""
    if rng.random() < 0.1:
        return {"signal": signame, "at": "start", "delay": rng.uniform(0.0, 0.02)}
    index = rng.randrange(len(ops))
    return {
        "signal": signame,
        "at": "op",
        "index": index,
        "of": ops[index]["op"],
        "fraction": rng.uniform(0.0, 1.3),
    }


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The test's folders, store and trail; git and termsafe kept hermetic here too."""
    sandbox = Site(tmp_path)
    for key, value in sandbox.env.items():
        if key.startswith(("GIT_", "HOME", "TERMSAFE_")):
            monkeypatch.setenv(key, value)
    yield sandbox
    sandbox.close()


class TestRandomKills:
    @pytest.mark.parametrize("variant", list(VARIANTS))
    def test_mixed_workflows(
        self, chaos_run: ChaosRun, site: Site, tmp_path: Path, variant: str
    ) -> None:
        """Random ops killed mid-way: each resource old or new, nothing left, nothing twice."""
        signame, phases, grace = VARIANTS[variant]
        server = PartitionServer()
        worker = Worker(tmp_path, site.env)
        try:
            world = Mixed(site, tmp_path, server)
            trials = chaos_run.size(TRIALS[variant])
            mid_op = 0
            for trial in range(trials):
                rng = chaos_run.rng(trial)
                calibrating = trial < CALIBRATION
                ops = world.plan(rng, trial, calibrating)
                kill = None if calibrating else kill_plan(rng, ops, signame)
                spec = site.spec(
                    workflow_id=f"mixed-{trial}",
                    portable_rename=rng.random() < 0.5,
                    ops=ops,
                    kill=kill,
                    handlers=signame == "SIGTERM",
                    phases=phases,
                    grace=grace,
                    port=server.port,
                    repo=str(world.repo.path),
                )
                report = worker.ask("trial", **spec)
                chaos_run.trials += 1
                chaos_run.count_signals(report)
                marks = Marks(report)
                problems = process_problems(
                    report, marks, signal_planned=signame, states=STATES[variant]
                )
                if report["sent"] and marks.state:
                    chaos_run.note(f"ended {marks.state}")
                if report["signal"] is None and report["exit"] == 0:
                    problems += world.unwound(marks)
                recovered, found = site.recover(
                    worker,
                    cli=trial % 4 == 3 or trial == trials - 1,
                    leftovers=rng.choice(["wait", "kill"]),
                )
                if recovered.get("escaped"):
                    chaos_run.note("helpers that escaped recover")
                problems += found
                problems += world.judge(trial, ops, marks)
                if report["sent"] and any(marks.op(j) == "interrupted" for j in range(len(ops))):
                    mid_op += 1
                for problem in problems:
                    chaos_run.violation(trial, f"{problem}\n    kill {kill}, report {report}")
            chaos_run.note("kills inside an op", mid_op)
        finally:
            worker.close()
            server.close()
        assert [] == server.errors
        chaos_run.finish()
        kills = trials - CALIBRATION
        assert mid_op >= kills // 4, f"only {mid_op} of {kills} kills landed inside an op"
