"""Alert rules and the metrics behind them, on real kills."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import TermFactory

import termsafe as ts
from termsafe import Alert, AlertThresholds, Principal
from termsafe._alerts import AlertEngine

ADMIN = Principal("root", roles=["admin"])


@pytest.fixture
def term() -> Iterator[ts.Terminator]:
    t = ts.Terminator(phases=ts.Phases(0.05, 0.05), sink=ts.MemorySink(), hook_timeout=2)
    yield t
    t.close()


def _kill_a_sleeper(
    term: ts.Terminator, wid: str, setup: Callable[[], object] = lambda: None
) -> None:
    """Run workflow ``wid`` in a thread sleeping in a loop, kill it, and wait until it ended."""
    entered = threading.Event()

    def body() -> None:
        with term.workflow(wid):
            setup()
            entered.set()
            while True:
                ts.sleep(0.01)

    thread = threading.Thread(target=body)
    thread.start()
    assert entered.wait(10)
    assert ts.WorkflowState.TERMINATED == term.kill(wid, by=ADMIN).wait(10)
    thread.join(10)
    assert not thread.is_alive()


def _events(term: ts.Terminator, type_: str) -> list[ts.AuditEvent]:
    assert term.flush(10)
    sink = term.sink
    assert isinstance(sink, ts.MemorySink)
    return [e for e in sink.events if e.type == type_]


class TestAlertEngine:
    def test_failed_kills_fire_strictly_above_each_threshold(self) -> None:
        """1 % is not a warning, just above 1 % is; 5 % stays a warning, just above is critical."""
        engine = AlertEngine()
        assert engine.failed_kills(1, 100) is None  # exactly 1 %
        warning = engine.failed_kills(2, 100)
        assert warning is not None
        assert ("failed_kills", "warning", 0.01) == (
            warning.rule,
            warning.severity,
            warning.threshold,
        )
        assert engine.failed_kills(5, 100) is None  # exactly 5 %: still a warning, no change
        critical = engine.failed_kills(6, 100)
        assert critical is not None
        assert ("critical", 0.05) == (critical.severity, critical.threshold)
        resolved = engine.failed_kills(6, 1000)
        assert resolved is not None
        assert "resolved" == resolved.severity

    def test_alerts_are_edge_triggered(self) -> None:
        """A rule that stays at one level raises one alert, not one per evaluation."""
        engine = AlertEngine()
        assert engine.orphans(1) is not None
        assert engine.orphans(2) is None
        assert engine.orphans(0) is not None
        assert engine.orphans(0) is None

    def test_cleanup_fires_strictly_above_sixty_seconds(self) -> None:
        """A cleanup of exactly 60 s is fine; 60.001 s raises a warning."""
        engine = AlertEngine()
        assert engine.cleanup_time(60.0) is None
        alert = engine.cleanup_time(60.001)
        assert alert is not None
        assert ("cleanup_time", "warning") == (alert.rule, alert.severity)

    def test_thresholds_are_configurable(self) -> None:
        """Custom thresholds move where the rules fire."""
        engine = AlertEngine(AlertThresholds(failed_kills_warning=0.5, failed_kills_critical=0.9))
        assert engine.failed_kills(1, 2) is None
        alert = engine.failed_kills(3, 4)
        assert alert is not None
        assert "warning" == alert.severity

    @pytest.mark.parametrize(
        ("kwargs", "fragment"),
        [
            ({"failed_kills_warning": -0.1}, "-0.1"),
            ({"failed_kills_critical": 1.5}, "1.5"),
            ({"cleanup_warning_s": float("nan")}, "nan"),
            ({"orphans_critical": "none"}, "'none'"),
        ],
    )
    def test_bad_thresholds_name_the_value(self, kwargs: dict[str, object], fragment: str) -> None:
        """A bad threshold raises a termsafe error naming it."""
        with pytest.raises(ts.TermsafeError, match=fragment):
            AlertThresholds(**kwargs)  # type: ignore[arg-type]


def _stuck_workflow(term: ts.Terminator, wid: str, release: threading.Event) -> threading.Thread:
    """A workflow that never reaches a cancellation point until released."""
    entered = threading.Event()

    def body() -> None:
        with term.workflow(wid, owner="alice"):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=body, name=f"stuck-{wid}")
    thread.start()
    assert entered.wait(10)
    return thread


class TestTerminatorAlerts:
    def test_killed_workflow_raises_failed_kills_and_orphan_alerts(
        self, term: ts.Terminator
    ) -> None:
        """A kill the system phase takes over is a failed kill and an orphan (both critical)."""
        seen: list[Alert] = []
        term.add_alert_listener(seen.append)
        release = threading.Event()
        thread = _stuck_workflow(term, "stuck", release)
        try:
            assert ts.WorkflowState.KILLED == term.kill("stuck", by=ADMIN).wait(10)
            alerts = {(e.details["rule"], e.details["severity"]) for e in _events(term, "alert")}
            assert ("failed_kills", "critical") in alerts
            assert ("orphans", "critical") in alerts
            assert {("failed_kills", "critical"), ("orphans", "critical")} <= {
                (a.rule, a.severity) for a in seen
            }
            snap = term.metrics()
            assert (1, 1, 1) == (snap.kills_failed, snap.orphans, snap.orphans_alive)
            assert 1.0 == snap.failed_rate
        finally:
            release.set()
        thread.join(10)
        assert not thread.is_alive()
        assert 0 == term.metrics().orphans_alive
        assert "resolved" in {
            e.details["severity"] for e in _events(term, "alert") if e.details["rule"] == "orphans"
        }

    def test_cooperative_kill_counts_as_success(self) -> None:
        """A workflow that unwinds itself is a successful kill and raises no alert."""
        # Slow phases: with the fixture's 0.1 s ladder, a loaded machine can
        # leave the woken thread unscheduled until the system phase kills it.
        with ts.Terminator(phases=ts.Phases(30, 30), sink=ts.MemorySink()) as term:
            _kill_a_sleeper(term, "coop")
            snap = term.metrics()
            assert (1, 0, 1.0) == (snap.kills_succeeded, snap.kills_failed, snap.success_rate)
            assert snap.kill_latency_p50 is not None
            assert [] == _events(term, "alert")

    def test_successful_kills_bring_the_failed_rate_back_down(self) -> None:
        """After a failed kill, successful ones lower the rate: critical, warning, resolved."""
        thresholds = AlertThresholds(failed_kills_warning=0.4, failed_kills_critical=0.6)
        with ts.Terminator(
            phases=ts.Phases(0.05, 0.05), sink=ts.MemorySink(), alert_thresholds=thresholds
        ) as term:
            release = threading.Event()
            thread = _stuck_workflow(term, "stuck", release)
            try:
                assert ts.WorkflowState.KILLED == term.kill("stuck", by=ADMIN).wait(10)
            finally:
                release.set()
            thread.join(10)
            for wid in ("ok-1", "ok-2"):  # 1 of 2 failed (warning), then 1 of 3 (below it)
                with term.workflow(wid):  # absorbs its own kill
                    handle = term.kill(wid, by=ADMIN)
                    ts.checkpoint()
                assert ts.WorkflowState.TERMINATED == handle.wait(10)
            term.flush()
            severities = [
                e.details["severity"]
                for e in _events(term, "alert")
                if e.details["rule"] == "failed_kills"
            ]
            assert ["critical", "warning", "resolved"] == severities

    def test_slow_cleanup_raises_a_warning(self) -> None:
        """A cleanup that takes longer than the threshold raises the cleanup_time warning."""
        thresholds = AlertThresholds(cleanup_warning_s=0.05)
        with ts.Terminator(sink=ts.MemorySink(), alert_thresholds=thresholds) as term:
            with term.workflow("slow"):
                ts.on_cleanup(lambda: time.sleep(0.1))  # the slow cleanup itself
            alerts = [(e.details["rule"], e.details["severity"]) for e in _events(term, "alert")]
            assert [("cleanup_time", "warning")] == alerts
            assert (term.metrics().cleanup_time_max or 0) >= 0.1

    def test_failing_sink_never_blocks_a_kill_and_raises_the_alert(self) -> None:
        """A sink that raises: the kill still completes, the drop is counted, the alert fires."""

        class BrokenSink:
            def emit(self, event: ts.AuditEvent) -> None:
                raise OSError(28, "No space left on device")

            def close(self) -> None:
                pass

        seen: list[Alert] = []
        with ts.Terminator(phases=ts.Phases(30, 30), sink=BrokenSink()) as term:
            term.add_alert_listener(seen.append)
            _kill_a_sleeper(term, "w")
            assert term.flush(10)  # also waits for the alert the failures raised
            snap = term.metrics()
            assert snap.events_dropped >= 3
            assert 0 == snap.events_emitted
            assert ("audit_sink", "critical") in {(a.rule, a.severity) for a in seen}


class TestRaisingMetricsHook:
    def test_a_raising_hook_never_breaks_a_kill(
        self, make_term: TermFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A user metrics hook that raises: kills still land, the failure is logged once."""

        class Broken:
            def kill_requested(self, *, outcome: str) -> None:
                raise RuntimeError("exporter down")

            def kill_finished(self, *, final_state: str, latency_s: float) -> None:
                raise RuntimeError("exporter down")

            def cleanup_finished(self, *, duration_s: float) -> None:
                raise RuntimeError("exporter down")

            def orphan_detected(self, *, kind: str) -> None:
                raise RuntimeError("exporter down")

        term = make_term(phases=ts.Phases(5, 5), metrics_hook=Broken())
        for wid in ("a", "b"):
            _kill_a_sleeper(term, wid, setup=lambda: ts.on_cleanup(lambda: None))
        snap = term.metrics()
        assert (2, 2) == (snap.kills_requested, snap.kills_succeeded)
        logged = [r for r in caplog.records if "metrics hook" in r.getMessage()]
        assert 1 == len(logged)
