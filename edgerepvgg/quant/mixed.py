"""Mixed precision under an accuracy gate (after NNCF's ``quantize_with_accuracy_control``).

Starting from a calibrated QuantSpec, the most sensitive layers are kept in float one at a time,
most sensitive first, until the integer emulation's top-1 is within ``max_drop`` points of FP32.
A float layer stays between the Q/DQ nodes of its neighbours, which TensorRT, OpenVINO and ONNX
Runtime execute as a float conv; full-integer TFLite cannot, and its target refuses such a spec.
The spec records which layers were kept in float and why, so a report can say it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import predict, topk_accuracy
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.analysis import Analysis, Sensitivity, integer_top1, layer_sensitivity, rank, require_eval_set
from edgerepvgg.quant.spec import QuantSpec, with_float_layers

log = logging.getLogger(__name__)

_SLACK = 1e-6  # points: top-1 is a float32 mean, so a drop exactly at the gate may read 1e-6 above it


def _meets(drop: float, max_drop: float) -> bool:
    return drop <= max_drop + _SLACK


def keep_sensitive_layers(
    plain: PlainNet,
    spec: QuantSpec,
    eval_set: TensorDataset,
    max_drop: float,
    sensitivity: Analysis | Sequence[str] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[QuantSpec, list[dict]]:
    """Keep the most sensitive layers of ``spec`` in float, one at a time, until the integer
    emulation's top-1 on ``eval_set`` is at most ``max_drop`` percentage points below FP32.

    ``sensitivity`` orders the layers: an :class:`~edgerepvgg.quant.analysis.Analysis` (its chosen
    method's ranking), layer names most sensitive first, or ``None`` to measure it here
    (:func:`~edgerepvgg.quant.analysis.layer_sensitivity` on ``spec``). Layers it does not name
    are tried after it, in network order, so every layer is tried before giving up.

    Returns the new spec and the trace: one dict per evaluation (``layer`` kept in float at that
    step, ``None`` for the start; ``float_layers``; ``top1``; ``drop``). The spec's
    ``calibration['mixed_precision']`` records the gate, the status (``met``, or ``unmet`` when even
    every layer in float misses it: then the spec is the best step found, fewest float layers on a
    tie) and, per float layer, why it was kept."""
    if isinstance(max_drop, bool) or not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise UserError(f"--max-drop must be a non-negative, finite number of top-1 points (the accuracy gate); got {max_drop!r}")
    require_eval_set(eval_set)
    plain = plain.eval()
    fp32_logits = predict(plain, eval_set, batch_size)
    fp32_top1 = topk_accuracy(fp32_logits, eval_set.labels)

    names_in_spec = [layer.name for layer in spec.layers]
    already = [layer.name for layer in spec.layers if layer.precision == "float"]

    def step(layer: str | None, floats: list[str], current: QuantSpec) -> dict:
        top1 = integer_top1(plain, current, eval_set, batch_size)
        entry = {"layer": layer, "float_layers": list(floats), "top1": top1, "drop": 100.0 * (fp32_top1 - top1)}
        log.info("float %s: top-1 %.4f (%.2f pt below FP32)", floats or "none", top1, entry["drop"])
        return entry

    from tqdm import tqdm

    floats = list(already)
    trace = [step(None, floats, spec)]
    ranking: list[str] = []
    drops: dict[str, float] = {}
    if not _meets(trace[0]["drop"], max_drop):  # measure the sensitivities only when they are needed
        if sensitivity is None:
            todo = [n for n in names_in_spec if n not in already]
            measured = layer_sensitivity(plain, spec, eval_set, todo, fp32_logits, batch_size, progress)
            ranking, drops = rank(measured), {s.layer: s.drop for s in measured}
        elif isinstance(sensitivity, Analysis):
            ranking = sensitivity.ranking("chosen", weighted_only=True)
            drops = {r.name: r.chosen.drop for r in sensitivity.layers}
        else:
            ranking = [s.layer if isinstance(s, Sensitivity) else str(s) for s in sensitivity]
        unknown = [n for n in ranking if n not in names_in_spec and n != "pool"]
        if unknown:
            raise UserError(f"the sensitivity ranking names {unknown[0]!r}, which is not a layer of this QuantSpec")
    order = [n for n in ranking if n in names_in_spec and n not in already]
    order += [n for n in names_in_spec if n not in order and n not in already]
    bar = tqdm(order, desc="mixed precision", disable=not progress, leave=False)
    for name in bar:
        if _meets(trace[-1]["drop"], max_drop):
            break
        floats.append(name)
        current = with_float_layers(spec, floats)
        trace.append(step(name, floats, current))
    bar.close()

    met = _meets(trace[-1]["drop"], max_drop)
    best = trace[-1] if met else min(trace, key=lambda e: (e["drop"], len(e["float_layers"])))
    result = with_float_layers(spec, best["float_layers"])
    kept = []
    for k, entry in enumerate(trace[1 : trace.index(best) + 1], start=1):
        before = trace[k - 1]["drop"]
        why = f"sensitivity rank {ranking.index(entry['layer']) + 1}" if entry["layer"] in ranking else "not ranked"
        if entry["layer"] in drops:
            why += f" ({drops[entry['layer']]:.2f} pt top-1 drop when only it is quantized)"
        kept.append({"layer": entry["layer"], "reason": f"{why}; keeping it in float moved the INT8 drop from "
                     f"{before:.2f} to {entry['drop']:.2f} pt against a {max_drop:g} pt gate"})  # fmt: skip
    record = {
        "max_drop": max_drop, "status": "met" if met else "unmet",
        "fp32_top1": fp32_top1, "int_top1": trace[0]["top1"], "top1": best["top1"], "drop": best["drop"],
        "eval_set": eval_set.source, "eval_images": len(eval_set),
        "kept_float": kept, "already_float": already, "tried": len(trace) - 1,
        "note": "float layers run between the Q/DQ nodes of their neighbours: TensorRT, OpenVINO and ONNX Runtime "
                "execute them in float; the TFLite target refuses a spec with float layers (full integer only)",
    }  # fmt: skip
    if not met:
        record["message"] = (f"even with all {len(order)} layers tried in float the INT8 top-1 stays {best['drop']:.2f} pt "
                             f"below FP32 (gate {max_drop:g} pt): the loss is in what stays quantized (the pool/output "
                             f"quantizers) or the gate is tighter than the evaluation set can resolve")  # fmt: skip
    return replace(result, calibration={**spec.calibration, "mixed_precision": record}), trace
