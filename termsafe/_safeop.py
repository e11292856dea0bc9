"""The shape every safe operation shares.

    enter   register rollback/cleanup hooks with the current workflow, and
            journal what a SIGKILL would leave behind (temp paths, child pids)
    body    the caller's work
    commit  short, inside a critical section of the operation's kind and
            ``shielded()``: no kill lands between "done" and "recorded"
    exit    on success deregister the hooks and the journal entries;
            on error or kill roll back (the hooks, run once, LIFO)

``OperationScope`` implements the bookkeeping so each operation only writes
its own enter/commit/rollback steps. Outside a workflow it keeps the same
guarantees for its own operation: the rollback runs on error directly.

In a workflow the terminator has taken over (its system phase, or a hook that
hung), registering a hook raises ``ForcedTermination``: the operation does
not start, and what it did so far is undone exactly once, by the terminator's
sweep if it is still going, else at once in the caller's thread (the stack
closed when the sweep found it empty; see ``Workflow.push_hook``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from ._hooks import Hook, HookKind
from ._sections import CriticalSection, critical_section, shielded
from ._workflow import Workflow, current_workflow

if TYPE_CHECKING:
    from ._store import JournalKind, Store
    from ._terminator import Terminator

__all__ = ["OperationScope", "resolve_store"]

log = logging.getLogger("termsafe")

# The commit step outside a workflow: nothing to enter (reusable, stateless).
_NO_STEP: Final[AbstractContextManager[None]] = contextlib.nullcontext()
# OperationScope(workflow=...) not given: the scope looks the current workflow up.
_LOOK_UP: Final[Any] = object()
_open_default_store: Callable[[], Store] | None = None
_get_terminator: Callable[[], Terminator] | None = None  # imported on first use


def resolve_store(store: Store | bool | None, wf: Workflow | None) -> Store | None:
    """The store an operation should journal to.

    ``False`` disables journaling; ``None`` means the workflow's terminator's
    store, else the process's default store under ``TERMSAFE_HOME``.
    """
    if store is False:
        return None
    if store is not None and store is not True:
        return store
    if wf is not None and wf.terminator.store is not None:
        return wf.terminator.store  # type: ignore[no-any-return]
    global _open_default_store
    if _open_default_store is None:
        # Imported on first use (``import termsafe`` stays light), then kept:
        # an import statement costs a microsecond on every operation.
        from ._store import open_default_store

        _open_default_store = open_default_store
    return _open_default_store()


class _CommitStep:
    """``with critical_section(kind), shielded():`` as one object.

    Every commit inside a workflow goes through it; the generator-based
    equivalent cost four Python calls and a generator per commit.
    """

    __slots__ = ("_section", "_wf")

    def __init__(self, section: CriticalSection) -> None:
        self._section = section
        self._wf: Workflow | None = None

    def __enter__(self) -> None:
        self._section.__enter__()  # a pending kill refuses the commit here
        wf = self._wf = current_workflow()
        if wf is not None:
            wf.shield_depth += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wf = self._wf
        if wf is not None:
            wf.shield_depth -= 1
        # A kill the commit deferred lands here, as the section closes.
        self._section.__exit__(exc_type, exc, tb)


class OperationScope:
    """Hooks, journal entries and audit events of one safe operation.

    Args:
        kind: The critical-section kind of the operation (``fs``, ``db``, ``git``, ``api``).
        name: A short description for events (``atomic_file /srv/out.txt``).
        store: See ``resolve_store``.
        workflow: The current workflow (or ``None``), when the caller has
            looked it up already (saves looking it up twice on a hot path).
    """

    __slots__ = (
        "_body_section",
        "_hooks",
        "_journal",
        "_local_rollbacks",
        "kind",
        "name",
        "store",
        "workflow",
    )

    def __init__(
        self,
        kind: str,
        name: str,
        store: Store | bool | None = None,
        *,
        workflow: Workflow | None = _LOOK_UP,
    ) -> None:
        self.kind = kind
        self.name = name
        if workflow is _LOOK_UP:
            workflow = current_workflow()
        self.workflow = workflow
        self.store = resolve_store(store, workflow)
        self._hooks: list[Hook] = []
        self._journal: list[int] = []
        self._local_rollbacks: list[Callable[[], Any]] = []
        self._body_section: CriticalSection | None = None

    # -- enter ---------------------------------------------------------------

    def on_rollback(self, fn: Callable[[], Any]) -> None:
        """Register ``fn`` to undo the operation if it does not commit.

        Raises:
            ForcedTermination: the terminator has taken the workflow over;
                ``fn`` still runs exactly once (``Workflow.push_hook``).
        """
        self._register(fn, "rollback")

    def on_cleanup(self, fn: Callable[[], Any]) -> None:
        """Register ``fn`` to run however the operation ends.

        Raises:
            ForcedTermination: the terminator has taken the workflow over;
                ``fn`` still runs exactly once (``Workflow.push_hook``).
        """
        self._register(fn, "cleanup")

    def _register(self, fn: Callable[[], Any], kind: HookKind) -> None:
        wf = self.workflow
        if wf is None:
            self._local_rollbacks.append(fn)
            return
        # In a workflow the terminator took over, ``fn`` (the undo of what the
        # operation already did: a temp made, a child started, a claim taken)
        # runs once all the same, and the operation does not start:
        # ForcedTermination.
        self._hooks.append(wf.push_hook(fn, kind))

    def journal(self, kind: JournalKind, payload: dict[str, Any]) -> int | None:
        """Journal something a crash would leave behind; return the entry id."""
        if self.store is None:
            return None
        wid = self.workflow.id if self.workflow is not None else None
        entry = self.store.journal_add(kind, payload, wid)
        self._journal.append(entry)
        return entry

    def unjournal(self, entry: int | None) -> None:
        """Forget one journal entry (the thing it names is gone or committed)."""
        if entry is None or self.store is None:
            return
        with contextlib.suppress(ValueError):
            self._journal.remove(entry)
        self.store.journal_remove(entry)

    def hold_section(self, section: CriticalSection | None) -> None:
        """Note that the operation's whole body runs inside ``section`` (or no longer does).

        For operations whose body is itself the risky part (``idempotent_call``:
        the API call). The caller enters and leaves the section (sync or async);
        while it is held, ``committing()`` only shields, since the commit is
        already inside a section of the operation's kind: a kill that the body
        deferred must not refuse the commit of work already done.
        """
        self._body_section = section

    # -- commit --------------------------------------------------------------

    def committing(self) -> AbstractContextManager[None]:
        """The commit step: a critical section of the operation's kind, shielded.

        Outside a workflow there is nothing to defer or shield against: a
        reusable no-op (the commit of every operation goes through here).
        """
        if self.workflow is None:
            return _NO_STEP
        if self._body_section is not None:
            return shielded()
        return _CommitStep(critical_section(self.kind))

    # -- exit ----------------------------------------------------------------

    def succeeded(self, *, keep_journal: bool = False) -> None:
        """The operation committed: take its hooks and journal entries back.

        With ``keep_journal`` the journal entries stay, for recovery to finish
        what the operation could not (an old tree it failed to remove).
        """
        wf = self.workflow
        if wf is not None:
            for hook in reversed(self._hooks):
                wf.hooks.remove(hook)
        self._hooks.clear()
        self._local_rollbacks.clear()
        if keep_journal:
            return
        for entry in list(self._journal):
            self.unjournal(entry)

    def failed(self) -> None:
        """The operation did not commit.

        Inside a workflow the rollback hooks stay on its stack: they run (once,
        LIFO with everything else) as the workflow unwinds, or are run by the
        terminator if the thread never comes back. Outside a workflow they run
        here, now, newest first.
        """
        rollbacks, self._local_rollbacks = self._local_rollbacks, []
        for fn in reversed(rollbacks):
            try:
                fn()
            except Exception:
                log.exception("termsafe: rollback of %s failed", self.name)

    def rollback_now(self) -> None:
        """Run this operation's own hooks now (once), newest first, and take them off the stack.

        For operations that must restore state before the exception propagates
        (a failed ``atomic_file`` removes its temp at once, even inside a
        workflow that goes on running).
        """
        wf = self.workflow
        if wf is None:
            self.failed()
            return
        for hook in reversed(self._hooks):
            if wf.hooks.remove(hook):
                try:
                    hook.fn()
                except Exception:
                    log.exception("termsafe: rollback of %s failed", self.name)
        self._hooks.clear()

    def emit(self, type_: str, details: dict[str, Any]) -> None:
        """An audit event on the workflow's terminator (or the default one)."""
        self.emit_built(type_, {"operation": self.name, **details})

    def emit_built(self, type_: str, details: dict[str, Any]) -> None:
        """``emit`` for details the caller built with ``"operation": self.name`` first.

        The dict is handed over, not copied: the caller must not touch it again.
        """
        wf = self.workflow
        if wf is not None:
            wf.terminator._pipe.emit(type_, wf.id, None, None, wf.state.value, details)
            return
        global _get_terminator
        if _get_terminator is None:
            from ._terminator import get_terminator

            _get_terminator = get_terminator
        _get_terminator()._pipe.emit(type_, None, None, None, None, details)
