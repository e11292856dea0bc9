"""The ``termsafe`` command.

Exit codes:

* 0: success (``kill``: the kill was accepted, now or deferred; ``recover``:
  everything dead processes left is settled);
* 1: a check failed: the demo's verdict, a trail that does not verify (``prune``
  then removes nothing), ``recover`` left something it could not settle (printed);
* 2: bad usage or input (argparse's convention), with a message that names the
  bad value;
* 3: ``kill`` refused: insufficient permissions, or the workflow has finished;
* 4: ``kill``/``status``: no live workflow with that id, or its host process
  cannot be reached (it may have died: ``termsafe recover``); ``timeline``: no
  such workflow (or, without ``--workflow``, no killed one) in the trail.

``run`` exits with the command's own code (128 + N when signal N ended it,
127 when it was not found, 126 when it could not be executed), like a shell.

The store, the audit trail (``audit.jsonl``), the control sockets and the
access policy live under ``$TERMSAFE_HOME`` (default ``./.termsafe``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Not ``typing.TYPE_CHECKING``, and only what every command needs at module
# level: each command imports the rest itself, so ``termsafe kill`` pays for
# no module it does not use (type checkers treat this name as true).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any, TextIO

    from ._store import Run, SQLiteStore
    from ._supervisor import RunResult

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NOT_FOUND = 4

FINAL_STATES = ("completed", "failed", "terminated", "killed")
#: Seconds ``kill`` waits for every host to say whether it runs the workflow
#: before it asks the store instead (a stopped process never answers).
SCAN_TIMEOUT = 1.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be >= 0 and finite (got {text!r})")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def _duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` or plain seconds, as seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90d, 12h, 30m, 45s or 2w (got {text!r})"
        )
    return value


def _path(text: str) -> Path:
    from pathlib import Path  # only the commands that take a path need it

    return Path(text)


#: The commands, in the order ``termsafe --help`` lists them.
COMMANDS = ("demo", "audit", "ps", "status", "kill", "timeline", "recover", "prune", "run")


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``command``, only that command's (the others are
    neither needed nor worth building when the command is known)."""

    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(
        prog="termsafe",
        description=(
            "Safe termination of workflows: list, inspect and kill them, run a command "
            "under supervision, recover after a crash, check an audit trail."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    if wanted("demo"):
        demo = sub.add_parser("demo", help="run a workflow, kill it inside a critical section")
        demo.add_argument("--keep", action="store_true", help="keep the temporary folder")

    if wanted("audit"):
        audit = sub.add_parser("audit", help="inspect a JSONL audit trail")
        audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
        verify = audit_sub.add_parser("verify", help="verify a trail's hash chain")
        verify.add_argument("path", type=_path)
        verify.add_argument("--key-file", type=_path, help="file holding the HMAC key (raw bytes)")
        verify.add_argument("--anchor", help="head anchor as JSON (from JsonlSink.anchor())")
        verify.add_argument(
            "--allow-pruned",
            action="store_true",
            default=None,
            help="accept a recorded prune even for a keyless trail checked against --anchor",
        )
        verify.add_argument("--json", action="store_true", help="print the report as JSON")
        tail = audit_sub.add_parser("tail", help="print the last events of a trail")
        tail.add_argument("path", type=_path)
        tail.add_argument("-n", type=int, default=20, help="how many events (default 20)")
        tail.add_argument("--json", action="store_true", help="print events as JSON lines")

    if wanted("ps"):
        ps = sub.add_parser("ps", help="list the workflows registered in the store")
        ps.add_argument("--all", action="store_true", help="include finished runs")
        ps.add_argument("--json", action="store_true", help="print the runs as a JSON list")

    if wanted("status"):
        status = sub.add_parser("status", help="show one workflow (by workflow id or run id)")
        status.add_argument("id", help="a workflow id or a run id")
        status.add_argument("--socket", help="ask this control socket, not the store")
        status.add_argument("--json", action="store_true", help="print the status as JSON")

    if wanted("kill"):
        kill = sub.add_parser("kill", help="kill a workflow, as the OS user you are")
        kill.add_argument("id", help="a workflow id or a run id")
        kill.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        kill.add_argument("--force", action="store_true", help="start at the forced phase")
        kill.add_argument(
            "--socket", help="the control socket to ask (default: the host's that runs it)"
        )
        kill.add_argument(
            "--timeout",
            type=_seconds,
            default=5.0,
            help="seconds to wait for the answer (default 5)",
        )
        kill.add_argument("--json", action="store_true", help="print the answer as JSON")

    if wanted("timeline"):
        timeline = sub.add_parser(
            "timeline",
            help="draw a workflow's termination timeline from an audit trail (SVG)",
            description=(
                "Draw a workflow's termination timeline from a JSONL audit trail as a "
                "standalone SVG: the phases and their deadlines, the critical sections "
                "that deferred the kill, every hook in the order it ran (LIFO), the "
                "final state. The trail's hash chain is verified first."
            ),
        )
        timeline.add_argument("path", type=_path, help="the audit trail (a JsonlSink file)")
        timeline.add_argument(
            "--workflow",
            metavar="ID",
            help="the workflow to draw (default: the last one killed in the trail; "
            "a child killed with its parent yields to the parent)",
        )
        timeline.add_argument(
            "-o",
            "--output",
            type=_path,
            metavar="OUT.svg",
            help="write the SVG to this file (default: standard output)",
        )
        timeline.add_argument(
            "--key-file", type=_path, help="file holding the HMAC key (raw bytes)"
        )

    if wanted("recover"):
        recover = sub.add_parser("recover", help="clean up after processes that died")
        recover.add_argument(
            "--kill-timeout",
            type=_seconds,
            default=1.0,
            help="seconds between SIGTERM and SIGKILL for orphan processes (default 1)",
        )
        recover.add_argument("--json", action="store_true", help="print the report as JSON")

    if wanted("prune"):
        prune = sub.add_parser(
            "prune",
            help="remove data older than its retention: audit files, store records",
            description=(
                "Remove what is older than its retention: whole rotated files of the audit "
                "trail (recorded in the trail first, so it still verifies), checkpoints, "
                "settled idempotency records and the records of ended runs. A kind whose "
                "option is not given is kept. Durations: 90d, 12h, 30m, 45s, 2w or seconds."
            ),
        )
        for kind, what in (
            ("audit", "rotated audit files whose newest event is older than this"),
            ("checkpoints", "checkpoints not saved for this long"),
            ("idempotency", "settled idempotency records untouched for this long"),
            ("runs", "records of runs that ended this long ago"),
        ):
            prune.add_argument(f"--{kind}", type=_duration, metavar="AGE", help=what)
        prune.add_argument(
            "--audit-path",
            type=_path,
            metavar="PATH",
            help="the audit trail (default: $TERMSAFE_HOME/audit.jsonl)",
        )
        prune.add_argument("--key-file", type=_path, help="file holding the HMAC key (raw bytes)")
        prune.add_argument(
            "--max-bytes",
            type=int,
            metavar="N",
            help="the trail's max_bytes, as its writers use it (the records rotate it alike)",
        )
        prune.add_argument(
            "--dry-run", action="store_true", help="say what would go; remove nothing"
        )
        prune.add_argument("--json", action="store_true", help="print the counts as JSON")

    if wanted("run"):
        run = sub.add_parser(
            "run",
            help="run a command as a supervised workflow process",
            usage="termsafe run [options] -- CMD [ARG ...]",
        )
        run.add_argument("--id", dest="workflow_id", help="the workflow id (default: CMD-<random>)")
        run.add_argument("--owner", help="the owner's principal id (default: your OS user)")
        run.add_argument("--team", help="the team")
        run.add_argument(
            "--depends-on",
            action="append",
            default=[],
            metavar="ID",
            help="a workflow this run depends on (repeatable)",
        )
        run.add_argument(
            "--no-cascade",
            action="store_true",
            help="when a dependency is killed, only record it (default: kill this run too)",
        )
        run.add_argument(
            "--graceful", type=_seconds, default=5.0, help="graceful phase, seconds (default 5)"
        )
        run.add_argument(
            "--forced", type=_seconds, default=5.0, help="forced phase, seconds (default 5)"
        )
        run.add_argument(
            "--cleanup",
            action="append",
            default=[],
            metavar="CMD",
            help="a command to run after the run ended and was cleaned up (repeatable)",
        )
        run.add_argument("--no-control", action="store_true", help="do not host a control socket")
        run.add_argument("-v", "--verbose", action="store_true", help="print each step to stderr")
        run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")

    return parser


# -- audit ----------------------------------------------------------------------------------


def _audit_verify(args: argparse.Namespace, out: TextIO) -> int:
    from ._audit import Anchor, verify_audit_log

    key = args.key_file.read_bytes() if args.key_file is not None else None
    anchor = Anchor.from_json(args.anchor) if args.anchor else None
    report = verify_audit_log(args.path, key=key, anchor=anchor, allow_pruned=args.allow_pruned)
    if args.json:
        out.write(
            json.dumps(
                {
                    "ok": report.ok,
                    "lines": report.lines,
                    "first_bad_line": report.first_bad_line,
                    "kind": report.kind,
                    "torn_tail": report.torn_tail,
                    "pruned_through": report.pruned_through,
                    "message": report.message,
                }
            )
            + "\n"
        )
    else:
        out.write(f"{'OK' if report.ok else 'FAILED'}: {report.message}\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def _audit_tail(args: argparse.Namespace, out: TextIO) -> int:
    if args.n < 1:
        raise ValueError(f"-n must be >= 1 (got {args.n})")
    lines = args.path.read_text(encoding="utf-8").splitlines()[-args.n :]
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            out.write(f"(unreadable line: {line[:60]!r})\n")
            continue
        if args.json:
            out.write(json.dumps(rec["event"]) + "\n")
            continue
        ev = rec["event"]
        actor = (ev.get("actor") or {}).get("id", "-")
        out.write(
            f"#{rec['seq']:<5} {ev['timestamp']} {ev['type']:18} {ev.get('workflow_id') or '-':16} "
            f"{ev.get('state') or '-':12} {actor:10} {ev.get('reason') or ''}\n"
        )
    return EXIT_OK


def _timeline(args: argparse.Namespace, out: TextIO) -> int:
    from ._exceptions import AuditTampered
    from ._replay import replay_audit
    from ._timeline import render_timeline_svg, select_workflow

    path = args.path
    if not path.is_file():
        sys.stderr.write(f"termsafe: error: no audit trail at {str(path)!r}\n")
        return EXIT_USAGE
    key = args.key_file.read_bytes() if args.key_file is not None else None
    try:
        replay = replay_audit(path, key=key)
    except AuditTampered as exc:
        sys.stderr.write(
            f"termsafe: {str(path)!r} does not verify, no timeline drawn: {exc.report.message}\n"
        )
        return EXIT_FAILED
    ids = list(replay.workflows)
    shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
    has = f"it has: {shown}" if ids else "it has no workflow events"
    wid = args.workflow
    if wid is None:
        wid = select_workflow(e for h in replay.workflows.values() for e in h.timeline)
        if wid is None:
            sys.stderr.write(
                f"termsafe: no workflow was killed in {str(path)!r}; "
                f"choose one with --workflow ({has})\n"
            )
            return EXIT_NOT_FOUND
    elif wid not in replay:
        sys.stderr.write(f"termsafe: no workflow {wid!r} in {str(path)!r} ({has})\n")
        return EXIT_NOT_FOUND
    svg = render_timeline_svg(replay[wid].timeline, wid)
    if args.output is None:
        out.write(svg)
    else:
        args.output.write_text(svg, encoding="utf-8")
        out.write(f"timeline of {wid!r} written to {str(args.output)!r}\n")
    return EXIT_OK


# -- the store ----------------------------------------------------------------------------


def _home() -> str:
    # ``_store.default_home()``, without importing the store (nor pathlib):
    # ``kill`` finds a live workflow without it (tests/test_cli.py checks the two agree).
    return os.environ.get("TERMSAFE_HOME") or ".termsafe"


_opened: list[SQLiteStore] = []


def _open_store() -> SQLiteStore | None:
    """The store under TERMSAFE_HOME, or ``None`` when there is none (never created here).

    ``main`` closes it before returning.
    """
    from ._store import SQLiteStore

    path = os.path.join(_home(), "store.sqlite3")
    if not os.path.exists(path):
        return None
    store = SQLiteStore(path)
    _opened.append(store)
    return store


def _run_dict(run: Run, alive: bool | None) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "workflow_id": run.workflow_id,
        "owner": run.owner,
        "team": run.team,
        "state": run.state,
        "pid": run.process.pid,
        "host": run.process.host,
        "alive": alive,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "info": run.info,
    }


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ps(args: argparse.Namespace, out: TextIO) -> int:
    from ._control import run_is_alive

    store = _open_store()
    runs = [] if store is None else store.runs(live_only=not args.all)
    rows = [_run_dict(r, run_is_alive(r) if r.state not in FINAL_STATES else None) for r in runs]
    if args.json:
        out.write(json.dumps(rows) + "\n")
        return EXIT_OK
    if not rows:
        out.write("no live workflows\n" if not args.all else "no runs\n")
        return EXIT_OK
    header = f"{'RUN':10} {'WORKFLOW':24} {'OWNER':10} {'TEAM':10} {'STATE':11} {'PID':>7}  STARTED"
    out.write(header + "\n")
    for row in rows:
        state = row["state"]
        if row["alive"] is False:
            state += "?"  # its process is gone: termsafe recover settles it
        owner, team = (row["owner"] or "-")[:10], (row["team"] or "-")[:10]
        out.write(
            f"{row['run_id'][:10]:10} {row['workflow_id'][:24]:24} {owner:10} {team:10} "
            f"{state:11} {row['pid']:>7}  {_when(row['started_at'])}\n"
        )
    if any(row["alive"] is False for row in rows):
        out.write("?: its process is gone; run `termsafe recover`\n")
    return EXIT_OK


def _find(store: SQLiteStore, ident: str, *, live_only: bool = False) -> list[Run]:
    """Runs with this run id, else with this workflow id (newest last).

    ``live_only``: only runs not yet in a final state (the store keeps every
    run that ended until ``prune --runs`` removes it; reading them all would make
    a kill as slow as the history is long).
    """
    run = store.run_get(ident)
    if run is not None:
        return [run] if not live_only or run.state not in FINAL_STATES else []
    return [r for r in store.runs(live_only=live_only) if r.workflow_id == ident]


class _Lookup(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _live_socket(ident: str) -> tuple[str, Run]:
    store = _open_store()
    if store is None:
        path = os.path.join(_home(), "store.sqlite3")
        raise _Lookup(EXIT_NOT_FOUND, f"no store at {path}: nothing runs")
    live = _find(store, ident, live_only=True)
    if not live:
        runs = _find(store, ident)
        if runs:
            last = runs[-1]
            raise _Lookup(
                EXIT_NOT_FOUND,
                f"workflow {ident!r} is not running (its last run {last.run_id} is {last.state})",
            )
        raise _Lookup(EXIT_NOT_FOUND, f"no workflow or run with id {ident!r}")
    if len(live) > 1:
        ids = ", ".join(r.run_id for r in live)
        raise _Lookup(EXIT_USAGE, f"{len(live)} live runs of {ident!r} ({ids}): give a run id")
    run = live[0]
    sock = run.info.get("socket")
    if not isinstance(sock, str):
        raise _Lookup(
            EXIT_NOT_FOUND,
            f"run {run.run_id} of {ident!r} has no control socket (its host did not serve one)",
        )
    return sock, run


def _status(args: argparse.Namespace, out: TextIO) -> int:
    import shlex

    from ._client import ControlClient
    from ._control import run_is_alive
    from ._exceptions import ControlError

    record: dict[str, Any] = {}
    sock = args.socket
    wid = args.id
    if sock is None:
        store = _open_store()
        runs = [] if store is None else _find(store, args.id)
        if not runs:
            sys.stderr.write(f"termsafe: no workflow or run with id {args.id!r}\n")
            return EXIT_NOT_FOUND
        live = [r for r in runs if r.state not in FINAL_STATES]
        run = live[-1] if live else runs[-1]
        alive = run_is_alive(run) if run.state not in FINAL_STATES else None
        record = _run_dict(run, alive)
        wid = run.workflow_id
        sock = run.info.get("socket") if alive else None
    if isinstance(sock, str):
        try:
            with ControlClient(sock, timeout=2.0) as client:
                live_status = client.status(wid)
        except ControlError as exc:
            if args.socket is not None:
                sys.stderr.write(f"termsafe: {exc}\n")
                return EXIT_NOT_FOUND
            record["live"] = None
            record["unreachable"] = str(exc)
        else:
            if live_status is None and args.socket is not None:
                sys.stderr.write(f"termsafe: {sock} has no workflow {wid!r}\n")
                return EXIT_NOT_FOUND
            record["live"] = live_status
    if args.json:
        out.write(json.dumps(record) + "\n")
        return EXIT_OK
    live_part = record.pop("live", None) or {}
    info = record.pop("info", {})
    for key, value in record.items():
        shown = _when(value) if key in ("started_at", "ended_at") else value
        out.write(f"{key:14} {'-' if shown is None else shown}\n")
    for key in ("phase", "kill_reason", "sections", "pending_hooks", "deferred"):
        if key in live_part:
            out.write(f"{key:14} {live_part[key]}\n")
    if info.get("depends_on"):
        out.write(f"{'depends_on':14} {', '.join(info['depends_on'])}\n")
    if info.get("argv"):
        out.write(f"{'command':14} {shlex.join(info['argv'])}\n")
    return EXIT_OK


def _kill(args: argparse.Namespace, out: TextIO) -> int:
    from ._client import CONTROL_DIR, ControlClient, find_host
    from ._exceptions import ControlError

    if not args.reason.strip():
        raise ValueError("--reason must not be empty (got '')")
    sock = args.socket
    wid = args.id
    client = None
    if sock is None:
        # The hosts first: each knows its live workflows, so the common case
        # reads no store. Whatever they cannot settle, the store does.
        found = find_host(
            os.path.join(_home(), CONTROL_DIR),
            args.id,
            timeout=min(args.timeout, SCAN_TIMEOUT),
            client_timeout=args.timeout,
        )
        if found is not None:
            client, status = found
            sock = client.path
            wid = str(status.get("workflow_id") or wid)
        else:
            try:
                sock, run = _live_socket(args.id)
            except _Lookup as exc:
                sys.stderr.write(f"termsafe: {exc}\n")
                return exc.code
            wid = run.workflow_id
    try:
        with client if client is not None else ControlClient(sock, timeout=args.timeout) as c:
            answer = c._kill(wid, args.reason, args.force)
    except ControlError as exc:
        sys.stderr.write(
            f"termsafe: cannot reach the host of {wid!r}: {exc} "
            "(if its process died, run `termsafe recover`)\n"
        )
        return EXIT_NOT_FOUND
    if args.json:
        out.write(json.dumps(answer) + "\n")
    elif answer["accepted"]:
        extra = " (deferred: it lands when the critical section ends)" * (
            answer["decision"] == "deferred"
        )
        out.write(f"kill of {wid!r} accepted{extra}; it proceeds in the background\n")
    else:
        who = answer["principal"].get("id", "?")
        out.write(f"kill of {wid!r} refused: {answer['reason']} (you are {who!r})\n")
    if answer["accepted"]:
        return EXIT_OK
    return EXIT_NOT_FOUND if answer["reason"] == "Workflow not found" else EXIT_REFUSED


def _recover(args: argparse.Namespace, out: TextIO) -> int:
    import filelock

    from ._audit import JsonlSink
    from ._recovery import recover

    store = _open_store()
    if store is None:
        from ._recovery import RecoverReport

        report = RecoverReport()
    else:
        sink = JsonlSink(store.path.parent / "audit.jsonl", fsync="batch")
        try:
            report = recover(store, sink=sink, kill_timeout=args.kill_timeout)
        except filelock.Timeout as exc:
            sys.stderr.write(f"termsafe: another recovery holds {exc.lock_file}; try again\n")
            return EXIT_FAILED
        finally:
            sink.close()
    if args.json:
        out.write(json.dumps(report.as_dict()) + "\n")
    else:
        out.write(f"{report}\n")
    return EXIT_OK if report.clean else EXIT_FAILED


def _prune(args: argparse.Namespace, out: TextIO) -> int:
    from ._audit import AuditTrailError
    from ._retention import RetentionPolicy, apply_retention

    kinds = ("audit", "checkpoints", "idempotency", "runs")
    if all(getattr(args, kind) is None for kind in kinds):
        raise ValueError("give at least one of --audit, --checkpoints, --idempotency, --runs")
    store = _open_store()
    store_path = os.path.join(_home(), "store.sqlite3")
    no_store = [k for k in kinds[1:] if getattr(args, k) is not None and store is None]
    trail = args.audit_path
    if trail is None:
        default = os.path.join(_home(), "audit.jsonl")
        # The prune's record goes to an existing trail; none is made for it.
        trail = default if args.audit is not None or os.path.exists(default) else None
    policy = RetentionPolicy(**{k: None if k in no_store else getattr(args, k) for k in kinds})
    try:
        report = apply_retention(
            policy,
            store=store,
            audit_path=trail,
            audit_key=args.key_file.read_bytes() if args.key_file is not None else None,
            dry_run=args.dry_run,
            max_bytes=args.max_bytes if trail is not None else None,
        )
    except AuditTrailError as exc:
        sys.stderr.write(f"termsafe: {exc}\n")
        return EXIT_FAILED
    if args.json:
        out.write(json.dumps(report.as_dict()) + "\n")
        return EXIT_OK
    for kind, line in zip(kinds, report.lines(), strict=True):
        out.write(f"{kind}: no store at {store_path}\n" if kind in no_store else line + "\n")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from ._supervisor import Supervisor
    from ._terminator import Phases

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("no command given: termsafe run [options] -- CMD [ARG ...]")
    cleanups = [shlex.split(c) for c in args.cleanup]
    for c, argv in zip(args.cleanup, cleanups, strict=True):
        if not argv:
            raise ValueError(f"--cleanup needs a command (got {c!r})")
    sup = Supervisor(
        cmd,
        workflow_id=args.workflow_id,
        owner=args.owner,
        team=args.team,
        depends_on=args.depends_on,
        cascade=not args.no_cascade,
        phases=Phases(args.graceful, args.forced),
        control=not args.no_control,
        verbose=args.verbose,
    )

    def job(argv: list[str]) -> Any:
        def run_cleanup(result: RunResult) -> None:
            env = {
                **os.environ,
                "TERMSAFE_RUN_ID": result.run_id,
                "TERMSAFE_WORKFLOW_ID": result.workflow_id,
                "TERMSAFE_RUN_STATE": result.state,
                "TERMSAFE_EXIT_CODE": str(result.exit_code),
            }
            done = subprocess.run(argv, env=env, check=False, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"cleanup {shlex.join(argv)!r} exited {done.returncode}")

        return run_cleanup

    for argv in cleanups:
        sup.add_cleanup_job(job(argv))
    return sup.run()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:  # noqa: RET503
    """Run the ``termsafe`` command; return its exit code.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).
        out: Where to print (default ``sys.stdout``).

    Returns:
        The exit code (see the module docstring).
    """
    from ._exceptions import TermsafeError

    stream = out if out is not None else sys.stdout
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(args_list[0] if args_list and args_list[0] in COMMANDS else None)
    args = parser.parse_args(args_list)
    try:
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(stream, keep=args.keep)
        if args.command == "audit" and args.audit_command == "verify":
            return _audit_verify(args, stream)
        if args.command == "audit" and args.audit_command == "tail":
            return _audit_tail(args, stream)
        if args.command == "ps":
            return _ps(args, stream)
        if args.command == "status":
            return _status(args, stream)
        if args.command == "kill":
            return _kill(args, stream)
        if args.command == "recover":
            return _recover(args, stream)
        if args.command == "timeline":
            return _timeline(args, stream)
        if args.command == "prune":
            return _prune(args, stream)
        if args.command == "run":
            return _run(args)
    except (OSError, ValueError, TermsafeError) as exc:
        sys.stderr.write(f"termsafe: error: {exc}\n")
        return EXIT_USAGE
    finally:
        while _opened:
            _opened.pop().close()
    parser.error(f"unknown command {args.command!r}")  # exits with EXIT_USAGE
