"""QuantSpec, grids, quantization parameters and the constraint sets."""

from __future__ import annotations

import json

import pytest
import torch

from edgerepvgg import UserError
from edgerepvgg.quant import CONSTRAINT_SETS, QuantSpec, Scheme, TensorQuant, constraints_for, qparams

from quant_helpers import minmax_spec, tiny_plain


@pytest.mark.parametrize(
    "scheme,qmin,qmax",
    [(Scheme(8, True, True), -127, 127), (Scheme(8, True, False), -128, 127), (Scheme(8, False, False), 0, 255),
     (Scheme(7, True, True, per_channel=True), -63, 63), (Scheme(4, False, True), 0, 15)],
)  # fmt: skip
def test_grid_bounds(scheme, qmin, qmax):
    assert (scheme.qmin, scheme.qmax) == (qmin, qmax)


def test_qparams_symmetric_signed():
    scale, zp = qparams(-2.0, 1.27, Scheme(8, True, True))
    assert zp == 0 and scale == pytest.approx(2.0 / 127)


def test_qparams_affine_unsigned_relu_output_uses_every_level():
    scale, zp = qparams(0.0, 5.1, Scheme(8, False, False))
    assert zp == 0 and scale == pytest.approx(5.1 / 255)


def test_qparams_affine_signed_with_negative_range():
    # [-1, 3] on int8 [-128, 127]: scale 4/255, zero point -128 + 1/(4/255) = -64.25 -> -64
    scale, zp = qparams(-1.0, 3.0, Scheme(8, True, False))
    assert scale == pytest.approx(4 / 255) and zp == -64


def test_qparams_range_always_contains_zero():
    scale, zp = qparams(2.0, 4.0, Scheme(8, False, False))  # widened to [0, 4]
    assert zp == 0 and scale == pytest.approx(4 / 255)


def test_tensor_quant_validates():
    with pytest.raises(ValueError, match="positive"):
        TensorQuant(Scheme(), (0.0,), (0,))
    with pytest.raises(ValueError, match="zero point 0"):
        TensorQuant(Scheme(8, True, True), (0.1,), (3,))
    with pytest.raises(ValueError, match="grid"):
        TensorQuant(Scheme(8, False, False), (0.1,), (300,))


def test_constraint_sets_follow_the_targets():
    trt = CONSTRAINT_SETS["tensorrt"]
    assert trt.activation.symmetric and trt.activation.signed and not trt.int_bias
    assert CONSTRAINT_SETS["openvino"].activation == Scheme(8, signed=False, symmetric=False)
    tfl = CONSTRAINT_SETS["tflite"]
    assert tfl.activation.signed and not tfl.activation.symmetric and tfl.int_output and tfl.rounding == "half_away"
    assert all(c.weight.per_channel and c.weight.symmetric for c in CONSTRAINT_SETS.values())


@pytest.fixture
def host_cpu(monkeypatch):
    """Make this host an x86 CPU with the given /proc/cpuinfo flags (None: nothing readable)."""
    from edgerepvgg import machine

    def set_flags(flags: str | None, arch: str = "x86_64") -> None:
        monkeypatch.setattr("platform.machine", lambda: arch)
        monkeypatch.setattr(machine, "_read_cpuinfo", lambda: None if flags is None else f"flags\t: {flags}\n")
        monkeypatch.setattr(machine, "_numpy_cpu_features", lambda: None)
        machine.host_features.cache_clear()

    yield set_flags
    machine.host_features.cache_clear()


def test_the_7_bit_rule_is_a_field_of_the_cpu_constraint_sets():
    narrow = {name for name, c in CONSTRAINT_SETS.items() if c.narrow_weights_without_vnni}
    assert narrow == {"openvino", "onnxruntime"}


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_host_without_vnni_gets_a_7_bit_first_conv_named_for_it(host_cpu, name):
    host_cpu("fpu avx2 fma")
    c = constraints_for(name)
    assert (c.name, c.first_layer_weight_bits, c.weight.bits) == (f"{name}-w7first", 7, 8)
    host_cpu("fpu avx2 fma avx512_vnni")
    assert constraints_for(name) == CONSTRAINT_SETS[name]


def test_gpu_and_arm_sets_ignore_the_host_cpu(host_cpu):
    host_cpu("fpu avx2 fma")
    assert constraints_for("tensorrt") == CONSTRAINT_SETS["tensorrt"]
    assert constraints_for("tflite") == CONSTRAINT_SETS["tflite"]


def test_an_arm_host_keeps_8_bit_weights(host_cpu):
    host_cpu("fp asimd", arch="aarch64")
    assert constraints_for("openvino") == CONSTRAINT_SETS["openvino"]


def test_an_unknown_host_gets_the_safe_7_bits(host_cpu):
    host_cpu(None)
    assert constraints_for("onnxruntime").layer_weight(0).bits == 7


def test_the_device_flags_decide_not_this_host(host_cpu):
    host_cpu("fpu avx2 fma avx512_vnni")  # a VNNI build machine...
    assert constraints_for("openvino", cpu_flags=("avx2", "fma")).name == "openvino-w7first"  # ...for an older Xeon
    host_cpu("fpu avx2 fma")  # a build machine without VNNI...
    assert constraints_for("openvino", cpu_flags=("avx2", "avx512_vnni")) == CONSTRAINT_SETS["openvino"]  # ...for a VNNI device
    assert constraints_for("onnxruntime", cpu_flags=("neon", "asimd")) == CONSTRAINT_SETS["onnxruntime"]  # ...for Arm
    assert constraints_for("openvino", cpu_flags=("avx2",), host=False).name == "openvino-w7first"  # flags still decide


def test_weight_bits_override_the_device_and_the_host(host_cpu):
    host_cpu("fpu avx2")
    assert constraints_for("openvino", weight_bits=8) == CONSTRAINT_SETS["openvino"]
    assert constraints_for("openvino", weight_bits=8, cpu_flags=["avx2"]) == CONSTRAINT_SETS["openvino"]
    assert constraints_for("openvino", weight_bits=7).name == "openvino-w7"  # 7 bits everywhere, on request
    assert constraints_for("openvino", weight_bits=7).layer_weight(5).bits == 7
    assert constraints_for("openvino", weight_bits=6, cpu_flags=["avx512_vnni"]).name == "openvino-w6"


def test_host_false_without_flags_keeps_the_declared_set(host_cpu):
    host_cpu("fpu avx2")
    assert constraints_for("openvino", host=False) == CONSTRAINT_SETS["openvino"]


def test_cpu_flags_as_one_string_is_a_callers_bug():
    with pytest.raises(TypeError, match="collection of flag names"):
        constraints_for("openvino", cpu_flags="avx2")


def test_the_rule_travels_with_the_spec_and_old_specs_still_load():
    spec = minmax_spec(tiny_plain(), CONSTRAINT_SETS["openvino"].with_weight_bits(7))
    again = QuantSpec.from_json(spec.to_json())
    assert again.constraints.narrow_weights_without_vnni and again.constraints.name == "openvino-w7"
    d = json.loads(spec.to_json())
    del d["constraints"]["narrow_weights_without_vnni"]  # a spec written before the field existed
    assert not QuantSpec.from_json(json.dumps(d)).constraints.narrow_weights_without_vnni


def test_unknown_constraint_set_is_a_user_error():
    with pytest.raises(UserError, match="unknown constraint set 'coreml'"):
        constraints_for("coreml")


def test_spec_json_round_trip_is_exact():
    plain = tiny_plain()
    for name in CONSTRAINT_SETS:
        spec = minmax_spec(plain, CONSTRAINT_SETS[name])
        again = QuantSpec.from_json(spec.to_json())
        assert again == spec and again.sha256 == spec.sha256
        assert json.loads(spec.to_json())["version"] == 1


def test_spec_requires_output_quantizer_exactly_for_integer_output_targets():
    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["tensorrt"])
    with pytest.raises(ValueError, match="output quantizer"):
        QuantSpec(CONSTRAINT_SETS["tflite"], spec.layers, spec.pool, None, spec.model_hash)


@pytest.mark.parametrize("text", ["{", "[]", '{"version": 1}', '{"version": 1, "layers": [{"name": "x"}]}'])
def test_bad_spec_json_is_a_user_error(text):
    with pytest.raises(UserError, match="QuantSpec"):
        QuantSpec.from_json(text)


def test_newer_spec_version_is_refused():
    spec = minmax_spec(tiny_plain(), CONSTRAINT_SETS["tensorrt"])
    d = json.loads(spec.to_json())
    d["version"] = 99
    with pytest.raises(UserError, match="newer"):
        QuantSpec.from_json(json.dumps(d))


def test_model_hash_changes_with_weights():
    from edgerepvgg.quant import model_hash

    plain = tiny_plain()
    h = model_hash(plain)
    with torch.no_grad():
        plain.convs[0].weight[0, 0, 0, 0] += 1e-3
    assert model_hash(plain) != h


@pytest.mark.parametrize("bits", [1, 9, 20, 0, -3])
def test_weight_bits_outside_2_to_8_are_a_user_error(bits):
    with pytest.raises(UserError) as err:
        constraints_for("tensorrt", weight_bits=bits)
    assert str(err.value) == f"--weight-bits must be between 2 and 8, got {bits}"


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
def test_weight_bits_2_to_8_are_accepted(bits):
    assert constraints_for("openvino", weight_bits=bits).weight.bits == bits


def test_resolve_constraints_takes_a_name_or_a_value_and_checks_bits_the_same_way():
    from edgerepvgg.quant.spec import resolve_constraints

    c = CONSTRAINT_SETS["tflite"]
    assert resolve_constraints(c) is c
    assert resolve_constraints("tflite", weight_bits=8) == c
    assert resolve_constraints(c, weight_bits=6).weight.bits == 6
    with pytest.raises(UserError, match="between 2 and 8, got 20"):
        resolve_constraints(c, weight_bits=20)
    with pytest.raises(TypeError, match="a Constraints or a constraint-set name"):
        resolve_constraints(None)  # a caller's bug, not a user's mistake


def test_require_spec_for_is_the_one_check_and_uses_the_model_layer_names():
    from dataclasses import replace

    from edgerepvgg.quant.spec import require_spec_for

    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["tensorrt"])
    require_spec_for(plain, spec)  # its own spec passes
    renamed = replace(spec, layers=tuple(replace(ly, name=f"x{ly.name}") for ly in spec.layers))
    with pytest.raises(UserError, match="do not match"):
        require_spec_for(plain, renamed)
    with pytest.raises(UserError, match="made for another model"):
        require_spec_for(tiny_plain(seed=1), spec)


def test_narrowing_a_layer_keeps_its_clip_range_and_only_that_layer():
    from edgerepvgg.quant.spec import narrow_layer_weights

    spec = minmax_spec(tiny_plain(), CONSTRAINT_SETS["onnxruntime"])
    narrow = narrow_layer_weights(spec, ["convs.0"], 7)
    first, old = narrow.layers[0].weight, spec.layers[0].weight
    assert first.scheme.bits == 7 and (first.scheme.qmin, first.scheme.qmax) == (-63, 63)
    assert [s * 63 for s in first.scale] == pytest.approx([s * 127 for s in old.scale])  # same max|w|
    assert narrow.layers[1:] == spec.layers[1:] and narrow.pool == spec.pool
    assert narrow.constraints.name == "onnxruntime-w7first"  # the spec says what it is for
    with pytest.raises(UserError, match="no layer 'convs.99'"):
        narrow_layer_weights(spec, ["convs.99"], 7)


def test_a_first_layer_rule_gives_only_the_first_conv_its_width():
    c = CONSTRAINT_SETS["openvino"].with_first_layer_weight_bits(7)
    assert c.name == "openvino-w7first"
    assert c.layer_weight(0).bits == 7 and c.layer_weight(1).bits == 8 and c.weight.bits == 8
    assert c.with_weight_bits(6).first_layer_weight_bits is None  # an explicit width applies everywhere
    with pytest.raises(ValueError, match="first_layer_weight_bits"):
        CONSTRAINT_SETS["openvino"].with_first_layer_weight_bits(9)


def test_a_spec_holds_its_first_conv_at_the_width_its_constraints_say():
    # producers (calibrate, these tests' helper) give each layer constraints.layer_weight(i)
    c = CONSTRAINT_SETS["openvino"].with_first_layer_weight_bits(7)
    spec = minmax_spec(tiny_plain(), c)
    assert [layer.weight.scheme.bits for layer in spec.layers] == [7] + [8] * (len(spec.layers) - 1)
    again = QuantSpec.from_json(spec.to_json())
    assert again == spec and again.sha256 == spec.sha256 and again.constraints.first_layer_weight_bits == 7


def test_the_referee_computes_the_first_conv_on_its_7_bit_grid():
    from edgerepvgg.quant.emulate import IntegerNet

    plain = tiny_plain()
    spec = minmax_spec(plain, CONSTRAINT_SETS["openvino"].with_first_layer_weight_bits(7))
    net = IntegerNet(plain, spec)
    assert float(net.weights[0].abs().max()) == 63 and float(net.weights[1].abs().max()) == 127
