"""Post-training calibration: activation statistics from sample images, then a QuantSpec.

The statistics (one growable histogram per activation point) are collected in one FP32 pass and
cached on disk keyed by the model's hash and the images' fingerprint, so trying another method or
constraint set never runs the model again. Same model + same images + same options -> the same
JSON, byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.inputs import InputSpec
from edgerepvgg.io import write_text_atomic
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.observers import RANGE_METHODS, WEIGHT_METHODS, Histogram, activation_range, weight_scales
from edgerepvgg.quant.spec import Constraints, LayerQuant, QuantSpec, TensorQuant, model_hash, qparams, resolve_constraints
from edgerepvgg.torch_device import full_fp32, placed, resolve_device

log = logging.getLogger(__name__)

PERCENTILE_MIN = 50.0  # exclusive: below the median "percentile" would clip most of the data away


@dataclass(frozen=True)
class CalibrationConfig:
    """How statistics become scales (after torchao: a small frozen config, applied by one
    function): the activation range ``method`` (``percentile`` uses ``percentile``), the
    per-channel weight range method, and ``per_tensor_weights`` (every channel of a layer gets the
    layer's largest scale: naive PTQ, kept to show what per-channel buys)."""

    method: str = "mse"
    weight_method: str = "minmax"
    percentile: float = 99.99
    per_tensor_weights: bool = False

    def __post_init__(self) -> None:
        if self.method not in RANGE_METHODS:
            raise UserError(f"unknown calibration method {self.method!r}; choose one of {', '.join(RANGE_METHODS)}")
        if self.weight_method not in WEIGHT_METHODS:
            raise UserError(f"unknown weight method {self.weight_method!r}; choose one of {', '.join(WEIGHT_METHODS)}")
        if not (isinstance(self.percentile, (int, float)) and PERCENTILE_MIN < self.percentile <= 100):
            raise UserError(f"--percentile must be in ({PERCENTILE_MIN:g}, 100], got {self.percentile!r}")

    @classmethod
    def of(cls, config: "CalibrationConfig | str") -> "CalibrationConfig":
        """A config, or a method name as shorthand for the default config with that method."""
        return config if isinstance(config, CalibrationConfig) else cls(method=config)

    def record(self) -> dict:
        """What a QuantSpec's provenance keeps of this config."""
        d = {"method": self.method, "weight_method": self.weight_method}
        if self.method == "percentile":
            d["percentile"] = self.percentile
        if self.per_tensor_weights:
            d["per_tensor_weights"] = True
        return d


NAIVE = CalibrationConfig("minmax", "minmax", per_tensor_weights=True)  # per-tensor min/max weights and activations


def fingerprint(dataset: TensorDataset) -> str:
    """The images' own fingerprint (tensors in memory are hashed; streamed files by their bytes,
    without decoding): identical images, identical statistics."""
    return dataset.fingerprint()


@dataclass
class CalibrationStats:
    """Per-activation-point histograms of one model over one image set."""

    model_hash: str
    fingerprint: str
    images: int
    source: str
    histograms: dict[str, Histogram]

    def to_json(self) -> str:
        return json.dumps({"model_hash": self.model_hash, "fingerprint": self.fingerprint, "images": self.images,
                           "source": self.source, "histograms": {k: h.to_dict() for k, h in self.histograms.items()}},
                          sort_keys=True)  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> "CalibrationStats":
        d = json.loads(text)
        hists = {k: Histogram.from_dict(v) for k, v in d["histograms"].items()}
        return cls(d["model_hash"], d["fingerprint"], d["images"], d["source"], hists)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgerepvgg" / "calibration"


@torch.no_grad()
def collect_stats(plain: PlainNet, dataset: TensorDataset, batch_size: int = 64, progress: bool = True,
                  device: str | torch.device | None = None, keys: tuple[str, str] | None = None) -> CalibrationStats:  # fmt: skip
    """Run the FP32 PlainNet over the images once (on ``device``; default the CPU), histogramming
    every activation point. ``keys``: the model's hash and the images' fingerprint when the caller
    has them already (hashing RepVGG-B3's weights takes about a second: once per calibration is enough)."""
    from tqdm import tqdm

    if len(dataset) == 0:
        raise UserError(f"no calibration images in {dataset.source}; pass --images DIR with a few hundred images")
    model_key, images_key = keys or (model_hash(plain), fingerprint(dataset))
    hists = {name: Histogram() for name in plain.activation_points()}
    plain = plain.eval()
    dev = resolve_device(device)
    net = placed(plain, dev)
    total = (len(dataset) + batch_size - 1) // batch_size
    with full_fp32(dev):
        for x, _ in tqdm(dataset.batches(batch_size), total=total, desc="calibrating", disable=not progress, leave=False):
            net(x.to(dev), observe=lambda name, t: hists[name].update(t))
    return CalibrationStats(model_key, images_key, len(dataset), dataset.source, hists)


def cached_stats(plain: PlainNet, dataset: TensorDataset, batch_size: int = 64, progress: bool = True,
                 cache: Path | None = None, device: str | torch.device | None = None) -> CalibrationStats:  # fmt: skip
    """``collect_stats`` through an on-disk cache (``cache=None``: the user cache directory)."""
    model_key, images_key = model_hash(plain), fingerprint(dataset)
    path = (cache or cache_dir()) / f"{model_key}-{images_key}.json"
    if path.is_file():
        try:
            stats = CalibrationStats.from_json(path.read_text())
            log.info("reusing calibration statistics from %s", path)
            return stats
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring damaged statistics cache %s (%s)", path, exc)
    stats = collect_stats(plain, dataset, batch_size, progress, device, keys=(model_key, images_key))
    try:
        write_text_atomic(path, stats.to_json())
    except OSError as exc:  # a read-only home must not stop calibration
        log.warning("could not cache calibration statistics at %s (%s)", path, exc)
    return stats


def stats_for(plain: PlainNet, dataset: TensorDataset, batch_size: int = 64, progress: bool = True,
              cache: Path | None | bool = None, device: str | torch.device | None = None) -> CalibrationStats:  # fmt: skip
    """The activation statistics of ``plain`` over ``dataset``: through the on-disk cache
    (``cache=None``: the user cache directory; a Path: that folder), or collected afresh
    (``cache=False``), on ``device``. The one place that decides, for calibration and analysis alike."""
    if cache is False:
        return collect_stats(plain, dataset, batch_size, progress, device)
    return cached_stats(plain, dataset, batch_size, progress, cache or None, device)


def input_range(input_spec: InputSpec) -> tuple[float, float]:
    """The exact range of normalized pixels: ``(0 - mean) / std`` to ``(1 - mean) / std`` over the
    channels. A calibrator would only estimate it (entropy clips bright pixels: measured 6 pt of
    top-1 on the bundled model's first layer); on an affine 8-bit grid with one channel the grid
    step is exactly one pixel level."""
    lows = [(0.0 - m) / s for m, s in zip(input_spec.mean, input_spec.std)]
    highs = [(1.0 - m) / s for m, s in zip(input_spec.mean, input_spec.std)]
    return min(lows), max(highs)


def _tensor_quant(lo: float, hi: float, scheme) -> TensorQuant:
    scale, zp = qparams(lo, hi, scheme)
    return TensorQuant(scheme, (scale,), (zp,))


def make_spec(plain: PlainNet, stats: CalibrationStats, constraints: Constraints, config: CalibrationConfig | str = "mse") -> QuantSpec:
    """Turn statistics into a QuantSpec for ``constraints`` under ``config`` (or a method name)."""
    config = CalibrationConfig.of(config)
    if stats.model_hash != model_hash(plain):
        raise UserError("these calibration statistics were collected on another model; recalibrate")
    act = constraints.activation
    # Each point's range is searched on its own histogram (independent, pure numpy, which frees the
    # GIL in its loops): one thread per core. RepVGG-B3's 31 MSE searches: see benchmarks/results/scale.md.
    points = [*plain.layer_names()[1:], "pool", *(["output"] if constraints.int_output else [])]
    search = lambda point: activation_range(stats.histograms[point], config.method, act, config.percentile)  # noqa: E731
    with ThreadPoolExecutor(max_workers=max(1, min(len(points), torch.get_num_threads()))) as pool:
        ranges = dict(zip(points, pool.map(search, points)))
    ranges["convs.0"] = input_range(plain.input_spec)  # the network input: normalized 8-bit pixels, whose range is known

    def act_quant(point: str) -> TensorQuant:
        return _tensor_quant(*ranges[point], act)

    layers = []
    for i, (name, module) in enumerate(zip(plain.layer_names(), [*plain.convs, plain.head])):
        grid = constraints.layer_weight(i)  # the first conv may be narrower (CPUs without VNNI)
        scales = weight_scales(module.weight.detach(), grid, config.weight_method)
        if config.per_tensor_weights:
            scales = torch.full_like(scales, float(scales.max()))
        weight = TensorQuant(grid, tuple(float(s) for s in scales), (0,) * len(scales))
        layers.append(LayerQuant(name, act_quant(name), weight))
    output = act_quant("output") if constraints.int_output else None
    calibration = {**config.record(), "images": stats.images, "source": stats.source, "fingerprint": stats.fingerprint,
                   "input_spec": plain.input_spec.to_dict()}  # fmt: skip
    return QuantSpec(constraints, tuple(layers), act_quant("pool"), output, stats.model_hash, calibration)


def calibrate(
    plain: PlainNet,
    dataset: TensorDataset,
    constraints: Constraints | str,
    config: CalibrationConfig | str = "mse",
    batch_size: int = 64,
    progress: bool = True,
    cache: Path | None | bool = None,
    device: str | torch.device | None = None,
) -> QuantSpec:
    """Calibrate ``plain`` on ``dataset`` for ``constraints`` (a :class:`Constraints`, or a
    constraint-set name resolved by :func:`~edgerepvgg.quant.spec.constraints_for`) under
    ``config`` (or a method name); ``cache=False`` disables the statistics cache; the statistics
    pass runs on ``device`` (default the CPU)."""
    constraints = resolve_constraints(constraints)
    config = CalibrationConfig.of(config)
    return make_spec(plain, stats_for(plain, dataset, batch_size, progress, cache, device), constraints, config)


def save_spec(spec: QuantSpec, path: str | Path) -> Path:
    return write_text_atomic(path, spec.to_json() + "\n")
