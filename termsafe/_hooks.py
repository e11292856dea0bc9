"""The one LIFO stack of rollback and cleanup hooks each workflow owns.

Exactly-once is enforced here and nowhere else: a hook leaves the stack when
someone *claims* it (under the stack's lock), so whoever runs it (the unwinding
workflow, or the terminator acting for a thread that did not come back) is the
only one who ever will. Claiming is always from the top, so the order is LIFO
whoever claims.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from ._exceptions import InvalidArgumentType

__all__ = ["Hook", "HookKind", "HookStack", "HookStackClosed", "hook_name"]

HookKind = Literal["rollback", "cleanup"]
HOOK_KINDS: Final = ("cleanup", "rollback")

# States of a hook; ints keep the slots small.
PENDING: Final = 0
RUNNING: Final = 1
DONE: Final = 2
REMOVED: Final = 3
DISCARDED: Final = 4


class HookStackClosed(Exception):
    """``HookStack.push`` after ``close()``: the hook was not registered.

    The hook comes with it, already marked running (``RUNNING``), so that the
    caller can run it at once, as the one who ever will.
    """

    def __init__(self, hook: Hook) -> None:
        super().__init__(f"the hook stack is closed: {hook.kind} hook {hook.name} not registered")
        self.hook = hook


def hook_name(fn: Callable[..., Any]) -> str:
    """A readable name for a hook in events and errors."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else repr(fn)


class Hook:
    """A registered hook. Returned by ``on_rollback``/``on_cleanup``; pass it to ``remove``."""

    __slots__ = ("_is_async", "_name", "fn", "kind", "started", "state")

    def __init__(self, fn: Callable[[], Any], kind: HookKind) -> None:
        self.fn = fn
        self.kind: HookKind = kind
        # Worked out when first asked: most hooks are taken back unrun (the
        # operation committed), and every safe operation registers one.
        self._name: str | None = None
        self._is_async: bool | None = None
        self.state = PENDING
        self.started = 0.0

    @property
    def name(self) -> str:
        """A readable name of the hook's function, for events and errors."""
        name = self._name
        if name is None:
            name = self._name = hook_name(self.fn)
        return name

    @property
    def is_async(self) -> bool:
        """Whether the hook is a coroutine function (awaited, not called)."""
        is_async = self._is_async
        if is_async is None:
            is_async = self._is_async = inspect.iscoroutinefunction(self.fn)
        return is_async

    def __repr__(self) -> str:
        state = ("pending", "running", "done", "removed", "discarded")[self.state]
        return f"<Hook {self.kind} {self.name} {state}>"


class HookStack:
    """A LIFO stack of hooks; every method is thread-safe.

    When the terminator takes a workflow's hooks over (``take_over``), only it
    claims from then on, and the stack closes the moment its sweep finds it
    empty: a hook pushed before that is swept in LIFO order with the rest, a
    hook pushed after is refused (``HookStackClosed``), since nobody would
    ever run it.
    """

    __slots__ = ("_closed", "_hooks", "_lock", "_taken", "running")

    def __init__(self, *, taken: bool = False, closed: bool = False) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Hook] = []
        #: The hook being run right now, if any (for the hanging-hook watchdog).
        self.running: Hook | None = None
        self._taken = taken
        self._closed = closed

    def push(self, fn: Callable[[], Any], kind: HookKind) -> Hook:
        """Register ``fn`` on top of the stack.

        Raises:
            InvalidArgumentType: ``fn`` is not callable.
            HookStackClosed: the terminator's sweep is over (see the class); the
                hook it carries is not on the stack and nobody else will run it.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"a {kind} hook must be callable (got {fn!r})")
        hook = Hook(fn, kind)
        with self._lock:
            if not self._closed:
                self._hooks.append(hook)
                return hook
            hook.state = RUNNING
        raise HookStackClosed(hook)

    def take_over(self) -> None:
        """From now on only the terminator claims (``claim(by_terminator=True)``)."""
        with self._lock:
            self._taken = True

    @property
    def closed(self) -> bool:
        """Whether ``push`` is refused: the terminator's sweep found the stack empty."""
        return self._closed

    def remove(self, hook: Hook) -> bool:
        """Take ``hook`` off the stack if it has not started; return whether it was removed."""
        with self._lock:
            if hook.state != PENDING:
                return False
            try:
                self._hooks.remove(hook)
            except ValueError:
                return False
            hook.state = REMOVED
            return True

    def claim(self, *, include_rollback: bool, by_terminator: bool = False) -> Hook | None:
        """Take the top hook to run it, or ``None`` when the stack is empty.

        With ``include_rollback=False`` (the workflow succeeded) rollback hooks
        met on the way are discarded: they are not needed and must never run later.
        Once the terminator took the stack over, only its claims get a hook
        (``by_terminator``), and the one that finds the stack empty closes it.
        """
        with self._lock:
            if self._taken and not by_terminator:
                return None
            while self._hooks:
                hook = self._hooks.pop()
                if hook.kind == "rollback" and not include_rollback:
                    hook.state = DISCARDED
                    continue
                hook.state = RUNNING
                hook.started = time.monotonic()
                self.running = hook
                return hook
            if by_terminator:
                self._closed = True
            return None

    def finish(self, hook: Hook) -> bool:
        """Mark a claimed hook as run; return False if it had been abandoned as hung."""
        with self._lock:
            hook.state = DONE
            if self.running is hook:
                self.running = None
                return True
            return False

    def abandon_if_running(self, hook: Hook, *, take_over: bool = False) -> bool:
        """Abandon ``hook`` if it is still the one running; return whether it was.

        With ``take_over``, the terminator takes the stack over in the same step
        (``take_over()``): the thread running the hung hook, when it returns,
        finds no more hooks to claim.
        """
        with self._lock:
            if self.running is hook and hook.state == RUNNING:
                self.running = None
                if take_over:
                    self._taken = True
                return True
            return False

    def abandon_running(self) -> Hook | None:
        """Forget the hook that is running (it hangs); return it, if there was one."""
        with self._lock:
            hook, self.running = self.running, None
            return hook

    def __len__(self) -> int:
        with self._lock:
            return len(self._hooks)

    def snapshot(self) -> list[Hook]:
        """The pending hooks, bottom first."""
        with self._lock:
            return list(self._hooks)
