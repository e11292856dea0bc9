"""Tests for termsafe._signals: real SIGTERMs sent to a child process, and install/uninstall."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
from conftest import WAIT, Jobs, TermFactory

import termsafe
from termsafe import InvalidArgumentType

ROOT = Path(__file__).parents[1]

CHILD = r"""
import signal
import sys
import threading

import termsafe
from termsafe import MemorySink, Phases, Terminator


def say(*parts):
    print(*parts, flush=True)


mode = sys.argv[1]
if mode == "chain":
    signal.signal(signal.SIGTERM, lambda signum, frame: say("previous handler"))
sink = MemorySink()
term = Terminator(phases=Phases(30.0, 30.0), sink=sink)
handlers = termsafe.install_signal_handlers(term)
assert handlers is not None
seen = {"kill_requested": threading.Event(), "phase_changed": threading.Event()}
term.add_event_listener(lambda e: seen[e.type].set() if e.type in seen else None)

if mode == "idle":
    say("ready")
    threading.Event().wait(60)
    say("still alive")
    sys.exit(3)

order = []
caught = []
with term.workflow("job") as wf:
    termsafe.on_cleanup(lambda: order.append("cleanup1"))
    termsafe.on_rollback(lambda: order.append("rollback2"))
    try:
        if mode in ("outside", "chain", "twice"):
            say("ready")
            while True:
                termsafe.checkpoint()
                termsafe.sleep(0.05)
        elif mode == "section":
            with termsafe.critical_section("db"):
                say("ready")
                while not wf.kill_pending:
                    termsafe.sleep(0.05)
                say("kill deferred")
                termsafe.checkpoint()
                termsafe.sleep(0.05)
                say("section done")
            say("after section")
        elif mode == "escalate":
            say("ready")
            assert seen["kill_requested"].wait(30)
            say("kill pending")
            assert seen["phase_changed"].wait(30)
            termsafe.checkpoint()
    except BaseException as exc:
        caught.append(type(exc).__name__)
        raise
    say("body ended")
term.flush()
say("state", wf.state.value)
say("caught", ",".join(caught))
say("hooks", ",".join(order))
say("events", ",".join(e.type for e in sink.events if e.workflow_id == "job"))
if mode == "twice":
    say("done")
    threading.Event().wait(60)
    say("still alive")
    sys.exit(3)
handlers.uninstall()
term.close()
"""


class Child:
    """A Python child process whose stdout lines are read by a thread into a queue."""

    def __init__(self, script: Path, mode: str, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, marker: str) -> None:
        """Wait until the child printed ``marker`` on a line of its own."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {WAIT}s; got {self.seen}") from None
            if line is None:
                raise AssertionError(f"child exited before {marker!r}; got {self.seen}")
            self.seen.append(line)
            if line == marker:
                return

    def signal(self, sig: int = signal.SIGTERM) -> None:
        os.kill(self.proc.pid, sig)

    def finish(self) -> tuple[int, dict[str, str], str]:
        """Wait for the exit; return the code, the ``key value`` lines and stderr."""
        code = self.proc.wait(WAIT)
        self._reader.join(WAIT)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                break
            self.seen.append(line)
        fields: dict[str, str] = {}
        for line in self.seen:
            key, _, value = line.partition(" ")
            fields.setdefault(key, value)
        return code, fields, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self._reader.join(WAIT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Callable[[str], Child]]:
    """Start child processes running the test script; kill and reap them at teardown."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    started: list[Child] = []

    def spawn(mode: str) -> Child:
        proc = Child(script, mode, tmp_path)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.close()


class TestRealSigterm:
    def test_outside_section(self, child: Callable[[str], Child]) -> None:
        """A SIGTERM terminates a workflow looping on checkpoints; hooks run LIFO; exit code 0."""
        proc = child("outside")
        proc.expect("ready")
        proc.signal()
        code, out, err = proc.finish()
        assert (0, "") == (code, err)
        assert "terminated" == out["state"]
        assert "Terminated" == out["caught"]
        assert "rollback2,cleanup1" == out["hooks"]
        assert "body" not in out
        events = out["events"].split(",")
        assert events.index("kill_requested") < events.index("workflow_finished")

    def test_inside_section(self, child: Callable[[str], Child]) -> None:
        """A SIGTERM inside a critical section is deferred until the section ends."""
        proc = child("section")
        proc.expect("ready")
        proc.signal()
        code, out, err = proc.finish()
        assert (0, "") == (code, err)
        markers = ("ready", "kill deferred", "section done", "after section")
        assert ["ready", "kill deferred", "section done"] == [
            line for line in proc.seen if line in markers
        ]
        assert "terminated" == out["state"]
        assert "Terminated" == out["caught"]
        assert "rollback2,cleanup1" == out["hooks"]
        events = out["events"].split(",")
        assert events.index("kill_deferred") < events.index("kill_effective")

    def test_second_sigterm_escalates(self, child: Callable[[str], Child]) -> None:
        """A second SIGTERM moves the kill to the forced phase at once."""
        proc = child("escalate")
        proc.expect("ready")
        proc.signal()
        proc.expect("kill pending")
        proc.signal()
        code, out, err = proc.finish()
        assert (0, "") == (code, err)
        assert "terminated" == out["state"]
        assert "ForcedTermination" == out["caught"]
        assert "rollback2,cleanup1" == out["hooks"]

    def test_chains_previous_handler(self, child: Callable[[str], Child]) -> None:
        """A Python handler installed before ours is still called."""
        proc = child("chain")
        proc.expect("ready")
        proc.signal()
        code, out, err = proc.finish()
        assert (0, "") == (code, err)
        assert "previous handler" in proc.seen
        assert "terminated" == out["state"]

    def test_no_live_workflow_dies(self, child: Callable[[str], Child]) -> None:
        """A SIGTERM with no live workflow ends the process by the signal, as by default."""
        proc = child("idle")
        proc.expect("ready")
        proc.signal()
        code, _, _ = proc.finish()
        assert -signal.SIGTERM == code
        assert "still alive" not in proc.seen

    def test_after_shutdown_dies(self, child: Callable[[str], Child]) -> None:
        """Once the workflows a SIGTERM stopped are gone, the next SIGTERM ends the process."""
        proc = child("twice")
        proc.expect("ready")
        proc.signal()
        proc.expect("done")
        proc.signal()
        code, out, _ = proc.finish()
        assert "terminated" == out["state"]
        assert -signal.SIGTERM == code
        assert "still alive" not in proc.seen


def _handler(signum: int, frame: FrameType | None) -> None:
    """A stand-in for a host application's handler; never called here."""


class TestInstall:
    def test_non_main_thread(self, make_term: TermFactory, jobs: Jobs) -> None:
        """Installing from another thread warns, installs nothing and returns None."""
        term = make_term()
        before = signal.getsignal(signal.SIGTERM)

        def install() -> object:
            with pytest.warns(RuntimeWarning, match="main thread"):
                return termsafe.install_signal_handlers(term)

        assert jobs.start(install).result() is None
        assert before == signal.getsignal(signal.SIGTERM)

    def test_uninstall_restores(self, make_term: TermFactory) -> None:
        """uninstall() puts back the handlers that were installed before."""
        term = make_term()
        previous = signal.signal(signal.SIGTERM, _handler)
        try:
            handlers = termsafe.install_signal_handlers(term, signals=[signal.SIGTERM])
            assert handlers is not None
            assert _handler != signal.getsignal(signal.SIGTERM)
            handlers.uninstall()
            assert _handler == signal.getsignal(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def test_uninstall_leaves_later_handler(self, make_term: TermFactory) -> None:
        """uninstall() leaves alone a handler someone installed after ours."""
        term = make_term()
        previous = signal.getsignal(signal.SIGTERM)
        try:
            handlers = termsafe.install_signal_handlers(term, signals=[signal.SIGTERM])
            assert handlers is not None
            signal.signal(signal.SIGTERM, _handler)
            handlers.uninstall()
            assert _handler == signal.getsignal(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def test_context_manager(self, make_term: TermFactory) -> None:
        """Leaving the ``with`` block of the handlers uninstalls them."""
        term = make_term()
        before = signal.getsignal(signal.SIGINT)
        handlers = termsafe.install_signal_handlers(term, signals=[signal.SIGINT])
        assert handlers is not None
        with handlers:
            assert before != signal.getsignal(signal.SIGINT)
        assert before == signal.getsignal(signal.SIGINT)

    @pytest.mark.parametrize("signals", [["SIGTERM"], [999999]])
    def test_bad_signals(self, make_term: TermFactory, signals: list[object]) -> None:
        """Something that is not a signal raises InvalidArgumentType and installs nothing."""
        term = make_term()
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(InvalidArgumentType, match="signals must be"):
            termsafe.install_signal_handlers(term, signals=signals)  # type: ignore[arg-type]
        assert before == signal.getsignal(signal.SIGTERM)

    def test_bad_terminator(self) -> None:
        """A terminator that is not a Terminator raises InvalidArgumentType naming it."""
        with pytest.raises(InvalidArgumentType, match="got 'default'"):
            termsafe.install_signal_handlers("default")  # type: ignore[arg-type]
