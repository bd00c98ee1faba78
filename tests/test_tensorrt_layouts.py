"""TensorRT's two weight layouts (int8 initializer -> DQ for TensorRT >= 10; float ``q * s`` -> Q -> DQ
for 8.5+) and FP16 float layers: both layouts hold exactly the QuantSpec's integers (decoded by ONNX
Runtime itself), pass the checker, and run node by node in ONNX Runtime (as the emulated runner does)
to IntegerNet's function; a mixed-precision spec's FP16 float layers are refereed by IntegerNet(float_layers='fp16')."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import agreement
from edgerepvgg.quant.emulate import IntegerNet, quantize
from edgerepvgg.quant.spec import constraints_for, with_float_layers
from edgerepvgg.targets.onnx_graph import build_model
from edgerepvgg.targets.onnxruntime import OnnxRuntimeRunner
from edgerepvgg.targets.qdq_rules import check_explicit_quantization
from edgerepvgg.targets.tensorrt import TensorRTTarget

from quant_helpers import minmax_spec

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def trt_spec(plain):
    return minmax_spec(plain, constraints_for("tensorrt"))


def _x(plain, n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-2.5, 2.5)


def _run(model, x: torch.Tensor, extra: list[str] = ()) -> list[np.ndarray]:
    """Node by node (optimize=False), as EmulatedTensorRTRunner runs the graph; ``extra`` tensors too."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.INT8, None) for n in extra)
    return OnnxRuntimeRunner(model.SerializeToString(), threads=1, optimize=False).session.run(None, {"input": x.numpy()})


@pytest.mark.parametrize("layout", ["int8", "qdq"])
def test_both_layouts_hold_exactly_the_spec_integers(plain, trt_spec, layout):
    model = build_model(plain, trt_spec, weight_layout=layout)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [layer.name for layer in trt_spec.layers]
    if layout == "int8":
        decoded = [inits[f"{n}.weight.int"] for n in names]
        assert not any(f"{n}.weight.float" in inits for n in names)
    else:  # ONNX Runtime's own QuantizeLinear turns the float weights back into integers
        assert all(inits[f"{n}.weight.float"].dtype == np.float32 for n in names) and not any(f"{n}.weight.int" in inits for n in names)
        decoded = _run(model, _x(plain, 1), [f"{n}.weight.q" for n in names])[1:]
    for layer, module, got in zip(trt_spec.layers, [*plain.convs, plain.head], decoded):
        want = quantize(module.weight.detach().double(), layer.weight, "half_even", axis=0).numpy()
        assert got.dtype == np.int8 and np.array_equal(got.astype(np.int64), want.astype(np.int64)), layer.name


@pytest.mark.parametrize("layout, version", [("int8", None), ("int8", "10.3"), ("qdq", None), ("qdq", "8.5"), ("qdq", "8.6"), ("qdq", "11.0")])
def test_both_layouts_pass_the_checker_where_tensorrt_reads_them(plain, trt_spec, layout, version):
    assert check_explicit_quantization(build_model(plain, trt_spec, weight_layout=layout), version) == []


def test_int8_weight_initializers_break_a_tensorrt_8_rule(plain, trt_spec):
    violations = check_explicit_quantization(build_model(plain, trt_spec, weight_layout="int8"), "8.6")
    assert {v.rule for v in violations} == {"weight_int8_initializer_trt8"} and all(v.tensorrt for v in violations)
    assert len(violations) == len(trt_spec.layers)


def test_both_layouts_run_identically_and_agree_with_integer_net(plain, trt_spec, one_thread):
    x = _x(plain)
    ref = IntegerNet(plain, trt_spec)(x)
    int8 = _run(build_model(plain, trt_spec, weight_layout="int8"), x)[0]
    qdq = _run(build_model(plain, trt_spec, weight_layout="qdq"), x)[0]
    assert np.array_equal(int8, qdq)  # DQ(Q(q*s)) is DQ(q): the same function, bit for bit
    a = agreement(torch.from_numpy(qdq), ref)
    assert a.top1 == 1.0 and a.cosine > 0.9999 and a.max_abs < 0.05 * float(ref.abs().max()), a  # the emulation test's bound


def test_a_tensorrt_8_target_writes_the_qdq_layout_and_refuses_int8_weights(plain, trt_spec, tmp_path):
    art = TensorRTTarget(version="8.6").compile(plain, trt_spec, tmp_path / "a", "int8")
    assert (art.info["weight_layout"], art.info["strongly_typed"], art.info["builder_flags"]) == ("qdq", False, ["INT8"])
    assert art.info["qdq_conventions"] == [] and check_explicit_quantization(tmp_path / "a" / "model.onnx", "8.6") == []
    with pytest.raises(UserError, match="8.x refuses int8 weight initializers") as exc:
        TensorRTTarget(version="8.6", weight_layout="int8").compile(plain, trt_spec, tmp_path / "b", "int8")
    assert "\n" not in str(exc.value) and not (tmp_path / "b" / "model.onnx").exists()


def test_mixed_precision_float_layers_are_fp16_on_tensorrt_10_and_refereed_in_fp16(plain, trt_spec, tmp_path, one_thread):
    spec = with_float_layers(trt_spec, ["convs.3", "convs.4", "head"])
    art = TensorRTTarget(version="10.3").compile(plain, spec, tmp_path, "int8")
    assert art.info["float_layers"] == "fp16" and art.info["strongly_typed"] is True
    model = onnx.load(str(art.path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["convs.3.weight"].dtype == np.float16 and inits["head.bias"].dtype == np.float16
    assert {n.name for n in model.graph.node if n.op_type == "Cast"} >= {"convs.3.input.cast", "convs.4.output.cast", "head.output.cast"}
    x = _x(plain)
    got = torch.from_numpy(TensorRTTarget().load(art, threads=1)(x.numpy()))
    fp16_ref, f64_ref = IntegerNet(plain, spec, float_layers="fp16")(x), IntegerNet(plain, spec)(x)
    a16, a64 = agreement(got, fp16_ref), agreement(got, f64_ref)
    log.info("FP16 float layers vs the FP16 referee: %s; vs IntegerNet's float64 layers: %s", a16, a64)
    # Measured on this tiny net (x86, ORT 1.32): cosine 0.99974 vs the FP16 referee, 0.99976 vs float64 layers, top-1 1.0
    # for both: FP16 rounding moves values across the next layer's quantization steps, and those flips propagate, so the
    # bound is the one a float32-vs-exact flip allows (cosine > 0.999), not bit equality.
    # (max |diff| 0.30 of 5.48 measured when torch ran 2 threads before this test: the flips move with summation order)
    assert a16.top1 == 1.0 and a16.cosine > 0.999 and a16.max_abs < 0.1 * float(fp16_ref.abs().max()), a16
    assert not torch.equal(fp16_ref, f64_ref)  # the referee does round the float layers to FP16


def test_tensorrt_8_keeps_float_layers_fp32_in_the_graph_with_the_fp16_flag(plain, trt_spec, tmp_path):
    spec = with_float_layers(trt_spec, ["convs.3"])
    art = TensorRTTarget(version="8.5").compile(plain, spec, tmp_path, "int8")
    assert (art.info["float_layers"], art.info["builder_flags"]) == ("fp32", ["INT8", "FP16"])
    assert "--int8 --fp16" in art.info["trtexec_by_release"]["8.5"]
    no16 = TensorRTTarget(version="10.3", fp16_float_layers=False).compile(plain, spec, tmp_path / "no16", "int8")
    assert no16.info["float_layers"] == "fp32"
