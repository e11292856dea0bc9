"""The control socket's client side: connect, send one JSON line, read one back.

``termsafe kill`` reaches a host through this module alone, so the command
imports no store, no server and no attrs (the import would cost it more than
the rest of its work): the server, the access policy, the run registry and
``KillAnswer`` live in ``_control``.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time

from ._exceptions import ConfigurationError, ControlError

# Not ``typing.TYPE_CHECKING``: see above (type checkers treat this name as true).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Final

    from ._control import KillAnswer

__all__ = ["ControlClient", "find_host"]

#: The folder under ``TERMSAFE_HOME`` that holds the sockets.
CONTROL_DIR: Final = "control"
#: Kill decisions under which the kill goes ahead (``KillAnswer.accepted``).
ACCEPTED: Final = ("allowed", "deferred")
#: ``sockaddr_un.sun_path`` holds 108 bytes on Linux, 104 on the BSDs, with the NUL.
_SUN_PATH_MAX: Final = 107 if sys.platform.startswith("linux") else 103


def _sock_address(sock: socket.socket, path: str, connect: bool) -> None:
    """Bind or connect ``sock`` to ``path``, even when ``path`` is too long for sun_path.

    Linux only: a long path is reached through ``/proc/self/fd/<dir fd>/<name>``,
    which the kernel resolves to the folder without the length limit.
    """
    op = sock.connect if connect else sock.bind
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        op(path)
        return
    folder, name = os.path.split(path)
    if not sys.platform.startswith("linux") or len(os.fsencode(name)) > 64:
        raise ConfigurationError(
            f"socket path {path!r} is {len(os.fsencode(path))} bytes, longer than a Unix "
            f"socket allows ({_SUN_PATH_MAX}); set TERMSAFE_HOME to a shorter folder"
        )
    dfd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        op(f"/proc/self/fd/{dfd}/{name}")
    finally:
        os.close(dfd)


class ControlClient:
    """A connection to a control socket.

    Args:
        path: The socket (``run.info["socket"]``, or ``ControlServer.path``).
        timeout: Seconds to wait for the connection and for each answer.

    Raises:
        ControlError: the socket cannot be reached (its process may be gone:
            ``termsafe recover`` cleans up after it).
        ConfigurationError: the path is too long for a Unix socket on this OS.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            _sock_address(sock, self.path, connect=True)
        except OSError as exc:
            sock.close()
            raise ControlError(
                self.path, f"cannot connect: {exc.strerror or exc}", exc.errno
            ) from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buf = b""

    @classmethod
    def _adopt(cls, path: str, sock: socket.socket, buf: bytes, timeout: float) -> ControlClient:
        """A client over ``sock``, already connected to ``path`` (``buf``: what it read ahead)."""
        self = cls.__new__(cls)
        self.path = path
        sock.settimeout(timeout)
        self._sock = sock
        self._buf = buf
        return self

    def __repr__(self) -> str:
        return f"<ControlClient {self.path!r}>"

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def request(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return the answer.

        Raises:
            ControlError: the connection broke, timed out, or the server
                answered with an error (its message is the problem).
        """
        sent = False
        try:
            self._sock.sendall(json.dumps(dict(payload)).encode() + b"\n")
            sent = True
            while b"\n" not in self._buf:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    raise ControlError(self.path, "the server closed the connection")
                self._buf += chunk
        except OSError as exc:
            if isinstance(exc, ControlError):
                raise
            problem = exc.strerror or str(exc) or type(exc).__name__
            if sent and isinstance(exc, TimeoutError):
                # A stopped process reads it when it resumes, and acts on it then.
                problem = f"no answer ({problem}); the request was sent and may still take effect"
            raise ControlError(self.path, f"request failed: {problem}", exc.errno) from None
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(self.path, f"answer is not JSON: {line[:80]!r}") from None
        if not isinstance(answer, dict):
            raise ControlError(self.path, f"answer is not an object: {answer!r}")
        if not answer.get("ok"):
            raise ControlError(self.path, str(answer.get("error", "request failed")))
        return answer

    def kill(self, workflow_id: str, *, reason: str, force: bool = False) -> KillAnswer:
        """Ask for a kill; the answer is the decision, the kill proceeds in the background.

        Raises:
            ControlError: as for ``request``.
        """
        from ._control import KillAnswer

        a = self._kill(workflow_id, reason, force)
        return KillAnswer(
            a["workflow_id"], a["decision"], a["reason"], a["principal"], a["peer"], a["note"]
        )

    def _kill(self, workflow_id: str, reason: str, force: bool) -> dict[str, Any]:
        """``kill()``'s answer as ``KillAnswer.as_dict()`` gives it, without building one."""
        a = self.request(
            {"op": "kill", "workflow_id": workflow_id, "reason": reason, "force": force}
        )
        decision = str(a["decision"])
        return {
            "workflow_id": str(a.get("workflow_id", workflow_id)),
            "decision": decision,
            "reason": str(a["reason"]),
            "accepted": decision in ACCEPTED,
            "principal": dict(a.get("principal") or {}),
            "peer": dict(a.get("peer") or {}),
            "note": a.get("note"),
        }

    def status(self, workflow_id: str) -> dict[str, Any] | None:
        """A workflow's live status, or ``None`` when the server has no such workflow.

        Raises:
            ControlError: as for ``request``.
        """
        a = self.request({"op": "status", "workflow_id": workflow_id})
        if not a.pop("found", False):
            return None
        a.pop("ok", None)
        return a

    def ps(self) -> list[dict[str, Any]]:
        """The server's live workflows.

        Raises:
            ControlError: as for ``request``.
        """
        workflows = self.request({"op": "ps"}).get("workflows")
        return list(workflows) if isinstance(workflows, list) else []


def find_host(
    folder: str | os.PathLike[str],
    workflow_id: str,
    *,
    timeout: float,
    client_timeout: float = 5.0,
) -> tuple[ControlClient, dict[str, Any]] | None:
    """Ask every control socket in ``folder`` at once which one runs ``workflow_id``.

    Each host answers ``status`` from memory, so this needs no store, and it
    costs one connection per host process, whatever the number of runs. A
    socket nobody listens on (its process is gone) counts as a no.

    Args:
        folder: The control folder (``<home>/control``).
        workflow_id: A live workflow's id (a supervisor also knows its run id).
        timeout: Seconds to wait for the answers, all told.
        client_timeout: The returned client's ``timeout``.

    Returns:
        A client connected to the host and the workflow's status, when exactly
        one host runs the workflow and every other one said it does not; else
        ``None``: no host runs it (it may have ended, or be a run id only the
        store knows), several do, or a host did not answer in time (a stopped
        process). The store, which knows every run, then decides.
    """
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None  # no folder, or another user's: only the store can tell
    request = json.dumps({"op": "status", "workflow_id": workflow_id}).encode() + b"\n"
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    found: list[tuple[str, socket.socket, bytes, dict[str, Any]]] = []
    undecided = False
    try:
        for name in names:
            if not name.endswith(".sock"):
                continue
            path = os.path.join(os.fspath(folder), name)
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError:
                undecided = True  # out of descriptors (a host per socket): ask the store
                break
            sock.setblocking(False)
            try:
                _sock_address(sock, path, connect=True)
                sent = sock.send(request)
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()  # left behind by a process that is gone
                continue
            except (OSError, ConfigurationError):
                sock.close()  # a full backlog, say: it cannot answer now
                undecided = True
                break
            if sent != len(request):
                sock.close()
                undecided = True
                break
            sel.register(sock, selectors.EVENT_READ, [path, sock, b""])
        while not undecided and sel.get_map():
            left = deadline - time.monotonic()
            ready = sel.select(left) if left > 0 else []
            if not ready:
                undecided = True  # a host is stopped, or too slow: ask the store
                break
            for key, _ in ready:
                path, sock, buf = key.data
                try:
                    chunk = sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if chunk and b"\n" not in buf + chunk:
                    key.data[2] = buf + chunk
                    continue
                sel.unregister(sock)
                line, _, rest = (buf + chunk).partition(b"\n")
                try:
                    answer = json.loads(line) if chunk else None
                except ValueError:
                    answer = None
                if not isinstance(answer, dict) or not answer.get("ok"):
                    sock.close()  # closed on us, or an error: it did not say no
                    undecided = True
                elif answer.get("found"):
                    found.append((path, sock, rest, answer))
                else:
                    sock.close()
        if undecided or len(found) != 1:
            return None
        path, sock, rest, answer = found.pop()
        answer.pop("ok", None)
        answer.pop("found", None)
        return ControlClient._adopt(path, sock, rest, client_timeout), answer
    finally:
        for key in list(sel.get_map().values()):
            key.data[1].close()
        sel.close()
        for _path, sock, _rest, _answer in found:
            sock.close()
