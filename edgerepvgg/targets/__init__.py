"""Backends behind one protocol, found by name.

The registry maps a name to ``module:class``; the module is imported only when the target is
asked for, so listing targets or importing edgerepvgg never loads a runtime.

Adding a target is one file and one registry line. The file ``targets/<name>.py`` holds a class
that satisfies :class:`edgerepvgg.targets.base.Target`: the declared attributes ``name``,
``constraint_set`` (a key of ``quant.spec.CONSTRAINT_SETS``), ``precisions``, ``description``,
``supports_fixed_batch`` and ``compiles_without_runtime``; ``available()`` (None, or why not in
one line); ``compile(plain, spec, out_dir, precision, *, batch=None)`` writing the artifact
atomically (``check_precision`` and ``check_batch`` give the standard refusals); ``load(artifact,
threads)`` returning a :class:`Runner` (numpy NCHW float32 in, float32 logits out, ``emulated``
declared); and ``metadata(artifact)`` reading the model hash and QuantSpec sha256 back from the
artifact. The line is ``"<name>": "edgerepvgg.targets.<name>:<Class>"`` in ``_REGISTRY``. The CLI,
``export``, ``compare`` and profiles pick it up from there, and ``tests/test_target_conformance.py``,
parametrized over :func:`target_names`, runs the whole contract on it (atomic writes, metadata,
FP32 equal to PlainNet, INT8 agreeing with IntegerNet, refusals) without a test being written.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgerepvgg.errors import UserError
from edgerepvgg.targets.base import (
    Artifact,
    ArtifactMetadata,
    FixedBatchRunner,
    Runner,
    Target,
    check_batch,
    check_precision,
    compile_with_batch,
)

__all__ = ["Artifact", "ArtifactMetadata", "FixedBatchRunner", "Runner", "Target", "TargetStatus", "cannot_export", "check_batch", "check_precision", "compile_with_batch", "get_target", "list_targets", "require_exportable", "target_names"]

_REGISTRY: dict[str, str] = {
    "onnxruntime": "edgerepvgg.targets.onnxruntime:OnnxRuntimeTarget",
    "openvino": "edgerepvgg.targets.openvino:OpenVINOTarget",
    "tensorrt": "edgerepvgg.targets.tensorrt:TensorRTTarget",
    "tflite": "edgerepvgg.targets.tflite:TFLiteTarget",
}


def target_names() -> list[str]:
    """Every registered target, whether or not its module exists or its runtime is installed."""
    return list(_REGISTRY)


def get_target(name: str, **settings) -> Target:
    """The target called ``name``, built with its device ``settings`` (e.g. TensorRT's
    ``version``); an unknown name is a one-line error listing the known ones."""
    try:
        module_name, cls_name = _REGISTRY[name].split(":")
    except KeyError:
        raise UserError(f"unknown target {name!r}; choose one of {', '.join(_REGISTRY)}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UserError(f"target {name!r} is not implemented in this version of edgerepvgg") from None
        raise
    return getattr(module, cls_name)(**settings)


def cannot_export(target: Target) -> str | None:
    """Why ``target`` can neither run nor compile here, or ``None``. A target whose runtime is
    missing may still compile (``compiles_without_runtime``: TensorRT writes its Q/DQ graph and
    build script, and its runner is the emulation)."""
    reason = target.available()
    return None if reason is None or target.compiles_without_runtime else reason


def require_exportable(target: Target) -> None:
    """Raise the one-line error for a target that cannot export here."""
    reason = cannot_export(target)
    if reason is not None:
        raise UserError(f"target {target.name!r} is not available here: {reason}")


@dataclass(frozen=True)
class TargetStatus:
    name: str
    description: str
    precisions: tuple[str, ...]
    constraint_set: str
    reason: str | None  # None: compiles and runs here

    @property
    def available(self) -> bool:
        return self.reason is None


def list_targets() -> list[TargetStatus]:
    """Every target with whether it runs here and, when not, why."""
    out = []
    for name in _REGISTRY:
        try:
            t = get_target(name)
        except UserError as exc:
            out.append(TargetStatus(name, "", (), "", str(exc)))
            continue
        out.append(TargetStatus(name, t.description, t.precisions, t.constraint_set, t.available()))
    return out
