"""Train-time (multi-branch) vs fused (one 3x3 conv per block) RepVGG latency on this CPU.

The RepVGG paper claims the plain, fused network is faster than its training-time form. This
script measures it in PyTorch eager and in ONNX Runtime (FP32), at batch 1 and 16, and reports
what it finds together with the machine it ran on.

Every repetition round times each (runtime, form, batch) configuration once, in an order that
rotates from round to round, so that slow drifts of the machine (thermal, other processes) hit
every configuration alike; the train/fused ratios are therefore more trustworthy than the
absolute latencies when the machine is shared.

The exported train-time graph is simplified with onnxsim, which folds each branch's BatchNorm
into its conv; ONNX Runtime then fuses more (see the node counts in the output). What stays is
the structural difference under test: per block, three branches (3x3 conv, 1x1 conv, identity
BN) and their adds, against one 3x3 conv.

    PYTHONPATH=. python benchmarks/fuse_speed.py            # full run: 224x224, batches 1 and 16
    PYTHONPATH=. python benchmarks/fuse_speed.py --quick    # smoke run: 64x64, a few rounds
"""

from __future__ import annotations

import argparse
import collections
import gc
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import torch
from torch import nn
from tqdm import tqdm

import edgerepvgg
from common import CPU_FLAGS, machine_info, md_table
from edgerepvgg._fuse import compare_outputs
from edgerepvgg.io import atomic_path, write_text_atomic

log = logging.getLogger("fuse_speed")

FORMS = ("train", "fused")
RUNTIMES = ("torch", "ort")


class Config(NamedTuple):
    """One measured configuration."""

    runtime: str
    form: str
    batch: int

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.form}/b{self.batch}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` fills in tiny settings for whatever was not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="A0", help="RepVGG variant (default: A0)")
    p.add_argument("--size", type=int, help="input side in pixels (default: 224; 64 with --quick)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    p.add_argument("--rounds", type=int, help="measured rounds (default: 50; 5 with --quick)")
    p.add_argument("--warmup", type=int, help="unmeasured rounds first (default: 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch and ORT intra-op threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuse_speed.json",
                   help="JSON path; the PNG plot goes beside it (default: benchmarks/results/fuse_speed.json)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    quick = {"size": 64, "rounds": 5, "warmup": 1}
    full = {"size": 224, "rounds": 50, "warmup": 5}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or min(args.batches) < 1:
        p.error("--rounds, --threads and every batch must be >= 1, --warmup >= 0")
    return args


@torch.no_grad()
def settle_bn(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Set every BN's running statistics from one train-mode batch, so that activations have the
    scale of a trained net (fresh BNs are near-identity) before timing; returns ``model`` in eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    gen = torch.Generator().manual_seed(seed)
    model.train()(torch.randn(4, 3, size, size, generator=gen))
    return model.eval()


def build_models(variant: str, size: int, seed: int) -> tuple[dict[str, nn.Module], float]:
    """The train-time model (1000 classes, 3 channels) and its fused copy, checked equivalent;
    also returns the fused copy's max error relative to the largest train-time logit."""
    torch.manual_seed(seed)
    train = settle_bn(edgerepvgg.create_model(variant, num_classes=1000, in_chans=3), size, seed)
    fused = edgerepvgg.reparameterize(train).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    check = compare_outputs(train, fused, x)
    log.info("fusion check: %s", check)
    if not check.ok:
        raise AssertionError(f"fused model disagrees with the train-time one: {check}")
    return {"train": train, "fused": fused}, check.max_rel


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (domain-qualified when not the default ONNX domain)."""
    ops = (f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)
    return dict(collections.Counter(ops).most_common())


def export_onnx(model: nn.Module, size: int) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Export with a dynamic batch axis (legacy exporter, opset 17), simplify with onnxsim, and
    return the simplified graph with the node counts before and after."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is what we want
        torch.onnx.export(model, torch.randn(1, 3, size, size), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    exported = onnx.load_from_string(buf.getvalue())
    simplified, ok = onnxsim.simplify(exported)
    if not ok:
        raise RuntimeError("onnxsim could not verify the simplified graph against the exported one")
    return simplified, {"exported": op_counts(exported), "onnxsim": op_counts(simplified), "onnxsim_check": ok}


def ort_session(model: onnx.ModelProto, threads: int, optimized_path: Path) -> tuple[ort.InferenceSession, dict[str, int]]:
    """An FP32 CPU session with default (all) graph optimizations; also returns the node counts of
    the graph ONNX Runtime actually runs (it fuses further, e.g. Conv+Add+Relu into NCHWc convs)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.optimized_model_filepath = str(optimized_path)
    so.log_severity_level = 3  # the "hardware-specific optimized model" warning is expected here
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session, op_counts(onnx.load(str(optimized_path)))


def check_ort(sessions: dict[str, ort.InferenceSession], reference: nn.Module, size: int, seed: int) -> dict[str, float]:
    """Max error of each ORT session relative to the largest torch train-time logit."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
    with torch.inference_mode():
        expected = reference(x).numpy()
    scale = float(np.abs(expected).max())
    return {form: float(np.abs(s.run(None, {"x": x.numpy()})[0] - expected).max()) / scale for form, s in sessions.items()}


def make_runners(models: dict[str, nn.Module], sessions: dict[str, ort.InferenceSession], batches: list[int],
                 size: int, seed: int) -> dict[Config, Callable[[], Any]]:  # fmt: skip
    """One zero-argument callable per configuration; all forms of a batch size see the same input."""
    gen = torch.Generator().manual_seed(seed + 3)
    inputs = {b: torch.randn(b, 3, size, size, generator=gen) for b in batches}
    runners: dict[Config, Callable[[], Any]] = {}
    for runtime in RUNTIMES:
        for form in FORMS:
            for b in batches:
                if runtime == "torch":
                    runners[Config(runtime, form, b)] = lambda m=models[form], x=inputs[b]: m(x)
                else:
                    feed = {"x": inputs[b].numpy()}
                    runners[Config(runtime, form, b)] = lambda s=sessions[form], f=feed: s.run(None, f)
    return runners


def measure(runners: dict[Config, Callable[[], Any]], rounds: int, warmup: int) -> dict[Config, list[float]]:
    """Interleaved timing: each round runs every configuration once, in an order rotated by one
    per round; returns milliseconds per call for the measured (post-warm-up) rounds."""
    configs = list(runners)
    samples: dict[Config, list[float]] = {c: [] for c in configs}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for r in tqdm(range(warmup + rounds), desc="rounds", unit="round", file=sys.stderr):
                k = r % len(configs)
                for config in configs[k:] + configs[:k]:
                    t0 = time.perf_counter_ns()
                    runners[config]()
                    elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
                    if r >= warmup:
                        samples[config].append(elapsed_ms)
    finally:
        gc.enable()
    return samples


def summarize(samples: dict[Config, list[float]], batches: list[int]) -> tuple[list[dict], list[dict]]:
    """Per-configuration statistics, and the train/fused ratio per runtime and batch: both the ratio
    of medians and the median of per-round ratios (robust to load that drifts between rounds)."""
    rows = []
    for c, ms in samples.items():
        a = np.asarray(ms)
        med = float(np.median(a))
        rows.append({"runtime": c.runtime, "form": c.form, "batch": c.batch, "median_ms": med,
                     "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()),
                     "images_per_s": c.batch * 1000.0 / med, "samples_ms": [round(x, 4) for x in ms]})  # fmt: skip
    ratios = []
    for runtime in RUNTIMES:
        for b in batches:
            train, fused = np.asarray(samples[Config(runtime, "train", b)]), np.asarray(samples[Config(runtime, "fused", b)])
            per_round = train / fused
            ratios.append({"runtime": runtime, "batch": b,
                           "ratio_of_medians": float(np.median(train) / np.median(fused)),
                           "per_round_median": float(np.median(per_round)),
                           "per_round_p10": float(np.percentile(per_round, 10)),
                           "per_round_p90": float(np.percentile(per_round, 90))})  # fmt: skip
    return rows, ratios


def machine_lines(m: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """Bullet lines describing the machine and the run."""
    loads = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = [
        f"- CPU: {m['cpu']} (family/model {m['cpu_family_model']}), {m['cores']} cores ({m['cores_usable']} usable)"
        f"{', virtual machine' if m['hypervisor'] else ''}; ISA: {', '.join(m['isa']) or 'none of ' + '/'.join(CPU_FLAGS)}",
        f"- torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, onnxsim {m['onnxsim']}, "
        f"Python {m['python']}, {m['os']}",
        f"- threads: {m['threads']} (torch.set_num_threads, ORT intra_op_num_threads); date {m['date']}",
        f"- load average (1/5/15 min): {loads(m['load_avg_start'])} at start, {loads(m['load_avg_end'])} at end",
        f"- {s['rounds']} interleaved rounds after {s['warmup']} warm-up rounds; "
        "each round times every configuration once, in an order rotating by one per round",
    ]
    if max(m["load_avg_start"][0], m["load_avg_end"][0]) > 0.25 * m["cores_usable"]:
        lines.append("- **the machine was busy while measuring**: latencies are pessimistic, and more so for the graph "
                     "with more ops when threads compete for cores (torch's OpenMP waits at a barrier per op), which "
                     "skews the ratios; rerun on an idle machine, or with --threads 1")  # fmt: skip
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown: machine, graphs, latencies, ratios."""
    s = result["settings"]
    counts = lambda c: ", ".join(f"{k} {v}" for k, v in c.items())  # noqa: E731
    graphs = [[form, counts(g["exported"]), counts(g["onnxsim"]), counts(g["ort_optimized"])] for form, g in result["graphs"].items()]
    order = lambda r: (RUNTIMES.index(r["runtime"]), r["batch"], FORMS.index(r["form"]))  # noqa: E731
    latency = [[r["runtime"], r["batch"], r["form"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['min_ms']:.2f}",
                f"{r['images_per_s']:.1f}"] for r in sorted(result["latency"], key=order)]  # fmt: skip
    ratios = [[q["runtime"], q["batch"], f"{q['ratio_of_medians']:.2f}",
               f"{q['per_round_median']:.2f} [{q['per_round_p10']:.2f}, {q['per_round_p90']:.2f}]"] for q in result["ratios"]]  # fmt: skip
    eq = result["equivalence"]
    lines = [
        f"## RepVGG-{s['variant']} train-time vs fused latency, {s['size']}x{s['size']}, FP32", "",
        *machine_lines(result["machine"], s), "",
        "### Graphs (node counts)", "",
        *md_table(["form", "exported ONNX", "after onnxsim", "run by ONNX Runtime"], graphs, "llll"), "",
        f"Max error relative to the largest train-time torch logit: torch fused {eq['torch_fused']:.1e}, "
        f"ORT train {eq['ort_train']:.1e}, ORT fused {eq['ort_fused']:.1e}.", "",
        "### Latency per call (ms)", "",
        *md_table(["runtime", "batch", "form", "median", "p90", "min", "images/s"], latency, "lrlrrrr"), "",
        "### Train-time / fused latency (> 1: the fused net is faster)", "",
        *md_table(["runtime", "batch", "ratio of medians", "per-round ratio, median [p10, p90]"], ratios, "lrrr"),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar plot: median latency per configuration (whisker up to p90), one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result["settings"]["batches"]
    rows = {(r["runtime"], r["form"], r["batch"]): r for r in result["latency"]}
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    x = np.arange(len(RUNTIMES))
    for ax, b in zip(axes[0], batches):
        for i, form in enumerate(FORMS):
            med = np.array([rows[(rt, form, b)]["median_ms"] for rt in RUNTIMES])
            p90 = np.array([rows[(rt, form, b)]["p90_ms"] for rt in RUNTIMES])
            bars = ax.bar(x + (i - 0.5) * 0.38, med, 0.38, label=form, yerr=[np.zeros_like(med), p90 - med], capsize=3)
            ax.bar_label(bars, fmt="%.1f", fontsize=8, label_type="center", color="white")
        ax.set_xticks(x, ["PyTorch eager", "ONNX Runtime"])
        ax.set_title(f"batch {b}")
        ax.set_ylabel("ms per call (median, whisker p90)")
        ax.legend()
    m, s = result["machine"], result["settings"]
    fig.suptitle(f"RepVGG-{s['variant']} {s['size']}px FP32, {m['cpu']}, threads={m['threads']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    log.info("building %s at %dx%d", args.variant, args.size, args.size)
    models, torch_err = build_models(args.variant, args.size, args.seed)
    graphs, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for form, model in models.items():
            simplified, graphs[form] = export_onnx(model, args.size)
            sessions[form], graphs[form]["ort_optimized"] = ort_session(simplified, args.threads, Path(tmp) / f"{form}.onnx")
            log.info("%s graph: onnxsim %s; ORT runs %s", form, graphs[form]["onnxsim"], graphs[form]["ort_optimized"])
    errors = check_ort(sessions, models["train"], args.size, args.seed)
    runners = make_runners(models, sessions, args.batches, args.size, args.seed)
    log.info("timing %d configurations: %d warm-up + %d rounds", len(runners), args.warmup, args.rounds)
    samples = measure(runners, args.rounds, args.warmup)
    machine["load_avg_end"] = list(os.getloadavg())
    latency, ratios = summarize(samples, args.batches)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = {
        "benchmark": "fuse_speed", "machine": machine, "settings": settings, "graphs": graphs,
        "equivalence": {"torch_fused": torch_err, "ort_train": errors["train"], "ort_fused": errors["fused"]},
        "latency": latency, "ratios": ratios,
    }  # fmt: skip
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(render_markdown(result), end="")
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
