"""The Target and Runner protocols: one small, explicit interface per backend (after Polygraphy's
runners, whose every override point is declared in a base class).

A target compiles PlainNet (+ QuantSpec for INT8) to an artifact on disk and loads that artifact
as a runner: ``runner(batch) -> logits`` on NCHW float32 input normalized with the model's input
spec, whatever layout the backend uses inside. Every capability is a declared attribute, so a type
checker and the registry-wide conformance test (``tests/test_target_conformance.py``) can see it:
``supports_fixed_batch``, ``compiles_without_runtime`` on the target, ``emulated`` on the runner.
Heavy runtimes are imported inside the methods, never at module import, so ``import edgerepvgg``
stays fast and a missing runtime is a message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgerepvgg.errors import UserError
from edgerepvgg.inputs import InputSpec
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.spec import QuantSpec


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact: NCHW float32 (normalized) numpy in, float32 numpy logits (N, classes)
    out. ``emulated`` is False for a real runtime and True where the target's own runtime is
    absent and something else computes what it would (TensorRT's Q/DQ graph in ONNX Runtime), so
    that no report passes an emulation off as a measurement."""

    emulated: bool

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


@dataclass(frozen=True)
class ArtifactMetadata:
    """What every artifact carries about where it came from, read back from the artifact itself:
    the hash of the PlainNet it computes (``quant.spec.model_hash``), the sha256 of the QuantSpec
    its integers come from (None for a float artifact), that spec's constraint set, and the input
    spec a caller must preprocess with."""

    model_hash: str
    spec_sha256: str | None
    constraints: str | None
    input_spec: InputSpec

    @classmethod
    def from_props(cls, props: dict[str, str], where: object) -> ArtifactMetadata:
        """From the ``edgerepvgg.*`` key/value pairs of an ONNX graph (or an IR's copy of them)."""
        if "edgerepvgg.model_hash" not in props:
            raise UserError(f"{where} has no edgerepvgg metadata; it was not written by edgerepvgg")
        return cls(props["edgerepvgg.model_hash"], props.get("edgerepvgg.quant_spec_sha256"),
                   props.get("edgerepvgg.constraints"), InputSpec.from_dict(json.loads(props["edgerepvgg.input_spec"])))  # fmt: skip


class Target(Protocol):
    """A backend. ``constraint_set`` names the integer scheme its INT8 artifacts are calibrated
    for (see ``edgerepvgg.quant.spec.CONSTRAINT_SETS``).

    Declared capabilities: ``supports_fixed_batch`` (``compile(batch=n)`` fixes the batch
    dimension; a target without it refuses ``batch`` with a one-line UserError) and
    ``compiles_without_runtime`` (the artifact can be written where the runtime is absent, e.g.
    TensorRT without a GPU; ``load`` then returns a runner marked ``emulated``)."""

    name: str
    constraint_set: str
    precisions: tuple[str, ...]
    description: str
    supports_fixed_batch: bool
    compiles_without_runtime: bool

    def available(self) -> str | None:
        """``None`` when the target can compile *and* run here, else the reason in one line."""
        ...

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32", *,
                batch: int | None = None) -> Artifact:  # fmt: skip
        """Write the artifact for ``plain`` into ``out_dir`` atomically (the entry point ``path``
        appears last, complete); INT8 needs ``spec``; ``batch`` fixes the batch dimension."""
        ...

    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        """A runner for ``artifact`` on this machine, with ``threads`` intra-op threads."""
        ...

    def metadata(self, artifact: Artifact) -> ArtifactMetadata:
        """The model hash and QuantSpec sha256 embedded in ``artifact``'s files, read back."""
        ...


def check_precision(target: Target, precision: str, spec: QuantSpec | None) -> None:
    """Refuse a precision the target cannot build, and INT8 without a spec (one-line errors)."""
    if precision not in target.precisions:
        raise UserError(f"target {target.name!r} builds {', '.join(target.precisions)}, not {precision!r}")
    if precision == "int8" and spec is None:
        raise UserError(f"an INT8 {target.name} build needs a QuantSpec; calibrate first (--images DIR) or pass --spec FILE")


def check_batch(target: Target, batch: int | None) -> None:
    """Refuse a fixed batch the target cannot build, or one below 1 (one-line errors)."""
    if batch is None:
        return
    if not target.supports_fixed_batch:
        raise UserError(f"target {target.name!r} cannot fix the batch dimension (its runner adapts to any batch); drop --fixed-batch")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"a fixed batch must be an integer of at least 1, got {batch!r}")


class FixedBatchRunner:
    """Runs any number of images through a runner whose artifact takes exactly ``batch`` images:
    chunks of ``batch``, the last one padded with zeros and its padding dropped from the output.
    ``emulated`` is the wrapped runner's; a bare function (not a declared Runner) is not emulated."""

    def __init__(self, runner: Runner | Callable[[np.ndarray], np.ndarray], batch: int):
        self.runner, self.batch = runner, batch
        self.emulated: bool = runner.emulated if isinstance(runner, Runner) else False

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
    """``target.compile`` with the batch dimension fixed to ``fixed_batch`` (None: dynamic); the
    target refuses a batch it cannot fix."""
    check_batch(target, fixed_batch)
    return target.compile(plain, spec, out_dir, precision, batch=fixed_batch)
