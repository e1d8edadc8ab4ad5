"""Times as the contract writes them: ISO 8601 in UTC with milliseconds and ``Z``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


def iso(ts: float | None) -> str | None:
    """ISO 8601 in UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(stamp: Any) -> float | None:
    """Epoch seconds of an ISO 8601 time as ``iso`` writes it; None for none or garbage."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def now_iso() -> str:
    """The current time as ``iso`` writes it."""
    stamp = iso(time.time())
    assert stamp is not None
    return stamp
