"""Idempotent calls: a side effect runs at most once per key, across retries,
restarts and kills (Stripe's semantics, on the durable store).

    enter   fingerprint the request; claim the key (a lease with a fencing
            epoch), or replay its recorded result, or refuse: another request
            under the key, a run in flight elsewhere, an unknown outcome
    body    the side effect, inside an ``api`` critical section; unless the
            call says otherwise the whole body is past the point of no return
            (``explicit_send=True`` moves that point to ``mark_sent()``)
    commit  the result is recorded, fenced by the epoch, shielded: a run that
            lost its lease records nothing
    exit    success deregisters; a failure releases the key: retryable if
            nothing was sent, ``unknown`` otherwise (reported, never guessed)

Compensations registered by the body are rollback hooks of the enclosing
workflow, each also recorded in the store so it runs at most once, whoever
runs it. While the body runs, its lease is renewed every third of its length:
one deadline per timer rides the terminator's timer for all the calls in
flight, and each renewal runs in a short-lived thread, so a call costs no
thread (and no timer entry) of its own.

A first run costs a read that finds nothing and two durable statements, the
claim's ``INSERT`` and the record's ``UPDATE``; a replay costs one read and
never waits for the write lock (``SQLiteStore.idem_claim``). Outside a workflow
a call keeps no ``OperationScope``: it registers no hook and defers no kill,
and its events go to the process's terminator.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import json.encoder
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, TypeVar, cast, overload

import anyio
import attrs

from ._exceptions import (
    AlreadyRecorded,
    ConfigurationError,
    ForcedTermination,
    IdempotencyConflict,
    InvalidArgumentType,
    LeaseLost,
    Terminated,
    TermsafeError,
)
from ._hooks import hook_name
from ._procs import identity_alive
from ._safeop import OperationScope, resolve_store
from ._sections import CriticalSection, critical_section, validate_seconds
from ._store import MAX_KEY_LENGTH, SQLiteStore, _check_key
from ._terminator import get_terminator
from ._workflow import current_workflow

if TYPE_CHECKING:
    from ._store import Claim, Compensation, Store
    from ._timer import DeadlineTimer
    from ._workflow import Workflow

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_RETENTION",
    "IdempotentCall",
    "idempotent_call",
    "prune_idempotency",
    "request_fingerprint",
    "resolve_outcome",
    "run_pending_compensations",
]

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("termsafe")

#: Seconds a claim holds without renewal (renewed every third of it while the body runs).
DEFAULT_LEASE: Final = 60.0
#: Seconds a settled key is kept by ``prune_idempotency()`` unless told otherwise (24 h).
DEFAULT_RETENTION: Final = 86_400.0

# The life of one call. Only _CLAIMED holds the key.
_NEW: Final = 0
_REPLAYED: Final = 1
_CLAIMED: Final = 2
_RECORDED: Final = 3
_RELEASED: Final = 4
_LOST: Final = 5


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()
_UNDECODED: Final = _Missing()  # IdempotentCall._result: decode _result_text first


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _one_shot_encoder(*, ensure_ascii: bool, allow_nan: bool) -> Callable[[Any], str]:
    """A JSON encoder with sorted keys and no whitespace, built once.

    ``JSONEncoder.encode`` builds a new C encoder on every call (about half
    the cost of encoding a small request); this one is built here and reused.
    It checks no cycles (a cyclic value fails with ``RecursionError``, which
    callers treat as "not JSON data"). Where the C encoder is missing or
    does not give the same text as ``JSONEncoder``, ``JSONEncoder`` is used.
    """
    reference = json.JSONEncoder(
        sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=allow_nan
    ).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return reference
    strings = (
        json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    )
    try:
        chunks = make(None, _not_json, strings, None, ":", ",", True, False, allow_nan)
    except TypeError:  # another signature
        return reference

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    sample = {"b": [1, 2.5, -0.0, 10**20, None, True, '\u00e9\u2028"\n'], "a": {"y": [], "x": {}}}
    try:
        same = encode(sample) == reference(sample) and encode("s") == reference("s")
    except Exception:
        same = False
    return encode if same else reference


# Requests: the fingerprint's canonical form. Results: as the store encodes them.
_canonical: Final = _one_shot_encoder(ensure_ascii=False, allow_nan=False)
_encode_result: Final = _one_shot_encoder(ensure_ascii=True, allow_nan=True)


def _small_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256, else ``hashlib``'s (OpenSSL).

    For the few hundred bytes of a request it is as fast as OpenSSL's, and
    much faster on a cold cache (a first call, or one after a wait for the
    disk, which is how a first run finds it): 8 us against 20 us measured on a
    2-CPU VM. The digest is the same; large requests go to OpenSSL.
    """
    for name in ("_sha2", "_sha256"):  # Python 3.12+, 3.10-3.11
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(module, "sha256", None)
        if callable(fn) and fn(b"abc").hexdigest() == hashlib.sha256(b"abc").hexdigest():
            return cast("Callable[[bytes], Any]", fn)
    return hashlib.sha256


_sha256_small: Final = _small_sha256()
_SHA256_SMALL_BYTES: Final = 4096

# The fingerprints of recent requests, by canonical text: a retry or replay of
# a call this process made before (the same request under the same key) skips
# the SHA-256. Small requests only; emptied when full (no lock, no ordering to
# keep: a lost entry only costs one hash).
_FINGERPRINT_MEMO_SIZE: Final = 1024
_FINGERPRINT_MEMO_TEXT: Final = 512
_fingerprints: dict[str, str] = {}


def request_fingerprint(request: Any, key: str | None = None) -> str:
    """SHA-256 (hex) of the canonical JSON of ``request``.

    Canonical: sorted keys, no whitespace, UTF-8, no NaN or infinity. Requests
    equal as JSON data have equal fingerprints (a tuple and a list alike).

    Args:
        request: JSON data that identifies the call (amount, currency, ...).
        key: The key, to name it in errors.

    Returns:
        64 hex digits.

    Raises:
        InvalidArgumentType: ``request`` is not JSON data.
    """
    try:
        text = _canonical(request)
        known = _fingerprints.get(text)
        if known is not None:
            return known
        data = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        whose = "" if key is None else f" of idempotent call {key!r}"
        problem = "a cycle" if isinstance(exc, RecursionError) else exc
        raise InvalidArgumentType(
            f"request{whose} must be JSON data (got {request!r}: {problem})"
        ) from None
    sha256 = _sha256_small if len(data) <= _SHA256_SMALL_BYTES else hashlib.sha256
    fingerprint = sha256(data).hexdigest()
    if len(text) <= _FINGERPRINT_MEMO_TEXT:
        if len(_fingerprints) >= _FINGERPRINT_MEMO_SIZE:
            _fingerprints.clear()
        _fingerprints[text] = fingerprint
    return fingerprint


# The commit step of a claim's writes outside a workflow: nothing to enter.
_NO_STEP: Final[AbstractContextManager[None]] = nullcontext()


def _emit_outside(type_: str, details: dict[str, Any]) -> None:
    """An audit event of a call outside a workflow, on the process's terminator.

    ``details`` starts with ``"operation"``, and is handed over, not copied.
    """
    get_terminator()._pipe.emit(type_, None, None, None, None, details)


def _as_json(value: Any, what: str) -> Any:
    """``value`` as it will come back from the store, or an error naming it."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentType(f"{what} must be JSON data (got {value!r}: {exc})") from None


def _not_json_result(value: Any, key: str, exc: BaseException) -> InvalidArgumentType:
    """The error for a result that ``_encode_result`` refused with ``exc``."""
    problem = "a cycle" if isinstance(exc, RecursionError) else exc
    return InvalidArgumentType(
        f"result of idempotent call {key!r} must be JSON data (got {value!r}: {problem})"
    )


# -- lease renewal -------------------------------------------------------------------


class _LeaseKeeper:
    """The claims in flight on one timer, under one armed deadline.

    A claim joins the set with its due time (``arm``) and leaves it when it
    settles (``discard``); the timer holds one deadline, the earliest due time
    armed since the keeper last woke, instead of one entry per call (each a
    push under the timer's lock, and a cancel). On waking, in the timer
    thread, it takes the claims that are due out of the set, arms the next
    deadline and hands each renewal to a thread; a renewal arms its claim
    again.

    Joining and leaving take no lock (``set.add`` and ``set.discard`` are
    atomic, and the wake works on a copy of the set): a claim that settles
    within a third of its lease, the common case, only adds itself and takes
    itself out. Only a claim due before the armed deadline takes the lock, to
    arm an earlier one; while a wake sorts the set out, ``_wake_at`` is
    ``inf`` (as when nothing is armed) so that any claim joining meanwhile
    takes the lock too, and sees the deadline the wake arms next.
    """

    __slots__ = ("__weakref__", "_leases", "_lock", "_timer", "_token", "_wake_at")

    def __init__(self, timer: DeadlineTimer) -> None:
        self._timer = weakref.ref(timer)
        self._reset()

    def _reset(self) -> None:
        self._leases: set[IdempotentCall] = set()
        self._lock = threading.Lock()
        self._wake_at = math.inf  # the deadline armed on the timer, if any
        self._token = 0  # names that deadline; earlier ones were superseded

    def arm(self, call: IdempotentCall, delay: float) -> None:
        """Renew ``call``'s claim in ``delay`` seconds (unless it leaves first)."""
        due = call._due = time.monotonic() + delay
        self._leases.add(call)
        if due >= self._wake_at:
            # A deadline at or before ``due`` is armed, and its wake finds the
            # claim in the set: the claim joined before that wake copies the
            # set (which it does after setting ``_wake_at`` to inf), or after
            # an earlier wake had armed that deadline.
            return
        with self._lock:
            if due >= self._wake_at:
                return  # a wake meanwhile armed one early enough
            self._wake_at = due
            self._token += 1
            token = self._token
        self._schedule(due, token)

    def discard(self, call: IdempotentCall) -> None:
        self._leases.discard(call)

    def _schedule(self, due: float, token: int) -> None:
        timer = self._timer()
        if timer is not None:
            timer.call_at(due, functools.partial(self._wake, token))

    def _wake(self, token: int) -> None:
        # In the timer thread: only sort out what is due and hand the work off.
        now = time.monotonic()
        with self._lock:
            if token != self._token:
                return  # superseded by an earlier deadline, which did this work
            self._wake_at = math.inf  # claims joining now take the lock (see arm)
            leases = self._leases.copy()
            due = [call for call in leases if call._due <= now]
            following = min((call._due for call in leases if call._due > now), default=math.inf)
            self._leases.difference_update(due)
            self._wake_at = following
            self._token += 1
            token = self._token
        if following < math.inf:
            self._schedule(following, token)
        for call in due:
            if call._renewing:
                threading.Thread(
                    target=call._renew, name="termsafe-idempotency-lease", daemon=True
                ).start()


_keepers: weakref.WeakKeyDictionary[DeadlineTimer, _LeaseKeeper] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


# The keeper _keeper_for returned last (nearly always the one asked for next).
_last_keeper: tuple[weakref.ref[DeadlineTimer], _LeaseKeeper] | None = None


def _keeper_for(timer: DeadlineTimer) -> _LeaseKeeper:
    global _last_keeper
    last = _last_keeper
    if last is not None and last[0]() is timer:
        return last[1]
    keeper = _keepers.get(timer)
    if keeper is None:
        with _keepers_lock:
            keeper = _keepers.get(timer)
            if keeper is None:
                keeper = _keepers[timer] = _LeaseKeeper(timer)
    _last_keeper = (weakref.ref(timer), keeper)
    return keeper


def _keepers_after_fork() -> None:
    # The child's timers start empty (their armed deadlines stayed with the
    # parent), and so do the claims it holds: none.
    for keeper in list(_keepers.values()):
        keeper._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keepers_after_fork)


# -- compensations --------------------------------------------------------------------


class _Compensator:
    """A compensation as a rollback hook: runs at most once, whoever runs it."""

    def __init__(
        self,
        scope: OperationScope,
        store: Store,
        key: str,
        comp_id: int,
        name: str,
        fn: Callable[[Any], Any],
        payload: Any,
    ) -> None:
        self.scope = scope
        self.store = store
        self.key = key
        self.id = comp_id
        self.name = name
        self.fn = fn
        self.payload = payload
        # What the workflow's hook events call it.
        self.__qualname__ = f"compensate {name} ({key})"

    def __call__(self) -> None:
        details = {"key": self.key, "compensation": self.name, "id": self.id}
        if not self.store.comp_claim(self.id):
            self.scope.emit("compensation_skipped", details)
            return
        try:
            self.fn(self.payload)
        except BaseException as exc:
            self.store.comp_finish(self.id, ok=False)
            self.scope.emit("compensation_failed", {**details, "error": f"{exc!r}"})
            raise
        self.store.comp_finish(self.id, ok=True)
        self.scope.emit("compensation_ran", details)


# -- the call -------------------------------------------------------------------------


class IdempotentCall:
    """An idempotent call: what ``idempotent_call(...)`` returns.

    A context manager (``with`` and ``async with``) whose target is the call
    itself, and a decorator. See ``idempotent_call`` for the semantics.

    Attributes:
        key: The idempotency key; pass it to the external system where it takes one.
        request: The request data the key is bound to.
        fingerprint: SHA-256 of the request's canonical JSON.
        replayed: ``True`` when the key already has a recorded result: the body
            must not perform the side effect; the result is ``result``.
        result: The recorded result (on a replay, or once ``record()`` ran), else ``None``.
        retried: ``True`` when this run took the key over from a run that died
            or released it.
        epoch: The fencing epoch of this run's claim.
        sent: Whether the side effect may have started (durably marked).
        dedupes: Whether the external system deduplicates by key.
        explicit_send: Whether the point of no return is ``mark_sent()``
            rather than the start of the body.
        lease: Seconds the claim holds without renewal.
        grace: The body's critical-section grace (``None``: the ``api`` kind's).
    """

    __slots__ = (
        "_comps",
        "_due",
        "_entered",
        "_exited",
        "_in_body",
        "_keeper",
        "_key_spec",
        "_lock",
        "_renewing",
        "_request_spec",
        "_result",
        "_result_text",
        "_scope",
        "_section",
        "_state",
        "_store",
        "_store_arg",
        "_workflow",
        "dedupes",
        "epoch",
        "explicit_send",
        "fingerprint",
        "grace",
        "key",
        "lease",
        "replayed",
        "request",
        "retried",
        "sent",
    )

    # Set once claimed (until then never read): the keeper that renews the
    # claim, and when it is due. Set with ``_result = _UNDECODED``: the
    # recorded JSON, decoded on first read.
    _keeper: _LeaseKeeper
    _due: float
    _result_text: str

    def __init__(
        self,
        key: str | Callable[..., str],
        request: Any,
        *,
        dedupes: bool,
        explicit_send: bool,
        lease: float,
        grace: float | None,
        store: Store | None,
        fingerprint: str = "",
    ) -> None:
        self._key_spec = key
        self._request_spec = request
        self.key = key if isinstance(key, str) else ""
        self.request = request
        self.fingerprint = fingerprint
        self.dedupes = dedupes
        self.explicit_send = explicit_send
        self.lease = lease
        self.grace = grace
        self._store_arg = store
        self._store: Store | None = store  # _begin resolves the default
        self.replayed = False
        self.retried = False
        self._result: Any = None
        self.epoch = 0
        self.sent = False
        self._state = _NEW
        self._entered = False
        self._in_body = False  # __enter__ returned: the body (the side effect) may run
        self._exited = False
        self._lock = threading.Lock()
        self._scope: OperationScope | None = None
        self._section: CriticalSection | None = None
        self._workflow: Workflow | None = None  # as _begin found it
        self._renewing = False  # armed on a keeper (self._keeper), renewed when due
        # Compensations registered (a list once there is one).
        self._comps: list[_Compensator] | tuple[()] = ()

    @property
    def result(self) -> Any:
        """The recorded result (on a replay, or once ``record()`` ran), else ``None``.

        What a replay would return: the recorded JSON decoded (decoded on first
        read; a first run that never reads it does not pay for it).
        """
        value = self._result
        if value is _UNDECODED:
            value = self._result = json.loads(self._result_text)
        return value

    def __repr__(self) -> str:
        state = ("new", "replayed", "claimed", "recorded", "released", "lost")[self._state]
        return f"<IdempotentCall {self.key or self._key_spec!r} {state}>"

    # -- enter ------------------------------------------------------------------------

    def _begin(self) -> Workflow | None:
        """Check the call can be entered; resolve its workflow and store."""
        if self._entered:
            raise ConfigurationError(
                f"idempotent call {self.key!r} was already entered; call idempotent_call() again"
            )
        if not isinstance(self._key_spec, str):
            raise InvalidArgumentType(
                f"a key function ({self._key_spec!r}) works in the decorator form only; "
                "the context manager needs a str key"
            )
        if self._request_spec is _MISSING:
            raise InvalidArgumentType(
                f"idempotent_call({self.key!r}) used as a context manager needs request=... "
                "(the JSON data the key stands for)"
            )
        if not self.fingerprint:
            self.fingerprint = request_fingerprint(self._request_spec, self.key)
        self._entered = True
        wf = self._workflow = current_workflow()
        if self._store_arg is None:
            store = resolve_store(None, wf)
            if store is None:
                raise ConfigurationError(f"idempotent call {self.key!r} needs a store (got None)")
            self._store = store
        return wf

    def _new_scope(self) -> OperationScope:
        """The operation's scope (hooks, events), made once something needs it.

        In a workflow a claim makes it at once (its rollback hook). Outside a
        workflow there is no hook to register, no kill to defer and no commit
        to shield, so a call goes without one (its events go straight to the
        process's terminator), unless it registers a compensation, whose
        events the scope carries. A replay needs none either.
        """
        scope = self._scope
        if scope is None:
            scope = self._scope = OperationScope(
                "api", f"idempotent_call {self.key}", self._store, workflow=self._workflow
            )
            if self._section is not None:
                scope.hold_section(self._section)
        return scope

    def _claim(self) -> Claim:
        store = self._store
        assert store is not None
        return store.idem_claim(
            self.key,
            self.fingerprint,
            lease_seconds=self.lease,
            retry_unknown=self.dedupes,
            sent=not self.explicit_send,
        )

    def _emit(self, type_: str, details: dict[str, Any]) -> None:
        """An audit event of this call (``details`` without the operation's name)."""
        if self._scope is None and self._workflow is None:
            _emit_outside(type_, {"operation": f"idempotent_call {self.key}", **details})
        else:
            self._new_scope().emit(type_, details)

    def _committing(self) -> AbstractContextManager[None]:
        """The commit step of a write of the claim (a no-op outside a workflow)."""
        scope = self._scope
        return _NO_STEP if scope is None else scope.committing()

    def _refused(self, exc: BaseException) -> None:
        self._exited = True
        if isinstance(exc, TermsafeError):
            self._emit(
                "idempotent_refused",
                {"key": self.key, "error": type(exc).__name__, "message": str(exc)},
            )

    def _claimed(self, claim: Claim) -> None:
        self.epoch = claim.epoch
        if claim.replay:
            self.replayed = True
            self._result = claim.result
            # No audit event: a replay changes nothing, and it must stay cheap.
            self._state = _REPLAYED
            return
        store = self._store
        assert store is not None
        self.retried = claim.retried
        self.sent = not self.explicit_send
        self._state = _CLAIMED
        wf = self._workflow
        if wf is not None:
            # If the workflow is killed and its thread never comes back, the
            # terminator runs this hook: the key is released for what it is.
            # (Outside a workflow the block itself settles the claim.)
            self._new_scope().on_rollback(self._abandon)
            term = wf.terminator
        else:
            term = get_terminator()
        keeper = self._keeper = _keeper_for(term._timer)
        self._renewing = True
        keeper.arm(self, self.lease / 3)
        if claim.retried:
            # A takeover is news; a first claim is told by how it ends
            # (recorded, released or lease lost): one event per claim.
            self._emit("idempotent_claimed", {"key": self.key, "epoch": claim.epoch})

    def __enter__(self) -> IdempotentCall:
        wf = self._begin()
        if wf is not None:
            section = critical_section("api", self.grace)
            section.__enter__()
            self._section = section
        store = self._store
        assert store is not None
        try:
            claim = store.idem_claim(  # self._claim(), written out
                self.key,
                self.fingerprint,
                lease_seconds=self.lease,
                retry_unknown=self.dedupes,
                sent=not self.explicit_send,
            )
        except BaseException as exc:
            self._refused(exc)
            self._leave(exc)
            raise
        try:
            self._claimed(claim)
        except BaseException as exc:
            self._claim_unused()
            self._leave(exc)
            raise
        self._in_body = True
        return self

    async def __aenter__(self) -> IdempotentCall:
        if self._begin() is not None:
            section = critical_section("api", self.grace)
            await section.__aenter__()
            self._section = section
        try:
            with anyio.CancelScope(shield=True):
                claim = await anyio.to_thread.run_sync(self._claim)
        except BaseException as exc:
            self._refused(exc)
            await self._aleave(exc)
            raise
        try:
            self._claimed(claim)
        except BaseException as exc:
            self._claim_unused()
            await self._aleave(exc)
            raise
        self._in_body = True
        return self

    def _claim_unused(self) -> None:
        """Entering failed after the claim (the workflow was taken over): the body never ran.

        Nothing was sent, so the key is released as retryable (if the
        rollback hook, run at once on registration, has not done so).
        """
        self._stop_renewal()
        if self._state == _CLAIMED:
            try:
                self._abandon(unknown=False)
            except Exception:
                log.exception("termsafe: releasing the unused claim on %r failed", self.key)

    # -- body -------------------------------------------------------------------------

    def _check(self, action: str) -> None:
        """Nothing, if this call holds its claim; else the error that fits."""
        if self._state in (_REPLAYED, _RECORDED):
            raise AlreadyRecorded(self.key, action)
        if self._state in (_RELEASED, _LOST):
            raise LeaseLost(self.key, self.epoch, None)
        if self._exited or self._state != _CLAIMED:
            raise ConfigurationError(
                f"call.{action}() of idempotent call {self.key or self._key_spec!r} "
                "works only inside its `with idempotent_call(...)` block"
            )

    def mark_sent(self) -> None:
        """Mark, durably, the point of no return: the side effect starts now.

        Only needed with ``explicit_send=True`` (otherwise the whole body
        counts as sent and this does nothing). A run that dies before this
        point leaves the key retryable; after it, unknown. It is also a
        cancellation point: a kill already requested lands here, before
        anything was sent, so the killed run is cleanly retryable.

        Raises:
            AlreadyRecorded: the call was replayed or already recorded.
            LeaseLost: another run took the key over: do not send.
            ConfigurationError: called outside the call's ``with`` block.
            Terminated: a kill is pending in the workflow (nothing was sent).
        """
        self._check("mark_sent")
        if self.sent:
            return
        wf = self._workflow
        if wf is not None:
            kill = wf.kill
            if kill is not None or wf.abandoned:
                forced = wf.abandoned or (kill is not None and kill.phase != "graceful")
                raise (ForcedTermination if forced else Terminated)(wf.id, wf.kill_reason)
        with self._lock:
            self._check("mark_sent")
            store = self._store
            assert store is not None
            try:
                with self._committing():
                    store.idem_mark_sent(self.key, self.epoch)
            except LeaseLost:
                self._lost()
                raise
            self.sent = True
        self._emit("idempotent_sent", {"key": self.key, "epoch": self.epoch})

    def sending(self) -> _Sending:
        """``with call.sending(): post(...)``: ``mark_sent()`` on entry, for readability.

        Returns:
            A context manager.

        Raises:
            AlreadyRecorded: on entry, the call was replayed or already recorded.
            LeaseLost: on entry, another run took the key over: do not send.
            Terminated: on entry, a kill is pending in the workflow (nothing was sent).
        """
        return _Sending(self)

    def record(self, result: Any) -> None:
        """Record the call's result (durably, fenced, shielded); replays return it.

        Args:
            result: JSON data (the external system's answer, or what you need of it).

        Raises:
            InvalidArgumentType: ``result`` is not JSON data.
            AlreadyRecorded: the call was replayed, or a result is recorded already.
            LeaseLost: another run took the key over; nothing was recorded.
            ConfigurationError: called outside the call's ``with`` block.
        """
        if self._state != _CLAIMED or self._exited:
            self._check("record")  # raises the error that fits, before encoding
        try:
            text = _encode_result(result)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _not_json_result(result, self.key, exc) from None
        key = self.key
        with self._lock:
            # Again under the lock: the terminator's rollback hook may have
            # released the claim meanwhile.
            if self._state != _CLAIMED or self._exited:
                self._check("record")
            store = self._store
            assert store is not None
            scope = self._scope
            try:
                if scope is None:
                    store.idem_record(key, self.epoch, result, encoded=text)
                else:
                    with scope.committing():
                        store.idem_record(key, self.epoch, result, encoded=text)
            except LeaseLost:
                self._lost()
                raise
            self._state = _RECORDED
            self._result = _UNDECODED
            self._result_text = text
            self.sent = True
            if self._renewing:
                self._renewing = False
                self._keeper.discard(self)
        details = {
            "operation": f"idempotent_call {key}",
            "key": key,
            "epoch": self.epoch,
            "retried": self.retried,
        }
        if scope is None:
            get_terminator()._pipe.emit("idempotent_recorded", None, None, None, None, details)
        else:
            scope.emit_built("idempotent_recorded", details)

    def release(self) -> None:
        """Declare that the side effect did not happen: the key becomes retryable.

        For when the external system answered that it did nothing (a request
        rejected before processing). Only you can know that: termsafe never
        assumes it.

        Raises:
            AlreadyRecorded: the call was replayed or recorded.
            LeaseLost: another run took the key over.
            ConfigurationError: called outside the call's ``with`` block.
        """
        self._check("release")
        self._abandon(unknown=False)

    def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Perform the side effect ``fn(*args, **kwargs)`` unless this is a replay.

        A replay returns the recorded result without calling ``fn``; a first
        run calls it, records what it returns and returns that as a replay
        would (through JSON).

        Returns:
            The result.

        Raises:
            InvalidArgumentType: ``fn``'s result is not JSON data.
            LeaseLost: another run took the key over; nothing was recorded.
            AlreadyRecorded: a result was recorded already in this block.
            ConfigurationError: called outside the call's ``with`` block.
        """
        if self._state == _REPLAYED:
            return cast("R", self.result)
        self._check("run")
        if self.explicit_send:
            self.mark_sent()
        value = fn(*args, **kwargs)
        self.record(value)
        return cast("R", self.result)

    def compensate(
        self, fn: Callable[[Any], Any], payload: Any = None, *, name: str | None = None
    ) -> None:
        """Register ``fn(payload)`` to undo this call if the enclosing workflow rolls back.

        The compensation is recorded in the store (fenced by this run's
        epoch), so it runs at most once, even across processes. Compensations
        run LIFO with the workflow's other rollback hooks; when the workflow
        succeeds they are discarded. Outside a workflow they run at once if the
        ``with`` block fails, and are discarded when it succeeds. A process that
        dies leaves them ``pending`` for ``run_pending_compensations()``, which
        finds ``fn`` again by ``name``.

        Args:
            fn: Called with ``payload`` (synchronous).
            payload: JSON data ``fn`` needs (the charge id to refund, ...).
            name: The name ``run_pending_compensations`` looks ``fn`` up by;
                default ``fn``'s qualified name.

        Raises:
            InvalidArgumentType: ``fn`` is not callable, ``name`` not a
                non-empty str, or ``payload`` not JSON data.
            AlreadyRecorded: the call was replayed (this run did not perform it).
            LeaseLost: another run took the key over; nothing was registered.
            ConfigurationError: called outside the call's ``with`` block.
            ForcedTermination: the terminator took the workflow's hooks over
                (system phase, or a hook that hung): the compensation, already
                recorded, still runs once, with the terminator's sweep or, after
                it, at once here.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"a compensation must be callable (got {fn!r})")
        cname = hook_name(fn) if name is None else name
        if not isinstance(cname, str) or not cname:
            raise InvalidArgumentType(f"compensation name must be a non-empty str (got {name!r})")
        payload = _as_json(payload, f"compensation payload of idempotent call {self.key!r}")
        with self._lock:
            if self._state != _RECORDED:
                self._check("compensate")
            if self._exited:
                raise ConfigurationError(
                    f"call.compensate() of idempotent call {self.key!r} works only inside "
                    "its `with idempotent_call(...)` block"
                )
            scope = self._new_scope()
            store = scope.store
            assert store is not None
            try:
                with scope.committing():
                    comp_id = store.comp_add(self.key, self.epoch, cname, payload)
            except LeaseLost:
                self._lost()
                raise
            comp = _Compensator(scope, store, self.key, comp_id, cname, fn, payload)
            comps = self._comps
            if not comps:
                comps = self._comps = []
            comps.append(comp)
            wf = scope.workflow
            if wf is not None and len(comps) == 1:
                # Below every compensation (pushed before any of them, under
                # the lock): when the workflow succeeds the rollback hooks are
                # dropped and this forgets them durably. (A workflow the
                # terminator took over never succeeds.)
                wf.push_hook_if_open(self._discard_pending, "cleanup")
        if wf is not None:
            # Outside the lock: in a workflow the terminator took over, the
            # compensation may run right here, and the call's own rollback,
            # which the terminator runs meanwhile, needs the lock.
            wf.push_hook(comp, "rollback")

    # -- async ------------------------------------------------------------------------

    async def amark_sent(self) -> None:
        """``mark_sent()`` for async code (the store write runs in a worker thread).

        Raises:
            AlreadyRecorded: see ``mark_sent``.
            LeaseLost: see ``mark_sent``.
            ConfigurationError: see ``mark_sent``.
            Terminated: see ``mark_sent``.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.mark_sent)

    async def arecord(self, result: Any) -> None:
        """``record()`` for async code, shielded from cancellation.

        Raises:
            InvalidArgumentType: see ``record``.
            AlreadyRecorded: see ``record``.
            LeaseLost: see ``record``.
            ConfigurationError: see ``record``.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.record, result)

    async def acompensate(
        self, fn: Callable[[Any], Any], payload: Any = None, *, name: str | None = None
    ) -> None:
        """``compensate()`` for async code (``fn`` itself stays synchronous).

        Raises:
            InvalidArgumentType: see ``compensate``.
            AlreadyRecorded: see ``compensate``.
            LeaseLost: see ``compensate``.
            ConfigurationError: see ``compensate``.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                functools.partial(self.compensate, fn, payload, name=name)
            )

    async def arun(
        self, fn: Callable[P, Coroutine[Any, Any, R]], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """``run()`` for an async side effect ``await fn(*args, **kwargs)``.

        Returns:
            The result.

        Raises:
            InvalidArgumentType: see ``run``.
            LeaseLost: see ``run``.
            AlreadyRecorded: see ``run``.
            ConfigurationError: see ``run``.
        """
        if self._state == _REPLAYED:
            return cast("R", self.result)
        self._check("run")
        if self.explicit_send:
            await self.amark_sent()
        value = await fn(*args, **kwargs)
        await self.arecord(value)
        return cast("R", self.result)

    # -- exit -------------------------------------------------------------------------

    def _lost(self) -> None:
        """Fenced out (lock held): nothing of this run may be recorded any more."""
        self._state = _LOST
        self._stop_renewal()
        self._emit("idempotent_lease_lost", {"key": self.key, "epoch": self.epoch})

    def _stop_renewal(self) -> None:
        if self._renewing:
            self._renewing = False
            self._keeper.discard(self)

    def _renew(self) -> None:
        """Extend the lease; its keeper runs this in a short-lived thread of its own.

        A durable write that may wait for the database lock never holds the
        timer up. Every third of the lease until the claim settles.
        """
        if not self._renewing:
            return
        store = self._store
        assert store is not None
        try:
            store.idem_renew(self.key, self.epoch, self.lease)
        except LeaseLost:
            # Recorded, released or taken over meanwhile: nothing left to
            # renew (the body finds out when it next writes the claim).
            self._renewing = False
            return
        except Exception:
            log.exception("termsafe: renewing the lease on %r failed; retrying", self.key)
            if self._renewing:
                self._keeper.arm(self, min(1.0, self.lease / 10))
            return
        if self._renewing:
            self._keeper.arm(self, self.lease / 3)

    def _abandon(self, unknown: bool | None = None) -> None:
        """Give the claim up: ``unknown`` if the side effect may have started, else retryable.

        Also the rollback hook the terminator runs for a thread that never came back.
        """
        store = self._store
        assert store is not None
        with self._lock:
            if self._state != _CLAIMED:
                return
            if unknown is None:
                # Run as the rollback hook: before the body started, nothing was sent.
                unknown = self.sent and self._in_body
            self._stop_renewal()
            try:
                with self._committing():
                    store.idem_release(self.key, self.epoch, unknown=unknown)
            except LeaseLost:
                self._lost()
                return
            self._state = _RELEASED
        self._emit(
            "idempotent_released",
            {
                "key": self.key,
                "epoch": self.epoch,
                "outcome": "unknown" if unknown else "retryable",
            },
        )

    def _discard_pending(self) -> None:
        store = self._store
        if store is None:
            return
        for comp in self._comps:
            store.comp_discard(comp.id)

    def _complete(self, exc: BaseException | None) -> None:
        """Settle the claim at the end of the block (record, or release)."""
        if self._state == _REPLAYED:
            return
        failed = exc is not None
        try:
            if self._state == _CLAIMED:
                if failed or not self.sent:
                    # An error: unknown if the side effect may have started.
                    # A clean end that never sent (explicit_send): retryable.
                    self._abandon()
                else:
                    # A clean end is the body's word that the side effect is done.
                    self.record(None)
        except BaseException:
            failed = True
            raise
        finally:
            self._stop_renewal()
            scope = self._scope
            if scope is not None:
                # The claim is settled (or lost): the release hook is not needed.
                scope.succeeded()
            if self._workflow is None and self._comps:
                if failed:
                    self._compensate_now()
                else:
                    self._discard_pending()

    def _compensate_now(self) -> None:
        """Outside a workflow the ``with`` block is the unit: undo it, newest first."""
        for comp in reversed(self._comps):
            try:
                comp()
            except Exception:
                log.exception("termsafe: compensation %s failed", comp.name)

    def _leave(self, exc: BaseException | None) -> None:
        self._exited = True
        section, self._section = self._section, None
        if self._scope is not None:
            self._scope.hold_section(None)
        if section is not None:
            section.__exit__(
                None if exc is None else type(exc), exc, None if exc is None else exc.__traceback__
            )

    async def _aleave(self, exc: BaseException | None) -> None:
        self._exited = True
        section, self._section = self._section, None
        if self._scope is not None:
            self._scope.hold_section(None)
        if section is not None:
            await section.__aexit__(
                None if exc is None else type(exc), exc, None if exc is None else exc.__traceback__
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._section is None and (
            self._state == _REPLAYED or (self._state == _RECORDED and not self._comps)
        ):
            # Outside a workflow, a replay or a recorded run without
            # compensations has nothing left to settle: the record stopped the
            # renewal, and there is no scope (see _new_scope).
            self._exited = True
            return
        try:
            self._complete(exc)
        except BaseException as err:
            self._leave(err)
            raise
        self._leave(exc)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._complete, exc)
        except BaseException as err:
            await self._aleave(err)
            raise
        await self._aleave(exc)

    # -- decorator --------------------------------------------------------------------

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> IdempotentCall:
        """A fresh call for one invocation of the decorated function."""
        key = self._key_spec(*args, **kwargs) if callable(self._key_spec) else self._key_spec
        _check_key(key)
        fingerprint = self.fingerprint
        if self._request_spec is _MISSING:
            request: Any = {"args": list(args), "kwargs": kwargs}
            fingerprint = ""
        elif callable(self._request_spec):
            request = self._request_spec(*args, **kwargs)
            fingerprint = ""
        else:
            request = self._request_spec
        if not fingerprint:
            fingerprint = request_fingerprint(request, key)
        return IdempotentCall(
            key,
            request,
            dedupes=self.dedupes,
            explicit_send=self.explicit_send,
            lease=self.lease,
            grace=self.grace,
            store=self._store_arg,
            fingerprint=fingerprint,
        )

    @overload
    def __call__(
        self, fn: Callable[Concatenate[IdempotentCall, P], Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[IdempotentCall, P], R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise InvalidArgumentType(f"idempotent_call(...) decorates a function (got {fn!r})")
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with self._bind(args, kwargs) as call:
                    if call.replayed:
                        return call.result
                    value = await fn(call, *args, **kwargs)
                    if call._state == _CLAIMED:
                        await call.arecord(value)
                    return call.result if call._state == _RECORDED else value

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._bind(args, kwargs) as call:
                if call.replayed:
                    return call.result
                value = fn(call, *args, **kwargs)
                if call._state == _CLAIMED:
                    call.record(value)
                return call.result if call._state == _RECORDED else value

        return wrapper


class _Sending:
    """``call.sending()``: marks the point of no return on entry."""

    __slots__ = ("_call",)

    def __init__(self, call: IdempotentCall) -> None:
        self._call = call

    def __enter__(self) -> IdempotentCall:
        self._call.mark_sent()
        return self._call

    def __exit__(self, *exc_info: object) -> None:
        return None

    async def __aenter__(self) -> IdempotentCall:
        await self._call.amark_sent()
        return self._call

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def _check_store(store: object) -> Store | None:
    if store is None or type(store) is SQLiteStore:
        return cast("Store | None", store)
    if isinstance(store, bool) or not callable(getattr(store, "idem_claim", None)):
        raise InvalidArgumentType(f"store must be a termsafe Store or None (got {store!r})")
    return cast("Store", store)


def _check_lease(lease: object) -> float:
    seconds = validate_seconds("lease", lease)
    assert seconds is not None
    if seconds <= 0:
        raise ConfigurationError(f"lease must be > 0 seconds (got {lease!r})")
    return seconds


def _check_flags(dedupes: object, explicit_send: object) -> None:
    if type(dedupes) is not bool:
        _check_bool("dedupes", dedupes)
    if type(explicit_send) is not bool:
        _check_bool("explicit_send", explicit_send)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be a bool (got {value!r})")
    return value


def idempotent_call(
    key: str | Callable[..., str],
    *,
    request: Any = _MISSING,
    dedupes: bool = False,
    explicit_send: bool = False,
    lease: float = DEFAULT_LEASE,
    grace: float | None = None,
    store: Store | None = None,
) -> IdempotentCall:
    """Perform a side effect at most once per key (Stripe's idempotency semantics).

    The recommended form is the decorator: the function receives the call
    first, is skipped on a replay, and what it returns is recorded:

        @idempotent_call(lambda order: f"charge-{order['id']}", request=lambda order: order)
        def charge(call: IdempotentCall, order: dict) -> dict:
            return payments.charge(order, idempotency_key=call.key)

    As a context manager, check ``call.replayed`` first (or use ``call.run``):

        with idempotent_call("charge-42", request={"amount": 100}) as call:
            if call.replayed:
                return call.result
            call.record(payments.charge(100, idempotency_key=call.key))

    On entry the key is claimed atomically, or its recorded result replayed.
    The body is an ``api`` critical section. A clean exit records the result
    (``None`` if the body did not record one); an exception releases the key:
    retryable if nothing was sent, unknown otherwise.

    Args:
        key: 1 to 255 characters; in the decorator form also a function of
            the decorated function's arguments returning the key.
        request: JSON data the key stands for; another request under the same
            key is an error. In the decorator form also a function of the
            arguments; default there: the arguments themselves.
        dedupes: The external system deduplicates by key, so a run that died
            after sending may be retried (instead of ``OutcomeUnknown``).
        explicit_send: The point of no return is ``call.mark_sent()`` (or
            ``call.sending()``), not the start of the body; a run that dies
            before it is safely retryable. Costs one more durable write.
        lease: Seconds the claim holds if not renewed; renewed every third of
            it while the body runs. A run on another host (or one that is
            alive but frozen) loses the key when its lease runs out.
        grace: The body's critical-section grace (default: the ``api`` kind's, 10 s).
        store: Default: the workflow's terminator's store, else the process's
            store under ``TERMSAFE_HOME``.

    Returns:
        An ``IdempotentCall``: a context manager (sync and async) and a decorator.

    Raises:
        InvalidArgumentType: the key is not a str (or function), the request
            not JSON data, or another argument of the wrong type.
        ConfigurationError: the key is empty or longer than 255 characters, or
            ``lease`` is not a positive number of seconds.

    On entry (and each call of a decorated function) it raises:
    ``IdempotencyKeyReused`` (the key was used with another request),
    ``IdempotencyConflict`` (a live run holds the key), ``OutcomeUnknown`` (a
    run died after sending; settle it with ``resolve_outcome``), ``Terminated``
    (a kill is pending in the workflow).
    """
    # The common arguments pass the cheap checks; anything else gets the full ones.
    if type(key) is str and 0 < len(key) <= MAX_KEY_LENGTH:
        pass
    elif isinstance(key, str):
        _check_key(key)
    elif not callable(key):
        raise InvalidArgumentType(
            f"idempotency key must be a str, or a function in the decorator form (got {key!r})"
        )
    seconds = lease if type(lease) is float and 0.0 < lease < math.inf else _check_lease(lease)
    _check_flags(dedupes, explicit_send)
    if grace is not None:
        grace = validate_seconds("grace", grace)
    if store is not None and type(store) is not SQLiteStore:
        store = _check_store(store)
    fingerprint = ""
    if isinstance(key, str) and request is not _MISSING and not callable(request):
        fingerprint = request_fingerprint(request, key)
    return IdempotentCall(
        key,
        request,
        dedupes=dedupes,
        explicit_send=explicit_send,
        lease=seconds,
        grace=grace,
        store=store,
        fingerprint=fingerprint,
    )


# -- maintenance ----------------------------------------------------------------------


def _store_for(store: object, what: str) -> tuple[Store, OperationScope]:
    st = resolve_store(_check_store(store), current_workflow())
    if st is None:
        raise ConfigurationError(f"{what} needs a store (got None)")
    return st, OperationScope("api", what, st)


def prune_idempotency(older_than: float = DEFAULT_RETENTION, *, store: Store | None = None) -> int:
    """Forget settled keys (recorded or released) untouched for ``older_than`` seconds.

    A pruned key is new again: calling it again performs the side effect
    again. Keys whose outcome is unknown are kept until settled
    (``resolve_outcome``); compensations that ran are pruned with the same age.

    Args:
        older_than: Retention in seconds (default 24 h).
        store: Default: the current workflow's store, else ``TERMSAFE_HOME``'s.

    Returns:
        How many keys were deleted.

    Raises:
        InvalidArgumentType: ``older_than`` is not a number, or ``store`` not a store.
        ConfigurationError: ``older_than`` is negative, NaN or infinite.
    """
    seconds = validate_seconds("older_than", older_than)
    assert seconds is not None
    st, scope = _store_for(store, "prune_idempotency")
    count = st.idem_prune(seconds)
    scope.emit("idempotency_pruned", {"older_than_s": seconds, "keys": count})
    return count


def resolve_outcome(
    key: str, *, succeeded: bool, result: Any = None, store: Store | None = None
) -> None:
    """Settle a key whose outcome was unknown, once you have checked the external system.

    Args:
        key: The key ``OutcomeUnknown`` named.
        succeeded: ``True``: the side effect happened; ``result`` is recorded
            and replayed from now on. ``False``: it did not; the key is retryable.
        result: JSON data to record when it succeeded.
        store: Default: the current workflow's store, else ``TERMSAFE_HOME``'s.

    Raises:
        InvalidArgumentType: the key is not a str, or ``result`` not JSON data.
        ConfigurationError: the key is malformed, or not in the unknown state.
    """
    _check_key(key)
    _check_bool("succeeded", succeeded)
    _as_json(result, f"result of idempotent call {key!r}")
    st, scope = _store_for(store, f"resolve_outcome {key}")
    st.idem_resolve(key, result, succeeded=succeeded)
    scope.emit("idempotent_resolved", {"key": key, "succeeded": succeeded})


def run_pending_compensations(
    key: str,
    registry: Mapping[str, Callable[[Any], Any]],
    *,
    store: Store | None = None,
    force: bool = False,
) -> list[Compensation]:
    """Run, newest first, the compensations a dead run left ``pending`` for ``key``.

    For recovery after a crash: the process that registered them died before
    its workflow finished, so they neither ran nor were discarded. Each is
    claimed in the store first, so it runs at most once even if several
    recoveries race. A failing compensation is recorded ``failed`` and the
    rest still run.

    Args:
        key: The idempotency key.
        registry: Compensation functions by name (the ``name`` given to
            ``call.compensate``, default the function's qualified name).
        store: Default: the current workflow's store, else ``TERMSAFE_HOME``'s.
        force: Run even though the process that holds the key may be alive
            (it is on another host, which cannot be checked from here).

    Returns:
        The compensations this call ran, in the order it ran them, with their
        new status (``done`` or ``failed``).

    Raises:
        InvalidArgumentType: an argument has the wrong type.
        ConfigurationError: the key is malformed, or a pending compensation's
            name is not in ``registry`` (nothing ran).
        IdempotencyConflict: the process that holds the key is alive (or on
            another host) and ``force`` is not set.
    """
    _check_key(key)
    if not isinstance(registry, Mapping):
        raise InvalidArgumentType(
            f"registry must be a mapping of names to functions (got {registry!r})"
        )
    _check_bool("force", force)
    st, scope = _store_for(store, f"run_pending_compensations {key}")
    info = st.idem_info(key)
    if info is not None and not force and identity_alive(info.owner):
        raise IdempotencyConflict(key, info.owner.pid, info.owner.host)
    pending = [c for c in st.comp_list(key) if c.status == "pending"]
    missing = sorted({c.name for c in pending} - set(registry))
    if missing:
        raise ConfigurationError(
            f"no compensation named {', '.join(map(repr, missing))} in the registry "
            f"for key {key!r} (registry has: {', '.join(map(repr, sorted(registry))) or 'nothing'})"
        )
    ran: list[Compensation] = []
    for comp in reversed(pending):
        if not st.comp_claim(comp.id):
            continue  # another recovery took it
        details = {"key": key, "compensation": comp.name, "id": comp.id}
        try:
            registry[comp.name](comp.payload)
        except Exception as exc:
            st.comp_finish(comp.id, ok=False)
            log.exception("termsafe: compensation %s of %r failed", comp.name, key)
            scope.emit("compensation_failed", {**details, "error": f"{exc!r}"})
            ran.append(attrs.evolve(comp, status="failed"))
        else:
            st.comp_finish(comp.id, ok=True)
            scope.emit("compensation_ran", details)
            ran.append(attrs.evolve(comp, status="done"))
    return ran
