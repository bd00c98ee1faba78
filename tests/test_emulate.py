"""The integer emulation is the referee: pin it against a plain float reference of the same
quantized function, written here from the definition with NumPy, layer by layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgerepvgg.quant import CONSTRAINT_SETS, Scheme, TensorQuant, constraints_for
from edgerepvgg import UserError
from edgerepvgg.quant.emulate import IntegerNet, dequantize, fake_quant, quantize, round_mode

from quant_helpers import minmax_spec, tiny_plain


def _round(v: np.ndarray, rounding: str) -> np.ndarray:
    return np.round(v) if rounding == "half_even" else np.sign(v) * np.floor(np.abs(v) + 0.5)


def _q(v: np.ndarray, tq: TensorQuant, rounding: str, axis: int) -> np.ndarray:
    shape = [1] * v.ndim
    shape[axis] = -1
    s = np.asarray(tq.scale).reshape(shape) if len(tq.scale) > 1 else tq.scale[0]
    z = np.asarray(tq.zero_point).reshape(shape) if len(tq.zero_point) > 1 else tq.zero_point[0]
    q = np.clip(_round(v / s, rounding) + z, tq.scheme.qmin, tq.scheme.qmax)
    return (q - z) * s


def reference(plain, spec, x: torch.Tensor) -> np.ndarray:
    """Quantize-dequantize every tensor where the spec says, then compute in float64."""
    c = spec.constraints
    v = x.double().numpy()
    for i, conv in enumerate(plain.convs):
        layer = spec.layers[i]
        xin = _q(v, layer.input, c.rounding, 1)
        w = _q(conv.weight.detach().double().numpy(), layer.weight, "half_even", 0)
        b = conv.bias.detach().double().numpy()
        if c.int_bias:
            s = layer.input.scale[0] * np.asarray(layer.weight.scale)
            b = np.round(b / s) * s
        y = torch.nn.functional.conv2d(torch.from_numpy(xin), torch.from_numpy(w), torch.from_numpy(b),
                                       conv.stride, 1, 1, conv.groups).numpy()  # fmt: skip
        v = np.maximum(y, 0)
    v = _q(v, spec.pool, c.rounding, 1).mean(axis=(2, 3))
    head = spec.layers[-1]
    xin = _q(v, head.input, c.rounding, 1)
    w = _q(plain.head.weight.detach().double().numpy(), head.weight, "half_even", 0)
    b = plain.head.bias.detach().double().numpy()
    if c.int_bias:
        s = head.input.scale[0] * np.asarray(head.weight.scale)
        b = np.round(b / s) * s
    logits = xin @ w.T + b
    if spec.output is not None:
        logits = _q(logits, spec.output, c.rounding, 1)
    return logits


@pytest.mark.parametrize("constraints", list(CONSTRAINT_SETS))
def test_integer_net_matches_float_reference(constraints):
    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS[constraints])
    x = plain.example_input(6)
    got = IntegerNet(plain, spec)(x).double().numpy()
    want = reference(plain, spec, x)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_integer_net_differs_from_fp32_but_not_by_much():
    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["tensorrt"])
    x = plain.example_input(6)
    fp32, int8 = plain(x), IntegerNet(plain, spec)(x)
    assert not torch.allclose(fp32, int8, atol=1e-4)  # it does quantize
    cos = torch.nn.functional.cosine_similarity(fp32.flatten(), int8.flatten(), dim=0)
    assert cos > 0.9


def test_integer_activations_are_integers_on_the_grid():
    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["tflite"])
    seen = {}
    IntegerNet(plain, spec)(plain.example_input(2), observe=lambda n, t: seen.__setitem__(n, t))
    assert set(seen) == set(plain.activation_points())
    for name, t in seen.items():
        assert torch.equal(t, t.round()), name
        grid = spec.output if name == "output" else spec.pool if name == "pool" else spec.layer(name).input
        assert t.min() >= grid.scheme.qmin and t.max() <= grid.scheme.qmax


def test_integer_net_refuses_a_spec_made_for_another_model():
    from dataclasses import replace

    plain, other = tiny_plain(0), tiny_plain(1)
    spec = minmax_spec(plain, CONSTRAINT_SETS["tensorrt"])
    with pytest.raises(UserError, match="made for another model"):
        IntegerNet(other, spec)
    with pytest.raises(UserError, match="layers do not match"):
        IntegerNet(plain, replace(spec, layers=spec.layers[1:]))


def test_keep_float_leaves_out_exactly_the_pool_and_output_quantizers():
    from dataclasses import replace

    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["tflite"])  # has an output quantizer
    floats = replace(spec, layers=tuple(replace(ly, precision="float") for ly in spec.layers))
    x = plain.example_input(3)
    seen: dict[str, torch.Tensor] = {}
    got = IntegerNet(plain, floats, keep_float=("pool", "output"))(x, observe=seen.__setitem__)
    assert not seen  # nothing was quantized ...
    torch.testing.assert_close(got, plain(x).detach(), rtol=1e-5, atol=1e-5)  # ... so it is the FP32 net
    IntegerNet(plain, floats, keep_float=("output",))(x, observe=seen.__setitem__)
    assert set(seen) == {"pool"}
    with pytest.raises(ValueError, match="keep_float"):
        IntegerNet(plain, spec, keep_float=("convs.0",))


def test_float_precision_layer_is_left_unquantized():
    from dataclasses import replace

    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["tensorrt"])
    all_float = replace(spec, layers=tuple(replace(ly, precision="float") for ly in spec.layers))
    x = plain.example_input(3)
    # Only the pool quantizer remains: close to FP32, and different from the fully quantized net.
    out = IntegerNet(plain, all_float)(x)
    assert (out - plain(x)).abs().max() < (IntegerNet(plain, spec)(x) - plain(x)).abs().max()


def test_rounding_modes_differ_only_on_ties():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6])
    assert round_mode(v, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 0, -1]
    assert round_mode(v, "half_away").tolist() == [-3, -2, -1, 1, 2, 3, 0, -1]


def test_quantize_per_channel_and_clamp():
    q = TensorQuant(Scheme(8, True, True, per_channel=True), (0.5, 0.25), (0, 0))
    w = torch.tensor([[1.0, 100.0], [1.0, -100.0]])
    got = quantize(w, q, axis=0)
    assert got.tolist() == [[2, 127], [4, -127]]
    assert dequantize(got, q, axis=0).tolist() == [[1.0, 63.5], [1.0, -31.75]]


def test_fake_quant_straight_through_gradient():
    q = TensorQuant(Scheme(8, False, False), (0.1,), (0,))
    x = torch.tensor([-1.0, 0.33, 10.0, 30.0], requires_grad=True)
    y = fake_quant(x, q)
    y.sum().backward()
    assert y.detach().tolist() == pytest.approx([0.0, 0.3, 10.0, 25.5])
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["tensorrt", "openvino", "tflite"])
def test_float32_accumulation_is_bit_identical_to_float64(name):
    """The fast path (integer sums in float32 kernels) changes no bit of the result."""
    plain = tiny_plain()
    spec = minmax_spec(plain, constraints_for(name, weight_bits=8))
    x = plain.example_input(8).detach()
    fast = IntegerNet(plain, spec)
    assert all(p is not None for p in fast.exact32)  # A0's sums fit float32 in one part
    slow = IntegerNet(plain, spec)
    slow.exact32 = [None] * len(slow.exact32)
    assert torch.equal(fast(x), slow(x))


def test_float32_parts_split_large_sums_and_recompose_exactly():
    from edgerepvgg.quant.emulate import float32_parts

    q = TensorQuant(Scheme(8, signed=False, symmetric=False), (0.1,), (0,))
    wq = torch.randint(-127, 128, (4, 4096), generator=torch.Generator().manual_seed(0)).double()
    parts = float32_parts(wq, q)
    assert parts is not None and len(parts) > 1  # 255 * 127 * 4096 > 2^24: one part would not be exact
    assert torch.equal(sum(p.double() * 16.0**k for k, p in enumerate(parts)), wq)
    assert all(float(p.abs().sum(1).max()) * 255 < 2**24 for p in parts)
    assert float32_parts(wq.repeat(1, 4096), q) is None  # too long for any split: float64 instead
