"""The control socket: kill, status and ps from another process, authenticated by the OS.

A process that hosts workflows calls ``serve_control(terminator)``; the
supervisor (``termsafe run``) does the same for the command it runs. Either
listens on a Unix socket ``$TERMSAFE_HOME/control/<pid>-<start>.sock`` (one
listener thread) and records its workflows in the store's runs table, with the
socket's path, so ``termsafe ps`` lists them. ``termsafe kill ID`` asks the
sockets which host runs ``ID`` (``_client.find_host``), and the store only when
they cannot tell.

Trust model
===========

Who asks is read from the operating system, never from the request: the
kernel reports the connecting process's pid, uid and gid (``SO_PEERCRED``).
The uid's user name is the principal's id (kind ``user``); the access policy
(``$TERMSAFE_HOME/policy.json``) adds roles and teams, and names the admins
(default: ``root``). The request then goes through ``can_kill`` like any
other kill: the owner, an admin, or a team lead of the workflow's team may
kill it.

The control folder is ``0o711`` and the socket ``0o666``: any local user who
can reach the folder may *connect*, so that every attempt, including a refused
one by another user, is answered and audited with the caller's real identity
(an owner-only socket would make the kernel refuse other users before termsafe
sees them, and "every kill attempt is audited" would be false). Authorization
is entirely peer credentials plus ``can_kill``. Reaching the folder at all is
governed by ``TERMSAFE_HOME``'s own mode (``0o700`` when termsafe creates it):
``chmod 711`` it to let other users in.

Protocol: one JSON object per line each way. Requests ``{"op": "kill",
"workflow_id": ..., "reason": ..., "force": false}``, ``{"op": "status",
"workflow_id": ...}``, ``{"op": "ps"}``, ``{"op": "dependency_ended",
"dependency": ...}``, ``{"op": "ping"}``; every answer has ``"ok"`` and, when
false, ``"error"``. ``kill`` answers at once with the decision (``allowed``,
``deferred`` or ``refused``, and the reason); the kill proceeds in the
background.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import selectors
import socket
import stat
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs

from . import _permissions as perms
from ._client import ACCEPTED, CONTROL_DIR, ControlClient, _sock_address
from ._exceptions import (
    ConfigurationError,
    ControlError,
    InvalidArgumentType,
    KillRefused,
    TerminatorClosed,
)
from ._permissions import Principal
from ._procs import Identity, current_identity, identity_alive

if TYPE_CHECKING:
    import logging

    from ._audit import AuditEvent
    from ._store import Run, SQLiteStore, Store
    from ._terminator import Terminator
    from ._workflow import Workflow

__all__ = [
    "AccessPolicy",
    "ControlServer",
    "KillAnswer",
    "Peer",
    "serve_control",
]


def _log() -> logging.Logger:
    # Imported when something goes wrong, not by every ``termsafe kill``.
    import logging

    return logging.getLogger("termsafe")


CONTROL_DIR_MODE: Final = 0o711
SOCKET_MODE: Final = 0o666
#: The policy file under ``TERMSAFE_HOME``.
POLICY_FILE: Final = "policy.json"
#: A request line longer than this is refused (and the connection closed).
MAX_LINE: Final = 1 << 16
OPS: Final = ("dependency_ended", "kill", "ping", "ps", "status")
FINAL_STATES: Final = ("completed", "failed", "terminated", "killed")


# -- who is calling -----------------------------------------------------------------


@attrs.frozen
class Peer:
    """The process at the other end of a control connection, as the kernel reports it.

    Attributes:
        pid: Its process id.
        uid: Its effective user id.
        gid: Its effective group id.
        user: The user name of ``uid`` (``#<uid>`` when it has none).
    """

    pid: int
    uid: int
    gid: int
    user: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "user": self.user}


_user_names: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The login name of ``uid``, or ``#<uid>`` when the user database has none."""
    name = _user_names.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"#{uid}"
        _user_names[uid] = name
    return name


def peer_of(sock: socket.socket) -> Peer | None:
    """The kernel's credentials of ``sock``'s peer, or ``None`` where the OS has no way to tell."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, size))
    return Peer(pid, uid, gid, user_name(uid))


# -- the access policy --------------------------------------------------------------


def _strings(value: object, what: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{source}: {what} must be a list of names (got {value!r})")
    return tuple(value)


def _names(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


@attrs.frozen
class AccessPolicy:
    """Maps OS users to principals for the control socket.

    The file ``$TERMSAFE_HOME/policy.json``:

        {"users": {"alice": {"roles": ["team-lead"], "teams": ["data"]}},
         "admins": ["root", "ops"]}

    ``users`` (optional) gives a user roles and teams; ``admins`` (optional,
    default ``["root"]``) lists the users who get the ``admin`` role. A user
    the file does not name is a principal with no roles and no teams: still
    the owner of the workflows they started.

    Args:
        users: User name -> ``(roles, teams)``.
        admins: User names with the ``admin`` role.
        source: Where the policy came from (for messages).
    """

    users: Mapping[str, tuple[frozenset[str], frozenset[str]]] = attrs.field(factory=dict)
    admins: frozenset[str] = attrs.field(default=frozenset({"root"}), converter=_names)
    source: str = "default"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<string>") -> AccessPolicy:
        """Parse the policy file format.

        Raises:
            ConfigurationError: the text is not a policy (naming what is wrong).
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"{source}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigurationError(f"{source}: must be a JSON object (got {data!r})")
        unknown = sorted(set(data) - {"users", "admins"})
        if unknown:
            raise ConfigurationError(f"{source}: unknown key {unknown[0]!r} (known: admins, users)")
        users_raw = data.get("users", {})
        if not isinstance(users_raw, dict):
            raise ConfigurationError(f"{source}: users must be an object (got {users_raw!r})")
        users: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for name, grant in users_raw.items():
            if not isinstance(grant, dict):
                raise ConfigurationError(
                    f"{source}: users[{name!r}] must be an object (got {grant!r})"
                )
            extra = sorted(set(grant) - {"roles", "teams"})
            if extra:
                raise ConfigurationError(
                    f"{source}: users[{name!r}] has unknown key {extra[0]!r} (known: roles, teams)"
                )
            roles = _strings(grant.get("roles", []), f"users[{name!r}].roles", source)
            teams = _strings(grant.get("teams", []), f"users[{name!r}].teams", source)
            users[name] = (frozenset(roles), frozenset(teams))
        admins = _strings(data.get("admins", ["root"]), "admins", source)
        return cls(users, frozenset(admins), source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AccessPolicy:
        """Read a policy file.

        Raises:
            ConfigurationError: the file is not a valid policy.
            OSError: the file cannot be read.
        """
        source = os.fspath(path)
        with open(source, "rb") as fh:
            return cls.from_json(fh.read(), source)

    def principal(self, user: str, uid: int | None = None) -> Principal:
        """The principal of OS user ``user`` (uid 0 counts as ``root``)."""
        roles, teams = self.users.get(user, (frozenset(), frozenset()))
        if user in self.admins or (uid == 0 and "root" in self.admins):
            roles = roles | {"admin"}
        return Principal(user, kind="user", roles=roles, teams=teams)


class _PolicySource:
    """A fixed policy, or a file re-read whenever it changes (fail closed when broken)."""

    def __init__(self, policy: AccessPolicy | str | os.PathLike[str] | None, home: Path) -> None:
        self._fixed: AccessPolicy | None = None
        self._path: str | None = None
        self._key: tuple[int, int, int] | None = None
        self._cached = AccessPolicy()
        self._error: str | None = None
        self._lock = threading.Lock()
        if isinstance(policy, AccessPolicy):
            self._fixed = policy
        elif policy is None:
            self._path = os.fspath(home / POLICY_FILE)
        elif isinstance(policy, (str, os.PathLike)):
            self._path = os.fspath(policy)
            if not os.path.exists(self._path):
                raise ConfigurationError(f"access policy file {self._path!r} does not exist")
        else:
            raise InvalidArgumentType(
                f"policy must be an AccessPolicy or a path to a policy file (got {policy!r})"
            )
        self.get()

    def get(self) -> tuple[AccessPolicy, str | None]:
        """The current policy, and why it grants nothing when the file is broken."""
        if self._fixed is not None:
            return self._fixed, None
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return AccessPolicy(), None
        except OSError as exc:
            return AccessPolicy(admins=()), f"access policy {self._path!r} unreadable: {exc}"
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if key != self._key:
                try:
                    self._cached, self._error = AccessPolicy.load(self._path), None
                except (OSError, ConfigurationError) as exc:
                    # Fail closed: a broken file grants no role to anyone (owners
                    # keep the right to kill their own workflows).
                    self._cached = AccessPolicy(admins=(), source=self._path)
                    self._error = f"access policy ignored: {exc}"
                self._key = key
            return self._cached, self._error


# -- socket paths -----------------------------------------------------------------------


def control_dir(home: str | os.PathLike[str]) -> Path:
    """The folder of the control sockets under ``home``."""
    return Path(home) / CONTROL_DIR


def socket_path_for(home: str | os.PathLike[str], ident: Identity) -> Path:
    """Where the process ``ident`` listens."""
    return control_dir(home) / f"{ident.pid}-{round(ident.start_time * 100)}.sock"


def identity_of_socket(path: str | os.PathLike[str], host: str) -> Identity | None:
    """The identity encoded in a socket's name (``<pid>-<start*100>.sock``), if it is one."""
    name = os.path.basename(os.fspath(path))
    if not name.endswith(".sock"):
        return None
    pid, _, start = name[: -len(".sock")].partition("-")
    if not (pid.isdigit() and start.isdigit()):
        return None
    return Identity(host, int(pid), int(start) / 100)


def _prepare_dir(folder: Path) -> None:
    folder.mkdir(mode=CONTROL_DIR_MODE, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != CONTROL_DIR_MODE:
        os.chmod(folder, CONTROL_DIR_MODE)  # the umask trimmed mkdir's mode


# -- targets: what a server controls ------------------------------------------------------


class ControlTarget(Protocol):
    """What a ``ControlServer`` serves: a terminator's workflows, or a supervised run."""

    def control_kill(
        self,
        who: Principal,
        peer: Peer,
        workflow_id: str,
        reason: str,
        force: bool,
        note: str | None,
    ) -> dict[str, Any]:
        """Decide and start a kill; return the answer (``decision``, ``reason``)."""

    def control_status(self, workflow_id: str) -> dict[str, Any] | None:
        """A workflow's live status, or ``None`` when there is no such workflow."""

    def control_ps(self) -> list[dict[str, Any]]:
        """The live workflows' status."""

    def control_dependency_ended(self, dependency_id: str, state: str) -> list[str]:
        """A dependency ended (verified in the store); return the ids notified."""


def dependency_final_state(store: Store, dependency_id: str) -> str | None:
    """``terminated`` or ``killed`` when the store shows ``dependency_id`` ended that way.

    The most recent run of that workflow id must be in that final state, and no
    run of it may be live: a notification is only a hint, and this is what
    stops anyone from cascading a kill with a false one.
    """
    runs = [r for r in store.runs() if r.workflow_id == dependency_id]
    if not runs or any(r.state not in FINAL_STATES for r in runs):
        return None
    last = max(runs, key=lambda r: (r.ended_at or 0.0, r.started_at))
    return last.state if last.state in ("terminated", "killed") else None


def notify_dependents(store: Store, dependency_id: str, *, timeout: float = 1.0) -> tuple[str, ...]:
    """Tell the live runs that depend on ``dependency_id`` that it ended.

    Best effort: a run whose socket cannot be reached is skipped.

    Returns:
        The run ids that took the notification.
    """
    told = []
    for run in store.runs(live_only=True):
        deps = run.info.get("depends_on") or ()
        sock = run.info.get("socket")
        if dependency_id not in deps or not isinstance(sock, str):
            continue
        try:
            with ControlClient(sock, timeout=timeout) as client:
                client.request({"op": "dependency_ended", "dependency": dependency_id})
        except (ControlError, ConfigurationError):
            continue
        told.append(run.run_id)
    return tuple(told)


# -- the server ---------------------------------------------------------------------------


#: Connections open at once; more are closed at once (a local user cannot exhaust fds).
MAX_CONNECTIONS: Final = 256
#: Unsent answer bytes a connection may hold (a client that never reads is dropped).
MAX_PENDING: Final = 1 << 24


class _Conn:
    __slots__ = ("buf", "closing", "out", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: Peer | None) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = b""
        self.out = bytearray()
        self.closing = False


class ControlServer:
    """A listening control socket (what ``serve_control`` returns).

    Use it as a context manager, or call ``close()``: that stops the listener
    thread, removes the socket file and writes the runs still queued.

    Attributes:
        path: The socket's path (also in each run's ``info["socket"]``).
    """

    def __init__(
        self,
        target: ControlTarget,
        home: Path,
        policy: AccessPolicy | str | os.PathLike[str] | None,
        *,
        store: SQLiteStore,
        registry: _RunRegistry | None = None,
        on_close: Iterable[Any] = (),
        events: Any = None,
    ) -> None:
        self._target = target
        self._events = events
        self._store = store
        self._registry = registry
        self._on_close = list(on_close)
        self._policy = _PolicySource(policy, home)
        folder = control_dir(home)
        _prepare_dir(folder)
        self.path = os.fspath(socket_path_for(home, current_identity()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a leftover of a process that had our pid and start
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _sock_address(sock, self.path, connect=False)
            os.chmod(self.path, SOCKET_MODE)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="termsafe-control", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<ControlServer {self.path!r}{' closed' if self._closed else ''}>"

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every workflow started so far is written to the runs table.

        Returns:
            Whether everything was written within ``timeout``.
        """
        if self._registry is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        # Workflows reach the registry through the terminator's audit events.
        if self._events is not None and not self._events.flush(timeout):
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._registry.flush(left)

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, remove the socket and write the queued runs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._registry is not None:
            self._registry.close(timeout)
        for fn in self._on_close:
            fn()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the listener thread ----------------------------------------------------------

    def _serve(self) -> None:
        # One thread, non-blocking sockets: a client that connects and never
        # reads (or never writes) holds up nobody else's kill.
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._closed:
                for key, mask in sel.select():
                    if key.data == "wake":
                        continue
                    if key.data is None:
                        self._accept(sel)
                        continue
                    conn = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(sel, conn)
                    if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                        self._flush(sel, conn)
        except Exception:
            _log().exception("termsafe: the control listener failed; %s stops answering", self.path)
        finally:
            for key in list(sel.get_map().values()):
                if isinstance(key.data, _Conn):
                    key.data.sock.close()
            sel.close()
            self._sock.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log().warning("termsafe: accept on %s failed: %s", self.path, exc)
                return
            if len(sel.get_map()) - 2 >= MAX_CONNECTIONS:
                conn.close()
                continue
            try:
                peer = peer_of(conn)
            except OSError:
                peer = None
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, _Conn(conn, peer))

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()

    def _read(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        if conn.closing:
            return
        try:
            data = conn.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sel, conn)
            return
        conn.buf += data
        while b"\n" in conn.buf and not conn.closing:
            line, conn.buf = conn.buf.split(b"\n", 1)
            self._reply(sel, conn, self._handle(line, conn.peer))
        if len(conn.buf) > MAX_LINE and not conn.closing:
            conn.buf = b""
            conn.closing = True
            self._reply(sel, conn, _error(f"request longer than {MAX_LINE} bytes"))

    def _reply(self, sel: selectors.BaseSelector, conn: _Conn, answer: dict[str, Any]) -> None:
        conn.out += json.dumps(answer, separators=(",", ":")).encode() + b"\n"
        if len(conn.out) > MAX_PENDING:
            self._drop(sel, conn)
            return
        self._flush(sel, conn)

    def _flush(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(sel, conn)
            return
        del conn.out[:sent]
        if not conn.out and conn.closing:
            self._drop(sel, conn)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if sel.get_key(conn.sock).events != events:
            sel.modify(conn.sock, events, conn)

    def _handle(self, line: bytes, peer: Peer | None) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return _error(f"request is not JSON: {line[:80]!r}")
        if not isinstance(req, dict):
            return _error(f"request must be a JSON object (got {req!r})"[:200])
        op = req.get("op")
        try:
            if op == "kill":
                return self._kill(req, peer)
            if op == "status":
                wid = _req_str(req, "workflow_id")
                status = self._target.control_status(wid)
                if status is None:
                    return {"ok": True, "found": False, "workflow_id": wid}
                return {"ok": True, "found": True, **status}
            if op == "ps":
                return {"ok": True, "workflows": self._target.control_ps()}
            if op == "dependency_ended":
                dep = _req_str(req, "dependency")
                state = dependency_final_state(self._store, dep)
                if state is None:
                    return _error(
                        f"the store does not show dependency {dep!r} terminated or killed"
                    )
                return {"ok": True, "notified": self._target.control_dependency_ended(dep, state)}
            if op == "ping":
                return {"ok": True, "pid": os.getpid()}
        except _BadRequest as exc:
            return _error(str(exc))
        except Exception as exc:
            _log().exception("termsafe: control request %r failed", op)
            return _error(f"{op} failed: {type(exc).__name__}: {exc}")
        return _error(f"unknown op {op!r} (known: {', '.join(OPS)})")

    def _kill(self, req: dict[str, Any], peer: Peer | None) -> dict[str, Any]:
        wid = _req_str(req, "workflow_id")
        reason = req.get("reason", "")
        force = req.get("force", False)
        if not isinstance(reason, str):
            raise _BadRequest(f"reason must be a string (got {reason!r})")
        if not isinstance(force, bool):
            raise _BadRequest(f"force must be true or false (got {force!r})")
        if peer is None:
            # No way to know who asks: nobody may kill (fail closed).
            peer = Peer(0, -1, -1, "unknown")
            who = Principal("unknown", kind="external")
            return self._target.control_kill(
                who, peer, wid, reason, force, "peer credentials are not available on this OS"
            )
        policy, note = self._policy.get()
        who = policy.principal(peer.user, peer.uid)
        return self._target.control_kill(who, peer, wid, reason, force, note)


class _BadRequest(Exception):
    pass


def _req_str(req: dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"{key} must be a non-empty string (got {value!r})")
    return value


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def kill_answer(
    workflow_id: str,
    decision: str,
    reason: str,
    who: Principal,
    peer: Peer,
    note: str | None,
) -> dict[str, Any]:
    """The wire form of a kill decision."""
    answer: dict[str, Any] = {
        "ok": True,
        "workflow_id": workflow_id,
        "decision": decision,
        "reason": reason,
        "principal": who.as_dict(),
        "peer": peer.as_dict(),
    }
    if note:
        answer["note"] = note
    return answer


# -- a terminator's workflows ------------------------------------------------------------


def workflow_status(wf: Workflow) -> dict[str, Any]:
    """What ``status`` and ``ps`` report about a live workflow."""
    kill = wf.kill
    return {
        "workflow_id": wf.id,
        "owner": wf.owner,
        "team": wf.team,
        "state": wf.state.value,
        "phase": kill.phase if kill is not None else None,
        "kill_reason": kill.reason if kill is not None else None,
        "deferred": bool(kill is not None and kill.deferred),
        "sections": [s.kind for s in list(wf.sections)],
        "pending_hooks": wf.pending_hooks,
        "depends_on": list(wf.depends_on),
        "backend": wf.backend,
        "pid": os.getpid(),
    }


class _TerminatorTarget:
    def __init__(self, term: Terminator) -> None:
        self.term = term

    def control_kill(
        self,
        who: Principal,
        peer: Peer,
        workflow_id: str,
        reason: str,
        force: bool,
        note: str | None,
    ) -> dict[str, Any]:
        term = self.term
        try:
            handle = term.kill(workflow_id, by=who, reason=reason, force=force)
        except KillRefused as exc:
            decision, why = "refused", exc.decision.reason
        except TerminatorClosed:
            decision, why = "refused", perms.FINISHED.reason
            # kill() refused before auditing: the trail must still show the attempt.
            term._pipe.emit(
                "kill_refused",
                workflow_id,
                who.as_dict(),
                reason,
                None,
                {"decision": why, "terminator": "closed"},
            )
        else:
            deferred = handle.deferred
            decision = "deferred" if deferred else "allowed"
            why = perms.IN_SECTION.reason if deferred else perms.OK.reason
        details: dict[str, Any] = {
            "op": "kill",
            "peer": peer.as_dict(),
            "decision": decision,
            "why": why,
            "force": force,
        }
        if note:
            details["note"] = note
        term._pipe.emit("control_request", workflow_id, who.as_dict(), reason, None, details)
        return kill_answer(workflow_id, decision, why, who, peer, note)

    def control_status(self, workflow_id: str) -> dict[str, Any] | None:
        try:
            wf = self.term.get(workflow_id)
        except LookupError:
            return None
        return workflow_status(wf)

    def control_ps(self) -> list[dict[str, Any]]:
        return [workflow_status(wf) for wf in self.term.workflows()]

    def control_dependency_ended(self, dependency_id: str, state: str) -> list[str]:
        from ._states import WorkflowState

        term = self.term
        ids = [wf.id for wf in term.workflows() if dependency_id in wf.depends_on]
        if ids:
            term._notify_dependents(dependency_id, WorkflowState(state))
        return ids


class _Pending:
    """A workflow the registry knows of; its row is written with the next batch."""

    __slots__ = (
        "ended_at",
        "info",
        "owner",
        "run_id",
        "started_at",
        "state",
        "team",
        "terminating",
        "workflow_id",
    )

    def __init__(
        self, workflow_id: str, owner: str | None, team: str | None, info: dict[str, Any]
    ) -> None:
        self.run_id: str | None = None  # given when its batch is taken
        self.workflow_id = workflow_id
        self.owner = owner
        self.team = team
        self.state = "running"
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.info = info
        self.terminating = False


# What uuid.UUID(version=4) clears and sets: the version nibble and the variant bits.
_V4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET: Final = (0x4000 << 64) | (0x8000 << 48)


def _run_ids(n: int) -> list[str]:
    """``n`` run ids as ``uuid.uuid4().hex`` makes them, from one read of the OS's randomness.

    One ``os.urandom`` per batch, not one per run: each call releases the GIL,
    and a registry that dropped it for every workflow had the workflow threads
    and the audit thread hand it back and forth.
    """
    raw = os.urandom(16 * n)
    return [
        f"{int.from_bytes(raw[i : i + 16], 'big') & _V4_CLEAR | _V4_SET:032x}"
        for i in range(0, 16 * n, 16)
    ]


class _RunRegistry:
    """Writes a terminator's workflows to the runs table, in batches, off the workflow's path.

    It listens to the terminator's audit events (``workflow_started``,
    ``kill_requested``, ``workflow_finished``): starting a workflow costs it
    nothing more than the event it already emits. A thread of its own writes
    each batch in one transaction. A workflow that ends (or is killed) before
    its row was written is written once, in its latest state.
    """

    def __init__(self, store: SQLiteStore, socket_path: str) -> None:
        self._store = store
        self._socket = socket_path
        self._process = current_identity()
        self._cond = threading.Condition(threading.Lock())
        self._new: list[_Pending] = []
        self._states: list[tuple[str, str, bool]] = []
        self._queued = 0
        self._taken = 0
        self._written = 0
        self._live: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, wf_id: str, owner: str | None, team: str | None, info: dict[str, Any]) -> None:
        info = {"socket": self._socket, **info}
        with self._cond:
            if self._closed or wf_id in self._live:
                return
            pending = self._live[wf_id] = _Pending(wf_id, owner, team, info)
            self._new.append(pending)
            self._queue()

    def on_event(self, event: AuditEvent) -> None:
        """The terminator's event listener (its audit thread)."""
        kind = event.type
        wid = event.workflow_id
        if wid is None or kind not in ("workflow_started", "kill_requested", "workflow_finished"):
            return
        if kind == "workflow_started":
            details = event.details
            actor = event.actor
            self.add(
                wid,
                actor.get("id") if actor else None,
                details.get("team"),
                {
                    "depends_on": list(details.get("depends_on") or ()),
                    "backend": details.get("backend"),
                    "parent": details.get("parent"),
                },
            )
            return
        with self._cond:
            if self._closed:
                return
            pending = self._live.get(wid)
            if pending is None:
                return
            if kind == "kill_requested":
                if pending.terminating:
                    return
                pending.terminating = True
                state, final = "terminating", False
            else:
                del self._live[wid]
                state, final = event.state or "failed", True
            if pending.run_id is None:
                # Not written yet: its row is written in this state.
                pending.state = state
                if final:
                    pending.ended_at = time.time()
            else:
                self._states.append((pending.run_id, state, final))
            self._queue()

    def _queue(self) -> None:
        # Lock held.
        self._queued += 1
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="termsafe-control-runs", daemon=True
            )
            self._thread.start()
        if self._queued == self._taken + 1:
            # Only the first item wakes the writer: the rest join its next batch.
            self._cond.notify_all()

    def _run(self) -> None:
        from ._store import Run

        process = self._process
        while True:
            with self._cond:
                while not (self._new or self._states) and not self._closed:
                    self._cond.wait()
                new, self._new = self._new, []
                states, self._states = self._states, []
                upto = self._taken = self._queued
                if not new and not states and self._closed:
                    return
                ids = _run_ids(len(new)) if new else []
                for pending, run_id in zip(new, ids, strict=True):
                    # From here on, its state changes are written as updates.
                    pending.run_id = run_id
            runs = [
                Run(
                    run_id,
                    p.workflow_id,
                    p.owner,
                    p.team,
                    p.state,
                    process,
                    p.started_at,
                    p.ended_at,
                    p.info,
                )
                for p, run_id in zip(new, ids, strict=True)
            ]
            try:
                self._store.run_batch(runs, states)
            except Exception:
                _log().exception("termsafe: recording %d runs in the store failed", len(runs))
            with self._cond:
                self._written = upto
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._written < target and self._thread is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float | None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


#: The open server of each terminator (one at a time: two would register every run twice).
_served: weakref.WeakKeyDictionary[Terminator, ControlServer] = weakref.WeakKeyDictionary()


def serve_control(
    terminator: Terminator,
    store: SQLiteStore | None = None,
    policy: AccessPolicy | str | os.PathLike[str] | None = None,
) -> ControlServer:
    """Let other processes kill, list and inspect this terminator's workflows.

    Starts one listener thread on ``<home>/control/<pid>-<start>.sock`` (home:
    the store's folder, ``$TERMSAFE_HOME`` by default) and records every
    workflow of ``terminator`` in the store's runs table while the server is
    open (live ones at once, new ones as they start, final states as they
    end), so ``termsafe ps`` lists them and ``termsafe kill ID`` reaches
    them. A workflow started without an owner gets the OS user of this
    process as its owner. See the module docstring for the trust model.

    Args:
        terminator: The terminator whose workflows are served.
        store: Where runs are recorded (default: the terminator's store, else
            the one under ``TERMSAFE_HOME``).
        policy: An ``AccessPolicy``, or the path of a policy file; default
            ``<home>/policy.json``, re-read when it changes (no file: root is
            admin, users are owners of their workflows).

    Returns:
        The ``ControlServer``; close it (or use it as a context manager).

    Raises:
        InvalidArgumentType: ``terminator`` is not a ``Terminator``, or
            ``policy`` is neither an ``AccessPolicy`` nor a path.
        ConfigurationError: the policy file given does not exist, the socket
            path is too long for this OS, or the terminator is already served.
        OSError: the socket cannot be created.
    """
    from ._store import SQLiteStore, open_default_store
    from ._terminator import Terminator

    if not isinstance(terminator, Terminator):
        raise InvalidArgumentType(f"terminator must be a Terminator (got {terminator!r})")
    current = _served.get(terminator)
    if current is not None and not current._closed:
        raise ConfigurationError(
            f"this terminator is already served on {current.path!r}; close that server first"
        )
    if store is None:
        store = terminator.store if isinstance(terminator.store, SQLiteStore) else None
    if store is None:
        store = open_default_store()
    elif not isinstance(store, SQLiteStore):
        raise InvalidArgumentType(f"store must be an SQLiteStore (got {store!r})")
    home = store.path.parent
    me = user_name(os.geteuid())
    registry = _RunRegistry(store, os.fspath(socket_path_for(home, current_identity())))
    previous_owner = terminator._default_owner
    if previous_owner is None:
        terminator._default_owner = me

    def restore_owner() -> None:
        if terminator._default_owner == me and previous_owner is None:
            terminator._default_owner = None

    server = ControlServer(
        _TerminatorTarget(terminator),
        home,
        policy,
        store=store,
        registry=registry,
        on_close=(restore_owner,),
        events=terminator,
    )
    _served[terminator] = server
    terminator.add_event_listener(registry.on_event)
    for wf in terminator.workflows():
        if wf.owner is None:
            wf.owner = me
        registry.add(
            wf.id,
            wf.owner,
            wf.team,
            {
                "depends_on": list(wf.depends_on),
                "backend": wf.backend,
                "parent": wf.parent.id if wf.parent is not None else None,
            },
        )
    return server


# -- the client's answer ----------------------------------------------------------------


@attrs.frozen
class KillAnswer:
    """A control socket's answer to a kill request (what ``ControlClient.kill`` returns).

    Attributes:
        workflow_id: The workflow.
        decision: ``allowed``, ``deferred`` (inside a critical section: it lands
            when the section ends) or ``refused``.
        reason: ``"OK"`` or the seed's wording (``"Insufficient permissions"``, ...).
        principal: Who the server decided you are (``Principal.as_dict()``).
        peer: What the kernel told the server about you (pid, uid, gid, user).
        note: Anything else the server wants you to know (a broken policy file).
    """

    workflow_id: str
    decision: str
    reason: str
    principal: Mapping[str, Any]
    peer: Mapping[str, Any]
    note: str | None = None

    @property
    def accepted(self) -> bool:
        """Whether the kill goes ahead (now, or when the critical section ends)."""
        return self.decision in ACCEPTED

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {
            "workflow_id": self.workflow_id,
            "decision": self.decision,
            "reason": self.reason,
            "accepted": self.accepted,
            "principal": dict(self.principal),
            "peer": dict(self.peer),
            "note": self.note,
        }


def run_is_alive(run: Run) -> bool:
    """Whether a run's process, and its supervisor if it has one, are still running."""
    if not identity_alive(run.process):
        return False
    sup = run.info.get("supervisor")
    if isinstance(sup, dict):
        try:
            return identity_alive(Identity.from_dict(sup))
        except (KeyError, TypeError, ValueError):
            return True
    return True
