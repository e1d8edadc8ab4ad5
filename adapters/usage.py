"""What a step's tools measure of their own work, and the limits they check before writing:
the run's write quota and the disk's free space (docs/resources.md).

The engine measures what it can from outside (``flows/resources.py``); a tool knows
more: ``shell.run`` measures its program's whole process tree, the file tools know the
bytes they write. Each attempt's tool reports that to ``StepContext.usage``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from planrun.contract.records import Resources
from planrun.errors import ResourceError
from planrun.policy import LevelPolicy

MIB = 1024 * 1024


def combined(first: Resources | None, second: Resources) -> Resources:
    """Two measurements of one step as one: the higher peak, the sum of the rest."""
    if first is None:
        return second
    return Resources(peak_memory_bytes=max(first.peak_memory_bytes, second.peak_memory_bytes),
                     cpu_s=first.cpu_s + second.cpu_s,
                     written_bytes=first.written_bytes + second.written_bytes)


@dataclass
class RunWrites:
    """Bytes one run's file tools and programs have written: what its quota
    (``workspace_quota_mb`` in the policy) is counted against."""

    written: int = 0


class StepUsage:
    """One attempt's use as its tools measured it; ``run`` is the run's tally."""

    def __init__(self, run: RunWrites | None = None) -> None:
        self.run = run if run is not None else RunWrites()
        #: The programs the tool ran, their whole trees; None: it ran none.
        self.programs: Resources | None = None
        #: Bytes the tool wrote itself (a file tool), not through a program.
        self.written_bytes = 0

    def ran(self, used: Resources) -> None:
        """A program the tool ran (and all it started) used ``used``."""
        self.programs = combined(self.programs, used)
        self.run.written += used.written_bytes

    def wrote(self, size: int) -> None:
        """The tool wrote ``size`` bytes itself."""
        self.written_bytes += size
        self.run.written += size

    def quota_left(self, quota_mb: int | None) -> int | None:
        """Bytes the run may still write; None: no quota."""
        return None if quota_mb is None else max(quota_mb * MIB - self.run.written, 0)

    def may_write(self, tool: str, size: int, quota_mb: int | None) -> None:
        """Refuse (a resource error) a write of ``size`` bytes that would take the run
        over its quota."""
        left = self.quota_left(quota_mb)
        if left is not None and size > left:
            raise self.over_quota(tool, quota_mb or 0, f"refused to write {size} more bytes")

    def over_quota(self, tool: str, quota_mb: int, what: str) -> ResourceError:
        """The error of a run over its quota of ``quota_mb`` MiB: ``what`` happened."""
        return ResourceError(
            f"{tool}: {what}: over the run's workspace quota of {quota_mb} MiB "
            f"({self.run.written} bytes written by the run so far)",
            hint="write less, delete what the run no longer needs earlier in the plan, or "
                 "ask the operator to raise workspace_quota_mb in the policy")


def kept_free(total: int, policy: LevelPolicy) -> int:
    """The free space a write must leave on a disk of ``total`` bytes: the lower of the
    policy's ``min_free_mb`` and ``min_free_percent`` (so a small disk is not all kept)."""
    return int(min(policy.min_free_mb * MIB, total * policy.min_free_percent / 100))


def ensure_room(tool: str, where: Path, size: int, policy: LevelPolicy) -> None:
    """Refuse (a resource error) to write ``size`` bytes at ``where`` when it would leave
    less free space on its disk than the policy keeps free."""
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        disk = shutil.disk_usage(existing)
    except OSError:
        return  # the write itself will say what is wrong
    keep = kept_free(disk.total, policy)
    if disk.free - size < keep:
        raise ResourceError(
            f"{tool}: refused to write {size} bytes to {where}: only {disk.free} bytes are "
            f"free on its disk, and {keep} are kept free",
            hint="free space on the disk of the workspace, or write less; the operator sets "
                 "what is kept free with min_free_mb and min_free_percent in the policy",
            details={"free_bytes": disk.free, "kept_free_bytes": keep, "size": size})
