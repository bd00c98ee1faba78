"""Quantization: QuantSpec (the single source of truth), calibration, integer emulation."""

from edgerepvgg.quant.spec import (
    CONSTRAINT_SETS,
    Constraints,
    LayerQuant,
    QuantSpec,
    Scheme,
    TensorQuant,
    constraints_for,
    load_spec,
    model_hash,
    qparams,
)

__all__ = [
    "CONSTRAINT_SETS", "Constraints", "LayerQuant", "QuantSpec", "Scheme", "TensorQuant",
    "constraints_for", "load_spec", "model_hash", "qparams",
]  # fmt: skip
