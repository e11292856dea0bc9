"""Kill metrics as OpenTelemetry instruments (the ``termsafe[otel]`` extra).

Pass an ``OTelMetricsHook`` to ``Terminator(metrics_hook=...)``:

    from opentelemetry.sdk.metrics import MeterProvider
    from termsafe.otel import OTelMetricsHook

    term = termsafe.Terminator(metrics_hook=OTelMetricsHook(MeterProvider(...)))

Only the OpenTelemetry *API* is needed at run time; the application that
exports the metrics brings the SDK and its exporters. The instruments:

- ``termsafe.kills`` (counter, ``{kill}``): kill requests, by ``outcome``
  (``accepted``, ``refused``).
- ``termsafe.kills_finished`` (counter, ``{kill}``): killed workflows, by
  ``final_state`` (``completed``, ``failed``, ``terminated``, ``killed``).
- ``termsafe.kill.latency`` (histogram, ``s``): request to final state, by
  ``final_state``.
- ``termsafe.cleanup.duration`` (histogram, ``s``): how long a workflow's
  hooks ran; no attributes.
- ``termsafe.orphans`` (counter, ``{orphan}``): threads and processes that
  outlived their workflow, by ``kind`` (``thread``, ``process``).

Attribute values come from these fixed sets only (anything else is reported
as ``other``): never a workflow id, a principal or a reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

try:
    from opentelemetry import metrics
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("opentelemetry"):
        raise
    raise ModuleNotFoundError(
        f"termsafe.otel needs the OpenTelemetry API ({exc}): "
        'install it with pip install "termsafe[otel]"',
        name=exc.name,
    ) from exc

from . import __version__
from ._adapters import (
    BUCKETS,
    FINAL_STATES,
    ORPHAN_KINDS,
    OTHER,
    OUTCOMES,
    MetricsAdapter,
    Series,
)
from ._exceptions import ConfigurationError, InvalidArgumentType

__all__ = ["OTelMetricsHook"]


def _series(
    update: Callable[..., None], key: str, values: tuple[str, ...]
) -> Series[Callable[..., None]]:
    """``update`` bound to each value's attribute set.

    Built once: the kill path only looks an update up.
    """
    bound = {
        value: functools.partial(update, attributes={key: value}) for value in (*values, OTHER)
    }
    other = bound[OTHER]
    return Series(bound, lambda: other)


class OTelMetricsHook(MetricsAdapter):
    """A ``MetricsHook`` that records kills on OpenTelemetry instruments.

    Every method is cheap (one or two instrument calls with a prebuilt
    attribute set) and never raises: if an instrument call fails, the first
    failure is logged on the ``termsafe.metrics`` logger with its traceback,
    later ones only counted in ``failures``, and the kill goes on.

    Args:
        meter_provider: Where the meter comes from. ``None`` (the default)
            means the global one, ``opentelemetry.metrics.get_meter_provider()``,
            looked up now: if the application sets its provider later, the
            API's proxy forwards these instruments to it once it is set.
        meter_name: The instrumentation scope name of the meter.

    Raises:
        InvalidArgumentType: ``meter_provider`` is not an OpenTelemetry
            ``MeterProvider``, or ``meter_name`` is not a string.
        ConfigurationError: ``meter_name`` is empty.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        meter_name: str = "termsafe",
    ) -> None:
        if meter_provider is None:
            meter_provider = metrics.get_meter_provider()
        elif not isinstance(meter_provider, metrics.MeterProvider):
            raise InvalidArgumentType(
                f"meter_provider must be an opentelemetry MeterProvider (got {meter_provider!r})"
            )
        if not isinstance(meter_name, str):
            raise InvalidArgumentType(f"meter_name must be a str (got {meter_name!r})")
        if not meter_name:
            raise ConfigurationError(f"meter_name must not be empty (got {meter_name!r})")
        meter = meter_provider.get_meter(meter_name, __version__)
        kills = meter.create_counter(
            "termsafe.kills", "{kill}", "Kill requests, by whether they were accepted."
        )
        finished = meter.create_counter(
            "termsafe.kills_finished", "{kill}", "Killed workflows, by the state they ended in."
        )
        latency = meter.create_histogram(
            "termsafe.kill.latency",
            "s",
            "Time from a kill request to the workflow's final state.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        cleanup = meter.create_histogram(
            "termsafe.cleanup.duration",
            "s",
            "Time a workflow's rollback and cleanup hooks took.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        orphans = meter.create_counter(
            "termsafe.orphans", "{orphan}", "Threads and processes that outlived their workflow."
        )
        super().__init__(
            kills=_series(functools.partial(kills.add, 1), "outcome", OUTCOMES),
            finished=_series(functools.partial(finished.add, 1), "final_state", FINAL_STATES),
            latency=_series(latency.record, "final_state", FINAL_STATES),
            cleanup=cleanup.record,
            orphans=_series(functools.partial(orphans.add, 1), "kind", ORPHAN_KINDS),
        )
