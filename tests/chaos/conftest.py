"""The chaos suite's fixtures, its per-test time limit and the summary line.

``--chaos-runs N`` (registered in ``tests/conftest.py``) runs N times as many
trials; the base seed is the termsafe plugin's chaos seed (``--chaos-seed``,
else a random one, shown in the report header).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos._harness import ChaosRun, Tally
from termsafe.pytest_plugin import _SEED

_TALLY = pytest.StashKey[Tally]()

#: pytest-timeout's limit for one chaos test at ``--chaos-runs 1`` (it scales with N).
TIMEOUT = 180.0


def _tally(config: pytest.Config) -> Tally:
    tally = config.stash.get(_TALLY, None)
    if tally is None:
        tally = config.stash[_TALLY] = Tally()
        tally.base_seed = config.stash[_SEED]
        tally.runs = _runs(config)
    return tally


def _runs(config: pytest.Config) -> int:
    runs = config.getoption("--chaos-runs")
    if not isinstance(runs, int) or runs < 1:
        raise pytest.UsageError(f"--chaos-runs must be a whole number >= 1 (got {runs!r})")
    return runs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each chaos test pytest-timeout's limit times ``--chaos-runs``."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    runs = _runs(config)
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(pytest.mark.timeout(TIMEOUT * runs))


@pytest.fixture
def chaos_run(request: pytest.FixtureRequest) -> Iterator[ChaosRun]:
    """This test's seed, trial count, violations and counters (added to the summary)."""
    if sys.platform != "linux":
        pytest.skip("the chaos suite needs Linux (fork, prctl, /proc)")
    config = request.config
    run = ChaosRun(config.stash[_SEED], _runs(config), request.node.nodeid, _tally(config))
    yield run
    run.record()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Print what the chaos tests of this run did, when any ran."""
    tally = config.stash.get(_TALLY, None)
    if tally is None or not tally.tests:
        return
    terminalreporter.write_sep("-", "termsafe chaos suite")
    terminalreporter.write_line(tally.line())
    terminalreporter.write_line(tally.details())
    if config.get_verbosity() > 0:
        for note in tally.notes:
            terminalreporter.write_line(f"  {note}")
