"""PlainNet + QuantSpec in PyTorch: the referee every target is checked against.

``IntegerNet`` computes what the integer kernels compute: int8 (or narrower) inputs and weights,
exact integer accumulation, the bias added in int32 (``round(b / (s_in * s_w))``) or in float where
the target keeps a float bias (TensorRT), ReLU, and requantization to the next layer's input grid
with the target's rounding. Accumulation is exact (float64 holds every int8 x int8 sum of these
sizes exactly: |acc| < 2^53). Where targets may differ from it:

- requantization: TFLite multiplies by a 31-bit fixed-point approximation of
  ``s_in * s_w / s_out`` and TensorRT/ONNX Runtime by a float32 scale, where we use float64; the
  results agree except where a value lands within ~1e-7 of a rounding boundary (one step apart);
- average pooling: the mean of the quantized values is requantized once here; a target that
  accumulates in another order rounds the same exact sum, so it agrees.

``fake_quant`` is a differentiable quantize-dequantize (straight-through estimator); QAT's own
fake-quant network, :class:`edgerepvgg.quant.qat.QATNet`, is pinned to ``IntegerNet`` by tests.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from edgerepvgg.plain import Observe, PlainNet
from edgerepvgg.quant.spec import QuantSpec, TensorQuant, require_spec_for

#: The quantizers outside the layers, which ``IntegerNet(keep_float=...)`` can leave out.
ACTIVATION_QUANTIZERS = ("pool", "output")


def round_mode(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """Round to integer: ``half_even`` (ONNX QuantizeLinear, TensorRT) or ``half_away`` (TFLite)."""
    if rounding == "half_even":
        return torch.round(x)
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _param(values: tuple, dtype: torch.dtype, ndim: int, axis: int, device: torch.device | None = None) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype, device=device)
    if len(values) == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = len(values)
    return t.reshape(shape)


def quantize(x: torch.Tensor, q: TensorQuant, rounding: str = "half_even", axis: int = 0) -> torch.Tensor:
    """Float -> integer values (kept in ``x``'s float dtype): ``clamp(round(x / s) + z)``."""
    scale = _param(q.scale, x.dtype, x.ndim, axis, x.device)
    zp = _param(q.zero_point, x.dtype, x.ndim, axis, x.device)
    return torch.clamp(round_mode(x / scale, rounding) + zp, q.scheme.qmin, q.scheme.qmax)


def dequantize(xq: torch.Tensor, q: TensorQuant, axis: int = 0) -> torch.Tensor:
    scale = _param(q.scale, xq.dtype, xq.ndim, axis, xq.device)
    zp = _param(q.zero_point, xq.dtype, xq.ndim, axis, xq.device)
    return (xq - zp) * scale


def fake_quant(x: torch.Tensor, q: TensorQuant, rounding: str = "half_even", axis: int = 0) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient inside the clip range."""
    y = dequantize(quantize(x, q, rounding, axis), q, axis)
    scale = _param(q.scale, x.dtype, x.ndim, axis, x.device)
    zp = _param(q.zero_point, x.dtype, x.ndim, axis, x.device)
    lo, hi = (q.scheme.qmin - zp) * scale, (q.scheme.qmax - zp) * scale
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x + (y - x).detach(), y.detach())


_F32_EXACT = 2**24  # float32 holds every integer up to 2^24 exactly


def float32_parts(wq: torch.Tensor, input_quant: TensorQuant) -> list[torch.Tensor] | None:
    """Split integer weights into float32 parts ``sum_k parts[k] * 16^k`` so that every partial sum
    of every part's dot product with the layer's integer input is below 2^24 and thus exact in
    float32, whatever order a kernel adds in; ``None`` if no split up to 4 parts guarantees that
    (the layer then accumulates in float64). This makes the emulation as fast as a float32 model."""
    s = input_quant.scheme
    zp = input_quant.zero_point[0]
    x_bound = max(s.qmax - zp, zp - s.qmin)
    for n in range(1, 5):
        parts, rest = [], wq.clone()
        for _ in range(n - 1):
            low = torch.remainder(rest, 16.0)  # digits 0..15
            parts.append(low)
            rest = (rest - low) / 16.0
        parts.append(rest)
        if all(float(p.abs().flatten(1).sum(1).max()) * x_bound < _F32_EXACT for p in parts):
            return [p.float() for p in parts]
    return None


FLOAT_LAYERS = ("fp32", "fp16")  # how a target runs the layers a spec keeps in float


class IntegerNet(nn.Module):
    """The integer function of ``plain`` under ``spec``; float in, float logits out.

    Weights are quantized once at construction. Between layers the activations are carried as the
    real values the integers stand for (float64, exact), and each integer layer quantizes its input
    onto its grid: for a ReLU output that is the requantization step. Layers the spec keeps in
    ``float`` precision compute in float64 on unquantized input, or, with ``float_layers="fp16"``,
    as an FP16 kernel does (input, weights and bias rounded to FP16, output rounded to FP16:
    TensorRT's mixed-precision layers). ``forward(x, observe)`` reports
    the integer values at every activation point, so a target can be compared layer by layer.

    ``keep_float`` names quantizers outside the layers (``pool``, ``output``) to leave out too:
    no target runs that, but it lets the sensitivity analysis quantize one quantizer alone with
    this same function (:func:`edgerepvgg.quant.analysis.quantized_only`)."""

    def __init__(self, plain: PlainNet, spec: QuantSpec, keep_float: Collection[str] = (), float_layers: str = "fp32"):
        super().__init__()
        require_spec_for(plain, spec)
        unknown = set(keep_float) - set(ACTIVATION_QUANTIZERS)
        if unknown:
            raise ValueError(f"keep_float takes {' and '.join(ACTIVATION_QUANTIZERS)}, got {sorted(unknown)}")
        if float_layers not in FLOAT_LAYERS:
            raise ValueError(f"float_layers is one of {', '.join(FLOAT_LAYERS)}, got {float_layers!r}")
        self.spec = spec
        self.float_layers = float_layers
        self.quantize_pool = "pool" not in keep_float
        self.quantize_output = spec.output is not None and "output" not in keep_float
        self.rounding = spec.constraints.rounding
        self.strides = [c.stride for c in plain.convs]
        self.groups = [c.groups for c in plain.convs]
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        self.exact32: list[list[torch.Tensor] | None] = []
        for layer, module in zip(spec.layers, [*plain.convs, plain.head]):
            w = module.weight.detach().double()
            self.weights.append(w if layer.precision == "float" else quantize(w, layer.weight, "half_even", axis=0))
            self.biases.append(module.bias.detach().double())
            self.exact32.append(None if layer.precision == "float" else float32_parts(self.weights[-1], layer.input))

    def _layer(self, i: int, x: torch.Tensor, observe: Observe | None) -> torch.Tensor:
        """Layer i (conv or head) on real-valued input ``x``; returns real-valued pre-ReLU output."""
        layer = self.spec.layers[i]
        conv = i < len(self.strides)
        shape = (1, -1, 1, 1) if conv else (1, -1)
        bias = self.biases[i].reshape(shape)

        def apply(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            if conv:
                return nn.functional.conv2d(inp, w, b, self.strides[i], 1, 1, self.groups[i])
            return nn.functional.linear(inp, w, b)

        if layer.precision == "float" and self.float_layers == "fp16":  # as an FP16 kernel: rounded in and out
            half = [t.half().float() for t in (x, self.weights[i], self.biases[i])]
            return apply(*half).half().double()
        if layer.precision == "float":
            return apply(x, self.weights[i], self.biases[i])
        q = layer.input
        xq = quantize(x, q, self.rounding, axis=1)
        if observe:
            observe(layer.name, xq)
        parts = self.exact32[i]
        if parts is None:
            acc = apply(xq - q.zero_point[0], self.weights[i], None)  # exact integer sums in float64
        else:  # the same exact sums from fast float32 kernels (see float32_parts)
            x32 = (xq - q.zero_point[0]).float()
            acc = sum(apply(x32, w, None).double() * (16.0**k) for k, w in enumerate(parts))
        s = q.scale[0] * torch.tensor(layer.weight.scale, dtype=torch.float64, device=acc.device).reshape(shape)
        if self.spec.constraints.int_bias:
            return (acc + round_mode(bias / s, "half_even")) * s
        return acc * s + bias

    @torch.no_grad()
    def forward(self, x: torch.Tensor, observe: Observe | None = None) -> torch.Tensor:
        spec = self.spec
        x = x.double()
        for i in range(len(self.strides)):
            x = torch.relu(self._layer(i, x, observe))
        if self.quantize_pool:
            xq = quantize(x, spec.pool, self.rounding, axis=1)
            if observe:
                observe("pool", xq)
            x = dequantize(xq, spec.pool, axis=1)
        x = x.mean(dim=(2, 3))
        logits = self._layer(len(self.strides), x, observe)
        if self.quantize_output:
            oq = quantize(logits, spec.output, self.rounding, axis=1)
            if observe:
                observe("output", oq)
            logits = dequantize(oq, spec.output, axis=1)
        return logits.float()
