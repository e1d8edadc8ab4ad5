"""Durations as plans write them: ``250ms``, ``10s``, ``5m``, ``1h`` or a number of seconds."""

from __future__ import annotations

import re

DURATION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)?\s*$"
_RE = re.compile(DURATION_PATTERN)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``; ValueError with a plain message when it is not a duration."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative; a duration is 0 or more")
        return float(value)
    match = _RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; write 250ms, 10s, 5m, 1h or a number of seconds"
        )
    number = float(value.strip().rstrip("mhs").strip()) if match.group(2) else float(value)
    return number * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """A short human form: ``850ms``, ``12.3s``, ``4m05s``, ``1h02m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
