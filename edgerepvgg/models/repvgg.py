"""The RepVGG network: a stem block and four stages of re-parameterizable blocks.

Module names follow the official release (``stage0``..``stage4``, ``linear``) so that its
checkpoints load without renaming; other layouts are mapped in :mod:`edgerepvgg.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgerepvgg.models.blocks import block_class

STAGE_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class VariantConfig:
    """One row of the variant table: depth, width and where grouped convs go."""

    name: str
    num_blocks: tuple[int, int, int, int]
    width_multiplier: tuple[float, float, float, float]
    groups: int = 1  # applied on the official layer indices 2, 4, ..., 26 (the stem is layer 0)

    @property
    def stem_width(self) -> int:
        return min(64, int(64 * self.width_multiplier[0]))

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(int(w * m) for w, m in zip(STAGE_WIDTHS, self.width_multiplier))

    def groups_at(self, layer_idx: int) -> int:
        return self.groups if self.groups > 1 and layer_idx % 2 == 0 and 2 <= layer_idx <= 26 else 1


def _table() -> dict[str, VariantConfig]:
    a, b = (2, 4, 14, 1), (4, 6, 16, 1)
    rows = [
        ("A0", a, (0.75, 0.75, 0.75, 2.5), 1),
        ("A1", a, (1, 1, 1, 2.5), 1),
        ("A2", a, (1.5, 1.5, 1.5, 2.75), 1),
        ("B0", b, (1, 1, 1, 2.5), 1),
        ("B1", b, (2, 2, 2, 4), 1),
        ("B1g2", b, (2, 2, 2, 4), 2),
        ("B1g4", b, (2, 2, 2, 4), 4),
        ("B2", b, (2.5, 2.5, 2.5, 5), 1),
        ("B2g4", b, (2.5, 2.5, 2.5, 5), 4),
        ("B3", b, (3, 3, 3, 5), 1),
        ("B3g4", b, (3, 3, 3, 5), 4),
    ]
    return {name: VariantConfig(name, blocks, widths, groups) for name, blocks, widths, groups in rows}


VARIANTS: dict[str, VariantConfig] = _table()


class RepVGG(nn.Module):
    """RepVGG / QARepVGG classifier. Fully convolutional up to the global pool: any input size."""

    def __init__(
        self,
        config: VariantConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        block: str = "repvgg",
        deploy: bool = False,
    ):
        super().__init__()
        make = block_class(block)  # a UserError for an unknown block type
        self.config, self.block_type = config, block
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stage0 = make(in_chans, config.stem_width, stride=2, deploy=deploy)
        cin, layer_idx = config.stem_width, 1
        for s, (depth, width) in enumerate(zip(config.num_blocks, config.stage_widths), start=1):
            blocks = []
            for i in range(depth):
                blocks.append(make(cin, width, stride=2 if i == 0 else 1, groups=config.groups_at(layer_idx), deploy=deploy))
                cin, layer_idx = width, layer_idx + 1
            setattr(self, f"stage{s}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    @property
    def num_features(self) -> int:
        return self.linear.in_features

    def blocks(self) -> list[nn.Module]:
        """Every re-parameterizable block in forward order (stem first)."""
        out = [self.stage0]
        for s in range(1, 5):
            out.extend(getattr(self, f"stage{s}"))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks():
            x = blk(x)
        return self.linear(torch.flatten(self.gap(x), 1))
