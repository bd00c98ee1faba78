"""The Target protocol: one small interface per backend (after Polygraphy's runners).

A target compiles PlainNet (+ QuantSpec for INT8) to an artifact on disk and loads that artifact
as a runner: ``runner(batch) -> logits`` on NCHW float32 input normalized with the model's input
spec, whatever layout the backend uses inside. Heavy runtimes are imported inside the methods,
never at module import, so ``import edgerepvgg`` stays fast and a missing runtime is a message.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgerepvgg.errors import UserError
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.spec import QuantSpec


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact: NCHW float32 (normalized) in, float32 logits (N, classes) out."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Artifact:
    """What ``compile`` wrote: the file a runner loads (``path``), the files a deployment needs
    (``files``, whose total is the reported size; intermediates such as the ONNX an IR came from
    are named in ``info``), and facts for the report (``info``: e.g. the number of convolutions
    that really run in INT8, a ready build command, why nothing was built)."""

    target: str
    precision: str  # "fp32" | "fp16" | "int8"
    path: Path
    files: tuple[Path, ...]
    info: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.exists())

    def to_dict(self) -> dict:
        return {"target": self.target, "precision": self.precision, "path": str(self.path),
                "files": [str(f) for f in self.files], "size_bytes": self.size_bytes, "info": self.info}  # fmt: skip


class Target(Protocol):
    """A backend. ``constraint_set`` names the integer scheme its INT8 artifacts are calibrated
    for (see ``edgerepvgg.quant.spec.CONSTRAINT_SETS``). A target may set
    ``compiles_without_runtime = True`` when it can write its artifact where its runtime is
    absent (TensorRT without a GPU); its ``load`` then returns an emulation marked ``emulated``."""

    name: str
    constraint_set: str
    precisions: tuple[str, ...]
    description: str

    def available(self) -> str | None:
        """``None`` when the target can compile *and* run here, else the reason in one line."""
        ...

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32") -> Artifact:
        """Write the artifact for ``plain`` into ``out_dir`` (atomically); INT8 needs ``spec``."""
        ...

    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        """A runner for ``artifact`` on this machine, with ``threads`` intra-op threads."""
        ...


def check_precision(target: Target, precision: str, spec: QuantSpec | None) -> None:
    """Refuse a precision the target cannot build, and INT8 without a spec (one-line errors)."""
    if precision not in target.precisions:
        raise UserError(f"target {target.name!r} builds {', '.join(target.precisions)}, not {precision!r}")
    if precision == "int8" and spec is None:
        raise UserError(f"an INT8 {target.name} build needs a QuantSpec; calibrate first (--images DIR) or pass --spec FILE")



class FixedBatchRunner:
    """Runs any number of images through a runner whose artifact takes exactly ``batch`` images:
    chunks of ``batch``, the last one padded with zeros and its padding dropped from the output."""

    def __init__(self, runner: Runner, batch: int):
        self.runner, self.batch = runner, batch
        self.emulated = getattr(runner, "emulated", False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        outs = []
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i : i + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(self.runner(chunk)[:n])
        return np.concatenate(outs)


def compile_with_batch(target: Target, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str,
                       fixed_batch: int | None) -> Artifact:  # fmt: skip
    """``target.compile``, with the batch dimension fixed where asked and the target can fix it."""
    if fixed_batch is None:
        return target.compile(plain, spec, out_dir, precision)
    if fixed_batch < 1:
        raise UserError(f"a fixed batch must be at least 1, got {fixed_batch}")
    param = inspect.signature(target.compile).parameters.get("batch")
    if param is None:
        raise UserError(f"target {target.name!r} cannot fix the batch dimension (its runner adapts to any batch); drop --fixed-batch")
    batch = (fixed_batch,) * 3 if isinstance(param.default, tuple) else fixed_batch  # TensorRT: a (min, opt, max) profile
    return target.compile(plain, spec, out_dir, precision, batch=batch)
