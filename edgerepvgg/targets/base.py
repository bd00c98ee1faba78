"""The Target protocol: one small interface per backend (after Polygraphy's runners).

A target compiles PlainNet (+ QuantSpec for INT8) to an artifact on disk and loads that artifact
as a runner: ``runner(batch) -> logits`` on NCHW float32 input normalized with the model's input
spec, whatever layout the backend uses inside. Heavy runtimes are imported inside the methods,
never at module import, so ``import edgerepvgg`` stays fast and a missing runtime is a message.
"""

from __future__ import annotations

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

