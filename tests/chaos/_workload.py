"""The chaos worker and the workflow processes it forks (``python -m chaos._workload``).

One worker runs per test, with ``tests`` on ``sys.path``. It imports termsafe
and the test helpers it reuses once, becomes a child subreaper (so what a
killed workflow process leaves running is inherited by the worker, the way a
supervisor inherits it), prints one ``ready`` line, then answers one JSON
command per line on stdin with one JSON line on stdout. It starts no thread,
so forking a workflow process per trial is safe and cheap.

A trial: fork a workflow process, read its markers, send the planned signal at
the planned moment (after a marker, plus a seeded delay), reap it, report.
The workflow process reports through a pipe, one line per marker::

    B                         the workflow began
    S <j> <op>                op j starts
    D <j> <json outcome>      op j ended
    E <j> <json error>        op j raised this error
    H <pid>                   the helper process runs, tracked and journaled
    X <json>                  the fault layer injected its fault
    W <state>                 the workflow ended in this state
    R <json>                  the process's last word: audit failures, alerts, fault counts
    C <json>                  the process crashed (a traceback)

Nothing here judges: the pytest process does, with tools nobody here wrote.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import http.client
import json
import logging
import os
import resource
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import test_atomic
import test_transaction

import termsafe as ts
from termsafe._children import spawn
from termsafe._store import SQLiteStore

#: The real ``os.write``: markers must get through whatever the fault layer breaks.
_write = os.write

#: The os calls the fault layer can break (every one the file and audit paths use).
WRAPPED = ("write", "fsync", "ftruncate", "open", "replace", "rename", "unlink")

#: Until a trial's own measures come in, how long each op is assumed to take (seconds).
DEFAULT_ESTIMATE = 0.05

JSON = dict[str, Any]


# -- markers ---------------------------------------------------------------------------------


class Marker:
    """Writes marker lines to the worker (one ``write`` each: a pipe keeps it whole)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, line: str) -> None:
        _write(self.fd, (line.replace("\n", " ") + "\n").encode())


class Markers:
    """The worker's side of the marker pipe: lines with the time they were read."""

    def __init__(self, fd: int, t0: float) -> None:
        self.fd = fd
        self.t0 = t0
        self.lines: list[tuple[float, str]] = []
        self.eof = False
        self._buf = b""

    def pump(self, timeout: float | None, extra: int | None = None) -> bool:
        """Wait up to ``timeout`` for markers (or for ``extra`` to turn readable).

        Returns:
            Whether ``extra`` is readable.
        """
        fds = [] if self.eof else [self.fd]
        if extra is not None:
            fds.append(extra)
        if not fds:
            return False
        ready, _, _ = select.select(fds, [], [], timeout)
        if self.fd in ready:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            now = time.monotonic() - self.t0
            self._buf += chunk
            *complete, self._buf = self._buf.split(b"\n")
            self.lines.extend((now, line.decode(errors="replace")) for line in complete)
        return extra is not None and extra in ready

    def seen(self, prefix: str) -> float | None:
        """When the first marker starting with ``prefix`` was read, if it was."""
        for t, line in self.lines:
            if line.startswith(prefix):
                return t
        return None

    def wait_marker(self, prefix: str, deadline: float) -> bool:
        """Read until a marker starting with ``prefix`` arrives.

        Returns:
            Whether it arrived before the pipe closed or the deadline passed.
        """
        while self.seen(prefix) is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return False
            self.pump(left)
        return True

    def wait_token(self, fd: int, token: bytes, deadline: float) -> bool:
        """Read markers until the line ``token`` arrives on ``fd``.

        Returns:
            Whether it arrived before the pipe closed or the deadline passed.
        """
        pending = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return False
            if self.pump(left, fd):
                chunk = os.read(fd, 4096)
                if not chunk:
                    return False
                pending += chunk
                if token in pending.split(b"\n"):
                    return True

    def until(self, deadline: float) -> None:
        """Read until the deadline or the end of the pipe."""
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.pump(left)


class Estimates:
    """How long each kind of op takes here and now: the median of its latest runs."""

    def __init__(self) -> None:
        self._runs: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=9)
        )

    def get(self, op: str) -> float:
        runs = self._runs.get(op)
        return statistics.median(runs) if runs else DEFAULT_ESTIMATE

    def learn(self, markers: Markers) -> None:
        starts: dict[str, tuple[float, str]] = {}
        for t, line in markers.lines:
            kind, _, rest = line.partition(" ")
            if kind == "S":
                index, _, op = rest.partition(" ")
                starts[index] = (t, op)
            elif kind == "D":
                index = rest.partition(" ")[0]
                if index in starts:
                    began, op = starts.pop(index)
                    self._runs[op].append(t - began)

    def as_dict(self) -> dict[str, float]:
        return {op: round(self.get(op), 4) for op in sorted(self._runs)}


# -- the fault layer --------------------------------------------------------------------------


class FaultLayer:
    """Breaks the Nth matching call of an os function with ``OSError(errno)``.

    A call matches when the path it works on (for a descriptor, what
    ``/proc/self/fd`` names) is ``path`` or, unless ``exact``, lies under it.
    Matching calls are counted per function. The ``nth`` matching call of the
    first of ``calls`` fails, and from then on every matching call of any of
    ``calls`` does (a disk that went bad stays bad: ``["write", "unlink"]``
    also fails the rollback's removal of the temp). With ``short``, the
    ``nth`` call, a ``write``, writes half its bytes and returns the short
    count instead, as a disk filling up mid-write does. ``nth`` 0 only counts.
    """

    def __init__(self, plan: JSON, mark: Marker) -> None:
        self.calls = frozenset(plan["calls"])
        self.trigger = plan["calls"][0] if plan["calls"] else ""
        self.path = plan["path"]
        self.exact = bool(plan["exact"])
        self.nth = int(plan["nth"])
        self.code = int(plan["errno"])
        self.short = bool(plan.get("short", False))
        self.counts = dict.fromkeys(WRAPPED, 0)
        self.fired: JSON | None = None
        self._mark = mark
        self._lock = threading.Lock()
        self._real: dict[str, Callable[..., Any]] = {name: getattr(os, name) for name in WRAPPED}

    def install(self) -> None:
        os.write = self._fd_call("write")
        os.fsync = self._fd_call("fsync")
        os.ftruncate = self._fd_call("ftruncate")
        os.open = self._open
        os.replace = self._path_call("replace")
        os.rename = self._path_call("rename")
        os.unlink = self._unlink

    def _matches(self, path: str) -> bool:
        return path == self.path if self.exact else path.startswith(self.path)

    def _decide(self, name: str, path: str) -> str:
        """``pass``, ``fail`` or ``short`` for this call."""
        if not path or not self._matches(path):
            return "pass"
        with self._lock:
            self.counts[name] += 1
            if name not in self.calls:
                return "pass"
            if self.fired is not None:
                return "fail"
            if not self.nth or name != self.trigger or self.counts[name] < self.nth:
                return "pass"
            short = self.short and name == "write"
            self.fired = {
                "call": name,
                "path": path,
                "errno": self.code,
                "name": errno.errorcode[self.code],
                "short": short,
            }
            self._mark("X " + json.dumps(self.fired))
            return "short" if short else "fail"

    def _error(self, path: str) -> OSError:
        return OSError(self.code, os.strerror(self.code), path)

    def _fd_call(self, name: str) -> Callable[..., Any]:
        real = self._real[name]

        def call(fd: int, *args: Any) -> Any:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            action = self._decide(name, path)
            if action == "fail":
                raise self._error(path)
            if action == "short":
                data = memoryview(args[0])
                return real(fd, data[: max(1, len(data) // 2)])
            return real(fd, *args)

        return call

    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = os.path.abspath(os.fspath(path)) if dir_fd is None else ""
        if self._decide("open", where) == "fail":
            raise self._error(where)
        return int(self._real["open"](path, flags, mode, dir_fd=dir_fd))

    def _unlink(self, path: Any, *, dir_fd: int | None = None) -> None:
        where = os.path.abspath(os.fspath(path)) if dir_fd is None else ""
        if self._decide("unlink", where) == "fail":
            raise self._error(where)
        self._real["unlink"](path, dir_fd=dir_fd)

    def _path_call(self, name: str) -> Callable[..., Any]:
        real = self._real[name]

        def call(src: Any, dst: Any, **kwargs: Any) -> Any:
            where = os.path.abspath(os.fspath(src))
            if self._decide(name, where) == "fail":
                raise self._error(where)
            return real(src, dst, **kwargs)

        return call


# -- what a workflow process does -------------------------------------------------------------


class Context:
    """What the ops of one workflow process share."""

    def __init__(self, spec: JSON, mark: Marker) -> None:
        self.spec = spec
        self.mark = mark
        self.data = Path(spec["data"]) if spec.get("data") else None
        self.dbs = Path(spec["dbs"]) if spec.get("dbs") else None
        self.repo = spec.get("repo")
        self.port = spec.get("port")

    def file(self, name: str) -> str:
        assert self.data is not None
        return str(self.data / name)

    def db(self, name: str) -> str:
        assert self.dbs is not None
        return str(self.dbs / name)


class FileSizeLimit:
    """``RLIMIT_FSIZE`` for the duration of a block: the kernel refuses (EFBIG) any
    write that would make a file larger, SQLite's own writes included."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._old: tuple[int, int] | None = None

    def __enter__(self) -> None:
        if self.limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            self._old = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self._old[1]))

    def __exit__(self, *exc_info: object) -> None:
        if self._old is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._old)


def _db_limit(path: str, op: JSON) -> int | None:
    """The file size limit of an op with an ``efbig`` fault (its room, in bytes).

    The batch database is in WAL mode: the WAL, which the transaction writes,
    starts empty, so the limit is the room itself. The migration database has
    a rollback journal: the transaction grows the main file, so the limit is
    its size plus the room.
    """
    room = op.get("efbig")
    if room is None:
        return None
    if op["op"] == "batch":
        return int(room)
    return os.path.getsize(path) + int(room)


def op_file(ctx: Context, op: JSON) -> JSON:
    data = test_atomic.content(op["version"])
    with ts.atomic_file(ctx.file("file.bin"), "wb") as f:
        for i in range(0, len(data), 32 * 1024):
            ts.checkpoint()
            f.write(data[i : i + 32 * 1024])
    return {"version": op["version"]}


def op_zip(ctx: Context, op: JSON) -> JSON:
    test_atomic.write_zip(ctx.file("archive.zip"), op["version"], True, None)
    return {"version": op["version"]}


def op_tar(ctx: Context, op: JSON) -> JSON:
    test_atomic.write_tar(ctx.file("archive.tar"), op["version"], True, None)
    return {"version": op["version"]}


def op_dir(ctx: Context, op: JSON) -> JSON:
    test_atomic.write_dir(ctx.file("tree/site"), op["version"], True, None)
    return {"version": op["version"]}


def op_batch(ctx: Context, op: JSON) -> JSON:
    path = ctx.db("batch.db")
    conn = sqlite3.connect(path, timeout=30)
    try:
        with FileSizeLimit(_db_limit(path, op)), ts.transaction(conn):
            for n in range(op["rows"]):
                if n % 200 == 0:
                    ts.checkpoint()
                conn.execute("INSERT INTO items VALUES (?, ?, ?)", (op["batch"], n, "x" * 16))
    finally:
        conn.close()
    return {"batch": op["batch"]}


def op_migration(ctx: Context, op: JSON) -> JSON:
    path = ctx.db("migration.db")
    conn = sqlite3.connect(path, timeout=30)
    try:
        with FileSizeLimit(_db_limit(path, op)), ts.transaction(conn):
            # The same migration as test_transaction's, with a cancellation point per step.
            v = conn.execute("PRAGMA user_version").fetchone()[0]
            steps = [
                f"ALTER TABLE mig ADD COLUMN c{v} INTEGER NOT NULL DEFAULT 0",
                f"UPDATE mig SET c{v} = id * {v + 1}",
                f"CREATE INDEX mig_c{v} ON mig(c{v})",
                f"CREATE TABLE side_{v} (id INTEGER PRIMARY KEY, val INTEGER)",
                f"INSERT INTO side_{v} SELECT id, c{v} FROM mig",
                f"PRAGMA user_version = {v + 1}",
            ]
            for step in steps:
                ts.checkpoint()
                conn.execute(step)
    finally:
        conn.close()
    return {"from": v}


def op_git(ctx: Context, op: JSON) -> JSON:
    # The operation test_git's judge knows: commit f<k>.txt, branch t<k>, move
    # "moving", delete the oldest t-branch.
    k = op["trial"]
    assert ctx.repo is not None
    with ts.git_operation(ctx.repo) as git:
        Path(ctx.repo, f"f{k}.txt").write_text(f"trial {k}\n")
        git.commit(f"trial {k}", [f"f{k}.txt"])
        git.branch(f"t{k}")
        git.branch("moving", force=True)
        if op["delete"]:
            git.delete_branch(op["delete"], force=True)
    return {"trial": k}


def post(port: int, key: str, request: JSON, *, dedupe: bool, timeout: float) -> JSON:
    """One charge request to the counting server (the key goes as ``Idempotency-Key``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/charge",
            json.dumps(request),
            {
                "Idempotency-Key": key,
                "X-Dedupe": "1" if dedupe else "0",
                "Content-Type": "application/json",
            },
        )
        answer: JSON = json.loads(conn.getresponse().read())
        return answer
    finally:
        conn.close()


def charge(port: int, key: str, mode: str, timeout: float) -> JSON:
    """Charge 100 under ``key`` idempotently, in one of the modes ``auto``, ``explicit``
    (``explicit_send``) or ``dedupes`` (the server deduplicates by key); every process
    here, the workflows and the later ones that settle a key, calls it the same way.

    Returns:
        ``{"outcome": "recorded" | "replayed", "result": ...}``, or ``{"outcome": "unknown"}``
        when the claim raised ``OutcomeUnknown``.
    """
    request = {"amount": 100, "key": key}
    try:
        with ts.idempotent_call(
            key, request=request, dedupes=mode == "dedupes", explicit_send=mode == "explicit"
        ) as call:
            if call.replayed:
                return {"outcome": "replayed", "result": call.result}
            if mode == "explicit":
                with call.sending():
                    answer = post(port, key, request, dedupe=False, timeout=timeout)
            else:
                answer = post(port, key, request, dedupe=mode == "dedupes", timeout=timeout)
            call.record(answer)
            return {"outcome": "recorded", "result": answer}
    except ts.OutcomeUnknown:
        return {"outcome": "unknown"}


def op_api(ctx: Context, op: JSON) -> JSON:
    assert ctx.port is not None
    return charge(ctx.port, op["key"], op["mode"], float(ctx.spec.get("http_timeout", 30.0)))


def op_spawn(ctx: Context, op: JSON) -> JSON:
    popen = spawn(
        ["sleep", op["arg"]],
        stop_timeout=1.0,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx.mark(f"H {popen.pid}")
    return {"pid": popen.pid}


OPS: dict[str, Callable[[Context, JSON], JSON]] = {
    "file": op_file,
    "zip": op_zip,
    "tar": op_tar,
    "dir": op_dir,
    "batch": op_batch,
    "migration": op_migration,
    "git": op_git,
    "api": op_api,
    "spawn": op_spawn,
}


def describe(exc: BaseException) -> JSON:
    """An error as the judges read it: its class, errno, step and message."""
    return {
        "type": type(exc).__name__,
        "errno": getattr(exc, "errno", None),
        "step": getattr(exc, "step", None),
        "committed": getattr(exc, "committed", None),
        "sqlite": getattr(exc, "sqlite_errorname", None),
        "message": str(exc)[:500],
    }


class Failures(logging.Handler):
    """Collects what termsafe logs as failed (an audit line that could not be written)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[JSON] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.seen.append(
            {
                "message": record.getMessage()[:300],
                "error": None if exc is None else describe(exc),
            }
        )


def workflow_process(spec: JSON, mark: Marker) -> None:
    """The workflow process: one workflow running ``spec["ops"]`` in order."""
    failures = Failures()
    logger = logging.getLogger("termsafe")
    logger.addHandler(failures)
    logger.propagate = False
    if spec.get("portable_rename"):
        # atomic_directory's portable swap (two renames) instead of renameat2:
        # os.rename is then on its path, for the fault layer to break.
        import termsafe._atomic

        termsafe._atomic._use_renameat2 = False
    faults = FaultLayer(spec["fault"], mark) if spec.get("fault") else None
    if faults is not None:
        faults.install()
    store = SQLiteStore(spec["store"])
    sink = ts.JsonlSink(spec["trail"], fsync="always")
    term = ts.Terminator(
        phases=ts.Phases(*spec["phases"]),
        sink=sink,
        store=store,
        section_grace=spec.get("grace"),
    )
    alerts: list[str] = []
    term.add_alert_listener(lambda alert: alerts.append(f"{alert.rule} {alert.severity}"))
    handlers = ts.install_signal_handlers(term) if spec["handlers"] else None
    ctx = Context(spec, mark)
    with term.workflow(spec["workflow_id"], owner="chaos") as wf:
        mark("B")
        for j, op in enumerate(spec["ops"]):
            ts.checkpoint()
            mark(f"S {j} {op['op']}")
            try:
                outcome = OPS[op["op"]](ctx, op)
            except Exception as exc:
                mark(f"E {j} {json.dumps(describe(exc))}")
            else:
                mark(f"D {j} {json.dumps(outcome)}")
    mark(f"W {wf.state.value}")
    term.close()
    if handlers is not None:
        handlers.uninstall()
    last = {
        "failures": failures.seen,
        "alerts": alerts,
        "counts": None if faults is None else faults.counts,
    }
    mark("R " + json.dumps(last))


def _child(spec: JSON, fd: int) -> NoReturn:
    mark = Marker(fd)
    code = 0
    try:
        workflow_process(spec, mark)
    except BaseException:
        mark("C " + json.dumps(traceback.format_exc()[-3000:]))
        code = 3
    os._exit(code)


# -- the worker ------------------------------------------------------------------------------


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_CHILD_SUBREAPER: orphans of a killed workflow process become ours.
    if libc.prctl(36, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _reap() -> None:
    """Reap every child that has ended (orphans killed by a recovery, helpers stopped)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive(pid: int) -> bool:
    """Whether our child ``pid`` is still running (it is not reaped here)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is None


def _drain(fd: int) -> None:
    while select.select([fd], [], [], 0)[0]:
        if not os.read(fd, 4096):
            return


def run_trial(spec: JSON, estimates: Estimates) -> JSON:
    """Fork one workflow process, signal it as planned, reap it; report what happened."""
    assert threading.active_count() == 1, "the worker must not start threads: it forks"
    kill: JSON = spec.get("kill") or {}
    stall_fd: int | None = kill.get("stall_fd")
    if stall_fd is not None:
        _drain(stall_fd)
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the workflow process
        os.close(r)
        _child(spec, w)
    os.close(w)
    markers = Markers(r, t0)
    sent: list[JSON] = []
    escalated = False
    deadline = t0 + float(spec.get("timeout", 120.0))
    signame = kill.get("signal")
    if signame is not None:
        at = kill["at"]
        if at == "start":
            triggered = True
        elif at == "op":
            triggered = markers.wait_marker(f"S {kill['index']} ", deadline)
        elif at == "fault":
            triggered = markers.wait_marker("X ", deadline)
        elif at == "stall":
            assert stall_fd is not None
            triggered = markers.wait_token(stall_fd, str(kill["token"]).encode(), deadline)
        else:
            raise ValueError(f"unknown kill trigger {at!r}")
        if triggered:
            delay = float(kill.get("delay", 0.0))
            if "fraction" in kill:
                delay = float(kill["fraction"]) * estimates.get(kill["of"])
            markers.until(time.monotonic() + delay)
            if _alive(pid):
                os.kill(pid, signal.Signals[signame])
                sent.append(
                    {"signal": signame, "t": round(time.monotonic() - t0, 4), "delay": delay}
                )
                if signame == "SIGTERM":
                    markers.until(time.monotonic() + float(kill.get("term_deadline", 40.0)))
                    if _alive(pid) and not markers.eof:
                        os.kill(pid, signal.SIGKILL)
                        escalated = True
                        sent.append({"signal": "SIGKILL", "t": round(time.monotonic() - t0, 4)})
    markers.until(deadline)
    hung = not markers.eof
    if hung:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    markers.until(time.monotonic() + 10.0)
    os.close(r)
    estimates.learn(markers)
    return {
        "pid": pid,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else None,
        "sent": sent,
        "escalated": escalated,
        "hung": hung,
        "markers": [[round(t, 4), line] for t, line in markers.lines],
        "elapsed": round(time.monotonic() - t0, 4),
        "estimates": estimates.as_dict(),
    }


def snapshot(spec: JSON) -> JSON:
    """SQLite's own verdict on a database (``PRAGMA integrity_check`` and the scenario's
    invariants, by test_transaction's judge), taken where the database is visible."""
    judge = test_transaction.Judge(Path(spec["path"]), spec["scenario"])
    try:
        return {"value": judge.snapshot()}
    except Exception as exc:
        return {"problem": f"{type(exc).__name__}: {exc}"}


def setup(spec: JSON) -> JSON:
    """Create a scenario's database as test_transaction's kill tests do."""
    test_transaction._setup_db(Path(spec["path"]), spec["scenario"], spec["journal"])
    return {"ok": True}


def ballast(spec: JSON) -> JSON:
    """Fill the folder's file system with a ballast file until ``free`` bytes are left."""
    path = os.path.join(spec["dir"], "ballast.bin")
    st = os.statvfs(spec["dir"])
    free = st.f_bavail * st.f_frsize
    size = os.path.getsize(path) if os.path.exists(path) else 0
    want = max(0, size + free - int(spec["free"]))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if want < size:
            os.ftruncate(fd, want)
        elif want > size:
            try:
                os.posix_fallocate(fd, size, want - size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    st = os.statvfs(spec["dir"])
    return {"free": st.f_bavail * st.f_frsize}


def _stop_descendants() -> None:
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            continue
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main() -> None:
    """Answer commands until stdin closes, then stop and reap whatever is left."""
    _become_subreaper()
    tmpfs = os.environ.get("CHAOS_TMPFS")
    mounted = tmpfs is not None and os.path.ismount(tmpfs)
    ready = {"ready": True, "pid": os.getpid(), "tmpfs": mounted}
    print(json.dumps(ready), flush=True)
    estimates = Estimates()
    try:
        for line in sys.stdin:
            spec = json.loads(line)
            _reap()
            command = spec["command"]
            if command == "trial":
                answer = run_trial(spec, estimates)
            elif command == "snapshot":
                answer = snapshot(spec)
            elif command == "ballast":
                answer = ballast(spec)
            elif command == "setup":
                answer = setup(spec)
            else:
                answer = {"problem": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        _stop_descendants()


if __name__ == "__main__":
    main()
