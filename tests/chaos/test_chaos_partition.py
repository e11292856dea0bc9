"""Chaos: network partitions during kills.

Each trial's workflow makes one or two idempotent charges to the local counting
server, which partitions the first request under a key as planned: it drops
or resets the connection before or after performing the charge, or stalls
(before performing it, or mid-response with half the body sent) until the
trial is over. The workflow process is killed meanwhile: right after a stall
began (the server tells the worker through a pipe), or at a random moment of
a call. Afterwards every record must be replayable (``done``, with the one
charge's result), retryable with nothing sent, or unknown; the server never
counts two charges under one key; and a later process, resolving unknown
outcomes from the server's own count as an operator would, ends every key
``done`` with exactly one charge.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from chaos._harness import (
    JSON,
    PARTITIONS,
    ChaosRun,
    Marks,
    PartitionServer,
    Site,
    Worker,
    process_problems,
    settle_key,
)

#: Trials per ``--chaos-runs``.
TRIALS = 36
MODES = ("auto", "explicit", "dedupes")

#: Short enough that the ladder of a SIGTERMed process blocked on a stalled answer
#: reaches the system phase within the stall (the api section's grace, then the
#: forced phase); the client's socket timeout is only a backstop.
GRACE = {"api": 0.3}
PHASES = [0.3, 0.3]
HTTP_TIMEOUT = 5.0
STATES = ("terminated", "completed", "killed")


@pytest.fixture
def site(tmp_path: Path) -> Any:
    """The test's folders, store and trail."""
    sandbox = Site(tmp_path)
    yield sandbox
    sandbox.close()


def plan(rng: Any, trial: int, server: PartitionServer) -> tuple[list[JSON], JSON]:
    """The trial's calls, each key's partition, and where the kill lands."""
    ops: list[JSON] = []
    stalls = []
    for i in range(rng.randint(1, 2)):
        key = f"p{trial}-{i}"
        ops.append({"op": "api", "key": key, "mode": rng.choice(MODES)})
        action = rng.choice([*PARTITIONS, "stall_mid", None])
        if action is not None:
            # A stall ends (the connection drops) before or after the SIGTERM ladder
            # gives up on the blocked thread: both endings happen.
            server.plan(key, action, str(trial), hold=rng.uniform(0.2, 1.5))
            if action.startswith("stall"):
                stalls.append(i)
    signame = rng.choice(["SIGKILL", "SIGTERM"])
    if stalls and rng.random() < 0.85:
        kill = {"signal": signame, "at": "stall", "token": trial, "delay": rng.uniform(0, 0.03)}
    else:
        index = rng.randrange(len(ops))
        kill = {
            "signal": signame,
            "at": "op",
            "index": index,
            "of": "api",
            "fraction": rng.uniform(0.0, 1.5),
        }
    kill["term_deadline"] = 15.0
    return ops, kill


class TestPartitions:
    def test_partition_during_kill(self, chaos_run: ChaosRun, site: Site, tmp_path: Path) -> None:
        """Dropped, reset and stalled calls killed mid-way: never two charges under a key."""
        notify_r, notify_w = os.pipe()
        server = PartitionServer(notify_fd=notify_w)
        worker = None
        try:
            worker = Worker(tmp_path, site.env, pass_fds=[notify_r])
            # Calibrate: one undisturbed call tells the worker how long a call takes.
            calls = [{"op": "api", "key": f"calibrate-{i}", "mode": m} for i, m in enumerate(MODES)]
            report = worker.ask(
                "trial",
                **site.spec(
                    workflow_id="calibrate",
                    ops=calls,
                    handlers=False,
                    phases=PHASES,
                    port=server.port,
                ),
            )
            assert 0 == report["exit"], report
            for trial in range(chaos_run.size(TRIALS)):
                rng = chaos_run.rng(trial)
                ops, kill = plan(rng, trial, server)
                if kill["at"] == "stall":
                    kill["stall_fd"] = notify_r
                report = worker.ask(
                    "trial",
                    **site.spec(
                        workflow_id=f"partition-{trial}",
                        ops=ops,
                        kill=kill,
                        handlers=kill["signal"] == "SIGTERM",
                        phases=PHASES,
                        grace=GRACE,
                        port=server.port,
                        http_timeout=HTTP_TIMEOUT,
                    ),
                )
                server.release()
                chaos_run.trials += 1
                chaos_run.count_signals(report)
                marks = Marks(report)
                partitioned = [op["key"] for op in ops if op["key"] in server.applied]
                if partitioned:
                    chaos_run.count("partitions")
                    for key in partitioned:
                        chaos_run.note(server.applied[key])
                # A thread blocked on a stalled answer cannot be interrupted: the
                # system phase abandons it, runs its hooks and marks it killed.
                problems = process_problems(
                    report, marks, signal_planned=kill["signal"], states=STATES
                )
                problems += [
                    f"op {j} raised {error}"
                    for j, error in marks.failed.items()
                    if ops[j]["key"] not in server.applied
                ]
                _, found = site.recover(worker, cli=trial % 6 == 5)
                problems += found
                for op in ops:
                    problems += settle_key(site.store, server, op["key"], op["mode"])
                for problem in problems:
                    chaos_run.violation(
                        trial,
                        f"{problem}\n    ops {ops}, kill {kill}, "
                        f"partitions {partitioned}, report {report}",
                    )
        finally:
            if worker is not None:
                worker.close()
            server.close()
            os.close(notify_r)
            os.close(notify_w)
        assert [] == server.errors
        chaos_run.finish()
        assert chaos_run.counts.get("partitions", 0) > 0


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="the chaos suite needs Linux")
