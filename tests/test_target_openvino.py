"""OpenVINO target: the IR pair on disk, FP32 numerics against PlainNet, INT8 numerics against
the integer referee, and the INT8 coverage check read from OpenVINO's runtime model."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerepvgg import UserError
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.targets import get_target, list_targets
from edgerepvgg.targets.openvino import OpenVINOTarget, check_int8, int8_coverage

from quant_helpers import minmax_spec, tiny_plain

REASON = OpenVINOTarget().available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

OPENVINO = constraints_for("openvino")
ALL_LAYERS = [f"convs.{i}" for i in range(22)] + ["head"]  # RepVGG-A0: 22 convs, then the head


@pytest.fixture(scope="module")
def plain():
    return tiny_plain()


@pytest.fixture(scope="module")
def spec(plain):
    return minmax_spec(plain, OPENVINO)


@pytest.fixture(scope="module")
def fp32(plain, tmp_path_factory):
    return OpenVINOTarget().compile(plain, None, tmp_path_factory.mktemp("ov-fp32"))


@pytest.fixture(scope="module")
def int8(plain, spec, tmp_path_factory):
    return OpenVINOTarget().compile(plain, spec, tmp_path_factory.mktemp("ov-int8"), "int8")


def _inputs(plain, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = plain.input_spec
    return torch.randn(n, s.channels, s.size, s.size, generator=gen)


def test_registry_finds_the_target_and_it_runs_here():
    assert isinstance(get_target("openvino"), OpenVINOTarget)
    status = {t.name: t for t in list_targets()}["openvino"]
    assert status.available and status.precisions == ("fp32", "int8") and status.constraint_set == "openvino"


# ---------------------------------------------------------------------------------------------
# The artifact on disk


def test_ir_pair_is_written_in_full_precision_and_readable(fp32, plain):
    import openvino as ov

    out = fp32.path.parent
    assert fp32.path == out / "model.xml" and fp32.precision == "fp32"
    assert {p.name for p in out.iterdir()} == {"model.xml", "model.bin", "model.onnx"}  # no temp leftovers
    assert set(fp32.files) == {out / "model.xml", out / "model.bin"} and Path(fp32.info["onnx"]) == out / "model.onnx"
    model = ov.Core().read_model(str(fp32.path))
    shape = model.input(0).get_partial_shape()
    assert shape[0].is_dynamic and [shape[i].get_length() for i in (1, 2, 3)] == [1, 16, 16]
    assert model.output(0).get_partial_shape()[1].get_length() == 5
    n_params = sum(p.numel() for p in plain.parameters())
    assert (out / "model.bin").stat().st_size >= 4 * n_params  # float32 weights: not compressed to fp16
    assert fp32.info["convs"] == 22 and fp32.info["int8_convs"] == 0 and not fp32.info["head_int8"]
    assert fp32.info["ir"] == str(fp32.path)


def test_recompiling_into_the_same_folder_replaces_the_pair(plain, spec, tmp_path):
    target = OpenVINOTarget()
    target.compile(plain, None, tmp_path)
    fp32_bin = (tmp_path / "model.bin").stat().st_size
    art = target.compile(plain, spec, tmp_path, "int8")
    assert {p.name for p in tmp_path.iterdir()} == {"model.xml", "model.bin", "model.onnx"}
    assert (tmp_path / "model.bin").stat().st_size < fp32_bin / 2  # int8 weights now
    runner = target.load(art, threads=1)
    x = _inputs(plain, 4)
    np.testing.assert_allclose(runner(x), IntegerNet(plain, spec)(x).numpy(), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Numerics


def test_fp32_matches_the_plain_net_at_any_batch_size(fp32, plain):
    runner = OpenVINOTarget().load(fp32, threads=1)
    for n in (1, 7, 16, 2):  # the IR keeps the batch dimension dynamic
        x = _inputs(plain, n, seed=n)
        with torch.no_grad():
            ref = plain(x).numpy()
        got = runner(x)  # a torch tensor ...
        assert got.dtype == np.float32 and got.shape == (n, 5)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
        np.testing.assert_array_equal(runner(x.numpy()), got)  # ... or an ndarray


def test_int8_runs_every_layer_in_int8_and_matches_the_integer_net(int8, plain, spec):
    assert int8.info["convs"] == 22 and int8.info["int8_convs"] == 22 and int8.info["float_convs"] == []
    assert int8.info["head_int8"]
    assert list(int8.info["runtime_precisions"]) == ALL_LAYERS  # execution order, our names
    assert set(int8.info["runtime_precisions"].values()) <= {"u8", "i8"}
    runner = OpenVINOTarget().load(int8, threads=1)
    x = _inputs(plain, 64, seed=3)
    got, ref = runner(x), IntegerNet(plain, spec)(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
    # Logits are (int32 accumulator) * s_in * s_w: most rows equal to float32 precision.
    close = np.isclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()).all(axis=1)
    assert close.mean() >= 0.9


@pytest.mark.slow
def test_bundled_model_int8_agrees_with_the_integer_net(tmp_path, one_thread):
    from edgerepvgg.checkpoints import load_checkpoint
    from edgerepvgg.data import calibration_images, evaluation_set
    from edgerepvgg.evaluate import agreement, predict, topk_accuracy
    from edgerepvgg._fuse import fuse
    from edgerepvgg.quant.calibrate import calibrate

    model, meta = load_checkpoint()
    plain, _ = fuse(model, meta.input_spec)
    spec = calibrate(plain, calibration_images(plain.input_spec), OPENVINO, progress=False)
    data = evaluation_set(plain.input_spec, limit=300)
    assert len(data) == 300
    target = OpenVINOTarget()
    art = target.compile(plain, spec, tmp_path, "int8")
    assert art.info["int8_convs"] == art.info["convs"] == len(plain.convs) and art.info["head_int8"]
    got = predict(target.load(art, threads=1), data, batch_size=100)
    ref = predict(IntegerNet(plain, spec), data, batch_size=100)
    assert agreement(got, ref).top1 >= 0.995
    assert topk_accuracy(got, data.labels) > 0.85  # the bundled model's FP32 top-1 is 92%


# ---------------------------------------------------------------------------------------------
# The INT8 coverage check


def _float_weights_graph(plain, spec, layer: str, path: Path) -> Path:
    """The Q/DQ graph with one conv's weight DequantizeLinear replaced by the float weights: its
    input is still quantized, but OpenVINO needs FakeQuantize on both, so that conv runs in float."""
    import onnx
    from onnx import numpy_helper

    from edgerepvgg.targets.onnx_graph import build_model

    model = build_model(plain, spec)
    graph = model.graph
    conv = next(n for n in graph.node if n.name == layer)
    dq = next(n for n in graph.node if n.name == f"{layer}.weight.dq")
    assert conv.input[1] == dq.output[0]
    weight = plain.convs[int(layer.split(".")[1])].weight.detach().numpy()
    graph.initializer.append(numpy_helper.from_array(weight, f"{layer}.weight.float"))
    conv.input[1] = f"{layer}.weight.float"
    graph.node.remove(dq)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_check_names_a_quantized_layer_that_runs_in_float(plain, spec, tmp_path):
    coverage = int8_coverage(_float_weights_graph(plain, spec, "convs.2", tmp_path / "broken.onnx"), threads=1)
    assert coverage.float_convs == ["convs.2"] and len(coverage.int8_convs) == 21
    assert coverage.precisions["convs.2"] == "f32"
    with pytest.raises(UserError, match=r"runs 1 of 22 convolutions in floating point .*: convs\.2 \(f32\)"):
        check_int8(coverage, spec)


def test_mixed_precision_spec_compiles_and_the_check_sees_the_float_layer(plain, spec, tmp_path):
    layers = list(spec.layers)
    layers[2] = replace(layers[2], precision="float")
    mixed = replace(spec, layers=tuple(layers))
    art = OpenVINOTarget().compile(plain, mixed, tmp_path, "int8")  # the spec asks for it: no error
    assert art.info["float_convs"] == ["convs.2"] and art.info["int8_convs"] == 21
    coverage = int8_coverage(art.path, threads=1)
    check_int8(coverage, mixed)  # passes: convs.2 is float by design
    with pytest.raises(UserError, match=r"1 of 22 convolutions in floating point .*convs\.2"):
        check_int8(coverage, ALL_LAYERS)  # claiming every layer should be INT8
    with pytest.raises(UserError, match=r"no convolution for convs\.99"):
        check_int8(coverage, ["convs.99"])
    runner = OpenVINOTarget().load(art, threads=1)
    x = _inputs(plain, 32, seed=5)
    got, ref = runner(x), IntegerNet(plain, mixed)(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_fp32_artifact_reports_no_int8_layers(fp32):
    assert set(fp32.info["runtime_precisions"].values()) == {"f32"}
    assert len(fp32.info["float_convs"]) == 22


# ---------------------------------------------------------------------------------------------
# Options and bad input


def test_threads_and_hint_reach_the_compiled_model(fp32, plain):
    import openvino as ov

    target = OpenVINOTarget()
    x = _inputs(plain, 3)
    outs = []
    for threads, hint in ((1, "latency"), (2, "throughput"), (None, "latency")):
        runner = target.load(fp32, threads=threads, hint=hint)
        assert str(runner.compiled.get_property("PERFORMANCE_HINT")) == hint.upper()
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        if threads is not None:
            assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == threads
        outs.append(runner(x))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_one_line_user_error(plain, spec, fp32, tmp_path):
    target = OpenVINOTarget()
    with pytest.raises(UserError, match="needs a QuantSpec"):
        target.compile(plain, None, tmp_path, "int8")
    with pytest.raises(UserError, match="not 'fp16'"):
        target.compile(plain, spec, tmp_path, "fp16")
    other = copy.deepcopy(plain)
    with torch.no_grad():
        other.convs[0].bias.add_(1.0)
    with pytest.raises(UserError, match="another model"):
        target.compile(other, spec, tmp_path, "int8")
    with pytest.raises(UserError, match="unknown OpenVINO performance hint 'fast'"):
        target.load(fp32, hint="fast")
    with pytest.raises(UserError, match="positive integer"):
        target.load(fp32, threads=0)
    with pytest.raises(UserError, match="no OpenVINO IR"):
        target.load(replace(fp32, path=tmp_path / "missing.xml"))
    with pytest.raises(UserError, match="NCHW"):
        target.load(fp32, threads=1)(np.zeros((16, 16), np.float32))
    assert not (tmp_path / "model.xml").exists()
