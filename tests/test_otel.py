"""The OpenTelemetry adapter (``termsafe.otel``) against the real SDK, on real kills."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics", reason='needs the "termsafe[otel]" extra and SDK')

from conftest import WAIT, Jobs, TermFactory
from metrics_scenario import PHASES, run_kills, start_cooperative
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import ExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.util.types import Attributes

import termsafe as ts
from termsafe._adapters import BUCKETS
from termsafe.otel import OTelMetricsHook

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "observability.md"

Key = frozenset[tuple[str, Any]]


def _metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    """The ``termsafe`` meter's metrics by name."""
    data = reader.get_metrics_data()
    found: dict[str, Any] = {}
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name == "termsafe":
                found.update({metric.name: metric for metric in scope.metrics})
    return found


def _key(attributes: Attributes) -> Key:
    return frozenset((attributes or {}).items())


def _counter(reader: InMemoryMetricReader, name: str) -> dict[Key, float]:
    """A counter's value per attribute set."""
    metric = _metrics(reader)[name]
    assert isinstance(metric.data, Sum)
    return {_key(p.attributes): p.value for p in metric.data.data_points}


def _histogram(reader: InMemoryMetricReader, name: str) -> dict[Key, HistogramDataPoint]:
    """A histogram's data point per attribute set."""
    metric = _metrics(reader)[name]
    assert isinstance(metric.data, Histogram)
    return {_key(p.attributes): p for p in metric.data.data_points}


def _run(script: str) -> str:
    """Run ``script`` in a fresh interpreter and return what it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TERMSAFE", "OTEL_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return out.stdout


def _probe(script: str) -> Any:
    """Run ``script`` in a fresh interpreter and return the JSON it prints."""
    return json.loads(_run(script))


@pytest.fixture
def reader() -> InMemoryMetricReader:
    """An in-memory metric reader."""
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    """An SDK meter provider read by ``reader``, shut down afterwards."""
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield meter_provider
    meter_provider.shutdown()


@pytest.fixture
def hook(provider: MeterProvider) -> OTelMetricsHook:
    """An adapter on ``provider``."""
    return OTelMetricsHook(provider)


class _BrokenExemplarFilter(ExemplarFilter):
    """An SDK exemplar filter that fails on every measurement, as a broken plug-in would."""

    def should_sample(
        self,
        value: float,
        time_unix_nano: int,
        attributes: Attributes,
        context: Context,
    ) -> bool:
        raise RuntimeError("exemplar store unavailable")


class TestImport:
    def test_termsafe_does_not_import_opentelemetry(self) -> None:
        """Importing termsafe and running a terminator loads no OpenTelemetry module."""
        loaded = _probe(
            "import json, sys, termsafe\n"
            "t = termsafe.Terminator(sink=termsafe.MemorySink()); t.metrics(); t.close()\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry'))))\n"
        )
        assert [] == loaded

    def test_missing_api_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the OpenTelemetry API, importing termsafe.otel says which extra to install."""
        monkeypatch.setitem(sys.modules, "opentelemetry", None)
        monkeypatch.delitem(sys.modules, "termsafe.otel")
        with pytest.raises(ImportError, match=r'pip install "termsafe\[otel\]"') as info:
            importlib.import_module("termsafe.otel")
        assert "opentelemetry" == info.value.name


class TestOTelMetricsHook:
    def test_is_a_metrics_hook(self, hook: OTelMetricsHook) -> None:
        """The adapter satisfies the ``MetricsHook`` protocol."""
        assert isinstance(hook, ts.MetricsHook)

    def test_counts_real_kills(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        hook: OTelMetricsHook,
        reader: InMemoryMetricReader,
    ) -> None:
        """A terminated, a killed and a refused kill are counted by outcome, state, orphan kind."""
        run_kills(make_term(PHASES, metrics_hook=hook), jobs)
        assert {
            frozenset({("outcome", "accepted")}): 2,
            frozenset({("outcome", "refused")}): 1,
        } == _counter(reader, "termsafe.kills")
        assert {
            frozenset({("final_state", "terminated")}): 1,
            frozenset({("final_state", "killed")}): 1,
        } == _counter(reader, "termsafe.kills_finished")
        assert {frozenset({("kind", "thread")}): 1} == _counter(reader, "termsafe.orphans")
        assert 0 == hook.failures

    def test_histograms_time_real_kills(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        hook: OTelMetricsHook,
        reader: InMemoryMetricReader,
    ) -> None:
        """Kill latency (per final state) and cleanup time are histograms in seconds."""
        scenario = run_kills(make_term(PHASES, metrics_hook=hook), jobs)
        latency = _histogram(reader, "termsafe.kill.latency")
        assert {
            frozenset({("final_state", "terminated")}),
            frozenset({("final_state", "killed")}),
        } == set(latency)
        terminated = latency[frozenset({("final_state", "terminated")})]
        killed = latency[frozenset({("final_state", "killed")})]
        assert (1, 1) == (terminated.count, killed.count)
        assert 0 < terminated.sum < WAIT
        # The system phase comes a forced window after a forced kill, not before.
        assert scenario.forced_window - 0.001 <= killed.sum < WAIT  # 1 ms of float rounding
        assert BUCKETS == tuple(killed.explicit_bounds)
        cleanup = _histogram(reader, "termsafe.cleanup.duration")
        assert [frozenset()] == list(cleanup)
        assert 2 == cleanup[frozenset()].count
        assert 0 <= cleanup[frozenset()].sum < WAIT
        units = {name: metric.unit for name, metric in _metrics(reader).items()}
        assert {
            "termsafe.kills": "{kill}",
            "termsafe.kills_finished": "{kill}",
            "termsafe.kill.latency": "s",
            "termsafe.cleanup.duration": "s",
            "termsafe.orphans": "{orphan}",
        } == units

    def test_attributes_carry_no_ids(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        hook: OTelMetricsHook,
        reader: InMemoryMetricReader,
    ) -> None:
        """Attribute keys are outcome, final_state, kind; no value is an id, principal or reason."""
        scenario = run_kills(make_term(PHASES, metrics_hook=hook), jobs)
        keys: set[str] = set()
        values: set[str] = set()
        for metric in _metrics(reader).values():
            for point in metric.data.data_points:
                attributes: Mapping[str, Any] = point.attributes or {}
                keys.update(attributes)
                values.update(str(v) for v in attributes.values())
        assert {"outcome", "final_state", "kind"} == keys
        assert {"accepted", "refused", "terminated", "killed", "thread"} == values
        assert set() == {v for v in values if any(s in v for s in scenario.secrets)}

    def test_unknown_values_are_reported_as_other(
        self, hook: OTelMetricsHook, reader: InMemoryMetricReader
    ) -> None:
        """A value outside the known set becomes ``other``, so callers cannot grow the set."""
        hook.kill_requested(outcome="wf-123")
        hook.kill_finished(final_state="wf-123", latency_s=0.5)
        hook.orphan_detected(kind="wf-123")
        assert {frozenset({("outcome", "other")}): 1} == _counter(reader, "termsafe.kills")
        assert {frozenset({("final_state", "other")}): 1} == _counter(
            reader, "termsafe.kills_finished"
        )
        assert {frozenset({("kind", "other")}): 1} == _counter(reader, "termsafe.orphans")

    def test_two_providers_do_not_collide(self, make_term: TermFactory) -> None:
        """Two terminators on two meter providers count only their own kills."""
        readers = [InMemoryMetricReader(), InMemoryMetricReader()]
        providers = [MeterProvider(metric_readers=[r], shutdown_on_exit=False) for r in readers]
        try:
            terms = [make_term(metrics_hook=OTelMetricsHook(p)) for p in providers]
            for term, refusals in zip(terms, (2, 1), strict=True):
                for _ in range(refusals):
                    with pytest.raises(ts.KillRefused):
                        term.kill("missing", by=ts.Principal("alice"))
            assert [
                {frozenset({("outcome", "refused")}): 2},
                {frozenset({("outcome", "refused")}): 1},
            ] == [_counter(r, "termsafe.kills") for r in readers]
        finally:
            for meter_provider in providers:
                meter_provider.shutdown()

    def test_default_is_the_global_provider_even_if_set_later(self) -> None:
        """Without a provider the hook uses the global one, forwarded once the app sets it."""
        counted = _probe(
            "import json, termsafe\n"
            "from opentelemetry import metrics\n"
            "from opentelemetry.sdk.metrics import MeterProvider\n"
            "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
            "from termsafe.otel import OTelMetricsHook\n"
            "hook = OTelMetricsHook()\n"
            "reader = InMemoryMetricReader()\n"
            "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
            "term = termsafe.Terminator(sink=termsafe.MemorySink(), metrics_hook=hook)\n"
            "try:\n"
            "    term.kill('missing', by=termsafe.Principal('alice'))\n"
            "except termsafe.KillRefused:\n"
            "    pass\n"
            "term.close()\n"
            "data = reader.get_metrics_data()\n"
            "print(json.dumps([[m.name, [dict(p.attributes) for p in m.data.data_points]]\n"
            "    for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics]))\n"
        )
        assert [["termsafe.kills", [{"outcome": "refused"}]]] == counted

    def test_docs_example_runs(self) -> None:
        """The example in docs/observability.md runs, and its exporter shows the kill counter."""
        blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
        example = next(b for b in blocks if "from termsafe.otel import" in b)
        printed = _run(
            example + "try:\n"
            "    term.kill('missing', by=ts.Principal('alice'))\n"
            "except ts.KillRefused:\n"
            "    pass\n"
            "term.close()\n"
            "metrics.get_meter_provider().force_flush()\n"
        )
        assert '"name": "termsafe.kills"' in printed
        assert '"outcome": "refused"' in printed

    def test_sdk_failure_is_logged_once_and_never_reaches_the_kill(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An SDK raising on every measurement does not stop a kill; one warning, all counted."""
        provider = MeterProvider(
            metric_readers=[reader],
            exemplar_filter=_BrokenExemplarFilter(),
            shutdown_on_exit=False,
        )
        try:
            hook = OTelMetricsHook(provider)
            term = make_term(PHASES, metrics_hook=hook)
            start_cooperative(term, jobs, "coop")
            with caplog.at_level(logging.WARNING, logger="termsafe.metrics"):
                handle = term.kill("coop", by=ts.Principal("alice"))
                assert ts.WorkflowState.TERMINATED == handle.wait(WAIT)
        finally:
            provider.shutdown()
        # kill_requested, cleanup_finished, kill_finished: each failed once.
        assert 3 == hook.failures
        logged = [r for r in caplog.records if r.name == "termsafe.metrics"]
        assert 1 == len(logged)
        assert "OTelMetricsHook.kill_requested" in logged[0].getMessage()
        assert logged[0].exc_info is not None
        assert "exemplar store unavailable" == str(logged[0].exc_info[1])
        assert 1 == term.metrics().kills_succeeded

    @pytest.mark.parametrize(
        ("kwargs", "error", "fragment"),
        [
            ({"meter_provider": "global"}, ts.InvalidArgumentType, "'global'"),
            ({"meter_name": 7}, ts.InvalidArgumentType, "7"),
            ({"meter_name": ""}, ts.ConfigurationError, "''"),
        ],
    )
    def test_bad_arguments_name_the_value(
        self, kwargs: dict[str, Any], error: type[Exception], fragment: str
    ) -> None:
        """A bad argument raises a termsafe error naming it."""
        with pytest.raises(error, match=fragment):
            OTelMetricsHook(**kwargs)
