"""OpenVINO on this CPU: FP32 vs our INT8 vs NNCF's INT8, and our INT8 against the integer referee.

In one run, on this machine:

1. latency at batch 1 (PERFORMANCE_HINT LATENCY, f32 inference precision) of the FP32 IR, of our
   INT8 IR (PlainNet + QuantSpec -> Q/DQ ONNX -> IR) and of NNCF's PTQ (``nncf.quantize`` of the
   same FP32 IR with the same calibration images), for RepVGG-A0 at 224x224 (random weights with
   BN statistics settled on noise, 1000 classes; calibrated on random uint8 images) and for the
   bundled Fashion-MNIST model (32x32);
2. top-1 on the full Fashion-MNIST test set of the bundled model: FP32, ours, NNCF's;
3. agreement of our OpenVINO INT8 logits with IntegerNet (the integer emulation every target is
   checked against) on that same test set, the bundled model calibrated with the bundled images
   and the default calibration method.

Latency is measured in interleaved rounds: each round times every configuration of a model with
``evaluate.measure_latency`` in an order rotated by one per round, so that load drifting over time
hits all of them alike; the figures are the medians over rounds of each round's p50 and p90, and
the ratios are medians of per-round ratios.

    PYTHONPATH=. python benchmarks/openvino_int8.py --threads 2
    PYTHONPATH=. python benchmarks/openvino_int8.py --quick    # smoke run: 64x64, few rounds, 1k images
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import CPU_FLAGS, machine_info, md_table
from common import interleaved_latency as common_interleaved_latency

import edgerepvgg
from edgerepvgg.checkpoints import load_checkpoint
from edgerepvgg.data import InputSpec, TensorDataset, calibration_images, fashion_mnist
from edgerepvgg.evaluate import agreement, predict, topk_accuracy
from edgerepvgg._fuse import fuse
from edgerepvgg.io import write_text_atomic
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.calibrate import calibrate
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.targets.openvino import DEVICE, OpenVINORunner, OpenVINOTarget, compile_config, core, runtime_coverage

log = logging.getLogger("openvino_int8")

CONFIGS = ("fp32", "ours_int8", "nncf_int8", "ov_default")


class DefaultPrecisionRunner:
    """The FP32 IR compiled with OpenVINO's default inference precision (no f32 hint): on CPUs with
    bf16 (AVX512_BF16, AMX) that is bf16, i.e. the speed a user gets without asking for f32."""

    def __init__(self, xml: Path, threads: int):
        config = {k: v for k, v in compile_config(threads, "latency").items() if k != "INFERENCE_PRECISION_HINT"}
        self.compiled = core().compile_model(str(xml), DEVICE, config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch) -> np.ndarray:
        x = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch, np.float32)
        return self.request.infer({0: x})[self.compiled.output(0)].copy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="OpenVINO INFERENCE_NUM_THREADS and torch threads (default 2)")
    p.add_argument("--size", type=int, default=224, help="input side of the random RepVGG-A0 (default 224)")
    p.add_argument("--calib", type=int, default=64, help="random calibration images for the 224 model (default 64)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (default 7)")
    p.add_argument("--runs", type=int, default=30, help="timed calls per configuration and round (default 30)")
    p.add_argument("--limit", type=int, help="Fashion-MNIST test images (default: all 10,000)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64x64, 16 calibration images, 3 rounds, 1,000 images")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "openvino_int8.json")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.calib, args.rounds, args.runs, args.limit = 64, 16, 3, 10, args.limit or 1000
    return args


def nncf_quantize(fp32_xml: Path, calib: TensorDataset, out_xml: Path) -> tuple[Path, float]:
    """NNCF's default PTQ of our FP32 IR on the same calibration images (one image per sample,
    as its examples do); returns the saved IR and the seconds ``nncf.quantize`` took."""
    import nncf
    import openvino as ov

    model = core().read_model(str(fp32_xml))
    data = nncf.Dataset([x.numpy() for x, _ in calib.batches(1)])
    t0 = time.perf_counter()
    quantized = nncf.quantize(model, data, subset_size=len(calib))
    seconds = time.perf_counter() - t0
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml, seconds


def coverage_of(xml: Path, threads: int) -> dict[str, Any]:
    """Convolutions in INT8 / in total, read from the compiled runtime model (same check as compile)."""
    cov = runtime_coverage(core().compile_model(core().read_model(str(xml)), DEVICE, compile_config(threads, "latency")))
    return {"convs": len(cov.convs), "int8_convs": len(cov.int8_convs), "head_int8": "head" in cov.precisions and cov.is_int8("head")}


def interleaved_latency(runners: dict[str, Callable], x: np.ndarray, rounds: int, runs: int) -> dict[str, Any]:
    """common.interleaved_latency against FP32, plus ours vs NNCF as a median of per-round ratios."""
    out = common_interleaved_latency(runners, x, rounds, runs, base="fp32")
    if "nncf_int8" in out:
        ratios = np.array(out["nncf_int8"]["rounds_p50_ms"]) / np.array(out["ours_int8"]["rounds_p50_ms"])
        out["ours_vs_nncf"] = {"speedup": float(np.median(ratios)), "range": [float(ratios.min()), float(ratios.max())]}
    return out


def build_all(plain: PlainNet, calib: TensorDataset, spec, work: Path, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile FP32 and our INT8 with the target, NNCF's INT8 from the FP32 IR; load all three."""
    target = OpenVINOTarget()
    fp32 = target.compile(plain, None, work / "fp32")
    ours = target.compile(plain, spec, work / "int8", "int8")
    nncf_xml, nncf_s = nncf_quantize(fp32.path, calib, work / "nncf.xml")
    runners = {"fp32": target.load(fp32, threads), "ours_int8": target.load(ours, threads),
               "nncf_int8": OpenVINORunner(nncf_xml, threads), "ov_default": DefaultPrecisionRunner(fp32.path, threads)}  # fmt: skip
    facts = {
        "fp32": {"convs": fp32.info["convs"], "int8_convs": fp32.info["int8_convs"], "head_int8": fp32.info["head_int8"]},
        "ours_int8": {"convs": ours.info["convs"], "int8_convs": ours.info["int8_convs"], "head_int8": ours.info["head_int8"],
                      "ir_mb": ours.size_bytes / 1e6},
        "nncf_int8": {**coverage_of(nncf_xml, threads), "quantize_s": nncf_s},
        "ov_default": {"convs": fp32.info["convs"], "int8_convs": 0, "head_int8": False,
                       "inference_precision": runners["ov_default"].precision},
    }  # fmt: skip
    return runners, facts


def random_model(size: int, n_calib: int, threads: int, work: Path, rounds: int, runs: int) -> dict[str, Any]:
    """Section 1/2 for RepVGG-A0 at ``size``: random weights, BN settled on noise, noise calibration."""
    from fuse_speed import settle_bn

    torch.manual_seed(0)
    model = settle_bn(edgerepvgg.create_model("A0", num_classes=1000, in_chans=3), size, seed=0)
    spec_in = InputSpec(size=size, resize=size)
    plain, _ = fuse(model, spec_in)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_calib, 3, size, size), dtype=torch.uint8, generator=gen)
    calib = TensorDataset(images, torch.full((n_calib,), -1), spec_in, f"{n_calib} random uint8 images")
    t0 = time.perf_counter()
    spec = calibrate(plain, calib, constraints_for("openvino"), progress=False, cache=False)
    calib_s = time.perf_counter() - t0
    runners, facts = build_all(plain, calib, spec, work, threads)
    x = torch.randn(1, 3, size, size, generator=gen).numpy()
    log.info("A0@%d: timing %d rounds", size, rounds)
    latency = interleaved_latency(runners, x, rounds, runs)
    return {"model": f"RepVGG-A0 (random weights) {size}x{size}, 1000 classes", "calibration": calib.source,
            "calibration_s": calib_s, "weight_bits": spec.constraints.weight.bits, "facts": facts, "latency": latency}  # fmt: skip


def bundled_model(threads: int, work: Path, rounds: int, runs: int, limit: int | None) -> dict[str, Any]:
    """Sections 1-3 for the bundled Fashion-MNIST model."""
    model, meta = load_checkpoint()
    plain, _ = fuse(model, meta.input_spec)
    calib = calibration_images(plain.input_spec)
    t0 = time.perf_counter()
    spec = calibrate(plain, calib, constraints_for("openvino"), progress=False, cache=False)
    calib_s = time.perf_counter() - t0
    runners, facts = build_all(plain, calib, spec, work, threads)
    x = next(calib.batches(1))[0].numpy()
    log.info("bundled: timing %d rounds", rounds)
    latency = interleaved_latency(runners, x, rounds, runs)
    test = fashion_mnist("test", plain.input_spec, limit=limit)
    log.info("bundled: %d test images through FP32, ours, NNCF, IntegerNet", len(test))
    logits = {n: predict(runners[n], test, batch_size=500) for n in ("fp32", "ours_int8", "nncf_int8")}
    t0 = time.perf_counter()
    ref = predict(IntegerNet(plain, spec), test, batch_size=500)
    ref_s = time.perf_counter() - t0
    with torch.no_grad():
        torch_fp32 = predict(plain, test, batch_size=500)
    acc = {n: topk_accuracy(v, test.labels) for n, v in logits.items()}
    acc["integer_net"] = topk_accuracy(ref, test.labels)
    acc["torch_fp32"] = topk_accuracy(torch_fp32, test.labels)
    agree = agreement(logits["ours_int8"], ref)
    flips = int((logits["ours_int8"].argmax(1) != ref.argmax(1)).sum())
    return {"model": f"bundled {meta.variant} Fashion-MNIST {plain.input_spec.size}x{plain.input_spec.size}",
            "calibration": f"{calib.source}, method {spec.calibration.get('method')}",
            "calibration_s": calib_s, "weight_bits": spec.constraints.weight.bits, "facts": facts, "latency": latency,
            "eval_set": f"{test.source}, {len(test)} images", "top1": acc,
            "ours_vs_integer_net": {**agree.to_dict(), "disagreeing_rows": flips, "integer_net_s": ref_s},
            "nncf_vs_fp32": agreement(logits["nncf_int8"], torch_fp32).to_dict(),
            "ours_vs_fp32": agreement(logits["ours_int8"], torch_fp32).to_dict()}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    """The report as Markdown."""
    m = result["machine"]
    lines = [f"# OpenVINO INT8 on this CPU ({m['date']})", "",
             f"- CPU: {m['cpu']}, {m['cores_usable']} usable cores{', virtual machine' if m['hypervisor'] else ''}; "
             f"ISA: {', '.join(m['isa']) or 'none of ' + '/'.join(CPU_FLAGS)}",
             f"- openvino {m['openvino']}, nncf {m['nncf']}, torch {m['torch']}, Python {m['python']}; "
             f"threads {m['threads']}, PERFORMANCE_HINT LATENCY, INFERENCE_PRECISION_HINT f32, batch 1",
             f"- load average at start {'/'.join(f'{v:.2f}' for v in m['load_avg_start'])}, "
             f"at end {'/'.join(f'{v:.2f}' for v in m['load_avg_end'])}; wall time {result['seconds']:.0f} s",
             f"- latency: {result['settings']['rounds']} interleaved rounds x {result['settings']['runs']} timed calls per "
             "configuration; p50/p90 = median over rounds of each round's p50/p90; speedups = median of per-round ratios "
             "[min, max]",
             "- fp32 = FP32 IR with INFERENCE_PRECISION_HINT f32 (what the target's runner uses); the last row of each "
             "model is the same IR with OpenVINO's default precision, for reference", ""]  # fmt: skip
    if max(m["load_avg_start"][0], m["load_avg_end"][0]) > 0.5 * m["cores_usable"]:
        lines.insert(-1, "- **the machine was shared while measuring** (load average above half the cores): absolute "
                         "latencies are pessimistic and noisy; the interleaved ratios are the figures to trust")  # fmt: skip
    rows = []
    for sec in result["models"]:
        lat, facts = sec["latency"], sec["facts"]
        for n in CONFIGS:
            f, lt = facts[n], lat[n]
            cov = f"{f['int8_convs']}/{f['convs']}" + (" + head" if f["head_int8"] else "")
            label = f"FP32 IR, OpenVINO default precision ({f['inference_precision']})" if n == "ov_default" else n
            rows.append([sec["model"], label, f"{lt['p50_ms']:.3f}", f"{lt['p90_ms']:.3f}",
                         f"{lt['speedup_vs_fp32']:.2f}x [{lt['speedup_vs_fp32_range'][0]:.2f}, {lt['speedup_vs_fp32_range'][1]:.2f}]",
                         cov])  # fmt: skip
    lines += ["## Latency, batch 1", ""]
    lines += md_table(["model", "build", "p50 ms", "p90 ms", "speedup vs FP32", "INT8 convs (runtime)"], rows, "llrrrl")
    lines += [""]
    for sec in result["models"]:
        o = sec["latency"]["ours_vs_nncf"]
        lines.append(f"- {sec['model']}: ours vs NNCF latency {o['speedup']:.2f}x [{o['range'][0]:.2f}, {o['range'][1]:.2f}] "
                     f"(>1: ours faster); weights {sec['weight_bits']}-bit; calibration {sec['calibration']} in "
                     f"{sec['calibration_s']:.1f} s; nncf.quantize {sec['facts']['nncf_int8']['quantize_s']:.1f} s")  # fmt: skip
    b = result["models"][-1]
    t = b["top1"]
    lines += ["", f"## Accuracy, {b['model']}", "", f"Evaluated on {b['eval_set']}.", ""]
    acc_rows = [["FP32 (PyTorch PlainNet)", f"{100 * t['torch_fp32']:.2f}", "+0.00"],
                ["FP32 (OpenVINO IR)", f"{100 * t['fp32']:.2f}", f"{100 * (t['fp32'] - t['torch_fp32']):+.2f}"],
                ["ours INT8 (OpenVINO IR)", f"{100 * t['ours_int8']:.2f}", f"{100 * (t['ours_int8'] - t['torch_fp32']):+.2f}"],
                ["IntegerNet (our spec, emulated)", f"{100 * t['integer_net']:.2f}", f"{100 * (t['integer_net'] - t['torch_fp32']):+.2f}"],
                ["NNCF PTQ INT8 (OpenVINO IR)", f"{100 * t['nncf_int8']:.2f}", f"{100 * (t['nncf_int8'] - t['torch_fp32']):+.2f}"]]  # fmt: skip
    lines += md_table(["build", "top-1 %", "Δ vs FP32 (pt)"], acc_rows, "lrr")
    a = b["ours_vs_integer_net"]
    lines += ["", "## Our OpenVINO INT8 vs IntegerNet (same QuantSpec)", "",
              *md_table(["top-1 agreement %", "rows that disagree", "logit cosine", "SQNR dB", "max |Δ logit|"],
                        [[f"{100 * a['top1']:.2f}", f"{a['disagreeing_rows']} of {b['eval_set'].rsplit(', ', 1)[1]}",
                          f"{a['cosine']:.7f}", f"{a['sqnr_db']:.1f}", f"{a['max_abs']:.4f}"]], "rrrrr"),
              "", f"Agreement with PyTorch FP32: ours {100 * b['ours_vs_fp32']['top1']:.2f}%, NNCF {100 * b['nncf_vs_fp32']['top1']:.2f}%.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    reason = OpenVINOTarget().available()
    if reason:
        print(f"openvino target unavailable: {reason}", file=sys.stderr)
        return 1
    machine = machine_info(args.threads, ("torch", "openvino", "nncf", "onnx"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = [random_model(args.size, args.calib, args.threads, work / "a0", args.rounds, args.runs),
                  bundled_model(args.threads, work / "bundled", args.rounds, args.runs, args.limit)]  # fmt: skip
    machine["load_avg_end"] = list(os.getloadavg())
    result = {"machine": machine, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "seconds": time.perf_counter() - t0, "models": models}  # fmt: skip
    text = render(result)
    print(text)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), text)
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
