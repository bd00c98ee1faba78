"""FP32 vs naive PTQ vs best PTQ vs QAT (and NNCF's PTQ through OpenVINO) on Fashion-MNIST.

For each bundled model, on the full 10k test set, in one run:
- FP32 PlainNet top-1;
- naive PTQ: per-tensor min/max weights and activations (the setting that collapses on ImageNet);
- PTQ with per-channel weights and every activation calibrator (minmax, percentile, entropy, mse),
  the best of them reported as "best PTQ";
- QAT, when ``--qat NAME=DIR`` points at a `edgerepvgg qat` output folder;
- NNCF's `nncf.quantize` of the same FP32 model through OpenVINO, when nncf is installed;
- the cost of calibration (one statistics pass) against plain FP32 inference over the same images.

Quantized accuracies are those of the integer emulation (IntegerNet) of each QuantSpec, which every
target is checked against; NNCF's is its compiled OpenVINO model run on this CPU.

    PYTHONPATH=. python benchmarks/quant_accuracy.py [--constraints tensorrt] [--qat repvgg-a0-fmnist=runs/qat]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import machine_info, md_table, save_results

from edgerepvgg.checkpoints import BUNDLED, load_checkpoint
from edgerepvgg.data import calibration_images, fashion_mnist
from edgerepvgg.evaluate import predict, topk_accuracy
from edgerepvgg._fuse import fuse
from edgerepvgg.quant import constraints_for, load_spec
from edgerepvgg.quant.calibrate import CalibrationConfig, collect_stats, make_spec
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.observers import RANGE_METHODS

log = logging.getLogger("quant_accuracy")


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def top1_of(fn, test) -> float:
    return topk_accuracy(predict(fn, test, batch_size=500), test.labels)


def calibration_cost(plain, calib, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one statistics pass vs one FP32 inference pass over the same images,
    interleaved so that load drift hits both alike."""
    stats_t, infer_t = [], []
    with torch.no_grad():
        for _ in range(repeats):
            infer_t.append(timed(lambda: [plain(x) for x, _ in calib.batches(64)])[1])
            stats_t.append(timed(collect_stats, plain, calib, 64, False)[1])
    s, i = statistics.median(stats_t), statistics.median(infer_t)
    return {"stats_s": s, "fp32_s": i, "ratio": s / i}


def nncf_ptq(plain, calib, test) -> dict[str, Any]:
    """NNCF's default PTQ of the FP32 PlainNet through OpenVINO (CPU), as a vendor reference."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        return {"status": f"skipped: {exc}"}
    from edgerepvgg.targets.openvino import core

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "fp32.onnx"
        torch.onnx.export(plain, plain.example_input(1), onnx_path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})  # fmt: skip
        model = ov.convert_model(str(onnx_path))
        data = nncf.Dataset([x.numpy() for x, _ in calib.batches(1)])
        (quantized, seconds) = timed(nncf.quantize, model, data, subset_size=len(calib))
        compiled = core().compile_model(quantized, "CPU")
        request = compiled.create_infer_request()

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(request.infer({0: x.numpy()})[compiled.output(0)].copy())

        return {"status": "ok", "top1": top1_of(run, test), "seconds": seconds}


def evaluate_model(name: str, constraints_name: str, qat_dir: Path | None, with_nncf: bool) -> dict[str, Any]:
    model, meta = load_checkpoint(name)
    plain, _ = fuse(model, meta.input_spec)
    test = fashion_mnist("test", meta.input_spec)
    calib = calibration_images(meta.input_spec)
    constraints = constraints_for(constraints_name)
    rows: list[dict[str, Any]] = []
    fp32, _ = timed(top1_of, plain, test)
    rows.append({"setting": "FP32", "top1": fp32, "seconds": 0.0})
    stats, stats_s = timed(collect_stats, plain, calib, 64, False)

    def ptq_row(setting: str, **kw) -> dict[str, Any]:
        spec, make_s = timed(make_spec, plain, stats, constraints, CalibrationConfig(**kw))
        top1 = top1_of(IntegerNet(plain, spec), test)
        return {"setting": setting, "top1": top1, "seconds": stats_s + make_s}

    log.info("%s: FP32 %.4f; running PTQ settings", name, fp32)
    rows.append(ptq_row("naive PTQ (per-tensor minmax weights and activations)", method="minmax", per_tensor_weights=True))
    ptq = [ptq_row(f"PTQ per-channel, {m}", method=m) for m in RANGE_METHODS]
    ptq += [ptq_row(f"PTQ per-channel mse weights, {m}", method=m, weight_method="mse") for m in ("entropy", "mse")]
    rows += ptq
    best = max(ptq, key=lambda r: r["top1"])
    rows.append({**best, "setting": f"best PTQ = {best['setting']}"})
    if qat_dir is not None:
        qmodel, qmeta = load_checkpoint(qat_dir / "model.safetensors")
        qplain, _ = fuse(qmodel, qmeta.input_spec)
        qspec = load_spec(qat_dir / "quant_spec.json")
        rows.append({"setting": f"QAT ({qspec.constraints.name})", "top1": top1_of(IntegerNet(qplain, qspec), test),
                     "seconds": qmeta.extra.get("qat_seconds", float("nan"))})  # fmt: skip
    if with_nncf:
        log.info("%s: NNCF PTQ through OpenVINO", name)
        n = nncf_ptq(plain, calib, test)
        rows.append({"setting": "NNCF PTQ (OpenVINO CPU, nncf.quantize defaults)", **n})
    for r in rows:
        if "top1" in r:
            r["delta_pt"] = 100 * (r["top1"] - fp32)
    return {"model": name, "constraints": constraints.name, "eval_set": test.source, "calibration_set": calib.source,
            "calibration_images": len(calib), "rows": rows, "calibration_cost": calibration_cost(plain, calib)}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Quantization accuracy ({m['date']})", "",
             f"- CPU: {m['cpu']} ({m['cores']} cores), ISA {', '.join(m['isa'])}; torch {m['torch']}, "
             f"threads {m['threads']}", ""]  # fmt: skip
    for r in result["models"]:
        lines += [f"## {r['model']}, constraint set {r['constraints']}", "",
                  f"Evaluated on {r['eval_set']}; calibrated on {r['calibration_images']} images from {r['calibration_set']}.", ""]  # fmt: skip
        table = [[x["setting"], f"{100 * x['top1']:.2f}" if "top1" in x else x.get("status", ""),
                  f"{x['delta_pt']:+.2f}" if "delta_pt" in x else "", f"{x.get('seconds', float('nan')):.1f}"]
                 for x in r["rows"]]  # fmt: skip
        lines += md_table(["setting", "top-1 %", "Δ vs FP32 (pt)", "time (s)"], table, "lrrr")
        c = r["calibration_cost"]
        lines += ["", f"Calibration statistics pass: {c['stats_s']:.2f} s vs FP32 inference {c['fp32_s']:.2f} s "
                  f"over the same images: {c['ratio']:.2f}x.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BUNDLED))
    p.add_argument("--constraints", default="tensorrt")
    p.add_argument("--qat", nargs="*", default=[], help="NAME=DIR: QAT output folder for a model")
    p.add_argument("--no-nncf", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_accuracy.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    qat_dirs = dict(item.split("=", 1) for item in args.qat)
    machine = machine_info(args.threads, ("torch", "openvino", "nncf"))
    models = [evaluate_model(n, args.constraints, Path(qat_dirs[n]) if n in qat_dirs else None, not args.no_nncf)
              for n in args.models]  # fmt: skip
    result = {"machine": machine, "models": models}
    save_results(args.out, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
