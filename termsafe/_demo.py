"""``termsafe demo``: a real workflow, killed inside a critical section, narrated live.

The workflow builds a small report in a temporary folder. A second thread asks
for the kill while the workflow is half-way through writing the report inside
an ``fs`` critical section. The demo prints every audit event as it happens,
then checks the promises it can see from outside: the kill was deferred until
the section finished, the report is whole, every hook ran once in LIFO order,
the scratch folder is gone, the state is ``terminated``, and the audit trail's
hash chain verifies. It ends with a one-line verdict and exits 0 only if every
check passed.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ._audit import AuditEvent, JsonlSink, verify_audit_log
from ._permissions import Principal
from ._sections import critical_section
from ._states import WorkflowState
from ._terminator import Phases, Terminator
from ._workflow import checkpoint, on_cleanup, on_rollback, sleep

__all__ = ["run_demo"]

CHUNKS = 8


def _fmt_event(event: AuditEvent, t0: float) -> str:
    ms = (time.monotonic() - t0) * 1000
    details = dict(event.details)
    extra = ""
    if event.type == "kill_requested":
        who = event.actor["id"] if event.actor else "?"
        extra = f"by {who}: {event.reason!r}"
    elif event.type == "kill_deferred":
        kinds = ", ".join(f"{s['kind']} (grace {s['grace']:g}s)" for s in details["sections"])
        extra = f"inside critical section {kinds}: waiting for it"
    elif event.type == "kill_effective":
        extra = (
            f"section {details['after_section']!r} done; kill lands now "
            f"(deferred {details['deferred_for_ms']:.0f} ms)"
        )
    elif event.type in ("hook_ran", "hook_failed"):
        extra = f"{details['kind']:8} {details['hook']}"
        if "error" in details:
            extra += f"  ERROR {details['error']}"
    elif event.type == "phase_changed":
        extra = f"phase -> {details['phase']}"
    elif event.type == "workflow_finished":
        extra = f"final state: {event.state}"
    return f"  {ms:8.1f} ms  {event.type:18} {extra}".rstrip()


def run_demo(out: TextIO, *, keep: bool = False) -> int:
    """Run the demo, printing to ``out``; return the exit code (0: every check passed).

    Args:
        out: Where to print the timeline and the verdict.
        keep: Keep the temporary folder (its path is printed) instead of removing it.

    Returns:
        0 if every check passed, 1 otherwise.
    """

    def say(line: str = "") -> None:
        out.write(line + "\n")
        out.flush()

    base = Path(tempfile.mkdtemp(prefix="termsafe-demo-"))
    trail = base / "audit.jsonl"
    report = base / "report.txt"
    scratch = base / "scratch"
    user = _os_user()
    t0 = time.monotonic()
    printed = threading.Lock()

    def on_event(event: AuditEvent) -> None:
        with printed:
            say(_fmt_event(event, t0))

    sink = JsonlSink(trail, fsync="batch")
    term = Terminator(phases=Phases(graceful=2.0, forced=2.0), sink=sink)
    term.add_event_listener(on_event)
    hooks_ran: list[str] = []
    in_section = threading.Event()
    kill_sent = threading.Event()
    expected_report = "".join(f"line {i}: {'x' * 40}\n" for i in range(CHUNKS))

    def hook(name: str, action: Callable[[], None] | None = None) -> Callable[[], None]:
        def run() -> None:
            if action is not None:
                action()
            hooks_ran.append(name)

        run.__qualname__ = name
        return run

    say(f"termsafe demo: a workflow killed inside a critical section (folder {base})")
    say(f"  audit trail: {trail}")
    say()

    def body() -> None:
        with term.workflow("demo-report", owner=user, team="demo"):
            scratch.mkdir()
            on_cleanup(hook("remove scratch folder", lambda: shutil.rmtree(scratch)))
            (scratch / "input.csv").write_text("a,b\n1,2\n")
            checkpoint({"step": "input staged"})
            on_rollback(hook("note the unfinished run", lambda: None))
            on_cleanup(hook("close report handle", lambda: None))
            with critical_section("fs", grace=5.0):
                in_section.set()
                tmp = report.with_suffix(".tmp")
                with tmp.open("w") as fh:
                    for i in range(CHUNKS):
                        fh.write(f"line {i}: {'x' * 40}\n")
                        if i == CHUNKS // 2:
                            # The kill arrives here, mid-write; the section holds it.
                            kill_sent.wait(10)
                        time.sleep(0.02)  # the "slow" part of the write, for the demo
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, report)
            checkpoint({"step": "report written"})
            # Never reached: the kill lands when the section ends.
            while True:
                sleep(0.05)

    worker = threading.Thread(target=body, name="demo-workflow")
    worker.start()
    in_section.wait(10)
    handle = term.kill(
        "demo-report", by=Principal(user), reason="operator asked to stop the demo run"
    )
    kill_sent.set()
    final = handle.wait(15)
    worker.join(15)
    term.close()
    say()

    checks: list[tuple[str, bool]] = [
        ("kill was deferred by the critical section", handle.deferred),
        ("report is whole (section finished before the kill)", _read(report) == expected_report),
        ("no temporary file left", not report.with_suffix(".tmp").exists()),
        (
            "hooks ran once each, LIFO",
            hooks_ran
            == ["close report handle", "note the unfinished run", "remove scratch folder"],
        ),
        ("scratch folder removed", not scratch.exists()),
        ("final state is terminated", final is WorkflowState.TERMINATED),
    ]
    say("audit trail (JSONL, hash-chained):")
    lines = trail.read_text().splitlines()
    for line in lines:
        rec = json.loads(line)
        ev = rec["event"]
        say(f"  #{rec['seq']:<3} {ev['timestamp']}  {ev['type']:18} {rec['hash'][:16]}")
    verdict = verify_audit_log(trail)
    say(f"verifier: {verdict.message}")
    checks.append(("audit trail verifies", verdict.ok and not verdict.torn_tail))
    say()
    for text, ok in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {text}")
    failed = [text for text, ok in checks if not ok]
    if keep:
        say(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if failed:
        say(f"verdict: UNSAFE - {len(failed)} check(s) failed: {'; '.join(failed)}")
        return 1
    say(
        f"verdict: SAFE - kill deferred until the fs section finished, "
        f"{len(hooks_ran)} hooks ran once each in LIFO order, state {final.value}, "
        f"nothing left behind, audit chain of {len(lines)} events intact"
    )
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"
