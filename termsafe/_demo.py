"""``termsafe demo``: a real workflow, killed inside a git commit, narrated live.

In a temporary folder the workflow writes a zip archive with ``atomic_file``,
batch-inserts rows into SQLite in a ``transaction``, charges an order through
an ``idempotent_call`` to a local HTTP server, and commits the archive to a
real git repository with ``git_operation``. A second thread asks for the kill
while ``git commit`` is running (its pre-commit hook tells the demo when). The
kill is deferred until the git operation finishes, then lands; the hooks run
LIFO; the workflow ends ``terminated``.

The demo then checks, with tools it did not write, that nothing was torn:
``git fsck``, ``PRAGMA integrity_check``, the archive's own CRC test; that the
kill waited for the commit and the hooks ran once each in LIFO order; that a
second run of the workflow replays the charge instead of repeating it (the
server counts one charge); that no temp file is left; and that the audit
trail's hash chain verifies. It ends with a one-line verdict and exits 0 only
if every check passed.
"""

from __future__ import annotations

import contextlib
import getpass
import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ._atomic import atomic_file
from ._audit import AuditEvent, JsonlSink, verify_audit_log
from ._git import git_operation
from ._idempotency import idempotent_call
from ._permissions import Principal
from ._states import WorkflowState
from ._store import SQLiteStore
from ._terminator import Phases, Terminator
from ._transaction import transaction
from ._workflow import checkpoint, on_cleanup, on_rollback

__all__ = ["run_demo"]

ROWS = 500
WORKFLOW_ID = "nightly-report"


def _fmt_event(event: AuditEvent, t0: float) -> str | None:
    ms = (time.monotonic() - t0) * 1000
    d = dict(event.details)
    wf = f"[{event.workflow_id}] " if event.workflow_id else ""
    if event.type == "workflow_started":
        text = "workflow started"
    elif event.type == "kill_requested":
        who = event.actor["id"] if event.actor else "?"
        text = f"kill requested by {who}: {event.reason!r}"
    elif event.type == "kill_deferred":
        kinds = ", ".join(f"{s['kind']} (grace {s['grace']:g}s)" for s in d["sections"])
        text = f"kill deferred: inside critical section {kinds}"
    elif event.type == "kill_effective":
        text = (
            f"section {d['after_section']!r} done; the kill lands now "
            f"(deferred {d['deferred_for_ms']:.0f} ms)"
        )
    elif event.type in ("hook_ran", "hook_failed"):
        text = f"hook ran: {d['kind']:8} {d['hook']}"
        if "error" in d:
            text += f"  ERROR {d['error']}"
    elif event.type == "phase_changed":
        text = f"phase -> {d['phase']}"
    elif event.type == "workflow_finished":
        text = f"final state: {event.state}"
    elif event.type.startswith(("idempotent", "git_operation", "transaction", "atomic")):
        text = event.type.replace("_", " ")
    else:
        return None
    return f"  {ms:8.1f} ms  {wf}{text}"


class _ChargeServer:
    """A local payment API that counts the charges it performed, per idempotency key."""

    def __init__(self) -> None:
        self.charges: dict[str, int] = {}
        lock = threading.Lock()
        charges = self.charges

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                key = self.headers.get("Idempotency-Key", "")
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with lock:
                    charges[key] = charges.get(key, 0) + 1
                    charge_id = f"ch_{len(charges)}_{charges[key]}"
                reply = json.dumps({"id": charge_id, "amount": body.get("amount")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the demo's output to the timeline

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/charges"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def charge(self, key: str, amount: int) -> dict[str, Any]:
        req = urllib.request.Request(  # noqa: S310 (loopback URL built above)
            self.url,
            data=json.dumps({"amount": amount}).encode(),
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
            method="POST",
        )
        # An http:// URL on the loopback server this class started.
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent)}
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, env=env, check=False
    )


def _make_repo(repo: Path, entered: Path, go: Path) -> None:
    repo.mkdir()
    for args in (
        ("init", "-q", "-b", "main"),
        ("config", "user.name", "termsafe demo"),
        ("config", "user.email", "demo@example.invalid"),
        ("commit", "-q", "--allow-empty", "-m", "initial"),
    ):
        _git(repo, *args).check_returncode()
    # The pre-commit hook says "git commit is running" and waits for the demo's
    # go-ahead, so the kill lands inside the commit, every run.
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text(
        "#!/bin/sh\n"
        f"touch '{entered}'\n"
        "i=0\n"
        f"while [ ! -e '{go}' ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n"
    )
    hook.chmod(0o755)


@contextlib.contextmanager
def _printing(out: TextIO) -> Iterator[Callable[[str], None]]:
    lock = threading.Lock()

    def say(line: str = "") -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    yield say


def run_demo(out: TextIO, *, keep: bool = False) -> int:
    """Run the demo, printing to ``out``; return the exit code (0: every check passed).

    Args:
        out: Where to print the timeline and the verdict.
        keep: Keep the temporary folder (its path is printed) instead of removing it.

    Returns:
        0 if every check passed, 1 otherwise.
    """
    base = Path(tempfile.mkdtemp(prefix="termsafe-demo-"))
    try:
        with _printing(out) as say:
            return _run(base, say, keep)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _run(base: Path, say: Callable[[str], None], keep: bool) -> int:
    trail = base / "audit.jsonl"
    archive = base / "report.zip"
    database = base / "warehouse.sqlite3"
    repo = base / "repo"
    scratch = base / "scratch"
    entered, go = base / "commit-entered", base / "commit-go"
    user = _os_user()
    _make_repo(repo, entered, go)
    server = _ChargeServer()
    store = SQLiteStore(base / "store.sqlite3")
    t0 = time.monotonic()

    def on_event(event: AuditEvent) -> None:
        line = _fmt_event(event, t0)
        if line is not None:
            say(line)

    sink = JsonlSink(trail, fsync="batch")
    term = Terminator(phases=Phases(graceful=2.0, forced=2.0), sink=sink, store=store)
    term.add_event_listener(on_event)
    hooks_ran: list[str] = []

    def hook(name: str, action: Callable[[], None] | None = None) -> Callable[[], None]:
        def run() -> None:
            if action is not None:
                action()
            hooks_ran.append(name)

        run.__qualname__ = name
        return run

    def workflow_body(second_run: bool) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with term.workflow(WORKFLOW_ID, owner=user, team="analytics") as wf:
            seen["resumed_from"] = wf.last_checkpoint
            scratch.mkdir(exist_ok=True)
            on_cleanup(hook("remove scratch folder", lambda: shutil.rmtree(scratch)))
            # 1. An archive, written atomically (old or new, never torn).
            with atomic_file(archive, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
                for i in range(20):
                    zf.writestr(f"part-{i:02}.csv", "id,value\n" + f"{i},{i * i}\n" * 200)
            checkpoint({"step": "archive written"})
            # 2. A batch insert: all rows or none.
            conn = sqlite3.connect(database)
            on_cleanup(hook("close database connection", conn.close))
            with transaction(conn):
                conn.execute("CREATE TABLE IF NOT EXISTS facts (run INTEGER, n INTEGER)")
                conn.executemany(
                    "INSERT INTO facts VALUES (?, ?)",
                    [(2 if second_run else 1, n) for n in range(ROWS)],
                )
            checkpoint({"step": "rows inserted"})
            # 3. A charge: at most once per key, even across runs.
            with idempotent_call("charge-order-1001", request={"amount": 4200}) as call:
                if call.replayed:
                    seen["charge"] = call.result
                else:
                    result = server.charge(call.key, 4200)
                    call.record(result)
                    seen["charge"] = result
            seen["replayed"] = call.replayed
            checkpoint({"step": "charged"})
            on_rollback(hook("mark the report incomplete", lambda: None))
            if second_run:
                return seen
            # 4. The commit the kill lands in.
            with git_operation(repo) as op:
                shutil.copy(archive, repo / "report.zip")
                op.commit("Add nightly report", ["report.zip"])
            checkpoint({"step": "committed"})
            # Never reached in the first run: the kill lands when the git operation ends.
            seen["ran_past_commit"] = True
        return seen

    say(f"termsafe demo: a workflow killed inside a git commit (folder {base})")
    say(f"  audit trail: {trail}")
    say("")
    say("run 1: archive, batch insert, charge, git commit <- kill arrives here")
    first: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: first.update(workflow_body(False)), name="demo-run-1")
    worker.start()
    deadline = time.monotonic() + 30
    while not entered.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the demo waits for git's pre-commit hook to start
    handle = term.kill(WORKFLOW_ID, by=Principal(user), reason="operator stopped the nightly run")
    go.touch()
    final = handle.wait(30)
    worker.join(30)
    hooks_first = list(hooks_ran)
    head_after_kill = _git(repo, "log", "-1", "--format=%s").stdout.strip()
    say("")
    say("run 2: the same workflow restarted; the charge must replay, not repeat")
    second = workflow_body(True)
    term.close()
    server.close()
    say("")

    fsck = _git(repo, "fsck", "--full", "--strict")
    with contextlib.closing(sqlite3.connect(database)) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        per_run = dict(conn.execute("SELECT run, count(*) FROM facts GROUP BY run").fetchall())
    with zipfile.ZipFile(archive) as zf:
        bad_member = zf.testzip()
        members = len(zf.namelist())
    with zipfile.ZipFile(repo / "report.zip") as zf:
        committed_ok = zf.testzip() is None
    leftovers = [
        p.name
        for p in base.rglob("*")
        if ".termsafe-tmp" in p.name or (p.name.endswith(".lock") and ".git" in p.parts)
    ]
    checks: list[tuple[str, bool]] = [
        ("kill was deferred by the git critical section", handle.deferred),
        ("git commit completed before the kill landed", head_after_kill == "Add nightly report"),
        (f"git fsck --full is clean ({fsck.returncode})", fsck.returncode == 0 and not fsck.stdout),
        (f"PRAGMA integrity_check: {integrity}", integrity == "ok"),
        (f"all {ROWS} rows of each run, none torn: {per_run}", per_run == {1: ROWS, 2: ROWS}),
        (f"zip archive passes its CRC test ({members} members)", bad_member is None),
        ("committed archive passes its CRC test", committed_ok),
        ("the workflow stopped at the kill", "ran_past_commit" not in first),
        (
            "hooks ran once each, LIFO",
            hooks_first
            == [
                "mark the report incomplete",
                "close database connection",
                "remove scratch folder",
            ],
        ),
        ("scratch folder removed", not scratch.exists()),
        ("final state is terminated", final is WorkflowState.TERMINATED),
        ("run 2 resumed from the last checkpoint", second.get("resumed_from") is not None),
        ("run 2 replayed the charge", second.get("replayed") is True),
        (
            f"the server charged once: {server.charges}",
            server.charges == {"charge-order-1001": 1},
        ),
        ("same charge id in both runs", first.get("charge") == second.get("charge")),
        (f"no temp file or stale git lock left {leftovers}", not leftovers),
    ]
    store.close()
    say("audit trail (JSONL, hash-chained):")
    lines = trail.read_text().splitlines()
    for line in lines:
        rec = json.loads(line)
        ev = rec["event"]
        say(
            f"  #{rec['seq']:<3} {ev['timestamp']}  {ev['type']:26} "
            f"{ev.get('state') or '':12} {rec['hash'][:12]}"
        )
    verdict = verify_audit_log(trail)
    say(f"verifier: {verdict.message}")
    checks.append(("audit trail verifies", verdict.ok and not verdict.torn_tail))
    say("")
    for text, ok in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {text}")
    failed = [text for text, ok in checks if not ok]
    if keep:
        say(f"kept {base}")
    if failed:
        say(f"verdict: UNSAFE - {len(failed)} check(s) failed: {'; '.join(failed)}")
        return 1
    say(
        "verdict: SAFE - the kill waited for the git commit, every hook ran once in LIFO "
        "order, git/SQLite/zip verify, the charge replayed instead of repeating, "
        f"nothing left behind, audit chain of {len(lines)} events intact"
    )
    return 0


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"
