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
    require_spec_for,
    resolve_constraints,
    with_float_layers,
)

__all__ = [
    "CONSTRAINT_SETS", "Constraints", "LayerQuant", "QuantSpec", "Scheme", "TensorQuant",
    "constraints_for", "load_spec", "model_hash", "qparams", "require_spec_for", "resolve_constraints",
    "with_float_layers",
]  # fmt: skip
