"""What every benchmark shares: the machine it ran on, and Markdown tables."""

from __future__ import annotations

from typing import Any

from edgerepvgg.machine import CPU_FLAGS, machine_info  # noqa: F401  (re-exported for the benchmarks)


def md_table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one character per column, ``l`` or ``r``."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(map(str, row)) + " |" for row in [header, rule, *rows]]


def interleaved_latency(runners: dict, x, rounds: int, runs: int, base: str | None = None) -> dict[str, Any]:
    """Time every runner on ``x`` in ``rounds`` rounds, the order rotated by one per round, so that
    load drifting over time hits all alike. Per runner: the medians over rounds of each round's p50
    and p90 (ms) and the per-round p50s; with ``base``, the median per-round speed-up over it."""
    import numpy as np

    from edgerepvgg.evaluate import measure_latency

    names = list(runners)
    per_round: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            per_round[n].append(measure_latency(runners[n], x, warmup=5, runs=runs, max_seconds=20))
    out: dict[str, Any] = {}
    for n in names:
        p50 = np.array([lat.p50_ms for lat in per_round[n]])
        out[n] = {"p50_ms": float(np.median(p50)), "p90_ms": float(np.median([lat.p90_ms for lat in per_round[n]])),
                  "min_ms": float(min(lat.min_ms for lat in per_round[n])), "rounds_p50_ms": [round(float(v), 4) for v in p50]}  # fmt: skip
    if base is not None:
        ref = np.array(out[base]["rounds_p50_ms"])
        for n in names:
            ratios = ref / np.array(out[n]["rounds_p50_ms"])
            out[n][f"speedup_vs_{base}"] = float(np.median(ratios))
            out[n][f"speedup_vs_{base}_range"] = [float(ratios.min()), float(ratios.max())]
    return out


def save_results(out, result: dict[str, Any], text: str) -> None:
    """Write a benchmark's figures (``out``, JSON) and its report (``out`` with ``.md``) atomically,
    then print the report."""
    import json
    from pathlib import Path

    from edgerepvgg.io import write_text_atomic

    out = Path(out)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), text.rstrip("\n") + "\n")
    print(text)
