"""Shared fixtures: terminators that are always closed and threads that are always joined."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import pytest

from termsafe import AuditEvent, MemorySink, Phases, Principal, Terminator

T = TypeVar("T")

#: Long enough that no phase deadline fires during a test that does not ask for it.
SLOW = Phases(30.0, 30.0)

#: How long a test waits for something that should happen at once (a loaded CI box).
WAIT = 10.0

#: Who kills in tests where the permission check is not the point.
ADMIN = Principal("root", roles=("admin",))


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--chaos-runs`` (registered here: options of sub-folder conftests may come too late)."""
    parser.addoption(
        "--chaos-runs",
        type=int,
        default=1,
        metavar="N",
        help="run N times as many trials in tests/chaos (default 1: about a minute)",
    )


class Job(Generic[T]):
    """A thread running ``fn``; ``result()`` joins it and returns or re-raises."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._collected = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = WAIT) -> T:
        """Join the thread; return what ``fn`` returned or raise what it raised."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"thread {self.thread.name} still running after {timeout}s")
        self._collected = True
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def error(self, timeout: float = WAIT) -> BaseException | None:
        """Join the thread and return what ``fn`` raised, if anything."""
        try:
            self.result(timeout)
        except AssertionError:
            raise
        except BaseException as exc:
            return exc
        return None


class Jobs:
    """Starts test threads and makes sure every one of them ended by teardown."""

    def __init__(self) -> None:
        self._jobs: list[Job[Any]] = []

    def start(self, fn: Callable[[], T], name: str = "test-job") -> Job[T]:
        job = Job(fn, name)
        self._jobs.append(job)
        job.thread.start()
        return job

    def join_all(self) -> None:
        alive = []
        for job in self._jobs:
            job.thread.join(WAIT)
            if job.thread.is_alive():
                alive.append(job.thread.name)
        assert [] == alive, "test threads left running"


class Audit:
    """Reads a terminator's ``MemorySink`` after flushing it."""

    def __init__(self, term: Terminator, sink: MemorySink) -> None:
        self.term = term
        self.sink = sink

    def events(self, workflow_id: str | None = None) -> list[AuditEvent]:
        assert self.term.flush(WAIT)
        return [e for e in self.sink.events if workflow_id is None or e.workflow_id == workflow_id]

    def types(self, workflow_id: str | None = None) -> list[str]:
        return [e.type for e in self.events(workflow_id)]

    def of(self, type_: str, workflow_id: str | None = None) -> list[AuditEvent]:
        return [e for e in self.events(workflow_id) if e.type == type_]


class TermFactory:
    """Builds terminators with a ``MemorySink`` and closes them at teardown."""

    def __init__(self) -> None:
        self.built: list[Terminator] = []

    def __call__(self, phases: Phases = SLOW, **kwargs: Any) -> Terminator:
        kwargs.setdefault("sink", MemorySink())
        term = Terminator(phases=phases, **kwargs)
        self.built.append(term)
        return term

    def close_all(self) -> None:
        for term in self.built:
            term.close()


def _termsafe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("termsafe-")]


@pytest.fixture
def make_term() -> Iterator[TermFactory]:
    """A factory of terminators (default phases: 30 s + 30 s), all closed afterwards."""
    factory = TermFactory()
    before = set(_termsafe_threads())
    yield factory
    factory.close_all()
    for thread in _termsafe_threads():
        if thread not in before:
            thread.join(WAIT)
    left = [t.name for t in _termsafe_threads() if t not in before and t.is_alive()]
    assert [] == left, "termsafe threads left running after close()"


@pytest.fixture
def jobs(make_term: TermFactory) -> Iterator[Jobs]:
    """Test threads; joined (before the terminators close) at teardown."""
    runner = Jobs()
    yield runner
    runner.join_all()


@pytest.fixture
def sink() -> MemorySink:
    """A fresh in-memory audit sink."""
    return MemorySink()


@pytest.fixture
def term(make_term: TermFactory, sink: MemorySink) -> Terminator:
    """A terminator with slow phases (nothing escalates unless asked) and ``sink``."""
    return make_term(sink=sink)


@pytest.fixture
def audit(term: Terminator, sink: MemorySink) -> Audit:
    """The audit trail of ``term``."""
    return Audit(term, sink)


@pytest.fixture(scope="module")
def kill_seed() -> int:
    """The seed of the random kill delays (TERMSAFE_KILL_SEED to reproduce)."""
    env = os.environ.get("TERMSAFE_KILL_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**31)
