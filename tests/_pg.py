"""A throwaway PostgreSQL cluster for the tests: Unix socket only, removed afterwards.

``PgCluster.start()`` runs ``initdb`` into a fresh folder under the system temp
folder and starts ``postgres`` listening only on a Unix socket in that folder
(``listen_addresses=''``, so no TCP port is taken), trusting local
connections. ``stop()`` stops it with ``pg_ctl stop -m immediate`` and
removes the folder.

PostgreSQL refuses to run as root: run as root, the cluster belongs to the
``postgres`` system user and ``initdb``/``pg_ctl`` run under it. The folder is
made with ``mkdtemp`` in the system temp folder rather than pytest's
``tmp_path`` (private to the user running the tests, and deep enough to
overflow the 107-byte limit of a Unix socket path).

``fsync`` is off: the tests kill clients, never the server, so what the
server writes to its own disk is not what they are about, and a commit stays
cheap on a loaded machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

#: Where ``initdb`` and ``pg_ctl`` are looked for after ``PATH`` (Debian's
#: versioned folders, newest first, then /usr/local/bin). ``.ci/run`` installs
#: PostgreSQL when none of these has ``initdb``.
BIN_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/local/bin")

#: The superuser ``initdb`` creates; the tests connect as it.
SUPERUSER = "postgres"

#: The system user that owns the cluster when the tests run as root.
SYSTEM_USER = "postgres"

#: How long starting the server may take on a loaded machine, in seconds.
START_TIMEOUT = 60


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``: numeric version parts."""
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_bindir() -> Path | None:
    """The folder that holds both ``initdb`` and ``pg_ctl``, or ``None``.

    Returns:
        The first of: the folder of ``initdb`` on ``PATH``, the newest
        ``/usr/lib/postgresql/<version>/bin``, ``/usr/local/bin``; only one that
        has both programs.
    """
    candidates: list[str] = []
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(str(Path(on_path).parent))
    for pattern in BIN_DIRS:
        candidates.extend(sorted(glob.glob(pattern), key=_version_key, reverse=True))
    for folder in candidates:
        if all(os.access(Path(folder, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or ``None`` if it can.

    Returns:
        A sentence naming what is missing (the PostgreSQL programs, or the
        ``postgres`` system user when running as root), or ``None``.
    """
    if find_bindir() is None:
        where = ", ".join(("PATH", *BIN_DIRS))
        return f"PostgreSQL's initdb and pg_ctl were not found (looked in {where})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return (
                f"running as root and there is no {SYSTEM_USER!r} system user "
                "to run PostgreSQL as (it refuses to run as root)"
            )
    return None


class PgCluster:
    """One throwaway cluster; ``conninfo`` reaches it through its Unix socket.

    Attributes:
        root: The folder holding the data directory, the socket and the log.
        conninfo: A libpq connection string for the ``postgres`` database.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="termsafe-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.conninfo = f"host={self.root} port=5432 user={SUPERUSER} dbname=postgres"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _run(self, *argv: str, timeout: float) -> None:
        """Run a PostgreSQL program (as the cluster's owner); raise with its output if it fails."""
        done = subprocess.run(
            [str(self.bindir / argv[0]), *argv[1:]],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._as,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
            raise RuntimeError(
                f"{argv[0]} exited with {done.returncode}\n{done.stdout}{done.stderr}\n"
                f"server log:\n{log}"
            )

    def start(self) -> None:
        """Create the cluster and start the server; return once it accepts connections.

        Raises:
            RuntimeError: ``initdb`` or ``pg_ctl start`` failed (with their
                output and the server log).
            subprocess.TimeoutExpired: they did not finish in time.
        """
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            timeout=START_TIMEOUT * 2,
        )
        options = " ".join(
            (
                "-c listen_addresses=''",
                f"-k {self.root}",
                "-c port=5432",
                "-c fsync=off",
                "-c max_connections=30",
                "-c shared_buffers=16MB",
            )
        )
        # -w: pg_ctl polls the server until it accepts connections, failing
        # after -t seconds; no fixed sleep.
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            timeout=START_TIMEOUT + 30,
        )

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``) and remove the folder."""
        try:
            # No postmaster.pid: the server never started (or already stopped).
            if (self.data / "postmaster.pid").exists():
                self._run(
                    "pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data), timeout=60
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
