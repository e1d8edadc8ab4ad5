"""The estimate of the time left in a run, as the bridge computes and sends it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Estimate(BaseModel):
    """Time left: ``remaining_s`` the point estimate, ``low_s``..``high_s`` its 80 %
    interval, ``finish_at`` the projected end (ISO 8601), ``early_by_s`` how much earlier
    than first estimated the run is heading to end (or ended), None when not earlier."""

    model_config = ConfigDict(frozen=True)

    remaining_s: float
    low_s: float
    high_s: float
    finish_at: str | None = None
    early_by_s: float | None = None

    def later(self, gone_s: float) -> Estimate:
        """The same estimate ``gone_s`` seconds later: the time left shrinks, the projected
        end stays."""
        return Estimate(remaining_s=round(max(0.0, self.remaining_s - gone_s), 3),
                        low_s=round(max(0.0, self.low_s - gone_s), 3),
                        high_s=round(max(0.0, self.high_s - gone_s), 3),
                        finish_at=self.finish_at, early_by_s=self.early_by_s)
