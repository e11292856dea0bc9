"""Tests of idempotent_call: Stripe semantics against a real counting HTTP service.

Side effects go to a local HTTP server on 127.0.0.1 that counts them per key.
Other processes are real: this file run as a script (``python
test_idempotency.py COMMAND SPEC``) makes calls, holds keys, races for them or
freezes as a zombie. The kill test starts one worker that imports termsafe
once and forks a child per trial; the worker SIGKILLs it after a seeded random
delay spanning the whole call, then a fresh process retries every key, and the
server's counts and SQLite's own ``PRAGMA integrity_check`` judge.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.client
import json
import math
import os
import pickle
import random
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any

import anyio
import pytest
from conftest import ADMIN, WAIT, Audit, Job, Jobs, TermFactory
from hypothesis import given, settings
from hypothesis import strategies as st

import termsafe
from termsafe import (
    AlreadyRecorded,
    ConfigurationError,
    IdempotencyConflict,
    IdempotencyKeyReused,
    IdempotentCall,
    InvalidArgumentType,
    LeaseLost,
    OutcomeUnknown,
    Phases,
    Principal,
    Terminator,
    WorkflowState,
    idempotent_call,
    prune_idempotency,
    resolve_outcome,
    run_pending_compensations,
)
from termsafe._idempotency import _keeper_for, _LeaseKeeper, request_fingerprint
from termsafe._store import APPLICATION_ID, MIGRATIONS, Claim, SQLiteStore
from termsafe._terminator import _set_default_terminator, get_terminator

BACKENDS = ["asyncio", "trio"]
ALICE = Principal("alice")
REQUEST = {"amount": 100, "currency": "eur"}
MODES = ("auto", "explicit", "dedupes")


# -- the counting service -----------------------------------------------------------------


class _HTTPServer(ThreadingMixIn, HTTPServer):
    # Handler threads are joined by server_close(): nothing outlives a test.
    daemon_threads = False
    block_on_close = True


class CountingServer:
    """A local payment-like service: each POST /charge is one side effect, counted per key.

    With ``X-Dedupe: 1`` it deduplicates by ``Idempotency-Key`` the way Stripe
    does: a repeated key returns the first response and has no new effect.
    With ``gate`` set, a request is counted, then held until the gate opens.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.effects: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.first: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self.gate: threading.Event | None = None
        self.arrived = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                    body = json.loads(self.rfile.read(length))
                except (OSError, ValueError):
                    return  # the client died while sending: no effect
                key = self.headers["Idempotency-Key"]
                answer = server.charge(key, body, self.headers.get("X-Dedupe") == "1")
                gate = server.gate
                if gate is not None:
                    server.arrived.set()
                    gate.wait(WAIT * 6)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client was killed before it read the answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = self._handle_error  # type: ignore[method-assign]
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="counting-http"
        )
        self.thread.start()

    def _handle_error(self, request: object, client_address: object) -> None:
        self.errors.append(traceback.format_exc())

    def charge(self, key: str, body: dict[str, Any], dedupe: bool) -> dict[str, Any]:
        with self.lock:
            self.requests[key] += 1
            if dedupe and key in self.first:
                return self.first[key]
            self.effects[key] += 1
            n = self.effects[key]
            answer = {"charge": f"ch_{key}_{n}", "n": n, "amount": body.get("amount")}
            self.first.setdefault(key, answer)
            return answer

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT)


def post(port: int, key: str, body: Any, dedupe: bool = False) -> dict[str, Any]:
    """One charge request; the key goes to the service as ``Idempotency-Key``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT * 6)
    try:
        conn.request(
            "POST",
            "/charge",
            json.dumps(body),
            {
                "Idempotency-Key": key,
                "X-Dedupe": "1" if dedupe else "0",
                "Content-Type": "application/json",
            },
        )
        answer: dict[str, Any] = json.loads(conn.getresponse().read())
        return answer
    finally:
        conn.close()


def charge(key: str, mode: str, store: SQLiteStore, port: int, **options: Any) -> tuple[str, Any]:
    """The call every process here makes: charge 100 under ``key`` in one of ``MODES``."""
    request = {"amount": 100, "key": key}
    with idempotent_call(
        key,
        request=request,
        store=store,
        dedupes=mode == "dedupes",
        explicit_send=mode == "explicit",
        **options,
    ) as call:
        if call.replayed:
            return "replayed", call.result
        if mode == "explicit":
            with call.sending():
                answer = post(port, call.key, request)
        else:
            answer = post(port, call.key, request, dedupe=mode == "dedupes")
        call.record(answer)
        return "recorded", call.result


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- what other processes do (this file run as a script) -----------------------------------


def cmd_call(spec: dict[str, Any]) -> None:
    """One attempt per key; report each outcome."""
    store = SQLiteStore(spec["store"])
    for key, mode in spec["keys"]:
        try:
            outcome, result = charge(key, mode, store, spec["port"])
        except OutcomeUnknown:
            outcome, result = "unknown", None
        except IdempotencyConflict:
            outcome, result = "conflict", None
        say(key=key, outcome=outcome, result=result)


def cmd_race(spec: dict[str, Any]) -> None:
    """Get ready, wait for the start line, then try to charge the one key."""
    store = SQLiteStore(spec["store"])
    store.idem_status(spec["key"])  # the connection is open before the start
    say(ready=True)
    sys.stdin.readline()
    try:
        outcome, _ = charge(spec["key"], "auto", store, spec["port"])
    except IdempotencyConflict:
        outcome = "conflict"
    say(outcome=outcome)


def cmd_hold(spec: dict[str, Any]) -> None:
    """Claim the key (and send, if asked), say so, then wait to be killed."""
    store = SQLiteStore(spec["store"])
    request = {"amount": 100, "key": spec["key"]}
    with idempotent_call(
        spec["key"], request=request, store=store, explicit_send=spec["explicit"]
    ) as call:
        if spec["send"]:
            call.mark_sent()
            post(spec["port"], call.key, request)
        say(claimed=call.epoch)
        sys.stdin.readline()  # never answered: the test SIGKILLs us here


def cmd_zombie(spec: dict[str, Any]) -> None:
    """Claim, freeze (SIGSTOP) at once, and once thawed try to finish the call."""
    store = SQLiteStore(spec["store"])
    key, mode = spec["key"], spec["mode"]
    request = {"amount": 100, "key": key}
    with idempotent_call(
        key,
        request=request,
        store=store,
        lease=spec["lease"],
        dedupes=mode == "dedupes",
        explicit_send=mode == "explicit",
    ) as call:
        # Frozen before the first renewal is due: the lease runs out, as for a
        # process paused by a debugger, a GC storm or a suspended VM.
        os.kill(os.getpid(), signal.SIGSTOP)
        sys.stdin.readline()
        try:
            if mode == "explicit":
                call.mark_sent()
            answer = post(spec["port"], call.key, request, dedupe=True)
            call.record(answer)
        except LeaseLost as exc:
            say(outcome="lease_lost", epoch=exc.epoch, current=exc.current_epoch)
            return
        say(outcome="recorded")


def refund(payload: Any) -> None:
    """A compensation: in these children it only reports itself."""
    say(refunded=payload)


def cmd_compensate_and_die(spec: dict[str, Any]) -> None:
    """Record a charge with a compensation inside a workflow, then SIGKILL ourselves."""
    store = SQLiteStore(spec["store"])
    with termsafe.workflow("checkout", owner="shop"):
        with idempotent_call(spec["key"], request=REQUEST, store=store) as call:
            answer = post(spec["port"], call.key, REQUEST)
            call.record(answer)
            call.compensate(refund, {"charge": answer["charge"]}, name="refund")
        say(recorded=answer)
        os.kill(os.getpid(), signal.SIGKILL)


def cmd_worker(spec: dict[str, Any]) -> None:
    """Fork a charging child per trial and SIGKILL it at a seeded random moment.

    Prints one JSON line per trial. This process never touches termsafe's
    store or threads (only the children do), so forking is safe.
    """
    rng = random.Random(spec["seed"])
    high = 0.0
    durations: list[float] = []
    kills = 0
    trial = 0
    while kills < spec["kills"] and trial < spec["max_trials"]:
        calibrating = trial < spec["calibrate"]
        key = f"{'cal' if calibrating else 't'}-{trial}"
        mode = MODES[trial % 3] if calibrating else rng.choice(MODES)
        r, w = os.pipe()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the charging child
            os.close(r)
            code = 0
            try:
                charge(key, mode, SQLiteStore(spec["store"]), spec["port"])
                os.write(w, b"k")
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        # The pipe turns readable when the child is done (or dies): the delay
        # is the kill point, not a wait for something to happen.
        delay = None if calibrating else rng.uniform(0.0, high)
        ready, _, _ = select.select([r], [], [], delay)
        finished = bool(ready) and os.read(r, 1) == b"k"
        elapsed = time.monotonic() - started
        os.kill(pid, signal.SIGKILL)  # one that already exited is a zombie: harmless
        _, status = os.waitpid(pid, 0)
        os.close(r)
        if finished:
            # Kill anywhere from the fork to a little past a typical call: the
            # median of the recent whole calls follows the machine's load.
            durations.append(elapsed)
            high = 1.2 * statistics.median(durations[-25:])
        killed = not finished and os.WIFSIGNALED(status)
        kills += killed
        crashed = os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0
        say(
            key=key,
            mode=mode,
            delay=delay,
            finished=finished,
            killed=killed,
            crashed=crashed,
            calibrating=calibrating,
        )
        trial += 1


COMMANDS = {
    "call": cmd_call,
    "race": cmd_race,
    "hold": cmd_hold,
    "zombie": cmd_zombie,
    "compensate_and_die": cmd_compensate_and_die,
    "worker": cmd_worker,
}


# -- driving other processes ---------------------------------------------------------------


class Children:
    """Processes running this file as a script; all killed and reaped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: str, **spec: Any) -> subprocess.Popen[bytes]:
        env = {**os.environ, "TERMSAFE_HOME": str(self.tmp_path / "home")}
        proc = subprocess.Popen(
            [sys.executable, __file__, command, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            cwd=self.tmp_path,
            env=env,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, command: str, timeout: float = 120.0, **spec: Any) -> list[dict[str, Any]]:
        """Run to the end; return the JSON lines it printed."""
        proc = self.start(command, **spec)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"{command} child timed out after {timeout}s ({spec})") from None
        assert 0 == proc.returncode, f"{command} child failed:\n{err.decode()}"
        return [json.loads(line) for line in out.decode().splitlines()]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def read_line(proc: subprocess.Popen[bytes], timeout: float = WAIT * 3) -> dict[str, Any]:
    """The next JSON line ``proc`` prints (its stdout is unbuffered)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"child {proc.pid} printed no line within {timeout}s")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                proc.wait()
                err = proc.stderr.read().decode() if proc.stderr is not None else ""
                raise AssertionError(f"child {proc.pid} exited ({proc.returncode}): {err}")
            line += byte
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.communicate()
    assert -signal.SIGKILL == proc.returncode


class CountingStore(SQLiteStore):
    """A real store that also counts lease renewals and signals every one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.renewals = 0
        self.renewed = threading.Condition()

    def idem_renew(self, key: str, epoch: int, lease_seconds: float) -> None:
        super().idem_renew(key, epoch, lease_seconds)
        with self.renewed:
            self.renewals += 1
            self.renewed.notify_all()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[CountingServer]:
    """The counting service; stopped (and its threads joined) afterwards."""
    srv = CountingServer()
    yield srv
    srv.close()
    assert [] == srv.errors


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """A fresh store file, closed afterwards."""
    st = SQLiteStore(tmp_path / "store.sqlite3")
    yield st
    st.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    """Child processes of this file, killed and reaped afterwards."""
    kids = Children(tmp_path)
    yield kids
    kids.close()


def _seed() -> int:
    return int(os.environ.get("TERMSAFE_TEST_SEED") or random.randrange(2**32))


# -- replay -------------------------------------------------------------------------------


class TestReplay:
    def test_same_process(self, store: SQLiteStore, server: CountingServer) -> None:
        """A second call with the key returns the recorded result and sends nothing."""
        first = charge("order-1", "auto", store, server.port)
        second = charge("order-1", "auto", store, server.port)
        assert "recorded" == first[0]
        assert ("replayed", first[1]) == second
        assert 1 == server.effects["order-1"]

    def test_another_process(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """A process started later replays the result without calling the service."""
        _, result = charge("order-2", "auto", store, server.port)
        lines = children.run(
            "call", store=str(store.path), port=server.port, keys=[["order-2", "auto"]]
        )
        assert [{"key": "order-2", "outcome": "replayed", "result": result}] == lines
        assert 1 == server.requests["order-2"]

    def test_other_process_recorded(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """A key recorded by another process replays here, after that process is gone."""
        lines = children.run(
            "call", store=str(store.path), port=server.port, keys=[["order-3", "explicit"]]
        )
        assert "recorded" == lines[0]["outcome"]
        assert ("replayed", lines[0]["result"]) == charge("order-3", "explicit", store, server.port)
        assert 1 == server.requests["order-3"]

    def test_replay_refuses_to_send(self, store: SQLiteStore) -> None:
        """On a replay, sending, recording or compensating raises AlreadyRecorded naming the key."""
        with idempotent_call("order-4", request=REQUEST, store=store) as call:
            call.record({"ok": True})
        with idempotent_call("order-4", request=REQUEST, store=store) as call:
            assert call.replayed
            for action in (call.mark_sent, lambda: call.record(1), lambda: call.compensate(print)):
                with pytest.raises(AlreadyRecorded, match="'order-4'"):
                    action()

    def test_record_twice(self, store: SQLiteStore) -> None:
        """A second record() in the same block is refused; the first result stands."""
        with idempotent_call("order-5", request=REQUEST, store=store) as call:
            call.record({"n": 1})
            with pytest.raises(AlreadyRecorded):
                call.record({"n": 2})
        assert {"n": 1} == store.idem_info("order-5").result  # type: ignore[union-attr]

    def test_result_goes_through_json(self, store: SQLiteStore) -> None:
        """``call.result`` after record() is what a replay returns (a tuple becomes a list)."""
        with idempotent_call("order-6", request=REQUEST, store=store) as call:
            call.record({"items": (1, 2)})
            assert {"items": [1, 2]} == call.result
        with idempotent_call("order-6", request=REQUEST, store=store) as call:
            assert {"items": [1, 2]} == call.result

    def test_clean_exit_records_none(self, store: SQLiteStore) -> None:
        """A body that ends cleanly without record() records None: the call happened."""
        with idempotent_call("hook-1", request=REQUEST, store=store):
            pass
        with idempotent_call("hook-1", request=REQUEST, store=store) as call:
            assert call.replayed
            assert call.result is None


class TestForms:
    def test_run(self, store: SQLiteStore, server: CountingServer) -> None:
        """``call.run(fn)`` calls fn on a first run and skips it on a replay."""
        for _ in range(2):
            with idempotent_call("run-1", request=REQUEST, store=store) as call:
                result = call.run(post, server.port, call.key, REQUEST)
        assert 1 == server.effects["run-1"]
        assert "ch_run-1_1" == result["charge"]

    def test_decorator(self, store: SQLiteStore, server: CountingServer) -> None:
        """The decorated function gets the call first, runs once per key and replays after."""
        calls = []

        @idempotent_call(lambda order_id, amount: f"pay-{order_id}", store=store)
        def pay(call: IdempotentCall, order_id: str, amount: int) -> dict[str, Any]:
            calls.append(call.key)
            return post(server.port, call.key, {"amount": amount})

        first = pay("a1", 100)
        assert first == pay("a1", 100)
        assert ["pay-a1"] == calls
        assert 1 == server.effects["pay-a1"]
        with pytest.raises(IdempotencyKeyReused, match="'pay-a1'"):
            pay("a1", 200)  # the arguments are the request by default

    def test_decorator_request_function(self, store: SQLiteStore) -> None:
        """``request=`` may be a function of the arguments; arguments outside it do not count."""

        @idempotent_call(lambda n, note: f"inc-{n}", request=lambda n, note: {"n": n}, store=store)
        def inc(call: IdempotentCall, n: int, note: object) -> int:
            return n + 1

        assert 2 == inc(1, object())
        assert 2 == inc(1, object())

    def test_decorator_release(self, store: SQLiteStore) -> None:
        """A decorated function that releases the call returns its value and records nothing."""

        @idempotent_call("maybe", request=REQUEST, store=store)
        def maybe(call: IdempotentCall) -> str:
            call.release()
            return "declined"

        assert "declined" == maybe()
        assert "released" == store.idem_status("maybe")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_decorator(
        self, store: SQLiteStore, server: CountingServer, backend: str
    ) -> None:
        """An async decorated function runs once per key on asyncio and trio."""

        @idempotent_call(lambda n: f"async-{backend}-{n}", store=store)
        async def pay(call: IdempotentCall, n: int) -> dict[str, Any]:
            return await anyio.to_thread.run_sync(post, server.port, call.key, {"n": n})

        async def main() -> list[dict[str, Any]]:
            return [await pay(1), await pay(1)]

        first, second = anyio.run(main, backend=backend)
        assert first == second
        assert 1 == server.effects[f"async-{backend}-1"]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_with(self, store: SQLiteStore, server: CountingServer, backend: str) -> None:
        """``async with`` claims, sends explicitly, records and replays."""
        key = f"async-with-{backend}"

        async def once() -> tuple[bool, Any]:
            async with idempotent_call(
                key, request=REQUEST, store=store, explicit_send=True
            ) as call:
                if call.replayed:
                    return True, call.result
                async with call.sending():
                    answer = await anyio.to_thread.run_sync(post, server.port, call.key, REQUEST)
                await call.arecord(answer)
                return False, call.result

        async def main() -> list[tuple[bool, Any]]:
            return [await once(), await once()]

        (replayed1, r1), (replayed2, r2) = anyio.run(main, backend=backend)
        assert (False, True) == (replayed1, replayed2)
        assert r1 == r2
        assert 1 == server.effects[key]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_async_failure_releases(self, store: SQLiteStore, backend: str) -> None:
        """An async body that fails before sending leaves the key retryable."""

        async def main() -> None:
            with pytest.raises(ZeroDivisionError):
                async with idempotent_call(
                    "async-fail", request=REQUEST, store=store, explicit_send=True
                ):
                    1 / 0  # noqa: B018

        anyio.run(main, backend=backend)
        assert "released" == store.idem_status("async-fail")


# -- errors -------------------------------------------------------------------------------


class TestRefusals:
    def test_key_reused(self, store: SQLiteStore) -> None:
        """The same key with another request raises IdempotencyKeyReused naming the key."""
        with idempotent_call("k-reuse", request={"amount": 100}, store=store) as call:
            call.record("ok")
        with (
            pytest.raises(IdempotencyKeyReused) as info,
            idempotent_call("k-reuse", request={"amount": 200}, store=store),
        ):
            pytest.fail("the body ran")
        assert "k-reuse" == info.value.key
        assert "'k-reuse'" in str(info.value)

    def test_key_order_does_not_matter(self, store: SQLiteStore) -> None:
        """Requests equal as JSON (key order, tuple or list) are the same request."""
        with idempotent_call("k-order", request={"a": 1, "b": [1, 2]}, store=store) as call:
            call.record("ok")
        with idempotent_call("k-order", request={"b": (1, 2), "a": 1}, store=store) as call:
            assert call.replayed

    def test_in_flight_elsewhere(self, store: SQLiteStore) -> None:
        """A key held by a live run is an IdempotencyConflict naming the holder."""
        held, done = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def holder() -> None:
            try:
                with idempotent_call("k-busy", request=REQUEST, store=store) as call:
                    held.set()
                    assert done.wait(WAIT)
                    call.record("first")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=holder, name="holder")
        thread.start()
        try:
            assert held.wait(WAIT)
            with (
                pytest.raises(IdempotencyConflict) as info,
                idempotent_call("k-busy", request=REQUEST, store=store),
            ):
                pytest.fail("the body ran")
        finally:
            done.set()
            thread.join(WAIT)
        assert ([], False) == (errors, thread.is_alive())
        assert (os.getpid(), "k-busy") == (info.value.pid, info.value.key)
        assert "done" == store.idem_status("k-busy")

    def test_died_after_sending(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """A run SIGKILLed after sending leaves OutcomeUnknown; nothing is guessed or resent."""
        proc = children.start(
            "hold", store=str(store.path), port=server.port, key="k-dead", explicit=False, send=True
        )
        assert {"claimed": 1} == read_line(proc)
        kill_and_reap(proc)
        for _ in range(2):
            with pytest.raises(OutcomeUnknown, match="'k-dead'"):
                charge("k-dead", "auto", store, server.port)
        assert 1 == server.requests["k-dead"]
        assert "unknown" == store.idem_status("k-dead")

    def test_died_after_sending_dedupes(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """With dedupes=True the retry resends under the same key; the service has one effect."""
        proc = children.start(
            "hold", store=str(store.path), port=server.port, key="k-dd", explicit=False, send=True
        )
        read_line(proc)
        kill_and_reap(proc)
        request = {"amount": 100, "key": "k-dd"}
        with idempotent_call("k-dd", request=request, store=store, dedupes=True) as call:
            assert (False, True, 2) == (call.replayed, call.retried, call.epoch)
            call.record(post(server.port, call.key, call.request, dedupe=True))
        assert (2, 1) == (server.requests["k-dd"], server.effects["k-dd"])

    def test_died_before_sending(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """With explicit_send, a run killed before mark_sent() leaves the key retryable."""
        proc = children.start(
            "hold",
            store=str(store.path),
            port=server.port,
            key="k-early",
            explicit=True,
            send=False,
        )
        read_line(proc)
        kill_and_reap(proc)
        assert ("recorded", 0) == (
            charge("k-early", "explicit", store, server.port)[0],
            server.requests["k-early"] - 1,
        )

    def test_error_after_sending_is_unknown(self, store: SQLiteStore) -> None:
        """A body that raises after the point of no return leaves the outcome unknown."""
        with pytest.raises(RuntimeError), idempotent_call("k-err", request=REQUEST, store=store):
            raise RuntimeError("connection reset")
        with pytest.raises(OutcomeUnknown), idempotent_call("k-err", request=REQUEST, store=store):
            pytest.fail("the body ran")

    def test_error_before_sending_is_retryable(self, store: SQLiteStore) -> None:
        """With explicit_send, a body that raises before mark_sent() leaves the key retryable."""
        with (
            pytest.raises(RuntimeError),
            idempotent_call("k-err2", request=REQUEST, store=store, explicit_send=True),
        ):
            raise RuntimeError("validation failed")
        with idempotent_call("k-err2", request=REQUEST, store=store, explicit_send=True) as call:
            assert call.retried
            call.record("ok")

    def test_unsent_clean_exit_is_retryable(self, store: SQLiteStore) -> None:
        """With explicit_send, a body that ends without sending records nothing."""
        with idempotent_call("k-skip", request=REQUEST, store=store, explicit_send=True):
            pass
        assert "released" == store.idem_status("k-skip")

    def test_retry_is_sent_from_the_start(self, store: SQLiteStore) -> None:
        """A retry without explicit_send counts as sent at once, whatever the last run did."""
        with idempotent_call("k-mix", request=REQUEST, store=store, explicit_send=True):
            pass  # released, nothing sent
        with idempotent_call("k-mix", request=REQUEST, store=store) as call:
            info = store.idem_info("k-mix")
            assert info is not None
            assert (True, True) == (call.retried, info.sent)
            call.record("ok")

    def test_release(self, store: SQLiteStore) -> None:
        """release() after sending declares that nothing happened: the key is retryable."""
        with idempotent_call("k-rel", request=REQUEST, store=store) as call:
            call.release()
            with pytest.raises(LeaseLost):
                call.record("late")
        with idempotent_call("k-rel", request=REQUEST, store=store) as call:
            assert call.retried
            call.record("second try")

    def test_resolve_outcome(self, store: SQLiteStore) -> None:
        """An unknown outcome settled as succeeded replays the given result; as failed, retries."""
        for key in ("k-res1", "k-res2"):
            with pytest.raises(RuntimeError), idempotent_call(key, request=REQUEST, store=store):
                raise RuntimeError("timeout")
        resolve_outcome("k-res1", succeeded=True, result={"charge": "ch_1"}, store=store)
        resolve_outcome("k-res2", succeeded=False, store=store)
        with idempotent_call("k-res1", request=REQUEST, store=store) as call:
            assert (True, {"charge": "ch_1"}) == (call.replayed, call.result)
        with idempotent_call("k-res2", request=REQUEST, store=store) as call:
            assert (False, True) == (call.replayed, call.retried)
        with pytest.raises(ConfigurationError, match="'k-res1'"):
            resolve_outcome("k-res1", succeeded=False, store=store)


class TestBadInput:
    @pytest.mark.parametrize(
        ("key", "error", "named"),
        [
            ("k" * 256, ConfigurationError, "256"),
            ("", ConfigurationError, "''"),
            (42, InvalidArgumentType, "42"),
            (b"bytes", InvalidArgumentType, "b'bytes'"),
            (None, InvalidArgumentType, "None"),
        ],
        ids=["too-long", "empty", "int", "bytes", "none"],
    )
    def test_bad_key(
        self, store: SQLiteStore, key: Any, error: type[Exception], named: str
    ) -> None:
        """A key that is not 1 to 255 characters of str is refused, naming the value."""
        with pytest.raises(error) as info:
            idempotent_call(key, request=REQUEST, store=store)
        assert named in str(info.value)

    def test_longest_key(self, store: SQLiteStore) -> None:
        """A key of exactly 255 characters works."""
        with idempotent_call("k" * 255, request=REQUEST, store=store) as call:
            call.record("ok")
        assert "done" == store.idem_status("k" * 255)

    @pytest.mark.parametrize(
        ("request_", "named"),
        [({"at": object()}, "object object"), ({"x": float("nan")}, "nan"), ({1: 2, "a": 3}, "1")],
        ids=["object", "nan", "mixed-keys"],
    )
    def test_request_not_json(self, store: SQLiteStore, request_: Any, named: str) -> None:
        """A request that is not JSON data is refused, naming the key and the value."""
        with pytest.raises(InvalidArgumentType) as info:
            idempotent_call("k-bad", request=request_, store=store)
        assert "'k-bad'" in str(info.value)
        assert named in str(info.value)

    def test_cyclic_request(self, store: SQLiteStore) -> None:
        """A request that contains itself is refused as not JSON data, naming the key."""
        cyclic: list[Any] = []
        cyclic.append(cyclic)
        with pytest.raises(InvalidArgumentType, match=r"'k-cycle'.*a cycle"):
            idempotent_call("k-cycle", request={"items": cyclic}, store=store)

    def test_cyclic_result(self, store: SQLiteStore) -> None:
        """A result that contains itself is refused, naming the key; nothing is recorded."""
        cyclic: dict[str, Any] = {}
        cyclic["self"] = cyclic
        with (
            pytest.raises(InvalidArgumentType, match=r"'k-cycle-res'.*a cycle"),
            idempotent_call("k-cycle-res", request=REQUEST, store=store) as call,
        ):
            call.record(cyclic)
        assert "unknown" == store.idem_status("k-cycle-res")

    def test_missing_request(self, store: SQLiteStore) -> None:
        """The context manager needs request=...; nothing is claimed without it."""
        with (
            pytest.raises(InvalidArgumentType, match=r"request=\.\.\."),
            idempotent_call("k-noreq", store=store),
        ):
            pytest.fail("the body ran")
        assert store.idem_status("k-noreq") is None

    def test_result_not_json(self, store: SQLiteStore) -> None:
        """A result that is not JSON data is refused, naming it; nothing is recorded."""
        with (
            pytest.raises(InvalidArgumentType, match="result of idempotent call 'k-res'"),
            idempotent_call("k-res", request=REQUEST, store=store) as call,
        ):
            call.record({"when": object()})
        assert "unknown" == store.idem_status("k-res")

    @pytest.mark.parametrize(
        ("options", "error", "named"),
        [
            ({"lease": -1.0}, ConfigurationError, "-1.0"),
            ({"lease": 0}, ConfigurationError, "0"),
            ({"lease": "60"}, InvalidArgumentType, "'60'"),
            ({"dedupes": "yes"}, InvalidArgumentType, "'yes'"),
            ({"grace": float("inf")}, ConfigurationError, "inf"),
            ({"store": "store.sqlite3"}, InvalidArgumentType, "'store.sqlite3'"),
        ],
    )
    def test_bad_options(self, options: dict[str, Any], error: type[Exception], named: str) -> None:
        """Options of the wrong type or value are refused, naming the value."""
        with pytest.raises(error) as info:
            idempotent_call("k-opt", request=REQUEST, **options)
        assert named in str(info.value)

    def test_used_twice(self, store: SQLiteStore) -> None:
        """One IdempotentCall enters once; the message says to call idempotent_call() again."""
        call = idempotent_call("k-twice", request=REQUEST, store=store)
        with call:
            pass
        with pytest.raises(ConfigurationError, match="again"), call:
            pass

    def test_key_function_needs_decorator(self, store: SQLiteStore) -> None:
        """A key function in the context-manager form is refused, naming it."""
        with (
            pytest.raises(InvalidArgumentType, match="decorator form"),
            idempotent_call(lambda: "k", request=REQUEST, store=store),
        ):
            pass

    def test_outside_block(self, store: SQLiteStore) -> None:
        """record() before entering the block is refused, naming the key."""
        call = idempotent_call("k-out", request=REQUEST, store=store)
        with pytest.raises(ConfigurationError, match="'k-out'"):
            call.record(1)

    @pytest.mark.parametrize(
        "exc",
        [
            AlreadyRecorded("k", "record"),
            IdempotencyKeyReused("k"),
            IdempotencyConflict("k", 12, "host"),
            OutcomeUnknown("k"),
            LeaseLost("k", 1, 2),
        ],
        ids=lambda e: type(e).__name__,
    )
    def test_errors_pickle(self, exc: Exception) -> None:
        """The idempotency errors survive pickling with their attributes and message."""
        copy = pickle.loads(pickle.dumps(exc))
        assert (type(exc), vars(exc), str(exc)) == (type(copy), vars(copy), str(copy))
        assert isinstance(copy, termsafe.TermsafeError)


# -- many processes -----------------------------------------------------------------------


class TestFirstRunFastPath:
    def test_record_reports_the_state_before_the_result(self, store: SQLiteStore) -> None:
        """record() of a result that is not JSON data first gets the error of the call's state."""
        bad = {"when": object()}
        call = idempotent_call("fast-state", request=REQUEST, store=store)
        with pytest.raises(ConfigurationError, match="'fast-state'"):
            call.record(bad)
        with call:
            call.record("ok")
            with pytest.raises(AlreadyRecorded, match="'fast-state'"):
                call.record(bad)
        with pytest.raises(AlreadyRecorded, match="'fast-state'"):
            call.record(bad)
        with idempotent_call("fast-state", request=REQUEST, store=store) as again:
            assert again.replayed
            with pytest.raises(AlreadyRecorded, match="'fast-state'"):
                again.record(bad)
        assert "ok" == store.idem_info("fast-state").result  # type: ignore[union-attr]

    def test_recorded_exit_outside_a_workflow_settles_everything(
        self, make_term: TermFactory, store: SQLiteStore
    ) -> None:
        """Outside a workflow a recorded run keeps no scope, leaves no lease, emits one event."""
        sink = termsafe.MemorySink()
        term = make_term(sink=sink)
        old = _set_default_terminator(term)
        try:
            keeper = _keeper_for(get_terminator()._timer)
            with idempotent_call("fast-exit", request=REQUEST, store=store) as call:
                held = set(keeper._leases)
                call.record({"n": 1})
            left = set(keeper._leases)
        finally:
            _set_default_terminator(old)
        assert 1 == len(held)
        assert set() == left
        assert call._scope is None
        [recorded] = [e for e in Audit(term, sink).events() if e.type.startswith("idem")]
        expected = {"operation": "idempotent_call fast-exit", "key": "fast-exit", "epoch": 1}
        assert ("idempotent_recorded", {**expected, "retried": False}) == (
            recorded.type,
            dict(recorded.details),
        )
        assert ("done", {"n": 1}) == (store.idem_status("fast-exit"), call.result)

    def test_every_step_audited_outside_a_workflow(
        self, make_term: TermFactory, store: SQLiteStore
    ) -> None:
        """Without a workflow (and so without a scope) each step is audited, named by its call."""
        sink = termsafe.MemorySink()
        term = make_term(sink=sink)
        undone: list[str] = []
        old = _set_default_terminator(term)
        try:
            with pytest.raises(RuntimeError), idempotent_call("ev-1", request=REQUEST, store=store):
                raise RuntimeError("timeout")
            with (
                pytest.raises(OutcomeUnknown),
                idempotent_call("ev-1", request=REQUEST, store=store),
            ):
                pytest.fail("the body of a refused call ran")

            def sent_then_failed() -> None:
                with idempotent_call("ev-2", request=REQUEST, explicit_send=True, store=store) as c:
                    c.mark_sent()
                    c.compensate(undone.append, "ch_2", name="refund")
                    raise RuntimeError("failed after sending")

            def taken_over() -> None:
                with idempotent_call("ev-4", request=REQUEST, store=store) as c:
                    # Another run took the key over meanwhile.
                    store._conn().execute("UPDATE idempotency SET epoch = 2 WHERE key = 'ev-4'")
                    c.record("late")

            with pytest.raises(RuntimeError, match="after sending"):
                sent_then_failed()
            with idempotent_call("ev-3", request=REQUEST, store=store) as call:
                call.release()
            with idempotent_call("ev-3", request=REQUEST, store=store) as call:
                call.record("ok")
            with pytest.raises(LeaseLost):
                taken_over()
        finally:
            _set_default_terminator(old)
        events = [
            e for e in Audit(term, sink).events() if e.details.get("key", "").startswith("ev")
        ]
        expected: list[tuple[str, str, dict[str, Any]]] = [
            ("idempotent_released", "ev-1", {"epoch": 1, "outcome": "unknown"}),
            ("idempotent_refused", "ev-1", {"error": "OutcomeUnknown"}),
            ("idempotent_sent", "ev-2", {"epoch": 1}),
            ("idempotent_released", "ev-2", {"epoch": 1, "outcome": "unknown"}),
            ("compensation_ran", "ev-2", {"compensation": "refund"}),
            ("idempotent_released", "ev-3", {"epoch": 1, "outcome": "retryable"}),
            ("idempotent_claimed", "ev-3", {"epoch": 2}),
            ("idempotent_recorded", "ev-3", {"epoch": 2, "retried": True}),
            ("idempotent_lease_lost", "ev-4", {"epoch": 1}),
        ]
        assert len(expected) == len(events), [e.type for e in events]
        assert expected == [
            (e.type, e.details["key"], {k: e.details[k] for k in want})
            for e, (_, _, want) in zip(events, expected, strict=True)
        ]
        for event in events:
            assert (None, f"idempotent_call {event.details['key']}") == (
                event.workflow_id,
                event.details["operation"],
            )
            assert "operation" == next(iter(event.details))
        assert ["ch_2"] == undone


class TestStoreClaim:
    @pytest.mark.parametrize(
        ("key", "error", "named"),
        [
            ("k" * 256, ConfigurationError, "256"),
            ("", ConfigurationError, "''"),
            (42, InvalidArgumentType, "42"),
            (None, InvalidArgumentType, "None"),
        ],
        ids=["too-long", "empty", "int", "none"],
    )
    def test_bad_key(
        self, store: SQLiteStore, key: Any, error: type[Exception], named: str
    ) -> None:
        """The store refuses a bad key itself, naming it; nothing is written."""
        with pytest.raises(error) as info:
            store.idem_claim(key, "f" * 64, lease_seconds=60.0, retry_unknown=False)
        assert named in str(info.value)
        assert (
            0
            == sqlite3.connect(store.path).execute("SELECT count(*) FROM idempotency").fetchone()[0]
        )

    def test_claims_are_whole_claims(self, store: SQLiteStore) -> None:
        """A first claim, a replay and a remembered replay are Claim tuples with every field."""

        class Key(str):
            pass

        key = Key("sc-1")
        first = store.idem_claim(key, "f" * 64, lease_seconds=60.0, retry_unknown=False)
        store.idem_record(key, 1, {"a": [1]})
        read = store.idem_claim(key, "f" * 64, lease_seconds=60.0, retry_unknown=False)
        remembered = store.idem_claim(key, "f" * 64, lease_seconds=60.0, retry_unknown=False)
        assert [Claim, Claim, Claim] == [type(c) for c in (first, read, remembered)]
        assert {"key": "sc-1", "replay": False, "result": None, "epoch": 1, "retried": False} == (
            first._asdict()
        )
        assert Claim("sc-1", True, {"a": [1]}, 1, False) == read == remembered

    def test_every_claim_reads_first(self, store: SQLiteStore) -> None:
        """A claim reads the key, then (a new key) inserts it; a replay is the read alone."""
        statements: list[str] = []
        store._conn().set_trace_callback(lambda sql: statements.append(sql.split()[0].upper()))

        def claim(key: str) -> tuple[bool, list[str]]:
            statements.clear()
            got = store.idem_claim(key, "f" * 64, lease_seconds=60.0, retry_unknown=False)
            return got.replay, list(statements)

        other = SQLiteStore(store.path)
        other.idem_claim("done-1", "f" * 64, lease_seconds=60.0, retry_unknown=False)
        other.idem_record("done-1", 1, "done-1")
        other.close()
        assert (False, ["SELECT", "INSERT"]) == claim("new-1")
        store.idem_record("new-1", 1, "new-1")
        assert (False, ["SELECT", "INSERT"]) == claim("new-2")
        store.idem_record("new-2", 1, "new-2")
        assert (True, ["SELECT"]) == claim("done-1")  # right after first runs, too

    def test_replays_never_wait_for_the_write_lock(self, store: SQLiteStore) -> None:
        """A replay (new store object, or just after a first run) goes on under a held lock."""
        for key in ("r-1", "r-2"):
            other = SQLiteStore(store.path)
            other.idem_claim(key, "f" * 64, lease_seconds=60.0, retry_unknown=False)
            other.idem_record(key, 1, key)
            other.close()
        fresh = SQLiteStore(store.path, busy_timeout=0.05)
        writer = sqlite3.connect(store.path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            assert fresh.idem_claim("r-1", "f" * 64, lease_seconds=60.0, retry_unknown=False).replay
            writer.execute("COMMIT")
            claim = fresh.idem_claim("new", "f" * 64, lease_seconds=60.0, retry_unknown=False)
            fresh.idem_record("new", claim.epoch, "new")
            writer.execute("BEGIN IMMEDIATE")  # a prune, another process's claim
            assert fresh.idem_claim("r-2", "f" * 64, lease_seconds=60.0, retry_unknown=False).replay
            writer.execute("COMMIT")
        finally:
            writer.close()
            fresh.close()

    def test_record_with_a_stale_epoch(self, store: SQLiteStore) -> None:
        """A record under an epoch that is not the key's claim raises LeaseLost naming both."""
        store.idem_claim("sc-2", "f" * 64, lease_seconds=60.0, retry_unknown=False)
        with pytest.raises(LeaseLost) as info:
            store.idem_record("sc-2", 7, "late")
        assert (7, 1) == (info.value.epoch, info.value.current_epoch)
        assert "in_flight" == store.idem_status("sc-2")


class TestRace:
    def test_four_processes_one_effect(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """Four processes race for one key: one side effect; the others get a conflict."""
        server.gate = threading.Event()
        spec = {"store": str(store.path), "port": server.port, "key": "race-1"}
        procs = [children.start("race", **spec) for _ in range(4)]
        for proc in procs:
            assert {"ready": True} == read_line(proc)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        # The winner is held inside the service until every loser has answered.
        assert server.arrived.wait(WAIT * 3)
        pending = {p.stdout.fileno(): p for p in procs if p.stdout is not None}
        outcomes: list[str] = []
        while len(outcomes) < 3:
            ready, _, _ = select.select(list(pending), [], [], WAIT * 3)
            assert ready, f"only {outcomes} after {WAIT * 3}s"
            outcomes.append(read_line(pending.pop(ready[0]))["outcome"])
        server.gate.set()
        outcomes.append(read_line(next(iter(pending.values())))["outcome"])
        assert ["conflict", "conflict", "conflict", "recorded"] == sorted(outcomes)
        assert 1 == server.effects["race-1"]
        for proc in procs:
            proc.communicate(timeout=WAIT * 3)
            assert 0 == proc.returncode


class TestFencing:
    @pytest.mark.parametrize("mode", ["dedupes", "explicit"])
    def test_zombie_cannot_record(
        self, store: SQLiteStore, server: CountingServer, children: Children, mode: str
    ) -> None:
        """A frozen run whose lease ran out is taken over; thawed, it gets LeaseLost."""
        key = f"zombie-{mode}"
        proc = children.start(
            "zombie", store=str(store.path), port=server.port, key=key, mode=mode, lease=1.5
        )
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        # Alive but frozen: a conflict until its lease runs out, then a takeover.
        deadline = time.monotonic() + WAIT * 3
        while True:
            try:
                outcome = charge(key, mode, store, server.port)
                break
            except IdempotencyConflict:
                assert time.monotonic() < deadline, "the zombie's lease never ran out"
                threading.Event().wait(0.05)
        assert ("recorded", 2) == (outcome[0], store.idem_info(key).epoch)  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        assert {"outcome": "lease_lost", "epoch": 1, "current": 2} == read_line(proc)
        proc.communicate(timeout=WAIT * 3)
        assert outcome[1] == store.idem_info(key).result  # type: ignore[union-attr]
        assert 1 == server.effects[key]
        # explicit: the zombie never sent; dedupes: it resent, the service deduplicated.
        assert (1 if mode == "explicit" else 2) == server.requests[key]

    def test_stale_epoch_cannot_compensate(self, store: SQLiteStore) -> None:
        """A run whose claim was released can register no compensation."""
        with idempotent_call("k-stale", request=REQUEST, store=store) as call:
            call.release()
            with pytest.raises(LeaseLost):
                call.compensate(print, {"x": 1})
        assert [] == store.comp_list("k-stale")


# -- real SIGKILLs ------------------------------------------------------------------------


class TestKilled:
    def test_random_kills_never_twice(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """200+ calls SIGKILLed at random points, then retried: no effect twice, nothing guessed."""
        seed = _seed()
        spec = {
            "store": str(store.path),
            "port": server.port,
            "seed": seed,
            "kills": 200,
            "calibrate": 6,
            "max_trials": 600,
        }
        trials = children.run("worker", timeout=150.0, **spec)
        kills = sum(t["killed"] for t in trials)
        assert kills >= 200, f"seed {seed}: only {kills} kills in {len(trials)} trials"
        assert [] == [t for t in trials if t["crashed"]], f"seed {seed}"
        # A fresh process retries every key once.
        retried = children.run(
            "call",
            timeout=150.0,
            store=str(store.path),
            port=server.port,
            keys=[[t["key"], t["mode"]] for t in trials],
        )
        outcome = {line["key"]: line["outcome"] for line in retried}
        with sqlite3.connect(store.path) as db:
            assert "ok" == db.execute("PRAGMA integrity_check").fetchone()[0], f"seed {seed}"
            rows = dict(db.execute("SELECT key, status FROM idempotency").fetchall())
        seen: collections.Counter[str] = collections.Counter()
        for t in trials:
            key = t["key"]
            where = f"seed {seed}: {t}, retry {outcome[key]}, effects {server.effects[key]}"
            assert server.effects[key] <= 1, where
            assert rows[key] in ("done", "unknown"), where
            if rows[key] == "done":
                result = store.idem_info(key).result  # type: ignore[union-attr]
                assert (1, f"ch_{key}_1") == (server.effects[key], result["charge"]), where
                assert outcome[key] in ("replayed", "recorded"), where
            else:
                assert ("unknown", True) == (outcome[key], t["mode"] != "dedupes"), where
            seen[outcome[key]] += 1
        # The kills landed everywhere: before the claim or the send (retried and
        # recorded), after the send (unknown), after the record (replayed).
        assert {"recorded", "replayed", "unknown"} <= set(seen), f"seed {seed}: {seen}"


# -- workflows and kills ------------------------------------------------------------------


class TestTakenOverDuringClaim:
    def test_claim_released_as_retryable_and_section_closed(
        self, make_term: TermFactory, tmp_path: Path, jobs: Jobs
    ) -> None:
        """A takeover that lands during the claim leaves the key retryable and no section open."""
        claimed, taken_over = threading.Event(), threading.Event()

        class SlowClaim(SQLiteStore):
            def idem_claim(self, *args: Any, **kwargs: Any) -> Any:
                claim = super().idem_claim(*args, **kwargs)
                claimed.set()
                assert taken_over.wait(WAIT)  # the system phase takes over meanwhile
                return claim

        store = SlowClaim(tmp_path / "store.sqlite3")
        term = make_term(Phases(0.05, 0.05), section_grace={"api": 0.05})
        body_ran: list[bool] = []
        seen: list[termsafe.Workflow] = []
        raised: list[BaseException] = []

        def run() -> None:
            with term.workflow("payer") as wf:
                seen.append(wf)
                try:
                    with idempotent_call("k-1", request={"n": 1}, store=store):
                        body_ran.append(True)
                except BaseException as exc:
                    raised.append(exc)
                    raise

        job = jobs.start(run)
        try:
            assert claimed.wait(WAIT)
            assert WorkflowState.KILLED == term.kill("payer", by=ADMIN).wait(WAIT)
        finally:
            taken_over.set()
        job.result()
        assert [] == body_ran
        assert [termsafe.ForcedTermination] == [type(e) for e in raised]
        assert [] == seen[0].sections
        info = store.idem_info("k-1")
        assert info is not None
        assert "released" == info.status  # nothing was sent: retryable, not unknown
        retry = make_term()
        with retry.workflow("retry"), idempotent_call("k-1", request={"n": 1}, store=store) as c:
            assert (False, True) == (c.replayed, c.retried)
            c.record({"ok": True})
        store.close()


class TestTakenOverDuringCompensate:
    def test_compensation_runs_once_and_the_call_stops(
        self, make_term: TermFactory, tmp_path: Path, jobs: Jobs
    ) -> None:
        """A compensation recorded as the terminator takes over still runs once and is done."""
        recorded, taken_over = threading.Event(), threading.Event()

        class SlowCompAdd(SQLiteStore):
            def comp_add(self, *args: Any, **kwargs: Any) -> int:
                comp_id = super().comp_add(*args, **kwargs)
                recorded.set()
                assert taken_over.wait(WAIT)  # the system phase sweeps the hooks meanwhile
                return comp_id

        system_phase = threading.Event()

        class Sink(termsafe.MemorySink):
            def emit(self, event: termsafe.AuditEvent) -> None:
                super().emit(event)
                if event.type == "phase_changed" and event.details.get("phase") == "system":
                    system_phase.set()  # emitted once the hook stack is closed

        store = SlowCompAdd(tmp_path / "store.sqlite3")
        term = make_term(Phases(0.05, 0.05), sink=Sink(), section_grace={"api": 0.05})
        undone: list[tuple[str, Any]] = []
        raised: list[BaseException] = []

        def refund(charge: Any) -> None:
            undone.append((threading.current_thread().name, charge))

        def run() -> None:
            with term.workflow("payer"):
                try:
                    with idempotent_call("k-1", request={"n": 1}, store=store) as call:
                        call.record({"charge": "ch_1"})
                        call.compensate(refund, "ch_1", name="refund")
                except BaseException as exc:
                    raised.append(exc)
                    raise

        job = jobs.start(run)
        try:
            assert recorded.wait(WAIT)
            handle = term.kill("payer", by=ADMIN)
            # The sweep's own rollback of the call waits for compensate() to
            # return: release it once the takeover has closed the stack.
            assert system_phase.wait(WAIT)
        finally:
            taken_over.set()
        assert WorkflowState.KILLED == handle.wait(WAIT)
        job.result()
        assert [termsafe.ForcedTermination] == [type(e) for e in raised]
        # Run by the sweep if it was still going, else at once in the workflow's thread.
        assert ["ch_1"] == [charge for _thread, charge in undone]
        assert ["done"] == [c.status for c in store.comp_list("k-1")]
        # Nothing left for a later sweep to run a second time.
        assert [] == run_pending_compensations("k-1", {"refund": refund}, store=store, force=True)
        assert 1 == len(undone)
        store.close()


class TestWorkflow:
    def test_kill_deferred_until_recorded(
        self,
        make_term: TermFactory,
        store: SQLiteStore,
        server: CountingServer,
        jobs: Jobs,
    ) -> None:
        """A kill during the body waits for it (an api section); the result is recorded."""
        term = make_term(store=store)
        entered, go = threading.Event(), threading.Event()

        def run() -> WorkflowState:
            with (
                term.workflow("pay", owner="alice") as wf,
                idempotent_call("wf-pay", request=REQUEST) as call,
            ):
                entered.set()
                assert go.wait(WAIT)
                call.record(post(server.port, call.key, REQUEST))
            return wf.state

        job = jobs.start(run)
        assert entered.wait(WAIT)
        handle = term.kill("pay", by=ALICE, reason="deploy")
        go.set()
        assert WorkflowState.TERMINATED == handle.wait(WAIT)
        assert WorkflowState.TERMINATED == job.result()
        assert ("done", 1) == (store.idem_status("wf-pay"), server.effects["wf-pay"])

    def test_kill_lands_before_sending(
        self, make_term: TermFactory, store: SQLiteStore, jobs: Jobs
    ) -> None:
        """With explicit_send a pending kill lands at mark_sent(): nothing sent, key retryable."""
        term = make_term(store=store)
        entered, go = threading.Event(), threading.Event()
        sent = []

        def run() -> None:
            with (
                term.workflow("pay2", owner="alice"),
                idempotent_call("wf-pay2", request=REQUEST, explicit_send=True) as call,
            ):
                entered.set()
                assert go.wait(WAIT)
                call.mark_sent()
                sent.append(True)

        job = jobs.start(run)
        assert entered.wait(WAIT)
        handle = term.kill("pay2", by=ALICE, reason="deploy")
        go.set()
        assert WorkflowState.TERMINATED == handle.wait(WAIT)
        job.result()
        assert ([], "released") == (sent, store.idem_status("wf-pay2"))

    def test_audit_events(self, term: Terminator, audit: Audit, store: SQLiteStore) -> None:
        """Each claim ends in one audit event of the workflow; a replay adds none."""
        for _ in range(2):
            with (
                term.workflow("audited"),
                idempotent_call("wf-audit", request=REQUEST, store=store) as call,
            ):
                if not call.replayed:
                    call.record("ok")
        with (
            pytest.raises(RuntimeError),
            term.workflow("audited"),
            idempotent_call("wf-audit-2", request=REQUEST, store=store),
        ):
            raise RuntimeError("timeout")
        ours = [e for e in audit.events("audited") if e.type.startswith("idempotent")]
        assert ["idempotent_recorded", "idempotent_released"] == [e.type for e in ours]
        recorded, released = (e.details for e in ours)
        assert recorded.items() >= {"key": "wf-audit", "epoch": 1, "retried": False}.items()
        assert released.items() >= {"key": "wf-audit-2", "outcome": "unknown"}.items()

    def test_lease_renewed_while_body_runs(
        self, make_term: TermFactory, tmp_path: Path, jobs: Jobs
    ) -> None:
        """A body longer than its lease keeps the key (renewals), and renewal stops at exit."""
        store = CountingStore(tmp_path / "renew.sqlite3")
        term = make_term(store=store)
        try:
            with (
                term.workflow("long"),
                idempotent_call("wf-long", request=REQUEST, lease=0.3) as call,
            ):
                claimed = time.time()
                with store.renewed:
                    # Each renewal is due a third of a lease after the last.
                    assert store.renewed.wait_for(lambda: store.renewals >= 4, WAIT)
                assert time.time() - claimed > 0.3

                def rival() -> None:
                    with term.workflow("rival"), idempotent_call("wf-long", request=REQUEST):
                        pytest.fail("the rival's body ran")

                assert isinstance(jobs.start(rival).error(), IdempotencyConflict)
                call.record("done")
            renewals = store.renewals
            # Renewal deadlines ride the same timer, in deadline order: once a
            # marker a whole lease later fired, any renewal still armed has too.
            marker = threading.Event()
            term._timer.call_at(time.monotonic() + 0.3, marker.set)
            assert marker.wait(WAIT)
            for thread in threading.enumerate():
                if thread.name == "termsafe-idempotency-lease":
                    thread.join(WAIT)
            assert renewals == store.renewals
        finally:
            store.close()


class TestCompensations:
    def test_lifo_once_on_rollback(
        self, make_term: TermFactory, store: SQLiteStore, server: CountingServer
    ) -> None:
        """Compensations run LIFO when the workflow rolls back, not again on a second attempt."""
        term = make_term(store=store)
        undone: list[str] = []

        def attempt() -> None:
            with term.workflow("trip", owner="alice"):
                for key in ("hotel", "flight"):
                    with idempotent_call(key, request=REQUEST) as call:
                        if call.replayed:
                            continue
                        answer = call.run(post, server.port, key, REQUEST)
                        call.compensate(undone.append, answer["charge"], name="cancel")
                raise RuntimeError("car rental failed")

        for _ in range(2):
            with pytest.raises(RuntimeError, match="car rental"):
                attempt()
        assert ["ch_flight_1", "ch_hotel_1"] == undone
        assert (1, 1) == (server.effects["hotel"], server.effects["flight"])
        assert ["done", "done"] == [c.status for c in store.comp_list()]

    def test_discarded_on_success(self, make_term: TermFactory, store: SQLiteStore) -> None:
        """When the workflow succeeds its compensations never run and leave the store."""
        term = make_term(store=store)
        undone: list[Any] = []
        with term.workflow("fine"), idempotent_call("fine-1", request=REQUEST) as call:
            call.record("ok")
            call.compensate(undone.append, 1, name="undo")
        assert ([], []) == (undone, store.comp_list("fine-1"))

    def test_outside_workflow(self, store: SQLiteStore) -> None:
        """Outside a workflow the block is the unit: failure compensates now, success discards."""
        undone: list[Any] = []

        def fails() -> None:
            with idempotent_call("solo-1", request=REQUEST, store=store) as call:
                call.compensate(undone.append, "a", name="undo")
                call.compensate(undone.append, "b", name="undo")
                raise RuntimeError("later step failed")

        with pytest.raises(RuntimeError):
            fails()
        with idempotent_call("solo-2", request=REQUEST, store=store) as call:
            call.compensate(undone.append, "c", name="undo")
        assert ["b", "a"] == undone
        assert ["done", "done"] == [c.status for c in store.comp_list("solo-1")]
        assert [] == store.comp_list("solo-2")

    def test_pending_after_sigkill(
        self, store: SQLiteStore, server: CountingServer, children: Children
    ) -> None:
        """A process killed mid-workflow leaves them pending; recovery runs each once."""
        proc = children.start(
            "compensate_and_die", store=str(store.path), port=server.port, key="ck-1"
        )
        recorded = read_line(proc)["recorded"]
        proc.communicate(timeout=WAIT * 3)
        assert -signal.SIGKILL == proc.returncode
        assert ["pending"] == [c.status for c in store.comp_list("ck-1")]
        refunds: list[Any] = []
        with pytest.raises(ConfigurationError, match="'refund'"):
            run_pending_compensations("ck-1", {}, store=store)
        ran = run_pending_compensations("ck-1", {"refund": refunds.append}, store=store)
        assert [{"charge": recorded["charge"]}] == refunds
        assert (["refund"], ["done"]) == ([c.name for c in ran], [c.status for c in ran])
        assert [] == run_pending_compensations("ck-1", {"refund": refunds.append}, store=store)
        assert 1 == len(refunds)

    def test_pending_refused_while_owner_alive(self, store: SQLiteStore) -> None:
        """Recovery refuses while the process holding the key is alive, unless forced."""
        with idempotent_call("ck-2", request=REQUEST, store=store) as call:
            call.record("ok")
            call.compensate(print, None, name="noop")
            with pytest.raises(IdempotencyConflict):
                run_pending_compensations("ck-2", {"noop": print}, store=store)
            ran = run_pending_compensations(
                "ck-2", {"noop": lambda _: None}, store=store, force=True
            )
            assert ["done"] == [c.status for c in ran]


class TestCompensationsOutsideAWorkflow:
    def test_recorded_then_clean_exit_discards(self, store: SQLiteStore) -> None:
        """A recorded call's compensations are discarded, not left pending, on a clean exit."""
        undone: list[Any] = []
        with idempotent_call("rec-ok", request=REQUEST, store=store) as call:
            call.record("ok")
            call.compensate(undone.append, "a", name="undo")
            call.compensate(undone.append, "b", name="undo")
            assert ["pending", "pending"] == [c.status for c in store.comp_list("rec-ok")]
        assert [] == undone
        assert [] == store.comp_list("rec-ok")
        assert "done" == store.idem_status("rec-ok")
        assert [] == run_pending_compensations(
            "rec-ok", {"undo": undone.append}, store=store, force=True
        )
        assert [] == undone

    def test_recorded_then_failure_compensates_once(self, store: SQLiteStore) -> None:
        """A recorded call's compensations run once, newest first, when its block then fails."""
        undone: list[Any] = []

        def fails() -> None:
            with idempotent_call("rec-fail", request=REQUEST, store=store) as call:
                call.record("ok")
                call.compensate(undone.append, "a", name="undo")
                call.compensate(undone.append, "b", name="undo")
                raise RuntimeError("later step failed")

        with pytest.raises(RuntimeError, match="later step failed"):
            fails()
        assert ["b", "a"] == undone
        assert ["done", "done"] == [c.status for c in store.comp_list("rec-fail")]
        assert "done" == store.idem_status("rec-fail")
        assert [] == run_pending_compensations(
            "rec-fail", {"undo": undone.append}, store=store, force=True
        )
        assert ["b", "a"] == undone


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


class TestFingerprint:
    @settings(max_examples=300, deadline=None)
    @given(request_=JSON)
    def test_sha256_of_canonical_json(self, request_: Any) -> None:
        """The fingerprint is SHA-256 of the canonical JSON, first time and remembered alike."""
        try:
            data = CANONICAL(request_).encode("utf-8")
        except ValueError:  # infinity; a lone surrogate
            with pytest.raises(InvalidArgumentType):
                request_fingerprint(request_)
            return
        expected = hashlib.sha256(data).hexdigest()
        assert expected == request_fingerprint(request_)
        assert expected == request_fingerprint(request_)  # the remembered one


class TestRemembered:
    def test_replays_remembered_until_pruned_here(self, store: SQLiteStore) -> None:
        """A store object replays a done key it read from memory, until a prune through it."""
        with idempotent_call("m-1", request=REQUEST, store=store) as call:
            call.record({"id": 7})
        other = SQLiteStore(store.path)  # as in another process
        try:
            for _ in range(2):  # read from the file, then from memory
                with idempotent_call("m-1", request=REQUEST, store=other) as call:
                    assert (True, {"id": 7}) == (call.replayed, call.result)
                    call.result["id"] = 8  # each replay gets its own copy
            with (
                pytest.raises(IdempotencyKeyReused, match="'m-1'"),
                idempotent_call("m-1", request={"other": 1}, store=other),
            ):
                pytest.fail("the body ran")
            assert 1 == prune_idempotency(0, store=store)
            # Pruned through another object: this one still replays (never runs twice).
            with idempotent_call("m-1", request=REQUEST, store=other) as call:
                assert (True, {"id": 7}) == (call.replayed, call.result)
            assert 0 == prune_idempotency(0, store=other)
            with idempotent_call("m-1", request=REQUEST, store=other) as call:
                assert not call.replayed  # pruned here: new again
                call.record({"id": 9})
        finally:
            other.close()
        with idempotent_call("m-1", request=REQUEST, store=store) as call:
            assert (True, {"id": 9}) == (call.replayed, call.result)


class TestStoreSchema:
    def test_version_one_store_migrated(self, tmp_path: Path) -> None:
        """A store of schema version 1 is migrated on open: records kept, CHECK kept, it replays."""
        path = tmp_path / "v1.sqlite3"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(MIGRATIONS[0])
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        owner = json.dumps({"host": "elsewhere", "pid": 1, "start_time": 1.0})
        conn.execute(
            "INSERT INTO idempotency(key, fingerprint, status, result, epoch, owner, "
            "lease_expires, sent, created_at, updated_at) "
            "VALUES ('v1-done', ?, 'done', '{\"id\": 1}', 3, ?, 0, 1, 1.0, 2.0)",
            (request_fingerprint(REQUEST), owner),
        )
        conn.close()
        store = SQLiteStore(path)
        try:
            assert len(MIGRATIONS) == store.schema_version
            with idempotent_call("v1-done", request=REQUEST, store=store) as call:
                assert (True, {"id": 1}, 3) == (call.replayed, call.result, call.epoch)
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                store._conn().execute(
                    "UPDATE idempotency SET status = 'bogus' WHERE key = 'v1-done'"
                )
            indexes = store._conn().execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'idempotency'"
            )
            assert "idempotency_updated" in {name for (name,) in indexes}
            assert "ok" == store.integrity_check()
        finally:
            store.close()


class _Claimed:
    """What a lease keeper needs of a claim: its due time, whether it renews, the renewal."""

    def __init__(self) -> None:
        self._due = 0.0
        self._renewing = True
        self.renewed_at = math.inf
        self.renewed = threading.Event()

    def _renew(self) -> None:
        self.renewed_at = time.monotonic()
        self.renewed.set()


class TestLeaseKeeper:
    def test_one_timer_deadline_for_many_calls(
        self, make_term: TermFactory, store: SQLiteStore
    ) -> None:
        """Calls that settle leave no renewal deadline each on the timer (it cannot cancel)."""
        term = make_term(store=store)
        with term.workflow("many"):
            for i in range(200):
                with idempotent_call(f"lk-{i}", request=REQUEST) as call:
                    call.record(i)
        assert len(term._timer._heap) <= 2

    def test_shorter_lease_armed_after_a_longer_one(
        self, make_term: TermFactory, tmp_path: Path
    ) -> None:
        """A short lease claimed while a long one is in flight is renewed on its own schedule."""
        store = CountingStore(tmp_path / "keeper.sqlite3")
        term = make_term(store=store)
        try:
            with (
                term.workflow("keeper"),
                idempotent_call("lk-long", request=REQUEST, lease=30.0) as long_call,
                idempotent_call("lk-short", request=REQUEST, lease=0.3) as short_call,
            ):
                with store.renewed:
                    assert store.renewed.wait_for(lambda: store.renewals >= 3, WAIT)
                info = store.idem_info("lk-long")
                assert info is not None
                assert info.lease_expires > time.time() + 20  # not renewed: not due yet
                short_call.record("short")
                long_call.record("long")
            assert ("done", "done") == (store.idem_status("lk-short"), store.idem_status("lk-long"))
        finally:
            store.close()

    def test_lease_renewed_outside_a_workflow(
        self, make_term: TermFactory, tmp_path: Path, jobs: Jobs
    ) -> None:
        """Outside a workflow too, a body longer than its lease keeps the key until it records."""
        store = CountingStore(tmp_path / "outside.sqlite3")
        old = _set_default_terminator(make_term())
        try:
            with idempotent_call("lk-outside", request=REQUEST, lease=0.6, store=store) as call:
                claimed = time.time()
                with store.renewed:
                    assert store.renewed.wait_for(lambda: store.renewals >= 4, WAIT)
                assert time.time() - claimed > 0.6
                info = store.idem_info("lk-outside")
                assert info is not None
                assert info.lease_expires > claimed + 0.6  # renewed, not the first lease

                def rival() -> None:
                    with idempotent_call("lk-outside", request=REQUEST, store=store):
                        pytest.fail("the rival's body ran")

                assert isinstance(jobs.start(rival).error(), IdempotencyConflict)
                call.record("done")
            assert "done" == store.idem_status("lk-outside")
            assert call not in _keeper_for(get_terminator()._timer)._leases
        finally:
            _set_default_terminator(old)
            store.close()

    def test_claims_joining_from_many_threads_are_each_renewed(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """Claims armed from many threads while the keeper wakes are each renewed once due."""
        term = make_term()
        keeper = _LeaseKeeper(term._timer)
        kept: list[_Claimed] = []
        settled: list[_Claimed] = []

        def claims(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                claim = _Claimed()
                keeper.arm(claim, rng.uniform(0.0, 0.02))  # type: ignore[arg-type]
                if rng.random() < 0.5:
                    claim._renewing = False
                    keeper.discard(claim)  # type: ignore[arg-type]
                    settled.append(claim)
                else:
                    kept.append(claim)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads switch between any two steps of arm()
        try:
            workers = [jobs.start(functools.partial(claims, seed)) for seed in range(6)]
            for worker in workers:
                worker.result()
        finally:
            sys.setswitchinterval(interval)
        assert 1800 == len(kept) + len(settled)
        deadline = time.monotonic() + WAIT
        for claim in kept:
            assert claim.renewed.wait(max(0.0, deadline - time.monotonic())), (
                "a claim never renewed"
            )
            assert claim.renewed_at >= claim._due  # never before it was due
        assert not keeper._leases  # the renewed left the set, the settled took themselves out

    def test_claim_joining_while_the_keeper_wakes_is_renewed(
        self, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A claim armed while a wake sorts the set out (after its copy) is not missed."""
        term = make_term()
        keeper = _LeaseKeeper(term._timer)
        first, late = _Claimed(), _Claimed()
        joined: list[Job[None]] = []

        class Interleaved(set):  # type: ignore[type-arg]
            def copy(self) -> set[Any]:
                snapshot = set(self)
                if not joined:
                    # The late claim arms from another thread right after the
                    # wake copied the set; it runs as far as it can meanwhile.
                    joined.append(jobs.start(lambda: keeper.arm(late, 0.0)))  # type: ignore[arg-type]
                    joined[0].thread.join(0.5)
                return snapshot

        keeper._leases = Interleaved()
        keeper.arm(first, 0.0)  # type: ignore[arg-type]
        assert first.renewed.wait(WAIT)
        assert late.renewed.wait(WAIT), "the claim that joined during the wake was never renewed"
        joined[0].result()


class TestPrune:
    def test_settled_keys_pruned(self, store: SQLiteStore) -> None:
        """Pruning forgets settled keys older than the retention; unknown keys stay."""
        with idempotent_call("p-done", request=REQUEST, store=store) as call:
            call.record("ok")
        with (
            pytest.raises(RuntimeError),
            idempotent_call("p-unknown", request=REQUEST, store=store),
        ):
            raise RuntimeError("timeout")
        assert 0 == prune_idempotency(store=store)  # default retention: 24 h
        assert 1 == prune_idempotency(0, store=store)
        assert (None, "unknown") == (store.idem_status("p-done"), store.idem_status("p-unknown"))
        with idempotent_call("p-done", request={"other": True}, store=store) as call:
            assert not call.replayed  # a pruned key is new again

    def test_bad_retention(self, store: SQLiteStore) -> None:
        """A negative retention is refused, naming it."""
        with pytest.raises(ConfigurationError, match="-5"):
            prune_idempotency(-5, store=store)


if __name__ == "__main__":
    COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))
