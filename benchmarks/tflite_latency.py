"""TFLite FP32 vs full-integer INT8 in LiteRT (XNNPACK) on this CPU, and INT8 vs the integer referee.

Two models, each fused, calibrated for the "tflite" constraint set and compiled by the TFLite
target (the flatbuffer written from PlainNet + QuantSpec):

- RepVGG-A0 at 224x224, 1000 classes, random weights with BN statistics set from one batch (so
  activations have a trained net's scale), calibrated on random images: the latency that matters
  for an ImageNet-sized model. Its agreement is checked on a few random images only (the float64
  referee is slow at 224).
- the bundled Fashion-MNIST model(s), calibrated on the bundled calibration images: latency at
  32x32, and agreement of the INT8 .tflite with IntegerNet (and of the FP32 .tflite with the
  PlainNet) over the full Fashion-MNIST test set.

Latency is ``edgerepvgg.evaluate.measure_latency`` at batch 1 (through ``common.interleaved_latency``), in rounds that alternate
FP32 and INT8 (rotating order), so that load drift on a shared machine hits both alike; the
figures are medians over rounds of each round's median, and the INT8/FP32 ratio is the median of
the per-round ratios.

    PYTHONPATH=. python benchmarks/tflite_latency.py            # full run (a few minutes on 2 cores)
    PYTHONPATH=. python benchmarks/tflite_latency.py --quick    # smoke run: 64x64, 500 test images
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import interleaved_latency, machine_info, md_table
from fuse_speed import settle_bn

import edgerepvgg
from edgerepvgg.checkpoints import DEFAULT_MODEL, load_checkpoint
from edgerepvgg.data import InputSpec, TensorDataset, calibration_images, fashion_mnist, fashion_mnist_available
from edgerepvgg.evaluate import agreement, predict, topk_accuracy
from edgerepvgg._fuse import fuse
from edgerepvgg.io import write_text_atomic
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.calibrate import calibrate
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.targets.tflite import TFLiteTarget

log = logging.getLogger("tflite_latency")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` fills in small settings for whatever was not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, help="A0 input side (default 224; 64 with --quick)")
    p.add_argument("--threads", default=None, help="comma-separated LiteRT thread counts (default: 1 and all usable cores)")
    p.add_argument("--rounds", type=int, help="alternating FP32/INT8 rounds (default 7; 2 with --quick)")
    p.add_argument("--runs", type=int, default=15, help="timed calls per configuration and round (default 15)")
    p.add_argument("--calib-images", type=int, default=16, help="random images to calibrate A0 on (default 16)")
    p.add_argument("--check-images", type=int, default=8, help="random images for A0's agreement check (default 8)")
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL], help="bundled models (default: the default one)")
    p.add_argument("--limit", type=int, help="first N Fashion-MNIST test images (default: all 10k; 500 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tflite_latency.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    for name, full, quick in (("size", 224, 64), ("rounds", 7, 2), ("limit", None, 500)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    usable = len(os.sched_getaffinity(0))
    args.threads = sorted({1, usable}) if args.threads is None else [int(t) for t in args.threads.split(",")]
    return args


def compile_both(plain: PlainNet, spec, out: Path) -> dict[str, Any]:
    """FP32 and INT8 artifacts of ``plain`` under ``out``."""
    target = TFLiteTarget()
    return {"fp32": target.compile(plain, None, out / "fp32"), "int8": target.compile(plain, spec, out / "int8", "int8")}


def time_pair(artifacts: dict[str, Any], batch: np.ndarray, threads: int, rounds: int, runs: int) -> dict[str, Any]:
    """Median-of-round-medians latency of each precision and the median per-round INT8/FP32 ratio."""
    target = TFLiteTarget()
    runners = {p: target.load(a, threads=threads) for p, a in artifacts.items()}
    lat = interleaved_latency(runners, batch, rounds, runs, base="fp32")
    ratios = [1 / r for r in np.array(lat["fp32"]["rounds_p50_ms"]) / np.array(lat["int8"]["rounds_p50_ms"])]
    return {
        "threads": threads, "batch": int(batch.shape[0]), "rounds": rounds, "runs": runs,
        **{f"{p}_p50_ms": lat[p]["p50_ms"] for p in runners}, **{f"{p}_p90_ms": lat[p]["p90_ms"] for p in runners},
        "int8_over_fp32": statistics.median(ratios), "ratios": ratios,
        "p50_per_round": {p: lat[p]["rounds_p50_ms"] for p in runners},
    }  # fmt: skip


def random_images(spec: InputSpec, n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, spec.channels, spec.size, spec.size), generator=gen, dtype=torch.uint8)
    return TensorDataset(x, torch.full((n,), -1), spec, f"{n} random images (seed {seed})")


def a0_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """RepVGG-A0 (1000 classes) at ``args.size``: latency and a small agreement check."""
    torch.manual_seed(args.seed)
    model = settle_bn(edgerepvgg.create_model("A0", num_classes=1000, in_chans=3), args.size, args.seed)
    spec_in = InputSpec(size=args.size, resize=args.size)
    plain, _ = fuse(model, spec_in)
    t0 = time.perf_counter()
    spec = calibrate(plain, random_images(spec_in, args.calib_images, args.seed), constraints_for("tflite"),
                     progress=False, cache=False)  # fmt: skip
    calib_s = time.perf_counter() - t0
    arts = compile_both(plain, spec, work / "a0")
    check = random_images(spec_in, args.check_images, args.seed + 1)
    x = torch.cat([b for b, _ in check.batches(args.check_images)])
    target = TFLiteTarget()
    with torch.no_grad():
        fp32_ref = plain(x)
    int8_ref = IntegerNet(plain, spec)(x)
    fp32 = torch.from_numpy(target.load(arts["fp32"])(x.numpy()))
    int8 = torch.from_numpy(target.load(arts["int8"])(x.numpy()))
    one = x[:1].numpy()
    return {
        "model": f"RepVGG-A0 random init, 1000 classes, {args.size}x{args.size}",
        "calibration": {"images": args.calib_images, "method": spec.calibration.get("method"), "seconds": calib_s},
        "size_bytes": {p: a.size_bytes for p, a in arts.items()},
        "latency": [time_pair(arts, one, t, args.rounds, args.runs) for t in args.threads],
        "fp32_vs_plain": agreement(fp32, fp32_ref).to_dict(),
        "int8_vs_integer_net": {**agreement(int8, int8_ref).to_dict(), "images": args.check_images,
                                "logits_equal": exact_share(int8, int8_ref, spec.output.scale[0])},  # fmt: skip
    }


def exact_share(logits: torch.Tensor, ref: torch.Tensor, step: float) -> float:
    """Share of logits on the same integer as the referee's."""
    return float((((logits.double() - ref.double()) / step).round() == 0).double().mean())


def bundled_section(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A bundled model: latency at its input size, agreement over the Fashion-MNIST test set."""
    model, meta = load_checkpoint(name)
    plain, _ = fuse(model, meta.input_spec)
    spec = calibrate(plain, calibration_images(meta.input_spec), constraints_for("tflite"), progress=False, cache=False)
    arts = compile_both(plain, spec, work / name)
    if not fashion_mnist_available():
        raise SystemExit("the Fashion-MNIST test set is not installed (apt-get install dataset-fashion-mnist)")
    test = fashion_mnist("test", meta.input_spec, limit=args.limit)
    target = TFLiteTarget()
    t0 = time.perf_counter()
    torch_threads = torch.get_num_threads()
    runners = {p: target.load(a, threads=max(args.threads)) for p, a in arts.items()}
    logits = {
        "plain": predict(plain, test, 500),
        "integer_net": predict(IntegerNet(plain, spec), test, 500),
        "tflite_fp32": predict(lambda x: runners["fp32"](x.numpy()), test, 500),
        "tflite_int8": predict(lambda x: runners["int8"](x.numpy()), test, 500),
    }
    eval_s = time.perf_counter() - t0
    batch1 = next(iter(test.batches(1)))[0].numpy()
    return {
        "model": name, "input": f"{meta.input_spec.channels}x{meta.input_spec.size}x{meta.input_spec.size}",
        "calibration": {"images": len(calibration_images(meta.input_spec)), "method": spec.calibration.get("method")},
        "size_bytes": {p: a.size_bytes for p, a in arts.items()},
        "test_images": len(test), "eval_seconds": eval_s, "torch_threads": torch_threads,
        "top1": {k: topk_accuracy(v, test.labels) for k, v in logits.items()},
        "int8_vs_integer_net": {**agreement(logits["tflite_int8"], logits["integer_net"]).to_dict(),
                                "logits_equal": exact_share(logits["tflite_int8"], logits["integer_net"], spec.output.scale[0])},
        "fp32_vs_plain": agreement(logits["tflite_fp32"], logits["plain"]).to_dict(),
        "latency": [time_pair(arts, batch1, t, args.rounds, args.runs) for t in args.threads],
    }  # fmt: skip


def render(result: dict[str, Any]) -> str:
    """The Markdown report."""
    m = result["machine"]
    lines = ["# TFLite (LiteRT/XNNPACK): FP32 vs full-integer INT8", "",
             f"Machine: {m['cpu']} ({m['cores_usable']} usable cores, ISA {', '.join(m['isa'])}), "
             f"load average at start {m['load_avg_start'][0]:.2f}; ai-edge-litert {m.get('ai_edge_litert', '?')}, "
             f"tflite {m.get('tflite', '?')}, torch {m.get('torch', '?')}; {m['date']}.", "",
             "Latency: batch 1, medians over alternating rounds (see the script's docstring).", ""]  # fmt: skip
    rows = []
    for sec in [result["a0"], *result["bundled"]]:
        for lat in sec["latency"]:
            rows.append([sec["model"], lat["threads"], f"{lat['fp32_p50_ms']:.2f}", f"{lat['int8_p50_ms']:.2f}",
                         f"{lat['fp32_p90_ms']:.2f}", f"{lat['int8_p90_ms']:.2f}", f"{lat['int8_over_fp32']:.2f}"])  # fmt: skip
    lines += md_table(["model", "threads", "FP32 p50 ms", "INT8 p50 ms", "FP32 p90 ms", "INT8 p90 ms", "INT8/FP32"], rows, "lrrrrrr")
    lines += ["", "Agreement (top-1 agreement, logits on the same integer, cosine):", ""]
    rows = []
    a0 = result["a0"]
    ag = a0["int8_vs_integer_net"]
    rows.append([a0["model"], f"{ag['images']} random", "INT8 .tflite vs IntegerNet", f"{100 * ag['top1']:.2f}",
                 f"{100 * ag['logits_equal']:.2f}", f"{ag['cosine']:.6f}"])  # fmt: skip
    rows.append([a0["model"], f"{ag['images']} random", "FP32 .tflite vs PlainNet", f"{100 * a0['fp32_vs_plain']['top1']:.2f}",
                 "", f"{a0['fp32_vs_plain']['cosine']:.6f} (max abs {a0['fp32_vs_plain']['max_abs']:.2e})"])  # fmt: skip
    for sec in result["bundled"]:
        ag, fp = sec["int8_vs_integer_net"], sec["fp32_vs_plain"]
        n = f"{sec['test_images']} test"
        rows.append([sec["model"], n, "INT8 .tflite vs IntegerNet", f"{100 * ag['top1']:.2f}", f"{100 * ag['logits_equal']:.2f}", f"{ag['cosine']:.6f}"])
        rows.append([sec["model"], n, "FP32 .tflite vs PlainNet", f"{100 * fp['top1']:.2f}", "", f"{fp['cosine']:.6f} (max abs {fp['max_abs']:.2e})"])
    lines += md_table(["model", "images", "comparison", "top-1 agreement %", "logits equal %", "cosine"], rows, "llllrr")
    lines += ["", "Top-1 on the Fashion-MNIST test set:", ""]
    rows = [[s["model"], *(f"{100 * s['top1'][k]:.2f}" for k in ("plain", "tflite_fp32", "integer_net", "tflite_int8"))]
            for s in result["bundled"]]  # fmt: skip
    lines += md_table(["model", "PlainNet FP32", "TFLite FP32", "IntegerNet", "TFLite INT8"], rows, "lrrrr")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the Markdown report, write JSON and Markdown results."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    reason = TFLiteTarget().available()
    if reason:
        print(f"tflite_latency: {reason}", file=sys.stderr)
        return 1
    machine = machine_info(max(args.threads), ("torch", "ai_edge_litert", "tflite", "flatbuffers", "numpy"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log.info("RepVGG-A0 at %d", args.size)
        a0 = a0_section(args, work)
        bundled = []
        for name in args.models:
            log.info("bundled model %s", name)
            bundled.append(bundled_section(name, args, work))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": machine,
              "a0": a0, "bundled": bundled, "load_avg_end": list(os.getloadavg())}  # fmt: skip
    text = render(result)
    print(text)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
