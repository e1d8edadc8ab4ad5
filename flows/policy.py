"""Retry policies as data: the category defaults (docs/errors.md) combined with a plan's ``retry``
(combined by the compiler, ``flows.graph.retry_policy``).

A step's attempts are limited by both its ``retry.max_attempts`` and its error category's
limit; the smaller wins. Delays grow exponentially (or stay fixed) with real jitter,
are capped by ``max_delay``, and never undercut a server's ``Retry-After``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from planrun.errors import Category, StepError

#: Attempts allowed per category, the first included (docs/errors.md).
CATEGORY_ATTEMPTS: dict[Category, int] = {
    Category.TRANSIENT: 4,
    Category.CONFIGURATION: 1,
    Category.PERMISSION: 2,
    Category.RESOURCE: 4,
    Category.LOGIC: 1,
}

#: The most any single wait may be, even when a server asks for longer.
RETRY_AFTER_CAP_S = 600.0


@dataclass(frozen=True)
class RetryPolicy:
    """How a step is retried.

    ``max_attempts``: attempts in all, the first included; None leaves it to the category
    (at most 4). ``initial_delay_s``: wait before the second attempt (1 s).
    ``max_delay_s``: cap of one backoff wait (30 s). ``jitter``: each wait is spread
    uniformly by ± this fraction (0.2). ``backoff``: ``exponential`` doubles each time,
    ``fixed`` keeps ``initial_delay_s``.
    """

    max_attempts: int | None = None
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within 0..1")
        if self.initial_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("delays must not be negative")

    @property
    def most_attempts(self) -> int:
        """An upper bound of attempts over every category (Prefect's ``retries`` + 1)."""
        ceiling = max(CATEGORY_ATTEMPTS.values())
        return min(self.max_attempts or ceiling, ceiling)

    def attempts_for(self, category: Category) -> int:
        """Attempts allowed for an error of ``category``."""
        limit = CATEGORY_ATTEMPTS[category]
        return min(limit, self.max_attempts) if self.max_attempts else limit

    def should_retry(self, error: StepError, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (1-based), which failed with ``error``, is retried."""
        return attempt < self.attempts_for(error.category)

    def delay(self, error: StepError, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one."""
        base = self.initial_delay_s
        if self.backoff == "exponential":
            base = self.initial_delay_s * (2 ** (attempt - 1))
        base = min(base, self.max_delay_s)
        spread = (rng or random).uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        wait = max(0.0, base * (1 + spread))
        if error.retry_after is not None:
            wait = max(wait, min(error.retry_after, RETRY_AFTER_CAP_S))
        return wait
