"""Process-tree helpers: kill_tree and what counts as gone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psutil
import pytest
from conftest import WAIT

from termsafe._procs import kill_tree

# The parent forks a child that exits at once, and never reaps it: the child
# stays a zombie that only its parent (or init, once the parent is gone) can reap.
_ZOMBIE_PARENT = textwrap.dedent(
    """
    import os, sys
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    print(pid, flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def zombie() -> Iterator[psutil.Process]:
    """A zombie process whose parent is alive and is not this test process."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _ZOMBIE_PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        proc = psutil.Process(int(parent.stdout.readline()))
        # It exits at once; wait (bounded) until the kernel shows it dead.
        assert _until_zombie(proc), f"child {proc.pid} did not become a zombie"
        yield proc
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(WAIT)
        assert parent.stdout is not None
        parent.stdout.close()


def _until_zombie(proc: psutil.Process) -> bool:
    """Wait (bounded) until ``proc`` has exited: the kernel shows its exit asynchronously."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return False
        psutil.wait_procs([proc], timeout=0.01)
    return False


class TestKillTree:
    def test_a_zombie_not_ours_counts_as_gone(self, zombie: psutil.Process) -> None:
        """A dead process another parent has not reaped yet is gone, not a survivor."""
        assert psutil.STATUS_ZOMBIE == zombie.status()
        result = kill_tree(zombie.pid, zombie.create_time(), timeout=WAIT)
        assert () == result.survivors
        # Still there as a zombie: nothing could reap it but its own parent.
        assert psutil.STATUS_ZOMBIE == zombie.status()
