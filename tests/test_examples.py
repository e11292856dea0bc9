"""Every example runs on its own and says what its docstring promises."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# test_*.py examples are pytest files: they are run with pytest, below.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("test_"))


@functools.cache
def _run(path: Path, *, pytest_file: bool = False) -> subprocess.CompletedProcess[str]:
    # Cached: each example runs once per session, whichever tests ask for it.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = (
        [sys.executable, "-m", "pytest", "-q", str(path)]
        if pytest_file
        else [sys.executable, str(path)]
    )
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )


def _out(name: str) -> str:
    result = _run(ROOT / "examples" / name)
    assert 0 == result.returncode, result.stderr
    return result.stdout


class TestExamples:
    @pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
    def test_example_exits_cleanly(self, path: Path) -> None:
        """Each example runs to completion with exit code 0."""
        result = _run(path)
        assert 0 == result.returncode, result.stderr

    def test_readme_example_terminates(self) -> None:
        """The README example's workflow closes its connection and ends terminated."""
        assert ["connections closed", "terminated"] == _out("readme_example.py").splitlines()

    def test_async_example_terminates_on_both_backends(self) -> None:
        """The async example's kill is deferred, then terminates on asyncio and trio."""
        out = _out("async_workflow.py")
        for backend in ("asyncio", "trio"):
            assert f"{backend}: terminated; ['batch committed', 'connection closed']" in out
            assert f"{backend}: kill deferred=True, final=terminated" in out

    def test_trio_native_example_defers_then_terminates(self) -> None:
        """In plain trio code the kill is deferred by the section, then the workflow terminates."""
        lines = _out("async_trio.py").splitlines()
        assert ["kill requested, deferred=True", "batch committed", "connection closed"] == lines[
            :3
        ]
        assert ["kill finished: terminated", "workflow ended terminated"] == sorted(lines[3:])

    def test_git_example_leaves_a_clean_repository_both_ways(self) -> None:
        """Killed inside git commit, within and past the grace: terminated, fsck clean, no lock."""
        out = _out("git_workflow.py")
        assert 2 == out.count("git fsck --full: clean; lock files left: none")
        assert 2 == out.count("kill requested while git commit runs; deferred: True")
        assert "branches ['main', 'release-1.4']" in out
        assert "branches ['main']\n" in out

    def test_migration_example_is_all_or_nothing(self) -> None:
        """The killed migration leaves the schema untouched; the re-run applies all of it."""
        out = _out("db_migration.py")
        assert "after kill:   {'user_version': 1, 'columns': ['id', 'name']" in out
        assert "after re-run: {'user_version': 2, 'columns': ['id', 'name', 'label']" in out
        assert out.endswith("the migration was applied all or nothing: OK\n")

    def test_payment_example_charges_once_and_refunds_once(self) -> None:
        """The kill defers past the charge, the refund runs once, the replay does not charge."""
        out = _out("payment.py")
        assert "kill while the charge is on the wire: deferred=True" in out
        assert "charge replayed from the record: ch_1 (server not called)" in out
        assert "server books: charges {'charge-order-42': 1}, refunds {'refund-ch_1': 1}" in out

    def test_supervised_example_leaves_no_process(self) -> None:
        """The supervised tree climbs the whole ladder, ends killed, and no process survives."""
        out = _out("supervised.py")
        for phase in ("graceful: SIGTERM", "forced: SIGTERM", "system: SIGKILL"):
            assert phase in out
        assert "processes of the tree still alive: none" in out
        assert "$ termsafe ps --all  -> [('batch-7', 'killed')]" in out

    def test_timeline_example_draws_a_terminated_kill(self) -> None:
        """The timeline example's workflow is deferred, terminated, and its trail verifies."""
        out = _out("timeline_example.py")
        assert "kill requested; deferred by the db section: True" in out
        assert "hooks ran (LIFO): roll_back_batch, remove_temp_files, close_connection" in out
        assert "audit trail verified: " in out

    def test_pytest_fixtures_example_passes(self) -> None:
        """``python -m pytest examples/test_with_fixtures.py`` passes all six of its tests."""
        result = _run(ROOT / "examples" / "test_with_fixtures.py", pytest_file=True)
        assert 0 == result.returncode, result.stdout + result.stderr
        assert re.search(r"^6 passed in ", result.stdout, re.MULTILINE), result.stdout
