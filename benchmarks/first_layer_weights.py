"""7-bit weights everywhere, on the first conv only, or nowhere: ONNX Runtime and OpenVINO INT8 on
a CPU without VNNI.

x86 CPUs without VNNI multiply u8 activations by s8 weights with ``vpmaddubsw``, which sums two
products in an int16 that saturates (255 * 127 * 2 > 32767); with 7-bit weights it cannot
(255 * 63 * 2 <= 32767). NNCF's "overflow fix" narrows only the first layer's weights. Which rule
keeps the runtime computing what the QuantSpec says? For each runtime and each scheme:

- ``w8``: 8-bit weights in every layer (what a VNNI CPU gets);
- ``w7``: 7-bit weights in every layer (this project's rule for CPUs without VNNI);
- ``w7_first``: the ``w8`` spec with the first conv's weights re-quantized for a 7-bit grid (same
  clip range, scale x 127/63), every other layer 8-bit (NNCF's overflow fix);

on the bundled model and the Fashion-MNIST test set: top-1, and the runtime's logits against
IntegerNet (the exact integer emulation of the same spec; it never saturates): top-1 agreement,
logit cosine, SQNR. A runtime that saturates shows as lower agreement and cosine. Calibration:
the bundled images, the default calibration config, once per constraint set.

    PYTHONPATH=.:benchmarks python benchmarks/first_layer_weights.py
    PYTHONPATH=.:benchmarks python benchmarks/first_layer_weights.py --limit 1000   # smoke run

Writes ``results/first_layer_weights.json`` and ``.md``. The figures only mean something on a CPU
without VNNI (the report says which CPU it ran on, and whether it has VNNI); on a VNNI CPU all
three schemes are exact.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import CPU_FLAGS, machine_info, md_table

from edgerepvgg import fuse, load_checkpoint
from edgerepvgg.data import calibration_images, evaluation_set
from edgerepvgg.evaluate import agreement, predict, topk_accuracy
from edgerepvgg.io import write_text_atomic
from edgerepvgg.machine import host_features
from edgerepvgg.quant import QuantSpec, constraints_for
from edgerepvgg.quant.calibrate import calibrate
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.spec import narrow_layer_weights
from edgerepvgg.targets import get_target

log = logging.getLogger("first_layer_weights")

RUNTIMES = ("onnxruntime", "openvino")
SCHEMES = ("w8", "w7", "w7_first")
LABELS = {"w8": "8-bit weights everywhere", "w7": "7-bit weights everywhere",
          "w7_first": "7-bit first conv, 8-bit elsewhere"}  # fmt: skip
OUT = Path(__file__).resolve().parent / "results"


def weight_stats(plain, spec: QuantSpec) -> dict[str, Any]:
    """How many integer weights of the first conv and of all convs lie outside the 7-bit range
    [-63, 63], i.e. can take part in a saturating vpmaddubsw pair."""
    from edgerepvgg.quant.emulate import quantize

    out = {}
    for i, (conv, layer) in enumerate(zip(plain.convs, spec.layers)):
        w = quantize(conv.weight.detach().double(), layer.weight, "half_even", axis=0)
        out[layer.name] = {"bits": layer.weight.scheme.bits, "beyond_7_bit": int((w.abs() > 63).sum()), "weights": w.numel()}
    return out


def run(limit: int | None, threads: int, work: Path) -> dict[str, Any]:
    model, meta = load_checkpoint()
    plain, _ = fuse(model, meta.input_spec)
    calib = calibration_images(plain.input_spec)
    test = evaluation_set(plain.input_spec, limit=limit)
    log.info("evaluating on %s (%d images)", test.source, len(test))
    with torch.no_grad():
        fp32 = predict(plain, test, batch_size=500)
    result: dict[str, Any] = {"eval_set": f"{test.source}, {len(test)} images", "calibration": calib.source,
                              "top1_fp32": topk_accuracy(fp32, test.labels), "runtimes": {}}  # fmt: skip
    referee: dict[tuple, tuple[torch.Tensor, float]] = {}  # IntegerNet logits per distinct numerics
    for runtime in RUNTIMES:
        target = get_target(runtime)
        reason = target.available()
        if reason is not None:
            log.warning("skipping %s: %s", runtime, reason)
            result["runtimes"][runtime] = {"skipped": reason}
            continue
        specs = {"w8": calibrate(plain, calib, constraints_for(target.constraint_set, weight_bits=8), progress=False, cache=False),
                 "w7": calibrate(plain, calib, constraints_for(target.constraint_set, weight_bits=7), progress=False, cache=False)}  # fmt: skip
        specs["w7_first"] = narrow_layer_weights(specs["w8"], [specs["w8"].layers[0].name], 7)
        rows = {}
        for scheme, spec in specs.items():
            key = (spec.layers, spec.pool)
            if key not in referee:
                t0 = time.perf_counter()
                ref = predict(IntegerNet(plain, spec), test, batch_size=500)
                referee[key] = (ref, time.perf_counter() - t0)
            ref, ref_s = referee[key]
            artifact = target.compile(plain, spec, work / f"{runtime}-{scheme}", "int8")
            runner = target.load(artifact, threads=threads)
            t0 = time.perf_counter()
            logits = predict(runner, test, batch_size=500)
            run_s = time.perf_counter() - t0
            a = agreement(logits, ref)
            rows[scheme] = {"constraints": spec.constraints.name,
                            "weight_bits": [layer.weight.scheme.bits for layer in spec.layers],
                            "top1": topk_accuracy(logits, test.labels), "top1_integer_net": topk_accuracy(ref, test.labels),
                            "vs_integer_net": {**a.to_dict(), "disagreeing_rows": int((logits.argmax(1) != ref.argmax(1)).sum())},
                            "vs_fp32": agreement(logits, fp32).to_dict(), "runtime_s": run_s, "integer_net_s": ref_s,
                            "beyond_7_bit": {k: v["beyond_7_bit"] for k, v in weight_stats(plain, spec).items()}}  # fmt: skip
            log.info("%s %s: top-1 %.4f, agreement with IntegerNet %.4f, cosine %.6f", runtime, scheme,
                     rows[scheme]["top1"], a.top1, a.cosine)  # fmt: skip
        result["runtimes"][runtime] = rows
    result["verdict"] = verdict(result)
    result["default_here"] = {r: constraints_for(r).name for r in RUNTIMES}  # what this CPU gets now
    return result


def verdict(result: dict[str, Any], tolerance: float = 0.001) -> dict[str, Any]:
    """Does 7 bits on the first conv only keep what 7 bits everywhere gives? Per runtime: its top-1
    and its agreement with IntegerNet within ``tolerance`` (0.1 pt) of w7's."""
    per = {}
    for runtime, rows in result["runtimes"].items():
        if "skipped" in rows:
            continue
        w7, first = rows["w7"], rows["w7_first"]
        per[runtime] = {"top1_drop_vs_w7": w7["top1"] - first["top1"],
                        "agreement_drop_vs_w7": w7["vs_integer_net"]["top1"] - first["vs_integer_net"]["top1"],
                        "keeps": w7["top1"] - first["top1"] <= tolerance
                        and w7["vs_integer_net"]["top1"] - first["vs_integer_net"]["top1"] <= tolerance}  # fmt: skip
    return {"tolerance": tolerance, "per_runtime": per, "first_layer_only_keeps_w7": bool(per) and all(v["keeps"] for v in per.values())}


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    vnni = {True: "has VNNI", False: "**no VNNI**", None: "VNNI unknown"}[m["vnni"]]
    lines = [f"# 7-bit weights everywhere, first conv only, or nowhere ({m['date']})", "",
             f"- CPU: {m['cpu']} ({m['cpu_family_model']}), {m['cores_usable']} usable cores"
             f"{', virtual machine' if m['hypervisor'] else ''}; ISA: {', '.join(m['isa']) or 'none of ' + '/'.join(CPU_FLAGS)} "
             f"(from {m['isa_source']}): {vnni}",
             f"- onnxruntime {m['onnxruntime']}, openvino {m['openvino']}, torch {m['torch']}, Python {m['python']}; "
             f"threads {m['threads']}; wall time {result['seconds']:.0f} s",
             f"- model: bundled Fashion-MNIST RepVGG; calibration: {result['calibration']}, default config; "
             f"evaluated on {result['eval_set']}; FP32 top-1 {100 * result['top1_fp32']:.2f}%",
             "- referee: IntegerNet of the same spec (exact integer arithmetic, never saturates); "
             "`w7_first` = the `w8` spec with the first conv's weight scales x 127/63 (same clip range)", ""]  # fmt: skip
    rows = []
    for runtime, per in result["runtimes"].items():
        if "skipped" in per:
            rows.append([runtime, "skipped: " + per["skipped"], "", "", "", "", "", ""])
            continue
        for scheme in SCHEMES:
            r = per[scheme]
            a = r["vs_integer_net"]
            sqnr = "inf" if a["sqnr_db"] is None else f"{a['sqnr_db']:.1f}"
            rows.append([runtime, f"`{scheme}` {LABELS[scheme]}", f"{100 * r['top1']:.2f}", f"{100 * r['top1_integer_net']:.2f}",
                         f"{100 * a['top1']:.2f}", str(a["disagreeing_rows"]), f"{a['cosine']:.6f}", sqnr])  # fmt: skip
    lines += md_table(["runtime", "weights", "top-1 %", "IntegerNet top-1 %", "agreement w/ IntegerNet %",
                       "rows that disagree", "logit cosine", "SQNR dB"], rows, "llrrrrrr")  # fmt: skip
    v = result["verdict"]
    lines += ["", "## Verdict", ""]
    for runtime, d in v["per_runtime"].items():
        lines.append(f"- {runtime}: first-conv-only vs 7 bits everywhere: top-1 {-100 * d['top1_drop_vs_w7']:+.2f} pt, "
                     f"agreement with IntegerNet {-100 * d['agreement_drop_vs_w7']:+.2f} pt -> "
                     f"{'keeps' if d['keeps'] else 'does not keep'} it (tolerance {100 * v['tolerance']:.1f} pt)")  # fmt: skip
    lines.append("- rule: " + ("7 bits on the first conv only is enough on this CPU"
                               if v["first_layer_only_keeps_w7"] else "keep 7-bit weights in every layer on x86 without VNNI"))  # fmt: skip
    lines.append("- `constraints_for` on this CPU now gives: " + ", ".join(f"{k} -> `{v}`" for k, v in result["default_here"].items()))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument("--out", type=Path, default=OUT / "first_layer_weights.json", help="JSON output; the .md goes beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    features = host_features()
    if features.vnni is not False:
        log.warning("this CPU is not known to lack VNNI (%s): the three schemes should all be exact here", features.describe())
    info = machine_info(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="first_layer_weights.") as work:
        result = run(args.limit, args.threads, Path(work))
    result["seconds"] = time.perf_counter() - t0
    result["machine"] = info
    result["settings"] = {"limit": args.limit, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), render(result))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
