"""Export one PlainNet to one target and check it: compile, evaluate, time, report.

The accuracy check is defined once (DESIGN.md): on a labelled evaluation set, top-1 (and top-5
with at least 5 classes), the change in top-1 against the FP32 PyTorch model, and agreement
(top-1, cosine, SQNR) against the FP32 model and against the PyTorch INT8 emulation of the same
QuantSpec. The emulation comparison separates "quantization costs accuracy" from "this target
computes something else". ``compare`` runs the same steps for many targets.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import Agreement, Latency, agreement, measure_latency, predict, topk_accuracy
from edgerepvgg.io import write_text_atomic
from edgerepvgg.machine import machine_info
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.spec import QuantSpec, require_spec_for
from edgerepvgg.targets import Artifact, FixedBatchRunner, Runner, Target, compile_with_batch, get_target, require_exportable

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class References:
    """Logits every target is compared with, computed once per model, spec and evaluation set."""

    labels: torch.Tensor
    fp32: torch.Tensor
    emulation: torch.Tensor | None  # IntegerNet under the spec; None for float exports
    source: str

    @property
    def fp32_top1(self) -> float:
        return topk_accuracy(self.fp32, self.labels)


def references(plain: PlainNet, spec: QuantSpec | None, eval_set: TensorDataset, batch_size: int = 256,
               fp32: torch.Tensor | None = None) -> References:  # fmt: skip
    """FP32 PyTorch logits (``fp32`` if already computed on ``eval_set``) and, with a spec, the
    INT8 emulation's logits on ``eval_set``."""
    if not eval_set.labelled:
        raise UserError(f"the evaluation set {eval_set.source} has no labels; pass a labelled image folder (one subfolder per class)")
    plain = plain.eval()
    fp32 = predict(plain, eval_set, batch_size) if fp32 is None else fp32
    emu = predict(IntegerNet(plain, spec), eval_set, batch_size) if spec is not None else None
    return References(eval_set.labels, fp32, emu, eval_set.source)


@dataclass(frozen=True)
class Accuracy:
    """One target's accuracy on the evaluation set, and how it follows FP32 and the emulation."""

    images: int
    source: str
    top1: float
    top5: float | None
    fp32_top1: float
    vs_fp32: Agreement
    vs_emulation: Agreement | None

    @property
    def delta_top1(self) -> float:
        """Top-1 minus FP32 top-1, in points."""
        return 100 * (self.top1 - self.fp32_top1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vs_fp32"] = self.vs_fp32.to_dict()
        d["vs_emulation"] = self.vs_emulation.to_dict() if self.vs_emulation else None
        d["delta_top1_pts"] = self.delta_top1
        return d


def score(logits: torch.Tensor, refs: References) -> Accuracy:
    """Score one target's logits against the labels and the reference logits."""
    k = logits.shape[1]
    return Accuracy(
        images=int(logits.shape[0]), source=refs.source,
        top1=topk_accuracy(logits, refs.labels), top5=topk_accuracy(logits, refs.labels, 5) if k >= 5 else None,
        fp32_top1=refs.fp32_top1, vs_fp32=agreement(logits, refs.fp32),
        vs_emulation=agreement(logits, refs.emulation) if refs.emulation is not None else None,
    )  # fmt: skip


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` did and measured. ``emulated`` is True when no engine of the target ran
    here (TensorRT without a GPU): the accuracy is then the Q/DQ graph in ONNX Runtime under the
    target's constraint set, and there is no latency."""

    target: str
    precision: str
    artifact: dict
    accuracy: Accuracy | None
    latency: dict[str, Latency] = field(default_factory=dict)
    emulated: bool = False
    quant: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return "emulated" if self.emulated else "ok"

    def to_dict(self) -> dict:
        return {"target": self.target, "precision": self.precision, "status": self.status, "emulated": self.emulated,
                "artifact": self.artifact, "accuracy": self.accuracy.to_dict() if self.accuracy else None,
                "latency": {k: v.to_dict() for k, v in self.latency.items()}, "quant": self.quant,
                "notes": list(self.notes), "machine": machine_info()}  # fmt: skip


def _example_batch(plain: PlainNet, batch: int, eval_set: TensorDataset | None) -> np.ndarray:
    """Real images for timing where there are enough, else random input of the right shape."""
    if eval_set is not None and len(eval_set) >= batch:
        return next(iter(eval_set.batches(batch)))[0][:batch].numpy()
    return plain.example_input(batch).detach().cpu().float().numpy()


def time_runner(runner: Runner, plain: PlainNet, eval_set: TensorDataset | None, batches: tuple[int, ...] = (1, 16),
                runs: int = 50) -> dict[str, Latency]:  # fmt: skip
    """Latency at each batch size in ``batches`` (median/p90 of ``runs`` timed calls)."""
    out = {}
    for b in batches:
        name = f"batch{b}"
        if b < 1 or name in out:
            continue
        out[name] = measure_latency(runner, _example_batch(plain, b, eval_set), warmup=max(3, runs // 5), runs=runs)
        log.info("%s: p50 %.3f ms, p90 %.3f ms at batch %d", name, out[name].p50_ms, out[name].p90_ms, b)
    return out


def export(
    plain: PlainNet,
    target: str | Target,
    out_dir: str | Path,
    precision: str = "int8",
    spec: QuantSpec | None = None,
    eval_set: TensorDataset | None = None,
    refs: References | None = None,
    threads: int | None = None,
    latency: bool = True,
    throughput_batch: int = 16,
    runs: int = 50,
    fixed_batch: int | None = None,
) -> ExportReport:
    """Compile ``plain`` (with ``spec`` for INT8) for ``target`` into ``out_dir``, check its
    accuracy on ``eval_set`` (if given), time it, and write ``report.json`` beside the artifact.
    ``fixed_batch`` fixes the artifact's batch dimension; it is then checked and timed at that batch."""
    target = get_target(target) if isinstance(target, str) else target
    require_exportable(target)
    if precision == "int8" and spec is not None:
        require_spec_for(plain, spec)  # before anything is written
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass -o a folder for the artifact and report")
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact: Artifact = compile_with_batch(target, plain, spec if precision == "int8" else None, out_dir, precision, fixed_batch)
    runner = target.load(artifact, threads)
    if fixed_batch is not None:
        runner = FixedBatchRunner(runner, fixed_batch)
    emulated = bool(getattr(runner, "emulated", False))
    notes = list(artifact.info.get("notes", ()))
    if emulated:
        notes.append(f"no {target.name} engine ran here ({target.available()}); accuracy is the Q/DQ graph in ONNX Runtime "
                     f"under the {target.constraint_set} constraint set (emulated), and there is no latency")  # fmt: skip
    accuracy = None
    if eval_set is not None:
        use_spec = spec if precision == "int8" else None
        if refs is None:
            refs = references(plain, use_spec, eval_set)
        log.info("evaluating %s %s on %d images of %s", target.name, precision, len(eval_set), eval_set.source)
        accuracy = score(predict(runner, eval_set), refs)
    timings = {}
    if latency and not emulated:
        batches = (fixed_batch,) if fixed_batch is not None else (1, throughput_batch)
        timings = time_runner(runner, plain, eval_set, batches, runs)
    quant = {}
    if precision == "int8" and spec is not None:
        quant = {"constraints": spec.constraints.name, "spec_sha256": spec.sha256, "calibration": spec.calibration,
                 "float_layers": [layer.name for layer in spec.layers if layer.precision == "float"]}  # fmt: skip
    report = ExportReport(target.name, precision, artifact.to_dict(), accuracy, timings, emulated, quant, tuple(notes))
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=1) + "\n")
    return report

