"""Every example runs on its own and says what its docstring promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )


class TestExamples:
    @pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
    def test_example_exits_cleanly(self, path: Path) -> None:
        """Each example runs to completion with exit code 0."""
        result = _run(path)
        assert 0 == result.returncode, result.stderr

    def test_readme_example_terminates(self) -> None:
        """The README example's workflow closes its connection and ends terminated."""
        out = _run(ROOT / "examples" / "readme_example.py").stdout.splitlines()
        assert ["connections closed", "terminated"] == out

    def test_async_example_terminates_on_both_backends(self) -> None:
        """The async example's kill is deferred, then terminates on asyncio and trio."""
        out = _run(ROOT / "examples" / "async_workflow.py").stdout
        for backend in ("asyncio", "trio"):
            assert f"{backend}: terminated; ['batch committed', 'connection closed']" in out
            assert f"{backend}: kill deferred=True, final=terminated" in out
