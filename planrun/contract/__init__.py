"""The one contract of everything that crosses a layer of planrun (docs/run-report.md,
docs/stream.md): statuses and their predicates, the run report, event payloads,
checkpoints, stream messages and the estimate, as pydantic models read with
``model_validate`` (``Model.read``) at every edge. One concept per module:

- ``status``: StepStatus, RunStatus and what each says (``finished``, ``ended``);
- ``version``: CONTRACT_VERSION, and how data of another version is refused;
- ``times``: ISO 8601 times as every record writes them;
- ``records``: the run report, a step's entry, an error, Progress (the one percentage);
- ``estimate``: THE Estimate;
- ``events``: planrun's event names and payloads;
- ``checkpoint``: what one process of a run keeps for the next;
- ``stream``: the bridge's messages;
- ``control``: the labels and keys the engine and the bridge share to control a run.
"""

from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.version import CONTRACT_VERSION, Versioned

__all__ = ["CONTRACT_VERSION", "RunStatus", "StepStatus", "Versioned"]
