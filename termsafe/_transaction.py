"""``transaction(conn)``: one DB-API 2.0 transaction that commits, or rolls back.

The database makes the crash atomicity (its journal or WAL): a process
SIGKILLed anywhere before ``COMMIT`` returns leaves nothing of the transaction
on disk. What termsafe adds is the in-process half: a kill that lands in the
body rolls back at once; the ``COMMIT`` runs inside the operation's commit step
(critical section ``"db"``, shielded), so no kill can split "the database
committed" from "we recorded it"; and the transaction is really *begun* where
the driver would not begin one (sqlite3 runs DDL outside any transaction in its
default mode, so a migration would not be atomic without an explicit ``BEGIN``;
psycopg begins only at the first statement, so a ``conn.transaction()`` block
run first in the body would be psycopg's outermost transaction and commit on
its own).

How it begins, commits and rolls back, by connection:

==============================================  ==================  =========================
connection                                      begin               end
==============================================  ==================  =========================
sqlite3, ``isolation_level=None``               ``BEGIN``           ``COMMIT`` / ``ROLLBACK``
sqlite3, default (``""``) or a level            ``BEGIN <level>``   ``COMMIT`` / ``ROLLBACK``
sqlite3 3.12+ ``autocommit=True``               ``BEGIN``           ``COMMIT`` / ``ROLLBACK``
sqlite3 3.12+ ``autocommit=False``              (always open)       ``commit()`` / ``rollback()``
psycopg 3, either autocommit mode               (see below)         (see below)
other DB-API, ``conn.autocommit`` is ``True``   ``BEGIN``           ``COMMIT`` / ``ROLLBACK``
other DB-API (psycopg2's default, ...)          (the driver's)      ``commit()`` / ``rollback()``
==============================================  ==================  =========================

psycopg 3 gets a block of its own ``conn.transaction()``, entered on entry
and exited on exit (as if by an exception, to roll back). So it sends
``BEGIN`` at once, with the connection's ``isolation_level``, ``read_only``
and ``deferrable``, in either autocommit mode (a plain ``BEGIN`` in autocommit
mode would drop them); a ``conn.transaction()`` block in the body becomes a
savepoint of it; and psycopg refuses a ``conn.commit()`` in the body.

A connection that reports libpq's transaction status
(``conn.info.transaction_status``: psycopg 2 and 3) is checked. Where termsafe
begins the transaction, not idle on entry (pending statements, an open
psycopg block) is refused, as for sqlite3, and idle at the commit means the
body ended it. In every mode, a failed transaction ("in error": a statement
error the body caught) is not committed but rolled back with
``TransactionStateError``: PostgreSQL would answer its ``COMMIT`` with a
silent ``ROLLBACK``.

Statements go through ``conn.execute`` for sqlite3 and through one
``conn.cursor()`` otherwise; nothing else of the driver is used (but psycopg's
``conn.transaction()`` and ``conn.info``). A ``transaction()`` inside another
on the same connection is a savepoint.

No journal entry is written: the database is the journal, and the fast path
stays a handful of attribute reads around the caller's ``BEGIN ... COMMIT``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import sys
import threading
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

from ._exceptions import ConfigurationError, InvalidArgumentType, TransactionStateError
from ._safeop import OperationScope
from ._sections import shielded
from ._workflow import current_workflow

__all__ = ["Transaction", "transaction"]

C = TypeVar("C")

_SQLITE_LEVELS: Final = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
_BEGIN_WORDS: Final = ("BEGIN", "START TRANSACTION")

log = logging.getLogger("termsafe")

# Mode of an outermost transaction.
_EXPLICIT_SQLITE: Final = 0  # we send BEGIN / COMMIT / ROLLBACK through conn.execute
_IMPLICIT_SQLITE: Final = 1  # 3.12 autocommit=False: commit()/rollback(), always open
_EXPLICIT_DBAPI: Final = 2  # we send BEGIN / COMMIT / ROLLBACK through a cursor
_IMPLICIT_DBAPI: Final = 3  # the driver begins; commit()/rollback()
_PSYCOPG: Final = 4  # psycopg 3: its own conn.transaction() block

# libpq's PQtransactionStatus, as psycopg 2 and 3 report it (conn.info.transaction_status).
_PQ_IDLE: Final = 0
_PQ_INERROR: Final = 3

# The outermost open transaction() of each connection, by id(conn). sqlite3
# connections take no weak references; an entry only lives while its block
# is open, and the block holds the connection, so an id cannot be reused.
_open: dict[int, Transaction[Any]] = {}


def _describe(conn: object) -> str:
    cls = type(conn)
    return f"{cls.__module__}.{cls.__qualname__} at {id(conn):#x}"


class _RolledBack(Exception):
    """What a psycopg ``conn.transaction()`` block is told ended it, to roll it back."""


def _pq_status(conn: object) -> int | None:
    """libpq's transaction status of a psycopg (2 or 3) connection, else ``None``."""
    status = getattr(getattr(conn, "info", None), "transaction_status", None)
    return int(status) if isinstance(status, int) else None


def _is_psycopg(conn: object) -> bool:
    """Whether ``conn`` is a psycopg 3 connection (no import: one would be loaded already)."""
    psycopg = sys.modules.get("psycopg")
    cls = getattr(psycopg, "Connection", None)
    return isinstance(cls, type) and isinstance(conn, cls)


class Transaction(Generic[C]):
    """One ``transaction(conn)`` block; see ``transaction()``.

    Attributes:
        connection: The DB-API connection.
        committed: ``True`` once the ``COMMIT`` (or savepoint release) returned.
        savepoint: The savepoint name when this block is nested, else ``None``.
    """

    __slots__ = (
        "_begin",
        "_committing",
        "_cursor",
        "_depth",
        "_doomed",
        "_driver_tx",
        "_ended",
        "_entered",
        "_mode",
        "_outer",
        "_scope",
        "_thread",
        "committed",
        "connection",
        "savepoint",
    )

    def __init__(self, conn: C, begin: str | None) -> None:
        self.connection = conn
        self._begin = begin
        self._committing = False
        self._cursor: Any = None
        self._depth = 0
        self._doomed = False
        self._driver_tx: Any = None
        self._ended = False
        self._entered = False
        self._mode = _IMPLICIT_DBAPI
        self._outer: Transaction[Any] | None = None
        self._scope: OperationScope | None = None
        self._thread = 0
        self.committed = False
        self.savepoint: str | None = None

    def __repr__(self) -> str:
        state = "committed" if self.committed else ("open" if self._entered else "new")
        return f"<Transaction {_describe(self.connection)} {state}>"

    # -- statements ------------------------------------------------------------------

    def _exec(self, sql: str) -> None:
        if self._mode <= _IMPLICIT_SQLITE:
            self.connection.execute(sql)  # type: ignore[attr-defined]
            return
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.connection.cursor()  # type: ignore[attr-defined]
        cursor.execute(sql)

    def _close_cursor(self) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()

    def _sqlite_in_transaction(self) -> bool:
        return bool(self.connection.in_transaction)  # type: ignore[attr-defined]

    # -- enter -------------------------------------------------------------------------

    def __enter__(self) -> C:
        if self._entered:
            raise TransactionStateError(
                _describe(self.connection), "this transaction() block was already entered"
            )
        self._entered = True
        conn = self.connection
        key = id(conn)
        outer = _open.get(key)
        self._thread = threading.get_ident()
        if outer is not None:
            self._enter_nested(outer)
            return conn
        wf = current_workflow()
        if wf is not None and wf.kill is not None:
            # No new work in a workflow being killed (a kill deferred by an
            # enclosing critical section lets it through).
            wf.deliver()
        self._plan()
        mode = self._mode
        if (mode == _EXPLICIT_SQLITE and self._sqlite_in_transaction()) or (
            mode in (_EXPLICIT_DBAPI, _PSYCOPG) and _pq_status(conn) not in (None, _PQ_IDLE)
        ):
            raise TransactionStateError(
                _describe(conn),
                "the connection is already inside a transaction that transaction() did not "
                "begin (uncommitted statements before the block, or a psycopg "
                "conn.transaction() block?); commit or roll it back first",
            )
        scope = None
        if wf is not None:
            # Outside a workflow nobody else can run a hook: __exit__ rolls
            # back directly, and the fast path builds no scope at all.
            scope = self._scope = self._new_scope()
            scope.on_rollback(self._rollback_hook)
        try:
            if self._begin is not None:
                self._exec(self._begin)
            elif mode == _PSYCOPG:
                driver_tx = conn.transaction()  # type: ignore[attr-defined]
                driver_tx.__enter__()
                self._driver_tx = driver_tx
        except BaseException:
            self._close_cursor()
            if scope is not None:
                scope.succeeded()  # nothing began: take the hook back
            raise
        _open[key] = self
        return conn

    def _new_scope(self) -> OperationScope:
        return OperationScope("db", f"transaction {type(self.connection).__module__}", store=False)

    def _plan(self) -> None:
        """Choose how to begin and end, from the connection's transaction mode."""
        conn: Any = self.connection
        begin = self._begin
        if isinstance(conn, sqlite3.Connection):
            autocommit = getattr(conn, "autocommit", -1)  # Python 3.12+
            if autocommit is False:
                self._mode = _IMPLICIT_SQLITE
            else:
                self._mode = _EXPLICIT_SQLITE
                if begin is None:
                    level = conn.isolation_level if autocommit is not True else None
                    upper = level.upper() if isinstance(level, str) else ""
                    begin = f"BEGIN {upper}" if upper in _SQLITE_LEVELS else "BEGIN"
        elif begin is None and _is_psycopg(conn):
            self._mode = _PSYCOPG
        elif getattr(conn, "autocommit", False) is True:
            self._mode = _EXPLICIT_DBAPI
            if begin is None:
                begin = "BEGIN"
        else:
            self._mode = _IMPLICIT_DBAPI
        if self._mode in (_IMPLICIT_SQLITE, _IMPLICIT_DBAPI) and begin is not None:
            raise ConfigurationError(
                f"begin={begin!r} needs a connection in autocommit mode: "
                f"{_describe(conn)} begins its transactions itself"
            )
        self._begin = begin

    def _enter_nested(self, outer: Transaction[Any]) -> None:
        conn = self.connection
        if outer._thread != self._thread:
            raise TransactionStateError(
                _describe(conn),
                "the connection is inside a transaction() of another thread; "
                "use one connection per thread",
            )
        if self._begin is not None:
            raise ConfigurationError(
                f"begin={self._begin!r} cannot apply to a nested transaction() "
                "(it becomes a savepoint of the outer one)"
            )
        self._outer = outer
        self._mode = outer._mode
        outer._depth += 1
        self._depth = outer._depth
        self.savepoint = f"termsafe_sp_{self._depth}"
        try:
            outer._exec(f"SAVEPOINT {self.savepoint}")
        except BaseException:
            outer._depth -= 1
            raise

    # -- exit --------------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._outer is not None:
            self._exit_nested(exc)
            return
        if exc is None:
            self._commit()
        else:
            self._rollback(exc)

    def _exit_nested(self, exc: BaseException | None) -> None:
        outer = self._outer
        assert outer is not None
        name = self.savepoint
        try:
            if exc is None:
                outer._exec(f"RELEASE SAVEPOINT {name}")
                self.committed = True
            else:
                # Roll back to the savepoint and drop it; the outer block goes on
                # (or unwinds too, when the exception reaches it).
                outer._exec(f"ROLLBACK TO SAVEPOINT {name}")
                outer._exec(f"RELEASE SAVEPOINT {name}")
        finally:
            outer._depth -= 1

    def _commit(self) -> None:
        scope = self._scope
        try:
            if scope is None:
                self._commit_statement()
                return
            # A kill pending here raises Terminated on entering the section: the
            # body is over but nothing is committed, so it rolls back below.
            with _commit_step(scope):
                self._commit_statement()
                scope.succeeded()
                wf = scope.workflow
                if wf is not None and wf.kill is not None:
                    # The commit a kill waited for: the trail says it went through.
                    scope.emit("transaction_committed", {"kill_pending": True})
        except BaseException as error:
            if not self.committed:
                self._rollback(error)
            # else: a kill deferred by the commit step lands as the section
            # closes; the transaction is committed and recorded as such.
            raise

    def _commit_statement(self) -> None:
        if self._doomed:
            raise TransactionStateError(
                _describe(self.connection),
                "the transaction was abandoned by the terminator and cannot commit",
            )
        mode = self._mode
        conn: Any = self.connection
        status = _pq_status(conn) if mode >= _EXPLICIT_DBAPI else None
        if (mode == _EXPLICIT_SQLITE and not self._sqlite_in_transaction()) or (
            mode in (_EXPLICIT_DBAPI, _PSYCOPG) and status == _PQ_IDLE
        ):
            raise TransactionStateError(
                _describe(conn),
                "the transaction was ended inside the block (a commit() or "
                "rollback() in the body?); nothing is left to commit",
            )
        if status == _PQ_INERROR:
            raise TransactionStateError(
                _describe(conn),
                "a statement failed inside the block and the block went on (the error was "
                "caught?); PostgreSQL can only roll this transaction back",
            )
        self._committing = True
        if mode == _EXPLICIT_SQLITE:
            conn.execute("COMMIT")
        elif mode == _EXPLICIT_DBAPI:
            self._exec("COMMIT")
        elif mode == _PSYCOPG:
            driver_tx, self._driver_tx = self._driver_tx, None
            driver_tx.__exit__(None, None, None)
        else:
            conn.commit()
        self.committed = True
        self._finish()

    def _rollback(self, error: BaseException) -> None:
        scope = self._scope
        failure: str | None = None
        try:
            if scope is not None:
                # Runs our hook now, in this thread (it rolls back), unless the
                # terminator already claimed it for an abandoned thread; then
                # the rollback happens here, now that this thread is back.
                scope.rollback_now()
            self._rollback_db()
        except Exception as exc:
            # The caller must see the error (or kill) that ended the block, not
            # this one: a broken connection is rolled back by the server anyway.
            failure = f"{type(exc).__name__}: {exc}"
            log.warning("termsafe: rollback on %s failed: %s", _describe(self.connection), failure)
        finally:
            self._finish()
            details: dict[str, Any] = {"error": type(error).__name__}
            if failure is not None:
                details["rollback_error"] = failure
            (scope or self._new_scope()).emit("transaction_rolled_back", details)

    def _finish(self) -> None:
        _open.pop(id(self.connection), None)
        self._close_cursor()

    # -- rollback --------------------------------------------------------------------

    def _rollback_db(self) -> None:
        """Roll the transaction back, in the owning thread, at most once."""
        if self.committed or self._ended:
            return
        self._ended = True
        mode = self._mode
        if mode == _EXPLICIT_SQLITE:
            if self._sqlite_in_transaction():
                self.connection.execute("ROLLBACK")  # type: ignore[attr-defined]
        elif mode == _EXPLICIT_DBAPI:
            self._exec("ROLLBACK")
        elif mode == _PSYCOPG and self._driver_tx is not None:
            driver_tx, self._driver_tx = self._driver_tx, None
            # Leave the block as an exception would: psycopg rolls back.
            driver_tx.__exit__(_RolledBack, _RolledBack(), None)
        else:
            self.connection.rollback()  # type: ignore[attr-defined]

    def _rollback_hook(self) -> None:
        """The workflow's rollback hook for this transaction.

        In the owning thread it rolls back. Run by the terminator for a thread
        that did not come back, it must not touch a connection another thread
        may be using: it only dooms the transaction (it can never commit) and,
        for sqlite3, interrupts the statement in progress (``interrupt()`` is
        the one sqlite3 call that is safe from any thread), so the owner's
        statement fails and its ``transaction()`` exit rolls back.
        """
        if self._thread == threading.get_ident():
            self._rollback_db()
            return
        self._doomed = True
        if self._committing:
            return  # the COMMIT is shielded: it is never split, not even now
        if isinstance(self.connection, sqlite3.Connection):
            self.connection.interrupt()


def _commit_step(scope: OperationScope) -> contextlib.AbstractContextManager[None]:
    """``scope.committing()``, or only ``shielded()`` inside an open critical section.

    Inside the caller's own section the commit is part of the work that section
    is finishing: it must go through even when that section's grace has run
    out (entering a nested section would then raise ``ForcedTermination`` and
    roll back work the body already completed).
    """
    wf = scope.workflow
    if wf is not None and wf.sections:
        return shielded()
    return scope.committing()


def transaction(conn: C, *, begin: str | None = None) -> Transaction[C]:
    """Run a block as one database transaction: it commits, or it rolls back.

    ``with transaction(conn) as db: db.execute(...)`` yields ``conn`` itself
    (use ``conn.execute`` with sqlite3, ``conn.cursor()`` with any DB-API
    driver). On a clean exit the transaction commits inside a shielded
    critical section of kind ``"db"``: a kill that arrives during the
    ``COMMIT`` waits for it, so a transaction is never committed on disk yet
    reported as failed; the kill then lands as the block exits. An exception
    or a kill in the body rolls back and propagates. A SIGKILL of the process
    at any point leaves the transaction all-or-nothing (the database's own
    crash recovery); no termsafe journal is involved.

    A ``transaction()`` nested in another on the same connection (same
    thread) becomes ``SAVEPOINT``: an error inside rolls back to it and
    propagates; a clean exit releases it into the outer transaction, which
    alone commits.

    Args:
        conn: A DB-API 2.0 connection (sqlite3, psycopg, ...).
        begin: The statement that opens the transaction when termsafe opens
            it (connections in autocommit mode, and sqlite3): for example
            ``"BEGIN IMMEDIATE"``. Default ``"BEGIN"``, or for sqlite3 in its
            default mode ``"BEGIN <isolation_level>"``, or for psycopg 3 the
            ``BEGIN`` of its ``conn.transaction()`` (from the connection's
            ``isolation_level``, ``read_only``, ``deferrable``); given for
            psycopg 3 in autocommit mode, it is sent through a cursor instead.

    Returns:
        A ``Transaction`` context manager that yields ``conn``.

    Raises:
        InvalidArgumentType: ``begin`` is not a string.
        ConfigurationError: ``begin`` does not start a transaction, or is given
            for a connection whose driver begins transactions itself, or for a
            nested block.
        TransactionStateError: on entry, a sqlite3 or psycopg connection is
            already in a transaction that ``transaction()`` did not begin, or
            another thread's ``transaction()`` holds the connection; on exit,
            the body ended the transaction itself (called
            ``commit()``/``rollback()``), or a statement failed in it and the
            body went on, so PostgreSQL can only roll it back (it is rolled
            back).
        Terminated: a kill landed in the body, or was pending at the commit
            step (after rolling back), or was deferred by the commit (after
            committing).
    """
    if begin is not None:
        if not isinstance(begin, str):
            raise InvalidArgumentType(f"begin must be a SQL statement string (got {begin!r})")
        if not begin.lstrip().upper().startswith(_BEGIN_WORDS):
            raise ConfigurationError(
                f"begin must be a statement that starts a transaction, "
                f"such as 'BEGIN IMMEDIATE' (got {begin!r})"
            )
    return Transaction(conn, begin)
