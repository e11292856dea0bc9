"""The audit trail: events, sinks, the hash-chained JSONL file and its verifier.

Every kill attempt, deferral, phase change, hook outcome and final state is an
``AuditEvent`` handed to an ``AuditSink``. Three sinks ship: ``MemorySink``
(tests), ``LoggingSink`` (stdlib logging, the default) and ``JsonlSink``, the
tamper-evident trail described here.

File format
===========

One JSON object per line, UTF-8, ``\\n``-terminated, written as canonical JSON
(keys sorted, ``(",", ":")`` separators, ``ensure_ascii=False``)::

    {"event":{...},"hash":"<64 hex>","mac":"sha256","prev":"<64 hex>","seq":1}

* ``seq``: the trail's own sequence number, 1-based and continuous across the
  whole trail, rotated files included. It is independent of the event's own
  ``seq`` (the emitter's counter), which stays inside ``event``.
* ``prev``: the ``hash`` of the previous line; ``GENESIS`` (64 zeros) for the
  first line of the trail.
* ``mac``: ``"sha256"``, or ``"hmac-sha256"`` when the sink has a key.
* ``hash``: SHA-256 (or HMAC-SHA-256 with the key), hex, over the canonical JSON
  of every other field, encoded as UTF-8.

An event holding a string that cannot be encoded as UTF-8 (a lone surrogate)
is written, and hashed, in the ASCII form of canonical JSON
(``ensure_ascii=True``) instead, so the file stays valid UTF-8.

What the chain detects, and what it cannot
==========================================

``verify_audit_log`` names the first problem: a line whose content does not
match its hash, or whose hash is not what the next line recorded, was
``edited``; a jump forward in ``seq`` is a ``deleted`` line (or lines); a ``seq``
seen twice is an ``inserted`` line; lines out of order are ``reordered``; a
trail that ends before, or disagrees with, an ``Anchor`` was ``truncated``; a
last line cut short with no line ending is a ``torn_tail`` (a crash mid-write,
not tampering, so the trail still counts as ok).

Without a key, anyone who can write the file can also rewrite its whole tail
consistently (edit a line, then recompute every later hash): a keyless chain
proves only that the file is internally consistent, and cannot see lines
removed from its end. Two things close that gap: an HMAC ``key`` kept away from
the file (a rewriter without the key cannot produce valid lines), and an
``Anchor`` (the head's ``seq`` and ``hash``) taken from ``JsonlSink.anchor()``
and stored elsewhere, which pins the head and catches truncation.

How problems are named
======================

The verifier walks the chain and stops at the first problem, classified by
what the line at that point shows (``first_bad_line`` is 1-based, in the file
named by ``VerifyReport.path``):

* ``malformed``: not a trail line (not UTF-8 or JSON, wrong fields), with a
  line ending (our writer never leaves one like that).
* ``bad_signature``: HMAC lines verified without a key, a key given for a plain
  trail, or a key that verifies no line at all (the wrong key).
* ``edited``: the line is not byte for byte what a writer produced for its own
  content (its hash, or HMAC, does not match), or its hash was recomputed
  after an edit, which the next line's ``prev`` gives away: then the edited
  line, not the next one, is named. With a key, a line carrying a recomputed
  plain SHA-256 is an edit too.
* ``deleted``: ``seq`` jumps forward, and the missing numbers appear nowhere
  later (also when the trail does not start at ``seq`` 1 and no recorded prune
  explains it, see Retention).
* ``inserted``: a ``seq`` already seen (a copied line, or a forged one followed
  by the line that rightly holds the place), or a forward jump to a ``seq``
  that appears again later. Of two identical neighbours, the second is named.
* ``reordered``: ``seq`` jumps forward and the skipped numbers come later.
* ``truncated``: with an ``anchor``, the trail ends before ``anchor.seq``, or
  the line at ``anchor.seq`` has another hash (cut back and rewritten).
* ``torn_tail``: the very last line has no line ending (a crash mid-write).
  ``ok`` stays true: a crash is not tampering. The next ``JsonlSink`` append
  removes the partial line; it never was a complete record.

Rotation: with ``max_bytes`` the current file moves to ``path.1`` (older ones
shift up) and the chain goes on in a new ``path``. ``verify_audit_log(path)``
checks the whole set, oldest first, as one chain from ``GENESIS``: deleting an
old file is detected (as deleted lines), so keep them, archive and verify
the set together, or let ``apply_retention`` remove them (see Retention). A
rotated file ends with one empty line, its seal.

Retention
=========

``apply_retention`` (through ``JsonlSink._prune``) is the one way old files
leave a trail without breaking its proof. Without the trail's lock it verifies
the whole trail (a trail that does not verify is left as it is: pruning it
would destroy the evidence) and picks the oldest rotated files whose newest
event is past the retention (never the current file, never a file newer than
one that stays). Then, under the lock, it checks that those files are
unchanged since (inode, size, modification time) and that the lines appended
since continue the verified chain, appends an ``audit_pruned`` event through
the chain, fsyncs it, and only then unlinks the files, oldest first. Its details hold, for each file
removed, the ``seq`` and ``hash`` of its last line (``heads``). No line is
ever edited, and the files that stay keep their numbers (the oldest, highest
numbers go), so later rotations go on as before.

The verifier then accepts a trail that does not start at ``seq`` 1 when, and
only when, the trail holds an ``audit_pruned`` event whose ``heads`` include
the ``seq`` just before its first line and that line's ``prev``; the record is
itself a line of the chain, checked like any other, and counts only once the
verifier has checked it (a complete line whose hash, or HMAC, and link
verify; never a torn last line). Any other missing start
is still ``deleted``. A crash between the record and the last unlink leaves
either the whole trail (it starts at ``seq`` 1) or a prefix gone that ends at
a recorded head: both verify. Like any line, a record in a keyless trail can
be forged by someone who can write the file; with a key it cannot.

Concurrency
===========

Appends are serialised across threads by a lock and across processes by an
exclusive ``flock`` on ``<path>.lock``, taken with filelock's
``lock_descriptor`` on a descriptor the sink keeps open, so it contends with
any ``filelock.FileLock(<path> + ".lock")`` held elsewhere. (A
``FileLock.acquire()``/``release()`` pair costs about 150 us here, ten times a
whole append.) Under the lock the sink needs the head of the chain (``seq`` and
``hash`` of the last line). It keeps it from its own last write while the file
it holds open still has the size it left, one ``lseek``; when another writer
appended, repaired or rotated (rotation changes the old file's size by adding
the seal), and at least once a second, it ``stat``s the path and the lock file
and reads the last line, from the end of the file. Each line goes out in one
``write`` on an ``O_APPEND`` descriptor; the fsync comes after the lock is
released, so other writers do not wait for it.
"""

from __future__ import annotations

import datetime
import enum
import errno
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import (
    Any,
    BinaryIO,
    Final,
    Literal,
    NamedTuple,
    NoReturn,
    Protocol,
    cast,
    runtime_checkable,
)

import attrs

from ._exceptions import ConfigurationError, InvalidArgumentType, TermsafeError

__all__ = [
    "GENESIS",
    "Anchor",
    "AuditEvent",
    "AuditSink",
    "AuditTrailError",
    "JsonlSink",
    "LoggingSink",
    "MemorySink",
    "VerifyReport",
    "redact_fields",
    "utc_timestamp",
    "verify_audit_log",
]

#: The ``prev`` of the first line of a trail.
GENESIS: Final = "0" * 64

FsyncMode = Literal["always", "batch", "never"]
_FSYNC_MODES: Final = ("always", "batch", "never")
#: "batch" mode fsyncs at least every this many lines ...
_BATCH_LINES: Final = 100
#: ... or at the first append this many seconds after the oldest unsynced line.
_BATCH_SECONDS: Final = 1.0
#: How often a busy sink does the full check of its trail and lock file.
_RECHECK_SECONDS: Final = 1.0

_MAC_PLAIN: Final = "sha256"
_MAC_HMAC: Final = "hmac-sha256"
_LINE_KEYS: Final = frozenset({"event", "hash", "mac", "prev", "seq"})
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


class AuditTrailError(TermsafeError, RuntimeError):
    """The audit trail cannot be appended to.

    Raised when the last line of an existing trail is not a trail line (the file
    was damaged or tampered with: run ``verify_audit_log``), or when a closed
    ``JsonlSink`` is used.
    """


# -- timestamps and JSON ----------------------------------------------------------------


def utc_timestamp(t: float | None = None) -> str:
    """Format a point in time as ISO 8601 UTC with milliseconds and a ``Z``.

    Args:
        t: Seconds since the epoch, as ``time.time()`` returns; default now.
            Sub-millisecond digits are dropped, never rounded up.

    Returns:
        For example ``"2026-11-28T07:23:22.123Z"``.

    Raises:
        InvalidArgumentType: ``t`` is not a number.
        ConfigurationError: ``t`` is NaN or infinite.
    """
    if t is None:
        t = time.time()
    elif isinstance(t, bool) or not isinstance(t, (int, float)):
        raise InvalidArgumentType(f"t must be a number of seconds since the epoch (got {t!r})")
    elif not math.isfinite(t):
        raise ConfigurationError(f"t must be finite (got {t!r})")
    dt = datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def _json_default(obj: object) -> object:
    # Details are documented as JSON-serialisable; these cover what slips
    # through in practice (a read-only mapping, a set of roles, a path) so that
    # an event is never lost to a serialisation error.
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return sorted(obj, key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    return repr(obj)


def _normalise(obj: object) -> object:
    # Fallback for what the encoder rejects even with _json_default: keys that
    # are not strings (sort_keys cannot order mixed types) and NaN/infinity.
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else str(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return _normalise(_json_default(obj))
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    return _normalise(_json_default(obj))


_CANONICAL: Final = json.JSONEncoder(
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=False,
    default=_json_default,
)
_CANONICAL_ASCII: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
)


def _canonical(obj: object) -> str:
    try:
        return _CANONICAL.encode(obj)
    except (TypeError, ValueError):
        return _CANONICAL.encode(_normalise(obj))


def _encode_event(event: AuditEvent) -> bytes:
    text = _canonical(event.as_dict())
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8: escape the line (hash included)
        # so that the file stays valid UTF-8 for every reader.
        return _CANONICAL_ASCII.encode(json.loads(text)).encode()


def _digest(body: bytes, key: bytes | None) -> str:
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.digest(key, body, "sha256").hex()


# -- events ---------------------------------------------------------------------------


def _str_field(name: str, value: object, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, str):
        # A str enum (WorkflowState.KILLED) becomes its plain value.
        return str.__str__(value)
    kind = "a str or None" if optional else "a str"
    raise InvalidArgumentType(f"AuditEvent.{name} must be {kind} (got {value!r})")


# attrs converters must be named functions for mypy's attrs plugin.
def _timestamp_str(value: object) -> str:
    return cast(str, _str_field("timestamp", value, optional=False))


def _type_str(value: object) -> str:
    return cast(str, _str_field("type", value, optional=False))


def _workflow_id_str(value: object) -> str | None:
    return _str_field("workflow_id", value, optional=True)


def _reason_str(value: object) -> str | None:
    return _str_field("reason", value, optional=True)


def _state_str(value: object) -> str | None:
    return _str_field("state", value, optional=True)


def _frozen_details(value: object) -> Mapping[str, Any]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise InvalidArgumentType(f"AuditEvent.details must be a mapping (got {value!r})")
    return types.MappingProxyType(dict(value))


def _frozen_actor(value: object) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgumentType(
            "AuditEvent.actor must be a mapping such as Principal.as_dict(), or None "
            f"(got {value!r})"
        )
    return types.MappingProxyType(dict(value))


def _check_seq(_inst: object, _attr: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"AuditEvent.seq must be an int (got {value!r})")
    if value < 0:
        raise ConfigurationError(f"AuditEvent.seq must be >= 0 (got {value!r})")


def _check_type(_inst: object, _attr: object, value: str) -> None:
    if not value:
        raise ConfigurationError("AuditEvent.type must not be empty (got '')")


@attrs.frozen
class AuditEvent:
    """One thing that happened, as the audit trail records it.

    ``actor`` and ``details`` are stored as read-only copies (values nested in
    them are shared with the caller, not copied). They take no part in the
    hash of the event, only in equality.

    Args:
        seq: The emitter's sequence number for this event (not the trail's).
        timestamp: When it happened, from ``utc_timestamp()``.
        type: What happened: ``"kill_requested"``, ``"kill_refused"``,
            ``"kill_deferred"``, ``"phase_changed"``, ``"hook_ran"``,
            ``"hook_failed"``, ``"state_changed"``, ``"alert"``, ...
        workflow_id: The workflow concerned, if any.
        actor: Who acted, as ``Principal.as_dict()``; ``None`` for termsafe itself.
        reason: The reason given, if any.
        state: The workflow state after the event, as a plain string (a str
            enum is converted to its value).
        details: JSON-serialisable extra data; default empty.

    Raises:
        InvalidArgumentType: A field has the wrong type.
        ConfigurationError: ``seq`` is negative or ``type`` is empty.
    """

    seq: int = attrs.field(validator=_check_seq)
    timestamp: str = attrs.field(converter=_timestamp_str)
    type: str = attrs.field(converter=_type_str, validator=_check_type)
    workflow_id: str | None = attrs.field(default=None, converter=_workflow_id_str)
    actor: Mapping[str, Any] | None = attrs.field(default=None, converter=_frozen_actor, hash=False)
    reason: str | None = attrs.field(default=None, converter=_reason_str)
    state: str | None = attrs.field(default=None, converter=_state_str)
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_details, hash=False)

    def as_dict(self) -> dict[str, Any]:
        """Return the event as a plain, JSON-ready dict.

        Returns:
            A new dict with the eight fields; ``actor`` and ``details`` are
            plain dicts (shallow copies).
        """
        actor = self.actor
        return {
            "actor": None if actor is None else dict(actor),
            "details": dict(self.details),
            "reason": self.reason,
            "seq": self.seq,
            "state": self.state,
            "timestamp": self.timestamp,
            "type": self.type,
            "workflow_id": self.workflow_id,
        }

    @classmethod
    def _trusted(
        cls,
        seq: int,
        timestamp: str,
        type_: str,
        workflow_id: str | None,
        actor: Mapping[str, Any] | None,
        reason: str | None,
        state: str | None,
        details: Mapping[str, Any],
    ) -> AuditEvent:
        """Build an event from termsafe's own, already well-typed values.

        The engine emits tens of thousands of events in a kill storm; the
        validating constructor costs as much as the rest of an event's path.
        The stored ``actor``/``details`` are read-only copies, as always.
        """
        event = object.__new__(cls)
        put = object.__setattr__
        put(event, "seq", seq)
        put(event, "timestamp", timestamp)
        put(event, "type", type_)
        put(event, "workflow_id", workflow_id)
        put(event, "actor", None if actor is None else types.MappingProxyType(dict(actor)))
        put(event, "reason", reason)
        put(event, "state", state)
        put(event, "details", types.MappingProxyType(dict(details)))
        return event

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditEvent:
        """Rebuild an event from ``as_dict()`` output (or a trail line's ``event``).

        Args:
            d: A mapping with at least ``seq``, ``timestamp`` and ``type``; the
                other fields default to ``None`` (``details`` to empty).

        Returns:
            The event.

        Raises:
            InvalidArgumentType: ``d`` is not a mapping, or a field has the wrong type.
            ConfigurationError: A required field is missing, or a field has a bad value.
        """
        if not isinstance(d, Mapping):
            raise InvalidArgumentType(f"AuditEvent.from_dict needs a mapping (got {d!r})")
        missing = [name for name in ("seq", "timestamp", "type") if name not in d]
        if missing:
            raise ConfigurationError(
                f"audit event is missing {', '.join(missing)} (got keys: {', '.join(sorted(d))})"
            )
        return cls(
            seq=d["seq"],
            timestamp=d["timestamp"],
            type=d["type"],
            workflow_id=d.get("workflow_id"),
            actor=d.get("actor"),
            reason=d.get("reason"),
            state=d.get("state"),
            details=d.get("details"),
        )


# -- redaction ------------------------------------------------------------------------

_EMAIL: Final = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)


def redact_fields(
    *names: str, replacement: str = "[redacted]", scrub_emails: bool = False
) -> Callable[[AuditEvent], AuditEvent]:
    """Build a ``redact`` function for ``JsonlSink`` (or ``LoggingSink``).

    The function replaces the value of every key called one of ``names`` in the
    event's ``details``, at any depth (nested mappings and lists of mappings
    included), by ``replacement``. With ``scrub_emails=True`` it also replaces
    every e-mail address (``local@domain.tld``; a domain needs a dot) in the
    event's ``reason`` by ``replacement``. ``actor`` is never touched: who acted
    is what an audit trail is for. An event with nothing to redact is returned
    as it is.

    Args:
        *names: The ``details`` keys whose values are personal data.
        replacement: What to write instead.
        scrub_emails: Also remove e-mail addresses from ``reason``.

    Returns:
        A function from ``AuditEvent`` to ``AuditEvent``.

    Raises:
        InvalidArgumentType: A name or ``replacement`` is not a string.
        ConfigurationError: No names and ``scrub_emails`` is false (nothing to do).
    """
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgumentType(f"redact_fields names must be strings (got {name!r})")
    if not isinstance(replacement, str):
        raise InvalidArgumentType(f"replacement must be a str (got {replacement!r})")
    if not names and not scrub_emails:
        raise ConfigurationError(
            "redact_fields needs at least one field name or scrub_emails=True (got neither)"
        )
    hidden = frozenset(names)

    def scrub(value: object) -> tuple[object, bool]:
        if isinstance(value, Mapping):
            changed = False
            out: dict[Any, object] = {}
            for k, v in value.items():
                if k in hidden:
                    out[k] = replacement
                    changed = True
                else:
                    out[k], sub = scrub(v)
                    changed = changed or sub
            return (out if changed else value), changed
        if isinstance(value, (list, tuple)):
            items = [scrub(v) for v in value]
            if any(sub for _, sub in items):
                return [v for v, _ in items], True
        return value, False

    def redact(event: AuditEvent) -> AuditEvent:
        details, changed = scrub(event.details) if hidden else (event.details, False)
        reason = event.reason
        if scrub_emails and reason is not None:
            reason = _EMAIL.sub(replacement, reason)
        if not changed and reason == event.reason:
            return event
        return attrs.evolve(event, details=details, reason=reason)

    redact.__qualname__ = redact.__name__ = f"redact_fields({', '.join(map(repr, names))})"
    return redact


def _check_redact(redact: object) -> Callable[[AuditEvent], AuditEvent] | None:
    if redact is not None and not callable(redact):
        raise InvalidArgumentType(f"redact must be callable or None (got {redact!r})")
    return cast("Callable[[AuditEvent], AuditEvent] | None", redact)


def _apply_redact(
    redact: Callable[[AuditEvent], AuditEvent] | None, event: AuditEvent
) -> AuditEvent:
    if redact is None:
        return event
    out = redact(event)
    if not isinstance(out, AuditEvent):
        raise InvalidArgumentType(f"redact must return an AuditEvent (got {out!r})")
    return out


def _check_event(event: object) -> AuditEvent:
    if not isinstance(event, AuditEvent):
        raise InvalidArgumentType(f"emit() needs an AuditEvent (got {event!r})")
    return event


# -- sinks ----------------------------------------------------------------------------


@runtime_checkable
class AuditSink(Protocol):
    """Where audit events go.

    A sink is called from one thread at a time by the terminator, but the
    shipped sinks are thread-safe anyway. A sink that raises loses that event;
    the terminator records the failure and raises an alert.
    """

    def emit(self, event: AuditEvent) -> None:
        """Record one event.

        Args:
            event: The event.
        """

    def close(self) -> None:
        """Flush what is pending and release files and handles."""


class MemorySink:
    """Keep events in a list: for tests and for in-process inspection.

    Thread-safe. ``close()`` keeps the events (a test reads them afterwards).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        """Append ``event``.

        Args:
            event: The event.

        Raises:
            InvalidArgumentType: ``event`` is not an ``AuditEvent``.
        """
        _check_event(event)
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[AuditEvent]:
        """A copy of the events received so far, oldest first."""
        with self._lock:
            return list(self._events)

    def types(self) -> list[str]:
        """Return the ``type`` of every event received so far, oldest first.

        Returns:
            The list of types.
        """
        with self._lock:
            return [e.type for e in self._events]

    def clear(self) -> None:
        """Forget every event received so far."""
        with self._lock:
            self._events.clear()

    def close(self) -> None:
        """Do nothing: the events stay readable."""

    def __repr__(self) -> str:
        return f"<MemorySink: {len(self._events)} events>"


class LoggingSink:
    """Write each event as one stdlib log record.

    The message is the event as canonical JSON; the record also carries the
    event as a dict in ``record.audit_event`` (``extra={"audit_event": ...}``)
    for structured handlers.

    Args:
        logger: The logger to use; default ``logging.getLogger("termsafe.audit")``.
        level: The level of the records; default ``logging.INFO``.
        redact: Applied to each event before it is logged (see ``redact_fields``).

    Raises:
        InvalidArgumentType: ``logger`` is not a ``logging.Logger``, ``level`` is
            not an int or ``redact`` is not callable.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        level: int = logging.INFO,
        *,
        redact: Callable[[AuditEvent], AuditEvent] | None = None,
    ) -> None:
        if logger is None:
            logger = logging.getLogger("termsafe.audit")
        elif not isinstance(logger, logging.Logger):
            raise InvalidArgumentType(f"logger must be a logging.Logger or None (got {logger!r})")
        if isinstance(level, bool) or not isinstance(level, int):
            raise InvalidArgumentType(f"level must be an int logging level (got {level!r})")
        self.logger = logger
        self.level = level
        self._redact = _check_redact(redact)

    def emit(self, event: AuditEvent) -> None:
        """Log ``event`` (nothing is serialised if the level is disabled).

        Args:
            event: The event.

        Raises:
            InvalidArgumentType: ``event`` is not an ``AuditEvent``, or ``redact``
                returned something else.
        """
        event = _apply_redact(self._redact, _check_event(event))
        if not self.logger.isEnabledFor(self.level):
            return
        data = event.as_dict()
        self.logger.log(self.level, _canonical(data), extra={"audit_event": data})

    def close(self) -> None:
        """Do nothing: the handlers belong to the application."""

    def __repr__(self) -> str:
        return f"<LoggingSink {self.logger.name!r} level={logging.getLevelName(self.level)}>"


@attrs.frozen
class Anchor:
    """The head of a trail, kept somewhere else to detect truncation.

    Args:
        seq: The trail ``seq`` of the last line (0 for an empty trail).
        hash: That line's ``hash`` (``GENESIS`` for an empty trail).

    Raises:
        InvalidArgumentType: ``seq`` is not an int or ``hash`` not a str.
        ConfigurationError: ``seq`` is negative or ``hash`` is not 64 lowercase hex digits.
    """

    seq: int = attrs.field()
    hash: str = attrs.field()

    @seq.validator
    def _check_seq(self, _attr: object, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentType(f"Anchor.seq must be an int (got {value!r})")
        if value < 0:
            raise ConfigurationError(f"Anchor.seq must be >= 0 (got {value!r})")

    @hash.validator
    def _check_hash(self, _attr: object, value: object) -> None:
        if not isinstance(value, str):
            raise InvalidArgumentType(f"Anchor.hash must be a str (got {value!r})")
        if not _HEX64.fullmatch(value):
            raise ConfigurationError(f"Anchor.hash must be 64 lowercase hex digits (got {value!r})")

    def to_json(self) -> str:
        """Serialise the anchor.

        Returns:
            ``{"hash":"...","seq":N}``.
        """
        return _canonical({"hash": self.hash, "seq": self.seq})

    @classmethod
    def from_json(cls, text: str | bytes) -> Anchor:
        """Parse what ``to_json()`` wrote.

        Args:
            text: The JSON text.

        Returns:
            The anchor.

        Raises:
            InvalidArgumentType: ``text`` is not a str or bytes, or a field has
                the wrong type.
            ConfigurationError: ``text`` is not an anchor.
        """
        if not isinstance(text, (str, bytes)):
            raise InvalidArgumentType(f"Anchor.from_json needs a str or bytes (got {text!r})")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"not an anchor: {text!r} ({exc})") from None
        if not isinstance(data, dict) or set(data) != {"hash", "seq"}:
            raise ConfigurationError(f'not an anchor: {text!r} (want {{"hash": ..., "seq": ...}})')
        return cls(seq=data["seq"], hash=data["hash"])


def _check_path(path: object, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentType(f"{what} must be a str or os.PathLike (got {path!r})")
    fspath = os.fspath(path)
    if not isinstance(fspath, str):
        raise InvalidArgumentType(f"{what} must be a text path, not bytes (got {path!r})")
    if not fspath:
        raise ConfigurationError(f"{what} must not be empty (got '')")
    return os.path.abspath(fspath)


def _check_key(key: object) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, bytes):
        raise InvalidArgumentType(f"key must be bytes or None (got {type(key).__name__})")
    if not key:
        raise ConfigurationError("key must not be empty (got b'')")
    return key


def _rotated(path: str) -> list[tuple[int, str]]:
    """``(n, path.n)`` for every rotated sibling of ``path``, oldest (highest n) first."""
    folder, base = os.path.split(path)
    prefix = base + "."
    found = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        suffix = name[len(prefix) :]
        if name.startswith(prefix) and suffix.isdigit() and suffix[0] != "0":
            found.append((int(suffix), os.path.join(folder, name)))
    found.sort(reverse=True)
    return found


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_line(fd: int, size: int) -> bytes:
    """The last ``\\n``-terminated line of a file whose bytes end with ``\\n``.

    Reads backwards from the end in growing blocks; never reads the whole file
    unless it is one line.
    """
    block = 4096
    end = size - 1  # the final newline
    while True:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return chunk[cut + 1 :] + b"\n"
        if start == 0:
            return chunk + b"\n"
        block *= 4


def _torn_cut(fd: int, size: int) -> int:
    """Where the last complete line of the file ends (0 if there is none)."""
    pos = size
    block = 4096
    while pos > 0:
        start = max(0, pos - block)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
        block *= 4
    return 0


class JsonlSink:
    """Append events to a hash-chained JSONL file (see the module docstring).

    Thread-safe and process-safe: any number of sinks, in any number of
    processes, may append to one trail and produce one valid chain. Opening a
    file whose last line was torn by a crash (no line ending) removes that
    partial line before the next append; nothing else is ever changed.

    The sink keeps the trail and its lock file open between appends. It notices
    at once what other ``JsonlSink`` writers do (append, rotate, repair); a
    trail file renamed or deleted behind its back by anything else (do not
    point logrotate at a trail: use ``max_bytes``), or a deleted lock file, it
    notices within a second.

    Args:
        path: The trail file; created (and its folder entry fsynced, unless
            ``fsync="never"``) at the first append.
        key: An HMAC-SHA-256 key. With it every line is signed and only the key
            verifies it; keep it away from the file.
        fsync: ``"always"``: fsync after every line (emit returns when the line
            is durable). ``"batch"``: fsync on ``flush()``, on ``close()``,
            every 100 lines, and at the first append one second or more after
            the oldest unsynced line (there is no timer thread, so a quiet sink
            syncs at its next ``flush()``). ``"never"``: leave it to the OS.
        redact: Applied to each event before it is hashed and written: what it
            removes never reaches the disk (see ``redact_fields``). If it raises,
            the event is not written.
        max_bytes: Rotate before a line would make the file larger than this:
            ``path`` becomes ``path.1`` (older ones shift up, ``.1`` to ``.2`` and
            so on; none is deleted, except by ``apply_retention``, which records
            it in the chain) and a new ``path`` continues the chain
            (its first ``prev`` is the last hash of ``path.1``, its ``seq``
            follows on). A rotated file ends with one empty line, the seal that
            tells other writers still holding it open to move on; with it, each
            file stays within ``max_bytes``, except that a single line longer than
            that still goes into a file of its own.

    Raises:
        InvalidArgumentType: ``path`` is not a path, ``key`` is not bytes,
            ``redact`` is not callable, or ``max_bytes`` is not an int.
        ConfigurationError: ``fsync`` is not one of the modes, ``key`` is empty,
            ``max_bytes`` is not positive, or ``path`` is a directory.
        FileNotFoundError: The folder of ``path`` does not exist.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        fsync: FsyncMode = "always",
        redact: Callable[[AuditEvent], AuditEvent] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.path: str = _check_path(path, "path")
        self._key = _check_key(key)
        if fsync not in _FSYNC_MODES:
            raise ConfigurationError(
                f"fsync must be one of 'always', 'batch', 'never' (got {fsync!r})"
            )
        self.fsync: FsyncMode = fsync
        self._redact = _check_redact(redact)
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
                raise InvalidArgumentType(f"max_bytes must be an int or None (got {max_bytes!r})")
            if max_bytes <= 0:
                raise ConfigurationError(f"max_bytes must be > 0 (got {max_bytes!r})")
        self.max_bytes = max_bytes
        if os.path.isdir(self.path):
            raise ConfigurationError(f"audit trail path {self.path!r} is a directory, not a file")
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                errno.ENOENT, "the folder of the audit trail does not exist", folder
            )
        self._mac_name = _MAC_PLAIN if self._key is None else _MAC_HMAC
        self._mac_part = b',"mac":"' + self._mac_name.encode() + b'","prev":"'
        self._lock_path = self.path + ".lock"
        # filelock takes 25 ms to import: only sinks that write need it.
        from filelock import lock_descriptor, unlock_descriptor

        self._try_lock = functools.partial(lock_descriptor, blocking=False)
        self._unlock = unlock_descriptor
        self._lock = threading.Lock()
        self._closed = False
        self._reset()
        _track_for_fork(self)

    def _reset(self) -> None:
        self._lock_fd: int | None = None
        self._fd: int | None = None
        # The file as our last write left it (device, inode, size) and its head.
        self._ident: tuple[int, int] = (-1, -1)
        self._size = -1
        self._head_seq = 0
        self._head_hash = GENESIS
        self._pending = 0
        self._pending_since = 0.0
        self._checked_at = -math.inf

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fsync={self.fsync!r}"
        return f"<JsonlSink {self.path!r} {state}{' hmac' if self._key else ''}>"

    # -- public ---------------------------------------------------------------------

    def emit(self, event: AuditEvent) -> None:
        """Append ``event`` as the next line of the chain.

        Args:
            event: The event.

        Raises:
            InvalidArgumentType: ``event`` is not an ``AuditEvent``, or ``redact``
                returned something else.
            AuditTrailError: The sink is closed, or the trail's last line is
                damaged so the chain cannot be continued.
            ConfigurationError: The trail is signed differently (HMAC vs plain,
                or another key).
            OSError: The write or fsync failed; nothing partial is left behind.
        """
        _check_event(event)
        if self._redact is not None:
            event = _apply_redact(self._redact, event)
        prefix = b'{"event":' + _encode_event(event)
        with self._lock:
            if self._closed:
                raise AuditTrailError(f"emit() on a closed JsonlSink for {self.path!r}")
            checked = self._lock_trail(create=True)
            try:
                self._append(prefix, checked)
            finally:
                self._unlock_trail()
            if self.fsync != "never":
                self._make_durable()

    def flush(self) -> None:
        """Make every line written so far durable (fsync), in ``"batch"`` mode.

        In ``"always"`` mode nothing is pending; in ``"never"`` mode this does
        nothing (every line is already handed to the OS, unbuffered).

        Raises:
            OSError: The fsync failed.
        """
        with self._lock:
            if self._pending and self._fd is not None:
                self._sync()

    def anchor(self) -> Anchor:
        """Return the head of the chain: ``seq`` and ``hash`` of the trail's last line.

        The head is read under the trail's lock, so it includes lines appended
        by other sinks and processes. Store it somewhere the trail's writers
        cannot change and pass it to ``verify_audit_log`` to detect truncation.

        Returns:
            The anchor (``Anchor(0, GENESIS)`` for a trail with no lines).

        Raises:
            AuditTrailError: The sink is closed, or the trail's last line is damaged.
        """
        with self._lock:
            if self._closed:
                raise AuditTrailError(f"anchor() on a closed JsonlSink for {self.path!r}")
            # A second may not have passed since the last full check, but a
            # caller asking for an anchor wants the truth now.
            self._checked_at = -math.inf
            self._lock_trail(create=False)
            try:
                return Anchor(self._head_seq, self._head_hash)
            finally:
                self._unlock_trail()

    def close(self) -> None:
        """Flush (fsync in ``"always"`` and ``"batch"`` modes) and close the files.

        Idempotent.

        Raises:
            OSError: The final fsync failed (the files are closed anyway).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._pending and self._fd is not None:
                    self._sync()
            finally:
                self._close_fds()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _append(self, prefix: bytes, checked: bool) -> None:
        """Under both locks: chain an event (``prefix`` is ``{"event":...``) to the head.

        Rotates first when the line would take the file past ``max_bytes``.
        ``checked``: the head was just read from the file (``_lock_trail``'s
        full check), so a rotation may go ahead at once.
        """
        while True:
            seq = self._head_seq + 1
            tail = self._head_hash.encode() + b'","seq":' + str(seq).encode() + b"}"
            body = prefix + self._mac_part + tail
            if self._key is None:
                digest = hashlib.sha256(body).hexdigest()
            else:
                digest = hmac.digest(self._key, body, "sha256").hex()
            line = prefix + b',"hash":"' + digest.encode() + b'"' + self._mac_part + tail + b"\n"
            if self.max_bytes is None or self._size + len(line) < self.max_bytes:
                break
            if self._size <= 0:
                break  # a line longer than max_bytes gets a file of its own
            if checked:
                self._rotate()
                break
            # Renaming files on the fast path's word alone is too bold:
            # make sure ``_fd`` is the file at ``path`` first.
            self._sync_head(create=True)
            checked = True
        self._write(line, seq, digest)

    def _prune(
        self,
        older_than: float,
        now: float,
        *,
        dry_run: bool,
        prep: _PrunePrep | None = None,
    ) -> PrunedFiles:
        """Delete the oldest rotated files whose newest event is older than ``older_than``.

        In this order, so that a crash at any point leaves a trail that
        verifies, and writers wait for the trail's lock only for a few
        ``stat`` calls, the lines appended meanwhile, one record and the
        deletions:

        1. Without the lock (``_prepare_prune``, or ``prep`` when the caller
           did it already): the whole trail is verified; one that does not
           verify is left as it is (``AuditTrailError``): pruning would destroy
           the evidence. The plan: rotated files, oldest first, as long as
           each one's newest event is older than ``now - older_than``. The
           current file is never among them, nor any file newer than one that
           stays. A dry run stops here, having taken no lock.
        2. Still without the lock, the lines writers appended meanwhile are
           verified from the verified head, until few were new. Then, under
           the lock: every planned file is still there, unchanged (same
           inode, size and modification time), and the lines appended since
           that head continue its chain; else the plan is made again (after a
           few tries, under the lock, as a last resort).
        3. An ``audit_pruned`` event is appended through the chain, and
           fsynced: the ``seq`` and ``hash`` of the last line of every file
           about to go (``details["heads"]``), so the verifier can start from
           any file that then comes first.
        4. The files are unlinked, oldest first (so the highest numbers go and
           ``path.1`` ... ``path.N`` stay contiguous). An unsealed one is
           sealed first, so a sink still holding it open moves on.

        Args:
            older_than: Retention in seconds.
            now: Seconds since the epoch that ages are measured from.
            dry_run: Plan, and report, but change nothing (no event, no deletion).
            prep: What ``_prepare_prune(older_than, now)`` returned, if called.

        Returns:
            What was (or, with ``dry_run``, would be) removed.

        Raises:
            FileNotFoundError: There is no trail at ``path``.
            AuditTrailError: The trail does not verify, or the sink is closed.
            ConfigurationError: The trail is signed differently from this sink.
        """
        for _ in range(_PRUNE_TRIES):
            if prep is None:
                prep = self._prepare_prune(older_than, now)
            pruned = PrunedFiles(len(prep.plan), sum(f.lines for f in prep.plan))
            if dry_run or not prep.plan:
                return pruned
            prep = self._catch_up(prep)
            if self._commit_prune(prep, older_than, now):
                return pruned
            prep = None  # the trail changed in between: plan again
        with self._lock:
            # The trail keeps changing: verify and plan under the lock.
            self._lock_trail(create=True)
            try:
                prep = self._prepare_prune(older_than, now, locked=True)
                if prep.plan:
                    self._remove(prep.plan, older_than, now)
                return PrunedFiles(len(prep.plan), sum(f.lines for f in prep.plan))
            finally:
                self._unlock_trail()

    def _prepare_prune(
        self, older_than: float | None, now: float, *, locked: bool = False
    ) -> _PrunePrep:
        """Verify the trail and plan a prune (none with ``older_than=None``); no lock taken.

        Raises:
            FileNotFoundError: There is no trail at ``path``.
            ConfigurationError: The trail is signed differently from this sink.
            AuditTrailError: The trail does not verify, or the sink is closed.
        """
        if self._closed:
            raise AuditTrailError(f"prune on a closed JsonlSink for {self.path!r}")
        for attempt in range(_VERIFY_TRIES):
            try:
                verifier = _verify(self.path, self._key, None, True, locked=locked)
                report = verifier.run()
                if not report.ok:
                    self._refuse(report)
                plan = []
                if older_than is not None:
                    cutoff_ms = (now - older_than) * 1000.0
                    plan = _prune_plan(
                        self.path, verifier.rotated(), cutoff_ms, verifier.stats, locked
                    )
            except _TrailChanged as exc:
                if attempt == _VERIFY_TRIES - 1:
                    raise FileNotFoundError(
                        errno.ENOENT, "the trail's files kept disappearing", exc.args[0]
                    ) from None
                continue
            return _PrunePrep(plan, verifier.head)
        raise AssertionError("unreachable")  # pragma: no cover

    def _refuse(self, report: VerifyReport) -> NoReturn:
        if report.kind == "bad_signature":
            raise ConfigurationError(
                f"audit trail {self.path!r} is not signed as this sink's key says "
                f"({report.message}): nothing pruned; pass the trail's key, or none"
            )
        raise AuditTrailError(
            f"audit trail {self.path!r} does not verify ({report.kind}: "
            f"{report.message}): nothing pruned, the evidence is kept as it is"
        )

    def _commit_prune(self, prep: _PrunePrep, older_than: float, now: float) -> bool:
        """Under the lock: check nothing changed since ``prep``, then record and delete.

        Returns:
            Whether it was done (``False``: the trail changed; nothing was).
        """
        with self._lock:
            if self._closed:
                raise AuditTrailError(f"prune on a closed JsonlSink for {self.path!r}")
            self._checked_at = -math.inf
            self._lock_trail(create=True)
            try:
                if not self._unchanged(prep):
                    return False
                self._remove(prep.plan, older_than, now)
                return True
            finally:
                self._unlock_trail()

    def _unchanged(self, prep: _PrunePrep) -> bool:
        """Under the lock: the planned files are as verified, the chain goes on from the head."""
        files = _stat_trail(self.path)
        if files is None:  # pragma: no cover - nobody renames under the lock
            return False
        where = {f.ident: f.name for f in files}
        for f in prep.plan:
            name = where.get(f.ident)
            if name is None:
                return False
            with open(name, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not _same_or_sealed(fh.fileno(), st, (f.size, f.mtime_ns)):
                    return False
        return self._continues(files, prep, locked=True) is not None

    def _continues(
        self, files: list[_TrailFile], prep: _PrunePrep, *, locked: bool
    ) -> _Verifier | None:
        """The verifier of the lines after ``prep``'s head, if they continue its chain."""
        ident, end, seq, digest = prep.head
        at = [i for i, f in enumerate(files) if f.ident == ident]
        if not at:
            return None
        tail = _Verifier(self.path, files[at[0] :], self._key, None, False, locked=locked)
        tail.start_from(end, seq, digest)
        return tail if tail.run().ok else None

    def _catch_up(self, prep: _PrunePrep) -> _PrunePrep:
        """Verify, without the lock, what writers appended since ``prep`` was made.

        So that under the lock only the lines appended in the last moments
        are left to check, however fast the writers are.
        """
        for _ in range(_CATCH_UP_ROUNDS):
            try:
                tail = self._continues(_snapshot(self.path), prep, locked=False)
            except (_TrailChanged, FileNotFoundError):
                return prep
            if tail is None:
                return prep  # the commit's own check will say so
            prep = prep._replace(head=tail.head)
            if tail.checked < _CATCH_UP_LINES:
                break
        return prep

    def _remove(self, plan: list[_PrunePlanFile], older_than: float, now: float) -> None:
        """Under the lock: seal, record and unlink the planned files."""
        where = _where(self.path)
        for f in plan:
            if not f.sealed:
                _seal(where.get(f.ident, f.path), durable=self.fsync != "never")
        self._record_prune(plan, older_than, now)
        self._unlink(plan)

    def _record_prune(self, plan: list[_PrunePlanFile], older_than: float, now: float) -> None:
        # Not passed through ``redact``: the record holds no personal data,
        # and the verifier needs every field of it.
        event = AuditEvent._trusted(
            0,
            utc_timestamp(),
            "audit_pruned",
            None,
            None,
            f"retention: rotated files whose newest event is older than {older_than:g} s",
            None,
            {
                "files": len(plan),
                "lines": sum(f.lines for f in plan),
                "first_seq": plan[0].first_seq,
                "last_seq": plan[-1].last_seq,
                "heads": [[f.last_seq, f.last_hash] for f in plan],
                "older_than_s": older_than,
                "cutoff": utc_timestamp(max(0.0, now - older_than)),
                "newest_pruned": utc_timestamp(plan[-1].newest_ms / 1000.0),
            },
        )
        self._append(b'{"event":' + _encode_event(event), True)
        # The record must be on disk before the first file goes.
        self._sync()

    def _unlink(self, plan: list[_PrunePlanFile]) -> None:
        # Appending the record may have rotated the trail (every rotated file
        # moved up one number): find each planned file by its inode.
        where = _where(self.path)
        for f in plan:  # oldest first: a crash leaves a prefix gone, which the record covers
            found = where.get(f.ident)
            if found is not None:  # else gone already, not by us: the verifier will say so
                os.unlink(found)
        if self.fsync != "never":
            _fsync_dir(os.path.dirname(self.path))

    def _after_fork(self) -> None:
        # A child inherits our descriptors, and flock belongs to the open file
        # description: sharing it would let parent and child "hold" the lock at
        # once. Drop the inherited ones (the parent keeps its own) and start over.
        self._lock = threading.Lock()
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._reset()

    def _lock_trail(self, *, create: bool) -> bool:
        """Take the cross-process lock and make ``_fd``, ``_size`` and the head current.

        The fast path costs one ``flock`` and one ``lseek``: while the file we
        hold open has the size our last write left, no ``JsonlSink`` appended,
        repaired or rotated it (rotation seals the old file with one byte, so
        its size changes too). Otherwise, and at least once a second, the full
        check also ``stat``s the path (renamed or deleted behind our back?)
        and the lock file (deleted by someone, so that our lock on the old
        inode excludes nobody?), then re-reads the head from the end of the file.

        Returns:
            Whether the full check was done.
        """
        while True:
            if self._lock_fd is None:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o644)
                self._checked_at = -math.inf
            fd = self._lock_fd
            if not self._try_lock(fd):
                _lock_blocking(fd)
            if (
                self._fd is not None
                and os.lseek(self._fd, 0, os.SEEK_END) == self._size
                and time.monotonic() - self._checked_at < _RECHECK_SECONDS
            ):
                return False
            try:
                self._checked_at = time.monotonic()
                if os.fstat(fd).st_nlink > 0:
                    self._sync_head(create=create)
                    return True
            except BaseException:
                self._unlock_trail()
                raise
            self._unlock(fd)
            self._lock_fd = None
            os.close(fd)

    def _unlock_trail(self) -> None:
        if self._lock_fd is not None:
            self._unlock(self._lock_fd)

    def _sync_head(self, *, create: bool) -> None:
        """Under the lock: make ``_fd``, ``_size`` and the head match the file."""
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and self._fd is not None and (st.st_dev, st.st_ino) == self._ident:
            if st.st_size == self._size:
                return  # nobody else appended since our last write
        elif st is not None or create:
            self._close_data_fd()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o644)
            if st is None and self.fsync != "never":
                _fsync_dir(os.path.dirname(self.path))
            st = os.fstat(self._fd)
            self._ident = (st.st_dev, st.st_ino)
        else:
            # No file and not asked to create one: the head is in path.1, if any.
            self._close_data_fd()
            self._head_seq, self._head_hash = self._rotated_head(seal=False)
            return
        assert self._fd is not None
        size = st.st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            # A torn last line: a writer died mid-write. Drop the partial line;
            # it was never a complete record, so nothing true is lost.
            size = _torn_cut(self._fd, size)
            os.ftruncate(self._fd, size)
            if self.fsync != "never":
                os.fsync(self._fd)
        self._size = size
        if size:
            self._head_seq, self._head_hash = self._parse_head(
                _last_line(self._fd, size), self.path
            )
        else:
            self._head_seq, self._head_hash = self._rotated_head(seal=create)

    def _rotated_head(self, *, seal: bool) -> tuple[int, str]:
        """The head of the newest rotated file, for an empty or missing current file.

        That happens after a crash between the rename and the first line of
        the new file. Sinks that still hold ``path.1`` open keep appending to it
        until they notice; sealing it (when we are about to append) makes them
        notice at their next append, so the chain cannot fork.
        """
        rotated = _rotated(self.path)
        if not rotated:
            return 0, GENESIS
        newest = rotated[-1][1]
        fd = os.open(newest, (os.O_RDWR | os.O_APPEND if seal else os.O_RDONLY) | _O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            cut = _torn_cut(fd, size)
            if seal and cut != size:
                os.ftruncate(fd, cut)  # a torn line, as in _sync_head
            size = cut
            sealed = size >= 2 and os.pread(fd, 2, size - 2) == b"\n\n"
            if sealed:
                size -= 1
            elif seal and size:
                os.write(fd, b"\n")
                if self.fsync != "never":
                    os.fsync(fd)
            if not size:
                return 0, GENESIS
            return self._parse_head(_last_line(fd, size), newest)
        finally:
            os.close(fd)

    def _parse_head(self, raw: bytes, path: str) -> tuple[int, str]:
        rec, problem = _parse_line(raw)
        if rec is None:
            raise AuditTrailError(
                f"cannot append to audit trail {path!r}: its last line is not a trail line "
                f"({problem}); run verify_audit_log to see what happened"
            )
        if rec["mac"] != self._mac_name:
            raise ConfigurationError(
                f"audit trail {path!r} is signed with {rec['mac']!r} but this sink uses "
                f"{self._mac_name!r} (pass the trail's key, or none, or use another file)"
            )
        if self._key is not None and not _self_check(rec, raw, self._key):
            raise ConfigurationError(
                f"the key does not verify the last line of audit trail {path!r} "
                "(a different key, or the line was tampered with: run verify_audit_log)"
            )
        return rec["seq"], rec["hash"]

    def _rotate(self) -> None:
        assert self._fd is not None
        for n, name in _rotated(self.path):
            os.rename(name, f"{self.path}.{n + 1}")
        os.rename(self.path, self.path + ".1")
        # The seal: other sinks holding the old file open see its size change
        # and look again. A crash before it leaves an unsealed path.1, which
        # the verifier accepts and other sinks find within a second.
        os.write(self._fd, b"\n")
        if self.fsync != "never":
            os.fsync(self._fd)
        self._pending = 0
        self._close_data_fd()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o644)
        if self.fsync != "never":
            _fsync_dir(os.path.dirname(self.path))
        st = os.fstat(self._fd)
        self._ident = (st.st_dev, st.st_ino)
        self._size = 0

    def _write(self, line: bytes, seq: int, digest: str) -> None:
        assert self._fd is not None
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.EIO, f"short write ({written} of {len(line)} bytes)", self.path)
        except BaseException:
            # Leave no partial line behind (disk full, signal): cut back to the
            # last complete one; if even that fails, re-read the head next time.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._size = -1
            raise
        self._size += len(line)
        self._head_seq = seq
        self._head_hash = digest

    def _make_durable(self) -> None:
        # Called after the cross-process lock is released: other writers need
        # not wait for our fsync (which covers their earlier lines too).
        if self.fsync == "always":
            self._sync()
        else:
            now = time.monotonic()
            if not self._pending:
                self._pending_since = now
            self._pending += 1
            if self._pending >= _BATCH_LINES or now - self._pending_since >= _BATCH_SECONDS:
                self._sync()

    def _sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
        self._pending = 0

    def _close_data_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._ident = (-1, -1)
            self._size = -1
            os.close(fd)

    def _close_fds(self) -> None:
        try:
            self._close_data_fd()
        finally:
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)


_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)


# -- retention ------------------------------------------------------------------------

#: The type of the event that records a prune; the verifier looks for it.
PRUNED_EVENT: Final = "audit_pruned"
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MS: Final = datetime.timedelta(milliseconds=1)


class PrunedFiles(NamedTuple):
    """What a prune of the trail removed (or, in a dry run, would remove).

    Attributes:
        files: Rotated files.
        lines: The trail lines they held.
    """

    files: int
    lines: int


@attrs.frozen
class _PrunePlanFile:
    path: str
    ident: tuple[int, int]
    lines: int
    first_seq: int
    last_seq: int
    last_hash: str
    newest_ms: int
    sealed: bool
    size: int
    mtime_ns: int


class _PrunePrep(NamedTuple):
    """A verified trail and what a prune of it removes, found without the lock."""

    plan: list[_PrunePlanFile]
    #: The verified head: its file's (device, inode), where it ends, its seq and hash.
    head: tuple[tuple[int, int] | None, int, int, str]


#: How many times a prune plans again when the trail changed before it took the lock.
_PRUNE_TRIES: Final = 3
#: A prune verifies the lines appended since its verification without the lock
#: at most this many times, until fewer than this many lines were new.
_CATCH_UP_ROUNDS: Final = 8
_CATCH_UP_LINES: Final = 500


def _where(path: str) -> dict[tuple[int, int], str]:
    """The name of every rotated file of ``path``, by (device, inode)."""
    where: dict[tuple[int, int], str] = {}
    for _, name in _rotated(path):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        where[(st.st_dev, st.st_ino)] = name
    return where


def _event_ms(timestamp: object) -> int | None:
    """An event's ``timestamp`` as whole milliseconds since the epoch, or ``None``."""
    if not isinstance(timestamp, str):
        return None
    try:
        dt = datetime.datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return (dt - _EPOCH) // _MS


def _scan_rotated(
    path: str, f: _TrailFile, stats: dict[tuple[int, int], tuple[int, int]], locked: bool
) -> _PrunePlanFile | None:
    """What a prune needs to know of one rotated file; ``None`` if it cannot go.

    A file that cannot go: empty, a line that is not a trail line (torn,
    damaged), or an event whose ``timestamp`` is not ISO 8601 (its age is
    unknown, so it is kept).

    Raises:
        _TrailChanged: The file is gone, or changed since it was verified
            (``stats``: size and modification time when the verifier opened it).
    """
    with _open_trail_file(path, f, locked=locked) as fh:
        st = os.fstat(fh.fileno())
        if not _same_or_sealed(fh.fileno(), st, stats.get((st.st_dev, st.st_ino))):
            raise _TrailChanged(f.name)
        lines = 0
        first_seq = last_seq = 0
        last_hash = GENESIS
        newest: int | None = None
        sealed = False
        for raw in fh:
            if raw == b"\n":
                sealed = True
                continue
            sealed = False
            rec, _ = _parse_line(raw)
            if rec is None or not raw.endswith(b"\n"):
                return None
            ms = _event_ms(rec["event"].get("timestamp"))
            if ms is None:
                return None
            newest = ms if newest is None else max(newest, ms)
            lines += 1
            if lines == 1:
                first_seq = rec["seq"]
            last_seq, last_hash = rec["seq"], rec["hash"]
    if newest is None:
        return None
    return _PrunePlanFile(
        f.name,
        (st.st_dev, st.st_ino),
        lines,
        first_seq,
        last_seq,
        last_hash,
        newest,
        sealed,
        st.st_size,
        st.st_mtime_ns,
    )


def _same_or_sealed(fd: int, st: os.stat_result, was: tuple[int, int] | None) -> bool:
    """Whether a file still has the (size, mtime) it had, or only gained its seal since.

    A writer seals the file it rotated right after the rename: a verifier
    that listed the trail in between saw it unsealed.
    """
    if was is None:
        return False
    if (st.st_size, st.st_mtime_ns) == was:
        return True
    return st.st_size == was[0] + 1 and os.pread(fd, 2, st.st_size - 2) == b"\n\n"


def _prune_plan(
    path: str,
    rotated: list[_TrailFile],
    cutoff_ms: float,
    stats: dict[tuple[int, int], tuple[int, int]],
    locked: bool,
) -> list[_PrunePlanFile]:
    """The rotated files (given oldest first) that go: a prefix, each one all old."""
    plan = []
    for name in rotated:
        f = _scan_rotated(path, name, stats, locked)
        # A timestamp is cut to the millisecond: the event happened up to 1 ms
        # after it says, so a file goes only when even that is past the cutoff.
        if f is None or f.newest_ms + 1 > cutoff_ms:
            break
        plan.append(f)
    return plan


def _seal(name: str, *, durable: bool) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_APPEND | _O_CLOEXEC)
    try:
        os.write(fd, b"\n")
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _recorded_heads(path: str, files: list[_TrailFile], locked: bool) -> dict[int, set[str]]:
    """``seq -> {hash}`` of every line an ``audit_pruned`` event says was pruned up to.

    Read without checking the chain: it only tells the verifier where a
    trail may start. A start it allows is provisional until the verifier
    reaches a line naming it that it verified itself (see ``_Verifier``). A
    line with no line ending is never read: it is not a complete record.
    """
    heads: dict[int, set[str]] = {}
    marker = b'"type":"' + PRUNED_EVENT.encode() + b'"'
    for f in files:
        if f.ident is None:
            continue  # a current file that did not exist
        fh = _open_trail_file(path, f, locked=locked)
        with fh:
            for raw in fh:
                if marker not in raw or not raw.endswith(b"\n"):
                    continue
                rec, _ = _parse_line(raw)
                if rec is None or rec["event"].get("type") != PRUNED_EVENT:
                    continue
                details = rec["event"].get("details")
                pairs = details.get("heads") if isinstance(details, dict) else None
                for pair in pairs if isinstance(pairs, list) else ():
                    if (
                        isinstance(pair, list)
                        and len(pair) == 2
                        and type(pair[0]) is int
                        and isinstance(pair[1], str)
                    ):
                        heads.setdefault(pair[0], set()).add(pair[1])
    return heads


_SINKS: weakref.WeakSet[JsonlSink] = weakref.WeakSet()
_fork_hook_installed = False
_fork_hook_lock = threading.Lock()


def _after_fork_in_child() -> None:
    for sink in list(_SINKS):
        sink._after_fork()


def _track_for_fork(sink: JsonlSink) -> None:
    # Registered by the first sink, not at import (no side effects at import);
    # a per-emit getpid() check would cost a syscall on every append.
    global _fork_hook_installed
    with _fork_hook_lock:
        _SINKS.add(sink)
        if not _fork_hook_installed and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook_installed = True


def _lock_blocking(fd: int) -> None:
    # Contended: wait in the kernel rather than poll (filelock's blocking
    # lock_descriptor polls with sleeps, which serialises two busy writers at
    # the poll interval). Same flock, so it still contends with FileLock.
    if sys.platform == "win32":  # pragma: no cover - termsafe targets POSIX
        from filelock import lock_descriptor

        lock_descriptor(fd, poll_interval=0.001)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)


# -- verification ---------------------------------------------------------------------


@attrs.frozen
class VerifyReport:
    """What ``verify_audit_log`` found.

    ``ok`` is true for an intact chain, and also when the only problem is a
    torn last line (``kind="torn_tail"``, ``torn_tail=True``): a crash in the
    middle of a write is not tampering, and the next append removes the
    partial line.

    Args:
        ok: No tampering found.
        lines: Complete lines checked, up to and including the first bad one
            (all of them when the trail is intact).
        first_bad_line: 1-based line number, in the file ``path``, of the first
            problem; for ``"truncated"`` past the end, the number the first
            missing line would have. ``None`` when there is none.
        kind: ``"edited"``, ``"deleted"``, ``"inserted"``, ``"reordered"``,
            ``"truncated"``, ``"torn_tail"``, ``"bad_signature"`` (the wrong
            key, or a key given for an unsigned trail, or none for a signed
            one) or ``"malformed"`` (a line that is not a trail line); ``None``
            when intact.
        message: A sentence naming the line and what is wrong with it, or
            ``"N lines, chain intact"``.
        torn_tail: The only problem is a torn last line.
        path: The file holding ``first_bad_line`` (the trail may span rotated
            files); ``None`` when there is no problem.
        pruned_through: The last ``seq`` of the files a recorded prune removed
            (the trail now starts at the next one); 0 when it starts at ``seq`` 1.
    """

    ok: bool
    lines: int
    first_bad_line: int | None
    kind: str | None
    message: str
    torn_tail: bool = False
    path: str | None = None
    pruned_through: int = 0


def _parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """A trail line's fields, or ``None`` and what is wrong with it."""
    try:
        rec = json.loads(raw)
    except UnicodeDecodeError:
        return None, "it is not UTF-8"
    except ValueError as exc:
        return None, f"it is not valid JSON ({exc.args[0] if exc.args else exc})"
    if not isinstance(rec, dict):
        return None, f"it is a JSON {type(rec).__name__}, not an object"
    if set(rec) != _LINE_KEYS:
        return None, f"its fields are {', '.join(sorted(rec))}, not {', '.join(sorted(_LINE_KEYS))}"
    seq = rec["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return None, f"its seq {seq!r} is not a positive integer"
    for name in ("prev", "hash"):
        if not isinstance(rec[name], str) or not _HEX64.fullmatch(rec[name]):
            return None, f"its {name} {rec[name]!r} is not 64 lowercase hex digits"
    if rec["mac"] not in (_MAC_PLAIN, _MAC_HMAC):
        return None, f"its mac {rec['mac']!r} is neither {_MAC_PLAIN!r} nor {_MAC_HMAC!r}"
    if not isinstance(rec["event"], dict):
        return None, f"its event is a JSON {type(rec['event']).__name__}, not an object"
    return rec, ""


def _self_check(rec: dict[str, Any], raw: bytes, key: bytes | None) -> bool:
    """Whether the line is exactly what a writer with ``key`` wrote for its content."""
    body = {k: v for k, v in rec.items() if k != "hash"}
    try:
        body_text, line_text = _CANONICAL.encode(body), _CANONICAL.encode(rec)
        try:
            body_bytes, line_bytes = body_text.encode(), line_text.encode()
        except UnicodeEncodeError:
            # A lone surrogate: the writer escaped the whole line (see _encode_event).
            body_bytes = _CANONICAL_ASCII.encode(body).encode()
            line_bytes = _CANONICAL_ASCII.encode(rec).encode()
    except ValueError:
        return False  # NaN or Infinity: json.loads takes them, no writer of ours wrote them
    if not hmac.compare_digest(_digest(body_bytes, key), rec["hash"]):
        return False
    # Any byte change is an edit, even one JSON parsing would not notice
    # (spacing, key order, escapes, a duplicated key).
    return raw.removesuffix(b"\n") == line_bytes


@attrs.define
class _Line:
    path: str
    lineno: int
    raw: bytes
    complete: bool
    last_file: bool
    rec: dict[str, Any] | None = None
    problem: str = ""
    #: The file's (device, inode), and where in it the line ends.
    ident: tuple[int, int] | None = None
    end: int = 0

    def where(self) -> str:
        return f"line {self.lineno} of {self.path}"


class _TrailFile(NamedTuple):
    """One file of a trail as a snapshot found it: its name then and its (device, inode)."""

    name: str
    ident: tuple[int, int] | None  # None: the current file did not exist


class _TrailChanged(Exception):
    """A file of the snapshot is gone (a prune removed it meanwhile): take a new snapshot."""


#: How many times the verifier lists a trail's files until two listings agree ...
_SNAPSHOT_TRIES: Final = 3
#: ... and starts over when a file it listed was removed before it was read.
_VERIFY_TRIES: Final = 10


def _stat_trail(path: str) -> list[_TrailFile] | None:
    """The trail's files, oldest first, with their identity; ``None`` if one moved meanwhile."""
    out = []
    for _, name in _rotated(path):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return None
        out.append(_TrailFile(name, (st.st_dev, st.st_ino)))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        out.append(_TrailFile(path, None))
    else:
        out.append(_TrailFile(path, (st.st_dev, st.st_ino)))
    return out


def _snapshot(path: str, *, shared_lock: bool = True) -> list[_TrailFile]:
    """The trail's files, oldest first, as they were at one moment.

    Writers rotate (renaming every file, one by one, highest number first)
    and prunes delete files (the highest numbers) while this lists them
    without the lock. A listing is taken as it is when the next one agrees
    and its numbers run from 1 without a gap; a rotation caught half way
    leaves a gap. If none is (a writer paused in the middle of a rotation,
    or a gap a crash left), the listing is taken under a shared lock on the
    trail's lock file, for a few ``stat`` calls, which waits for a rotation
    in progress. The files are read afterwards, without any lock.

    Raises:
        FileNotFoundError: Neither ``path`` nor any rotated file exists.
    """
    last: list[_TrailFile] | None = None
    for _ in range(_SNAPSHOT_TRIES):
        found = _stat_trail(path)
        if found is not None and found == last and _contiguous(path, found):
            break
        last = found if found is not None else last
    else:
        lock_fd = _lock_shared(path) if shared_lock else None
        try:
            found = _stat_trail(path)
            if found is not None:
                last = found
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the shared lock
        if last is None:  # pragma: no cover - files moving on every listing
            raise _TrailChanged(path)
    assert last is not None
    if len(last) == 1 and last[0].ident is None:
        raise FileNotFoundError(errno.ENOENT, "no audit trail at this path", path)
    return last


#: How many rotations since a snapshot the verifier follows a file through
#: without the lock.
_ROTATIONS_PROBED: Final = 64


def _contiguous(path: str, files: list[_TrailFile]) -> bool:
    """Whether the rotated files are numbered 1..N with no gap."""
    cut = len(path) + 1
    return [int(f.name[cut:]) for f in files[:-1]] == list(range(len(files) - 1, 0, -1))


def _trail_files(path: str) -> list[str]:
    """The names of the trail's files, oldest first, as they were at one moment.

    Raises:
        FileNotFoundError: Neither ``path`` nor any rotated file exists.
    """
    return [f.name for f in _snapshot(path)]


def _lock_shared(path: str) -> int | None:
    """A descriptor holding a shared lock on the trail's lock file (close it to release).

    ``None`` when there is no lock file (no writer ever locked the trail) or
    it cannot be opened: then nothing is locked.
    """
    if sys.platform == "win32":  # pragma: no cover - termsafe targets POSIX
        return None
    import fcntl

    try:
        fd = os.open(path + ".lock", os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_if(name: str, ident: tuple[int, int] | None) -> BinaryIO | None:
    try:
        fh = open(name, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        return None
    st = os.fstat(fh.fileno())
    if (st.st_dev, st.st_ino) == ident:
        return fh
    fh.close()
    return None


def _open_trail_file(path: str, f: _TrailFile, *, locked: bool = False) -> BinaryIO:
    """Open the file of a snapshot, where it was or where a rotation moved it since.

    Raises:
        _TrailChanged: It is gone (pruned).
    """
    fh = _open_if(f.name, f.ident)
    if fh is not None:
        return fh
    # Renamed by rotations since: each moved every file up one number.
    base = f.name.removeprefix(path + ".")
    number = int(base) if base.isdigit() else 0
    for n in range(number + 1, number + 1 + _ROTATIONS_PROBED):
        name = f"{path}.{n}"
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue  # a rotation in progress, or past the oldest file
        if (st.st_dev, st.st_ino) == f.ident:
            fh = _open_if(name, f.ident)
            if fh is not None:
                return fh
    # Not found (moved again meanwhile?): look while no rotation is in progress.
    lock_fd = None if locked else _lock_shared(path)
    try:
        for name in (*(n for _, n in _rotated(path)), path):
            fh = _open_if(name, f.ident)
            if fh is not None:
                return fh
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    raise _TrailChanged(f.name)


def _read_lines(
    path: str,
    files: list[_TrailFile],
    stats: dict[tuple[int, int], tuple[int, int]],
    start: int = 0,
    *,
    locked: bool,
) -> Generator[_Line, None, None]:
    """Every line of the trail's files, oldest first (from byte ``start`` of the first).

    ``stats`` gets each file's size and modification time as it was opened.
    """
    for i, f in enumerate(files):
        last_file = i == len(files) - 1
        if f.ident is None:
            return  # the current file of a rotated trail, not created yet
        with _open_trail_file(path, f, locked=locked) as fh:
            st = os.fstat(fh.fileno())
            stats[f.ident] = (st.st_size, st.st_mtime_ns)
            if start and i == 0:
                fh.seek(start)
            offset = start if i == 0 else 0
            held: _Line | None = None
            for lineno, raw in enumerate(fh, 1):
                if held is not None:
                    yield held
                offset += len(raw)
                held = _Line(f.name, lineno, raw, raw.endswith(b"\n"), last_file)
                held.rec, held.problem = _parse_line(raw)
                held.ident, held.end = f.ident, offset
            if held is None:
                continue
            # An empty last line is a rotated file's seal: skip it. The current
            # file has one too when a writer rotated it while we read it.
            if held.raw == b"\n" and (not last_file or _moved(path, f)):
                continue
            yield held


def _moved(path: str, f: _TrailFile) -> bool:
    """Whether the file of a snapshot is no longer at ``path`` (it was rotated)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    return (st.st_dev, st.st_ino) != f.ident


class _Verifier:
    def __init__(
        self,
        path: str,
        snapshot: list[_TrailFile],
        key: bytes | None,
        anchor: Anchor | None,
        allow_pruned: bool,
        *,
        locked: bool = False,
    ) -> None:
        self._path = path
        self._snapshot = snapshot
        self._files = [f.name for f in snapshot]
        self._allow_pruned = allow_pruned
        #: Size and modification time of each file read, as it was opened.
        self.stats: dict[tuple[int, int], tuple[int, int]] = {}
        self._locked = locked
        self._lines: Generator[_Line, None, None] = _read_lines(
            path, snapshot, self.stats, locked=locked
        )
        #: The last line verified: its file, where it ends, its seq and hash.
        self.head: tuple[tuple[int, int] | None, int, int, str] = (None, 0, 0, GENESIS)
        self._continuing = False
        self._ahead: deque[_Line] = deque()
        self._key = key
        self._anchor = anchor
        self._checked = 0
        self._last_path = self._files[-1]
        self._last_lineno = 0
        self._pruned_through = 0
        self._heads: dict[int, set[str]] | None = None
        # A start after a recorded prune, accepted provisionally: the line it
        # starts at, until a verified ``audit_pruned`` line names its
        # ``(seq - 1, prev)``.
        self._unconfirmed: _Line | None = None

    def close(self) -> None:
        self._lines.close()  # closes the file it stopped in

    @property
    def checked(self) -> int:
        """How many lines were verified."""
        return self._checked

    def rotated(self) -> list[_TrailFile]:
        """The rotated files of the snapshot verified, oldest first."""
        return self._snapshot[:-1]

    def start_from(self, end: int, seq: int, digest: str) -> None:
        """Verify only what follows a verified head: byte ``end`` of the first file."""
        self._lines.close()
        self._lines = _read_lines(self._path, self._snapshot, self.stats, end, locked=self._locked)
        self._continuing = True
        self.head = (self._snapshot[0].ident, end, seq, digest)

    def _next(self) -> _Line | None:
        if self._ahead:
            return self._ahead.popleft()
        return next(self._lines, None)

    def _peek(self) -> _Line | None:
        if not self._ahead:
            line = next(self._lines, None)
            if line is None:
                return None
            self._ahead.append(line)
        return self._ahead[0]

    def _rest(self) -> Iterator[_Line]:
        while (line := self._next()) is not None:
            yield line

    def _bad(self, line: _Line, kind: str, what: str) -> VerifyReport:
        self._checked += 1 if line.complete else 0
        return VerifyReport(
            ok=False,
            lines=self._checked,
            first_bad_line=line.lineno,
            kind=kind,
            message=f"{line.where()}: {what}",
            path=line.path,
        )

    def _key_fits_somewhere(self) -> bool:
        """Whether any remaining line verifies with the key (so the key is right)."""
        return any(
            line.rec is not None
            and line.rec["mac"] == _MAC_HMAC
            and _self_check(line.rec, line.raw, self._key)
            for line in self._rest()
        )

    def run(self) -> VerifyReport:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> VerifyReport:
        key = self._key
        anchor = self._anchor
        want_seq = self.head[2] + 1
        want_prev = self.head[3]
        prev_line: _Line | None = None
        while (line := self._next()) is not None:
            if not line.complete and line.last_file and self._peek() is None:
                return self._torn(line, want_seq)
            rec = line.rec
            if rec is None or not line.complete:
                why = line.problem or "it has no line ending but more lines follow"
                return self._bad(line, "malformed", f"not a trail line: {why}")
            seq: int = rec["seq"]
            mac = rec["mac"]
            if key is None and mac == _MAC_HMAC:
                return self._bad(
                    line,
                    "bad_signature",
                    "the line is signed with HMAC-SHA-256; verify it with the trail's key",
                )
            if key is not None and mac == _MAC_PLAIN:
                if self._checked == 0 and not self._key_fits_somewhere():
                    return self._bad(
                        line,
                        "bad_signature",
                        "a key was given but the line has no HMAC (mac 'sha256'): "
                        "the trail is not signed, or not with this key",
                    )
                return self._bad(
                    line,
                    "edited",
                    "the line has a plain SHA-256 hash where the trail has HMACs: it was "
                    "rewritten by someone without the key",
                )
            if not _self_check(rec, line.raw, key):
                nxt = self._peek()
                if key is not None and self._checked == 0 and not self._key_fits_somewhere():
                    return self._bad(
                        line,
                        "bad_signature",
                        "its HMAC does not verify with this key, nor does any other "
                        "line's: the wrong key",
                    )
                if (
                    seq < want_seq
                    and nxt is not None
                    and nxt.rec is not None
                    and nxt.rec["seq"] == want_seq
                ):
                    return self._bad(
                        line,
                        "inserted",
                        f"a line with seq {seq} that does not match its hash was inserted "
                        f"(seq {seq} is already taken; seq {want_seq} follows)",
                    )
                return self._bad(
                    line,
                    "edited",
                    f"the content does not match its hash (seq {seq}): the line was edited",
                )
            if (
                prev_line is None
                and seq > want_seq
                and not self._continuing
                and self._recorded_start(seq, rec["prev"])
            ):
                # The files before this one were pruned, and the trail says so.
                if not self._allow_pruned:
                    gap = "seq 1" if seq == 2 else f"seqs 1..{seq - 1}"
                    return self._bad(
                        line,
                        "deleted",
                        f"the trail starts at seq {seq}: {gap} deleted (the trail records a "
                        "prune up to there, but a keyless trail checked against an anchor does "
                        "not accept recorded prunes: anyone who can write the file can record "
                        "one; pass allow_pruned=True to accept it)",
                    )
                if anchor is not None and anchor.seq == seq - 1 and anchor.hash != rec["prev"]:
                    return self._bad(
                        line,
                        "truncated",
                        f"the trail was pruned up to seq {seq - 1}, whose hash does not match "
                        f"the anchor's (hash {anchor.hash[:12]}..., recorded "
                        f"{rec['prev'][:12]}...): it was rewritten at or before that line",
                    )
                want_seq, want_prev = seq, rec["prev"]
                self._pruned_through = seq - 1
                self._unconfirmed = line
            if seq == want_seq:
                if rec["prev"] != want_prev:
                    return self._broken_link(line, prev_line, want_prev)
                if anchor is not None and seq == anchor.seq and rec["hash"] != anchor.hash:
                    return self._bad(
                        line,
                        "truncated",
                        f"seq {seq} does not match the anchor (hash {anchor.hash[:12]}..., "
                        f"found {rec['hash'][:12]}...): the trail was cut back and rewritten "
                        "at or before this line",
                    )
            elif seq > want_seq:
                return self._jump(line, seq, want_seq)
            else:
                return self._bad(
                    line,
                    "inserted",
                    f"seq {seq} appears a second time (seq {want_seq} was expected): "
                    "an extra line was inserted",
                )
            if self._unconfirmed is not None and rec["event"].get("type") == PRUNED_EVENT:
                self._confirm(rec)
            self._checked += 1
            want_seq = seq + 1
            want_prev = rec["hash"]
            prev_line = line
            self.head = (line.ident, line.end, seq, want_prev)
            self._last_path, self._last_lineno = line.path, line.lineno
        return self._end(want_seq)

    def _recorded_start(self, seq: int, prev: str) -> bool:
        """Whether an ``audit_pruned`` event records a prune that ended at ``seq - 1``, ``prev``."""
        if self._heads is None:
            self._heads = _recorded_heads(self._path, self._snapshot, self._locked)
        return prev in self._heads.get(seq - 1, ())

    def _confirm(self, rec: dict[str, Any]) -> None:
        """Confirm the provisional start if this verified prune record names it."""
        start = self._unconfirmed
        assert start is not None
        assert start.rec is not None
        details = rec["event"].get("details")
        pairs = details.get("heads") if isinstance(details, dict) else None
        want = [start.rec["seq"] - 1, start.rec["prev"]]
        if isinstance(pairs, list) and want in pairs:
            self._unconfirmed = None

    def _start_unconfirmed(self) -> VerifyReport | None:
        """``deleted``, when no verified line recorded the prune the trail starts after."""
        start = self._unconfirmed
        if start is None:
            return None
        assert start.rec is not None
        seq = start.rec["seq"]
        gap = "seq 1" if seq == 2 else f"seqs 1..{seq - 1}"
        return VerifyReport(
            ok=False,
            lines=1,
            first_bad_line=start.lineno,
            kind="deleted",
            message=(
                f"{start.where()}: the trail starts at seq {seq}: {gap} deleted (no line of "
                "the chain that verifies records a prune up to there, only a line that is not "
                "part of it)"
            ),
            path=start.path,
        )

    def _last_lineno_in_last_file(self) -> int:
        return self._last_lineno if self._last_path == self._files[-1] else 0

    def _end(self, want_seq: int) -> VerifyReport:
        unconfirmed = self._start_unconfirmed()
        if unconfirmed is not None:
            return unconfirmed
        anchor = self._anchor
        if anchor is not None and anchor.seq >= want_seq:
            lineno = self._last_lineno_in_last_file() + 1
            last = want_seq - 1
            return VerifyReport(
                ok=False,
                lines=self._checked,
                first_bad_line=lineno,
                kind="truncated",
                message=(
                    f"line {lineno} of {self._files[-1]}: the trail ends at seq {last} but the "
                    f"anchor is at seq {anchor.seq}: {anchor.seq - last} line(s) were cut off"
                ),
                path=self._files[-1],
            )
        notes = [f"{len(self._files)} files"] if len(self._files) > 1 else []
        if self._pruned_through:
            notes.append(f"seqs 1..{self._pruned_through} pruned, as the trail records")
        return VerifyReport(
            ok=True,
            lines=self._checked,
            first_bad_line=None,
            kind=None,
            message=f"{self._checked} lines, chain intact"
            + (f" ({'; '.join(notes)})" * bool(notes)),
            pruned_through=self._pruned_through,
        )

    def _torn(self, line: _Line, want_seq: int) -> VerifyReport:
        unconfirmed = self._start_unconfirmed()
        if unconfirmed is not None:
            return unconfirmed
        anchor = self._anchor
        if anchor is not None and anchor.seq >= want_seq:
            return self._bad(
                line,
                "truncated",
                f"the line is torn (no line ending) and the trail ends at seq {want_seq - 1}, "
                f"but the anchor is at seq {anchor.seq}: lines were cut off",
            )
        return VerifyReport(
            ok=True,
            lines=self._checked,
            first_bad_line=line.lineno,
            kind="torn_tail",
            message=(
                f"{self._checked} lines, chain intact; {line.where()} is a torn partial line "
                "(a crash mid-write, not tampering); the next append removes it"
            ),
            torn_tail=True,
            path=line.path,
            pruned_through=self._pruned_through,
        )

    def _broken_link(self, line: _Line, prev_line: _Line | None, want_prev: str) -> VerifyReport:
        # Right seq, wrong prev. Usually the previous line was edited and its
        # hash recomputed (this line still records the original hash). If this
        # line's own successor does not accept it either, this line is the one
        # that was rewritten.
        assert line.rec is not None
        nxt = self._peek()
        own_link_broken = (
            nxt is not None and nxt.rec is not None and nxt.rec["prev"] != line.rec["hash"]
        )
        if prev_line is None or own_link_broken:
            what = (
                "the first line does not start from the genesis hash"
                if prev_line is None
                else "its prev does not match the previous line's hash, nor does the next "
                "line's prev match its hash"
            )
            return self._bad(line, "edited", f"{what}: the line was edited and its hash recomputed")
        return VerifyReport(
            ok=False,
            lines=self._checked,
            first_bad_line=prev_line.lineno,
            kind="edited",
            message=(
                f"{prev_line.where()}: its hash {want_prev[:12]}... is not the one the next line "
                f"recorded ({line.rec['prev'][:12]}...): the line was edited and its hash "
                "recomputed"
            ),
            path=prev_line.path,
        )

    def _jump(self, line: _Line, seq: int, want_seq: int) -> VerifyReport:
        duplicate = False
        missing_later = False
        for later in self._rest():
            if later.rec is None:
                continue
            s = later.rec["seq"]
            if s == seq:
                duplicate = True
                break
            if want_seq <= s < seq:
                missing_later = True
        if duplicate:
            return self._bad(
                line,
                "inserted",
                f"seq {seq} appears here and again later (seq {want_seq} was expected): "
                "a copy of a later line was inserted",
            )
        if missing_later:
            return self._bad(
                line,
                "reordered",
                f"seq {seq} comes where seq {want_seq} was expected, and seq {want_seq} "
                "comes later: lines were reordered",
            )
        gap = f"seq {want_seq}" if seq == want_seq + 1 else f"seqs {want_seq}..{seq - 1}"
        where = "the trail starts" if want_seq == 1 else f"seq {want_seq - 1} is followed by"
        hint = " (is a rotated file missing?)" if line.lineno == 1 else ""
        if want_seq == 1 and self._heads:
            hint = (
                f" (the trail records a prune of seqs up to {max(self._heads)}, not up to "
                f"seq {seq - 1} with this line's prev: the rest was not removed by a prune)"
            )
        return self._bad(line, "deleted", f"{where} seq {seq}: {gap} deleted{hint}")


def verify_audit_log(
    path: str | os.PathLike[str],
    key: bytes | None = None,
    anchor: Anchor | None = None,
    *,
    allow_pruned: bool | None = None,
) -> VerifyReport:
    """Check a hash-chained trail written by ``JsonlSink`` and name its first problem.

    If rotated files exist next to ``path`` (``path.N`` ... ``path.1``), the
    whole set is verified as one chain, oldest first, so deleting a rotated
    file is detected as deleted lines. The chain must start at ``seq`` 1 from
    ``GENESIS``, or right after a prune the trail records: an ``audit_pruned``
    event (written by ``apply_retention``) naming the ``seq`` and ``hash`` the
    first remaining line follows; ``VerifyReport.pruned_through`` then says
    where. The file is read without taking the trail's lock: a line being
    written at that moment shows as a torn tail. Files renamed by a rotation,
    or removed by a prune, while they are read are followed (or the
    verification starts over); only when the listing catches a rotation half
    way is it taken under a shared lock, for a few ``stat`` calls.

    Whether a recorded prune is accepted (``allow_pruned``) depends on what
    protects the trail. With a key, a record can only come from a key holder.
    Without a key and without an anchor, the chain proves only internal
    consistency anyway. Without a key but with an anchor, the anchor is the
    only protection, and anyone who can write the file can delete its oldest
    files and append a record of it: by default a recorded prune is then not
    accepted (the missing start is ``deleted``), and ``allow_pruned=True``
    accepts any recorded prune. Sign a trail that is pruned.

    Args:
        path: The trail file (the current one, for a rotated trail).
        key: The HMAC key the trail was written with, if any.
        anchor: A head taken earlier with ``JsonlSink.anchor()``; the trail must
            reach ``anchor.seq`` and agree with ``anchor.hash`` there.
        allow_pruned: Accept a trail that starts after a recorded prune.
            ``None`` (the default): accept it when a ``key`` is given or no
            ``anchor`` is; refuse it for a keyless trail checked against an
            anchor. ``False``: any missing start is ``deleted``.

    Returns:
        The report (see ``VerifyReport`` for the kinds of problem).

    Raises:
        FileNotFoundError: Neither ``path`` nor any rotated file exists.
        InvalidArgumentType: ``key`` is not bytes, ``anchor`` not an ``Anchor``
            or ``allow_pruned`` not a bool or ``None``.
        ConfigurationError: ``key`` is empty.
        OSError: A file cannot be read (``IsADirectoryError`` for a directory).
    """
    fspath = _check_path(path, "path")
    key = _check_key(key)
    if anchor is not None and not isinstance(anchor, Anchor):
        raise InvalidArgumentType(f"anchor must be an Anchor or None (got {anchor!r})")
    if allow_pruned is None:
        allow_pruned = key is not None or anchor is None
    elif not isinstance(allow_pruned, bool):
        raise InvalidArgumentType(f"allow_pruned must be a bool or None (got {allow_pruned!r})")
    for _ in range(_VERIFY_TRIES - 1):
        try:
            return _verify(fspath, key, anchor, allow_pruned).run()
        except _TrailChanged:
            continue  # a prune removed a file before it was read: look again
    try:
        return _verify(fspath, key, anchor, allow_pruned).run()
    except _TrailChanged as exc:
        raise FileNotFoundError(
            errno.ENOENT, "the trail's files kept disappearing while it was read", exc.args[0]
        ) from None


def _verify(
    path: str, key: bytes | None, anchor: Anchor | None, allow_pruned: bool, *, locked: bool = False
) -> _Verifier:
    """A verifier of the trail as it is now (``locked``: this process holds the trail's lock)."""
    snapshot = _snapshot(path, shared_lock=not locked)
    return _Verifier(path, snapshot, key, anchor, allow_pruned, locked=locked)
