"""Structural re-parameterization is exact: per block (property-based) and per variant."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerepvgg import InputSpec, PlainNet, create_model, fuse, reparameterize
from edgerepvgg._fuse import TOLERANCE, check_equivalence, to_plain
from edgerepvgg.models import VARIANTS, QARepVGGBlock, RepVGGBlock

from conftest import randomize_bn

fuse_mod = importlib.import_module("edgerepvgg._fuse")  # the package re-exports the function `fuse`


@settings(max_examples=40, deadline=None)
@given(
    block_cls=st.sampled_from([RepVGGBlock, QARepVGGBlock]),
    groups=st.sampled_from([1, 2, 4]),
    per_group_in=st.integers(1, 4),
    out_mult=st.sampled_from([1, 2]),
    stride=st.sampled_from([1, 2]),
    size=st.integers(3, 11),
    seed=st.integers(0, 2**16),
)
def test_block_fusion_is_exact_in_float64(block_cls, groups, per_group_in, out_mult, stride, size, seed):
    cin = groups * per_group_in
    cout = cin * out_mult
    block = randomize_bn(block_cls(cin, cout, stride=stride, groups=groups), seed).double().eval()
    x = torch.randn(2, cin, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = block(x)
    fused = copy.deepcopy(block).fuse_()
    assert fused.is_fused and not hasattr(fused, "rbr_dense")
    torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)


def test_identity_kernel_respects_groups():
    block = randomize_bn(RepVGGBlock(8, 8, groups=4)).double().eval()
    kernel, _ = block.fused_kernel_bias()
    assert kernel.shape == (8, 2, 3, 3)
    # Channel 5 lives in group 2 at position 1: the identity tap must be there, nowhere else.
    k3, _ = block.rbr_dense.fused()
    k1, _ = block.rbr_1x1.fused()
    identity_only = kernel - k3 - torch.nn.functional.pad(k1, [1, 1, 1, 1])
    nonzero = (identity_only.abs() > 1e-9).nonzero().tolist()
    assert [5, 1, 1, 1] in nonzero and len(nonzero) == 8


def test_fuse_is_idempotent():
    block = randomize_bn(RepVGGBlock(4, 4)).eval()
    block.fuse_()
    conv = block.rbr_reparam
    block.fuse_()
    assert block.rbr_reparam is conv


# Every variant with the RepVGG block; the QARepVGG block on a plain and a grouped variant (the
# block type does not change the network's shape, and the big variants cost ~15 s each here).
@pytest.mark.parametrize("name,block", [(n, "repvgg") for n in VARIANTS] + [("A0", "qarepvgg"), ("B1g4", "qarepvgg")])
def test_every_variant_fuses_equivalently(name, block):
    model = randomize_bn(create_model(name, num_classes=10, block=block), seed=len(name)).eval()
    plain = to_plain(model, InputSpec(size=32, resize=32))
    f64, f32 = check_equivalence(model, plain, batch=1)
    assert f64.max_rel <= 1e-9, f64
    assert f32.max_rel <= TOLERANCE[torch.float32], f32


def test_blockwise_float64_check_equals_the_whole_model_in_float64():
    """The float64 check holds one block in float64 at a time; it must report exactly what the
    whole model and its PlainNet, both in float64, report on the same input."""
    model = randomize_bn(create_model("A0", num_classes=10, block="qarepvgg"), seed=5).eval()
    spec = InputSpec(size=32, resize=32)
    plain = to_plain(model, spec)
    f64, _ = check_equivalence(model, plain, batch=2, seed=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model64 = copy.deepcopy(model).to(torch.float64)
    assert f64 == fuse_mod.compare_outputs(model64, to_plain(model64, spec), x)
    assert 0 < f64.max_abs and f64.ok


def test_plain_net_is_only_3x3_convs_relu_pool_linear():
    model = randomize_bn(create_model("A0", num_classes=10, in_chans=1)).eval()
    plain, checks = fuse(model, InputSpec(size=32, resize=32, channels=1, mean=(0.5,), std=(0.5,)))
    assert [c.ok for c in checks] == [True, True]
    kinds = {type(m).__name__ for m in plain.modules()} - {"PlainNet", "ModuleList"}
    assert kinds == {"Conv2d", "Linear"}
    assert len(plain.convs) == 22
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in plain.convs)
    assert plain(plain.example_input(3)).shape == (3, 10)


def test_input_model_is_not_mutated():
    model = randomize_bn(create_model("A0", num_classes=10)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse(model, InputSpec(size=32, resize=32))
    reparameterize(model)
    assert not any(b.is_fused for b in model.blocks())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_reparameterize_inplace_changes_the_model():
    model = create_model("A0", num_classes=10)
    assert reparameterize(model, inplace=True) is model
    assert all(b.is_fused for b in model.blocks())


def test_fused_model_fuses_to_the_same_plain_net():
    model = randomize_bn(create_model("A0", num_classes=10)).eval()
    spec = InputSpec(size=32, resize=32)
    a = to_plain(model, spec)
    b = to_plain(reparameterize(model), spec)
    x = a.example_input(2)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_fuse_refuses_a_wrong_fusion(monkeypatch):
    real = fuse_mod.to_plain

    def broken(model, spec=None):
        plain = real(model, spec)
        with torch.no_grad():
            plain.convs[3].bias.add_(1e-3)  # a small bias error, the kind a fusion bug makes
        return plain

    monkeypatch.setattr(fuse_mod, "to_plain", broken)
    model = randomize_bn(create_model("A0", num_classes=10)).eval()
    with pytest.raises(AssertionError, match="not equivalent"):
        fuse(model, InputSpec(size=32, resize=32))


def test_plain_net_rejects_non_3x3_layers():
    with pytest.raises(ValueError, match="3x3"):
        PlainNet([torch.nn.Conv2d(3, 8, 1)], torch.nn.Linear(8, 2), InputSpec())


@pytest.mark.parametrize("where, value, message", [
    ("stage1.0.rbr_dense.bn.running_var", float("nan"), "stage1.0.rbr_dense.bn.running_var holds 1 NaN value(s)"),
    ("stage2.1.rbr_1x1.conv.weight", float("inf"), "stage2.1.rbr_1x1.conv.weight holds 1 infinite value(s)"),
    ("linear.bias", float("-inf"), "linear.bias holds 1 infinite value(s)"),
])  # fmt: skip
def test_a_model_holding_nan_or_inf_is_a_user_error_naming_the_tensor(where, value, message):
    from edgerepvgg import UserError

    model = randomize_bn(create_model("A0", num_classes=10)).eval()
    tensor = model.get_buffer(where) if "running" in where else model.get_parameter(where)
    with torch.no_grad():
        tensor.view(-1)[0] = value
    with pytest.raises(UserError) as err:
        fuse(model, InputSpec(size=32, resize=32))
    assert str(err.value) == f"{message}; the checkpoint is corrupt"


def test_a_plain_net_knows_its_variant_block_and_layer_names():
    model = randomize_bn(create_model("B1g4", num_classes=10, block="qarepvgg")).eval()
    plain = to_plain(model, InputSpec(size=32, resize=32))
    assert (plain.variant, plain.block, plain.name) == ("B1g4", "qarepvgg", "qarepvgg_b1g4")
    assert plain.layer_names() == [f"convs.{i}" for i in range(len(plain.convs))] + ["head"]
    assert len(plain.layer_names()) == len(model.blocks()) + 1
    copied = copy.deepcopy(plain).double()
    assert (copied.variant, copied.block, copied.name) == ("B1g4", "qarepvgg", "qarepvgg_b1g4")
    hand_made = PlainNet([torch.nn.Conv2d(3, 8, 3, 1, 1)], torch.nn.Linear(8, 2), InputSpec())
    assert (hand_made.variant, hand_made.block, hand_made.name) == (None, None, "plain")
    assert hand_made.layer_names() == ["convs.0", "head"]
