"""The Prometheus adapter (``termsafe.prometheus``) against the real client, on real kills."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason='needs the "termsafe[prometheus]" extra')

from conftest import WAIT, Jobs, TermFactory
from metrics_scenario import PHASES, run_kills, start_cooperative
from prometheus_client import CollectorRegistry, Counter, values

import termsafe as ts
from termsafe._adapters import BUCKETS
from termsafe.prometheus import PrometheusMetricsHook

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "observability.md"


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample in ``registry`` (but the ``_created`` timestamps) by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


class _FullDiskValue(values.MutexValue):
    """A metric value store that fails every update, as a full multiprocess directory would."""

    def inc(self, amount: float) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry (never the global one)."""
    return CollectorRegistry()


@pytest.fixture
def hook(registry: CollectorRegistry) -> PrometheusMetricsHook:
    """An adapter registered in ``registry``."""
    return PrometheusMetricsHook(registry)


class TestImport:
    def test_termsafe_does_not_import_prometheus_client(self) -> None:
        """Importing termsafe and running a terminator loads no prometheus_client module."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TERMSAFE", "PROMETHEUS"))}
        env["PYTHONPATH"] = str(ROOT)
        script = (
            "import json, sys, termsafe\n"
            "t = termsafe.Terminator(sink=termsafe.MemorySink()); t.metrics(); t.close()\n"
            "loaded = [m for m in sys.modules if m.startswith('prometheus_client')]\n"
            "print(json.dumps(loaded))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        assert [] == json.loads(out.stdout)

    def test_missing_client_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without prometheus-client, importing termsafe.prometheus says which extra to install."""
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        monkeypatch.delitem(sys.modules, "termsafe.prometheus")
        with pytest.raises(ImportError, match=r'pip install "termsafe\[prometheus\]"') as info:
            importlib.import_module("termsafe.prometheus")
        assert "prometheus_client" == info.value.name


class TestPrometheusMetricsHook:
    def test_is_a_metrics_hook(self, hook: PrometheusMetricsHook) -> None:
        """The adapter satisfies the ``MetricsHook`` protocol."""
        assert isinstance(hook, ts.MetricsHook)

    def test_known_series_start_at_zero(
        self, hook: PrometheusMetricsHook, registry: CollectorRegistry
    ) -> None:
        """Every known label value is exported at 0 before anything happens."""
        counters = {key: value for key, value in _samples(registry).items() if "_total" in key[0]}
        assert {
            ("termsafe_kills_total", frozenset({("outcome", "accepted")})): 0.0,
            ("termsafe_kills_total", frozenset({("outcome", "refused")})): 0.0,
            ("termsafe_kills_finished_total", frozenset({("final_state", "completed")})): 0.0,
            ("termsafe_kills_finished_total", frozenset({("final_state", "failed")})): 0.0,
            ("termsafe_kills_finished_total", frozenset({("final_state", "killed")})): 0.0,
            ("termsafe_kills_finished_total", frozenset({("final_state", "terminated")})): 0.0,
            ("termsafe_orphans_total", frozenset({("kind", "process")})): 0.0,
            ("termsafe_orphans_total", frozenset({("kind", "thread")})): 0.0,
        } == counters

    def test_counts_real_kills(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        hook: PrometheusMetricsHook,
        registry: CollectorRegistry,
    ) -> None:
        """A terminated, a killed and a refused kill are counted by outcome, state, orphan kind."""
        run_kills(make_term(PHASES, metrics_hook=hook), jobs)
        get = registry.get_sample_value
        assert (2.0, 1.0) == (
            get("termsafe_kills_total", {"outcome": "accepted"}),
            get("termsafe_kills_total", {"outcome": "refused"}),
        )
        assert (1.0, 1.0, 0.0, 0.0) == tuple(
            get("termsafe_kills_finished_total", {"final_state": state})
            for state in ("terminated", "killed", "completed", "failed")
        )
        assert (1.0, 0.0) == (
            get("termsafe_orphans_total", {"kind": "thread"}),
            get("termsafe_orphans_total", {"kind": "process"}),
        )
        assert 0 == hook.failures

    def test_histograms_time_real_kills(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        hook: PrometheusMetricsHook,
        registry: CollectorRegistry,
    ) -> None:
        """Kill latency (per final state) and cleanup time are histograms in seconds."""
        scenario = run_kills(make_term(PHASES, metrics_hook=hook), jobs)
        get = registry.get_sample_value
        terminated = {"final_state": "terminated"}
        killed = {"final_state": "killed"}
        assert (1.0, 1.0) == (
            get("termsafe_kill_latency_seconds_count", terminated),
            get("termsafe_kill_latency_seconds_count", killed),
        )
        terminated_sum = get("termsafe_kill_latency_seconds_sum", terminated)
        killed_sum = get("termsafe_kill_latency_seconds_sum", killed)
        assert terminated_sum is not None
        assert killed_sum is not None
        assert 0 < terminated_sum < WAIT
        # The system phase comes a forced window after a forced kill, not before.
        assert scenario.forced_window - 0.001 <= killed_sum < WAIT  # 1 ms of float rounding
        # The killed kill fell in the first bucket at or above its latency.
        bounds = [b for b in BUCKETS if b >= killed_sum]
        assert 1.0 == get("termsafe_kill_latency_seconds_bucket", {**killed, "le": str(bounds[0])})
        # termsafe's buckets reach the 60 s cleanup alert and beyond (the client's stop at 10 s).
        assert 1.0 == get("termsafe_kill_latency_seconds_bucket", {**killed, "le": "300.0"})
        assert 2.0 == get("termsafe_cleanup_duration_seconds_count")
        cleanup_sum = get("termsafe_cleanup_duration_seconds_sum")
        assert cleanup_sum is not None
        assert 0 <= cleanup_sum < WAIT

    def test_labels_carry_no_ids(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        hook: PrometheusMetricsHook,
        registry: CollectorRegistry,
    ) -> None:
        """Labels are outcome, final_state, kind (and le); no value is an id, principal, reason."""
        scenario = run_kills(make_term(PHASES, metrics_hook=hook), jobs)
        labels = {label for _, labels in _samples(registry) for label in labels}
        assert {"outcome", "final_state", "kind", "le"} == {name for name, _ in labels}
        assert {"accepted", "refused", "completed", "failed", "terminated", "killed"} | {
            "process",
            "thread",
        } == {value for name, value in labels if name != "le"}
        assert set() == {v for _, v in labels if any(s in v for s in scenario.secrets)}

    def test_unknown_values_are_reported_as_other(
        self, hook: PrometheusMetricsHook, registry: CollectorRegistry
    ) -> None:
        """A value outside the known set becomes ``other``, so callers cannot grow the set."""
        hook.kill_requested(outcome="wf-123")
        hook.kill_finished(final_state="wf-123", latency_s=0.5)
        hook.orphan_detected(kind="wf-123")
        get = registry.get_sample_value
        assert (1.0, 1.0, 1.0, 1.0) == (
            get("termsafe_kills_total", {"outcome": "other"}),
            get("termsafe_kills_finished_total", {"final_state": "other"}),
            get("termsafe_kill_latency_seconds_count", {"final_state": "other"}),
            get("termsafe_orphans_total", {"kind": "other"}),
        )
        assert None is get("termsafe_kills_total", {"outcome": "wf-123"})

    def test_two_registries_do_not_collide(self, make_term: TermFactory) -> None:
        """Two terminators with hooks on two registries count only their own kills."""
        registries = [CollectorRegistry(), CollectorRegistry()]
        terms = [make_term(metrics_hook=PrometheusMetricsHook(r)) for r in registries]
        for term, refusals in zip(terms, (2, 1), strict=True):
            for _ in range(refusals):
                with pytest.raises(ts.KillRefused):
                    term.kill("missing", by=ts.Principal("alice"))
        assert [2.0, 1.0] == [
            r.get_sample_value("termsafe_kills_total", {"outcome": "refused"}) for r in registries
        ]

    def test_one_registry_takes_two_namespaces(self, registry: CollectorRegistry) -> None:
        """Two hooks may share a registry under different namespaces."""
        first = PrometheusMetricsHook(registry)
        second = PrometheusMetricsHook(registry, namespace="batch")
        first.kill_requested(outcome="refused")
        second.kill_requested(outcome="accepted")
        get = registry.get_sample_value
        assert (1.0, 0.0, 1.0) == (
            get("termsafe_kills_total", {"outcome": "refused"}),
            get("batch_kills_total", {"outcome": "refused"}),
            get("batch_kills_total", {"outcome": "accepted"}),
        )

    def test_duplicate_registration_is_refused_and_rolled_back(
        self, registry: CollectorRegistry
    ) -> None:
        """A name already in the registry raises ConfigurationError and registers nothing."""
        Counter("orphans", "someone else's", namespace="termsafe", registry=registry)
        with pytest.raises(ts.ConfigurationError, match="'termsafe'"):
            PrometheusMetricsHook(registry)
        assert None is registry.get_sample_value("termsafe_kills_total", {"outcome": "accepted"})
        assert 0.0 == registry.get_sample_value("termsafe_orphans_total")

    def test_docs_example_runs(self) -> None:
        """The example in docs/observability.md runs and its registry exports the kill counter."""
        blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
        example = next(b for b in blocks if "from termsafe.prometheus import" in b)
        script = example + (
            "from prometheus_client import generate_latest\n"
            "term.close()\n"
            "assert callable(metrics_app)\n"
            "print(generate_latest(registry).decode())\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS")},
                "PYTHONPATH": str(ROOT),
            },
            timeout=60,
            check=True,
        )
        assert 'termsafe_kills_total{outcome="accepted"} 0.0' in out.stdout.splitlines()

    def test_client_failure_is_logged_once_and_never_reaches_the_kill(
        self,
        make_term: TermFactory,
        jobs: Jobs,
        registry: CollectorRegistry,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Metric values that fail every update do not stop a kill; one warning, all counted."""
        with monkeypatch.context() as patch:
            patch.setattr(values, "ValueClass", _FullDiskValue)
            hook = PrometheusMetricsHook(registry)
        term = make_term(PHASES, metrics_hook=hook)
        start_cooperative(term, jobs, "coop")
        with caplog.at_level(logging.WARNING, logger="termsafe.metrics"):
            handle = term.kill("coop", by=ts.Principal("alice"))
            assert ts.WorkflowState.TERMINATED == handle.wait(WAIT)
        # kill_requested, cleanup_finished, kill_finished: each failed once.
        assert 3 == hook.failures
        logged = [r for r in caplog.records if r.name == "termsafe.metrics"]
        assert 1 == len(logged)
        assert "PrometheusMetricsHook.kill_requested" in logged[0].getMessage()
        assert logged[0].exc_info is not None
        assert errno.ENOSPC == getattr(logged[0].exc_info[1], "errno", None)
        assert 1 == term.metrics().kills_succeeded

    @pytest.mark.parametrize(
        ("args", "kwargs", "error", "fragment"),
        [
            ((None,), {}, ts.InvalidArgumentType, "None"),
            ((CollectorRegistry(),), {"namespace": 3}, ts.InvalidArgumentType, "3"),
            ((CollectorRegistry(),), {"namespace": "bad-ns"}, ts.ConfigurationError, "'bad-ns'"),
            ((CollectorRegistry(),), {"namespace": ""}, ts.ConfigurationError, "''"),
        ],
    )
    def test_bad_arguments_name_the_value(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], fragment: str
    ) -> None:
        """A bad argument raises a termsafe error naming it."""
        with pytest.raises(error, match=fragment):
            PrometheusMetricsHook(*args, **kwargs)
