"""Argument checks shared by the modules (kept apart so any module can import it)."""

from __future__ import annotations

import math

from ._exceptions import ConfigurationError, InvalidArgumentType

__all__ = ["validate_seconds"]


def validate_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float number of seconds, or raise naming it.

    Raises:
        InvalidArgumentType: ``value`` is not a real number (bools are refused too).
        ConfigurationError: ``value`` is negative, NaN or infinite.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number of seconds (got {value!r})")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ConfigurationError(f"{name} must be >= 0 and finite (got {value!r})")
    return seconds
