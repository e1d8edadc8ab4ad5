"""The estimate of the time left in a run, as the bridge computes and sends it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Estimate(BaseModel):
    """Time left: ``remaining_s`` the point estimate, ``low_s``..``high_s`` its 80 %
    interval, ``finish_at`` the projected end (ISO 8601), ``early_by_s`` how much earlier
    than first estimated the run is heading to end (or ended), None when not earlier.

    ``waiting_since`` (ISO 8601) is set while the run waits for a person (paused, or at an
    approval gate): the time left is then the work left once the run goes on, and
    ``finish_at`` and ``early_by_s`` are None, since the end depends on when it does."""

    model_config = ConfigDict(frozen=True)

    remaining_s: float
    low_s: float
    high_s: float
    finish_at: str | None = None
    early_by_s: float | None = None
    waiting_since: str | None = None

    def later(self, gone_s: float) -> Estimate:
        """The same estimate ``gone_s`` seconds later: the time left shrinks, the projected
        end stays; while the run waits for a person nothing shrinks."""
        if self.waiting_since is not None:
            return self
        return Estimate(remaining_s=round(max(0.0, self.remaining_s - gone_s), 3),
                        low_s=round(max(0.0, self.low_s - gone_s), 3),
                        high_s=round(max(0.0, self.high_s - gone_s), 3),
                        finish_at=self.finish_at, early_by_s=self.early_by_s)
