"""Tests for importing termsafe: no side effects, a sorted, honest ``__all__``, and
what ``import termsafe`` and the ``termsafe kill`` command leave unimported."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT, Jobs, TermFactory

import termsafe

ROOT = Path(__file__).parents[1]

#: Imported by neither ``import termsafe`` nor ``termsafe kill``: each costs the
#: command line milliseconds (attrs alone more than the rest of a kill).
HEAVY = frozenset(
    {
        "anyio",
        "asyncio",
        "attr",
        "attrs",
        "filelock",
        "logging",
        "psutil",
        "sqlite3",
        "subprocess",
        "termsafe._control",
        "termsafe._permissions",
        "termsafe._procs",
        "termsafe._store",
        "termsafe._terminator",
        "typing",
        "uuid",
    }
)

PROBE = r"""
import json
import os
import signal
import sys
import threading


def handlers():
    return {s.name: repr(signal.getsignal(s)) for s in signal.valid_signals()
            if isinstance(s, signal.Signals) and s not in (signal.SIGKILL, signal.SIGSTOP)}


def fds():
    return sorted(os.listdir("/proc/self/fd"))


before = {"threads": [t.name for t in threading.enumerate()], "handlers": handlers(), "fds": fds()}
import termsafe  # noqa: E402

after = {"threads": [t.name for t in threading.enumerate()], "handlers": handlers(), "fds": fds()}
print(json.dumps({"before": before, "after": after, "files": sorted(os.listdir("."))}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a fresh interpreter looks like before and after ``import termsafe``."""
    cwd = tmp_path_factory.mktemp("import")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMSAFE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
class TestNoSideEffects:
    def test_no_thread(self, probe: dict[str, Any]) -> None:
        """Importing termsafe starts no thread."""
        assert probe["before"]["threads"] == probe["after"]["threads"]

    def test_no_signal_handler(self, probe: dict[str, Any]) -> None:
        """Importing termsafe installs no signal handler."""
        assert probe["before"]["handlers"] == probe["after"]["handlers"]

    def test_no_open_file(self, probe: dict[str, Any]) -> None:
        """Importing termsafe leaves no file descriptor open."""
        assert probe["before"]["fds"] == probe["after"]["fds"]

    def test_no_file_created(self, probe: dict[str, Any]) -> None:
        """Importing termsafe creates nothing in the working directory (no .termsafe)."""
        assert [] == probe["files"]


class TestAll:
    def test_sorted(self) -> None:
        """``termsafe.__all__`` is kept in plain ``sorted()`` order."""
        assert sorted(termsafe.__all__) == termsafe.__all__

    def test_no_duplicates(self) -> None:
        """Every name appears once in ``__all__``."""
        assert len(set(termsafe.__all__)) == len(termsafe.__all__)

    def test_names_exist(self) -> None:
        """Every name in ``__all__`` is an attribute of termsafe."""
        assert [] == [name for name in termsafe.__all__ if not hasattr(termsafe, name)]

    def test_public_module(self) -> None:
        """Exported classes and functions say they live in ``termsafe``, not a private module."""
        wrong = {}
        for name in termsafe.__all__:
            obj = getattr(termsafe, name)
            if isinstance(obj, (type, types.FunctionType)) and obj.__module__ != "termsafe":
                wrong[name] = obj.__module__
        assert {} == wrong

    def test_every_public_name_exported(self) -> None:
        """Every public, non-module attribute of termsafe is listed in ``__all__``."""
        public = {
            name
            for name, value in vars(termsafe).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        assert set() == public - set(termsafe.__all__)

    def test_version(self) -> None:
        """termsafe has a version string."""
        assert isinstance(termsafe.__version__, str)


MODULES = r"""
import sys

before = set(sys.modules)
import termsafe  # noqa: E402

print(sorted(set(sys.modules) - before))
"""

# Runs ``python -m termsafe ARGS`` as runpy does for ``-m``, then reports the
# modules it loaded on stderr's last line.
COMMAND = r"""
import runpy
import sys

before = set(sys.modules)
sys.argv = ["termsafe", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("termsafe", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
sys.stderr.write(f"\n{code!r} {sorted(set(sys.modules) - before)!r}\n")
"""


def _run(code: str, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMSAFE")}
    env["PYTHONPATH"] = str(ROOT)
    if home is not None:
        env["TERMSAFE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _command(*args: str, home: Path | None = None) -> tuple[object, set[str], str]:
    """The exit code of ``python -m termsafe ARGS``, the modules it loaded, its output."""
    done = _run(COMMAND, *args, home=home)
    *rest, last = done.stderr.rstrip("\n").split("\n")
    code, _, modules = last.partition(" ")
    return ast.literal_eval(code), set(ast.literal_eval(modules)), done.stdout + "\n".join(rest)


class TestWhatIsImported:
    def test_import_termsafe_loads_only_the_errors(self) -> None:
        """``import termsafe`` loads the package and its errors, and nothing heavy."""
        done = _run(MODULES)
        assert 0 == done.returncode, done.stderr
        loaded = set(ast.literal_eval(done.stdout))
        assert {"termsafe", "termsafe._exceptions"} == {m for m in loaded if "termsafe" in m}
        assert set() == loaded & HEAVY

    def test_a_public_name_loads_its_module_on_first_use(self) -> None:
        """``termsafe.X`` imports X's private module when it is first asked for."""
        done = _run(
            "import sys, termsafe\n"
            "before = 'termsafe._store' in sys.modules\n"
            "store = termsafe.SQLiteStore\n"
            "print(before, 'termsafe._store' in sys.modules, store.__module__)"
        )
        assert "False True termsafe" == done.stdout.strip(), done.stderr

    def test_kill_help_loads_nothing_heavy(self) -> None:
        """``termsafe kill --help`` loads the command line alone."""
        code, loaded, out = _command("kill", "--help")
        assert 0 == code, out
        assert "--reason REASON" in out
        assert {"termsafe", "termsafe._cli", "termsafe._exceptions"} == {
            m for m in loaded if "termsafe" in m
        }
        assert set() == loaded & HEAVY

    def test_kill_of_a_live_workflow_loads_no_store_and_no_attrs(
        self, hosted_home: tuple[Path, threading.Event]
    ) -> None:
        """``termsafe kill ID`` of a live workflow asks its host and loads nothing heavy."""
        home, done = hosted_home
        code, loaded, out = _command("kill", "w1", "--reason", "imports", home=home)
        assert 0 == code, out
        assert "kill of 'w1' accepted" in out
        assert done.wait(WAIT)
        assert set() == loaded & HEAVY


@pytest.fixture
def hosted_home(make_term: TermFactory, jobs: Jobs) -> Iterator[tuple[Path, threading.Event]]:
    """A TERMSAFE_HOME whose control socket serves a live workflow ``w1`` (and an
    event set when it ended)."""
    home = Path(tempfile.mkdtemp(prefix="ts-imp-", dir="/tmp"))
    store = termsafe.SQLiteStore(home / "store.sqlite3")
    term = make_term(store=store)
    ready, ended = threading.Event(), threading.Event()

    def body() -> None:
        try:
            with term.workflow("w1"):
                ready.set()
                while True:
                    termsafe.sleep(30)
        finally:
            ended.set()

    try:
        with termsafe.serve_control(term, store=store) as server:
            job = jobs.start(body, name="wf-w1")
            assert ready.wait(WAIT)
            assert server.flush(WAIT)
            yield home, ended
            term.terminate_all("test over")
            job.result()
    finally:
        store.close()
        shutil.rmtree(home, ignore_errors=True)
