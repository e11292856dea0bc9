"""Tests of atomic_file and atomic_directory: real files, real fsync, real SIGKILLs.

The kill tests start one worker (this file run as a script) that imports
termsafe once and forks a child per trial; the child writes, the worker
SIGKILLs it after a seeded random delay spanning the whole operation, reaps
it and judges the target with tools nobody here wrote (byte comparison,
``zipfile.testzip``, ``tarfile``), then the test checks every verdict.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import pickle
import random
import re
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT, Jobs, TermFactory
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import termsafe
from termsafe import (
    AtomicWriteError,
    ConfigurationError,
    InvalidArgumentType,
    MemorySink,
    Phases,
    Principal,
    Terminated,
    Terminator,
    _atomic,
    _store,
    atomic_directory,
    atomic_file,
    sweep_journal,
)
from termsafe._atomic import BACKUP_PREFIX, STAGE_PREFIX, TEMP_PREFIX
from termsafe._store import JournalEntry, SQLiteStore
from termsafe._terminator import _set_default_terminator

ADMIN = Principal("root", roles=("admin",))
CHUNK = 4096
SIZE = 256 * 1024
LINUX = sys.platform.startswith("linux")
#: One trial pair (durable, not) in this many re-measures how long a write takes.
RECALIBRATE = 10


# -- content every trial writes, and how to judge what is on disk ------------------------------


def content(version: int) -> bytes:
    """256 KiB that only version ``version`` writes: a header, then a digest pattern."""
    header = f"version {version:08d}\n".encode()
    pattern = hashlib.sha256(header).digest()
    body = pattern * ((SIZE - len(header)) // len(pattern) + 1)
    return header + body[: SIZE - len(header)]


def members(version: int) -> dict[str, bytes]:
    """The members of version ``version`` of an archive (or a directory)."""
    rng = random.Random(version)
    return {
        "version.txt": str(version).encode(),
        "a.bin": rng.randbytes(96 * 1024),
        "b.bin": rng.randbytes(96 * 1024),
        "c.bin": rng.randbytes(64 * 1024),
    }


def judge_file(path: str) -> int:
    """The version a file holds; AssertionError if it is a mix or torn."""
    data = Path(path).read_bytes()
    version = int(data[8:16])
    assert content(version) == data, f"torn file: {len(data)} bytes, header {data[:16]!r}"
    return version


def judge_zip(path: str) -> int:
    """The version a zip archive holds, checked by ``zipfile`` itself."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
        assert bad is None, f"zip member {bad!r} fails its CRC"
        version = int(archive.read("version.txt"))
        found = {name: archive.read(name) for name in archive.namelist()}
    assert members(version) == found, "zip members are not one version's"
    return version


def judge_tar(path: str) -> int:
    """The version a tar archive holds, read back by ``tarfile``."""
    with tarfile.open(path) as archive:
        found = {}
        for member in archive.getmembers():
            extracted = archive.extractfile(member)
            assert extracted is not None
            found[member.name] = extracted.read()
    version = int(found["version.txt"])
    assert members(version) == found, "tar members are not one version's"
    return version


def judge_dir(path: str) -> int:
    """The version a directory holds; nothing of ours may be left beside it."""
    found = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    version = int(found["version.txt"])
    assert members(version) == found, f"directory is not one version's: {sorted(found)}"
    beside = sorted(os.listdir(os.path.dirname(path)))
    assert [os.path.basename(path)] == beside, f"left beside the directory: {beside}"
    return version


def write_file(target: str, version: int, durable: bool, store: Any) -> None:
    data = content(version)
    with atomic_file(target, "wb", durable=durable, store=store) as f:
        for i in range(0, len(data), CHUNK):
            f.write(data[i : i + CHUNK])


def write_zip(target: str, version: int, durable: bool, store: Any) -> None:
    with (
        atomic_file(target, "wb", durable=durable, store=store) as f,
        zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        for name, data in members(version).items():
            archive.writestr(name, data)


def write_tar(target: str, version: int, durable: bool, store: Any) -> None:
    with (
        atomic_file(target, "wb", durable=durable, store=store) as f,
        tarfile.open(fileobj=f, mode="w") as archive,
    ):
        for name, data in members(version).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def write_dir(target: str, version: int, durable: bool, store: Any) -> None:
    with atomic_directory(target, durable=durable, store=store) as staging:
        for name, data in members(version).items():
            (staging / name).write_bytes(data)


WRITERS: dict[str, Callable[[str, int, bool, Any], None]] = {
    "file": write_file,
    "zip": write_zip,
    "tar": write_tar,
    "dir": write_dir,
}
JUDGES: dict[str, Callable[[str], int]] = {
    "file": judge_file,
    "zip": judge_zip,
    "tar": judge_tar,
    "dir": judge_dir,
}


def write_version_zero(kind: str, target: str) -> None:
    """The old content, written without termsafe."""
    if kind == "file":
        Path(target).write_bytes(content(0))
        return
    if kind == "dir":
        os.mkdir(target)
        for name, data in members(0).items():
            Path(target, name).write_bytes(data)
        return
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as archive:
            for name, data in members(0).items():
                archive.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w") as archive:
            for name, data in members(0).items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    Path(target).write_bytes(buf.getvalue())


# -- the kill worker (this file run as a script) -----------------------------------------------


def worker(spec: dict[str, Any]) -> None:
    """Fork a writer per trial, SIGKILL it at a seeded random moment, judge, report.

    Prints one JSON line per trial. Runs in a process that has started no
    thread (termsafe starts none at import), so forking is safe.
    """
    import termsafe._atomic as atomic_module

    if not spec["renameat2"]:
        atomic_module._use_renameat2 = False
    kind, target = spec["kind"], spec["target"]
    store = SQLiteStore(spec["store"])  # migrated once here; each child opens its own connection
    rng = random.Random(spec["seed"])
    write, judge = WRITERS[kind], JUDGES[kind]
    # Per durability (an fsync makes a write several times longer), the
    # durations of the latest uninterrupted runs. A write takes ~20 ms, so a
    # load burst of a fraction of a second can cover every early calibration
    # run: a pair in every RECALIBRATE trials keeps the kill window current.
    durations: dict[bool, collections.deque[float]] = {
        True: collections.deque(maxlen=5),
        False: collections.deque(maxlen=5),
    }
    high = {True: 0.0, False: 0.0}
    # Kills go on past ``trials`` (up to ``max_kills``) until ``need`` is met:
    # a window that is still off then costs a few more trials, not a verdict.
    landed = {"midway": 0, "old": 0, "new": 0}
    kills = 0
    trial = -1
    while kills < spec["max_kills"]:
        if kills >= spec["trials"] and all(landed[k] >= n for k, n in spec["need"].items()):
            break
        trial += 1
        version = trial + 1
        durable = trial % 2 == 0
        calibrating = trial < spec["calibrate"] or trial % RECALIBRATE < 2
        r, w = os.pipe()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(r)
            code = 0
            try:
                write(target, version, durable, store)
                os.write(w, b"k")
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        # The pipe becomes readable when the writer is done (or dies): the
        # delay is the kill point, not a wait for something to happen.
        delay = None if calibrating else rng.uniform(0.0, high[durable])
        ready, _, _ = select.select([r], [], [], delay)
        finished = bool(ready) and os.read(r, 1) == b"k"
        elapsed = time.monotonic() - started
        os.kill(pid, signal.SIGKILL)  # a writer that already exited is a zombie: harmless
        _, status = os.waitpid(pid, 0)
        os.close(r)
        if calibrating:
            durations[durable].append(elapsed)
            # Kill anywhere from the fork to a little past a typical run (the
            # median: the first run is slow, it warms the caches up).
            high[durable] = 1.25 * statistics.median(durations[durable])
        else:
            kills += 1
        if spec["sweep_each"]:
            sweep_journal(store)
        problem = None
        found = None
        try:
            found = judge(target)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        crashed = os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0
        if not calibrating and not finished:
            landed["midway"] += 1
            landed["new" if found == version else "old"] += 1
        print(
            json.dumps(
                {
                    "trial": trial,
                    "version": version,
                    "calibrating": calibrating,
                    "delay": delay,
                    "finished": finished,
                    "crashed": crashed,
                    "found": found,
                    "problem": problem,
                }
            ),
            flush=True,
        )
    store.close()


def run_worker(spec: dict[str, Any], timeout: float = 150.0) -> list[dict[str, Any]]:
    """Run the worker in its own session; return its reports (kill it all on a timeout)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=os.path.dirname(spec["store"]),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(
            f"kill worker timed out after {timeout}s (seed {spec['seed']})"
        ) from None
    assert 0 == proc.returncode, f"worker failed (seed {spec['seed']}):\n{err}"
    return [json.loads(line) for line in out.splitlines()]


def check_trials(reports: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, int]:
    """Every trial left the old version or the new.

    Returns:
        How many kill trials ended how: the writer had ``finished`` before the
        kill, or died mid-way leaving the ``old`` or the ``new`` version.
    """
    seed = spec["seed"]
    kills = sum(1 for report in reports if not report["calibrating"])
    assert spec["trials"] <= kills <= spec["max_kills"], f"seed {seed}: {kills} kills"
    previous = 0
    outcomes = {"finished": 0, "old": 0, "new": 0}
    for report in reports:
        where = f"seed {seed}, {spec['kind']} trial {report['trial']}: {report}"
        assert report["problem"] is None, where
        assert not report["crashed"], where
        assert report["found"] in (previous, report["version"]), where
        if report["finished"]:
            assert report["version"] == report["found"], where
        if not report["calibrating"]:
            if report["finished"]:
                outcomes["finished"] += 1
            else:
                outcomes["new" if report["found"] == report["version"] else "old"] += 1
        previous = report["found"]
    return outcomes


def kill_spec(
    tmp_path: Path, kind: str, trials: int, need: dict[str, int], **extra: Any
) -> dict[str, Any]:
    """The worker's orders: ``trials`` kills at least, more until ``need`` is met.

    ``need`` counts kill trials that landed before the writer finished
    (``midway``), and among them those that left the ``old`` or the ``new``
    version; the worker stops at three times ``trials`` whatever it has.
    """
    seed = int(os.environ.get("TERMSAFE_TEST_SEED") or random.randrange(2**32))
    folder = tmp_path / "out"
    folder.mkdir()
    target = str(folder / ("data" if kind == "dir" else f"data.{kind}"))
    write_version_zero(kind, target)
    spec = {
        "kind": kind,
        "target": target,
        "store": str(tmp_path / "store.sqlite3"),
        "seed": seed,
        "calibrate": 6,
        "trials": trials,
        "max_kills": 3 * trials,
        "need": need,
        "renameat2": True,
        "sweep_each": kind == "dir",
    }
    spec.update(extra)
    return spec


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the default store out of the working directory; close it afterwards."""
    monkeypatch.setenv("TERMSAFE_HOME", str(tmp_path / "home"))
    yield
    if _store._default_store is not None:
        _store._default_store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """A fresh store, closed afterwards."""
    with SQLiteStore(tmp_path / "store.sqlite3") as s:
        yield s


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty folder to write in."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def ours(folder: Path) -> list[str]:
    """Names of termsafe's temps, staging folders and backups in ``folder``."""
    return sorted(
        n for n in os.listdir(folder) if n.startswith((TEMP_PREFIX, STAGE_PREFIX, BACKUP_PREFIX))
    )


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# -- atomic_file -------------------------------------------------------------------------------


def per_write_entries(store: SQLiteStore) -> list[JournalEntry]:
    """Journal entries other than the process's standing temp-prefix entries."""
    return [e for e in store.journal_entries() if not e.payload.get("standing")]


class TestAtomicFile:
    def test_writes_a_new_file(self, folder: Path, store: SQLiteStore) -> None:
        """A new file gets the content and mode 0o666 & ~umask, and nothing is left beside it."""
        target = folder / "new.txt"
        with atomic_file(target, encoding="utf-8", store=store) as f:
            f.write("hello\n")
        assert "hello\n" == target.read_text(encoding="utf-8")
        assert 0o666 & ~current_umask() == stat.S_IMODE(target.stat().st_mode)
        assert ["new.txt"] == os.listdir(folder)
        assert [] == per_write_entries(store)

    def test_new_file_mode_follows_the_umask(self, folder: Path, store: SQLiteStore) -> None:
        """The umask in force at commit decides a new file's mode."""
        old = os.umask(0o027)
        try:
            with atomic_file(folder / "f", "wb", store=store) as f:
                f.write(b"x")
        finally:
            os.umask(old)
        assert 0o640 == stat.S_IMODE((folder / "f").stat().st_mode)

    def test_umask_probe_matches_proc(self, folder: Path) -> None:
        """The fallback umask probe (no /proc) reads the same umask and leaves no file."""
        from termsafe._atomic import _umask_from_probe, _umask_from_proc

        old = os.umask(0o037)
        try:
            assert 0o037 == _umask_from_probe(str(folder))
            if LINUX:
                assert 0o037 == _umask_from_proc()
        finally:
            os.umask(old)
        assert [] == os.listdir(folder)

    def test_replaces_and_keeps_the_mode(self, folder: Path, store: SQLiteStore) -> None:
        """Replacing a file keeps its mode bits."""
        target = folder / "conf"
        target.write_bytes(b"old")
        target.chmod(0o640)
        with atomic_file(target, "wb", store=store) as f:
            f.write(b"new")
        assert b"new" == target.read_bytes()
        assert 0o640 == stat.S_IMODE(target.stat().st_mode)

    @pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
    def test_keeps_the_owner(self, folder: Path, store: SQLiteStore) -> None:
        """Replacing a file owned by someone else keeps its owner and group."""
        target = folder / "owned"
        target.write_bytes(b"old")
        os.chown(target, 4242, 4343)
        target.chmod(0o6750)
        with atomic_file(target, "wb", store=store) as f:
            f.write(b"new")
        st = target.stat()
        assert (4242, 4343, 0o6750) == (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))

    def test_error_in_body_keeps_the_old_file(self, folder: Path, store: SQLiteStore) -> None:
        """An exception in the body propagates; the old file stands and the temp is gone."""
        target = folder / "f"
        target.write_bytes(b"old")

        def fail_half_way() -> None:
            with atomic_file(target, "wb", store=store) as f:
                f.write(b"half of the new" * 1000)
                assert 1 == len(ours(folder))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fail_half_way()
        assert b"old" == target.read_bytes()
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    def test_temp_is_journaled_while_writing(self, folder: Path, store: SQLiteStore) -> None:
        """While the body runs, this process's standing entry names the temp's folder and prefix."""
        target = folder / "f"
        with atomic_file(target, "wb", store=store) as f:
            (entry,) = store.journal_entries()
            (temp,) = ours(folder)
            assert ("temp_file", True) == (entry.kind, entry.payload["standing"])
            assert str(folder) == entry.payload["folder"]
            assert temp.startswith(entry.payload["prefix"])
            assert entry.payload["prefix"].startswith(TEMP_PREFIX)
            assert temp[len(entry.payload["prefix"]) :].startswith("f-")
            assert os.path.join(folder, temp) == f.name
        # The standing entry stays while the process lives; no per-write entry is left.
        assert [entry] == store.journal_entries()
        assert [] == per_write_entries(store)

    def test_binary_modes_and_unbuffered(self, folder: Path, store: SQLiteStore) -> None:
        """``wb`` with ``buffering=0`` writes straight through the raw file."""
        with atomic_file(folder / "f", "wb", buffering=0, store=store) as f:
            assert isinstance(f, io.FileIO)
            f.write(b"abc")
        assert b"abc" == (folder / "f").read_bytes()

    def test_text_options_pass_through(self, folder: Path, store: SQLiteStore) -> None:
        """encoding, errors and newline behave as for open()."""
        with atomic_file(
            folder / "f", encoding="latin-1", errors="replace", newline="\r\n", store=store
        ) as f:
            f.write("caf\u00e9 \u20ac\n")
        assert b"caf\xe9 ?\r\n" == (folder / "f").read_bytes()

    def test_caller_may_close_the_file(self, folder: Path, store: SQLiteStore) -> None:
        """Closing the yielded file inside the body still commits it (durably)."""
        with atomic_file(folder / "f", "wb", store=store) as f:
            f.write(b"data")
            f.close()
        assert b"data" == (folder / "f").read_bytes()

    def test_exclusive_mode_creates(self, folder: Path, store: SQLiteStore) -> None:
        """``x`` creates a file that does not exist."""
        with atomic_file(folder / "f", "x", encoding="utf-8", store=store) as f:
            f.write("first")
        assert "first" == (folder / "f").read_text(encoding="utf-8")

    def test_exclusive_mode_refuses_an_existing_file(
        self, folder: Path, store: SQLiteStore
    ) -> None:
        """``xb`` on an existing file raises FileExistsError at once and creates nothing."""
        (folder / "f").write_bytes(b"old")
        with pytest.raises(FileExistsError) as info, atomic_file(folder / "f", "xb", store=store):
            pass
        assert str(folder / "f") == info.value.filename
        assert [] == ours(folder)

    @pytest.mark.parametrize("renameat2", [True, False])
    def test_exclusive_mode_loses_a_race(
        self, folder: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, renameat2: bool
    ) -> None:
        """A file created by someone else during the body wins: FileExistsError, temp removed."""
        monkeypatch.setattr("termsafe._atomic._use_renameat2", renameat2)
        target = folder / "f"

        def race() -> None:
            with atomic_file(target, "xb", store=store) as f:
                f.write(b"mine")
                target.write_bytes(b"theirs")

        with pytest.raises(FileExistsError, match="created by someone else"):
            race()
        assert b"theirs" == target.read_bytes()
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    @pytest.mark.parametrize("mode", ["a", "ab", "r", "rb", "w+", "r+b", "wa", ""])
    def test_refuses_other_modes(self, folder: Path, mode: str) -> None:
        """Modes that are not a whole new write raise ConfigurationError naming the mode."""
        with pytest.raises(ConfigurationError, match=re.escape(repr(mode))):
            atomic_file(folder / "f", mode)
        assert [] == os.listdir(folder)

    def test_append_error_says_why(self, folder: Path) -> None:
        """The error for ``a`` explains that appending cannot be atomic in place."""
        with pytest.raises(ConfigurationError, match="appending cannot be atomic"):
            atomic_file(folder / "f", "a")

    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"path": b"/tmp/x"}, InvalidArgumentType),
            ({"path": 3}, InvalidArgumentType),
            ({"path": ""}, ConfigurationError),
            ({"mode": 1}, InvalidArgumentType),
            ({"durable": 1}, InvalidArgumentType),
            ({"durable": None}, InvalidArgumentType),
            ({"buffering": 1.5}, InvalidArgumentType),
            # Equal to the default, but not an int: the fast path must not take it.
            ({"buffering": -1.0}, InvalidArgumentType),
            ({"buffering": True}, InvalidArgumentType),
            ({"buffering": 0}, ConfigurationError),
            ({"mode": "wb", "encoding": "utf-8"}, ConfigurationError),
            ({"mode": "wb", "errors": "strict"}, ConfigurationError),
            ({"mode": "wb", "newline": ""}, ConfigurationError),
            ({"encoding": "no-such-codec"}, ConfigurationError),
            ({"encoding": "rot13"}, ConfigurationError),  # a codec, not a text encoding
            ({"errors": 5}, InvalidArgumentType),
            ({"newline": "bad"}, ConfigurationError),
            ({"newline": 5}, InvalidArgumentType),
        ],
    )
    def test_bad_arguments(
        self, folder: Path, kwargs: dict[str, Any], error: type[Exception]
    ) -> None:
        """Wrong types and values raise at the call, naming the value; nothing is written."""
        args: dict[str, Any] = {"path": folder / "f", **kwargs}
        path = args.pop("path")
        with pytest.raises(error) as info:
            atomic_file(path, **args)
        bad = next(iter(kwargs.values())) if "mode" not in kwargs else None
        if bad is not None and not isinstance(bad, bool) and bad != 0:
            assert repr(bad) in str(info.value)
        assert [] == os.listdir(folder)

    def test_directory_target(self, folder: Path, store: SQLiteStore) -> None:
        """A directory at the path raises IsADirectoryError naming it."""
        with pytest.raises(IsADirectoryError) as info, atomic_file(folder, store=store):
            pass
        assert str(folder) == info.value.filename

    # The autouse _home fixture only sets TERMSAFE_HOME, which nothing here reads.
    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        parts=st.lists(
            st.sampled_from(["", ".", "..", "a", ".b", "c.", "..d", "e..", "...", "é"]),
            min_size=1,
            max_size=6,
        ),
        rooted=st.booleans(),
    )
    def test_any_spelling_of_a_path_is_made_absolute_and_normal(
        self, parts: list[str], rooted: bool
    ) -> None:
        """atomic_file works on what os.path.abspath makes of the path, however it is spelled."""
        path = ("/" if rooted else "") + "/".join(parts)
        assume(path)
        assert f"<atomic_file {os.path.abspath(path)!r} new>" == repr(atomic_file(path, "wb"))

    def test_unnormal_spelling_writes_the_file_it_names(
        self, folder: Path, store: SQLiteStore
    ) -> None:
        """A path with "//", "." and ".." components replaces the file it resolves to."""
        (folder / "sub").mkdir()
        (folder / "f").write_bytes(b"old")
        with atomic_file(f"{folder}//sub/./../f", "wb", store=store) as f:
            assert str(folder) == os.path.dirname(f.name)
            f.write(b"new")
        assert b"new" == (folder / "f").read_bytes()
        assert ["f", "sub"] == sorted(os.listdir(folder))

    def test_entered_once(self, folder: Path, store: SQLiteStore) -> None:
        """The same atomic_file cannot be entered twice."""
        cm = atomic_file(folder / "f", "wb", store=store)
        with cm as f:
            f.write(b"x")
        with pytest.raises(ConfigurationError, match="only once"), cm:
            pass

    def test_symlink_is_written_through(self, folder: Path, store: SQLiteStore) -> None:
        """A symlink target: the file it points to is replaced, the link stays a link."""
        real_dir = folder / "real"
        real_dir.mkdir()
        real = real_dir / "settings"
        real.write_bytes(b"old")
        real.chmod(0o600)
        link = folder / "settings"
        link.symlink_to(real)
        with atomic_file(link, "wb", store=store) as f:
            assert str(real_dir) == os.path.dirname(f.name)
            f.write(b"new")
        assert link.is_symlink()
        assert b"new" == real.read_bytes()
        assert 0o600 == stat.S_IMODE(real.stat().st_mode)
        assert [] == ours(real_dir)

    def test_dangling_symlink_creates_its_target(self, folder: Path, store: SQLiteStore) -> None:
        """A link to a missing file: the file is created where the link points."""
        link = folder / "link"
        link.symlink_to(folder / "missing")
        with atomic_file(link, "wb", store=store) as f:
            f.write(b"x")
        assert link.is_symlink()
        assert b"x" == (folder / "missing").read_bytes()

    def test_exclusive_mode_refuses_a_symlink(self, folder: Path, store: SQLiteStore) -> None:
        """``x`` treats any symlink, even a dangling one, as an existing file."""
        (folder / "link").symlink_to(folder / "missing")
        with pytest.raises(FileExistsError), atomic_file(folder / "link", "x", store=store):
            pass

    def test_not_durable(self, folder: Path, store: SQLiteStore) -> None:
        """``durable=False`` still replaces atomically."""
        (folder / "f").write_bytes(b"old")
        with atomic_file(folder / "f", "wb", durable=False, store=store) as f:
            f.write(b"new")
        assert b"new" == (folder / "f").read_bytes()
        assert [] == ours(folder)

    def test_no_journal(self, folder: Path) -> None:
        """``store=False`` writes without a journal."""
        with atomic_file(folder / "f", "wb", store=False) as f:
            f.write(b"x")
        assert b"x" == (folder / "f").read_bytes()

    def test_default_store(self, folder: Path, tmp_path: Path) -> None:
        """Without ``store``, the temp is journaled in the store under TERMSAFE_HOME."""
        with atomic_file(folder / "f", "wb") as f:
            f.write(b"x")
            with SQLiteStore(tmp_path / "home" / "store.sqlite3") as home:
                assert ["temp_file"] == [e.kind for e in home.journal_entries()]

    def test_zip_through_atomic_file(self, folder: Path, store: SQLiteStore) -> None:
        """A zip archive written into the yielded file is complete and valid."""
        write_zip(str(folder / "a.zip"), 7, True, store)
        assert 7 == judge_zip(str(folder / "a.zip"))

    def test_tar_through_atomic_file(self, folder: Path, store: SQLiteStore) -> None:
        """A tar archive written into the yielded file is complete and valid."""
        write_tar(str(folder / "a.tar"), 7, True, store)
        assert 7 == judge_tar(str(folder / "a.tar"))

    def test_failed_archive_keeps_the_old_one(self, folder: Path, store: SQLiteStore) -> None:
        """An archive whose writer fails half-way leaves the old archive as it was."""
        target = str(folder / "a.zip")
        write_version_zero("zip", target)

        def fail_half_way() -> None:
            with atomic_file(target, "wb", store=store) as f, zipfile.ZipFile(f, "w") as archive:
                archive.writestr("a.bin", members(1)["a.bin"])
                raise KeyError("missing input")

        with pytest.raises(KeyError, match="missing input"):
            fail_half_way()
        assert 0 == judge_zip(target)
        assert [] == ours(folder)

    def test_concurrent_writers_leave_one_version(self, folder: Path, store: SQLiteStore) -> None:
        """Threads writing the same file at once: the file is always one whole version."""
        target = str(folder / "f")
        write_version_zero("file", target)
        errors: list[BaseException] = []

        def writer(version: int) -> None:
            try:
                write_file(target, version, False, store)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(v,)) for v in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [] == [t.name for t in threads if t.is_alive()]
        assert [] == errors
        assert judge_file(target) in range(1, 9)
        assert [] == ours(folder)


class TestAtomicFileEvents:
    def test_commit_and_rollback_are_audited(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """A workflow's trail records the commit and the rollback of its atomic writes."""
        sink = MemorySink()
        term = make_term(sink=sink, store=store)
        with term.workflow("writer"):
            with atomic_file(folder / "a", "wb") as f:
                f.write(b"x")
            with pytest.raises(ValueError, match="bad"), atomic_file(folder / "b", "wb"):
                raise ValueError("bad")
        assert term.flush(10)
        events = [(e.type, e.details.get("path")) for e in sink.events if "atomic" in e.type]
        assert [
            ("atomic_file_committed", str(folder / "a")),
            ("atomic_file_rolled_back", str(folder / "b")),
        ] == events

    def test_outside_a_workflow_only_the_rollback_is_audited(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """Outside a workflow a rollback is audited on the default trail; a commit is not."""
        sink = MemorySink()
        term = make_term(sink=sink)
        old = _set_default_terminator(term)
        try:
            with atomic_file(folder / "a", "wb", store=store) as f:
                f.write(b"x")
            with (
                pytest.raises(ValueError, match="bad"),
                atomic_file(folder / "b", "wb", store=store),
            ):
                raise ValueError("bad")
        finally:
            _set_default_terminator(old)
        assert term.flush(10)
        events = [(e.type, e.workflow_id, e.details) for e in sink.events if "atomic" in e.type]
        path = str(folder / "b")
        details = {"operation": f"atomic_file {path}", "path": path}
        assert [("atomic_file_rolled_back", None, details)] == events


class TestAtomicFileOutsideAWorkflow:
    """Outside a workflow atomic_file rolls itself back, with no hook list to do it."""

    @pytest.fixture
    def temp_unlinks(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """The temps os.unlink is asked to remove (it removes them)."""
        real = os.unlink
        calls: list[str] = []

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if os.path.basename(os.fspath(path)).startswith(TEMP_PREFIX):
                calls.append(os.fspath(path))
            real(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink)
        return calls

    def test_error_in_body_removes_the_temp_once(
        self, folder: Path, store: SQLiteStore, temp_unlinks: list[str]
    ) -> None:
        """An exception in the body removes the temp exactly once; the old file stands."""
        target = folder / "f"
        target.write_bytes(b"old")
        temps: list[str] = []

        def fail_half_way() -> None:
            with atomic_file(target, "wb", store=store) as f:
                temps.append(f.name)
                f.write(b"new")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fail_half_way()
        assert temps == temp_unlinks
        assert b"old" == target.read_bytes()
        assert [] == ours(folder)

    def test_failed_commit_removes_the_temp_once(
        self,
        folder: Path,
        store: SQLiteStore,
        temp_unlinks: list[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A rename that fails rolls back once, and the error names the path and the step."""
        target = folder / "f"
        target.write_bytes(b"old")

        def replace(src: Any, dst: Any) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        temps: list[str] = []

        def write() -> None:
            with atomic_file(target, "wb", store=store) as f:
                temps.append(f.name)
                f.write(b"new")

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(AtomicWriteError) as info:
            write()
        monkeypatch.undo()
        assert ("rename", str(target)) == (info.value.step, info.value.path)
        assert temps == temp_unlinks
        assert b"old" == target.read_bytes()
        assert [] == ours(folder)

    def test_makes_no_lock(self, folder: Path, store: SQLiteStore) -> None:
        """A write outside a workflow makes (and so takes) no lock: only its own thread touches it.

        A lock per write is about 7 us of a durable write's CPU time once the
        caches are cold (benchmarks/bench_atomic.py).
        """
        target = folder / "f"
        cm: Any = atomic_file(target, "wb", store=store)  # its internals are looked at
        with cm as f:
            f.write(b"second")
        assert None is cm._lock
        assert b"second" == target.read_bytes()


class TestAtomicFileInWorkflow:
    def test_hooks_registered_then_removed(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """Inside a workflow the rollback hook is on its stack while writing, and gone after."""
        term = make_term(store=store)
        with term.workflow("writer") as wf:
            before = wf.pending_hooks
            with atomic_file(folder / "f", "wb") as f:
                assert before + 1 == wf.pending_hooks
                assert 1 == len(store.journal_entries())
                f.write(b"x")
            assert before == wf.pending_hooks
        assert [] == per_write_entries(store)

    def test_rollback_from_another_thread_waits_for_the_rename(
        self,
        folder: Path,
        store: SQLiteStore,
        make_term: TermFactory,
        jobs: Jobs,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Inside a workflow the rollback hook, run by another thread mid-rename, waits and yields.

        The terminator may run the hook while the owner commits: the write's
        lock makes one of them win whole. Here the rename is held open until
        the hook either finished (no lock: the temp would be gone and the
        rename fail) or had half a second to try.
        """
        term = make_term(store=store)
        target = folder / "f"
        target.write_bytes(b"old")
        real_replace = os.replace
        in_rename = threading.Event()
        release = threading.Event()
        hook_done = threading.Event()

        def held_replace(src: Any, dst: Any) -> None:
            if os.path.basename(src).startswith(TEMP_PREFIX):
                in_rename.set()
                assert release.wait(WAIT)
            real_replace(src, dst)

        cm: Any = atomic_file(target, "wb")  # its rollback hook is called directly

        def rollback() -> None:
            assert in_rename.wait(WAIT)
            cm._remove_temp()  # what the terminator's sweep calls
            hook_done.set()

        def releaser() -> None:
            assert in_rename.wait(WAIT)
            hook_done.wait(0.5)
            release.set()

        monkeypatch.setattr(os, "replace", held_replace)
        hook = jobs.start(rollback)
        freer = jobs.start(releaser)
        with term.workflow("writer"), cm as f:
            f.write(b"new")
        monkeypatch.undo()
        hook.result()
        freer.result()
        assert "committed" == cm._state
        assert b"new" == target.read_bytes()
        assert [] == ours(folder)

    def test_kill_during_body_rolls_back(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """A kill landing at a checkpoint in the body removes the temp; the old file stands."""
        term = make_term(store=store)
        target = folder / "f"
        target.write_bytes(b"old")
        with term.workflow("writer") as wf, atomic_file(target, "wb") as f:
            f.write(b"new")
            term.kill("writer", by=ADMIN, reason="test")
            termsafe.checkpoint()
            pytest.fail("the kill did not land")
        assert "terminated" == wf.state
        assert b"old" == target.read_bytes()
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    def test_pending_kill_refuses_the_commit(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """A kill requested during the body (no checkpoint) stops the commit from starting."""
        term = make_term(store=store)
        target = folder / "f"
        target.write_bytes(b"old")
        raised: list[BaseException] = []
        with term.workflow("writer"):
            try:
                with atomic_file(target, "wb") as f:
                    f.write(b"new")
                    term.kill("writer", by=ADMIN, reason="test")
            except Terminated as exc:
                raised.append(exc)
                raise
        assert 1 == len(raised)
        assert b"old" == target.read_bytes()
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    def test_writer_abandoned_then_back(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A writer the terminator gave up on finds its temp gone and commits nothing.

        The system phase runs the rollback hook from the terminator's thread
        while the workflow's own thread is stuck in the body; that thread then
        writes on into the removed temp, and its exit must neither put the new
        content in place nor leave anything behind.
        """
        term = make_term(phases=Phases(0.05, 0.05), store=store, hook_timeout=WAIT)
        target = folder / "f"
        target.write_bytes(b"old")
        ready, gate = threading.Event(), threading.Event()
        temps_at_takeover: list[list[str]] = []

        def body() -> None:
            with term.workflow("writer"), atomic_file(target, "wb") as f:
                f.write(b"new")
                ready.set()
                assert gate.wait(WAIT * 2)  # not a cancellation point: the thread is stuck
                temps_at_takeover.append(ours(folder))
                f.write(b" and more")

        job = jobs.start(body, name="stuck-writer")
        assert ready.wait(WAIT)
        handle = term.kill("writer", by=ADMIN, reason="hung")
        try:
            assert termsafe.WorkflowState.KILLED == handle.wait(WAIT)
        finally:
            gate.set()
        job.result()  # its commit was refused, absorbed by the workflow
        assert [[]] == temps_at_takeover  # removed by the terminator, not by the owner
        assert b"old" == target.read_bytes()
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    def test_every_kill_point_leaves_old_or_new(self, folder: Path, store: SQLiteStore) -> None:
        """explore_kills: a kill at each cancellation point (and each grace expiry) is safe."""
        from termsafe.testing import explore_kills

        target = folder / "f"
        old, new = b"old" * 1000, b"new" * 1000

        def run(term: Terminator) -> None:
            target.write_bytes(old)
            with term.workflow("writer"), atomic_file(target, "wb") as f:
                termsafe.checkpoint()
                f.write(new[:1500])
                termsafe.checkpoint()
                f.write(new[1500:])
                termsafe.checkpoint()

        def check() -> None:
            assert target.read_bytes() in (old, new)
            assert [] == ours(folder)
            assert [] == per_write_entries(store)

        report = explore_kills(
            run,
            check,
            terminator_factory=lambda: Terminator(
                Phases(30.0, 5.0), sink=MemorySink(), hook_timeout=5.0, store=store
            ),
        )
        report.raise_on_failure()
        assert len(report.explored) >= 8


# -- storage failures --------------------------------------------------------------------------


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _is_temp_fd(fd: int) -> bool:
    return os.path.basename(_fd_path(fd)).startswith(TEMP_PREFIX)


@pytest.mark.skipif(not LINUX, reason="the fault injector finds a descriptor's path in /proc")
class TestStorageFailures:
    """ENOSPC/EIO injected into write, fsync and rename of the temp (and the folder fsync)."""

    @pytest.fixture
    def old(self, folder: Path) -> Path:
        target = folder / "f"
        target.write_bytes(content(0))
        return target

    def check_rolled_back(
        self, info: pytest.ExceptionInfo[AtomicWriteError], old: Path, store: SQLiteStore
    ) -> None:
        assert content(0) == old.read_bytes()
        assert [] == ours(old.parent)
        assert [] == per_write_entries(store)
        assert str(old) in str(info.value)
        assert info.value.step in str(info.value)
        assert not info.value.committed

    @pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
    def test_write_fails(
        self, old: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, code: int
    ) -> None:
        """A write that fails part-way raises AtomicWriteError(step='write')."""
        real = os.write
        written = [0]

        def write(fd: int, data: Any) -> int:
            if _is_temp_fd(fd):
                if written[0] >= 64 * 1024:
                    raise OSError(code, os.strerror(code))
                written[0] += len(data)
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)
        with pytest.raises(AtomicWriteError) as info:
            write_file(str(old), 1, True, store)
        monkeypatch.undo()
        assert ("write", code) == (info.value.step, info.value.errno)
        self.check_rolled_back(info, old, store)

    @pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
    def test_fsync_fails(
        self, old: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, code: int
    ) -> None:
        """A failing fsync of the temp raises AtomicWriteError(step='fsync')."""
        real = os.fsync

        def fsync(fd: int) -> None:
            if _is_temp_fd(fd):
                raise OSError(code, os.strerror(code))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(AtomicWriteError) as info:
            write_file(str(old), 1, True, store)
        monkeypatch.undo()
        assert ("fsync", code) == (info.value.step, info.value.errno)
        self.check_rolled_back(info, old, store)

    @pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
    def test_rename_fails(
        self, old: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, code: int
    ) -> None:
        """A failing rename raises AtomicWriteError(step='rename')."""
        real = os.replace

        def replace(src: Any, dst: Any) -> None:
            if os.path.basename(os.fspath(src)).startswith(TEMP_PREFIX):
                raise OSError(code, os.strerror(code))
            real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(AtomicWriteError) as info:
            write_file(str(old), 1, True, store)
        monkeypatch.undo()
        assert ("rename", code) == (info.value.step, info.value.errno)
        self.check_rolled_back(info, old, store)

    def test_folder_fsync_fails_after_the_rename(
        self, old: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failing folder fsync comes after the rename: committed=True, new content in place."""
        real = os.fsync
        folder = str(old.parent)

        def fsync(fd: int) -> None:
            if _fd_path(fd) == folder:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(AtomicWriteError) as info:
            write_file(str(old), 1, True, store)
        monkeypatch.undo()
        assert ("fsync folder", True) == (info.value.step, info.value.committed)
        assert "may not survive a power loss" in str(info.value)
        assert 1 == judge_file(str(old))
        assert [] == ours(old.parent)
        assert [] == per_write_entries(store)

    def test_temp_cannot_be_created(self, folder: Path, store: SQLiteStore) -> None:
        """A folder that does not exist: AtomicWriteError(step='create temp'), journal clean."""
        with pytest.raises(AtomicWriteError) as info, atomic_file(folder / "no" / "f", store=store):
            pass
        assert ("create temp", errno.ENOENT) == (info.value.step, info.value.errno)
        assert [] == per_write_entries(store)

    def test_real_file_size_limit(self, old: Path, store: SQLiteStore) -> None:
        """A real EFBIG from the kernel (RLIMIT_FSIZE) during the write rolls back."""
        script = textwrap.dedent(
            f"""
            import json, resource, signal, sys
            from termsafe import AtomicWriteError, atomic_file
            from termsafe._store import SQLiteStore
            store = SQLiteStore({str(store.path)!r})
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))
            try:
                with atomic_file({str(old)!r}, "wb", store=store) as f:
                    for _ in range(64):
                        f.write(b"x" * 65536)
            except AtomicWriteError as exc:
                print(json.dumps([exc.step, exc.errno, str(exc)]))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        step, code, message = json.loads(out.stdout)
        assert ("write", errno.EFBIG) == (step, code)
        assert str(old) in message
        assert content(0) == old.read_bytes()
        assert [] == ours(old.parent)
        assert [] == per_write_entries(store)

    @pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
    def test_real_disk_full(self, tmp_path: Path, store: SQLiteStore) -> None:
        """A real ENOSPC: a 256 KiB tmpfs (private mount namespace) fills up mid-write."""
        small = tmp_path / "small"
        small.mkdir()
        script = textwrap.dedent(
            f"""
            import json, os
            from termsafe import AtomicWriteError, atomic_file
            from termsafe._store import SQLiteStore
            target = os.path.join({str(small)!r}, "f")
            with open(target, "wb") as f:
                f.write(b"old" * 1000)
            result = None
            try:
                with atomic_file(target, "wb", store=SQLiteStore({str(store.path)!r})) as f:
                    for _ in range(16):
                        f.write(b"x" * 65536)
            except AtomicWriteError as exc:
                result = [exc.step, exc.errno, str(exc)]
            print(json.dumps({{
                "error": result,
                "old": open(target, "rb").read() == b"old" * 1000,
                "left": sorted(os.listdir({str(small)!r})),
            }}))
            """
        )
        command = (
            f"mount -t tmpfs -o size=256k termsafe-test {small} && "
            f"exec {sys.executable} -c {_shell_quote(script)}"
        )
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0 and not proc.stdout:
            pytest.skip(f"cannot mount a tmpfs in a private namespace here: {proc.stderr.strip()}")
        result = json.loads(proc.stdout)
        step, code, message = result["error"]
        assert ("write", errno.ENOSPC) == (step, code)
        assert os.path.join(small, "f") in message
        assert result["old"]
        assert ["f"] == result["left"]
        assert [] == per_write_entries(store)


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


class TestAtomicWriteError:
    def test_names_path_step_and_outcome(self) -> None:
        """The message names the path, the step, the OS error and what state the file is in."""
        err = AtomicWriteError("/srv/out", "fsync", errno.EIO, "Input/output error")
        assert (
            "atomic write of '/srv/out' failed at fsync: [Errno 5] Input/output error; "
            "the old content is intact"
        ) == str(err)
        assert isinstance(err, OSError)
        assert isinstance(err, termsafe.TermsafeError)
        assert (errno.EIO, "/srv/out") == (err.errno, err.filename)

    def test_pickles(self) -> None:
        """The error survives pickling with its attributes."""
        err = AtomicWriteError("/srv/out", "fsync folder", errno.EIO, "boom", committed=True)
        back = pickle.loads(pickle.dumps(err))
        assert (type(err), err.path, err.step, err.errno, err.strerror, True, str(err)) == (
            type(back),
            back.path,
            back.step,
            back.errno,
            back.strerror,
            back.committed,
            str(back),
        )


# -- atomic_directory --------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["exchange", "two-renames"])
def swap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both swap strategies: renameat2(RENAME_EXCHANGE) and the portable two renames."""
    use = bool(request.param)
    if use and not LINUX:
        pytest.skip("renameat2 is Linux only")
    monkeypatch.setattr("termsafe._atomic._use_renameat2", use)
    return use


class TestAtomicDirectory:
    def test_writer_abandoned_then_back(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory, jobs: Jobs
    ) -> None:
        """A writer the terminator gave up on leaves nothing when it comes back and writes on.

        The system phase removes the staging folder from another thread while
        the workflow's own thread is stuck in the body; that thread then goes
        on writing into the staging folder (recreating it). Its own exit must
        remove it, and the journal entry must stay until it has.
        """
        term = make_term(phases=Phases(0.05, 0.05), store=store, hook_timeout=WAIT)
        target = folder / "site"
        write_version_zero("dir", str(target))
        before = sorted(os.listdir(target))
        ready, gate = threading.Event(), threading.Event()
        entries_at_takeover: list[int] = []

        def body() -> None:
            with term.workflow("writer"), atomic_directory(target, store=store) as staging:
                ready.set()
                assert gate.wait(WAIT * 2)  # not a cancellation point: the thread is stuck
                entries_at_takeover.append(len(per_write_entries(store)))
                (staging / "late" / "deeper").mkdir(parents=True)
                (staging / "late" / "deeper" / "file").write_text("late", encoding="utf-8")

        job = jobs.start(body, name="stuck-writer")
        assert ready.wait(WAIT)
        handle = term.kill("writer", by=ADMIN, reason="hung")
        try:
            assert termsafe.WorkflowState.KILLED == handle.wait(WAIT)
            # The terminator removed the staging folder, the owner is still out there.
            assert [] == ours(folder)
        finally:
            gate.set()
        job.result()  # its commit was refused (ForcedTermination), absorbed by the workflow
        assert [1] == entries_at_takeover  # kept while the owner could still write
        assert before == sorted(os.listdir(target))
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    def test_creates_a_new_directory(self, folder: Path, store: SQLiteStore, swap: bool) -> None:
        """A new directory appears whole, with mode 0o777 & ~umask."""
        target = folder / "site"
        with atomic_directory(target, store=store) as staging:
            assert staging.parent == folder
            assert staging.name.startswith(f"{STAGE_PREFIX}site-")
            (staging / "index.html").write_text("hi", encoding="utf-8")
            assert not target.exists()
        assert ["index.html"] == os.listdir(target)
        assert 0o777 & ~current_umask() == stat.S_IMODE(target.stat().st_mode)
        assert [] == ours(folder)
        assert [] == per_write_entries(store)

    def test_replaces_a_directory(self, folder: Path, store: SQLiteStore, swap: bool) -> None:
        """The old tree is replaced by the new one and removed; the old mode is kept."""
        target = str(folder / "data")
        write_version_zero("dir", target)
        os.chmod(target, 0o750)
        write_dir(target, 5, True, store)
        assert 5 == judge_dir(target)
        assert 0o750 == stat.S_IMODE(os.stat(target).st_mode)
        assert [] == per_write_entries(store)

    def test_old_tree_stays_until_the_swap(
        self, folder: Path, store: SQLiteStore, swap: bool
    ) -> None:
        """While the staging folder is built, the old tree is untouched."""
        target = str(folder / "data")
        write_version_zero("dir", target)
        with atomic_directory(target, store=store) as staging:
            (staging / "x").write_bytes(b"x")
            assert 0 == judge_dir_ignoring_staging(target)
        assert ["x"] == os.listdir(target)

    def test_error_keeps_the_old_tree(self, folder: Path, store: SQLiteStore, swap: bool) -> None:
        """An exception in the body removes the staging folder; the path is untouched."""
        target = str(folder / "data")
        write_version_zero("dir", target)

        def fail_half_way() -> None:
            with atomic_directory(target, store=store) as staging:
                (staging / "version.txt").write_bytes(b"9")
                raise OSError("disk on fire")

        with pytest.raises(OSError, match="disk on fire"):
            fail_half_way()
        assert 0 == judge_dir(target)
        assert [] == per_write_entries(store)

    def test_rename_failure_puts_the_old_tree_back(
        self, folder: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two-rename swap: if the second rename fails, the old tree is renamed back."""
        monkeypatch.setattr("termsafe._atomic._use_renameat2", False)
        target = str(folder / "data")
        write_version_zero("dir", target)
        real = os.rename

        def rename(src: Any, dst: Any) -> None:
            if os.path.basename(os.fspath(src)).startswith(STAGE_PREFIX):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(src, dst)

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises(AtomicWriteError) as info, atomic_directory(target, store=store) as st:
            (st / "version.txt").write_bytes(b"9")
        monkeypatch.undo()
        assert ("rename", False) == (info.value.step, info.value.committed)
        assert 0 == judge_dir(target)
        assert [] == per_write_entries(store)

    def test_file_at_path(self, folder: Path, store: SQLiteStore) -> None:
        """A file at the path raises NotADirectoryError naming it."""
        (folder / "f").write_bytes(b"")
        with pytest.raises(NotADirectoryError) as info, atomic_directory(folder / "f", store=store):
            pass
        assert str(folder / "f") == info.value.filename

    def test_symlink_is_written_through(self, folder: Path, store: SQLiteStore, swap: bool) -> None:
        """A symlink to a directory: the real directory is replaced, the link stays."""
        real = folder / "releases"
        real.mkdir()
        (real / "old").write_bytes(b"")
        link = folder / "current"
        link.symlink_to(real)
        with atomic_directory(link, store=store) as staging:
            (staging / "new").write_bytes(b"")
        assert link.is_symlink()
        assert ["new"] == os.listdir(real)
        assert [] == ours(folder)

    def test_in_workflow_kill_removes_staging(
        self, folder: Path, store: SQLiteStore, make_term: TermFactory
    ) -> None:
        """A kill landing in the body removes the staging folder; the old tree stands."""
        term = make_term(store=store)
        target = str(folder / "data")
        write_version_zero("dir", target)
        with term.workflow("builder") as wf, atomic_directory(target) as staging:
            (staging / "version.txt").write_bytes(b"3")
            term.kill("builder", by=ADMIN, reason="test")
            termsafe.checkpoint()
        assert "terminated" == wf.state
        assert 0 == judge_dir(target)
        assert [] == per_write_entries(store)


def judge_dir_ignoring_staging(path: str) -> int:
    found = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    version = int(found["version.txt"])
    assert members(version) == found
    return version


# -- SIGKILL trials ----------------------------------------------------------------------------


class TestKilledWriters:
    """Real SIGKILLs at seeded random moments; the target is old or new, never a mix."""

    def test_files(self, tmp_path: Path) -> None:
        """150 writers of 256 KiB killed: old file or new each time; recovery sweeps every temp."""
        spec = kill_spec(tmp_path, "file", 150, {"midway": 60, "old": 1, "new": 1})
        outcomes = check_trials(run_worker(spec), spec)
        assert outcomes["old"] + outcomes["new"] >= 60, f"seed {spec['seed']}: {outcomes}"
        # Kills landed both before and after the commit point.
        assert outcomes["old"] > 0, f"seed {spec['seed']}: {outcomes}"
        assert outcomes["new"] > 0, f"seed {spec['seed']}: {outcomes}"
        self.sweep_and_check(spec)

    @pytest.mark.parametrize("kind", ["zip", "tar"])
    def test_archives(self, tmp_path: Path, kind: str) -> None:
        """50 archive writers killed: each archive passes its own reader's checks, old or new."""
        spec = kill_spec(tmp_path, kind, 50, {"midway": 20})
        outcomes = check_trials(run_worker(spec), spec)
        assert outcomes["old"] + outcomes["new"] >= 20, f"seed {spec['seed']}: {outcomes}"
        self.sweep_and_check(spec)

    @pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "two-renames"])
    def test_directories(self, tmp_path: Path, renameat2: bool) -> None:
        """30 directory builders killed: after recovery the path holds one whole version."""
        if renameat2 and not LINUX:
            pytest.skip("renameat2 is Linux only")
        spec = kill_spec(tmp_path, "dir", 30, {"midway": 12}, renameat2=renameat2)
        outcomes = check_trials(run_worker(spec), spec)
        assert outcomes["old"] + outcomes["new"] >= 12, f"seed {spec['seed']}: {outcomes}"
        with SQLiteStore(spec["store"]) as store:
            assert [] == per_write_entries(store), f"seed {spec['seed']}"

    def sweep_and_check(self, spec: dict[str, Any]) -> None:
        folder = os.path.dirname(spec["target"])
        left = ours(Path(folder))
        with SQLiteStore(spec["store"]) as store:
            report = sweep_journal(store)
            assert [] == ours(Path(folder)), f"seed {spec['seed']}: {report}"
            assert {os.path.join(folder, n) for n in left} <= set(report.removed)
            assert [] == per_write_entries(store), f"seed {spec['seed']}"
            assert report.clean, f"seed {spec['seed']}: {report}"
        assert [os.path.basename(spec["target"])] == os.listdir(folder)


class TestRemoveTree:
    """``_remove_tree`` against a writer still at work in the tree it removes.

    The writer acts at a precise point: inside ``os.unlink``, as ``rmtree``
    removes an entry (after it listed the folder, before its ``rmdir``).
    """

    def _tree(self, root: Path) -> Path:
        tree = root / "staging"
        (tree / "sub").mkdir(parents=True)
        for name in ("a", "b", "sub/c"):
            (tree / name).write_text(name)
        return tree

    def _on_unlink(self, monkeypatch: pytest.MonkeyPatch, act: Callable[[int], None]) -> list[int]:
        """Call ``act(n)`` before the n-th ``os.unlink`` (from 0); return the count list."""
        real = os.unlink
        calls: list[int] = []

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            act(len(calls))
            calls.append(1)
            real(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink)
        return calls

    def test_entry_added_meanwhile_is_removed_on_a_second_pass(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file written into the tree while it is removed makes rmdir fail once; retried."""
        tree = self._tree(tmp_path)

        def write_once(n: int) -> None:
            if n == 0:
                (tree / "late").write_text("written during the removal")

        calls = self._on_unlink(monkeypatch, write_once)
        _atomic._remove_tree(str(tree))
        monkeypatch.undo()
        assert not tree.exists()
        # a, b and sub/c on the first pass; "late", written after the listing, on a second.
        assert 4 == len(calls)

    def test_entry_vanishing_meanwhile_is_fine(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An entry someone else removes before rmtree reaches it is no error."""
        tree = self._tree(tmp_path)

        def remove_the_rest(n: int) -> None:
            if n == 0:
                for name in ("a", "b"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tree / name)

        self._on_unlink(monkeypatch, remove_the_rest)
        _atomic._remove_tree(str(tree))
        monkeypatch.undo()
        assert not tree.exists()

    def test_writer_that_never_stops_gives_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A tree refilled on every pass raises ENOTEMPTY naming the tree, after `tries` passes."""
        tree = self._tree(tmp_path)
        counter = itertools.count()

        def write_always(n: int) -> None:
            (tree / f"late-{next(counter)}").write_text("again")

        self._on_unlink(monkeypatch, write_always)
        with pytest.raises(OSError, match="staging") as info:
            _atomic._remove_tree(str(tree), tries=3)
        monkeypatch.undo()
        assert errno.ENOTEMPTY == info.value.errno
        assert tree.exists()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(json.loads(sys.argv[2]))
