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
from collections.abc import Callable
from typing import TypeVar

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

from ._adapters import BUCKETS, FINAL_STATES, ORPHAN_KINDS, OTHER, OUTCOMES, MetricsAdapter, Series
from ._exceptions import ConfigurationError, InvalidArgumentType

__all__ = ["PrometheusMetricsHook"]

_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

_Metric = TypeVar("_Metric", prometheus_client.Counter, prometheus_client.Histogram)
_Update = TypeVar("_Update", bound=Callable[..., None])


def _series(
    metric: _Metric, update: Callable[[_Metric], _Update], values: tuple[str, ...]
) -> Series[_Update]:
    # Every known value's child is made now, so its series is exported from the
    # start at zero; "other" gets its child (and series) on first use.
    return Series(
        {value: update(metric.labels(value)) for value in values},
        lambda: update(metric.labels(OTHER)),
    )


class PrometheusMetricsHook(MetricsAdapter):
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
        kills = prometheus_client.Counter(
            "kills",
            "Kill requests, by whether they were accepted.",
            ["outcome"],
            namespace=namespace,
            registry=None,
        )
        finished = prometheus_client.Counter(
            "kills_finished",
            "Killed workflows, by the state they ended in.",
            ["final_state"],
            namespace=namespace,
            registry=None,
        )
        latency = prometheus_client.Histogram(
            "kill_latency",
            "Time from a kill request to the workflow's final state.",
            ["final_state"],
            namespace=namespace,
            unit="seconds",
            buckets=BUCKETS,
            registry=None,
        )
        cleanup = prometheus_client.Histogram(
            "cleanup_duration",
            "Time a workflow's rollback and cleanup hooks took.",
            namespace=namespace,
            unit="seconds",
            buckets=BUCKETS,
            registry=None,
        )
        orphans = prometheus_client.Counter(
            "orphans",
            "Threads and processes that outlived their workflow.",
            ["kind"],
            namespace=namespace,
            registry=None,
        )
        self._register(registry, namespace, (kills, finished, latency, cleanup, orphans))
        super().__init__(
            kills=_series(kills, lambda child: child.inc, OUTCOMES),
            finished=_series(finished, lambda child: child.inc, FINAL_STATES),
            latency=_series(latency, lambda child: child.observe, FINAL_STATES),
            cleanup=cleanup.observe,
            orphans=_series(orphans, lambda child: child.inc, ORPHAN_KINDS),
        )

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
