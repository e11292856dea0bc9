"""termsafe: make stopping a workflow safe.

Wrap risky work in ``workflow()`` and ``critical_section()``; a kill (an API
call, a signal, a command from another process) escalates through timed
phases, waits for critical sections up to their grace period, runs rollback
and cleanup hooks LIFO exactly once, and writes every step to an audit sink.

Importing termsafe has no side effects: no signal handler, no thread, no file.
"""

# General layout: every name lives in a private module named for its concept
# (_terminator: the phase ladder; _workflow: what workflow code calls;
# _sections: critical sections; _hooks: the LIFO stack; _states: the transition
# table; _permissions: who may kill; _audit: the trail; _metrics; _signals).
# This file only re-exports them and makes tracebacks show ``termsafe.X``.

# Errors are imported at once: they are cheap and are raised from deep inside.
from ._exceptions import (
    AlreadyRecorded,
    AtomicWriteError,
    AuditTampered,
    ConfigurationError,
    ControlError,
    DuplicateWorkflow,
    ForcedTermination,
    GitCommandFailed,
    GitRollbackFailed,
    IdempotencyConflict,
    IdempotencyKeyReused,
    InvalidArgumentType,
    InvalidTransition,
    KillRefused,
    LeaseLost,
    NoActiveWorkflow,
    NotAGitRepository,
    OperationClosed,
    OutcomeUnknown,
    StoreCorrupt,
    Terminated,
    TerminatorClosed,
    TermsafeError,
    TransactionStateError,
    UnknownSectionKind,
    WaitTimeout,
    WorkflowNotFound,
)

# Not ``typing.TYPE_CHECKING``: importing typing would cost the command line a
# few milliseconds for nothing (type checkers treat this name as true).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from ._alerts import (
        Alert,
        AlertThresholds,
    )
    from ._atomic import (
        atomic_directory,
        atomic_file,
    )
    from ._audit import (
        Anchor,
        AuditEvent,
        AuditSink,
        JsonlSink,
        LoggingSink,
        MemorySink,
        VerifyReport,
        redact_fields,
        verify_audit_log,
    )
    from ._client import (
        ControlClient,
    )
    from ._control import (
        AccessPolicy,
        ControlServer,
        KillAnswer,
        serve_control,
    )
    from ._git import (
        GitOperation,
        GitResult,
        git_operation,
    )
    from ._hooks import (
        Hook,
    )
    from ._idempotency import (
        IdempotentCall,
        idempotent_call,
        prune_idempotency,
        resolve_outcome,
        run_pending_compensations,
    )
    from ._metrics import (
        MetricsHook,
        MetricsSnapshot,
        NoopMetricsHook,
    )
    from ._permissions import (
        Decision,
        Principal,
    )
    from ._recovery import (
        RecoveredRun,
        RecoverReport,
        SweepReport,
        recover,
        sweep_journal,
    )
    from ._replay import (
        Replay,
        WorkflowHistory,
        replay_audit,
    )
    from ._retention import (
        RetentionPolicy,
        RetentionReport,
        apply_retention,
    )
    from ._sections import (
        CriticalSection,
        critical_section,
        shielded,
    )
    from ._signals import (
        SignalHandlers,
        install_signal_handlers,
    )
    from ._states import (
        TRANSITIONS,
        WorkflowState,
    )
    from ._store import (
        SQLiteStore,
        Store,
        open_default_store,
    )
    from ._supervisor import (
        RunResult,
        Supervisor,
    )
    from ._terminator import (
        KillHandle,
        Phases,
        TerminationRequest,
        Terminator,
        get_terminator,
    )
    from ._timeline import (
        render_timeline_svg,
    )
    from ._transaction import (
        Transaction,
        transaction,
    )
    from ._workflow import (
        Workflow,
        WorkflowContext,
        checkpoint,
        current_workflow,
        on_cleanup,
        on_rollback,
        request_termination,
        sleep,
        workflow,
    )

# Everything else is imported on first use (PEP 562): ``import termsafe`` stays
# cheap for the command line and the pytest plugin, which need little of it.
_LAZY: dict[str, tuple[str, ...]] = {
    "_alerts": ("Alert", "AlertThresholds"),
    "_atomic": ("atomic_directory", "atomic_file"),
    "_audit": (
        "Anchor",
        "AuditEvent",
        "AuditSink",
        "JsonlSink",
        "LoggingSink",
        "MemorySink",
        "VerifyReport",
        "redact_fields",
        "verify_audit_log",
    ),
    "_client": ("ControlClient",),
    "_control": ("AccessPolicy", "ControlServer", "KillAnswer", "serve_control"),
    "_git": ("GitOperation", "GitResult", "git_operation"),
    "_hooks": ("Hook",),
    "_idempotency": (
        "IdempotentCall",
        "idempotent_call",
        "prune_idempotency",
        "resolve_outcome",
        "run_pending_compensations",
    ),
    "_metrics": ("MetricsHook", "MetricsSnapshot", "NoopMetricsHook"),
    "_permissions": ("Decision", "Principal"),
    "_recovery": ("RecoveredRun", "RecoverReport", "SweepReport", "recover", "sweep_journal"),
    "_replay": ("Replay", "WorkflowHistory", "replay_audit"),
    "_retention": ("RetentionPolicy", "RetentionReport", "apply_retention"),
    "_sections": ("CriticalSection", "critical_section", "shielded"),
    "_signals": ("SignalHandlers", "install_signal_handlers"),
    "_states": ("TRANSITIONS", "WorkflowState"),
    "_store": ("SQLiteStore", "Store", "open_default_store"),
    "_supervisor": ("RunResult", "Supervisor"),
    "_terminator": ("KillHandle", "Phases", "TerminationRequest", "Terminator", "get_terminator"),
    "_timeline": ("render_timeline_svg",),
    "_transaction": ("Transaction", "transaction"),
    "_workflow": (
        "Workflow",
        "WorkflowContext",
        "checkpoint",
        "current_workflow",
        "on_cleanup",
        "on_rollback",
        "request_termination",
        "sleep",
        "workflow",
    ),
}
_WHERE: dict[str, str] = {name: module for module, names in _LAZY.items() for name in names}

__version__ = "0.1.0"

__all__ = [
    "AccessPolicy",
    "Alert",
    "AlertThresholds",
    "AlreadyRecorded",
    "Anchor",
    "AtomicWriteError",
    "AuditEvent",
    "AuditSink",
    "AuditTampered",
    "ConfigurationError",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "CriticalSection",
    "Decision",
    "DuplicateWorkflow",
    "ForcedTermination",
    "GitCommandFailed",
    "GitOperation",
    "GitResult",
    "GitRollbackFailed",
    "Hook",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "IdempotentCall",
    "InvalidArgumentType",
    "InvalidTransition",
    "JsonlSink",
    "KillAnswer",
    "KillHandle",
    "KillRefused",
    "LeaseLost",
    "LoggingSink",
    "MemorySink",
    "MetricsHook",
    "MetricsSnapshot",
    "NoActiveWorkflow",
    "NoopMetricsHook",
    "NotAGitRepository",
    "OperationClosed",
    "OutcomeUnknown",
    "Phases",
    "Principal",
    "RecoverReport",
    "RecoveredRun",
    "Replay",
    "RetentionPolicy",
    "RetentionReport",
    "RunResult",
    "SQLiteStore",
    "SignalHandlers",
    "Store",
    "StoreCorrupt",
    "Supervisor",
    "SweepReport",
    "TRANSITIONS",
    "Terminated",
    "TerminationRequest",
    "Terminator",
    "TerminatorClosed",
    "TermsafeError",
    "Transaction",
    "TransactionStateError",
    "UnknownSectionKind",
    "VerifyReport",
    "WaitTimeout",
    "Workflow",
    "WorkflowContext",
    "WorkflowHistory",
    "WorkflowNotFound",
    "WorkflowState",
    "apply_retention",
    "atomic_directory",
    "atomic_file",
    "checkpoint",
    "critical_section",
    "current_workflow",
    "get_terminator",
    "git_operation",
    "idempotent_call",
    "install_signal_handlers",
    "on_cleanup",
    "on_rollback",
    "open_default_store",
    "prune_idempotency",
    "recover",
    "redact_fields",
    "render_timeline_svg",
    "replay_audit",
    "request_termination",
    "resolve_outcome",
    "run_pending_compensations",
    "serve_control",
    "shielded",
    "sleep",
    "sweep_journal",
    "transaction",
    "verify_audit_log",
    "workflow",
]


def _public(obj: "Any") -> "Any":
    # Tracebacks and reprs name the public path, not the private module.
    if getattr(obj, "__module__", "").startswith("termsafe._"):
        try:
            obj.__module__ = "termsafe"
        except (AttributeError, TypeError):
            pass
    return obj


def __getattr__(name: str) -> "Any":
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'termsafe' has no attribute {name!r}")
    from importlib import import_module

    value = _public(getattr(import_module(f"termsafe.{module}"), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


for _name in list(globals()):
    if _name in __all__:
        _public(globals()[_name])
del _name, TYPE_CHECKING
