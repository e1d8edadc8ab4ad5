"""Byte sizes and a step's resources as a person reads them (the log line, the table
artifact, the terminal)."""

from __future__ import annotations

from planrun.contract.records import Resources

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size: int) -> str:
    """``size`` in the largest binary unit under which it stays at least 1: ``512 B``,
    ``1.5 MiB``, ``120 MiB`` (no decimal from 100 up)."""
    value = float(size)
    unit = _UNITS[0]
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"


def describe(used: Resources) -> str:
    """"used 42 MiB peak, 0.31 s CPU, 1.2 MiB written"."""
    return (f"used {format_bytes(used.peak_memory_bytes)} peak, {used.cpu_s:.2f} s CPU, "
            f"{format_bytes(used.written_bytes)} written")
