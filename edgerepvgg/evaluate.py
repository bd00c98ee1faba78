"""Accuracy metrics over the shared data contract (``TensorDataset.batches``), agreement between
two sets of logits, and latency statistics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from edgerepvgg.data import TensorDataset
from edgerepvgg.torch_device import full_fp32

if TYPE_CHECKING:
    from edgerepvgg.targets.base import Runner


@torch.no_grad()
def predict(fn: torch.nn.Module | Runner | Callable[[torch.Tensor], torch.Tensor], dataset: TensorDataset,
            batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:  # fmt: skip
    """Run ``fn`` over the data set; return all logits (N, K), on the CPU. A target runner
    (anything that satisfies ``targets.Runner``: it declares ``emulated``) gets numpy batches, as
    its protocol says; a module, or any other function, gets torch tensors, moved to ``device``
    where one is given (``fn`` must already be there)."""
    from edgerepvgg.targets.base import Runner  # evaluate sits below targets (quant uses it)

    as_numpy = not isinstance(fn, torch.nn.Module) and isinstance(fn, Runner)
    move = (lambda x: x) if device is None or as_numpy else (lambda x: x.to(device, non_blocking=True))  # noqa: E731
    with full_fp32(device):
        outs = [torch.as_tensor(fn(x.numpy() if as_numpy else move(x))).float().cpu() for x, _ in dataset.batches(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the ``k`` highest logits (ties broken by index)."""
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels.reshape(-1, 1)).any(dim=1).double().mean())


@dataclass(frozen=True)
class Agreement:
    """How closely one set of logits follows a reference (comparisons as data, after Polygraphy):
    top-1 agreement, cosine similarity and SQNR (dB) of the logits, largest absolute difference."""

    top1: float
    cosine: float
    sqnr_db: float
    max_abs: float

    def to_dict(self) -> dict:
        """JSON-ready: an infinite SQNR (identical logits) becomes ``None``."""
        return {**asdict(self), "sqnr_db": self.sqnr_db if math.isfinite(self.sqnr_db) else None}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = float(((ref - approx) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """Compare ``logits`` with ``reference`` (same rows, same classes)."""
    if logits.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(logits.shape)} vs {tuple(reference.shape)}")
    a, r = logits.double(), reference.double()
    top1 = float((a.argmax(1) == r.argmax(1)).double().mean())
    cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), r.flatten(), dim=0))
    return Agreement(top1, cosine, sqnr_db(r, a), float((a - r).abs().max()))


@dataclass(frozen=True)
class Latency:
    """Wall-clock per call in milliseconds over ``runs`` timed calls after ``warmup`` untimed ones."""

    batch: int
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch / (self.p50_ms / 1000)

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput_ips": self.throughput}


def measure_latency(fn: Callable, batch: np.ndarray, warmup: int = 10, runs: int = 50, max_seconds: float = 30.0) -> Latency:
    """Time ``fn(batch)``: ``warmup`` calls, then up to ``runs`` timed calls (fewer, at least 5, if
    they would exceed ``max_seconds``). Median and p90, not the mean, are the figures to quote."""
    for _ in range(warmup):
        fn(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < 5 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn(batch)
        times.append((time.perf_counter() - t0) * 1000)
    t = np.asarray(times)
    return Latency(int(batch.shape[0]), len(times), warmup, float(np.median(t)), float(np.percentile(t, 90)),
                   float(t.mean()), float(t.min()))  # fmt: skip
