"""Atomic writes: ``atomic_file`` and ``atomic_directory``.

Both follow the shape of every safe operation (``_safeop.py``):

    enter   journal the temp's name (kind ``temp_file``/``temp_dir``) *before*
            it exists, create it beside the target, register the rollback hook
    body    the caller writes the temp
    commit  inside ``scope.committing()`` (an ``fs`` critical section, shielded):
            flush, copy mode and owner, fsync, rename over the target, fsync
            the folder
    exit    success: take the hook and the journal entry back;
            error or kill: the temp is removed, the target untouched

Outside a workflow ``atomic_file`` keeps no ``OperationScope``: nothing else
can run its rollback, there is no kill to defer and no commit to audit. It
removes its own temp on an error (and audits that), and its commit is a plain
sequence of steps; a scope would be bookkeeping that every such write pays
for, for nothing.

Naming. Every temp starts with a recognisable prefix that ends in a random
token chosen before the journal entry is written::

    .termsafe-tmp-<name>-<token>-XXXXXXXX      atomic_file's temp (as mkstemp makes it)
    .termsafe-stage-<name>-<token>-XXXXXXXX    atomic_directory's staging folder
    .termsafe-old-<name>-<token>               atomic_directory's backup of the old tree

The journal records the folder and the ``<token>`` prefix, so there is no
window in which a temp exists that the journal does not name: the last eight
characters are random, recovery (``_recovery.py``) removes whatever starts
with the journaled prefix.

Audit events. A rollback is always audited (``atomic_file_rolled_back``,
``atomic_directory_rolled_back``). A commit is audited inside a workflow only
(``atomic_file_committed``, ``atomic_directory_committed``, on the workflow's
trail): outside one there is no workflow to attribute it to, a busy writer
would flood the default trail, and waking the audit thread for every write
costs more than the rest of the bookkeeping (about 8 % of a durable 4 KiB write
measured on a 2-CPU VM).

Symbolic links. A target that is a symlink is written *through*: the temp is
made beside the file the link resolves to and replaces that file; the link
itself stays. Replacing the link with a regular file would silently break
setups that point a stable name at a file kept elsewhere (dotfile managers,
``/etc/alternatives``); writing through is what ``open(path, "w")`` does.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import logging
import os
import posixpath
import random
import shutil
import stat
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    ClassVar,
    Final,
    Literal,
    TextIO,
    overload,
)

from ._exceptions import AtomicWriteError, ConfigurationError, InvalidArgumentType
from ._safeop import OperationScope, resolve_store
from ._workflow import current_workflow

if TYPE_CHECKING:
    from ._store import Store

__all__ = [
    "BACKUP_PREFIX",
    "STAGE_PREFIX",
    "TEMP_PREFIX",
    "atomic_directory",
    "atomic_file",
]

log = logging.getLogger("termsafe")

#: Name prefixes of what these operations leave beside their target while they run.
TEMP_PREFIX: Final = ".termsafe-tmp-"
STAGE_PREFIX: Final = ".termsafe-stage-"
BACKUP_PREFIX: Final = ".termsafe-old-"

# Room left for the prefix, token and the random suffix under NAME_MAX (255 bytes).
_NAME_BYTES: Final = 150

_TEXT_MODES: Final = frozenset({"w", "wt", "tw", "x", "xt", "tx"})
_BINARY_MODES: Final = frozenset({"wb", "bw", "xb", "bx"})

TextMode = Literal["w", "wt", "x", "xt"]
BinaryMode = Literal["wb", "xb"]
StrPath = str | os.PathLike[str]

#: Paths are POSIX paths ("/" separates, a leading "/" makes one absolute).
_POSIX_PATHS: Final = os.path is posixpath

# Flags of Linux renameat2(2).
_RENAME_NOREPLACE: Final = 1
_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100

#: Whether to use renameat2(2) where the platform has it. Tests switch it off to
#: exercise the portable fallbacks (two renames; link + unlink).
_use_renameat2 = True
_renameat2_fn: Any = None
_renameat2_loaded = False
_renameat2_lock = threading.Lock()


# -- small helpers ---------------------------------------------------------------------


def _check_path(path: object, what: str) -> str:
    """``path`` as an absolute, normalised ``str`` (as ``os.path.abspath`` makes it).

    Raises:
        InvalidArgumentType: ``path`` is not a ``str`` or ``os.PathLike[str]``.
        ConfigurationError: ``path`` is empty.
    """
    if (
        # Already normal (absolute; no empty, "." or ".." component; no trailing
        # "/"): abspath would return it unchanged, after five Python calls.
        _POSIX_PATHS
        and type(path) is str
        and path[:1] == "/"
        and "//" not in path
        and "/./" not in path
        and "/../" not in path
        and not path.endswith(("/", "/.", "/.."))
    ):
        return path
    if not isinstance(path, str) and isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise InvalidArgumentType(f"{what} path must be a str or os.PathLike[str] (got {path!r})")
    if not path:
        raise ConfigurationError(f"{what} path must not be empty (got '')")
    return os.path.abspath(path)


def _token() -> str:
    return os.urandom(4).hex()


_standing_lock = threading.Lock()
_standing: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_process: tuple[int, str] | None = None
# The last (store, folder, token) _standing_entry answered, the store weakly
# held: a writer that keeps writing into one folder skips the lock and the
# lookups. A forked child forgets it (its temps need a token of their own).
_last_standing: tuple[weakref.ref[Any], str, str] | None = None


def _forget_last_standing() -> None:
    global _last_standing
    _last_standing = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_last_standing)


def _process_token() -> str:
    """A random token for this process's temp names (a new one after fork)."""
    global _process
    pid = os.getpid()
    if _process is None or _process[0] != pid:
        _process = (pid, _token())
        _standing.clear()  # the parent's entries name the parent's temps
    return _process[1]


def _standing_entry(store: Store | None, folder: str) -> str:
    """Journal, once per process, store and folder, the prefix of this process's temps.

    Returns:
        The process token the temp names must carry after ``TEMP_PREFIX``.
    """
    global _last_standing
    last = _last_standing
    if last is not None and store is not None and last[0]() is store and last[1] == folder:
        return last[2]
    with _standing_lock:
        token = _process_token()
        if store is None:
            return token
        folders = _standing.get(store)
        if folders is None:
            folders = _standing[store] = set()
        if folder not in folders:
            payload = {"folder": folder, "prefix": f"{TEMP_PREFIX}{token}-", "standing": True}
            store.journal_add("temp_file", payload)
            folders.add(folder)
        if store is not None:
            _last_standing = (weakref.ref(store), folder, token)
    return token


def _short(name: str) -> str:
    """``name`` cut to fit in a temp's name (whole characters only)."""
    if len(name) <= _NAME_BYTES // 4:  # no character takes more than four bytes
        return name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _NAME_BYTES:
        return name
    return raw[:_NAME_BYTES].decode("utf-8", "ignore")


def _umask_from_proc() -> int | None:
    # /proc/self/status reports the umask (Linux >= 4.7) without changing it;
    # the usual os.umask(0)/os.umask(old) dance would, for an instant, let
    # every other thread create world-writable files.
    try:
        with open("/proc/self/status", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    start = data.find(b"\nUmask:")
    if start < 0:
        return None
    end = data.find(b"\n", start + 1)
    try:
        return int(data[start + 7 : end if end >= 0 else None].strip(), 8)
    except ValueError:
        return None


def _umask_from_probe(folder: str) -> int:
    """The umask, read off a probe file created with mode 0o777 (no race, no /proc)."""
    probe = os.path.join(folder, f"{TEMP_PREFIX}umask-{_token()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o777)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)
    return 0o777 & ~mode


def _current_umask(folder: str) -> int:
    umask = _umask_from_proc()
    return umask if umask is not None else _umask_from_probe(folder)


def _load_renameat2() -> Any:
    global _renameat2_fn, _renameat2_loaded
    if _renameat2_loaded:
        return _renameat2_fn
    with _renameat2_lock:
        if not _renameat2_loaded:
            fn = None
            if sys.platform.startswith("linux"):
                import ctypes

                try:
                    libc = ctypes.CDLL(None, use_errno=True)
                    fn = libc.renameat2
                except (OSError, AttributeError):
                    fn = None
                else:
                    fn.argtypes = [
                        ctypes.c_int,
                        ctypes.c_char_p,
                        ctypes.c_int,
                        ctypes.c_char_p,
                        ctypes.c_uint,
                    ]
                    fn.restype = ctypes.c_int
            _renameat2_fn = fn
            _renameat2_loaded = True
    return _renameat2_fn


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``.

    Returns:
        ``True`` when done; ``False`` when the platform, kernel or file system
        cannot do it (the caller falls back).

    Raises:
        OSError: the rename itself failed (``EEXIST`` for ``RENAME_NOREPLACE``, ...).
    """
    if not _use_renameat2:
        return False
    fn = _load_renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists, atomically.

    Raises:
        FileExistsError: ``dst`` exists.
        OSError: the rename failed otherwise.
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    # link(2) fails with EEXIST atomically; a crash between link and unlink
    # leaves the temp as a second name of the new file, which recovery removes.
    os.link(src, dst)
    os.unlink(src)


_TEMP_FLAGS: Final = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


_temp_names = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_temp_names.seed)  # a child draws names of its own


def _make_temp(head: str, prefix: str) -> tuple[int, str]:
    """Create and open ``<head><prefix><8 random hex digits>``, as ``tempfile.mkstemp`` does.

    ``head`` is the folder's path with a trailing separator.

    The same guarantees as ``mkstemp``: created by this call (``O_CREAT |
    O_EXCL``, another name on a clash), no symlink followed, mode 0o600,
    close-on-exec. Without ``mkstemp``'s argument handling and name generator,
    which cost as much as the ``open`` itself, and twice that on a cold cache
    (as after each wait for the disk).

    Returns:
        The open descriptor and the temp's path.

    Raises:
        OSError: the folder refused the file (``FileExistsError`` if 100 random
            names in a row were taken).
    """
    for _ in range(100):
        # A generator of our own, as mkstemp has: no system call per name
        # (os.urandom makes one), and the caller's random.seed() untouched.
        path = f"{head}{prefix}{_temp_names.getrandbits(32):08x}"
        try:
            return os.open(path, _TEMP_FLAGS, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp name", f"{head}{prefix}")


#: The ``newline`` values ``open()`` accepts.
_NEWLINES: Final = (None, "", "\n", "\r", "\r\n")

#: What the rollback takes instead of a lock outside a workflow (only the owner rolls back).
_NO_LOCK: Final[AbstractContextManager[None]] = contextlib.nullcontext()

_DIR_FLAGS: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, _DIR_FLAGS)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory at all; that is not a failure.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every regular file and folder under ``root`` (symlinks are not followed)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(full).st_mode):
                continue
            fd = os.open(full, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _try_chown(fd: int | None, path: str, uid: int, gid: int) -> bool:
    try:
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.chown(path, uid, gid)
    except PermissionError:
        return False
    return True


def _give_owner(
    fd: int | None, temp: str, target: os.stat_result, mine: os.stat_result, mode: int
) -> int:
    """Hand the temp (``mine``) to the owner of ``target`` where permitted.

    Returns:
        ``mode`` without the set-user-ID (set-group-ID) bit if the owner
        (group) could not be given.
    """
    uid = target.st_uid if target.st_uid != mine.st_uid else -1
    gid = target.st_gid if target.st_gid != mine.st_gid else -1
    if not _try_chown(fd, temp, uid, gid):
        # A user may still hand the file to one of their own groups.
        if uid != -1 and gid != -1 and _try_chown(fd, temp, -1, gid):
            gid = -1
        if uid != -1:
            mode &= ~stat.S_ISUID
        if gid != -1:
            mode &= ~stat.S_ISGID
    return mode


def _ignore_gone(_func: object, _path: str, exc: object) -> None:
    # rmtree's error callback: an entry that vanished meanwhile is what we want.
    error = exc[1] if isinstance(exc, tuple) else exc  # onerror gets exc_info
    if not isinstance(error, FileNotFoundError):
        raise error  # type: ignore[misc]


_RMTREE_ON_ERROR: Final = "onexc" if sys.version_info >= (3, 12) else "onerror"


def _remove_tree(path: str, tries: int = 5) -> None:
    """Remove ``path`` and all under it; entries that vanish meanwhile are fine.

    A writer still adding to the tree (a workflow thread the terminator gave
    up on) can make the final ``rmdir`` fail with ``ENOTEMPTY``: that is
    retried, up to ``tries`` passes.

    Raises:
        OSError: the tree could not be removed.
    """
    for attempt in range(tries):
        try:
            shutil.rmtree(path, **{_RMTREE_ON_ERROR: _ignore_gone})  # type: ignore[arg-type]
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or attempt == tries - 1:
                raise
            continue
        if not os.path.lexists(path):
            return
    raise OSError(errno.ENOTEMPTY, "still being written to", path)


# -- what both share ----------------------------------------------------------------


class _AtomicOperation:
    """The exit both atomic operations share: roll back on an error or a kill, else commit.

    A subclass puts the new content in place (``_commit``, which ends with
    ``_fsync_folder``) and says what a success takes back (``_succeeded``).
    """

    #: The audit event of a rollback.
    _rolled_back_event: ClassVar[str]
    #: What the body writes, in messages ("temp", "staging folder").
    _temp_name: ClassVar[str]
    #: A new target's mode before the umask.
    _new_mode: ClassVar[int]

    path: str
    durable: bool
    _folder: str
    _target_stat: os.stat_result | None
    _scope: OperationScope | None
    _state: str

    def _abort(self) -> None:
        scope = self._scope
        assert scope is not None
        scope.rollback_now()
        scope.emit(self._rolled_back_event, {"path": self.path})

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._commit()
        except BaseException:
            if self._state != "committed":
                self._abort()
                raise
            # Committed, then the folder fsync failed or a deferred kill landed
            # as the section closed: the operation itself is done.
            self._succeeded()
            raise
        self._succeeded()

    def _commit(self) -> None:
        """Put the new content in place (inside ``scope.committing()`` when there is a scope)."""
        raise NotImplementedError

    def _succeeded(self) -> None:
        """Take the rollback hook and the journal entry back (after a commit, even a failed one)."""
        raise NotImplementedError

    def _give_target_mode(self, fd: int | None, temp: str) -> None:
        """Give the temp at ``fd``/``temp`` the owner (where permitted) and mode of the target.

        A new target gets ``_new_mode & ~umask``. ``chown`` is tried only when
        the owner differs and silently skipped when not permitted; set-user-ID
        and set-group-ID bits are then dropped, so a copy owned by someone else
        never gains them.
        """
        mine = os.fstat(fd) if fd is not None else os.stat(temp)
        target = self._target_stat
        if target is None:
            mode = self._new_mode & ~_current_umask(self._folder)
        else:
            mode = stat.S_IMODE(target.st_mode)
            if target.st_uid != mine.st_uid or target.st_gid != mine.st_gid:
                mode = _give_owner(fd, temp, target, mine, mode)
        if stat.S_IMODE(mine.st_mode) != mode:
            if fd is not None:
                os.fchmod(fd, mode)
            else:
                os.chmod(temp, mode)

    def _rolled_back_error(self) -> AtomicWriteError:
        """The error of a commit that finds its temp already rolled back (by the terminator)."""
        return AtomicWriteError(
            self.path, "rename", errno.ENOENT, f"the {self._temp_name} was already rolled back"
        )

    def _fsync_folder(self) -> None:
        """Make the rename durable (``durable`` only); the new content is already in place."""
        if not self.durable:
            return
        try:
            _fsync_dir(self._folder)
        except OSError as err:
            raise AtomicWriteError.from_os_error(
                self.path, "fsync folder", err, committed=True
            ) from None


# -- atomic_file -----------------------------------------------------------------------


class _TempIO(io.FileIO):
    """The temp's raw file: every write error names the target and the step."""

    _target: str

    def write(self, data: Any) -> int:
        try:
            # os.write (not FileIO.write): one code path for every write, which
            # fault-injection tests can reach. fileno() refuses a closed file.
            return os.write(self.fileno(), data)
        except OSError as exc:
            raise AtomicWriteError.from_os_error(self._target, "write", exc) from None


def _bad_mode(mode: str) -> ConfigurationError:
    """The error for a mode ``atomic_file`` cannot open, with a hint at what to do instead."""
    if "a" in mode:
        hint = (
            "appending cannot be atomic in place; read the old content and "
            "write old + new with mode 'w'"
        )
    else:
        hint = "atomic_file only writes a whole new file"
    return ConfigurationError(
        f"atomic_file cannot open mode {mode!r}: {hint} (modes: 'w', 'wt', 'wb', 'x', 'xt', 'xb')"
    )


class _AtomicFile(_AtomicOperation):
    """The context manager ``atomic_file`` returns; single use."""

    _rolled_back_event = "atomic_file_rolled_back"
    _temp_name = "temp"
    _new_mode = 0o666

    # Where every instance starts; an instance stores its own value only once
    # it changes (each store saved counts on the hot path).
    _scope: OperationScope | None = None
    _file: IO[Any] | None = None
    _fd = -1  # the temp's descriptor until the file object owns it
    _tmp: str | None = None
    _owner_thread = 0
    _state = "new"  # -> "open" -> "committed" | "rolled_back"
    _used = False
    exclusive = False
    _encoding: str | None = None
    _errors: str | None = None
    _newline: str | None = None
    _buffering = -1
    _store: Store | bool | None = None
    # Only a write inside a workflow has a lock: there the terminator's thread
    # may run the rollback hook while the owner commits. Outside one only the
    # owner thread touches the write, and making and taking a lock per write
    # costs about 7 us of a durable write's CPU time once the caches are cold.
    _lock: threading.Lock | None = None

    def __init__(
        self,
        path: object,
        mode: str,
        durable: bool,
        encoding: str | None,
        errors: str | None,
        newline: str | None,
        buffering: int,
        store: Store | bool | None,
    ) -> None:
        if not isinstance(mode, str):
            raise InvalidArgumentType(f"atomic_file mode must be a str (got {mode!r})")
        binary = mode in _BINARY_MODES
        if not binary and mode not in _TEXT_MODES:
            raise _bad_mode(mode)
        if durable is not True and durable is not False:
            raise InvalidArgumentType(f"durable must be a bool (got {durable!r})")
        if (
            type(buffering) is not int
            or buffering != -1
            or encoding is not None
            or errors is not None
            or newline is not None
        ):
            self._set_options(mode, binary, encoding, errors, newline, buffering)
        self.binary = binary
        self.path = _check_path(path, "atomic_file")
        if "x" in mode:
            self.exclusive = True
        self.durable = durable
        if store is not None:
            self._store = store

    def _set_options(
        self,
        mode: str,
        binary: bool,
        encoding: str | None,
        errors: str | None,
        newline: str | None,
        buffering: int,
    ) -> None:
        """Check and keep the options the common case leaves at their defaults."""
        if isinstance(buffering, bool) or not isinstance(buffering, int):
            raise InvalidArgumentType(f"buffering must be an int (got {buffering!r})")
        if buffering == 0 and not binary:
            raise ConfigurationError(f"buffering=0 needs a binary mode (got mode {mode!r})")
        if binary and (encoding is not None or errors is not None or newline is not None):
            raise ConfigurationError(
                f"encoding, errors and newline need a text mode (got mode {mode!r})"
            )
        if encoding is not None:
            try:
                info = codecs.lookup(encoding)
            except (LookupError, TypeError):
                raise ConfigurationError(f"unknown encoding {encoding!r}") from None
            if not getattr(info, "_is_text_encoding", True):
                raise ConfigurationError(
                    f"{encoding!r} is not a text encoding (a bytes-to-bytes codec)"
                )
        if errors is not None and not isinstance(errors, str):
            raise InvalidArgumentType(f"errors must be a str (got {errors!r})")
        if newline is not None and not isinstance(newline, str):
            raise InvalidArgumentType(f"newline must be a str or None (got {newline!r})")
        if newline not in _NEWLINES:
            raise ConfigurationError(
                f"newline must be None, '', '\\n', '\\r' or '\\r\\n' (got {newline!r})"
            )
        self._encoding = encoding
        self._errors = errors
        self._newline = newline
        self._buffering = buffering

    def __repr__(self) -> str:
        return f"<atomic_file {self.path!r} {self._state}>"

    # -- enter ---------------------------------------------------------------------

    def __enter__(self) -> IO[Any]:
        if self._used:
            raise ConfigurationError(f"atomic_file {self.path!r} can be entered only once")
        self._used = True
        target = self.path
        try:
            st: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise AtomicWriteError.from_os_error(target, "stat", exc) from None
        if st is not None and stat.S_ISLNK(st.st_mode):
            if self.exclusive:
                raise FileExistsError(errno.EEXIST, "exists (a symlink)", self.path)
            target = os.path.realpath(target)
            try:
                st = os.stat(target)
            except FileNotFoundError:
                st = None  # a dangling link: its target will be created
            except OSError as exc:
                raise AtomicWriteError.from_os_error(target, "stat", exc) from None
        if st is not None:
            if self.exclusive:
                raise FileExistsError(errno.EEXIST, "exists", self.path)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", self.path)
        self._target = target
        self._target_stat = st
        # target is absolute and normal (_check_path, realpath): os.path.split
        # comes down to one rfind.
        cut = target.rfind(os.sep) + 1
        head = target[:cut]  # the folder, with its trailing separator
        folder = self._folder = head[:-1] or os.sep
        name = target[cut:]
        wf = current_workflow()
        if wf is None:
            # No scope: outside a workflow no one else can run the rollback,
            # there is no kill to defer, no commit to audit (see _abort,
            # _commit), and a scope's hook list would only cost time.
            scope = None
            store = resolve_store(self._store, None)
        else:
            scope = self._scope = OperationScope(
                "fs", f"atomic_file {self.path}", self._store, workflow=wf
            )
            store = scope.store
            self._lock = threading.Lock()
        # Journal first: from here on, a SIGKILL leaves nothing the journal does
        # not name. The entry is this process's standing one for the folder
        # (written once): recovery removes whatever starts with its prefix once
        # the process is dead, so a write costs no journal write of its own.
        token = _standing_entry(store, folder)
        prefix = f"{TEMP_PREFIX}{token}-{_short(name)}-"
        try:
            fd, tmp = _make_temp(head, prefix)
        except OSError as exc:
            raise AtomicWriteError.from_os_error(self.path, "create temp", exc) from None
        self._fd, self._tmp = fd, tmp
        self._state = "open"
        if scope is not None:
            self._owner_thread = threading.get_ident()
            scope.on_rollback(self._remove_temp)
        try:
            self._file = self._open(fd, tmp)
        except BaseException:
            self._abort()
            raise
        return self._file

    def _open(self, fd: int, tmp: str) -> IO[Any]:
        raw = _TempIO(fd, "w")
        self._fd = -1  # the raw file owns the descriptor now
        try:
            raw._target = self.path
            raw.name = tmp
            buffering = self._buffering
            if buffering == 0:
                return raw
            size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
            buffered = io.BufferedWriter(raw, size)
            if self.binary:
                return buffered
            return io.TextIOWrapper(
                buffered,
                self._encoding,
                self._errors,
                self._newline,
                line_buffering=buffering == 1,
            )
        except BaseException:
            raw.close()
            raise

    # -- rollback hook -----------------------------------------------------------------

    def _remove_temp(self) -> None:
        """Rollback hook: remove the temp (from any thread, once)."""
        with self._lock if self._lock is not None else _NO_LOCK:
            if self._state == "committed":
                return
            self._state = "rolled_back"
            tmp, self._tmp = self._tmp, None
        if threading.get_ident() == self._owner_thread:
            self._close_quietly()
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError:
                log.exception("termsafe: could not remove temp %r; recovery will", tmp)

    def _close_quietly(self) -> None:
        f, self._file = self._file, None
        fd, self._fd = self._fd, -1
        if f is not None:
            try:
                f.close()  # closes the descriptor even when the final flush fails
            except Exception:
                log.debug("termsafe: closing the abandoned temp of %r failed", self.path)
        elif fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _abort(self) -> None:
        self._close_quietly()
        if self._scope is not None:
            super()._abort()
            return
        self._remove_temp()
        # A scope of its own, for the audit event only (no store to journal to).
        scope = OperationScope("fs", f"atomic_file {self.path}", False, workflow=None)
        scope.emit(self._rolled_back_event, {"path": self.path})

    # -- exit ----------------------------------------------------------------------

    def _commit(self) -> None:
        scope = self._scope
        if scope is None:  # outside a workflow: nothing to defer, shield or audit
            self._finish()
            self._replace()
            self._fsync_folder()
            return
        with scope.committing():
            self._finish()
            self._replace()
            # Before the folder fsync: the audit thread does its work while
            # this one waits for the disk.
            scope.emit("atomic_file_committed", {"path": self.path, "durable": self.durable})
            self._fsync_folder()

    def _succeeded(self) -> None:
        if self._scope is not None:
            self._scope.succeeded()

    def _finish(self) -> None:
        """Flush, copy owner and mode, fsync and close the temp."""
        f = self._file
        assert f is not None
        if f.closed:
            fd = None
        else:
            f.flush()  # write errors name the path and "write" (_TempIO)
            fd = f.fileno()
        tmp = self._tmp
        if tmp is None:
            raise self._rolled_back_error()
        step = "chmod"
        try:
            self._give_target_mode(fd, tmp)
            if self.durable:
                step = "fsync"
                if fd is not None:
                    os.fsync(fd)
                else:  # the caller closed the file: fsync it through a new descriptor
                    rfd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    try:
                        os.fsync(rfd)
                    finally:
                        os.close(rfd)
            step = "close"
            self._file = None
            f.close()
        except AtomicWriteError:
            raise
        except OSError as exc:
            raise AtomicWriteError.from_os_error(self.path, step, exc) from None

    def _replace(self) -> None:
        lock = self._lock
        if lock is None:  # outside a workflow: nothing else can roll the write back
            self._rename()
            return
        with lock:
            if self._tmp is None or self._state != "open":
                raise self._rolled_back_error()
            self._rename()

    def _rename(self) -> None:
        """Rename the temp over the target (exclusive mode: only if there is none)."""
        tmp = self._tmp
        assert tmp is not None
        try:
            if self.exclusive:
                _rename_noreplace(tmp, self._target)
            else:
                os.replace(tmp, self._target)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, "was created by someone else while it was written", self.path
            ) from None
        except OSError as exc:
            raise AtomicWriteError.from_os_error(self.path, "rename", exc) from None
        self._state = "committed"
        self._tmp = None


@overload
def atomic_file(
    path: StrPath,
    mode: TextMode = "w",
    *,
    durable: bool = True,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    buffering: int = -1,
    store: Store | bool | None = None,
) -> AbstractContextManager[TextIO]: ...


@overload
def atomic_file(
    path: StrPath,
    mode: BinaryMode,
    *,
    durable: bool = True,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    buffering: int = -1,
    store: Store | bool | None = None,
) -> AbstractContextManager[BinaryIO]: ...


@overload
def atomic_file(
    path: StrPath,
    mode: str,
    *,
    durable: bool = True,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    buffering: int = -1,
    store: Store | bool | None = None,
) -> AbstractContextManager[IO[Any]]: ...


def atomic_file(
    path: StrPath,
    mode: str = "w",
    *,
    durable: bool = True,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    buffering: int = -1,
    store: Store | bool | None = None,
) -> AbstractContextManager[Any]:
    """Write a file so that it holds the old content or the new, never a mix.

    Yields a file object on a temp made as ``mkstemp`` makes one, beside the target
    (named ``.termsafe-tmp-<name>-...``; its name is journaled before it
    exists). On a clean exit: flush, give it the mode (and, where permitted, the
    owner) of the file it replaces (a new file gets ``0o666 & ~umask``), fsync,
    ``os.replace`` it over the target and fsync the folder, all as one shielded
    ``fs`` critical section. On an exception or a kill the temp is removed and
    the old file stands; a temp left by a SIGKILL is removed by
    ``sweep_journal``. Archives (``zipfile``, ``tarfile``) written into the
    yielded binary file are atomic the same way.

    A symlink target is written through: the file it points to is replaced and
    the link stays.

    Args:
        path: The file to write.
        mode: ``"w"``/``"wt"`` (text), ``"wb"`` (binary); ``"x"``/``"xt"``/``"xb"``
            fail if the file exists, checked on entry and again, atomically,
            when the new file is put in place. Appending is refused: it cannot
            be atomic in place.
        durable: ``False`` skips both fsyncs: still atomic, not crash-durable
            (a power loss may leave the old content, or an empty file on some
            file systems).
        encoding: As for ``open()`` (text modes).
        errors: As for ``open()`` (text modes).
        newline: As for ``open()`` (text modes).
        buffering: As for ``open()``: ``0`` unbuffered (binary), ``1`` line
            buffered (text), ``> 1`` the buffer size, ``-1`` the default.
        store: Where to journal the temp: a ``Store``, ``None`` for the
            workflow's (else the default one under ``TERMSAFE_HOME``), ``False``
            for no journal (a SIGKILLed writer's temp is then only found by the
            opt-in name sweep).

    Returns:
        A context manager yielding the file object (``TextIO`` or ``BinaryIO``).

    Raises:
        InvalidArgumentType: ``path``, ``mode``, ``durable``, ``buffering``,
            ``errors`` or ``newline`` has the wrong type.
        ConfigurationError: ``mode`` is not a write mode (``"a"``, ``"r"``, ``"w+"``,
            ...), the options do not fit the mode, ``encoding`` is unknown or
            not a text encoding, or ``newline`` is not one ``open()`` takes.
        FileExistsError: exclusive mode and the file exists (on entry or at commit).
        IsADirectoryError: ``path`` is a directory (on entry).
        AtomicWriteError: a step failed (``stat``, ``create temp``, ``write``,
            ``chmod``, ``fsync``, ``close``, ``rename``, ``fsync folder``); it names
            the path, the step and the OS error. Only ``fsync folder`` happens
            after the new file is in place (``committed`` is then ``True``).
        StoreCorrupt: the default store's file is not a termsafe store.
    """
    return _AtomicFile(path, mode, durable, encoding, errors, newline, buffering, store)


# -- atomic_directory ------------------------------------------------------------------


class _AtomicDirectory(_AtomicOperation):
    """The context manager ``atomic_directory`` returns; single use."""

    _rolled_back_event = "atomic_directory_rolled_back"
    _temp_name = "staging folder"
    _new_mode = 0o777

    def __init__(self, path: object, durable: bool, store: Store | bool | None) -> None:
        if not isinstance(durable, bool):
            raise InvalidArgumentType(f"durable must be a bool (got {durable!r})")
        self.path = _check_path(path, "atomic_directory")
        self.durable = durable
        self._store = store
        self._scope: OperationScope | None = None
        self._entry: int | None = None
        self._lock = threading.Lock()
        self._state = "new"  # -> "open" -> "moved_old" -> "committed" | "rolled_back"
        self._staging: str | None = None
        self._old_at: str | None = None
        self._old_removed = True
        self._used = False
        self._owner_thread = 0
        # The staging folder the terminator removed on behalf of a thread it
        # gave up on: the owner removes it again on its way out (see _abort).
        self._left_to_owner: str | None = None

    def __repr__(self) -> str:
        return f"<atomic_directory {self.path!r} {self._state}>"

    def __enter__(self) -> Path:
        if self._used:
            raise ConfigurationError(f"atomic_directory {self.path!r} can be entered only once")
        self._used = True
        target = os.path.realpath(self.path) if os.path.islink(self.path) else self.path
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise AtomicWriteError.from_os_error(self.path, "stat", exc) from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "is not a directory", self.path)
        self._target = target
        self._target_stat = st
        folder, name = os.path.split(target)
        self._folder = folder
        token = _token()
        prefix = f"{STAGE_PREFIX}{_short(name)}-{token}-"
        self._backup = os.path.join(folder, f"{BACKUP_PREFIX}{_short(name)}-{token}")
        self._owner_thread = threading.get_ident()
        scope = self._scope = OperationScope("fs", f"atomic_directory {self.path}", self._store)
        self._entry = scope.journal(
            "temp_dir",
            {"folder": folder, "prefix": prefix, "target": target, "backup": self._backup},
        )
        try:
            staging = tempfile.mkdtemp(prefix=prefix, dir=folder)
        except OSError as exc:
            scope.unjournal(self._entry)
            raise AtomicWriteError.from_os_error(self.path, "create staging", exc) from None
        self._staging = self._staging_path = staging
        self._state = "open"
        scope.on_rollback(self._remove_staging)
        return Path(staging)

    def _remove_staging(self) -> None:
        """Rollback hook: put the old tree back if it was moved, remove the staging folder."""
        with self._lock:
            if self._state == "committed":
                return
            state, self._state = self._state, "rolled_back"
            staging, self._staging = self._staging, None
            if state == "moved_old":
                # Killed between the two renames of the fallback swap.
                try:
                    os.rename(self._backup, self._target)
                except OSError:
                    log.exception(
                        "termsafe: could not restore %r from %r; recovery will",
                        self._target,
                        self._backup,
                    )
                    return
        if staging is not None:
            try:
                _remove_tree(staging)
            except OSError:
                log.exception(
                    "termsafe: could not remove staging folder %r; recovery will", staging
                )
                return
        if threading.get_ident() != self._owner_thread:
            # Run by the terminator for a thread it gave up on: that thread may
            # still be writing into the staging folder (even recreate it). The
            # journal entry stays; the owner removes the folder again and drops
            # the entry when it comes back, or recovery does if it never does.
            self._left_to_owner = self._staging_path
            return
        assert self._scope is not None
        self._scope.unjournal(self._entry)

    def _abort(self) -> None:
        super()._abort()
        staging, self._left_to_owner = self._left_to_owner, None
        if staging is None:
            return
        try:
            _remove_tree(staging)
        except OSError:
            log.exception("termsafe: could not remove staging folder %r; recovery will", staging)
            return
        assert self._scope is not None
        self._scope.unjournal(self._entry)

    def _commit(self) -> None:
        scope = self._scope
        assert scope is not None
        try:
            with scope.committing():
                self._prepare()
                self._swap()
                self._fsync_folder()
        finally:
            if self._state == "committed":
                self._old_removed = self._remove_old()

    def _succeeded(self) -> None:
        scope = self._scope
        assert scope is not None
        # An old tree left behind keeps its journal entry: recovery removes it.
        scope.succeeded(keep_journal=not self._old_removed)
        self._emit_committed()

    def _emit_committed(self) -> None:
        scope = self._scope
        if scope is not None and scope.workflow is not None:
            scope.emit("atomic_directory_committed", {"path": self.path})

    def _prepare(self) -> None:
        staging = self._staging
        if staging is None:
            raise self._rolled_back_error()
        step = "chmod"
        try:
            self._give_target_mode(None, staging)
            if self.durable:
                step = "fsync"
                _fsync_tree(staging)
        except OSError as exc:
            raise AtomicWriteError.from_os_error(self.path, step, exc) from None

    def _swap(self) -> None:
        with self._lock:
            staging = self._staging
            if staging is None or self._state != "open":
                raise self._rolled_back_error()
            target = self._target
            try:
                if self._target_stat is None:
                    os.rename(staging, target)
                elif _renameat2(staging, target, _RENAME_EXCHANGE):
                    # One atomic step: the new tree is at target, the old one
                    # at the staging name (which recovery removes).
                    self._old_at = staging
                else:
                    os.rename(target, self._backup)
                    self._state = "moved_old"
                    try:
                        os.rename(staging, target)
                    except OSError:
                        os.rename(self._backup, target)
                        self._state = "open"
                        raise
                    self._old_at = self._backup
            except OSError as exc:
                raise AtomicWriteError.from_os_error(self.path, "rename", exc) from None
            self._state = "committed"
            self._staging = None

    def _remove_old(self) -> bool:
        """Remove the old tree (after the swap; outside the commit's critical work).

        Returns whether it is gone; if not, the journal entry must stay.
        """
        old, self._old_at = self._old_at, None
        if old is None:
            return True
        try:
            if old == self._backup:
                # Move it under the staging prefix (the staging name is free
                # now) so recovery never takes a half-removed tree for a
                # backup to restore.
                os.rename(old, self._staging_path)
                old = self._staging_path
            _remove_tree(old)
        except OSError:
            log.exception(
                "termsafe: could not remove the old tree %r of %r; recovery will", old, self.path
            )
            return False
        return True


def atomic_directory(
    path: StrPath, *, durable: bool = True, store: Store | bool | None = None
) -> AbstractContextManager[Path]:
    """Build a directory beside ``path`` and swap it in, or leave ``path`` untouched.

    Yields a staging folder (``.termsafe-stage-<name>-...``, journaled before it
    exists) in the same parent as ``path``. On a clean exit, inside one
    shielded ``fs`` critical section: the tree is fsynced (``durable``), the
    staging folder gets the mode (and owner, where permitted) of the old
    directory (a new one gets ``0o777 & ~umask``), then replaces ``path``:

    * on Linux with ``renameat2(RENAME_EXCHANGE)``: one atomic exchange;
      ``path`` always names a complete tree, old or new;
    * elsewhere (or on a file system without it): ``path`` is renamed to a
      journaled backup name (``.termsafe-old-<name>-<token>``), then the
      staging folder to ``path``. A SIGKILL between the two renames leaves
      ``path`` missing, the old tree at the backup name and the new one at the
      staging name; ``sweep_journal`` renames the backup back to ``path`` and
      removes the staging folder (the old tree wins).

    Then the parent is fsynced and the old tree removed. On an exception or a
    kill the staging folder is removed and ``path`` is untouched. A symlink
    ``path`` is written through, like ``atomic_file``.

    Args:
        path: The directory to create or replace (its parent must exist).
        durable: ``False`` skips the fsyncs of the tree and the parent.
        store: Where to journal; see ``atomic_file``.

    Returns:
        A context manager yielding the staging folder as a ``Path``.

    Raises:
        InvalidArgumentType: ``path`` or ``durable`` has the wrong type.
        NotADirectoryError: ``path`` exists and is not a directory.
        AtomicWriteError: a step failed (``stat``, ``create staging``, ``chmod``,
            ``fsync``, ``rename``, ``fsync folder``), naming the path and the
            step; ``committed`` tells whether the new tree is in place.
        StoreCorrupt: the default store's file is not a termsafe store.
    """
    return _AtomicDirectory(path, durable, store)


def _iter_prefixed(folder: str, prefix: str) -> Iterator[os.DirEntry[str]]:
    """Entries of ``folder`` whose name starts with ``prefix`` (none if it is gone)."""
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(prefix):
                    yield entry
    except (FileNotFoundError, NotADirectoryError):
        return
