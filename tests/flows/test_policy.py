"""RetryPolicy: the category limits, exponential backoff, real jitter, Retry-After."""

from __future__ import annotations

import random

import pytest

from planrun.errors import ConfigurationError, ResourceError, TransientError
from planrun.flows.graph import retry_policy
from planrun.flows.policy import RETRY_AFTER_CAP_S, RetryPolicy
from planrun.plan_schemas.model import Retry


def test_delays_double_up_to_the_cap_without_jitter() -> None:
    policy = RetryPolicy(initial_delay_s=1, max_delay_s=5, jitter=0)
    error = TransientError("x")
    assert [policy.delay(error, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]


def test_jitter_spreads_each_delay_within_its_fraction() -> None:
    policy = RetryPolicy(initial_delay_s=1, jitter=0.2)
    rng = random.Random(7)
    delays = [policy.delay(TransientError("x"), 1, rng) for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150, "jitter must actually vary the delay"
    assert min(delays) < 0.85 and max(delays) > 1.15


def test_retry_after_wins_over_a_shorter_backoff_but_is_capped() -> None:
    policy = RetryPolicy(initial_delay_s=0.1, jitter=0)
    assert policy.delay(ResourceError("x", retry_after=3), 1) == 3
    assert policy.delay(ResourceError("x", retry_after=10**6), 1) == RETRY_AFTER_CAP_S


@pytest.mark.parametrize(("max_attempts", "category_error", "expected"), [
    (None, TransientError("x"), 4), (2, TransientError("x"), 2), (9, TransientError("x"), 4),
    (None, ConfigurationError("x"), 1), (5, ConfigurationError("x"), 1),
])
def test_the_smaller_of_max_attempts_and_the_category_limit_wins(
        max_attempts: int | None, category_error: TransientError, expected: int) -> None:
    policy = RetryPolicy(max_attempts=max_attempts)
    assert policy.attempts_for(category_error.category) == expected
    if expected > 1:
        assert policy.should_retry(category_error, expected - 1) is True
    assert policy.should_retry(category_error, expected) is False


def test_plan_layers_override_field_by_field() -> None:
    policy = retry_policy(Retry(max_attempts=3, initial_delay="2s"),
                          Retry(initial_delay="250ms", jitter=0))
    assert (policy.max_attempts, policy.initial_delay_s, policy.jitter) == (3, 0.25, 0)
    assert policy.max_delay_s == 30 and policy.backoff == "exponential"


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)
