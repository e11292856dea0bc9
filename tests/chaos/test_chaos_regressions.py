"""Violations the chaos suite found, each replayed deterministically.

Every test here is one trial of the chaos suite reduced to its cause, run in a
real process that then exits (recover only settles what dead processes
left). A test marked ``xfail(strict=True)`` is a library bug not fixed yet:
when the fix lands it passes, strict turns that into a failure, and the mark
(and the chaos harness's exemption it names) must go.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_atomic

import termsafe as ts
from chaos._harness import TESTS
from termsafe._store import SQLiteStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="renameat2, fork")

#: Writes version 1 of a directory with atomic_directory while the removal of the
#: old tree fails with EIO: in ``portable`` mode (two renames) the backup cannot be
#: renamed out of the way; in ``exchange`` mode (renameat2) the exchanged old
#: tree cannot be removed.
FAILING_OLD_TREE_REMOVAL = textwrap.dedent(
    """
    import errno, os, shutil, sys
    import termsafe._atomic as atomic
    import test_atomic
    from termsafe._store import SQLiteStore

    mode, target, store_path = sys.argv[1:]

    def eio(path):
        return OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))

    if mode == "portable":
        atomic._use_renameat2 = False
        real_rename = os.rename

        def rename(src, dst, **kwargs):
            if os.path.basename(os.fspath(src)).startswith(atomic.BACKUP_PREFIX):
                raise eio(src)
            real_rename(src, dst, **kwargs)

        os.rename = rename
    else:
        def rmtree(path, *args, **kwargs):
            raise eio(path)

        shutil.rmtree = rmtree
    test_atomic.write_dir(target, 1, True, SQLiteStore(store_path))
    """
)


class TestAtomicDirectoryOldTree:
    @pytest.mark.parametrize("mode", ["portable", "exchange"])
    def test_recover_removes_an_old_tree_the_writer_failed_to_remove(
        self, tmp_path: Path, mode: str
    ) -> None:
        """An old tree whose removal failed (EIO) is removed by recover once its writer is gone."""
        folder = tmp_path / "tree"
        folder.mkdir()
        target = folder / "site"
        test_atomic.write_version_zero("dir", str(target))
        store_path = tmp_path / "store.sqlite3"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        subprocess.run(
            [sys.executable, "-c", FAILING_OLD_TREE_REMOVAL, mode, str(target), str(store_path)],
            check=True,
            timeout=60,
            env=env,
            capture_output=True,
        )
        assert 1 == int((target / "version.txt").read_text())
        assert [] != test_atomic.ours(folder), "the fault did not leave the old tree"
        with SQLiteStore(store_path) as store:
            report = ts.recover(store)
        assert [] == test_atomic.ours(folder), f"left after recover: {report}"
        assert 1 == test_atomic.judge_dir(str(target))
