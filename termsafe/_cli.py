"""The ``termsafe`` command.

Exit codes: 0 success; 1 a check failed (the demo's verdict, a trail that does
not verify); 2 bad usage or input (argparse's convention), with a message that
names the bad value.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="termsafe",
        description="Safe termination of workflows: demo, audit-trail tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a workflow, kill it inside a critical section")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")

    audit = sub.add_parser("audit", help="inspect a JSONL audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_sub.add_parser("verify", help="verify a trail's hash chain")
    verify.add_argument("path", type=Path)
    verify.add_argument("--key-file", type=Path, help="file holding the HMAC key (raw bytes)")
    verify.add_argument("--anchor", help="head anchor as JSON (from JsonlSink.anchor())")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    tail = audit_sub.add_parser("tail", help="print the last events of a trail")
    tail.add_argument("path", type=Path)
    tail.add_argument("-n", type=int, default=20, help="how many events (default 20)")
    tail.add_argument("--json", action="store_true", help="print events as JSON lines")
    return parser


def _audit_verify(args: argparse.Namespace, out: TextIO) -> int:
    from ._audit import Anchor, verify_audit_log

    key = args.key_file.read_bytes() if args.key_file is not None else None
    anchor = Anchor.from_json(args.anchor) if args.anchor else None
    report = verify_audit_log(args.path, key=key, anchor=anchor)
    if args.json:
        out.write(
            json.dumps(
                {
                    "ok": report.ok,
                    "lines": report.lines,
                    "first_bad_line": report.first_bad_line,
                    "kind": report.kind,
                    "torn_tail": report.torn_tail,
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


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:  # noqa: RET503
    """Run the ``termsafe`` command; return its exit code.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).
        out: Where to print (default ``sys.stdout``).

    Returns:
        The exit code (see the module docstring).
    """
    stream = out if out is not None else sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(stream, keep=args.keep)
        if args.command == "audit" and args.audit_command == "verify":
            return _audit_verify(args, stream)
        if args.command == "audit" and args.audit_command == "tail":
            return _audit_tail(args, stream)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"termsafe: error: {exc}\n")
        return EXIT_USAGE
    parser.error(f"unknown command {args.command!r}")  # exits with EXIT_USAGE
