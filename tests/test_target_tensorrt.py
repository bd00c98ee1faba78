"""TensorRT target: the explicit-quantization checker (targets/qdq_rules.py) on good and deliberately
broken Q/DQ graphs, compile without TensorRT (ONNX + build_engine.sh + an honest info), the emulated
runner against IntegerNet quantizer by quantizer, and engine build/run tests that run only where
TensorRT and a CUDA GPU exist. What every target must do (refusals, metadata, atomic writes, the
bundled model) is in test_target_conformance.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import agreement
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.spec import constraints_for
from edgerepvgg.targets import Artifact, get_target
from edgerepvgg.targets.onnx_graph import build_model, read_metadata
from edgerepvgg.targets.qdq_rules import Violation, check_explicit_quantization, quantized_layers, require_explicit_quantization
from edgerepvgg.targets.tensorrt import NOT_INSTALLED, EmulatedTensorRTRunner, TensorRTTarget, summarize_layers, trtexec_command

from quant_helpers import minmax_spec

TRT_REASON = TensorRTTarget().available()
needs_engine = pytest.mark.skipif(TRT_REASON is not None, reason=f"no TensorRT engine can be built here: {TRT_REASON}")
without_engine = pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are here; the no-engine path is not taken")


@pytest.fixture(scope="module")
def trt_spec(plain):
    return minmax_spec(plain, constraints_for("tensorrt"))


@pytest.fixture
def good(plain, trt_spec):
    """A fresh copy of our Q/DQ graph under the tensorrt spec, for editing."""
    return build_model(plain, trt_spec)


# ---------------------------------------------------------------------------------------------
# Graph editing helpers


def _node(model, name: str):
    return next(n for n in model.graph.node if n.name == name)


def _set_init(model, name: str, array: np.ndarray) -> None:
    inits = model.graph.initializer
    i = next(i for i, t in enumerate(inits) if t.name == name)
    inits[i].CopyFrom(numpy_helper.from_array(array, name))


def _init(model, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def _nodes(violations: list[Violation], rule: str) -> set[str]:
    return {v.node for v in violations if v.rule == rule}


# ---------------------------------------------------------------------------------------------
# The checker


def test_our_qdq_graph_passes_and_quantizes_every_layer(plain, good, tmp_path):
    assert check_explicit_quantization(good) == []
    assert quantized_layers(good) == [f"convs.{i}" for i in range(len(plain.convs))] + ["head"]
    path = tmp_path / "m.onnx"
    onnx.save_model(good, str(path))
    assert check_explicit_quantization(path) == []  # a path works as well as a ModelProto
    require_explicit_quantization(good)  # does not raise


def test_an_fp32_graph_is_not_an_int8_graph(plain):
    violations = check_explicit_quantization(build_model(plain))
    assert _rules(violations) == {"not_quantized"}


def test_asymmetric_zero_point_is_flagged(good):
    _set_init(good, "convs.3.input.zero_point", np.array(5, np.int8))
    violations = check_explicit_quantization(good)
    assert _rules(violations) == {"symmetric"}
    assert _nodes(violations, "symmetric") == {"convs.3.input.q", "convs.3.input.dq"}
    assert {v.kind for v in violations} == {"tensorrt"}
    with pytest.raises(UserError, match="symmetric"):
        require_explicit_quantization(good)


def test_per_tensor_weights_are_a_convention_note_not_a_tensorrt_violation(good):
    scales = _init(good, "convs.2.weight.scale")
    assert scales.size > 1
    _set_init(good, "convs.2.weight.scale", np.array(scales.max(), np.float32))
    _set_init(good, "convs.2.weight.zero_point", np.array(0, np.int8))
    violations = check_explicit_quantization(good)
    assert _rules(violations) == {"weight_per_channel"}
    assert _nodes(violations, "weight_per_channel") == {"convs.2.weight.dq"}
    assert f"1 weight scale(s) for {scales.size} output channels" in violations[0].detail
    assert violations[0].kind == "convention" and not violations[0].tensorrt  # TensorRT accepts per-tensor weights
    assert require_explicit_quantization(good) == violations  # returned as notes; nothing raised


@pytest.mark.parametrize("axis", [1, None], ids=["axis1", "default-axis"])
def test_weight_scales_on_the_wrong_axis_are_flagged(good, axis):
    dq = _node(good, "convs.2.weight.dq")
    del dq.attribute[:]
    if axis is not None:
        dq.attribute.append(helper.make_attribute("axis", axis))
    violations = check_explicit_quantization(good)  # DequantizeLinear's default axis is 1, not 0
    assert _rules(violations) == {"weight_axis"}
    assert _nodes(violations, "weight_axis") == {"convs.2.weight.dq"}


def test_qdq_on_a_conv_output_before_the_relu_is_flagged(good):
    relu = _node(good, "convs.4.relu")
    good.graph.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32), "convs.4.out.scale"))
    good.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), "convs.4.out.zero_point"))
    q = helper.make_node("QuantizeLinear", ["convs.4", "convs.4.out.scale", "convs.4.out.zero_point"], ["convs.4.out.q"], name="convs.4.out.q")
    dq = helper.make_node("DequantizeLinear", ["convs.4.out.q", "convs.4.out.scale", "convs.4.out.zero_point"], ["convs.4.out.dq"], name="convs.4.out.dq")
    relu.input[0] = "convs.4.out.dq"
    nodes = list(good.graph.node)
    at = nodes.index(relu)
    del good.graph.node[:]
    good.graph.node.extend([*nodes[:at], q, dq, *nodes[at:]])
    onnx.checker.check_model(good)
    violations = check_explicit_quantization(good)
    assert _rules(violations) == {"qdq_on_output"}
    assert _nodes(violations, "qdq_on_output") == {"convs.4.out.q"}


def test_an_int32_bias_dequantize_is_flagged(good, trt_spec):
    layer = trt_spec.layer("convs.1")
    s = layer.input.scale[0] * np.asarray(layer.weight.scale, np.float64)
    bias = _init(good, "convs.1.bias")
    good.graph.initializer.extend([
        numpy_helper.from_array(np.round(bias / s).astype(np.int32), "convs.1.bias.int"),
        numpy_helper.from_array(s.astype(np.float32), "convs.1.bias.scale"),
        numpy_helper.from_array(np.zeros(len(s), np.int32), "convs.1.bias.zp"),
    ])  # fmt: skip
    dq = helper.make_node("DequantizeLinear", ["convs.1.bias.int", "convs.1.bias.scale", "convs.1.bias.zp"], ["convs.1.bias.dq"], name="convs.1.bias.dq", axis=0)
    conv = _node(good, "convs.1")
    conv.input[2] = "convs.1.bias.dq"
    good.graph.node.insert(list(good.graph.node).index(conv), dq)
    violations = check_explicit_quantization(good)
    assert _rules(violations) == {"float_bias"}
    assert _nodes(violations, "float_bias") == {"convs.1.bias.dq"}


def test_a_graph_written_for_onnxruntime_breaks_the_rules_tensorrt_has(plain):
    """int_bias=True and u8 affine activations: every bias DQ, every u8 Q/DQ, the input's zero point."""
    spec = minmax_spec(plain, constraints_for("onnxruntime"))
    assert spec.constraints.int_bias and not spec.constraints.activation.signed
    violations = check_explicit_quantization(build_model(plain, spec))
    assert {"float_bias", "uint8"} <= _rules(violations)
    assert _nodes(violations, "float_bias") == {f"convs.{i}.bias.dq" for i in range(len(plain.convs))} | {"head.bias.dq"}
    assert {"convs.0.input.q", "convs.0.input.dq", "pool.q", "head.input.dq"} <= _nodes(violations, "uint8")
    with pytest.raises(UserError, match=r"float_bias.*convs\.0\.bias\.dq") as exc:
        require_explicit_quantization(build_model(plain, spec))
    assert "\n" not in str(exc.value)


def test_uint8_qdq_is_flagged(good):
    _set_init(good, "convs.5.input.zero_point", np.array(0, np.uint8))
    violations = check_explicit_quantization(good)
    assert _rules(violations) == {"uint8"}
    assert _nodes(violations, "uint8") == {"convs.5.input.q", "convs.5.input.dq"}


def test_a_quantize_without_zero_point_is_uint8(good):
    """ONNX's QuantizeLinear writes uint8 when no zero point (or output_dtype) says otherwise."""
    for name in ("convs.5.input.q", "convs.5.input.dq"):
        del _node(good, name).input[2]
    violations = check_explicit_quantization(good)
    assert _rules(violations) == {"uint8"}
    assert _nodes(violations, "uint8") == {"convs.5.input.q", "convs.5.input.dq"}


def test_a_conv_quantized_on_its_weight_only_is_flagged(good):
    _node(good, "convs.6").input[0] = "convs.5.relu"  # bypass its input Q/DQ
    violations = check_explicit_quantization(good)
    assert "qdq_inputs" in _rules(violations)
    assert _nodes(violations, "qdq_inputs") == {"convs.6"}


def test_violations_are_frozen_and_readable():
    v = Violation("symmetric", "convs.3.input.q", "zero point [5] is not 0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.rule = "x"  # type: ignore[misc]
    assert str(v) == "convs.3.input.q: zero point [5] is not 0 [symmetric]"


# ---------------------------------------------------------------------------------------------
# Target, trtexec command, layer report


def test_registry_and_availability():
    t = get_target("tensorrt")
    assert isinstance(t, TensorRTTarget) and (t.available() is None) == (TRT_REASON is None)
    assert (t.name, t.constraint_set, t.precisions) == ("tensorrt", "tensorrt", ("fp32", "fp16", "int8"))
    if importlib.util.find_spec("tensorrt") is None:
        assert t.available() == NOT_INSTALLED
    else:
        assert t.available() is None or "CUDA" in t.available() or "importing it failed" in t.available()


def test_trtexec_command_per_precision():
    shapes = ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    int8 = trtexec_command("int8", shapes, 1024)
    assert int8[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.plan"]
    assert "--stronglyTyped" in int8 and "--fp16" not in int8 and "--int8" not in int8
    assert {"--minShapes=input:1x3x224x224", "--optShapes=input:8x3x224x224", "--maxShapes=input:32x3x224x224",
            "--memPoolSize=workspace:1024", "--timingCacheFile=timing.cache"} <= set(int8)  # fmt: skip
    assert "--skipInference" not in int8 and "--exportLayerInfo=layers.json" in int8  # inference runs: formats are exported
    fp16 = trtexec_command("fp16", shapes, 512)
    assert "--fp16" in fp16 and "--stronglyTyped" not in fp16 and "--memPoolSize=workspace:512" in fp16
    assert "--stronglyTyped" in trtexec_command("fp32", shapes, 1024)


def test_layer_report_counts_int8_convolutions():
    """The engine inspector's JSON layout (TensorRT docs, DETAILED verbosity)."""
    def conv(name, fmt):
        return {"Name": name, "LayerType": "CaskConvolution", "ParameterType": "Convolution",
                "Inputs": [{"Name": "x", "Dimensions": [8, 48, 8, 8], "Format/Datatype": fmt}],
                "Outputs": [{"Name": "y", "Dimensions": [8, 48, 8, 8], "Format/Datatype": fmt}]}  # fmt: skip

    report = {"Layers": [
        conv("convs.0 + convs.0.relu", "Row major linear FP32 format"),
        {"Name": "Reformatting CopyNode", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}]},
        conv("convs.1 + convs.1.relu", "Thirty-two wide channel vectorized row major Int8 format"),
        conv("convs.2 + convs.2.relu", "Channel major Int8 format (kCHW4)"),
    ], "Bindings": ["input", "logits"]}  # fmt: skip
    s = summarize_layers(report)
    assert (s["convolutions"], s["int8_convolutions"], s["convolutions_not_int8"]) == (3, 2, ["convs.0 + convs.0.relu"])
    dynamic = {"Layers": [conv("convs.0", "N/A due to dynamic shapes")]}
    assert summarize_layers(dynamic)["int8_convolutions"] is None
    assert summarize_layers({"Layers": ["convs.0", "convs.1"]})["convolutions"] == 0  # names only: nothing to count


# ---------------------------------------------------------------------------------------------
# Compile and run without TensorRT: the emulation


@without_engine
@pytest.mark.parametrize("precision", ["int8", "fp32", "fp16"])
def test_compile_without_tensorrt_writes_onnx_script_and_says_why(plain, trt_spec, tmp_path, precision):
    art = TensorRTTarget().compile(plain, trt_spec if precision == "int8" else None, tmp_path, precision)
    assert art.path == tmp_path / "model.onnx" and art.path.is_file()
    assert set(art.files) == {tmp_path / "model.onnx", tmp_path / "build_engine.sh", tmp_path / "time_engine.sh"}
    assert not (tmp_path / "model.plan").exists()
    assert art.info["engine_built"] is False and art.info["emulated"] is True and art.info["why"] == TRT_REASON
    assert read_metadata(art.path)["edgerepvgg.precision"] == ("int8" if precision == "int8" else "fp32")
    script = tmp_path / "build_engine.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/bin/sh") and art.info["trtexec"].removeprefix("trtexec ") in text
    assert "--minShapes=input:1x1x16x16" in text and "--optShapes=input:8x1x16x16" in text and "--maxShapes=input:32x1x16x16" in text
    ten = art.info["trtexec_by_release"]["10"]  # TensorRT 10 (the default): strongly typed except fp16 from an FP32 graph
    assert ("--fp16" in ten) == (precision == "fp16") and ("--stronglyTyped" in ten) == (precision != "fp16")
    if precision == "int8":
        assert art.info["qdq_check"] == "passed" and art.info["graph_quantized_layers"] == len(plain.convs) + 1
        assert check_explicit_quantization(art.path) == []


def test_compile_refuses_a_spec_tensorrt_cannot_build_and_writes_nothing(plain, tmp_path):
    spec = minmax_spec(plain, constraints_for("onnxruntime"))
    with pytest.raises(UserError, match=r"uint8.*convs\.0\.input\.q"):
        TensorRTTarget().compile(plain, spec, tmp_path, "int8")
    assert not (tmp_path / "model.onnx").exists()


def test_compile_refuses_a_profile_out_of_order(plain, trt_spec, tmp_path):
    with pytest.raises(UserError, match="min <= opt <= max"):
        TensorRTTarget().compile(plain, trt_spec, tmp_path, "int8", profile=(8, 1, 32))
    assert not any(tmp_path.iterdir())


def test_a_fixed_batch_becomes_a_single_shape_profile(plain, trt_spec, tmp_path):
    art = TensorRTTarget().compile(plain, trt_spec, tmp_path, "int8", batch=4, profile=(1, 8, 32))
    assert art.info["batch"] == {"min": 4, "opt": 4, "max": 4}
    script = (tmp_path / "build_engine.sh").read_text()
    assert "--minShapes=input:4x1x16x16" in script and "--maxShapes=input:4x1x16x16" in script


@without_engine
def test_an_engine_artifact_does_not_run_here(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"built elsewhere")
    art = Artifact("tensorrt", "int8", plan, (plan,), {"engine_built": True})
    with pytest.raises(UserError, match="cannot run here"):
        TensorRTTarget().load(art)


def _integer_activations(onnx_path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The integers every QuantizeLinear of the graph writes, by activation point (``convs.i``,
    ``pool``, ``head``, IntegerNet's names), from the same node-by-node ONNX Runtime session."""
    model = onnx.load(str(onnx_path))
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(helper.make_tensor_value_info(n.output[0], TensorProto.INT8, None) for n in qs)
    probe = onnx_path.with_name("probe.onnx")
    onnx.save_model(model, str(probe))
    outs = EmulatedTensorRTRunner(probe, threads=1).session.run(None, {"input": x})
    return {n.name.removesuffix(".q").removesuffix(".input"): o for n, o in zip(qs, outs[1:])}


@without_engine
def test_emulated_runner_matches_integer_net_on_a_tiny_model(plain, trt_spec, tmp_path, one_thread):
    """Same integers at every quantizer up to float32 rounding ties: ONNX Runtime computes a conv
    in float32, IntegerNet exactly, so a value within ~1e-7 of a rounding boundary may land one
    step away; over 22 layers such a flip propagates, so the logits are bounded through it."""
    t = TensorRTTarget()
    art = t.compile(plain, trt_spec, tmp_path, "int8")
    runner = t.load(art, threads=1)
    assert runner.emulated is True and isinstance(runner, EmulatedTensorRTRunner)
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-2.5, 2.5)
    ref_ints: dict[str, torch.Tensor] = {}
    ref = IntegerNet(plain, trt_spec)(x, observe=lambda name, q: ref_ints.__setitem__(name, q.numpy()))
    a = agreement(torch.from_numpy(runner(x.numpy())), ref)
    assert a.top1 == 1.0, a

    ints = _integer_activations(art.path, x.numpy())
    assert list(ints) == list(ref_ints)  # every quantizer of the spec is in the graph, in order
    diffs = {k: np.abs(ints[k].astype(np.int64) - ref_ints[k].astype(np.int64)) for k in ints}
    assert diffs["convs.0"].max() == 0  # the input quantizer is exact
    first = next((k for k, d in diffs.items() if d.any()), None)
    if first is None:
        assert a.max_abs < 1e-4, a
    else:  # a rounding tie, not a different function: one step, on a handful of values
        assert diffs[first].max() == 1 and diffs[first].sum() <= max(3, diffs[first].size // 10_000), (first, diffs[first].sum())
        assert a.cosine > 0.9999 and a.max_abs < 0.05 * float(ref.abs().max()), a


# ---------------------------------------------------------------------------------------------
# Engine build and run (TensorRT + CUDA only)


@needs_engine
def test_int8_engine_builds_and_agrees_with_integer_net(plain, trt_spec, tmp_path):
    t = TensorRTTarget()
    art = t.compile(plain, trt_spec, tmp_path, "int8", profile=(1, 8, 32), workspace_mb=256)
    assert art.path == tmp_path / "model.plan" and art.path.stat().st_size > 0
    assert art.info["engine_built"] is True and art.info["emulated"] is False
    assert (tmp_path / "timing.cache").is_file() and (tmp_path / "layers.json").is_file()
    # Every conv reads int8, the 1-channel first conv perhaps excepted (TensorRT may keep it in float).
    assert art.info["int8_convolutions"] is not None and art.info["int8_convolutions"] >= len(plain.convs) - 1, art.info
    runner = t.load(art)
    assert runner.emulated is False
    x = plain.example_input(40).clamp(-2.5, 2.5)  # 40 > max batch 32: runs in two chunks
    a = agreement(torch.from_numpy(runner(x.numpy())), IntegerNet(plain, trt_spec)(x))
    assert a.top1 >= 0.95 and a.cosine > 0.999, a
    lat = runner.latency(batch_size=8, warmup=3, runs=10)
    assert lat.runs == 10 and lat.batch == 8  # timed as asked; speed itself belongs in benchmarks/


@needs_engine
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_engines_build_and_agree_with_the_plain_net(plain, tmp_path, precision):
    t = TensorRTTarget()
    art = t.compile(plain, None, tmp_path, precision)
    assert art.info["engine_built"] is True and art.path.suffix == ".plan"
    x = plain.example_input(8)
    with torch.no_grad():
        ref = plain(x)
    a = agreement(torch.from_numpy(t.load(art)(x.numpy())), ref)
    assert a.top1 >= 0.99 and a.cosine > 0.999, a
