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
from ._adapters import BUCKETS, FINAL_STATES, ORPHAN_KINDS, OTHER, OUTCOMES, Guard
from ._exceptions import ConfigurationError, InvalidArgumentType

__all__ = ["OTelMetricsHook"]


def _attributes(key: str, values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    # Built once: the kill path only looks an attribute set up.
    return {value: {key: value} for value in (*values, OTHER)}


class OTelMetricsHook:
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
        self._kills = meter.create_counter(
            "termsafe.kills", "{kill}", "Kill requests, by whether they were accepted."
        )
        self._finished = meter.create_counter(
            "termsafe.kills_finished", "{kill}", "Killed workflows, by the state they ended in."
        )
        self._latency = meter.create_histogram(
            "termsafe.kill.latency",
            "s",
            "Time from a kill request to the workflow's final state.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self._cleanup = meter.create_histogram(
            "termsafe.cleanup.duration",
            "s",
            "Time a workflow's rollback and cleanup hooks took.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self._orphans = meter.create_counter(
            "termsafe.orphans", "{orphan}", "Threads and processes that outlived their workflow."
        )
        self._outcome = _attributes("outcome", OUTCOMES)
        self._state = _attributes("final_state", FINAL_STATES)
        self._kind = _attributes("kind", ORPHAN_KINDS)
        self._guard = Guard(type(self).__name__)

    @property
    def failures(self) -> int:
        """How many calls failed inside OpenTelemetry (the first one was logged)."""
        return self._guard.failures

    def kill_requested(self, *, outcome: str) -> None:
        """Count a kill request as ``accepted`` or ``refused``.

        Args:
            outcome: ``"accepted"`` or ``"refused"``.
        """
        try:
            self._kills.add(1, self._outcome.get(outcome) or self._outcome[OTHER])
        except Exception:
            self._guard.failed("kill_requested")

    def kill_finished(self, *, final_state: str, latency_s: float) -> None:
        """Count a finished kill and record its latency.

        Args:
            final_state: The workflow's final state (``terminated``, ``killed``, ...).
            latency_s: Seconds from the kill request to that state.
        """
        try:
            attributes = self._state.get(final_state) or self._state[OTHER]
            self._finished.add(1, attributes)
            self._latency.record(latency_s, attributes)
        except Exception:
            self._guard.failed("kill_finished")

    def cleanup_finished(self, *, duration_s: float) -> None:
        """Record how long a workflow's hooks took.

        Args:
            duration_s: Seconds the hooks ran.
        """
        try:
            self._cleanup.record(duration_s)
        except Exception:
            self._guard.failed("cleanup_finished")

    def orphan_detected(self, *, kind: str) -> None:
        """Count a thread or process that outlived its workflow.

        Args:
            kind: ``"thread"`` or ``"process"``.
        """
        try:
            self._orphans.add(1, self._kind.get(kind) or self._kind[OTHER])
        except Exception:
            self._guard.failed("orphan_detected")
