"""Tiny PlainNets and hand-made QuantSpecs (min/max ranges computed here, not by the observers)."""

from __future__ import annotations

import copy
import functools

import torch

from edgerepvgg import InputSpec, create_model, fuse
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant import Constraints, LayerQuant, QuantSpec, TensorQuant, model_hash, qparams

from conftest import randomize_bn


def tiny_plain(seed: int = 0, size: int = 16, classes: int = 5) -> PlainNet:
    """A fused A0 (1 channel, ``classes`` outputs); a fresh copy each call, built once."""
    return copy.deepcopy(_tiny_plain(seed, size, classes))


@functools.cache
def _tiny_plain(seed: int, size: int, classes: int) -> PlainNet:
    torch.manual_seed(seed)
    model = randomize_bn(create_model("A0", num_classes=classes, in_chans=1), seed).eval()
    plain, _ = fuse(model, InputSpec(size=size, resize=size, channels=1, mean=(0.5,), std=(0.5,)))
    return plain


@torch.no_grad()
def minmax_spec(plain: PlainNet, c: Constraints, x: torch.Tensor | None = None) -> QuantSpec:
    """Per-tensor min/max activation ranges on ``x``, per-channel max|w| weight scales."""
    if x is None:
        x = plain.example_input(8)
    ranges: dict[str, tuple[float, float]] = {}
    plain(x, observe=lambda n, t: ranges.__setitem__(n, (float(t.min()), float(t.max()))))

    def act(point: str) -> TensorQuant:
        s, z = qparams(*ranges[point], c.activation)
        return TensorQuant(c.activation, (s,), (z,))

    layers = []
    for i, (name, m) in enumerate(zip(plain.layer_names(), [*plain.convs, plain.head])):
        grid = c.layer_weight(i)
        wmax = m.weight.detach().abs().flatten(1).max(1).values.clamp_min(1e-8)
        scales = tuple(float(v) / grid.qmax for v in wmax)
        layers.append(LayerQuant(name, act(name), TensorQuant(grid, scales, (0,) * len(scales))))
    out = act("output") if c.int_output else None
    return QuantSpec(c, tuple(layers), act("pool"), out, model_hash(plain), {"method": "test-minmax"})


def self_labelled(plain: PlainNet, n: int = 64, seed: int = 3):
    """``n`` random images labelled by ``plain``'s own predictions (its FP32 top-1 is 100%)."""
    from edgerepvgg.data import TensorDataset

    gen = torch.Generator().manual_seed(seed)
    s = plain.input_spec
    images = torch.randint(0, 256, (n, *s.shape), dtype=torch.uint8, generator=gen)
    unlabelled = TensorDataset(images, torch.zeros(n, dtype=torch.long), s, "random")
    with torch.no_grad():
        labels = plain(next(iter(unlabelled.batches(n)))[0]).argmax(1)
    return TensorDataset(images, labels, s, "random, labelled by the FP32 model")
