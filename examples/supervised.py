"""A process tree run under the supervisor (``termsafe run``), killed, and nothing left alive.

The supervised command is a small batch job that starts two workers: one
cooperative, one that ignores SIGTERM (a stuck native library, say), and the
job itself ignores SIGTERM too. The example starts it with ``termsafe run``,
then kills it by id with ``termsafe kill`` (as the OS user running the
example, the owner of the run). The supervisor climbs the ladder: SIGTERM to
the process group (graceful), SIGTERM to the whole tree (forced), SIGKILL to
what is left (system). Afterwards psutil confirms every process of the tree
is gone, ``termsafe ps --all`` shows the run ``killed``, and the audit trail
verifies.

Everything lives in a temporary ``TERMSAFE_HOME``. Run it:
``python examples/supervised.py``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import IO

import psutil

WAIT = 30.0

# The supervised command. One os.write per line: the processes share the pipe.
JOB = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    role = sys.argv[1]
    if role in ("job", "stuck-worker"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if role == "job":
        subprocess.Popen([sys.executable, __file__, "worker"])
        subprocess.Popen([sys.executable, __file__, "stuck-worker"])
    os.write(1, f"{role} {os.getpid()}\\n".encode())
    while True:
        signal.pause()
    """
)


class Lines:
    """A pipe read line by line by a thread, so the example waits for lines with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str) -> str:
        """The next line containing ``text``."""
        while True:
            line = self._queue.get(timeout=WAIT)
            if line is None:
                raise RuntimeError(f"the supervisor's output ended before {text!r}")
            if text in line:
                return line.strip()


def alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie is dead: it only waits to be reaped)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            continue
    return running


def termsafe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``termsafe`` command."""
    return subprocess.run(
        [sys.executable, "-m", "termsafe", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=WAIT,
        check=False,
    )


def main() -> None:
    """Start the job under the supervisor, kill it, check that the tree is gone."""
    with tempfile.TemporaryDirectory(prefix="ts-example-") as tmp:
        job = Path(tmp) / "job.py"
        job.write_text(JOB)
        env = {**os.environ, "TERMSAFE_HOME": str(Path(tmp) / "home")}
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "termsafe", "run", "-v", "--id", "batch-7",
             "--graceful", "0.5", "--forced", "0.5", "--",
             sys.executable, str(job), "job"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        assert supervisor.stdout is not None
        assert supervisor.stderr is not None
        out, err = Lines(supervisor.stdout), Lines(supervisor.stderr)
        try:
            print(err.wait_for("started"))
            pids: dict[str, int] = {}
            while len(pids) < 3:
                role, pid = out.wait_for(" ").split()
                pids[role] = int(pid)
            print(f"the tree: {pids}; alive: {len(alive(list(pids.values())))}")

            kill = termsafe(env, "kill", "batch-7", "--reason", "nightly window closed")
            print(f"$ termsafe kill batch-7 --reason ...  -> {kill.stdout.strip()}")
            assert kill.returncode == 0, kill.stderr
            for phase in ("graceful", "forced", "system"):
                print(err.wait_for(f"{phase}:"))
            code = supervisor.wait(WAIT)
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
                supervisor.wait(WAIT)
                termsafe(env, "recover")  # stop whatever a failed run left of the tree
        print(f"supervisor exited {code} (128 + SIGKILL: the job had to be killed)")
        assert code == 128 + signal.SIGKILL, code
        left = alive(list(pids.values()))
        print(f"processes of the tree still alive: {left or 'none'}")
        assert not left, left

        runs = json.loads(termsafe(env, "ps", "--all", "--json").stdout)
        print(f"$ termsafe ps --all  -> {[(r['workflow_id'], r['state']) for r in runs]}")
        assert [(r["workflow_id"], r["state"]) for r in runs] == [("batch-7", "killed")]
        verify = termsafe(env, "audit", "verify", str(Path(tmp) / "home" / "audit.jsonl"))
        print(f"$ termsafe audit verify ...  -> {verify.stdout.strip()}")
        assert verify.returncode == 0, verify.stdout


if __name__ == "__main__":
    main()
