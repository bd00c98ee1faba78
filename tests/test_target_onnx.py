"""The ONNX writer (FP32 and Q/DQ INT8 graphs read back node by node) and the Q/DQ graphs' numerics
in ONNX Runtime against the integer referee. What every target must do (FP32 equal to PlainNet,
refusals, metadata, the bundled model) is in test_target_conformance.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgerepvgg import UserError
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.emulate import IntegerNet, quantize
from edgerepvgg.quant.spec import Scheme, TensorQuant
from edgerepvgg.targets.onnx_graph import artifact_metadata, build_model, read_metadata, write_onnx
from edgerepvgg.targets.onnxruntime import OnnxRuntimeRunner

from quant_helpers import minmax_spec

N_CONVS = 22  # RepVGG-A0


def _inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _node(model, name: str):
    (node,) = [n for n in model.graph.node if n.name == name]
    return node


def _attr(node, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_fp32_graph_is_conv_relu_stack_then_pool_and_gemm(plain):
    model = build_model(plain)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Conv", "Relu"] * N_CONVS + ["GlobalAveragePool", "Flatten", "Gemm"]
    assert model.opset_import[0].version >= 17
    assert [n.name for n in model.graph.node if n.op_type == "Conv"] == [f"convs.{i}" for i in range(N_CONVS)]
    strides = [_attr(n, "strides")[0] for n in model.graph.node if n.op_type == "Conv"]
    assert strides == [c.stride[0] for c in plain.convs]


def test_fp32_graph_matches_torch_onnx_export_simplified(plain, x, tmp_path):
    """Our writer gives the graph torch.onnx (legacy exporter) + onnxsim give, numerically too."""
    import onnxsim

    traced = tmp_path / "traced.onnx"
    torch.onnx.export(plain, (x[:1],), str(traced), dynamo=False, opset_version=17, input_names=["input"])
    ref, ok = onnxsim.simplify(onnx.load(str(traced)))
    assert ok
    ours = build_model(plain)
    theirs = [n.op_type for n in ref.graph.node]
    assert [n.op_type for n in ours.graph.node][: 2 * N_CONVS] == theirs[: 2 * N_CONVS] == ["Conv", "Relu"] * N_CONVS
    # then the pool (onnxsim folds it to a Squeeze where the last feature map is 1x1, as here) and Gemm
    assert theirs[-1] == "Gemm" and len(theirs) in (2 * N_CONVS + 2, 2 * N_CONVS + 3)
    a = OnnxRuntimeRunner(ours.SerializeToString())(x.numpy())
    b = OnnxRuntimeRunner(ref.SerializeToString())(x[:1].numpy())
    np.testing.assert_allclose(a[:1], b, rtol=1e-5, atol=1e-5)


def test_metadata_carries_input_spec_model_hash_and_spec_hash(plain, tmp_path):
    spec = minmax_spec(plain, constraints_for("onnxruntime"))
    path = write_onnx(plain, tmp_path / "m.onnx", spec)
    meta = read_metadata(path)
    assert json.loads(meta["edgerepvgg.input_spec"])["size"] == plain.input_spec.size
    assert meta["edgerepvgg.model_hash"] == spec.model_hash
    assert meta["edgerepvgg.quant_spec_sha256"] == spec.sha256
    assert meta["edgerepvgg.precision"] == "int8" and meta["edgerepvgg.constraints"] == spec.constraints.name
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_an_onnx_file_without_our_metadata_is_a_one_line_error(plain, tmp_path):
    model = build_model(plain)
    del model.metadata_props[:]
    path = tmp_path / "foreign.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(UserError, match="no edgerepvgg metadata; it was not written by edgerepvgg"):
        artifact_metadata(path)


@pytest.mark.parametrize("name", ["tensorrt", "onnxruntime", "tflite"])
def test_qdq_parameters_read_back_equal_the_spec(plain, name):
    spec = minmax_spec(plain, constraints_for(name, weight_bits=8))
    model = build_model(plain, spec)
    inits = _inits(model)
    for i, layer in enumerate(spec.layers):
        prefix = layer.name if i < N_CONVS else "head"
        q = _node(model, f"{prefix}.input.q")
        assert inits[q.input[1]] == np.float32(layer.input.scale[0])
        zp = inits[q.input[2]]
        assert zp == layer.input.zero_point[0] and zp.dtype == (np.int8 if layer.input.scheme.signed else np.uint8)
        wdq = _node(model, f"{prefix}.weight.dq")
        assert _attr(wdq, "axis") == 0
        module = plain.convs[i] if i < N_CONVS else plain.head
        expect = quantize(module.weight.detach().double(), layer.weight, axis=0).numpy()
        assert inits[wdq.input[0]].dtype == np.int8 and np.array_equal(inits[wdq.input[0]], expect)
        np.testing.assert_array_equal(inits[wdq.input[1]], np.asarray(layer.weight.scale, np.float32))
        assert not inits[wdq.input[2]].any()
        consumer = _node(model, prefix)
        assert consumer.input[0] == f"{prefix}.input.dq" and consumer.input[1] == f"{prefix}.weight.dq"
        bias_in = consumer.input[2]
        if spec.constraints.int_bias:  # int32 behind a DequantizeLinear with scale s_in * s_w
            bdq = _node(model, bias_in)
            assert inits[bdq.input[0]].dtype == np.int32
            s = np.float32(layer.input.scale[0]) * np.asarray(layer.weight.scale)
            np.testing.assert_allclose(inits[bdq.input[1]], s, rtol=1e-6)
        else:  # TensorRT: float bias, no DequantizeLinear
            assert inits[bias_in].dtype == np.float32
    assert _node(model, "pool.q").op_type == "QuantizeLinear"
    has_output_q = any(n.name == "output.q" for n in model.graph.node)
    assert has_output_q == (spec.output is not None)


def test_float_layer_of_a_mixed_spec_has_no_quantizers(plain):
    spec = minmax_spec(plain, constraints_for("onnxruntime"))
    layers = list(spec.layers)
    layers[3] = replace(layers[3], precision="float")
    model = build_model(plain, replace(spec, layers=tuple(layers)))
    names = {n.name for n in model.graph.node}
    assert "convs.3.input.q" not in names and "convs.3.weight.dq" not in names
    assert "convs.2.input.q" in names and "convs.4.input.q" in names
    assert _inits(model)["convs.3.weight"].dtype == np.float32


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "tflite"])
def test_int_bias_graphs_in_onnx_runtime_match_the_integer_net(plain, x, name):
    """With weights this CPU's integer kernels hold exactly: 8 bits saturate ORT's int16
    intermediate on x86 without VNNI (7 bits are exact there), which is why the CPU schemes drop to 7."""
    from edgerepvgg.machine import needs_reduced_weight_range

    spec = minmax_spec(plain, constraints_for(name, weight_bits=7 if needs_reduced_weight_range() else 8), x)
    got = OnnxRuntimeRunner(build_model(plain, spec).SerializeToString(), threads=1)(x.numpy())
    ref = IntegerNet(plain, spec)(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).all()
    # ORT requantizes by a float32 multiplier where IntegerNet uses float64: a value within ~1e-7 of
    # a rounding boundary moves one step (quant/emulate.py). Measured over 40 seeded specs x 16
    # images on an AVX2 CPU: 6 of 640 rows differ, at most 2 of 16 in one draw, no argmax; the rest
    # are equal to float32 precision.
    exact = np.isclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max()).all(axis=1)
    assert exact.mean() >= 0.8, f"{(~exact).sum()} of {len(exact)} rows differ"


def test_tensorrt_graph_node_by_node_matches_the_integer_net(plain, x):
    """The float bias is only kept when ONNX Runtime runs the graph as written (optimize=False)."""
    spec = minmax_spec(plain, constraints_for("tensorrt"), x)
    exact = OnnxRuntimeRunner(build_model(plain, spec).SerializeToString(), threads=1, optimize=False)(x.numpy())
    ref = IntegerNet(plain, spec)(x).numpy()
    assert (exact.argmax(1) == ref.argmax(1)).all()
    # Float32 convolutions on dequantized values round where IntegerNet sums exactly: a value that
    # lands on a requantization boundary moves one step, and that step reaches a few logits
    # (measured: 5 of 80 by up to 9% on an AVX2 CPU, none on an AVX-512 one). Most stay exact.
    close = np.abs(exact - ref) <= 1e-3 * np.abs(ref).max()
    assert close.mean() >= 0.9, f"{(~close).sum()} of {close.size} logits differ"


def test_fixed_batch_graph_has_a_fixed_input_shape(plain):
    model = build_model(plain, batch=4)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    s = plain.input_spec
    assert dims == [4, s.channels, s.size, s.size]
    dyn = build_model(plain).graph.input[0].type.tensor_type.shape.dim[0]
    assert dyn.dim_param == "batch"


def test_activation_grid_wider_than_8_bits_is_refused(plain):
    spec = minmax_spec(plain, constraints_for("onnxruntime"))
    wide = TensorQuant(Scheme(16, signed=False, symmetric=False), (0.01,), (0,))
    layers = (replace(spec.layers[0], input=wide), *spec.layers[1:])
    with pytest.raises(UserError, match="at most 8-bit"):
        build_model(plain, replace(spec, layers=layers))
