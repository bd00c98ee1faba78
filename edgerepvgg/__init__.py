"""edgerepvgg: RepVGG from a training checkpoint to INT8 engines on edge targets.

Data flows one way: checkpoint -> PlainNet (fuse) -> QuantSpec (calibrate, qat) -> target
artifact (export) -> report (compare). The verbs and the objects they pass are importable from
here; the modules that implement them are ``_``-prefixed where a verb has the same name, so
``edgerepvgg.fuse`` is always the function. Names load on first use, so ``import edgerepvgg``
stays fast and imports no runtime::

    import edgerepvgg as er
    report = er.export("repvgg-a0-fmnist", "tensorrt", precision="int8")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "load_checkpoint": "edgerepvgg.checkpoints", "load_model": "edgerepvgg.checkpoints",
    "save_checkpoint": "edgerepvgg.checkpoints", "ModelMeta": "edgerepvgg.checkpoints",
    "create_model": "edgerepvgg.models", "list_models": "edgerepvgg.models",
    "fuse": "edgerepvgg._fuse", "reparameterize": "edgerepvgg._fuse",
    "PlainNet": "edgerepvgg.plain", "InputSpec": "edgerepvgg.inputs", "UserError": "edgerepvgg.errors",
    "calibrate": "edgerepvgg.quant.calibrate", "CalibrationConfig": "edgerepvgg.quant.calibrate",
    "QuantSpec": "edgerepvgg.quant.spec", "load_spec": "edgerepvgg.quant.spec", "constraints_for": "edgerepvgg.quant.spec",
    "IntegerNet": "edgerepvgg.quant.emulate", "qat": "edgerepvgg.quant.qat", "QATConfig": "edgerepvgg.quant.qat",
    "export": "edgerepvgg._export", "ExportOptions": "edgerepvgg._export", "ExportReport": "edgerepvgg._export",
    "compare": "edgerepvgg._compare", "Comparison": "edgerepvgg._compare",
    "calibration_images": "edgerepvgg.data", "evaluation_set": "edgerepvgg.data", "load_images": "edgerepvgg.data",
    "get_target": "edgerepvgg.targets", "list_targets": "edgerepvgg.targets",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'edgerepvgg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from edgerepvgg._compare import Comparison, compare
    from edgerepvgg._export import ExportOptions, ExportReport, export
    from edgerepvgg._fuse import fuse, reparameterize
    from edgerepvgg.checkpoints import ModelMeta, load_checkpoint, load_model, save_checkpoint
    from edgerepvgg.data import calibration_images, evaluation_set, load_images
    from edgerepvgg.errors import UserError
    from edgerepvgg.inputs import InputSpec
    from edgerepvgg.models import create_model, list_models
    from edgerepvgg.plain import PlainNet
    from edgerepvgg.quant.calibrate import CalibrationConfig, calibrate
    from edgerepvgg.quant.emulate import IntegerNet
    from edgerepvgg.quant.qat import QATConfig, qat
    from edgerepvgg.quant.spec import QuantSpec, constraints_for, load_spec
    from edgerepvgg.targets import get_target, list_targets
