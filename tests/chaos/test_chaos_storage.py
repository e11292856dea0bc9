"""Chaos: storage failures during kills.

Files and audit lines: a fault-injecting layer over the os calls the workflow
process makes (``os.write``, ``os.fsync``, ``os.replace``, ``os.open``,
``os.ftruncate``: every call ``atomic_file`` and ``JsonlSink`` make) fails the
Nth matching call with ENOSPC or EIO (a short write first, now and then), and
the process is killed right after the fault fired (SIGKILL, SIGTERM), or not.

SQLite writes past Python, so its faults are real: ENOSPC from a small tmpfs
(mounted in a private mount namespace, when this machine allows one) that a
ballast file leaves a seeded amount of room on, and the kernel's EFBIG from
``RLIMIT_FSIZE`` set just above the database's size, which SQLite reports as
an I/O error.

The judges: the old data stands unless the error says the new is in place,
the error is the one a caller can act on (its class and errno named in the
process's report), the audit chain verifies, and recover leaves nothing.
"""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from chaos._harness import (
    FILES,
    JSON,
    ChaosRun,
    Databases,
    Files,
    Marks,
    Site,
    Worker,
    WorkerDied,
    process_problems,
)

#: Trials per ``--chaos-runs``.
FILE_TRIALS = 40
SQLITE_TRIALS = 36

#: Calls of the data folder's channel the layer may break, with their weights; in
#: ``write+unlink`` the write fails, and then so does the rollback's unlink of the
#: temp (only recover can remove it).
DATA_CALLS = {"write": 4, "fsync": 2, "replace": 1, "rename": 1, "open": 1, "write+unlink": 2}
#: How an audit line may fail: a write, an fsync, the trail's open, or a short
#: write the sink cannot cut back (it leaves a torn line).
AUDIT_MODES = ("write", "fsync", "open", "torn")
ERRNOS = (errno.ENOSPC, errno.EIO)

#: What SQLite calls a full disk and a failed write.
SQLITE_DISK_ERRORS = ("database or disk is full", "disk I/O error")

#: The tmpfs the SQLite databases live on, when one can be mounted.
TMPFS_SIZE = "8m"


@pytest.fixture
def site(tmp_path: Path) -> Any:
    """The test's folders, store and trail."""
    sandbox = Site(tmp_path)
    yield sandbox
    sandbox.close()


def fault_plan(rng: Any, site: Site, counts: dict[str, dict[str, int]]) -> JSON:
    """Which call breaks: on the data folder (the writes of ``atomic_file``) or on the
    audit trail (``JsonlSink`` appends), with which errno, at which matching call."""
    code = rng.choice(ERRNOS)
    if rng.random() < 0.6:
        mode = rng.choices(list(DATA_CALLS), weights=list(DATA_CALLS.values()))[0]
        calls = mode.split("+")
        return {
            "channel": "data",
            "mode": mode,
            "calls": calls,
            "path": str(site.data),
            "exact": False,
            "nth": rng.randint(1, max(1, counts["data"][calls[0]])),
            "errno": code,
            "short": calls[0] == "write" and rng.random() < 0.3,
        }
    mode = rng.choice(AUDIT_MODES)
    counted = "write" if mode == "torn" else mode
    return {
        "channel": "audit",
        "mode": mode,
        "calls": ["write", "ftruncate"] if mode == "torn" else [mode],
        "path": str(site.trail),
        "exact": True,
        "nth": rng.randint(1, max(1, counts["audit"][counted])),
        "errno": code,
        "short": mode == "torn",
    }


def kill_after_fault(rng: Any) -> JSON | None:
    signame = rng.choices(["SIGKILL", "SIGTERM", None], weights=[5, 4, 2])[0]
    if signame is None:
        return None
    return {"signal": signame, "at": "fault", "delay": rng.uniform(0.0, 0.03)}


def judge_files(files: Files, ops: list[JSON], marks: Marks, fault: JSON, site: Site) -> list[str]:
    """Each file old or new as its op's state and error allow; the error names what failed."""
    problems = []
    fired = marks.fault
    for j, op in enumerate(ops):
        kind, state = op["op"], marks.op(j)
        old, new = files.version[kind], op["version"]
        try:
            found = files.found(kind)
        except Exception as exc:
            problems.append(f"{kind} ({state}) is damaged: {type(exc).__name__}: {exc}")
            continue
        files.version[kind] = found
        allowed = {"done": {new}, "not started": {old}, "interrupted": {old, new}}.get(state)
        if state == "failed":
            error = marks.failed[j]
            target = str(site.data / FILES[kind][0])
            if fault["channel"] != "data" or fired is None:
                problems.append(f"{kind} failed with no fault on its path: {error}")
            elif (error["type"], error["errno"]) != ("AtomicWriteError", fault["errno"]):
                problems.append(f"{kind} failed with {error}, not AtomicWriteError({fired})")
            elif target not in error["message"]:
                problems.append(f"{kind}'s error does not name {target}: {error['message']}")
            allowed = {new} if error["committed"] else {old}
        assert allowed is not None
        if found not in allowed:
            problems.append(f"{kind} ({state}) holds version {found}, allowed {sorted(allowed)}")
    return problems


def judge_audit_fault(marks: Marks, fault: JSON) -> list[str]:
    """A failed audit line never fails the work, and the process says the sink failed."""
    problems: list[str] = []
    if fault["channel"] != "audit":
        return problems
    if marks.failed:
        problems.append(f"an audit fault failed the work: {marks.failed}")
    if marks.fault is not None and marks.last is not None:
        codes = {(f["error"] or {}).get("errno") for f in marks.last["failures"]}
        if fault["errno"] not in codes and errno.EIO not in codes:
            problems.append(f"the sink's failure was not reported: {marks.last}")
        if not any(a.startswith("audit_sink") for a in marks.last["alerts"]):
            problems.append(f"no audit_sink alert: {marks.last['alerts']}")
    return problems


class TestStorageFaults:
    def test_file_and_audit_faults(self, chaos_run: ChaosRun, site: Site, tmp_path: Path) -> None:
        """ENOSPC/EIO while writing files and audit lines, then a kill: old or new, chain ok."""
        files = Files(site.data)
        worker = Worker(tmp_path, site.env)
        counts: dict[str, dict[str, int]] = {}
        torn = 0
        try:
            trial = 0
            # Two calibration runs count the matching calls, per channel, of a whole workflow.
            for channel, path, exact in (("data", site.data, False), ("audit", site.trail, True)):
                plan = {"calls": [], "path": str(path), "exact": exact, "nth": 0, "errno": 0}
                ops = [{"op": kind, "version": trial + 1} for kind in FILES]
                report = worker.ask(
                    "trial",
                    **site.spec(
                        workflow_id=f"count-{channel}",
                        ops=ops,
                        fault=plan,
                        portable_rename=True,
                        handlers=False,
                        phases=[5.0, 5.0],
                    ),
                )
                marks = Marks(report)
                assert marks.last is not None, report
                counts[channel] = marks.last["counts"]
                for problem in judge_files(files, ops, marks, {"channel": "none"}, site):
                    chaos_run.violation(trial, problem)
                trial += 1
            first = trial
            for trial in range(first, first + chaos_run.size(FILE_TRIALS)):
                rng = chaos_run.rng(trial)
                kinds = list(FILES)
                rng.shuffle(kinds)
                ops = [{"op": kind, "version": trial + 1} for kind in kinds]
                fault = fault_plan(rng, site, counts)
                kill = kill_after_fault(rng)
                report = worker.ask(
                    "trial",
                    **site.spec(
                        workflow_id=f"storage-{trial}",
                        ops=ops,
                        fault=fault,
                        kill=kill,
                        # renameat2 is a libc call: os.rename is on the path only without it.
                        portable_rename=fault.get("mode") == "rename" or rng.random() < 0.5,
                        handlers=kill is not None and kill["signal"] == "SIGTERM",
                        phases=[5.0, 5.0],
                    ),
                )
                chaos_run.trials += 1
                chaos_run.count_signals(report)
                marks = Marks(report)
                if marks.fault is not None:
                    chaos_run.count("storage_faults")
                    chaos_run.note(f"{fault['channel']} {fault['mode']} faults")
                problems = process_problems(
                    report, marks, signal_planned=kill["signal"] if kill else None
                )
                # The trail as the dead process left it (a torn line only at the end),
                # then as recover leaves it.
                problems += site.check_audit()
                if marks.fault is not None and fault.get("mode") == "torn":
                    torn += bool(site.trail.read_bytes()[-1:] != b"\n")
                _, found = site.recover(worker, cli=trial % 6 == 5)
                problems += found
                problems += judge_files(files, ops, marks, fault, site)
                problems += judge_audit_fault(marks, fault)
                for problem in problems:
                    chaos_run.violation(
                        trial, f"{problem}\n    fault {fault}, kill {kill}, report {report}"
                    )
            chaos_run.note("torn audit tails", torn)
        finally:
            worker.close()
        chaos_run.finish()
        assert chaos_run.counts.get("storage_faults", 0) > 0

    def test_sqlite_faults(self, chaos_run: ChaosRun, site: Site, tmp_path: Path) -> None:
        """A full disk (tmpfs) or EFBIG during a transaction, then a kill: all or nothing."""
        dbs = tmp_path / "dbs-tmpfs"
        dbs.mkdir()
        worker = None
        if shutil.which("unshare") is not None:
            env = {**site.env, "CHAOS_TMPFS": str(dbs)}
            mount = f'mount -t tmpfs -o size={TMPFS_SIZE} chaos "$0" && exec "$@"'
            try:
                worker = Worker(
                    tmp_path, env, prefix=["unshare", "-rm", "sh", "-c", mount, str(dbs)]
                )
            except WorkerDied:
                worker = None
            if worker is not None and not worker.ready["tmpfs"]:
                worker.close()
                worker = None
        tmpfs = worker is not None
        if worker is None:
            dbs = site.dbs
            worker = Worker(tmp_path, site.env)
        chaos_run.note("tmpfs" if tmpfs else "no tmpfs here: EFBIG only")
        try:
            databases = Databases(dbs, worker)
            for trial in range(chaos_run.size(SQLITE_TRIALS)):
                rng = chaos_run.rng(trial)
                scenario = rng.choice(["batch", "migration"])
                fault = rng.choice(["enospc", "efbig", "efbig"] if tmpfs else ["efbig"])
                # Room for roughly half the transactions (measured here).
                room = rng.randint(0, (64 if scenario == "batch" else 32) * 1024)
                op: JSON = {"op": scenario, "batch": trial, "rows": 1000}
                if fault == "efbig":
                    op["efbig"] = room
                else:
                    worker.ask("ballast", dir=str(dbs), free=room)
                signame = rng.choices(["SIGKILL", "SIGTERM", None], weights=[4, 4, 2])[0]
                kill = None
                if signame is not None:
                    kill = {
                        "signal": signame,
                        "at": "op",
                        "index": 0,
                        "of": scenario,
                        "fraction": rng.uniform(0.0, 1.5),
                    }
                report = worker.ask(
                    "trial",
                    **site.spec(
                        workflow_id=f"sqlite-{trial}",
                        dbs=str(dbs),
                        ops=[op],
                        kill=kill,
                        handlers=signame == "SIGTERM",
                        phases=[5.0, 5.0],
                    ),
                )
                if fault == "enospc":
                    worker.ask("ballast", dir=str(dbs), free=4 * 1024 * 1024)
                chaos_run.trials += 1
                chaos_run.count_signals(report)
                marks = Marks(report)
                problems = process_problems(report, marks, signal_planned=signame)
                state = marks.op(0)
                error = marks.failed.get(0)
                if error is not None:
                    if not any(text in error["message"] for text in SQLITE_DISK_ERRORS):
                        problems.append(f"the transaction failed with {error}")
                    else:
                        chaos_run.count("storage_faults")
                        chaos_run.note(f"{fault} errors")
                try:
                    applied = databases.applied(scenario, trial)
                except AssertionError as exc:
                    problems.append(f"{scenario} ({state}): {exc}")
                else:
                    legal = {
                        "done": {True},
                        "failed": {False},
                        "not started": {False},
                        "interrupted": {False, True},
                    }[state]
                    if applied not in legal:
                        problems.append(f"{scenario} was {state} but applied={applied}")
                other = "migration" if scenario == "batch" else "batch"
                try:
                    if not databases.unchanged(other):
                        problems.append(f"{other} changed though no op touched it")
                except AssertionError as exc:
                    problems.append(f"{other}: {exc}")
                _, found = site.recover(worker, cli=trial % 6 == 5)
                problems += found
                for problem in problems:
                    chaos_run.violation(
                        trial,
                        f"{problem}\n    fault {fault} ({room} bytes), kill {kill}, "
                        f"report {report}",
                    )
        finally:
            worker.close()
        chaos_run.finish()
        assert chaos_run.stats.get("enospc errors", 0) + chaos_run.stats.get("efbig errors", 0)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="the chaos suite needs Linux")
