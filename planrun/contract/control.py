"""Names the engine, the bridge and the CLI share to control a run (docs/approvals.md).

A gate's asking is a Prefect suspension under a key made of the step's approval key and
a fresh nonce; an answer counts only under the key of the asking it answers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

#: The flow-run label that tells a paused run, once resumed, to end cancelled.
CONTROL_LABEL = "planrun.control"
#: The flow-run label with which the engine says it has taken in a pause: the id of the
#: ``Paused`` state it saw. The bridge answers a pause once it is there (docs/http-api.md):
#: from then on no new step starts.
PAUSE_HEARD_LABEL = "planrun.pause-heard"
#: The flow-run label that asks a run that ended to be retried: a new value each time
#: (docs/retry.md); the run's checkpoint keeps the last one it took.
RETRY_LABEL = "planrun.retry"
#: The flow-run label with which a run's process says which process it is as it starts
#: (a ``RunProcess`` as JSON): written straight to the flow run, so a bridge knows it even
#: when the run's events reach Prefect late (docs/production.md, "A worker that dies").
PROCESS_LABEL = "planrun.process"
#: The comment of a decision made because no one answered in time.
TIMED_OUT = "approval timed out"
#: The choices of a gate's form (``decision``): the step runs, or it is skipped.
APPROVE, REJECT = "approve", "reject"
#: The tag of every planrun flow run.
RUN_TAG = "planrun"
#: The deployment that runs submitted plans: flow name / deployment name.
DEPLOYMENT = "plan-runner"
DEPLOYMENT_PATH = f"planrun/{DEPLOYMENT}"


def approval_key(step_id: str) -> str:
    """The start of the pause keys of a step's approval gate: one per step (gates in
    skipped branches never take another gate's key). Each asking adds its nonce
    (``asking_key``): this part alone is predictable, so no answer is read under it."""
    slug = re.sub(r"[^a-z0-9]+", "-", step_id.lower()).strip("-")[:40]
    digest = hashlib.sha1(step_id.encode()).hexdigest()[:8]  # ids differing only in case
    return f"approval-{slug}-{digest}"  # Prefect's input keys: lowercase, digits, dashes


def asking_key(step_id: str, nonce: str) -> str:
    """The pause key of one asking of the step's gate; its answer is read under it only."""
    return f"{approval_key(step_id)}-{nonce}"


def is_asking_of(pause_key: str | None, step_id: str) -> bool:
    """Whether ``pause_key`` (a suspension's) is an asking of ``step_id``'s gate."""
    pattern = re.escape(approval_key(step_id)) + r"-[0-9a-f]{32}"
    return pause_key is not None and re.fullmatch(pattern, pause_key) is not None


def answer_form(approved: bool, comment: str = "") -> dict[str, Any]:
    """A gate's answer as its form takes it, for Prefect's resume (docs/approvals.md)."""
    return {"decision": APPROVE if approved else REJECT, "comment": comment}
