"""TFLite target: the flatbuffer written from PlainNet + QuantSpec, read back with the schema
bindings, and its numerics in LiteRT against PyTorch's padding and the integer referee. What every
target must do (FP32 equal to PlainNet, refusals, metadata, the bundled model) is in
test_target_conformance.py."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from edgerepvgg import UserError
from edgerepvgg.data import InputSpec
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.targets import get_target
from edgerepvgg.targets.tflite import TFLiteTarget, read_metadata, read_model

from helpers import random_batch
from quant_helpers import minmax_spec, tiny_plain

REASON = TFLiteTarget().available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

TFLITE = constraints_for("tflite")


# ---------------------------------------------------------------------------------------------
# Reading the flatbuffer back (independently of the writer's own bookkeeping)


def _names(enum) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if not k.startswith("_")}


def read_graph(path) -> tuple[list[dict], list[dict]]:
    """``(ops, tensors)`` of subgraph 0: op name, input/output indices and options; tensor name,
    type, shape, quantization and constant data."""
    import tflite

    model = read_model(path)
    sg = model.Subgraphs(0)
    op_names, type_names = _names(tflite.BuiltinOperator), _names(tflite.TensorType)
    tensors = []
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        q = t.Quantization()
        data = model.Buffers(t.Buffer()).DataAsNumpy()
        tensors.append({
            "name": t.Name().decode(), "type": type_names[t.Type()], "shape": t.ShapeAsNumpy().tolist(),
            "scale": q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None,
            "zero_point": q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else None,
            "dim": q.QuantizedDimension() if q is not None else None,
            "data": data if isinstance(data, np.ndarray) else None,
        })  # fmt: skip
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        name = op_names[model.OperatorCodes(op.OpcodeIndex()).BuiltinCode()]
        options = None
        if name == "CONV_2D":
            table = op.BuiltinOptions()
            options = tflite.Conv2DOptions()
            options.Init(table.Bytes, table.Pos)
        ops.append({"op": name, "inputs": op.InputsAsNumpy().tolist(), "outputs": op.OutputsAsNumpy().tolist(), "options": options})
    return ops, tensors


def const(t: dict, dtype) -> np.ndarray:
    return t["data"].view(dtype).reshape(t["shape"])


def assert_quant(t: dict, q, dim: int = 0) -> None:
    """The tensor carries exactly ``q``'s scales (as float32) and zero points."""
    np.testing.assert_array_equal(t["scale"], np.asarray(q.scale, dtype=np.float32))
    np.testing.assert_array_equal(t["zero_point"], np.asarray(q.zero_point))
    assert t["dim"] == dim


@pytest.fixture(scope="module")
def tiny():
    """A tiny fused A0 (four stride-2 convs on even sizes) and a spec for the tflite constraints."""
    plain = tiny_plain(seed=1, size=16, classes=5)
    spec = minmax_spec(plain, TFLITE, plain.example_input(16))
    return plain, spec


# ---------------------------------------------------------------------------------------------
# Protocol and structure


def test_registered_under_its_name_with_the_tflite_constraint_set():
    t = get_target("tflite")
    assert isinstance(t, TFLiteTarget)
    assert (t.name, t.constraint_set, t.precisions) == ("tflite", "tflite", ("fp32", "int8"))
    assert t.available() is None and "\n" not in t.description


def test_a_missing_module_is_a_one_line_reason_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tflite", None)  # what an uninstalled package looks like to import
    reason = TFLiteTarget().available()
    assert reason is not None and "tflite" in reason and "pip install 'edgerepvgg[tflite]'" in reason and "\n" not in reason
    with pytest.raises(UserError, match="edgerepvgg.tflite"):
        TFLiteTarget().compile(tiny_plain(), None, tmp_path)


def test_writing_needs_no_runtime_but_running_does(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    target = TFLiteTarget()
    assert "ai_edge_litert" in target.available()
    art = target.compile(tiny_plain(), None, tmp_path)  # a .tflite for another device, no LiteRT here
    assert read_metadata(art.path)["precision"] == "fp32"
    with pytest.raises(UserError, match="ai_edge_litert"):
        target.load(art)


def test_int8_graph_carries_the_spec_exactly(tiny, tmp_path):
    plain, spec = tiny
    art = TFLiteTarget().compile(plain, spec, tmp_path, "int8")
    assert art.path == tmp_path / "model.tflite" and art.files == (art.path,) and art.precision == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]  # no temporary left behind
    ops, tensors = read_graph(art.path)

    strides = [c.stride[0] for c in plain.convs]
    expected = ["QUANTIZE"]
    for s in strides:
        expected += ["PAD", "CONV_2D"] if s == 2 else ["CONV_2D"]
    assert [o["op"] for o in ops] == expected + ["MEAN", "FULLY_CONNECTED", "DEQUANTIZE"]
    assert art.info["int8_convs"] == len(plain.convs) and art.info["pads"] == strides.count(2) > 0

    first = tensors[ops[0]["inputs"][0]]
    assert (first["type"], first["shape"]) == ("FLOAT32", [1, 16, 16, 1])
    assert_quant(tensors[ops[0]["outputs"][0]], spec.layers[0].input)
    assert tensors[ops[-1]["outputs"][0]]["type"] == "FLOAT32"

    convs = [o for o in ops if o["op"] == "CONV_2D"]
    pads = iter(o for o in ops if o["op"] == "PAD")
    n = len(plain.convs)
    for i, (op, conv) in enumerate(zip(convs, plain.convs)):
        layer = spec.layers[i]
        x, w, b = (tensors[j] for j in op["inputs"])
        y = tensors[op["outputs"][0]]
        assert (x["type"], w["type"], b["type"], y["type"]) == ("INT8", "INT8", "INT32", "INT8")
        assert_quant(x, layer.input)
        assert_quant(y, spec.layers[i + 1].input if i + 1 < n else spec.pool)
        # Weights: per output channel, symmetric, OHWI, the integers IntegerNet uses.
        assert_quant(w, layer.weight, dim=0)
        assert not w["zero_point"].any()
        wq = const(w, np.int8)
        s_w = np.asarray(layer.weight.scale)
        expected_w = np.clip(np.round(conv.weight.detach().double().numpy() / s_w.reshape(-1, 1, 1, 1)), -127, 127)
        np.testing.assert_array_equal(wq, expected_w.transpose(0, 2, 3, 1))
        # Bias: int32, scale s_in * s_w per channel, zero point 0.
        s_b = layer.input.scale[0] * s_w
        np.testing.assert_array_equal(const(b, np.int32), np.round(conv.bias.detach().double().numpy() / s_b))
        np.testing.assert_allclose(b["scale"], s_b, rtol=1e-6)
        assert not b["zero_point"].any() and b["dim"] == 0
        opts = op["options"]
        assert opts.FusedActivationFunction() == 1  # RELU
        assert (opts.StrideH(), opts.StrideW()) == (conv.stride[0],) * 2
        if conv.stride[0] == 2:  # explicit PAD (1 each side, by the zero point) + VALID
            pad = next(pads)
            assert pad["outputs"] == [op["inputs"][0]]
            np.testing.assert_array_equal(const(tensors[pad["inputs"][1]], np.int32), [[0, 0], [1, 1], [1, 1], [0, 0]])
            assert_quant(tensors[pad["inputs"][0]], layer.input)
            assert opts.Padding() == 1
        else:
            assert opts.Padding() == 0  # SAME == PyTorch's padding 1 at stride 1

    mean = next(o for o in ops if o["op"] == "MEAN")
    np.testing.assert_array_equal(const(tensors[mean["inputs"][1]], np.int32), [1, 2])
    assert_quant(tensors[mean["inputs"][0]], spec.pool)
    assert_quant(tensors[mean["outputs"][0]], spec.layers[-1].input)
    fc = next(o for o in ops if o["op"] == "FULLY_CONNECTED")
    x, w, b = (tensors[j] for j in fc["inputs"])
    assert (w["type"], b["type"], w["shape"]) == ("INT8", "INT32", [5, plain.head.in_features])
    assert_quant(w, spec.layers[-1].weight, dim=0)
    assert_quant(tensors[fc["outputs"][0]], spec.output)


def test_metadata_reads_back(tiny, tmp_path):
    plain, spec = tiny
    plain = copy.deepcopy(plain)
    plain.input_spec = replace(plain.input_spec, class_names=("a", "b", "c", "d", "e"))
    art = TFLiteTarget().compile(plain, spec, tmp_path, "int8")
    meta = read_metadata(art.path)
    assert InputSpec.from_dict(meta["input_spec"]) == plain.input_spec
    assert meta["class_names"] == ["a", "b", "c", "d", "e"]
    assert (meta["spec_sha256"], meta["model_hash"]) == (spec.sha256, spec.model_hash)
    assert (meta["precision"], meta["int8_io"], meta["constraints"]) == ("int8", False, "tflite")


def test_fp32_graph_has_no_quantization(tiny, tmp_path):
    plain, _ = tiny
    art = TFLiteTarget().compile(plain, None, tmp_path, "fp32")
    ops, tensors = read_graph(art.path)
    assert {o["op"] for o in ops} == {"PAD", "CONV_2D", "MEAN", "FULLY_CONNECTED"}
    assert {t["type"] for t in tensors} == {"FLOAT32", "INT32"}  # int32: PAD and MEAN constants only
    assert all(t["scale"] is None for t in tensors)
    meta = read_metadata(art.path)
    assert meta["precision"] == "fp32" and meta["spec_sha256"] is None


# ---------------------------------------------------------------------------------------------
# Numerics


def test_fp32_pads_like_pytorch_at_odd_sizes_and_grouped_convs(tmp_path):
    """Stride-2 convs on odd and even sizes and grouped convs (B-g2/g4 variants) all match PyTorch."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1, groups=2), nn.Conv2d(8, 16, 3, 2, 1, groups=4), nn.Conv2d(16, 16, 3, 2, 1)]
    plain = PlainNet(convs, nn.Linear(16, 4), InputSpec(size=15, resize=15)).eval()
    x = random_batch(plain, 4)
    with torch.no_grad():
        expected = plain(torch.from_numpy(x)).numpy()
    runner = TFLiteTarget().load(TFLiteTarget().compile(plain, None, tmp_path / "fp"), threads=1)
    np.testing.assert_allclose(runner(x), expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    spec = minmax_spec(plain, TFLITE, torch.from_numpy(x))
    runner = TFLiteTarget().load(TFLiteTarget().compile(plain, spec, tmp_path / "i8", "int8"), threads=1)
    ref = IntegerNet(plain, spec)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner(x), ref, atol=spec.output.scale[0] * 1.01, rtol=0)


def test_int8_computes_the_integer_net(tiny, tmp_path):
    plain, spec = tiny
    runner = TFLiteTarget().load(TFLiteTarget().compile(plain, spec, tmp_path, "int8"), threads=1)
    x = random_batch(plain, 64, seed=3)
    ref = IntegerNet(plain, spec)(torch.from_numpy(x)).numpy()
    got = runner(x)
    steps = np.round((got - ref) / spec.output.scale[0])
    # Same integers except where a value lands on a rounding boundary somewhere in 22 layers.
    assert (steps == 0).mean() >= 0.95, np.unique(steps, return_counts=True)
    assert np.abs(steps).max() <= 4
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 62 / 64


def test_int8_io_round_trip(tiny, tmp_path):
    plain, spec = tiny
    target = TFLiteTarget()
    io = target.compile(plain, spec, tmp_path / "io", "int8", int8_io=True)
    ops, tensors = read_graph(io.path)
    assert [o["op"] for o in ops][0] != "QUANTIZE" and ops[-1]["op"] == "FULLY_CONNECTED"
    inp, out = tensors[ops[0]["inputs"][0]], tensors[ops[-1]["outputs"][0]]
    assert (inp["type"], out["type"]) == ("INT8", "INT8")
    assert_quant(inp, spec.layers[0].input)
    assert_quant(out, spec.output)
    assert read_metadata(io.path)["int8_io"] is True
    x = random_batch(plain, 6, seed=4)
    float_io = target.load(target.compile(plain, spec, tmp_path / "f", "int8"), threads=1)(x)
    got = target.load(io, threads=1)(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, float_io, atol=1e-6, rtol=0)


def test_runner_resizes_the_batch_and_is_deterministic(tiny, tmp_path):
    plain, spec = tiny
    runner = TFLiteTarget().load(TFLiteTarget().compile(plain, spec, tmp_path, "int8"), threads=1)
    x = random_batch(plain, 7, seed=5)
    full = runner(x)
    assert full.shape == (7, 5)
    np.testing.assert_array_equal(runner(x[:3]), full[:3])
    np.testing.assert_array_equal(runner(x[3:]), full[3:])
    np.testing.assert_array_equal(runner(x[:1]), full[:1])
    with pytest.raises(ValueError, match="channels"):
        runner(np.zeros((1, 3, 16, 16), np.float32))


# ---------------------------------------------------------------------------------------------
# Refusals (one-line UserErrors)


def test_specs_and_options_full_integer_tflite_cannot_build_are_refused(tiny, tmp_path):
    plain, spec = tiny
    t = TFLiteTarget()
    with pytest.raises(UserError, match="INT8 build"):
        t.compile(plain, None, tmp_path, "fp32", int8_io=True)
    mixed = replace(spec, layers=tuple(replace(ly, precision="float") if ly.name == "convs.3" else ly for ly in spec.layers))
    with pytest.raises(UserError, match="mixed precision"):
        t.compile(plain, mixed, tmp_path, "int8")
    with pytest.raises(UserError, match="'tflite' constraint set"):
        t.compile(plain, minmax_spec(plain, constraints_for("openvino", host=False)), tmp_path, "int8")
    assert not (tmp_path / "model.tflite").exists()  # nothing written by a refused compile
