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

from ._alerts import Alert, AlertThresholds
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
from ._exceptions import (
    ConfigurationError,
    DuplicateWorkflow,
    ForcedTermination,
    HookFailed,
    InvalidArgumentType,
    InvalidTransition,
    KillRefused,
    NoActiveWorkflow,
    Terminated,
    TermsafeError,
    UnknownSectionKind,
    WaitTimeout,
    WorkflowNotFound,
)
from ._hooks import Hook
from ._metrics import MetricsHook, MetricsSnapshot, NoopMetricsHook
from ._permissions import Decision, Principal
from ._sections import CriticalSection, critical_section, shielded
from ._signals import SignalHandlers, install_signal_handlers
from ._states import TRANSITIONS, WorkflowState
from ._terminator import KillHandle, Phases, TerminationRequest, Terminator, get_terminator
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

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertThresholds",
    "Anchor",
    "AuditEvent",
    "AuditSink",
    "ConfigurationError",
    "CriticalSection",
    "Decision",
    "DuplicateWorkflow",
    "ForcedTermination",
    "Hook",
    "HookFailed",
    "InvalidArgumentType",
    "InvalidTransition",
    "JsonlSink",
    "KillHandle",
    "KillRefused",
    "LoggingSink",
    "MemorySink",
    "MetricsHook",
    "MetricsSnapshot",
    "NoActiveWorkflow",
    "NoopMetricsHook",
    "Phases",
    "Principal",
    "SignalHandlers",
    "TRANSITIONS",
    "Terminated",
    "TerminationRequest",
    "Terminator",
    "TermsafeError",
    "UnknownSectionKind",
    "VerifyReport",
    "WaitTimeout",
    "Workflow",
    "WorkflowContext",
    "WorkflowNotFound",
    "WorkflowState",
    "checkpoint",
    "critical_section",
    "current_workflow",
    "get_terminator",
    "install_signal_handlers",
    "on_cleanup",
    "on_rollback",
    "redact_fields",
    "request_termination",
    "shielded",
    "sleep",
    "verify_audit_log",
    "workflow",
]

# Tracebacks and reprs name the public path, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("termsafe._"):
        try:
            _obj.__module__ = "termsafe"
        except (AttributeError, TypeError):
            pass
del _name, _obj
