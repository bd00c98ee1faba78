"""Why a fused RepVGG does or does not quantize, layer by layer.

:func:`analyze` measures, for every quantizer of a PlainNet under one constraint set:

- **weights** (each conv and the head): the per-output-channel range ``max|w_c|``, the ratio of
  the largest to the smallest channel range, the excess kurtosis and the outlier share of the
  weight values, and the weight quantization SQNR with one scale per tensor (naive) and one per
  output channel. Fusing the identity and 1x1 branches into the 3x3 kernel gives some channels
  far larger weights than others; a per-tensor scale sized for the largest channel rounds the
  small ones to a handful of levels, which is what the two SQNR columns show;
- **activations** (each quantized point): min, max, the 99.9 and 99.99 percentiles of ``|x|``
  (read off the cached calibration histograms), ``max|x| / p99.99`` and the clip range the chosen
  method picks;
- **sensitivity**: the top-1 drop against FP32 and the logit SQNR when *only* that quantizer is
  quantized (the integer emulation, every other layer FP32: :func:`quantized_only`), once with naive PTQ (per-tensor min/max weights,
  min/max activations) and once with the chosen method (per-channel weights), so the table shows
  which layers carry the naive loss and what is left of it;
- **summary**: FP32, naive INT8 and chosen-method INT8 top-1 of the whole network (the integer
  emulation), the most sensitive layers, and a few plain-words findings.

Rendering (the table, the summary text, the plot, the files) is in
:mod:`edgerepvgg.quant.analysis_report`.

Definitions, used everywhere in the project's reports:

- ``sqnr_db(ref, approx) = 10 log10(sum ref^2 / sum (ref - approx)^2)``: infinite when the two are
  equal (``None`` in JSON), ``-inf`` for an all-zero reference with any error;
- a layer's weight SQNR is the *mean over its output channels* of each channel's own SQNR (dB;
  all-zero and exactly representable channels left out, infinite if that leaves none). Every
  channel feeds the next layer with equal standing, so a channel rounded to nothing must show;
  the SQNR of the whole tensor (``*_pooled``, also reported) is energy-weighted and hides it: one
  channel 100x larger than the rest keeps it near 30 dB while the rest quantize to zero;
- excess kurtosis: ``E[(w - mean)^4] / var^2 - 3`` over all of a layer's weights (population
  moments; 0 for a Gaussian, -2 for two symmetric values, large for heavy tails);
- outlier share: the share of a layer's weights farther than ``OUTLIER_SIGMAS`` (3) standard
  deviations from their mean (0.27% for a Gaussian);
- top-1 is a fraction in [0, 1]; a drop is in percentage points (``100 * (fp32 - int8)``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import predict, sqnr_db, topk_accuracy
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.calibrate import NAIVE, CalibrationConfig, CalibrationStats, make_spec, stats_for
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.observers import quantile, weight_scales
from edgerepvgg.quant.spec import Constraints, QuantSpec, Scheme, TensorQuant, resolve_constraints, with_float_layers
from edgerepvgg.torch_device import emulation_device, placed, resolve_device

log = logging.getLogger(__name__)

OUTLIER_SIGMAS = 3.0
ANALYSIS_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Statistics, each checkable by hand


def excess_kurtosis(values: torch.Tensor) -> float:
    """``E[(x - mean)^4] / var^2 - 3`` (population moments); 0.0 for constant data."""
    x = values.detach().double().reshape(-1)
    d = x - x.mean()
    var = float((d**2).mean())
    if var == 0:
        return 0.0
    return float((d**4).mean()) / var**2 - 3.0


def outlier_share(values: torch.Tensor, sigmas: float = OUTLIER_SIGMAS) -> float:
    """Share of values farther than ``sigmas`` standard deviations (population) from the mean."""
    x = values.detach().double().reshape(-1)
    if x.numel() == 0:
        return 0.0
    d = (x - x.mean()).abs()
    return float((d > sigmas * d.pow(2).mean().sqrt()).double().mean())


def channel_ranges(weight: torch.Tensor) -> torch.Tensor:
    """``max|w|`` of each output channel (axis 0), float64."""
    return weight.detach().double().reshape(weight.shape[0], -1).abs().amax(dim=1)


def channel_range_ratio(weight: torch.Tensor) -> float | None:
    """Largest over smallest per-channel ``max|w|``, over the channels that are not all zero
    (``None`` when every channel is)."""
    r = channel_ranges(weight)
    r = r[r > 0]
    return float(r.max() / r.min()) if r.numel() else None


def channel_sqnr_db(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """Mean over output channels of each channel's SQNR (dB), leaving out all-zero channels and
    channels without error; ``inf`` when that leaves none."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    q = quantized.detach().double().reshape(weight.shape[0], -1)
    signal, noise = (w**2).sum(dim=1), ((w - q) ** 2).sum(dim=1)
    keep = (signal > 0) & (noise > 0)
    if not bool(keep.any()):
        return math.inf
    return float((10.0 * torch.log10(signal[keep] / noise[keep])).mean())


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Symmetric quantize-dequantize with one scale per output channel (round half to even),
    as every target does it."""
    w = weight.detach().double()
    s = scales.double().reshape(-1, *([1] * (w.ndim - 1)))
    return torch.clamp(torch.round(w / s), scheme.qmin, scheme.qmax) * s


@dataclass(frozen=True)
class WeightStats:
    """Statistics of one layer's fused weight (see the module docstring for the definitions)."""

    channels: int
    channel_range_min: float  # smallest per-channel max|w| among channels that are not all zero
    channel_range_max: float
    channel_ratio: float | None  # channel_range_max / channel_range_min
    zero_channels: int
    kurtosis: float
    outlier_share: float
    sqnr_per_tensor: float  # dB, channel mean; one scale max|w| / qmax for the whole tensor (naive PTQ)
    sqnr_per_channel: float  # dB, channel mean; one scale per output channel (the chosen weight method)
    sqnr_per_tensor_pooled: float  # dB over the whole tensor (energy-weighted)
    sqnr_per_channel_pooled: float


def weight_stats(weight: torch.Tensor, scheme: Scheme, weight_method: str = "minmax") -> WeightStats:
    """:class:`WeightStats` of a conv or linear weight on ``scheme``'s grid; the per-channel
    scales come from :func:`~edgerepvgg.quant.observers.weight_scales` (what ``make_spec`` uses),
    the per-tensor scale is their maximum (``make_spec(per_tensor_weights=True)``)."""
    r = channel_ranges(weight)
    nonzero = r[r > 0]
    per_channel = weight_scales(weight, scheme, weight_method).double()
    per_tensor = torch.full_like(per_channel, float(weight_scales(weight, scheme, "minmax").max()))
    qt, qc = quantize_weight(weight, per_tensor, scheme), quantize_weight(weight, per_channel, scheme)
    return WeightStats(
        channels=int(r.numel()),
        channel_range_min=float(nonzero.min()) if nonzero.numel() else 0.0,
        channel_range_max=float(r.max()),
        channel_ratio=channel_range_ratio(weight),
        zero_channels=int((r == 0).sum()),
        kurtosis=excess_kurtosis(weight),
        outlier_share=outlier_share(weight),
        sqnr_per_tensor=channel_sqnr_db(weight, qt),
        sqnr_per_channel=channel_sqnr_db(weight, qc),
        sqnr_per_tensor_pooled=sqnr_db(weight, qt),
        sqnr_per_channel_pooled=sqnr_db(weight, qc),
    )  # fmt: skip


@dataclass(frozen=True)
class ActivationStats:
    """One activation point over the calibration images, and the range the chosen method clips
    it to (``clip`` is ``None`` where the constraint set does not quantize the point)."""

    point: str
    min: float
    max: float
    p99_9: float  # percentiles of |x|, exact to one histogram bin
    p99_99: float
    tail_ratio: float | None  # max|x| / p99.99 (None when p99.99 is 0)
    clip: tuple[float, float] | None
    scale: float | None  # grid step of the chosen clip range


def activation_stats(calib: CalibrationStats, point: str, quant: TensorQuant | None) -> ActivationStats:
    """Statistics of one activation point, and the range its quantizer in the spec (``quant``,
    ``None`` where the point is not quantized) actually covers."""
    hist = calib.histograms[point]
    if hist.count == 0:
        raise UserError(f"no values were observed at {point}; calibrate on at least one image")
    p999, p9999 = quantile(hist, 99.9, signed=False), quantile(hist, 99.99, signed=False)
    clip = scale = None
    if quant is not None:
        scale, zp = quant.scale[0], quant.zero_point[0]
        clip = ((quant.scheme.qmin - zp) * scale, (quant.scheme.qmax - zp) * scale)
    return ActivationStats(point, hist.min, hist.max, p999, p9999, hist.amax / p9999 if p9999 > 0 else None,
                           clip, scale)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Sensitivity


@dataclass(frozen=True)
class Sensitivity:
    """The network with only ``layer`` quantized (integer emulation), against FP32 on the eval set."""

    layer: str
    top1: float
    drop: float  # percentage points below FP32
    logit_sqnr: float  # dB


def quantizers(spec: QuantSpec) -> list[str]:
    """What can be quantized on its own, in network order: every conv, ``pool`` (the last
    conv's requantization), the head (with the output quantizer where there is one)."""
    names = [layer.name for layer in spec.layers]
    return names[:-1] + ["pool", names[-1]]


def quantized_only(plain: PlainNet, spec: QuantSpec, names: Collection[str]) -> IntegerNet:
    """The integer emulation of ``plain`` under ``spec`` with only the quantizers ``names`` (see
    :func:`quantizers`) quantized and everything else in float; the output quantizer goes with
    the head. With every quantizer named it is ``IntegerNet(plain, spec)`` itself: sensitivity is
    measured on the one quantized function every target is checked against."""
    names = set(names)
    unknown = names - set(quantizers(spec))
    if unknown:
        raise UserError(f"no quantizer {sorted(unknown)[0]!r} in this QuantSpec; quantizers are {', '.join(quantizers(spec))}")
    floats = [layer.name for layer in spec.layers if layer.name not in names]
    keep_float = [p for p, on in (("pool", "pool" in names), ("output", spec.layers[-1].name in names)) if not on]
    return IntegerNet(plain, with_float_layers(spec, floats), keep_float=keep_float)


def require_eval_set(eval_set: TensorDataset) -> None:
    """The one check on an evaluation set that accuracy is measured on: labelled and not empty."""
    if not eval_set.labelled:  # also False for an empty set
        raise UserError(f"the evaluation set {eval_set.source} must be labelled (one subfolder per class) and not empty")


@torch.no_grad()
def layer_sensitivity(plain: PlainNet, spec: QuantSpec, eval_set: TensorDataset, layers: list[str] | None = None,
                      fp32_logits: torch.Tensor | None = None, batch_size: int = 256,
                      progress: bool = False, desc: str = "sensitivity",
                      device: torch.device | None = None) -> list[Sensitivity]:  # fmt: skip
    """:class:`Sensitivity` of each of ``layers`` (default: :func:`quantizers`), each measured on
    :func:`quantized_only`; layers the spec keeps in float are skipped. ``device``: where
    ``plain`` is (the batches go there)."""
    from tqdm import tqdm

    require_eval_set(eval_set)
    plain = plain.eval()
    if fp32_logits is None:
        fp32_logits = predict(plain, eval_set, batch_size, device)
    fp32_top1 = topk_accuracy(fp32_logits, eval_set.labels)
    floats = {layer.name for layer in spec.layers if layer.precision == "float"}
    todo = [name for name in (layers if layers is not None else quantizers(spec)) if name not in floats]
    out = []
    for name in tqdm(todo, desc=desc, disable=not progress, leave=False):
        logits = predict(quantized_only(plain, spec, {name}), eval_set, batch_size, device)
        top1 = topk_accuracy(logits, eval_set.labels)
        out.append(Sensitivity(name, top1, 100.0 * (fp32_top1 - top1), sqnr_db(fp32_logits, logits)))
    return out


def rank(sensitivities: list[Sensitivity]) -> list[str]:
    """Most sensitive first: the larger top-1 drop, then (drops on a small eval set tie often)
    the lower logit SQNR."""
    return [s.layer for s in sorted(sensitivities, key=lambda s: (-s.drop, s.logit_sqnr))]


def integer_top1(plain: PlainNet, spec: QuantSpec, eval_set: TensorDataset, batch_size: int = 256,
                 device: torch.device | None = None) -> float:  # fmt: skip
    """Top-1 of the integer emulation of ``plain`` (on ``device``) under ``spec``."""
    return topk_accuracy(predict(IntegerNet(plain, spec), eval_set, batch_size, device), eval_set.labels)


# ---------------------------------------------------------------------------------------------
# The analysis


@dataclass(frozen=True)
class LayerAnalysis:
    """One row: a quantizer (``convs.i``, ``pool`` or ``head``), its weight (``None`` for
    ``pool``), the activation it quantizes, and its sensitivity under naive and chosen PTQ."""

    name: str
    weight: WeightStats | None
    activation: ActivationStats
    naive: Sensitivity
    chosen: Sensitivity


@dataclass
class Analysis:
    """Everything :func:`analyze` measured; :meth:`to_json` is the ``analysis.json`` artifact."""

    model: str
    constraints: str
    method: str
    weight_method: str
    calibration: dict  # source, images, fingerprint
    evaluation: dict  # source, images
    fp32_top1: float
    naive_top1: float  # the whole network, integer emulation, naive PTQ
    chosen_top1: float  # the whole network, integer emulation, chosen method
    layers: list[LayerAnalysis]
    output: ActivationStats | None  # the logits' quantizer, where the target quantizes them
    findings: list[str] = field(default_factory=list)
    naive_spec: QuantSpec | None = field(default=None, repr=False, compare=False)
    spec: QuantSpec | None = field(default=None, repr=False, compare=False)

    def row(self, name: str) -> LayerAnalysis:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def ranking(self, which: str = "chosen", weighted_only: bool = False) -> list[str]:
        """Quantizers, most sensitive first (``which``: ``naive`` or ``chosen``);
        ``weighted_only`` leaves out ``pool`` (the ones mixed precision can keep in float)."""
        rows = [r for r in self.layers if r.weight is not None or not weighted_only]
        return rank([getattr(r, which) for r in rows])

    def most_sensitive(self, which: str = "chosen", k: int = 3) -> list[str]:
        return self.ranking(which)[:k]

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in ("naive_spec", "spec")}
        d["version"] = ANALYSIS_VERSION
        d["definitions"] = {
            "sqnr_db": "10*log10(sum(ref^2) / sum((ref - quantized)^2)); null = no error (infinite)",
            "weight sqnr_per_tensor/sqnr_per_channel": "mean over output channels of each channel's SQNR (dB), "
                                                       "all-zero and error-free channels left out; *_pooled: whole tensor",
            "kurtosis": "excess kurtosis E[(w-mean)^4]/var^2 - 3 over all weights of the layer",
            "outlier_share": f"share of weights farther than {OUTLIER_SIGMAS:g} standard deviations from the layer's mean",
            "channel_ratio": "largest / smallest per-output-channel max|w| (all-zero channels left out)",
            "activation percentiles": "of |x| over the calibration images",
            "tail_ratio": "max|x| / p99.99",
            "drop": "top-1 percentage points below FP32 with only this quantizer quantized (integer emulation)",
            "logit_sqnr": "SQNR of the logits against FP32 with only this quantizer quantized",
            "naive": "per-tensor min/max weights, min/max activations",
        }  # fmt: skip
        d["most_sensitive"] = {"naive": self.most_sensitive("naive"), "chosen": self.most_sensitive("chosen")}
        return _finite(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False)


def _plain(obj):
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _finite(obj):
    """Non-finite floats -> None, tuples -> lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def fmt_ratio(r: float | None) -> str:
    """A channel range ratio as text: ``12.3x``, ``456x``, ``-`` for none."""
    return "-" if r is None else f"{r:.0f}x" if r >= 100 else f"{r:.1f}x"


def fmt_num(v: float | None) -> str:
    """A statistic as text, three significant digits (``-`` for none)."""
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def findings(a: Analysis) -> list[str]:
    """A few sentences that say where the naive loss comes from."""
    out = []
    weighted = [r for r in a.layers if r.weight is not None]
    gaps = [(r.weight.sqnr_per_channel - r.weight.sqnr_per_tensor, r) for r in weighted
            if math.isfinite(r.weight.sqnr_per_channel) and math.isfinite(r.weight.sqnr_per_tensor)]  # fmt: skip
    if gaps:
        gap, worst = max(gaps, key=lambda g: g[0])
        mean_gap = sum(g for g, _ in gaps) / len(gaps)
        wide = sum(1 for r in weighted if (r.weight.channel_ratio or 0) > 10)
        out.append(f"weights: {wide} of {len(weighted)} layers have a channel range ratio above 10x; per-tensor scales "
                   f"cost {mean_gap:.1f} dB of weight SQNR on average against per-channel, worst {worst.name} "
                   f"({worst.weight.sqnr_per_tensor:.1f} vs {worst.weight.sqnr_per_channel:.1f} dB, "
                   f"ratio {fmt_ratio(worst.weight.channel_ratio)})")  # fmt: skip
    peaked = [r for r in weighted if r.weight.kurtosis > 100 and math.isfinite(r.weight.sqnr_per_channel)]
    if peaked:
        mean_pc = sum(r.weight.sqnr_per_channel for r in peaked) / len(peaked)
        out.append(f"weights: {len(peaked)} layers have excess kurtosis above 100 (a few weights, e.g. the fused identity "
                   f"branch's centre taps, dwarf the rest of their channel); even per-channel scales give them only "
                   f"{mean_pc:.1f} dB on average: clipping weights (mse) or quantization-aware training targets that")  # fmt: skip
    tails = [r for r in a.layers if (r.activation.tail_ratio or 0) > 2]
    if tails:
        worst = max(tails, key=lambda r: r.activation.tail_ratio)
        out.append(f"activations: {len(tails)} of {len(a.layers)} quantizer inputs have max|x| above 2x their p99.99, "
                   f"so min/max ranges waste over a bit there; worst {worst.name} ({worst.activation.tail_ratio:.1f}x)")  # fmt: skip
    for r in a.layers:
        x = r.activation
        amax = max(-x.min, x.max)
        if x.clip is None or amax == 0:
            continue
        kept = max(-x.clip[0], x.clip[1]) / amax
        if r.chosen.drop - r.naive.drop >= 1.0 and kept < 0.9:
            out.append(f"clipping: {a.method} cuts {r.name}'s input to {100 * kept:.0f}% of max|x| ({fmt_num(max(-x.clip[0], x.clip[1]))}"
                       f" of {fmt_num(amax)}); alone that costs {r.chosen.drop:.1f} pt against {r.naive.drop:.1f} with "
                       f"min/max: try another method (minmax, percentile, mse) for this model")  # fmt: skip
    out.append(f"naive INT8: {100 * (a.naive_top1 - a.fp32_top1):+.1f} pt against FP32; alone, "
               f"{', '.join(f'{n} ({0.0 - a.row(n).naive.drop:+.1f} pt)' for n in a.most_sensitive('naive'))} cost the most")  # fmt: skip
    out.append(f"{a.method} with per-channel weights: {100 * (a.chosen_top1 - a.fp32_top1):+.1f} pt; most sensitive: "
               f"{', '.join(f'{n} ({0.0 - a.row(n).chosen.drop:+.1f} pt)' for n in a.most_sensitive('chosen'))}")  # fmt: skip
    return out


def analyze(
    plain: PlainNet,
    calib_set: TensorDataset,
    eval_set: TensorDataset,
    constraints: Constraints | str,
    config: CalibrationConfig | str = "mse",
    batch_size: int = 256,
    progress: bool = False,
    cache: Path | None | bool = None,
    device: str | torch.device | None = None,
) -> Analysis:
    """Weight, activation and sensitivity analysis of ``plain`` for ``constraints``: naive PTQ
    (per-tensor min/max weights, min/max activations) against ``config`` (or a method name).
    Statistics come from ``calib_set`` (:func:`~edgerepvgg.quant.calibrate.stats_for`: through the
    statistics cache unless ``cache=False``); accuracy from the labelled ``eval_set``. Runs the
    network ``2 * (layers + 2) + 3`` times over ``eval_set``: keep it to about a thousand images.
    ``constraints`` is a :class:`Constraints` or a constraint-set name. The statistics, FP32 and
    emulation passes run on ``device`` (default the CPU; on MPS the float64 emulation stays on
    the CPU)."""
    require_eval_set(eval_set)
    constraints = resolve_constraints(constraints)
    plain = plain.eval()
    dev = resolve_device(device)
    emu_dev = emulation_device(dev)
    emu_plain = placed(plain, emu_dev)
    stats = stats_for(plain, calib_set, progress=progress, cache=cache, device=dev)
    config = CalibrationConfig.of(config)
    naive = make_spec(plain, stats, constraints, NAIVE)
    chosen = make_spec(plain, stats, constraints, config)

    fp32_logits = predict(placed(plain, dev), eval_set, batch_size, dev)
    fp32_top1 = topk_accuracy(fp32_logits, eval_set.labels)
    names = quantizers(chosen)
    total = 2 * len(names)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sensitivity", disable=not progress, leave=False)
    sens: dict[str, dict[str, Sensitivity]] = {"naive": {}, "chosen": {}}
    for which, spec in (("naive", naive), ("chosen", chosen)):
        for name in names:
            (s,) = layer_sensitivity(emu_plain, spec, eval_set, [name], fp32_logits, batch_size, device=emu_dev)
            sens[which][name] = s
            bar.update(1)
    bar.close()

    modules = dict(zip(plain.layer_names(), [*plain.convs, plain.head]))
    rows = []
    for name in names:
        w = modules.get(name)
        rows.append(LayerAnalysis(
            name,
            weight_stats(w.weight, chosen.layer(name).weight.scheme, config.weight_method) if w is not None else None,
            activation_stats(stats, name, chosen.pool if name == "pool" else chosen.layer(name).input),
            sens["naive"][name], sens["chosen"][name],
        ))  # fmt: skip
    output = activation_stats(stats, "output", chosen.output)
    result = Analysis(
        model=plain.name, constraints=constraints.name, method=config.method, weight_method=config.weight_method,
        calibration={"source": stats.source, "images": stats.images, "fingerprint": stats.fingerprint,
                     **({"percentile": config.percentile} if config.method == "percentile" else {})},
        evaluation={"source": eval_set.source, "images": len(eval_set)},
        fp32_top1=fp32_top1,
        naive_top1=integer_top1(emu_plain, naive, eval_set, batch_size, emu_dev),
        chosen_top1=integer_top1(emu_plain, chosen, eval_set, batch_size, emu_dev),
        layers=rows, output=output, naive_spec=naive, spec=chosen,
    )  # fmt: skip
    result.findings = findings(result)
    return result


__all__ = [
    "Analysis", "ActivationStats", "LayerAnalysis", "Sensitivity", "WeightStats", "analyze", "channel_range_ratio",
    "channel_sqnr_db", "excess_kurtosis", "integer_top1", "layer_sensitivity", "outlier_share", "quantized_only",
    "quantizers", "rank", "require_eval_set", "sqnr_db", "weight_stats",
]  # fmt: skip
