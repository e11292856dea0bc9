"""Critical sections: work a kill must wait for, up to a grace period.

A kill that arrives while a section is open is *deferred*: it takes effect when
the outermost open section ends. The grace period is measured from the kill
request; when it runs out the section is cut short (threads: its next
``checkpoint()`` raises ``ForcedTermination``; async: its shield scope is
cancelled) and the rollback hooks run as the workflow unwinds.

A *commit step* (``shielded()``) is never cut, not even after the grace period:
an exception must not land between "the server committed" and "we recorded it".
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload

import anyio

from ._exceptions import (
    ConfigurationError,
    ForcedTermination,
    InvalidArgumentType,
    UnknownSectionKind,
)
from ._validate import validate_seconds
from ._workflow import _current

if TYPE_CHECKING:
    from ._workflow import Workflow

__all__ = [
    "DEFAULT_GRACE",
    "CriticalSection",
    "SectionKinds",
    "critical_section",
    "shielded",
    "validate_seconds",
]

P = ParamSpec("P")
R = TypeVar("R")

#: Grace periods, in seconds, of the built-in kinds.
DEFAULT_GRACE: Final[Mapping[str, float]] = {"api": 10.0, "db": 10.0, "fs": 10.0, "git": 30.0}


class SectionKinds:
    """The registry of critical-section kinds and their default grace periods.

    Each ``Terminator`` owns one; ``Terminator.register_section_kind`` is the
    public way to add or change a kind.
    """

    __slots__ = ("_grace", "_lock")

    def __init__(self, overrides: Mapping[str, float] | None = None) -> None:
        self._lock = threading.Lock()
        self._grace: dict[str, float] = dict(DEFAULT_GRACE)
        for kind, grace in (overrides or {}).items():
            self.register(kind, grace)

    def register(self, kind: str, grace: float) -> None:
        """Add ``kind`` (or change its grace).

        Raises:
            InvalidArgumentType: ``kind`` is not a string or ``grace`` not a number.
            ConfigurationError: ``kind`` is empty or ``grace`` is negative/NaN/infinite.
        """
        if not isinstance(kind, str):
            raise InvalidArgumentType(f"section kind must be a str (got {kind!r})")
        if not kind:
            raise ConfigurationError("section kind must not be empty (got '')")
        seconds = validate_seconds(f"grace of section kind {kind!r}", grace)
        assert seconds is not None
        with self._lock:
            self._grace[kind] = seconds

    def grace(self, kind: str) -> float:
        """The default grace of ``kind``.

        Raises:
            UnknownSectionKind: ``kind`` was never registered.
        """
        try:
            return self._grace[kind]
        except KeyError:
            raise UnknownSectionKind(kind, self.known()) from None
        except TypeError:
            raise InvalidArgumentType(f"section kind must be a str (got {kind!r})") from None

    def known(self) -> tuple[str, ...]:
        """The registered kinds, sorted."""
        with self._lock:
            return tuple(sorted(self._grace))


class CriticalSection:
    """An open-able critical section; see ``critical_section()``.

    Usable as ``with``, ``async with`` and as a decorator on sync and async
    functions. One object may be entered by one task or thread at a time;
    the decorator enters a fresh copy per call.
    """

    __slots__ = (
        "_grace",
        "_scope",
        "_workflow",
        "expired",
        "kind",
    )

    def __init__(self, kind: str, grace: float | None) -> None:
        self.kind = kind
        self._grace = grace
        self._workflow: Workflow | None = None
        self._scope: anyio.CancelScope | None = None
        #: Set by the terminator when the grace period ran out during a kill.
        self.expired = False

    def __repr__(self) -> str:
        return f"<critical_section {self.kind!r} grace={self.grace}>"

    @property
    def grace(self) -> float:
        """The grace period in seconds (the kind's default unless given)."""
        if self._grace is not None:
            return self._grace
        wf = self._workflow
        if wf is not None:
            return wf.terminator.section_kinds.grace(self.kind)
        from ._terminator import get_terminator

        return get_terminator().section_kinds.grace(self.kind)

    # -- sync ---------------------------------------------------------------

    def __enter__(self) -> CriticalSection:
        wf = _current.get(None)
        if wf is not None:
            if self._grace is None:
                # Fail on an unknown kind at entry, not when a kill needs the grace.
                wf.terminator.section_kinds.grace(self.kind)
            wf.open_section(self)
        self._workflow = wf
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wf = self._workflow
        if wf is None:
            return
        self._workflow = None
        wf.close_section(self, exc)

    # -- async --------------------------------------------------------------

    async def __aenter__(self) -> CriticalSection:
        wf = _current.get(None)
        outer = None
        if wf is not None:
            if self._grace is None:
                wf.terminator.section_kinds.grace(self.kind)
            if wf.thread is threading.current_thread():
                outer = wf._scope
        # anyio.CancelScope() looks the backend up on every call; the workflow's
        # own scope already is the backend's class (on this, its loop's, thread).
        scope = type(outer)(shield=True) if outer is not None else anyio.CancelScope(shield=True)
        scope.__enter__()
        self._scope = scope
        if wf is not None:
            try:
                wf.open_section(self)
            except BaseException:
                self._scope = None
                scope.__exit__(None, None, None)
                raise
        self._workflow = wf
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope, self._scope = self._scope, None
        assert scope is not None
        # trio's CancelScope.__exit__ returns True when there was no exception
        # at all; only a suppressed exception counts.
        swallowed = bool(scope.__exit__(exc_type, exc, tb)) and exc is not None
        wf, self._workflow = self._workflow, None
        if wf is None:
            return swallowed
        if swallowed and self.expired:
            # Our own shield scope was cancelled because the grace ran out.
            # Passing the exception keeps close_section from raising a plain
            # Terminated first: the cut is a ForcedTermination.
            wf.close_section(self, exc)
            raise ForcedTermination(wf.id, wf.kill_reason)
        wf.close_section(self, None if swallowed else exc)
        return swallowed

    def cancel_async(self) -> None:
        """Cancel the shield scope (the caller is on the section's event loop)."""
        scope = self._scope
        if scope is not None:
            scope.cancel()

    # -- decorator ----------------------------------------------------------

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        kind, grace = self.kind, self._grace
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with CriticalSection(kind, grace):
                    return await fn(*args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with CriticalSection(kind, grace):
                return fn(*args, **kwargs)

        return wrapper


def critical_section(kind: str, grace: float | None = None) -> CriticalSection:
    """Mark work that a kill must let finish, up to ``grace`` seconds.

    A kill that arrives inside the section is deferred (and audited as such)
    until the outermost open section of the workflow ends; then it takes effect
    there: leaving the section raises ``Terminated``. Entering a section while
    a kill is pending raises ``Terminated`` (no new work starts). If the grace
    period, measured from the kill request, runs out first, the section is cut
    short with ``ForcedTermination`` and the workflow's rollback hooks run.

    Outside any workflow the section does nothing but (in async code) shield
    its body from cancellation.

    Args:
        kind: ``"git"`` (30 s), ``"db"``, ``"fs"``, ``"api"`` (10 s), or a kind
            registered with ``Terminator.register_section_kind``.
        grace: Seconds to override the kind's default.

    Returns:
        A context manager (sync and async) that is also a decorator.

    Raises:
        InvalidArgumentType: ``kind`` is not a string or ``grace`` not a number.
        ConfigurationError: ``grace`` is negative, NaN or infinite.
        UnknownSectionKind: ``kind`` is not registered (raised on entry, where the
            workflow's terminator is known).
        Terminated: on entry when a kill is pending, or on exit when a kill was
            deferred by this (outermost) section.
    """
    if not isinstance(kind, str):
        raise InvalidArgumentType(f"section kind must be a str (got {kind!r})")
    return CriticalSection(kind, validate_seconds("grace", grace, allow_none=True))


@contextmanager
def shielded() -> Iterator[None]:
    """Protect a commit step from every cancellation, including an expired grace.

    Use it around the few statements that must not be split (a rename, a
    ``COMMIT``, recording a result). Keep it short: the phase ladder waits for it.
    In a thread workflow this suppresses ``checkpoint()`` delivery; async code
    should also wrap the step in ``anyio.CancelScope(shield=True)``.
    """
    wf = _current.get(None)
    if wf is None:
        yield
        return
    wf.shield_depth += 1
    try:
        yield
    finally:
        wf.shield_depth -= 1
