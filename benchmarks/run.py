"""Run the termsafe benchmarks and print every figure beside its target.

Usage, from the repository root (with termsafe importable: installed, or on
``PYTHONPATH``)::

    python benchmarks/run.py [--quick] [--json PATH] [--only TEXT]

Every ``benchmarks/bench_*.py`` module defines ``collect(quick: bool) ->
list[dict]``, one row per target with the keys ``name``, ``value`` (float),
``target`` (such as ``"<= 2.0"``), ``unit`` and ``passed`` (bool); an optional
``detail`` string carries the baseline and spread. Each module runs in a fresh
interpreter, so threads, garbage and allocator state left by one cannot skew
the next, and a crash in one still lets the others report.

Exit status: 0 when every row met its target, 1 when a row missed it, 2 when
a module failed to produce valid rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "value": (int, float),
    "target": str,
    "unit": str,
    "passed": bool,
}

Row = dict[str, Any]


def discover(only: str | None) -> list[Path]:
    """The benchmark modules, sorted by name, optionally filtered by a substring."""
    paths = sorted(HERE.glob("bench_*.py"))
    if only:
        paths = [p for p in paths if only in p.stem]
    return paths


def validate(rows: object, origin: str) -> list[Row]:
    """Check what ``collect`` returned.

    Raises:
        TypeError: ``rows`` is not a list of rows with the required keys and types.
    """
    if not isinstance(rows, list):
        raise TypeError(f"{origin}: collect() must return a list (got {type(rows).__name__})")
    for row in rows:
        if not isinstance(row, dict):
            raise TypeError(f"{origin}: each row must be a dict (got {row!r})")
        for key, kind in REQUIRED.items():
            if key not in row:
                raise TypeError(f"{origin}: row {row.get('name')!r} has no {key!r}")
            value = row[key]
            if not isinstance(value, kind) or (key == "value" and isinstance(value, bool)):
                raise TypeError(f"{origin}: row {row.get('name')!r} has a bad {key} {value!r}")
    return rows


# -- child: run one module -------------------------------------------------------------


def run_child(module_path: Path, quick: bool, rows_out: Path) -> int:
    """Import one benchmark module, call its ``collect`` and write its rows as JSON."""
    name = module_path.stem
    spec = importlib.util.spec_from_file_location(name, module_path)
    if spec is None or spec.loader is None:
        print(f"cannot load {module_path}", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    rows = validate(module.collect(quick), name)
    for row in rows:
        row["value"] = float(row["value"])
        row.setdefault("module", name)
    rows_out.write_text(json.dumps(rows, indent=2, allow_nan=True), encoding="utf-8")
    return 0


# -- parent: run them all and report -------------------------------------------------------


def run_module(path: Path, quick: bool, timeout: float) -> tuple[list[Row], str | None]:
    """Run one module in a fresh interpreter; return its rows, or an error message."""
    with tempfile.TemporaryDirectory(prefix="termsafe-bench-") as tmp:
        rows_out = Path(tmp) / "rows.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(path),
            "--rows-out",
            str(rows_out),
        ]
        if quick:
            argv.append("--quick")
        try:
            proc = subprocess.run(argv, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return [], f"timed out after {timeout:g} s"
        if proc.returncode != 0:
            return [], f"exited with status {proc.returncode}"
        try:
            rows = validate(json.loads(rows_out.read_text(encoding="utf-8")), path.stem)
        except (OSError, ValueError, TypeError) as exc:
            return [], f"produced no valid rows: {exc}"
    return rows, None


def error_row(module: str, message: str) -> Row:
    return {
        "name": f"{module}: {message}",
        "value": math.nan,
        "target": "runs",
        "unit": "",
        "passed": False,
        "module": module,
        "detail": "see the output above",
    }


def fmt_value(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}"


def print_table(rows: Sequence[Row]) -> None:
    headers = ("benchmark", "value", "unit", "target", "result")
    table = [
        (
            f"{row['module']}: {row['name']}",
            fmt_value(row["value"]),
            row["unit"],
            row["target"],
            "ok" if row["passed"] else "MISSED",
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]
    aligns = ("<", ">", "<", "<", "<")

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True)
        ).rstrip()

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row, cells in zip(rows, table, strict=True):
        print(line(cells))
        if row.get("detail"):
            print(f"    {row['detail']}")


def describe_environment(quick: bool) -> str:
    try:
        load = "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load unknown"
    spec = importlib.util.find_spec("termsafe")
    origin = spec.origin if spec is not None else "NOT IMPORTABLE"
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {load}; "
        f"{'quick' if quick else 'full'} run; termsafe from {origin}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a fast, rougher run")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the rows to PATH")
    parser.add_argument("--only", metavar="TEXT", help="run only modules whose name contains TEXT")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds one module may run (default: %(default)s)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        return run_child(args.child, args.quick, args.rows_out)

    if importlib.util.find_spec("termsafe") is None:
        print(
            "termsafe is not importable: run `pip install -e .` or set PYTHONPATH to the "
            "repository root",
            file=sys.stderr,
        )
        return 2
    paths = discover(args.only)
    if not paths:
        print(f"no benchmark module matches {args.only!r} in {HERE}", file=sys.stderr)
        return 2

    print(describe_environment(args.quick), flush=True)
    started = time.perf_counter()
    rows: list[Row] = []
    broken = False
    for path in paths:
        print(f"== {path.stem}", flush=True)
        t0 = time.perf_counter()
        module_rows, error = run_module(path, args.quick, args.timeout)
        if error is not None:
            broken = True
            print(f"!! {path.stem} {error}", flush=True)
            module_rows = [error_row(path.stem, error)]
        print(f"== {path.stem} done in {time.perf_counter() - t0:.1f} s", flush=True)
        rows.extend(module_rows)

    print()
    print_table(rows)
    missed = [row for row in rows if not row["passed"]]
    print()
    print(
        f"{len(rows) - len(missed)}/{len(rows)} targets met in "
        f"{time.perf_counter() - started:.1f} s"
    )
    if args.json is not None:
        # Strict JSON has no NaN: a module that produced no figure gets null.
        plain = [
            {**row, "value": row["value"] if math.isfinite(row["value"]) else None} for row in rows
        ]
        args.json.write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
        print(f"rows written to {args.json}")
    if broken:
        return 2
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
