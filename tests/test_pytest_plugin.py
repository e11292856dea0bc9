"""The pytest plugin: fixtures, markers, --chaos-seed and the failure report, via pytester."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

import termsafe as ts

pytest_plugins = ["pytester"]

#: The project's own strictness, applied to every generated run.
STRICT = ("-p", "no:cacheprovider", "--strict-markers", "-W", "error")
#: Generated runs keep file order (the output checks below rely on it) even
#: where the developer's environment has a test-shuffling plugin installed.
IN_ORDER = ("-p", "no:randomly")


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*STRICT, *IN_ORDER, *args)


class TestLoading:
    def test_entry_point(self) -> None:
        """The plugin is registered under pytest11 as termsafe.pytest_plugin."""
        found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
        assert "termsafe.pytest_plugin" == found.get("termsafe")

    def test_loaded_in_a_run(self, pytester: pytest.Pytester) -> None:
        """pytest loads the plugin without being told."""
        pytester.makepyfile(
            """
            def test_loaded(pytestconfig):
                assert pytestconfig.pluginmanager.hasplugin("termsafe")
            """
        )
        _run(pytester).assert_outcomes(passed=1)

    def test_import_has_no_side_effects(self) -> None:
        """Importing the plugin starts no thread, installs no handler, opens no file."""
        code = textwrap.dedent(
            """
            import signal, sys, threading
            import psutil
            proc = psutil.Process()
            files = proc.open_files()
            fds = proc.num_fds()
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            import termsafe.pytest_plugin
            assert 1 == threading.active_count(), threading.enumerate()
            assert handlers == {s: signal.getsignal(s) for s in handlers}
            assert -1 == signal.set_wakeup_fd(-1)
            assert (files, fds) == (proc.open_files(), proc.num_fds())
            assert "termsafe.testing" not in sys.modules
            print("clean")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert ("clean\n", 0) == (result.stdout, result.returncode), result.stderr

    def test_a_run_that_uses_no_fixture_is_untouched(self, pytester: pytest.Pytester) -> None:
        """In a pytest process, a test not using the fixtures sees no thread, handler or import."""
        pytester.makepyfile(
            """
            import signal, sys, threading

            def test_untouched():
                assert 1 == threading.active_count(), threading.enumerate()
                assert signal.SIG_DFL == signal.getsignal(signal.SIGTERM)
                assert "termsafe.testing" not in sys.modules
            """
        )
        result = pytester.runpytest_subprocess(*STRICT, "-p", "no:timeout")
        result.assert_outcomes(passed=1)


class TestTerminatorFixture:
    def test_isolated_default_terminator(self, pytester: pytest.Pytester) -> None:
        """The fixture is a fresh terminator with a MemorySink, the default during the test."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def test_terminator(terminator):
                assert isinstance(terminator.sink, ts.MemorySink)
                assert ts.Phases(1.0, 1.0) == terminator.phases
                assert ts.get_terminator() is terminator
                with ts.workflow("job") as wf:
                    assert wf.terminator is terminator
            """
        )
        before = ts.get_terminator()
        _run(pytester).assert_outcomes(passed=1)
        assert before is ts.get_terminator()

    def test_phases_marker(self, pytester: pytest.Pytester) -> None:
        """termsafe_phases sets the ladder and the hook timeout, by keyword or position."""
        pytester.makepyfile(
            """
            import pytest
            import termsafe as ts

            @pytest.mark.termsafe_phases(graceful=0.2, forced=0.3, hook_timeout=2.0)
            def test_keywords(terminator):
                assert (ts.Phases(0.2, 0.3), 2.0) == (terminator.phases, terminator.hook_timeout)

            @pytest.mark.termsafe_phases(0.4)
            def test_positional(terminator):
                assert ts.Phases(0.4, 1.0) == terminator.phases
            """
        )
        _run(pytester).assert_outcomes(passed=2)

    def test_bad_phases_marker(self, pytester: pytest.Pytester) -> None:
        """A bad marker value is reported naming the value."""
        pytester.makepyfile(
            """
            import pytest

            @pytest.mark.termsafe_phases(graceful=-1)
            def test_bad(terminator):
                pass
            """
        )
        result = _run(pytester)
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            ["*bad termsafe_phases marker: graceful must be >= 0*(got -1)*"]
        )

    def test_teardown_fails_on_a_live_workflow(self, pytester: pytest.Pytester) -> None:
        """A workflow still live at teardown is killed and fails the test."""
        pytester.makepyfile(
            """
            import threading
            import termsafe as ts

            def test_leaves_a_workflow(terminator):
                entered = threading.Event()

                def body():
                    with terminator.workflow("left-behind"):
                        entered.set()
                        ts.sleep(60)

                threading.Thread(target=body, daemon=True).start()
                assert entered.wait(10)
            """
        )
        result = _run(pytester)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*ERROR at teardown of test_leaves_a_workflow*",
                "termsafe teardown:",
                "*workflow(s) still live: 'left-behind' (running); killed with force=True",
            ]
        )

    def test_teardown_fails_on_a_hung_hook(self, pytester: pytest.Pytester) -> None:
        """A hook that hung past hook_timeout fails the test at teardown."""
        pytester.makepyfile(
            """
            import threading
            import pytest
            import termsafe as ts

            @pytest.mark.termsafe_phases(hook_timeout=0.05)
            def test_hangs(terminator):
                released = threading.Event()
                terminator.add_event_listener(
                    lambda e: released.set() if e.type == "hook_failed" else None
                )

                def stuck():
                    assert released.wait(10)

                with terminator.workflow("job"):
                    ts.on_cleanup(stuck)
            """
        )
        result = _run(pytester)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            ["*hook '*stuck' of workflow 'job' hung: timed out after 0.05s (it never finished)"]
        )

    def test_teardown_fails_on_a_hook_that_never_ran(self, pytester: pytest.Pytester) -> None:
        """A hook left on a finished workflow's stack fails the test at teardown."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def late_hook():
                pass

            def test_late_hook(terminator):
                with ts.workflow("job") as wf:
                    pass
                wf.hooks.push(late_hook, "cleanup")  # after the end: nothing will run it
            """
        )
        result = _run(pytester)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            ["*workflow 'job' ended completed with hook(s) that never ran: late_hook"]
        )

    def test_no_teardown_noise_after_a_failure(self, pytester: pytest.Pytester) -> None:
        """A test that already failed is not also errored for what it left running."""
        pytester.makepyfile(
            """
            import threading
            import termsafe as ts

            def test_fails(terminator):
                entered = threading.Event()

                def body():
                    with terminator.workflow("left"):
                        entered.set()
                        ts.sleep(60)

                threading.Thread(target=body, daemon=True).start()
                assert entered.wait(10)
                assert False, "the test's own failure"
            """
        )
        _run(pytester).assert_outcomes(failed=1)


class TestKillFixture:
    def test_every_kind_of_kill(self, pytester: pytest.Pytester) -> None:
        """at_point, on_section_entry, on_grace_expiry, after and force each land as promised."""
        pytester.makepyfile(
            """
            import threading
            import termsafe as ts

            def test_at_point(terminator, kill):
                scheduled = kill.at_point("job", 3)
                reached = []
                with ts.workflow("job") as wf:
                    for i in range(5):
                        ts.checkpoint()
                        reached.append(i)
                assert ([0, 1], "terminated") == (reached, wf.state)
                assert 3 == scheduled.point.workflow_index

            def test_inside_a_section(terminator, kill, audit_events):
                kill.on_section_entry("job", "fs")
                with ts.workflow("job"):
                    with ts.critical_section("fs"):
                        pass
                audit_events.assert_sequence("kill_deferred", "kill_effective")

            def test_before_a_section(terminator, kill, audit_events):
                kill.on_section_entry("job", "fs", before_entry=True)
                with ts.workflow("job"):
                    with ts.critical_section("fs"):
                        raise AssertionError("the section must be refused")
                audit_events.assert_sequence("kill_requested", "section_refused")

            def test_grace_expiry(terminator, kill, audit_events):
                kill.on_grace_expiry("job", "db")
                undone = []
                with ts.workflow("job"):
                    ts.on_rollback(lambda: undone.append("rollback"))
                    with ts.critical_section("db"):
                        ts.checkpoint()
                assert ["rollback"] == undone
                audit_events.assert_sequence("grace_expired", "hook_ran", "workflow_finished")

            def test_after(terminator, kill):
                scheduled = kill.after("job", 0.01)
                with ts.workflow("job") as wf:
                    ts.sleep(60)
                assert "terminated" == wf.state == scheduled.wait()

            def test_force(terminator, kill, audit_events):
                kill.at_point("job", 1, force=True)
                raised = []
                with ts.workflow("job"):
                    try:
                        ts.checkpoint()
                    except ts.Terminated as exc:
                        raised.append(type(exc).__name__)
                        raise
                assert ["ForcedTermination"] == raised
                (event,) = audit_events.of_type("kill_requested")
                assert "forced" == event.details["phase"]
            """
        )
        _run(pytester).assert_outcomes(passed=6)

    def test_async_kill_on_both_backends(self, pytester: pytest.Pytester) -> None:
        """A kill at a checkpoint of an async workflow lands on asyncio and trio."""
        pytester.makepyfile(
            """
            import anyio
            import pytest
            import termsafe as ts

            @pytest.mark.termsafe_backends
            async def test_async(terminator, kill, termsafe_backend):
                kill.at_point("a", 2)
                reached = []
                async with ts.workflow("a") as wf:
                    for i in range(3):
                        await anyio.sleep(0)
                        ts.checkpoint()
                        reached.append(i)
                assert ([0], "terminated", termsafe_backend) == (reached, wf.state, wf.backend)
            """
        )
        result = _run(pytester, "-v")
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines(["*test_async?asyncio? PASSED*", "*test_async?trio? PASSED*"])

    def test_kill_that_never_fired_fails_the_test(self, pytester: pytest.Pytester) -> None:
        """A kill armed for a point the workflow never reached fails at teardown."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def test_too_few_points(terminator, kill):
                kill.at_point("job", 4)
                with ts.workflow("job"):
                    ts.checkpoint()
            """
        )
        result = _run(pytester)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*kill of 'job' at cancellation point #4 (force=False) never fired: "
                "workflow 'job' reached only 1 cancellation point(s)"
            ]
        )


class TestAuditEventsFixture:
    def test_helpers(self, pytester: pytest.Pytester) -> None:
        """types, of_type and assert_sequence read the flushed trail."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def test_helpers(terminator, kill, audit_events):
                kill.at_point("job", 1)
                with ts.workflow("other"):
                    pass
                with ts.workflow("job"):
                    ts.checkpoint()
                assert ["workflow_started", "kill_requested", "workflow_finished"] == (
                    audit_events.types("job")
                )
                assert 2 == len(audit_events.of_type("workflow_finished"))
                audit_events.assert_sequence("workflow_started", "workflow_finished")
            """
        )
        _run(pytester).assert_outcomes(passed=1)

    def test_sequence_failure_shows_the_timeline(self, pytester: pytest.Pytester) -> None:
        """A failed assert_sequence shows how far it matched and the actual timeline."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def test_no_deferral(terminator, audit_events):
                with ts.workflow("job"):
                    pass
                audit_events.assert_sequence("workflow_started", "kill_deferred")
            """
        )
        result = _run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*the audit trail does not contain the sequence",
                "*workflow_started -> kill_deferred",
                "*matched up to 'workflow_started' (seq 1); no 'kill_deferred' after it. "
                "Actual timeline (2 events):",
                "*1  *workflow_started *job *running*",
                "*2  *workflow_finished *job *completed*",
            ]
        )


CHAOS_TEST = """
import termsafe as ts

def test_chaos(terminator, chaos):
    chaos.arm(probability=0.05)
    reached = 0
    with ts.workflow("job"):
        for _ in range(500):
            ts.checkpoint()
            reached += 1
    print(f"REACHED={reached}")
"""


class TestChaosFixture:
    def test_seed_in_the_header(self, pytester: pytest.Pytester) -> None:
        """--chaos-seed is shown in the report header."""
        pytester.makepyfile("def test_nothing(): pass")
        result = _run(pytester, "--chaos-seed=1234")
        result.stdout.fnmatch_lines(
            ["termsafe: chaos seed 1234 (reproduce with --chaos-seed=1234)"]
        )

    def test_random_seed_in_the_header(self, pytester: pytest.Pytester) -> None:
        """Without --chaos-seed a random seed is picked and shown."""
        pytester.makepyfile("def test_nothing(): pass")
        result = _run(pytester)
        result.stdout.re_match_lines(
            [r"termsafe: chaos seed \d+ \(reproduce with --chaos-seed=\d+\)"]
        )

    def test_same_seed_same_kills(self, pytester: pytest.Pytester) -> None:
        """Two runs with the same seed kill at the same point."""
        pytester.makepyfile(CHAOS_TEST)

        def reached(seed: int) -> str:
            result = _run(pytester, f"--chaos-seed={seed}", "-s")
            result.assert_outcomes(passed=1)
            (line,) = [x for x in result.outlines if "REACHED=" in x]
            return line

        first = reached(99)
        assert first == reached(99)
        assert "REACHED=500" not in first

    def test_failure_shows_the_seed(self, pytester: pytest.Pytester) -> None:
        """A failing chaos test reports the seed to rerun with and where the kill landed."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def test_chaos_fails(terminator, chaos):
                chaos.arm(probability=1.0)
                with ts.workflow("job"):
                    ts.checkpoint()
                assert False, "invariant broken"
            """
        )
        result = _run(pytester, "--chaos-seed=5")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*termsafe: where the kill landed*",
                "chaos seed 5 (rerun with --chaos-seed=5)",
                "kill of 'job' by chaos (seed 5) at cancellation point #1 (force=False)",
            ]
        )


class TestFailureReport:
    def test_report_says_where_the_kill_landed(self, pytester: pytest.Pytester) -> None:
        """A test failing after a kill shows the point, its line and the workflow's timeline."""
        pytester.makepyfile(
            test_report="""
            import termsafe as ts

            def step():
                ts.checkpoint()

            def test_killed(terminator, kill):
                kill.at_point("job", 2)
                with ts.workflow("job"):
                    step()
                    step()
                assert "half done" == "done"
            """
        )
        result = _run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*AssertionError*",
                "*- termsafe: where the kill landed -*",
                "kill of 'job' at cancellation point #2 (force=False)",
                "  requested at cancellation point #2 of 'job': checkpoint "
                "at test_report.py:4 in step",
                "  where it landed: landed right there; final state: terminated",
                "  audit timeline of 'job':",
                "*workflow_started*",
                "*kill_requested *job *terminating *by=termsafe-testing*",
                "*workflow_finished *job *terminated*",
            ]
        )

    def test_report_of_a_deferred_kill(self, pytester: pytest.Pytester) -> None:
        """A kill that arrived inside a section is reported as deferred to its end."""
        pytester.makepyfile(
            """
            import termsafe as ts

            def test_deferred(terminator, kill):
                kill.on_section_entry("job", "fs")
                with ts.workflow("job"):
                    with ts.critical_section("fs"):
                        pass
                assert False
            """
        )
        result = _run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "kill of 'job' inside section 'fs' (force=False)",
                "  where it landed: deferred: it arrived inside fs; took effect when section "
                "'fs' ended; final state: terminated",
            ]
        )

    def test_no_section_without_a_kill(self, pytester: pytest.Pytester) -> None:
        """A failure with no kill injected gets no termsafe section."""
        pytester.makepyfile(
            """
            def test_plain(terminator, kill):
                assert False
            """
        )
        result = _run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.no_fnmatch_line("*termsafe: where the kill landed*")


class TestMarkers:
    def test_registered_for_strict_markers(self, pytester: pytest.Pytester) -> None:
        """Both markers are registered, so --strict-markers accepts them."""
        pytester.makepyfile(
            """
            import pytest

            @pytest.mark.termsafe_phases(graceful=0.5)
            @pytest.mark.termsafe_backends("asyncio")
            async def test_marked(terminator):
                pass
            """
        )
        _run(pytester).assert_outcomes(passed=1)
        result = _run(pytester, "--markers")
        result.stdout.fnmatch_lines(
            ["@pytest.mark.termsafe_phases(*", "@pytest.mark.termsafe_backends(*"]
        )

    def test_backends_subset_and_class_marker(self, pytester: pytest.Pytester) -> None:
        """A backend subset runs once; a class marker applies to its async methods."""
        pytester.makepyfile(
            """
            import sniffio
            import pytest

            @pytest.mark.termsafe_backends("trio")
            async def test_trio_only(termsafe_backend):
                assert "trio" == termsafe_backend == sniffio.current_async_library()

            @pytest.mark.termsafe_backends
            class TestBoth:
                async def test_method(self, termsafe_backend):
                    assert termsafe_backend == sniffio.current_async_library()

            def test_unmarked(termsafe_backend):
                assert "asyncio" == termsafe_backend
            """
        )
        result = _run(pytester, "-v")
        result.assert_outcomes(passed=4)
        result.stdout.fnmatch_lines_random(
            [
                "*test_trio_only?trio? PASSED*",
                "*TestBoth::test_method?asyncio? PASSED*",
                "*TestBoth::test_method?trio? PASSED*",
                "*test_unmarked PASSED*",
            ]
        )

    def test_unknown_backend(self, pytester: pytest.Pytester) -> None:
        """An unknown backend name is a usage error naming the known ones."""
        pytester.makepyfile(
            """
            import pytest

            @pytest.mark.termsafe_backends("curio")
            async def test_curio():
                pass
            """
        )
        result = _run(pytester)
        assert 0 != result.ret
        result.stdout.fnmatch_lines(["*termsafe_backends takes backend names (asyncio, trio)*"])
