"""Benchmarks of the core engine: sections, checkpoints, kills, memory.

Every figure is measured in this run, beside the baseline it is compared with,
so a slow or busy machine moves both sides together:

1. sync ``critical_section("db")`` enter+exit inside a workflow, against a bare
   ``@contextlib.contextmanager`` that only yields (ratio);
2. async ``critical_section("db")`` enter+exit inside an asyncio workflow,
   against ``anyio.CancelScope(shield=True)`` enter+exit (ratio);
3. ``checkpoint()`` with no kill pending (absolute; the ratio to an empty
   function call is printed beside it);
4. ``Terminator.kill()`` return time with 1,000 live thread workflows blocked
   in ``termsafe.sleep()`` (p99 of the 1,000 calls);
5. ``kill_all()`` to the last of 1,000 busy thread workflows ``terminated``
   (beside the same threads without termsafe, stopped by events; the same
   workflows killed by one ``kill()`` call each are printed beside it);
6. first kill to the last of 10,000 asyncio workflows ``terminated``, killed
   from another thread, as a control API would (beside plain anyio tasks
   cancelled through ``call_soon_threadsafe``);
7. bytes per idle registered workflow (tracemalloc, 10,000 open workflows).

The micro-benchmarks (1-3) alternate baseline and subject block by block,
with the cyclic GC paused while they run; each round keeps each side's fastest
block (a burst of load from another process lands in some blocks, not in the
cost being measured), and the figure is the median of the per-round ratios.
The scenarios (4-7) run with the GC on, as an application would.

Every terminator here uses ``NullSink``, a sink whose ``emit`` and ``close`` do
nothing: these benchmarks measure the engine, not an audit sink (the audit
trail has its own benchmarks), and a ``MemorySink`` would keep every event
alive, which would blur the memory figure and add its own lock and validation
to the audit thread that competes with the workflows for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import math
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio

import termsafe
from termsafe import Phases, Principal, Terminator, WorkflowState

__all__ = ["NullSink", "collect"]

ADMIN = Principal("bench-admin", roles=("admin",))
#: A ladder long enough that every kill here must land gracefully.
PHASES = Phases(graceful=30.0, forced=5.0)
#: Thread workflows are shallow; small stacks keep 1,000 threads cheap.
THREAD_STACK_SIZE = 512 * 1024
#: Seconds a kill-everything round may take before it is reported as timed out.
WAIT_LIMIT = 60.0

Row = dict[str, Any]


class NullSink:
    """An audit sink that discards every event (isolates the engine's own cost)."""

    def emit(self, event: termsafe.AuditEvent) -> None:
        """Discard ``event``."""

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Settings:
    """How much work each benchmark does."""

    micro_rounds: int
    sync_loops: int
    async_loops: int
    kill_rounds: int
    drain_rounds: int
    async_rounds: int
    threads: int = 1_000
    tasks: int = 10_000
    idle: int = 10_000


QUICK = Settings(
    micro_rounds=9,
    sync_loops=30_000,
    async_loops=10_000,
    kill_rounds=5,
    drain_rounds=3,
    async_rounds=3,
)
FULL = Settings(
    micro_rounds=21,
    sync_loops=100_000,
    async_loops=30_000,
    kill_rounds=9,
    drain_rounds=7,
    async_rounds=5,
)


# -- helpers ------------------------------------------------------------------------


def _row(name: str, value: float, limit: float, unit: str, *, strict: bool, detail: str) -> Row:
    """A result row; ``strict`` means the target is ``< limit`` rather than ``<=``."""
    passed = value < limit if strict else value <= limit
    op = "<" if strict else "<="
    return {
        "name": name,
        "value": float(value),
        "target": f"{op} {limit:g}",
        "unit": unit,
        "passed": bool(passed),
        "detail": detail,
    }


def _say(text: str) -> None:
    print(f"  [core] {text}", flush=True)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return "[" + ", ".join(f"{v * scale:.{digits}f}" for v in values) + "]"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic GC out of a timed loop."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _small_thread_stacks() -> Iterator[None]:
    old = threading.stack_size(THREAD_STACK_SIZE)
    try:
        yield
    finally:
        threading.stack_size(old)


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -int(-q * len(ordered) // 1)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Paired:
    """Per-call times of a baseline and a subject timed in alternating rounds."""

    baseline: list[float]
    subject: list[float]

    @property
    def ratios(self) -> list[float]:
        return [s / b for b, s in zip(self.baseline, self.subject, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def subject_median(self) -> float:
        return statistics.median(self.subject)


Loop = Callable[[int], float]
AsyncLoop = Callable[[int], Awaitable[float]]


#: Blocks per round: each round keeps the fastest block of each side, which
#: drops the blocks a burst of load from other processes landed in.
BLOCKS = 5


def _paired(baseline: Loop, subject: Loop, loops: int, rounds: int) -> Paired:
    """Per-call times of each side over ``rounds`` rounds of ``loops`` calls.

    Within a round the two sides alternate block by block (ABAB..., starting
    with the other side every round), and each side's round figure is its
    fastest block.
    """
    block = max(1, loops // BLOCKS)
    baseline(block)
    subject(block)
    base: list[float] = []
    subj: list[float] = []
    for i in range(rounds):
        first, second = (subject, baseline) if i % 2 else (baseline, subject)
        times: dict[Loop, float] = {first: math.inf, second: math.inf}
        with _gc_paused():
            for _ in range(BLOCKS):
                for side in (first, second):
                    times[side] = min(times[side], side(block))
        base.append(times[baseline] / block)
        subj.append(times[subject] / block)
    return Paired(base, subj)


async def _paired_async(baseline: AsyncLoop, subject: AsyncLoop, loops: int, rounds: int) -> Paired:
    """``_paired`` for loops that run on the event loop."""
    block = max(1, loops // BLOCKS)
    await baseline(block)
    await subject(block)
    base: list[float] = []
    subj: list[float] = []
    for i in range(rounds):
        first, second = (subject, baseline) if i % 2 else (baseline, subject)
        times: dict[AsyncLoop, float] = {first: math.inf, second: math.inf}
        with _gc_paused():
            for _ in range(BLOCKS):
                for side in (first, second):
                    times[side] = min(times[side], await side(block))
        base.append(times[baseline] / block)
        subj.append(times[subject] / block)
    return Paired(base, subj)


# -- 1. sync critical section ----------------------------------------------------------


@contextlib.contextmanager
def _bare_cm() -> Iterator[None]:
    yield


def _loop_bare_cm(loops: int) -> float:
    cm = _bare_cm
    start = time.perf_counter()
    for _ in range(loops):
        with cm():
            pass
    return time.perf_counter() - start


def _loop_sync_section(loops: int) -> float:
    section = termsafe.critical_section
    start = time.perf_counter()
    for _ in range(loops):
        with section("db"):
            pass
    return time.perf_counter() - start


def bench_sync_section(settings: Settings) -> Row:
    """Target 1: sync ``critical_section`` / bare ``@contextmanager`` <= 2.0."""
    with Terminator(PHASES, sink=NullSink()) as term, term.workflow("bench-sync-section"):
        result = _paired(
            _loop_bare_cm, _loop_sync_section, settings.sync_loops, settings.micro_rounds
        )
    _say(f"sync section / @contextmanager ratios: {_fmt(result.ratios)}")
    return _row(
        "sync critical_section / @contextmanager",
        result.ratio,
        2.0,
        "x",
        strict=False,
        detail=(
            f"section {result.subject_median * 1e9:.0f} ns vs "
            f"@contextmanager {result.baseline_median * 1e9:.0f} ns; "
            f"ratio range {min(result.ratios):.2f}-{max(result.ratios):.2f}"
        ),
    )


# -- 2. async critical section -----------------------------------------------------------


async def _loop_shield_scope(loops: int) -> float:
    scope = anyio.CancelScope
    start = time.perf_counter()
    for _ in range(loops):
        with scope(shield=True):
            pass
    return time.perf_counter() - start


async def _loop_async_section(loops: int) -> float:
    section = termsafe.critical_section
    start = time.perf_counter()
    for _ in range(loops):
        async with section("db"):
            pass
    return time.perf_counter() - start


def bench_async_section(settings: Settings) -> Row:
    """Target 2: async ``critical_section`` / ``CancelScope(shield=True)`` <= 1.5."""

    async def main(term: Terminator) -> Paired:
        async with term.workflow("bench-async-section"):
            return await _paired_async(
                _loop_shield_scope,
                _loop_async_section,
                settings.async_loops,
                settings.micro_rounds,
            )
        raise RuntimeError("the benchmark workflow was killed")  # absorbed by the workflow

    with Terminator(PHASES, sink=NullSink()) as term:
        result = anyio.run(main, term, backend="asyncio")
    _say(f"async section / shielded CancelScope ratios: {_fmt(result.ratios)}")
    return _row(
        "async critical_section / CancelScope(shield)",
        result.ratio,
        1.5,
        "x",
        strict=False,
        detail=(
            f"section {result.subject_median * 1e6:.2f} us vs "
            f"CancelScope {result.baseline_median * 1e6:.2f} us (asyncio); "
            f"ratio range {min(result.ratios):.2f}-{max(result.ratios):.2f}"
        ),
    )


# -- 3. checkpoint ----------------------------------------------------------------------


def _empty() -> None:
    pass


def _loop_empty_call(loops: int) -> float:
    fn = _empty
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return time.perf_counter() - start


def _loop_checkpoint(loops: int) -> float:
    fn = termsafe.checkpoint
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return time.perf_counter() - start


def bench_checkpoint(settings: Settings) -> Row:
    """Target 3: ``checkpoint()`` with no kill pending <= 0.5 us per call."""
    with Terminator(PHASES, sink=NullSink()) as term, term.workflow("bench-checkpoint"):
        result = _paired(
            _loop_empty_call, _loop_checkpoint, settings.sync_loops * 3, settings.micro_rounds
        )
    _say(f"checkpoint per call (us): {_fmt(result.subject, 1e6, 3)}")
    return _row(
        "checkpoint() per call, no kill pending",
        result.subject_median * 1e6,
        0.5,
        "us",
        strict=False,
        detail=(
            f"{result.ratio:.2f}x an empty function call ({result.baseline_median * 1e9:.0f} ns)"
        ),
    )


# -- 4/5. thread workflows -------------------------------------------------------------


@dataclass
class ThreadRound:
    """What one kill-everything round of thread workflows measured."""

    kill_seconds: list[float]
    drain_seconds: float
    states: dict[str, int]

    @property
    def all_terminated(self) -> bool:
        return set(self.states) == {WorkflowState.TERMINATED.value}


def _idle_body() -> None:
    while True:
        termsafe.sleep(3600.0)


def _busy_body() -> None:
    while True:
        termsafe.checkpoint()
        termsafe.sleep(0.001)


def _thread_round(
    count: int, body: Callable[[], None], settle: float, *, bulk: bool = False
) -> ThreadRound:
    """Start ``count`` thread workflows running ``body``, then kill them all.

    Kills each with its own ``kill()`` call, or all with one ``kill_all()``
    call if ``bulk``. Returns each call's duration and the time from the first
    call to the last ``KillHandle.wait()`` returning (the workflow
    ``terminated``, its hooks run and its events delivered).
    """
    with Terminator(PHASES, sink=NullSink()) as term:
        ready = threading.Semaphore(0)
        gate = threading.Event()

        def worker(workflow_id: str) -> None:
            with term.workflow(workflow_id):
                ready.release()
                gate.wait()
                body()

        ids = [f"thread-{i:04d}" for i in range(count)]
        with _small_thread_stacks():
            threads = [
                threading.Thread(target=worker, args=(wid,), name=wid, daemon=True) for wid in ids
            ]
            for thread in threads:
                thread.start()
        for _ in ids:
            ready.acquire()
        gate.set()
        time.sleep(settle)
        gc.collect()

        kill = term.kill
        clock = time.perf_counter
        durations: list[float] = []
        handles = []
        first = clock()
        if bulk:
            handles = term.kill_all(by=ADMIN, reason="benchmark")
            durations.append(clock() - first)
        else:
            for wid in ids:
                start = clock()
                handles.append(kill(wid, by=ADMIN, reason="benchmark"))
                durations.append(clock() - start)
        deadline = first + WAIT_LIMIT
        states: dict[str, int] = {}
        for handle in handles:
            try:
                state = handle.wait(timeout=max(0.0, deadline - clock())).value
            except termsafe.WaitTimeout:
                state = "timeout"
            states[state] = states.get(state, 0) + 1
        drain = clock() - first
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - clock()))
    return ThreadRound(durations, drain, states)


def bench_kill_latency(settings: Settings) -> Row:
    """Target 4: ``kill()`` return time with 1,000 live workflows, p99 < 1 ms."""
    p99s: list[float] = []
    p50s: list[float] = []
    worst: list[float] = []
    ok = True
    for _ in range(settings.kill_rounds):
        result = _thread_round(settings.threads, _idle_body, settle=0.2)
        ok = ok and result.all_terminated
        p99s.append(_percentile(result.kill_seconds, 0.99))
        p50s.append(statistics.median(result.kill_seconds))
        worst.append(max(result.kill_seconds))
    _say(
        f"kill() p99 per round (ms): {_fmt(p99s, 1e3, 3)}; p50 {_fmt(p50s, 1e6, 1)} us; "
        f"max {_fmt(worst, 1e3, 2)} ms"
    )
    row = _row(
        f"kill() p99, {settings.threads} idle thread workflows",
        statistics.median(p99s) * 1e3,
        1.0,
        "ms",
        strict=True,
        detail=(
            f"median of {len(p99s)} rounds; p50 {statistics.median(p50s) * 1e6:.0f} us, "
            f"max {max(worst) * 1e3:.2f} ms"
        ),
    )
    return _require(row, ok, "not every workflow ended terminated")


def _plain_thread_drain(count: int, settle: float) -> float:
    """The baseline of target 5: plain threads in the same loop, stopped by an event.

    Each thread waits 1 ms at a time on its own ``threading.Event`` (what
    ``termsafe.sleep`` does with a condition); stopping sets the events one by
    one and joins every thread.
    """
    ready = threading.Semaphore(0)
    gate = threading.Event()
    stops = [threading.Event() for _ in range(count)]

    def worker(stop: threading.Event) -> None:
        ready.release()
        gate.wait()
        while not stop.wait(0.001):
            pass

    with _small_thread_stacks():
        threads = [threading.Thread(target=worker, args=(stop,), daemon=True) for stop in stops]
        for thread in threads:
            thread.start()
    for _ in stops:
        ready.acquire()
    gate.set()
    time.sleep(settle)
    gc.collect()
    first = time.perf_counter()
    for stop in stops:
        stop.set()
    for thread in threads:
        thread.join()
    return time.perf_counter() - first


def bench_thread_drain(settings: Settings) -> Row:
    """Target 5: 1,000 busy thread workflows all ``terminated`` < 250 ms after ``kill_all()``.

    The same workflows killed by one ``kill()`` call each are measured too and
    printed beside it: with every thread wanting the GIL, the loop that calls
    ``kill()`` is preempted between calls, where ``kill_all()`` holds it (see
    ``Terminator.kill_all``), so that figure varies far more with the load.
    """
    drains: list[float] = []
    singles: list[float] = []
    plain: list[float] = []
    calls: list[float] = []
    loops: list[float] = []
    ok = True
    for _ in range(settings.drain_rounds):
        plain.append(_plain_thread_drain(settings.threads, settle=0.3))
        result = _thread_round(settings.threads, _busy_body, settle=0.3, bulk=True)
        ok = ok and result.all_terminated
        drains.append(result.drain_seconds)
        calls.append(result.kill_seconds[0])
        single = _thread_round(settings.threads, _busy_body, settle=0.3)
        ok = ok and single.all_terminated
        singles.append(single.drain_seconds)
        loops.append(sum(single.kill_seconds))
    ratios = [d / p for d, p in zip(drains, plain, strict=True)]
    _say(
        f"busy threads, kill_all() -> all terminated (ms): {_fmt(drains, 1e3, 1)}; "
        f"kill_all() returned after {_fmt(calls, 1e3, 1)} ms"
    )
    _say(
        f"same, one kill() per workflow (ms): {_fmt(singles, 1e3, 1)}; "
        f"time inside the kill() calls {_fmt(loops, 1e3, 1)} ms"
    )
    _say(f"plain threads stopped by events (ms): {_fmt(plain, 1e3, 1)}; ratios {_fmt(ratios)}")
    row = _row(
        f"{settings.threads} busy thread workflows terminated",
        statistics.median(drains) * 1e3,
        250.0,
        "ms",
        strict=True,
        detail=(
            f"kill_all(); median of {len(drains)} rounds, worst {max(drains) * 1e3:.0f} ms; "
            f"plain threads stopped by events {statistics.median(plain) * 1e3:.0f} ms "
            f"(ratio {statistics.median(ratios):.1f}); one kill() per workflow: median "
            f"{statistics.median(singles) * 1e3:.0f} ms, worst {max(singles) * 1e3:.0f} ms"
        ),
    )
    return _require(row, ok, "not every workflow ended terminated")


def _require(row: Row, ok: bool, why: str) -> Row:
    if not ok:
        row["passed"] = False
        row["detail"] += f"; FAILED: {why}"
    return row


# -- 6. async workflows -------------------------------------------------------------------


@dataclass
class AsyncRound:
    """What one kill-everything round of asyncio workflows measured."""

    drain_seconds: float
    kill_seconds: float
    states: dict[str, int]


def _async_round(count: int, nap: float) -> AsyncRound:
    """Run ``count`` asyncio workflows on a loop thread; kill them all from this thread."""
    with Terminator(PHASES, sink=NullSink()) as term:
        ready = threading.Event()
        all_done = threading.Event()
        workflows: list[termsafe.Workflow] = []
        ended: list[float] = []

        async def one(workflow_id: str) -> None:
            async with term.workflow(workflow_id) as wf:
                workflows.append(wf)
                if len(workflows) == count:
                    ready.set()
                while True:
                    await anyio.sleep(nap)
            ended.append(time.perf_counter())
            if len(ended) == count:
                all_done.set()

        ids = [f"task-{i:05d}" for i in range(count)]

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for wid in ids:
                    tg.start_soon(one, wid)

        loop_thread = threading.Thread(
            target=anyio.run,
            args=(main,),
            kwargs={"backend": "asyncio"},
            name="bench-loop",
            daemon=True,
        )
        loop_thread.start()
        if not ready.wait(120.0):
            raise RuntimeError("the asyncio workflows did not all start within 120 s")
        time.sleep(0.3)
        gc.collect()

        kill = term.kill
        first = time.perf_counter()
        for wid in ids:
            kill(wid, by=ADMIN, reason="benchmark")
        killed = time.perf_counter()
        finished = all_done.wait(WAIT_LIMIT)
        drain = (max(ended) if finished else time.perf_counter()) - first
        loop_thread.join(60.0)
        states: dict[str, int] = {}
        for wf in workflows:
            states[wf.state.value] = states.get(wf.state.value, 0) + 1
        if not finished:
            states["timeout"] = count - len(ended)
    return AsyncRound(drain, killed - first, states)


def _plain_async_drain(count: int, nap: float) -> float:
    """The baseline of target 6: plain anyio tasks, each cancelled from this thread.

    Each task loops on ``anyio.sleep`` inside its own ``CancelScope``; stopping
    hands every ``scope.cancel`` to the loop with ``call_soon_threadsafe`` (what
    a kill does) and waits for the last task to leave its scope.
    """
    ready = threading.Event()
    all_done = threading.Event()
    scopes: list[anyio.CancelScope] = []
    ended: list[float] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def one() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            if len(scopes) == count:
                ready.set()
            while True:
                await anyio.sleep(nap)
        ended.append(time.perf_counter())
        if len(ended) == count:
            all_done.set()

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)

    loop_thread = threading.Thread(
        target=anyio.run,
        args=(main,),
        kwargs={"backend": "asyncio"},
        name="bench-loop",
        daemon=True,
    )
    loop_thread.start()
    if not ready.wait(120.0):
        raise RuntimeError("the plain asyncio tasks did not all start within 120 s")
    time.sleep(0.3)
    gc.collect()
    call_soon = loops[0].call_soon_threadsafe
    first = time.perf_counter()
    for scope in scopes:
        call_soon(scope.cancel)
    if not all_done.wait(WAIT_LIMIT):
        raise RuntimeError(f"the plain asyncio tasks were not all cancelled in {WAIT_LIMIT:g} s")
    loop_thread.join(60.0)
    return max(ended) - first


def bench_async_drain(settings: Settings) -> Row:
    """Target 6: 10,000 asyncio workflows all ``terminated`` < 1 s after the first kill."""
    nap = 0.5
    drains: list[float] = []
    plain: list[float] = []
    kill_totals: list[float] = []
    ok = True
    for _ in range(settings.async_rounds):
        plain.append(_plain_async_drain(settings.tasks, nap))
        result = _async_round(settings.tasks, nap)
        ok = ok and set(result.states) == {WorkflowState.TERMINATED.value}
        drains.append(result.drain_seconds)
        kill_totals.append(result.kill_seconds)
    ratios = [d / p for d, p in zip(drains, plain, strict=True)]
    _say(
        f"asyncio workflows, first kill -> all terminated (ms): {_fmt(drains, 1e3, 1)}; "
        f"kill loop {_fmt(kill_totals, 1e3, 1)} ms"
    )
    _say(
        f"plain anyio tasks cancelled from a thread (ms): {_fmt(plain, 1e3, 1)}; "
        f"ratios {_fmt(ratios)}"
    )
    row = _row(
        f"{settings.tasks} asyncio workflows terminated",
        statistics.median(drains) * 1e3,
        1000.0,
        "ms",
        strict=True,
        detail=(
            f"median of {len(drains)} rounds, worst {max(drains) * 1e3:.0f} ms; medians: "
            f"the kills (from another thread) {statistics.median(kill_totals) * 1e3:.0f} ms, "
            f"plain anyio tasks cancelled the same way {statistics.median(plain) * 1e3:.0f} ms "
            f"(ratio {statistics.median(ratios):.1f}); each task sleeps {nap:g} s per loop"
        ),
    )
    return _require(row, ok, "not every workflow ended terminated")


# -- 7. memory ------------------------------------------------------------------------------


def _idle_bytes(count: int, *, sink_factory: Callable[[], Any], nested: bool) -> float:
    """Bytes traced per open idle workflow while ``count`` are registered.

    ``nested``: entered one inside the other in one thread (each is the next one's
    parent), as an ``ExitStack`` does; otherwise each is entered in its own copy
    of a workflow-free context, as independent threads or tasks would be.
    """
    with Terminator(PHASES, sink=sink_factory()) as term:
        # Warm up: start the audit thread and any lazily built state first.
        for i in range(100):
            with term.workflow(f"warm-{i}"):
                pass
        term.flush()
        ids = [f"idle-{i:05d}" for i in range(count)]
        base_context = contextvars.copy_context()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            with contextlib.ExitStack() as stack:
                for wid in ids:
                    cm = term.workflow(wid)
                    if nested:
                        stack.enter_context(cm)
                    else:
                        ctx = base_context.copy()
                        ctx.run(cm.__enter__)
                        stack.callback(ctx.run, cm.__exit__, None, None, None)
                term.flush()
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
                assert len(term) == count
        finally:
            tracemalloc.stop()
    return (after - before) / count


def bench_idle_memory(settings: Settings) -> Row:
    """Target 7: memory per idle registered workflow <= 4 KiB."""
    nested = _idle_bytes(settings.idle, sink_factory=NullSink, nested=True)
    separate = _idle_bytes(settings.idle, sink_factory=NullSink, nested=False)
    kept = _idle_bytes(settings.idle, sink_factory=termsafe.MemorySink, nested=True)
    _say(
        f"idle workflow bytes: ExitStack {nested:.0f}, own contexts {separate:.0f}, "
        f"MemorySink {kept:.0f}"
    )
    return _row(
        f"memory per idle workflow ({settings.idle} open)",
        nested / 1024,
        4.0,
        "KiB",
        strict=False,
        detail=(
            f"{nested:.0f} B nested in one ExitStack (counts the stack's entries); "
            f"{separate:.0f} B each in its own context; "
            f"{kept:.0f} B with a MemorySink keeping the events"
        ),
    )


# -- entry point ----------------------------------------------------------------------------


BENCHMARKS: tuple[Callable[[Settings], Row], ...] = (
    bench_sync_section,
    bench_async_section,
    bench_checkpoint,
    bench_kill_latency,
    bench_thread_drain,
    bench_async_drain,
    bench_idle_memory,
)


def collect(quick: bool) -> list[Row]:
    """Run every core benchmark; return one row per target."""
    settings = QUICK if quick else FULL
    rows = []
    for bench in BENCHMARKS:
        started = time.perf_counter()
        rows.append(bench(settings))
        _say(f"{bench.__name__} took {time.perf_counter() - started:.1f} s")
    return rows


if __name__ == "__main__":
    for result_row in collect(quick="--quick" in sys.argv):
        print(result_row)
