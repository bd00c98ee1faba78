"""What every benchmark shares: the machine it ran on, and Markdown tables."""

from __future__ import annotations

from typing import Any

from edgerepvgg.report import CPU_FLAGS, machine_info  # noqa: F401  (re-exported for the benchmarks)


def md_table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one character per column, ``l`` or ``r``."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(map(str, row)) + " |" for row in [header, rule, *rows]]
