"""Every target side by side, in one run on this machine (issue 5/6/8 numbers).

1. FP32 vs INT8 latency at batch 1 per backend (ONNX Runtime, OpenVINO, LiteRT) for RepVGG-A0 at
   224x224 (random weights, BN settled on noise, 1000 classes; calibrated on random uint8 images
   for each backend's own constraint set), timed in interleaved rounds (benchmarks/common.py);
2. ``compare`` of the bundled model on the full Fashion-MNIST test set with every shipped profile:
   each target's top-1, its agreement with FP32 and with the INT8 emulation (goal: >= 99.8% top-1
   agreement for every target), INT8 coverage and latency; TensorRT rows are the Q/DQ graph in ONNX
   Runtime (emulated), since TensorRT cannot be installed here.

    PYTHONPATH=.:benchmarks python benchmarks/targets.py --threads 1
    PYTHONPATH=.:benchmarks python benchmarks/targets.py --quick   # smoke: 64x64, few rounds, 1k images
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import interleaved_latency, machine_info, md_table

import edgerepvgg
from edgerepvgg.checkpoints import load_checkpoint
from edgerepvgg._compare import compare
from edgerepvgg.report import table_rows
from edgerepvgg.data import InputSpec, TensorDataset, calibration_images, evaluation_set
from edgerepvgg._fuse import fuse
from edgerepvgg.io import write_text_atomic
from edgerepvgg.profiles import load_profile, shipped_profiles
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.calibrate import calibrate
from edgerepvgg.report import markdown_table, write_comparison
from edgerepvgg.targets import get_target

log = logging.getLogger("benchmarks.targets")
RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("onnxruntime", "openvino", "tflite")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--eval-limit", type=int, help="class-balanced subset (default: the full test set)")
    p.add_argument("--quick", action="store_true", help="64x64, 2 rounds of 5 runs, 1,000 images")
    p.add_argument("--out", type=Path, default=RESULTS / "targets")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.runs, args.eval_limit = 64, 2, 5, args.eval_limit or 1000
    return args


def latency_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """FP32 vs INT8 per backend for A0 at ``args.size``."""
    from fuse_speed import settle_bn

    torch.manual_seed(0)
    size = args.size
    model = settle_bn(edgerepvgg.create_model("A0", num_classes=1000, in_chans=3), size, seed=0)
    spec_in = InputSpec(size=size, resize=size)
    plain, _ = fuse(model, spec_in)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=gen)
    calib = TensorDataset(images, torch.full((32,), -1), spec_in, "32 random uint8 images")
    x = torch.randn(1, 3, size, size, generator=gen).numpy()
    out: dict[str, Any] = {"model": f"RepVGG-A0 (random weights) {size}x{size}, 1000 classes", "backends": {}}
    for name in BACKENDS:
        target = get_target(name)
        if target.available() is not None:
            out["backends"][name] = {"skipped": target.available()}
            continue
        spec = calibrate(plain, calib, constraints_for(target.constraint_set), "minmax", progress=False, cache=False)
        runners, facts = {}, {}
        for precision in ("fp32", "int8"):
            art = target.compile(plain, spec if precision == "int8" else None, work / f"{name}-{precision}", precision)
            runners[precision] = target.load(art, threads=args.threads)
            facts[precision] = {k: v for k, v in art.info.items() if k in ("convs", "int8_convs")} | {"size_mb": art.size_bytes / 1e6}
        log.info("A0@%d %s: %d rounds", size, name, args.rounds)
        lat = interleaved_latency(runners, x, args.rounds, args.runs, base="fp32")
        out["backends"][name] = {"constraints": spec.constraints.name, "latency": lat, "facts": facts}
    return out


def compare_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``compare`` of the bundled model with every shipped profile, threads pinned."""
    from dataclasses import replace

    model, meta = load_checkpoint()
    plain, _ = fuse(model, meta.input_spec)
    profiles = [replace(load_profile(p), threads=args.threads) for p in shipped_profiles()]
    eval_set = evaluation_set(meta.input_spec, limit=args.eval_limit)
    t0 = time.perf_counter()
    result = compare(plain, profiles, work / "compare", calibration_images(meta.input_spec), eval_set, train_model=model,
                     threads=args.threads, progress=True)  # fmt: skip
    paths = write_comparison(result, args.out)
    header, body = table_rows(result)
    return {"seconds": time.perf_counter() - t0, "eval": f"{len(eval_set)} images of {eval_set.source}",
            "rows": [r.to_dict() for r in result.rows], "table": markdown_table(header, body),
            "files": {k: str(v.relative_to(RESULTS.parent)) if v.is_relative_to(RESULTS.parent) else str(v) for k, v in paths.items()}}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# Every target side by side", "",
             f"{m['cpu']} ({m['cpu_family_model']}), {m['cores_usable']} cores, ISA {', '.join(m['isa'])}; "
             f"{m['threads']} thread(s); load average at start {m['load_avg_start'][0]:.2f}; {m['date']}.", "",
             f"## FP32 vs INT8, batch 1: {result['latency']['model']}", ""]  # fmt: skip
    rows = []
    for name, b in result["latency"]["backends"].items():
        if "skipped" in b:
            rows.append([name, "-", "-", "-", "-", f"skipped: {b['skipped']}"])
            continue
        lat = b["latency"]
        conv = b["facts"]["int8"]
        cov = f"{conv['int8_convs']}/{conv['convs']}" if "convs" in conv else "graph"
        rows.append([name, b["constraints"], f"{lat['fp32']['p50_ms']:.2f}", f"{lat['int8']['p50_ms']:.2f}",
                     f"**{lat['int8']['speedup_vs_fp32']:.2f}x** ({lat['int8']['speedup_vs_fp32_range'][0]:.2f}-{lat['int8']['speedup_vs_fp32_range'][1]:.2f})", cov])  # fmt: skip
    lines += md_table(["backend", "scheme", "FP32 p50 ms", "INT8 p50 ms", "INT8 speed-up (range over rounds)", "INT8 convs"], rows, "llrrrl")
    c = result["compare"]
    lines += ["", f"## compare, bundled model, {c['eval']} ({c['seconds']:.0f} s)", "", c["table"], "",
              "TensorRT rows are emulated (ONNX Runtime runs the Q/DQ graph under TensorRT's constraint set); "
              "profiles for another architecture report accuracy only.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads, ("torch", "onnxruntime", "openvino", "ai-edge-litert"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
                  "latency": latency_section(args, work), "compare": compare_section(args, work)}  # fmt: skip
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    text = render(result)
    write_text_atomic(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
