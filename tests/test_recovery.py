"""Tests of sweep_journal: what SIGKILLed writers leave behind, settled after the fact.

Each leftover is made by a real process that really dies (SIGKILL at an exact
step, injected by wrapping one ``os`` call inside that process), then swept
from this one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import filelock
import pytest

from termsafe import (
    ConfigurationError,
    InvalidArgumentType,
    SweepReport,
    _store,
    atomic_file,
    sweep_journal,
)
from termsafe._atomic import BACKUP_PREFIX, STAGE_PREFIX, TEMP_PREFIX
from termsafe._recovery import LeftEntry
from termsafe._store import SQLiteStore

PRELUDE = """
import os, signal, sys, shutil
import termsafe._atomic as atomic_module
from termsafe import atomic_directory, atomic_file
from termsafe._store import SQLiteStore
STORE = SQLiteStore(sys.argv[1])
TARGET = sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_python(
    body: str, store: SQLiteStore, target: Path | str
) -> subprocess.CompletedProcess[str]:
    """Run ``PRELUDE + body`` in a fresh interpreter (store path and target as argv)."""
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, str(store.path), str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def killed(proc: subprocess.CompletedProcess[str]) -> None:
    assert -signal.SIGKILL == proc.returncode, proc.stderr


def journal_from_dead_process(store: SQLiteStore, kind: str, payload: dict[str, Any]) -> int:
    """A journal entry whose owner is a process that has exited."""
    proc = run_python(f"print(STORE.journal_add({kind!r}, {payload!r}))", store, "-")
    assert 0 == proc.returncode, proc.stderr
    return int(proc.stdout)


def ours(folder: Path) -> list[str]:
    return sorted(
        n for n in os.listdir(folder) if n.startswith((TEMP_PREFIX, STAGE_PREFIX, BACKUP_PREFIX))
    )


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
    """An empty folder for the targets."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def tree(folder: Path) -> Path:
    """A directory holding the old tree."""
    path = folder / "site"
    path.mkdir()
    (path / "old").write_text("old", encoding="utf-8")
    return path


class TestTempFiles:
    def test_removes_the_temp_of_a_killed_writer(self, folder: Path, store: SQLiteStore) -> None:
        """A writer SIGKILLed mid-write leaves a journaled temp; the sweep removes it."""
        target = folder / "f"
        target.write_text("old", encoding="utf-8")
        proc = run_python(
            """
            with atomic_file(TARGET, "wb", store=STORE) as f:
                f.write(b"new" * 100000)
                f.flush()
                die()
            """,
            store,
            target,
        )
        killed(proc)
        (temp,) = ours(folder)
        (entry,) = store.journal_entries()
        report = sweep_journal(store)
        assert SweepReport(removed=(str(folder / temp),), settled=(entry.id,)) == report
        assert report.clean
        assert [] == ours(folder)
        assert [] == store.journal_entries()
        assert "old" == target.read_text(encoding="utf-8")

    def test_killed_before_the_temp_existed(self, folder: Path, store: SQLiteStore) -> None:
        """Killed between journaling and creating the temp: nothing to remove, entry settled."""
        proc = run_python(
            """
            from termsafe import _atomic
            def make_temp(*args, **kwargs):
                die()
            _atomic._make_temp = make_temp
            with atomic_file(TARGET, "wb", store=STORE) as f:
                pass
            """,
            store,
            folder / "f",
        )
        killed(proc)
        (entry,) = store.journal_entries()
        assert SweepReport(settled=(entry.id,)) == sweep_journal(store)
        assert [] == os.listdir(folder)

    def test_killed_after_the_rename(self, folder: Path, store: SQLiteStore) -> None:
        """Killed after the rename but before forgetting the entry: the new file stays."""
        proc = run_python(
            """
            real = os.replace
            def replace(src, dst):
                real(src, dst)
                die()
            os.replace = replace
            with atomic_file(TARGET, "wb", store=STORE) as f:
                f.write(b"new")
            """,
            store,
            folder / "f",
        )
        killed(proc)
        (entry,) = store.journal_entries()
        assert SweepReport(settled=(entry.id,)) == sweep_journal(store)
        assert b"new" == (folder / "f").read_bytes()
        assert ["f"] == os.listdir(folder)

    def test_exclusive_mode_killed_between_link_and_unlink(
        self, folder: Path, store: SQLiteStore
    ) -> None:
        """Mode ``x`` without renameat2, killed after link(): the temp name goes, the file stays."""
        proc = run_python(
            """
            atomic_module._use_renameat2 = False
            real = os.link
            def link(src, dst):
                real(src, dst)
                die()
            os.link = link
            with atomic_file(TARGET, "xb", store=STORE) as f:
                f.write(b"new")
            """,
            store,
            folder / "f",
        )
        killed(proc)
        assert 1 == len(ours(folder))
        report = sweep_journal(store)
        assert 1 == len(report.removed)
        assert b"new" == (folder / "f").read_bytes()
        assert ["f"] == os.listdir(folder)

    def test_leaves_a_live_writers_temp(self, folder: Path, store: SQLiteStore) -> None:
        """An entry whose owner (this process) is alive is left, with the reason."""
        with atomic_file(folder / "f", "wb", store=store) as f:
            f.write(b"x")
            (entry,) = store.journal_entries()
            report = sweep_journal(store)
            assert (
                LeftEntry(
                    entry.id,
                    "temp_file",
                    str(folder),
                    f"its owner (pid {os.getpid()}) is alive",
                ),
            ) == report.left
            assert () == report.removed
            assert 1 == len(ours(folder))
        assert b"x" == (folder / "f").read_bytes()

    def test_sweeping_again_finds_nothing(self, folder: Path, store: SQLiteStore) -> None:
        """A second sweep after a complete one does nothing."""
        killed(
            run_python(
                """
                with atomic_file(TARGET, "wb", store=STORE) as f:
                    die()
                """,
                store,
                folder / "f",
            )
        )
        first = sweep_journal(store)
        assert 1 == len(first.removed)
        assert SweepReport() == sweep_journal(store)

    def test_concurrent_sweeps(self, folder: Path, store: SQLiteStore) -> None:
        """Several processes sweeping at once remove each temp exactly once, without errors."""
        proc = run_python(
            """
            import os
            for i in range(20):
                pid = os.fork()
                if pid == 0:
                    with atomic_file(os.path.join(TARGET, f"f{i}"), "wb", store=STORE) as f:
                        f.write(b"x")
                        f.flush()
                        die()
                os.waitpid(pid, 0)
            """,
            store,
            folder,
        )
        assert 0 == proc.returncode, proc.stderr
        assert 20 == len(ours(folder))
        script = textwrap.dedent(
            """
            import json, sys
            from termsafe import sweep_journal
            from termsafe._store import SQLiteStore
            with SQLiteStore(sys.argv[1]) as store:
                report = sweep_journal(store)
            print(json.dumps([report.removed, report.settled, [l.reason for l in report.left]]))
            """
        )
        sweepers = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(store.path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        results = []
        for sweeper in sweepers:
            out, err = sweeper.communicate(timeout=60)
            assert 0 == sweeper.returncode, err
            results.append(json.loads(out))
        removed = [path for r in results for path in r[0]]
        settled = [entry for r in results for entry in r[1]]
        assert 20 == len(removed) == len(set(removed))
        assert 20 == len(settled) == len(set(settled))
        assert [] == [reason for r in results for reason in r[2]]
        assert [] == ours(folder)
        assert [] == store.journal_entries()

    def test_waits_for_another_sweep(self, store: SQLiteStore) -> None:
        """While another sweep holds the lock, sweep_journal waits, then times out."""
        lock = filelock.FileLock(str(store.path) + ".sweep.lock")
        with lock, pytest.raises(TimeoutError, match=r"sweep\.lock"):
            sweep_journal(store, lock_timeout=0.05)
        assert SweepReport() == sweep_journal(store, lock_timeout=0.05)


class TestDirectories:
    @staticmethod
    def kill_at_rename(store: SQLiteStore, tree: Path, after_prefix: str) -> None:
        """Run the two-rename swap and SIGKILL it right after the rename into ``after_prefix``."""
        killed(
            run_python(
                f"""
                atomic_module._use_renameat2 = False
                real = os.rename
                def rename(src, dst):
                    real(src, dst)
                    if os.path.basename(dst).startswith({after_prefix!r}):
                        die()
                os.rename = rename
                with atomic_directory(TARGET, store=STORE) as staging:
                    (staging / "new").write_text("new")
                """,
                store,
                tree,
            )
        )

    def test_killed_between_the_renames(self, tree: Path, store: SQLiteStore) -> None:
        """Killed after old -> backup: the path is missing until the sweep restores the old tree."""
        self.kill_at_rename(store, tree, BACKUP_PREFIX)
        assert not tree.exists()
        (backup,) = (n for n in ours(tree.parent) if n.startswith(BACKUP_PREFIX))
        (staging,) = (n for n in ours(tree.parent) if n.startswith(STAGE_PREFIX))
        (entry,) = store.journal_entries()
        report = sweep_journal(store)
        assert (
            SweepReport(
                removed=(str(tree.parent / staging),), restored=(str(tree),), settled=(entry.id,)
            )
            == report
        )
        assert ["old"] == os.listdir(tree)
        assert [] == ours(tree.parent)
        assert backup.startswith(f"{BACKUP_PREFIX}site-")

    def test_killed_after_the_swap(self, tree: Path, store: SQLiteStore) -> None:
        """Killed after staging -> path: the new tree stays, the sweep removes the old one."""
        self.kill_at_rename(store, tree, "site")
        assert ["new"] == os.listdir(tree)
        (backup,) = ours(tree.parent)
        report = sweep_journal(store)
        assert (str(tree.parent / backup),) == report.removed
        assert () == report.restored
        assert ["new"] == os.listdir(tree)
        assert [] == ours(tree.parent)

    def test_killed_while_removing_the_old_tree(self, tree: Path, store: SQLiteStore) -> None:
        """Killed in the removal of the old tree: the new tree stays, the sweep finishes the job."""
        killed(
            run_python(
                """
                def rmtree(path, *args, **kwargs):
                    die()
                shutil.rmtree = rmtree
                with atomic_directory(TARGET, store=STORE) as staging:
                    (staging / "new").write_text("new")
                """,
                store,
                tree,
            )
        )
        assert ["new"] == os.listdir(tree)
        assert 1 == len(ours(tree.parent))
        report = sweep_journal(store)
        assert 1 == len(report.removed)
        assert [] == ours(tree.parent)
        assert [] == store.journal_entries()

    def test_killed_while_building(self, tree: Path, store: SQLiteStore) -> None:
        """Killed in the body: the staging folder is removed, the old tree never moved."""
        killed(
            run_python(
                """
                with atomic_directory(TARGET, store=STORE) as staging:
                    (staging / "new").write_text("new")
                    die()
                """,
                store,
                tree,
            )
        )
        (staging,) = ours(tree.parent)
        assert (str(tree.parent / staging),) == sweep_journal(store).removed
        assert ["old"] == os.listdir(tree)
        assert [] == ours(tree.parent)


class TestOtherKinds:
    def test_git_lock_module_missing(
        self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without termsafe._git, git_lock entries are left with a note saying so."""
        monkeypatch.setitem(sys.modules, "termsafe._git", None)
        entry = journal_from_dead_process(store, "git_lock", {"lock": "/repo/.git/index.lock"})
        report = sweep_journal(store)
        assert (
            LeftEntry(
                entry,
                "git_lock",
                "/repo/.git/index.lock",
                "termsafe._git is not available: git locks are not swept yet",
            ),
        ) == report.left
        assert [entry] == [e.id for e in store.journal_entries()]

    @pytest.mark.parametrize(("outcome", "settled"), [(True, True), (None, True), (False, False)])
    def test_git_lock_handed_to_git(
        self,
        store: SQLiteStore,
        monkeypatch: pytest.MonkeyPatch,
        outcome: bool | None,
        settled: bool,
    ) -> None:
        """git_lock entries go to sweep_stale_lock, with the store; False keeps the entry."""
        seen: list[dict[str, Any]] = []
        stores: list[Any] = []

        def sweep_stale_lock(payload: dict[str, Any], *, store: Any = None) -> bool | None:
            seen.append(payload)
            stores.append(store)
            return outcome

        fake = types.ModuleType("termsafe._git")
        fake.sweep_stale_lock = sweep_stale_lock  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "termsafe._git", fake)
        payload = {"lock": "/repo/.git/refs/heads/main.lock", "repo": "/repo"}
        entry = journal_from_dead_process(store, "git_lock", payload)
        report = sweep_journal(store)
        assert [payload] == seen
        assert [store] == stores  # the sweep journals its own git commands there
        assert ((entry,) if settled else ()) == report.settled
        assert ([] if settled else [entry]) == [e.id for e in store.journal_entries()]

    def test_git_lock_sweeper_fails(
        self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A sweep_stale_lock that raises leaves the entry, with the error as the reason."""

        def sweep_stale_lock(payload: dict[str, Any], *, store: Any = None) -> bool:
            raise PermissionError("read-only repository")

        fake = types.ModuleType("termsafe._git")
        fake.sweep_stale_lock = sweep_stale_lock  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "termsafe._git", fake)
        journal_from_dead_process(store, "git_lock", {"lock": "/r/.git/index.lock"})
        (left,) = sweep_journal(store).left
        assert "sweep_stale_lock failed: PermissionError: read-only repository" == left.reason

    def test_child_process_entries_are_left(self, store: SQLiteStore) -> None:
        """child_process entries are left for the supervisor."""
        journal_from_dead_process(store, "child_process", {"pid": 1, "start_time": 0.0})
        (left,) = sweep_journal(store).left
        assert "child_process" == left.kind
        assert "supervisor" in left.reason
        assert 1 == len(store.journal_entries())

    def test_malformed_payload_is_left(self, store: SQLiteStore) -> None:
        """A temp_file entry without folder and prefix is left, naming the payload."""
        journal_from_dead_process(store, "temp_file", {"path": "/x"})
        (left,) = sweep_journal(store).left
        assert "malformed temp_file payload {'path': '/x'}" == left.reason


class TestOrphans:
    @staticmethod
    def age(path: Path, seconds: float) -> None:
        when = time.time() - seconds
        os.utime(path, (when, when), follow_symlinks=False)

    def test_name_sweep(self, folder: Path, store: SQLiteStore) -> None:
        """Old unjournaled temps and staging folders go; young ones, backups and others stay."""
        old_temp = folder / f"{TEMP_PREFIX}a-0000-xyz"
        young_temp = folder / f"{TEMP_PREFIX}b-0000-xyz"
        old_stage = folder / f"{STAGE_PREFIX}c-0000-xyz"
        backup = folder / f"{BACKUP_PREFIX}d-0000"
        other = folder / ".termsafe-notes"
        for path in (old_temp, young_temp, other):
            path.write_bytes(b"x")
        for path in (old_stage, backup):
            path.mkdir()
            (path / "inner").write_bytes(b"x")
            self.age(path / "inner", 7200)
        for path in (old_temp, old_stage, backup, other):
            self.age(path, 7200)
        report = sweep_journal(store, orphans_in=[folder])
        assert {str(old_temp), str(old_stage)} == set(report.removed)
        assert {str(young_temp), str(backup)} == {left.path for left in report.left}
        assert ["orphan", "orphan"] == [left.kind for left in report.left]
        assert sorted([young_temp.name, backup.name, other.name]) == sorted(os.listdir(folder))

    def test_staging_folder_changed_deep_inside_is_young(
        self, folder: Path, store: SQLiteStore
    ) -> None:
        """A staging folder whose contents changed recently is not an orphan yet."""
        stage = folder / f"{STAGE_PREFIX}c-0000-xyz"
        (stage / "deep").mkdir(parents=True)
        (stage / "deep" / "file").write_bytes(b"x")
        self.age(stage / "deep", 7200)
        self.age(stage, 7200)
        report = sweep_journal(store, orphans_in=str(folder))
        assert () == report.removed
        assert stage.exists()

    def test_journaled_temp_is_not_an_orphan(self, folder: Path, store: SQLiteStore) -> None:
        """A temp still named by a live journal entry is never taken by the name sweep."""
        with atomic_file(folder / "f", "wb", store=store) as f:
            f.write(b"x")
            f.flush()
            self.age(Path(f.name), 7200)
            report = sweep_journal(store, orphans_in=[folder], orphan_age=0)
            assert () == report.removed
            assert os.path.exists(f.name)
        assert b"x" == (folder / "f").read_bytes()

    def test_unjournaled_writer(self, folder: Path, store: SQLiteStore) -> None:
        """A writer with store=False killed mid-write is found by the name sweep only."""
        killed(
            run_python(
                """
                with atomic_file(TARGET, "wb", store=False) as f:
                    f.write(b"x")
                    die()
                """,
                store,
                folder / "f",
            )
        )
        assert SweepReport() == sweep_journal(store)
        report = sweep_journal(store, orphans_in=[folder], orphan_age=0)
        assert 1 == len(report.removed)
        assert [] == os.listdir(folder)


class TestArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"orphan_age": -1}, ConfigurationError),
            ({"orphan_age": float("nan")}, ConfigurationError),
            ({"orphan_age": "1h"}, InvalidArgumentType),
            ({"lock_timeout": True}, InvalidArgumentType),
            ({"orphans_in": [3]}, InvalidArgumentType),
        ],
    )
    def test_bad_arguments(
        self, store: SQLiteStore, kwargs: dict[str, Any], error: type[Exception]
    ) -> None:
        """Bad arguments raise before anything is touched, naming the value."""
        with pytest.raises(error):
            sweep_journal(store, **kwargs)

    def test_report_is_frozen(self) -> None:
        """A SweepReport cannot be changed."""
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            SweepReport().removed = ("x",)  # type: ignore[misc]

    def test_default_store(self, tmp_path: Path, folder: Path) -> None:
        """Without a store, the one under TERMSAFE_HOME is swept."""
        with SQLiteStore(tmp_path / "home" / "store.sqlite3") as home:
            killed(
                run_python(
                    """
                    with atomic_file(TARGET, "wb", store=STORE) as f:
                        die()
                    """,
                    home,
                    folder / "f",
                )
            )
        assert 1 == len(sweep_journal().removed)
        assert [] == os.listdir(folder)
