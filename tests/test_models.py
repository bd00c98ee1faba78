"""The variant table, the builder and the two block types."""

from __future__ import annotations

import math

import pytest
import torch

from edgerepvgg import UserError, create_model, list_models
from edgerepvgg.models import QARepVGGBlock, RepVGGBlock

# Deploy-form parameter counts with 1000 classes, as published (RepVGG paper, Table 3 / official
# README, in millions, truncated to two decimals) and the exact counts our builder gives.
PUBLISHED_M = {
    "A0": 8.30, "A1": 12.78, "A2": 25.49, "B0": 14.33, "B1": 51.82, "B1g2": 41.36,
    "B1g4": 36.12, "B2": 80.31, "B2g4": 55.77, "B3": 110.96, "B3g4": 75.62,
}  # fmt: skip
EXACT = {
    "A0": 8_309_384, "A1": 12_789_864, "A2": 25_499_944, "B0": 14_339_048, "B1": 51_829_480,
    "B1g2": 41_360_104, "B1g4": 36_125_416, "B2": 80_315_112, "B2g4": 55_777_512,
    "B3": 110_960_872, "B3g4": 75_626_728,
}  # fmt: skip


def test_every_official_variant_is_registered():
    assert list_models() == list(PUBLISHED_M)


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_deploy_parameter_count_matches_published(name):
    model = create_model(name, deploy=True)
    n = sum(p.numel() for p in model.parameters())
    assert n == EXACT[name]
    assert math.floor(n / 1e4) / 100 == PUBLISHED_M[name]


def test_a0_structure():
    model = create_model("A0")
    assert [len(getattr(model, f"stage{s}")) for s in range(1, 5)] == [2, 4, 14, 1]
    assert model.stage0.out_channels == 48  # min(64, 64 * 0.75)
    assert [getattr(model, f"stage{s}")[0].out_channels for s in range(1, 5)] == [48, 96, 192, 1280]
    assert all(getattr(model, f"stage{s}")[0].stride == 2 for s in range(1, 5))
    assert all(b.stride == 1 for s in range(1, 5) for b in list(getattr(model, f"stage{s}"))[1:])


def test_stem_width_is_capped_at_64():
    assert create_model("B2").stage0.out_channels == 64


@pytest.mark.parametrize("name,groups", [("B1g2", 2), ("B1g4", 4), ("B1", 1)])
def test_groups_sit_on_even_official_layer_indices(name, groups):
    model = create_model(name)
    blocks = model.blocks()  # index in this list == official layer index
    for idx, block in enumerate(blocks):
        expected = groups if groups > 1 and idx % 2 == 0 and 2 <= idx <= 26 else 1
        assert block.groups == expected, idx
    assert len(blocks) == 28


def test_identity_branch_only_where_shapes_match():
    model = create_model("A0")
    for block in model.blocks():
        has = block.rbr_identity is not None
        assert has == (block.stride == 1 and block.in_channels == block.out_channels)


def test_qarepvgg_block_layout():
    block = QARepVGGBlock(8, 8)
    names = {n for n, _ in block.named_children()}
    assert names == {"rbr_dense", "rbr_1x1", "bn", "act"}
    assert isinstance(block.rbr_1x1, torch.nn.Conv2d) and block.rbr_1x1.kernel_size == (1, 1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in [block.rbr_1x1])


@pytest.mark.parametrize("block", ["repvgg", "qarepvgg"])
@pytest.mark.parametrize("size", [32, 57, 96])
def test_any_resolution_classes_and_channels(block, size):
    model = create_model("A0", num_classes=7, in_chans=1, block=block).eval()
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


def test_names_are_forgiving_and_unknown_names_are_user_errors():
    assert create_model("repvgg_a0").config.name == "A0"
    assert create_model("RepVGG-B1g4").config.name == "B1g4"
    with pytest.raises(UserError, match="unknown model 'A9'"):
        create_model("A9")
    with pytest.raises(UserError, match="unknown block type"):
        create_model("A0", block="resnet")


def test_deploy_model_has_only_reparam_convs():
    model = create_model("A0", deploy=True)
    for block in model.blocks():
        assert block.is_fused
        assert {n for n, _ in block.named_children()} == {"rbr_reparam", "act"}


def test_block_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="divisible"):
        RepVGGBlock(6, 6, groups=4)


def test_block_type_is_validated_in_one_place_as_a_user_error():
    from edgerepvgg.models import VARIANTS, RepVGG, block_class

    assert block_class("qarepvgg").__name__ == "QARepVGGBlock"
    for build in (lambda: create_model("A0", block="resnet"), lambda: RepVGG(VARIANTS["A0"], block="resnet"),
                  lambda: block_class("resnet")):  # fmt: skip
        with pytest.raises(UserError) as err:
            build()
        assert str(err.value) == "unknown block type 'resnet'; choose one of repvgg, qarepvgg"
