"""Kill metrics as Prometheus metrics (the ``termsafe[prometheus]`` extra).

Pass a ``PrometheusMetricsHook`` to ``Terminator(metrics_hook=...)``, with
the registry your ``/metrics`` endpoint serves. The metrics (``termsafe`` is
the default namespace):

- ``termsafe_kills_total`` (counter): kill requests, by ``outcome``
  (``accepted``, ``refused``).
- ``termsafe_kills_finished_total`` (counter): killed workflows, by
  ``final_state`` (``completed``, ``failed``, ``terminated``, ``killed``).
- ``termsafe_kill_latency_seconds`` (histogram): request to final state, by
  ``final_state``.
- ``termsafe_cleanup_duration_seconds`` (histogram): how long a workflow's
  hooks ran; no labels.
- ``termsafe_orphans_total`` (counter): threads and processes that outlived
  their workflow, by ``kind`` (``thread``, ``process``).

Label values come from these fixed sets only (anything else is reported as
``other``): never a workflow id, a principal or a reason. Every known label
value is exported from the start, at zero, so rate and ratio queries have a
series to work on before the first failure.
"""

from __future__ import annotations

import re

try:
    import prometheus_client
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("prometheus_client"):
        raise
    raise ModuleNotFoundError(
        f"termsafe.prometheus needs prometheus-client ({exc}): "
        'install it with pip install "termsafe[prometheus]"',
        name=exc.name,
    ) from exc

from ._adapters import BUCKETS, FINAL_STATES, ORPHAN_KINDS, OTHER, OUTCOMES, Guard
from ._exceptions import ConfigurationError, InvalidArgumentType

__all__ = ["PrometheusMetricsHook"]

_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class PrometheusMetricsHook:
    """A ``MetricsHook`` that records kills on Prometheus metrics in ``registry``.

    The registry is required, never the global ``prometheus_client.REGISTRY``
    by default: Prometheus refuses a second metric of the same name in one
    registry, so a default would make the second terminator of a process (or
    of a test session) fail, and would leak metrics from one test into the
    next. Pass ``prometheus_client.REGISTRY`` explicitly to use the global one;
    to count several terminators together, share one hook between them.

    Every method is cheap (one or two metric updates on a child made at
    construction) and never raises: if an update fails, the first failure is
    logged on the ``termsafe.metrics`` logger with its traceback, later ones
    only counted in ``failures``, and the kill goes on.

    Args:
        registry: The ``prometheus_client.CollectorRegistry`` to register in.
        namespace: Prefix of every metric name.

    Raises:
        InvalidArgumentType: ``registry`` is not a ``CollectorRegistry``, or
            ``namespace`` is not a string.
        ConfigurationError: ``namespace`` is not a valid metric name prefix,
            or ``registry`` already holds these metrics (another hook with
            the same namespace registered them); nothing is registered then.
    """

    def __init__(
        self, registry: prometheus_client.CollectorRegistry, *, namespace: str = "termsafe"
    ) -> None:
        if not isinstance(registry, prometheus_client.CollectorRegistry):
            raise InvalidArgumentType(
                f"registry must be a prometheus_client CollectorRegistry (got {registry!r})"
            )
        if not isinstance(namespace, str):
            raise InvalidArgumentType(f"namespace must be a str (got {namespace!r})")
        if not _NAMESPACE.fullmatch(namespace):
            raise ConfigurationError(
                f"namespace must match {_NAMESPACE.pattern} (got {namespace!r})"
            )
        self._kills = prometheus_client.Counter(
            "kills",
            "Kill requests, by whether they were accepted.",
            ["outcome"],
            namespace=namespace,
            registry=None,
        )
        self._finished = prometheus_client.Counter(
            "kills_finished",
            "Killed workflows, by the state they ended in.",
            ["final_state"],
            namespace=namespace,
            registry=None,
        )
        self._latency = prometheus_client.Histogram(
            "kill_latency",
            "Time from a kill request to the workflow's final state.",
            ["final_state"],
            namespace=namespace,
            unit="seconds",
            buckets=BUCKETS,
            registry=None,
        )
        self._cleanup = prometheus_client.Histogram(
            "cleanup_duration",
            "Time a workflow's rollback and cleanup hooks took.",
            namespace=namespace,
            unit="seconds",
            buckets=BUCKETS,
            registry=None,
        )
        self._orphans = prometheus_client.Counter(
            "orphans",
            "Threads and processes that outlived their workflow.",
            ["kind"],
            namespace=namespace,
            registry=None,
        )
        self._kills_by = {v: self._kills.labels(v) for v in OUTCOMES}
        self._finished_by = {v: self._finished.labels(v) for v in FINAL_STATES}
        self._latency_by = {v: self._latency.labels(v) for v in FINAL_STATES}
        self._orphans_by = {v: self._orphans.labels(v) for v in ORPHAN_KINDS}
        self._register(
            registry,
            namespace,
            (self._kills, self._finished, self._latency, self._cleanup, self._orphans),
        )
        self._guard = Guard(type(self).__name__)

    @staticmethod
    def _register(
        registry: prometheus_client.CollectorRegistry,
        namespace: str,
        collectors: tuple[prometheus_client.registry.Collector, ...],
    ) -> None:
        done: list[prometheus_client.registry.Collector] = []
        for collector in collectors:
            try:
                registry.register(collector)
            except ValueError as exc:
                for earlier in done:
                    registry.unregister(earlier)
                raise ConfigurationError(
                    f"registry already holds termsafe metrics under namespace {namespace!r} "
                    f"({exc}): share one hook between terminators, or give each its own "
                    "registry or namespace"
                ) from exc
            done.append(collector)

    @property
    def failures(self) -> int:
        """How many updates failed inside prometheus-client (the first one was logged)."""
        return self._guard.failures

    def kill_requested(self, *, outcome: str) -> None:
        """Count a kill request as ``accepted`` or ``refused``.

        Args:
            outcome: ``"accepted"`` or ``"refused"``.
        """
        try:
            child = self._kills_by.get(outcome) or self._kills.labels(OTHER)
            child.inc()
        except Exception:
            self._guard.failed("kill_requested")

    def kill_finished(self, *, final_state: str, latency_s: float) -> None:
        """Count a finished kill and record its latency.

        Args:
            final_state: The workflow's final state (``terminated``, ``killed``, ...).
            latency_s: Seconds from the kill request to that state.
        """
        try:
            finished = self._finished_by.get(final_state) or self._finished.labels(OTHER)
            latency = self._latency_by.get(final_state) or self._latency.labels(OTHER)
            finished.inc()
            latency.observe(latency_s)
        except Exception:
            self._guard.failed("kill_finished")

    def cleanup_finished(self, *, duration_s: float) -> None:
        """Record how long a workflow's hooks took.

        Args:
            duration_s: Seconds the hooks ran.
        """
        try:
            self._cleanup.observe(duration_s)
        except Exception:
            self._guard.failed("cleanup_finished")

    def orphan_detected(self, *, kind: str) -> None:
        """Count a thread or process that outlived its workflow.

        Args:
            kind: ``"thread"`` or ``"process"``.
        """
        try:
            child = self._orphans_by.get(kind) or self._orphans.labels(OTHER)
            child.inc()
        except Exception:
            self._guard.failed("orphan_detected")
