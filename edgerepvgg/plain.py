"""PlainNet: the fused network every later stage (quantization, targets, reports) reads.

Only 3x3 convs with bias, each followed by ReLU, then a global average pool and one Linear. It
carries its input spec (size, channels, mean/std, class names) so that no later stage has to ask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgerepvgg.inputs import InputSpec, hw


Observe = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class ConvInfo:
    """Shape of one plain layer, for reports and exporters."""

    name: str
    in_channels: int
    out_channels: int
    stride: int
    groups: int


class PlainNet(nn.Module):
    """``ReLU(conv_i(x))`` for every 3x3 conv, global average pool, ``head``."""

    def __init__(self, convs: list[nn.Conv2d], head: nn.Linear, input_spec: InputSpec, name: str | None = None, *,
                 variant: str | None = None, block: str | None = None):  # fmt: skip
        """``variant`` (e.g. ``"A0"``) and ``block`` (``"repvgg"`` or ``"qarepvgg"``) say which RepVGG
        this net was fused from (``None`` for a hand-built net); ``name`` defaults to the one they
        imply (``repvgg_a0``, ``qarepvgg_b1g4``), else ``"plain"``."""
        super().__init__()
        for conv in convs:
            if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.bias is None or conv.dilation != (1, 1):
                raise ValueError(f"PlainNet takes only 3x3 convs with padding 1 and a bias, got {conv}")
        self.convs = nn.ModuleList(convs)
        self.head = head
        self.input_spec = input_spec
        self.variant, self.block = variant, block
        self.name = name if name is not None else plain_name(variant, block)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def identity(self) -> dict:
        """The keyword arguments that carry this net's identity to a copy: ``PlainNet(convs, head,
        input_spec, **plain.identity())``."""
        return {"name": self.name, "variant": self.variant, "block": self.block}

    def layer_names(self) -> list[str]:
        """The quantized layers, in network order: ``["convs.0", ..., "convs.{n-1}", "head"]``
        (the names a QuantSpec's layers carry)."""
        return [f"convs.{i}" for i in range(len(self.convs))] + ["head"]

    def layers(self) -> list[ConvInfo]:
        return [ConvInfo(f"convs.{i}", c.in_channels, c.out_channels, c.stride[0], c.groups) for i, c in enumerate(self.convs)]

    def forward(self, x: torch.Tensor, observe: Observe | None = None) -> torch.Tensor:
        """Logits. ``observe(point, tensor)`` sees every activation point a quantizer sits on:
        ``convs.i`` (input of conv i), ``pool`` (last ReLU output), ``head`` (pooled features)
        and ``output`` (logits); calibration reads them through it."""
        for i, conv in enumerate(self.convs):
            if observe:
                observe(f"convs.{i}", x)
            x = torch.relu(conv(x))
        if observe:
            observe("pool", x)
        x = x.mean(dim=(2, 3))
        if observe:
            observe("head", x)
        y = self.head(x)
        if observe:
            observe("output", y)
        return y

    def activation_points(self) -> list[str]:
        return [f"convs.{i}" for i in range(len(self.convs))] + ["pool", "head", "output"]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        w = self.head.weight
        return torch.randn(batch, *self.input_spec.shape, dtype=w.dtype, device=w.device)


def plain_name(variant: str | None, block: str | None) -> str:
    """``repvgg_a0`` / ``qarepvgg_b1g4`` for a net fused from a known variant, else ``plain``."""
    if variant is None:
        return "plain"
    return f"{'qa' if block == 'qarepvgg' else ''}repvgg_{variant.lower()}"


def conv_output_size(size: int, stride: int) -> int:
    """Spatial size after a 3x3 conv with padding 1."""
    return (size - 1) // stride + 1


def count_macs(plain: PlainNet, size: int | tuple[int, int] | None = None) -> list[tuple[str, int | tuple[int, int], int]]:
    """Multiply-accumulates per layer at input ``size`` (N or (height, width); default: the input
    spec's): ``[(layer name, output size (N, or (height, width) when not square), MACs), ...]``
    ending with the head."""
    h, w = hw(size) if size is not None else plain.input_spec.hw
    rows = []
    for info, conv in zip(plain.layers(), plain.convs):
        h, w = conv_output_size(h, info.stride), conv_output_size(w, info.stride)
        rows.append((info.name, h if h == w else (h, w), h * w * info.out_channels * (info.in_channels // info.groups) * 9))
    rows.append(("head", 1, plain.head.in_features * plain.head.out_features))
    return rows
