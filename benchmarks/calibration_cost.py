"""Calibration cost: one statistics pass (``collect_stats``) against plain FP32 inference over the
same images, side by side in one run, as a ratio (goal: <= 1.3x).

Per model, three passes over the same batches are timed in every round, their order rotated by one
per round so that load drifting over time hits them alike: FP32 inference (``plain(x)`` per batch),
the statistics pass as calibration runs it (``collect_stats``: the model and image hashes, every
activation point histogrammed), and the same pass with the reference binning (the exact path every
histogram took before the float32 path: ``count_nonzero`` and full-size int64 indices), which shows
the change in the same run. The two statistics passes must give identical histograms (checked).

Models: the bundled Fashion-MNIST models on their 256 bundled calibration images (32x32), and
RepVGG-A0 at 224x224 with random weights on 128 generated images (uniform random pixels, seeded:
the cost does not depend on what the pixels show).

    PYTHONPATH=.:benchmarks python benchmarks/calibration_cost.py              # ~5 min on 2 idle cores
    PYTHONPATH=.:benchmarks python benchmarks/calibration_cost.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import machine_info, md_table, save_results

from edgerepvgg._fuse import fuse
from edgerepvgg.checkpoints import BUNDLED, load_checkpoint
from edgerepvgg.data import TensorDataset, calibration_images
from edgerepvgg.inputs import InputSpec
from edgerepvgg.models import create_model
from edgerepvgg.quant import observers
from edgerepvgg.quant.calibrate import collect_stats

log = logging.getLogger("calibration_cost")
BATCH = 64
GOAL = 1.3


def generated_images(spec: InputSpec, n: int, seed: int = 0) -> TensorDataset:
    """``n`` images of uniform random pixels at the spec's size (seeded), unlabelled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, spec.channels, spec.size, spec.size), generator=g, dtype=torch.uint8)
    return TensorDataset(images, torch.full((n,), -1, dtype=torch.int64), spec, f"generated:{n}x{spec.size}x{spec.size}")


def cases(quick: bool) -> list[tuple[str, Any, TensorDataset]]:
    out = []
    for name in BUNDLED:
        model, meta = load_checkpoint(name)
        plain, _ = fuse(model, meta.input_spec)
        out.append((f"{name} (bundled, 32x32)", plain, calibration_images(meta.input_spec)))
    size, n = (96, 32) if quick else (224, 128)
    torch.manual_seed(0)
    plain, _ = fuse(create_model("A0", num_classes=1000).eval(), InputSpec(size=size, resize=size), check=False)
    out.append((f"RepVGG-A0 random weights, {size}x{size}", plain, generated_images(plain.input_spec, n)))
    return out


class ReferenceBinning:
    """Within this block every histogram takes the exact reference path (as before the float32 path)."""

    def __enter__(self) -> None:
        self.saved = observers._FAST_MAX_LIMIT
        observers._FAST_MAX_LIMIT = 0.0

    def __exit__(self, *exc) -> None:
        observers._FAST_MAX_LIMIT = self.saved


def measure(plain, data: TensorDataset, rounds: int) -> dict[str, Any]:
    batches = [x for x, _ in data.batches(BATCH)]

    @torch.no_grad()
    def fp32() -> None:
        for x in batches:
            plain(x)

    def stats() -> None:
        collect_stats(plain, data, BATCH, progress=False)

    def stats_reference() -> None:
        with ReferenceBinning():
            collect_stats(plain, data, BATCH, progress=False)

    with ReferenceBinning():
        ref = collect_stats(plain, data, BATCH, progress=False)
    identical = collect_stats(plain, data, BATCH, progress=False).to_json() == ref.to_json()
    runs = {"fp32": fp32, "stats": stats, "stats_reference": stats_reference}
    fp32()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
        log.info("round %d: %s", r, ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
    out: dict[str, Any] = {"images": len(data), "source": data.source, "batch": BATCH, "histograms_identical": identical,
                           "seconds": {n: [round(t, 4) for t in v] for n, v in times.items()}}  # fmt: skip
    for name in ("stats", "stats_reference"):
        ratios = [s / f for s, f in zip(times[name], times["fp32"])]
        out[name] = {"ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                     "ratio_of_minima": min(times[name]) / min(times["fp32"]),
                     "median_s": statistics.median(times[name])}  # fmt: skip
    out["fp32_median_s"] = statistics.median(times["fp32"])
    return out


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Calibration cost ({m['date']})", "",
             f"- CPU: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, threads {m['threads']}; load average "
             f"{m['load_avg_start']} at the start, {result['load_avg_end']} at the end.",
             "- Absolute seconds move with the machine's load (the 1-min load average decays over minutes, so it also "
             "shows a run that ended just before); the ratios come from passes interleaved in rotating order, per round "
             "(median and range over rounds) and from the fastest pass of each kind.",
             f"- Statistics pass = `collect_stats` (model hash, image hash, every activation point histogrammed), batch {BATCH}; "
             "'before' = the same pass with the reference binning every histogram took before the float32 path. "
             "Histograms identical in both: " + ", ".join(str(r["histograms_identical"]) for r in result["models"]) + ".",
             "", f"Goal: statistics pass <= {GOAL}x FP32 inference.", ""]  # fmt: skip
    rows = []
    for r in result["models"]:
        s, b = r["stats"], r["stats_reference"]
        rows.append([r["model"], r["images"], f"{r['fp32_median_s']:.2f}", f"{s['median_s']:.2f}",
                     f"**{s['ratio_median']:.2f}x** ({s['ratio_range'][0]:.2f}-{s['ratio_range'][1]:.2f})",
                     f"{s['ratio_of_minima']:.2f}x", f"{b['ratio_median']:.2f}x ({b['ratio_range'][0]:.2f}-{b['ratio_range'][1]:.2f})",
                     f"{b['ratio_of_minima']:.2f}x"])  # fmt: skip
    lines += md_table(["model", "images", "FP32 s", "stats s", "stats / FP32 (median, range)", "ratio of fastest",
                       "before: stats / FP32", "before: ratio of fastest"], rows, "lrrrrrrr")  # fmt: skip
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, A0 at 96x96 on 32 images")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_cost.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads, ("torch",))
    rounds = 3 if args.quick else args.rounds
    models = []
    for name, plain, data in cases(args.quick):
        log.info("%s: %d images, %d rounds", name, len(data), rounds)
        models.append({"model": name, **measure(plain, data, rounds)})
    command = " ".join(["PYTHONPATH=.:benchmarks python benchmarks/calibration_cost.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": machine, "load_avg_end": list(os.getloadavg()), "rounds": rounds, "goal": GOAL,
              "command": command, "models": models}  # fmt: skip
    save_results(args.out, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
