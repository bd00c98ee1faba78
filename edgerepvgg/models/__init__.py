"""Model registry: one table of variants (``VARIANTS``) and one builder (``create_model``)."""

from __future__ import annotations

from edgerepvgg.errors import UserError
from edgerepvgg.models.blocks import BLOCKS, QARepVGGBlock, RepVGGBlock, block_class
from edgerepvgg.models.repvgg import VARIANTS, RepVGG, VariantConfig

__all__ = [
    "BLOCKS", "VARIANTS", "QARepVGGBlock", "RepVGG", "RepVGGBlock", "VariantConfig", "block_class", "create_model",
    "list_models", "resolve_variant",
]  # fmt: skip


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (with or without a ``repvgg_`` prefix)."""
    return list(VARIANTS)


def resolve_variant(name: str) -> VariantConfig:
    """Look a variant up by name, case-insensitively, accepting ``repvgg_a0``/``RepVGG-A0``."""
    key = name.strip().lower().replace("-", "_")
    for prefix in ("qarepvgg_", "repvgg_", "qarepvgg", "repvgg"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for variant, config in VARIANTS.items():
        if variant.lower() == key:
            return config
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")


def create_model(
    name: str = "A0",
    num_classes: int = 1000,
    in_chans: int = 3,
    block: str = "repvgg",
    deploy: bool = False,
) -> RepVGG:
    """Build a RepVGG variant by name. ``block="qarepvgg"`` selects the quantization-friendly block;
    ``deploy=True`` builds the fused form (one 3x3 conv per block) for loading deploy checkpoints.
    An unknown variant or block type is a ``UserError``."""
    return RepVGG(resolve_variant(name), num_classes=num_classes, in_chans=in_chans, block=block, deploy=deploy)
