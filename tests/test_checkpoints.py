"""Checkpoint import and export: foreign layouts, wrappers, our own format, bad inputs, variant detection.

The foreign layouts are written here from the upstream sources, not by inverting the project's maps,
so a wrong map in :mod:`edgerepvgg.checkpoints` fails these tests:

- official: DingXiaoH/RepVGG ``repvgg.py`` (``stage0``..``stage4``, ``rbr_dense.{conv,bn}``,
  ``rbr_1x1.{conv,bn}``, ``rbr_identity``, ``rbr_reparam``, ``linear``); QARepVGG blocks as in the
  authors' YOLOv6 release (``rbr_dense.{conv,bn}``, bare ``rbr_1x1``, post-sum ``bn``);
- timm: ``timm/models/byobnet.py`` (``stem`` is a RepVggBlock, ``stages.{0..3}.{i}``,
  ``conv_kxk``/``conv_1x1`` are ConvNormAct with ``conv`` and ``bn``, ``identity`` a BatchNormAct2d,
  ``reparam_conv``, ``head.fc``);
- MMPretrain: ``mmpretrain/models/backbones/repvgg.py`` (``backbone.stem``, ``backbone.stage_{1..4}``,
  ``branch_3x3``/``branch_1x1`` with ``conv`` and ``norm``, ``branch_norm``, ``branch_reparam``) and
  ``LinearClsHead`` (``head.fc``); the same renaming as ``tools/model_converters/repvgg_to_mmpretrain.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgerepvgg.checkpoints import ModelMeta, infer_meta, load_checkpoint, meta_for, save_checkpoint, to_official
from edgerepvgg.data import fashion_mnist_spec
from edgerepvgg.errors import UserError
from edgerepvgg._fuse import reparameterize
from edgerepvgg.models import VARIANTS, RepVGG, create_model

from conftest import randomize_bn

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Official (our) layout -> foreign layouts, token by token as the upstream modules name them


def _stage_index(token: str) -> int | None:
    m = re.fullmatch(r"stage(\d)", token)
    return int(m.group(1)) if m else None


def to_timm_key(key: str) -> str:
    """timm ByobNet: stem block, ``stages`` numbered from 0, ConvNormAct ``conv``/``bn``, ``head.fc``."""
    names = {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity", "rbr_reparam": "reparam_conv"}
    out = []
    for token in key.split("."):
        s = _stage_index(token)
        if s == 0:
            out.append("stem")
        elif s is not None:
            out += ["stages", str(s - 1)]
        elif token == "linear":
            out += ["head", "fc"]
        else:
            out.append(names.get(token, token))
    return ".".join(out)


def to_mmpretrain_key(key: str) -> str:
    """MMPretrain ImageClassifier: ``backbone.stem``, ``backbone.stage_N`` numbered from 1, ``norm``."""
    names = {"rbr_dense": "branch_3x3", "rbr_1x1": "branch_1x1", "rbr_identity": "branch_norm",
             "rbr_reparam": "branch_reparam", "bn": "norm"}  # fmt: skip
    out = []
    for token in key.split("."):
        s = _stage_index(token)
        if s == 0:
            out += ["backbone", "stem"]
        elif s is not None:
            out += ["backbone", f"stage_{s}"]
        elif token == "linear":
            out += ["head", "fc"]
        else:
            out.append(names.get(token, token))
    return ".".join(out)


FOREIGN: dict[str, Callable[[str], str]] = {"official": lambda k: k, "timm": to_timm_key, "mmpretrain": to_mmpretrain_key}

# Keys that must exist in an A0 state dict of each layout: facts read off the upstream modules,
# which pin the helpers above (and through them the project's maps) to the real names.
KNOWN_KEYS = {
    ("timm", False): ["stem.conv_kxk.conv.weight", "stem.conv_1x1.bn.running_var", "stages.0.1.identity.weight",
                      "stages.2.13.conv_kxk.bn.num_batches_tracked", "stages.3.0.conv_1x1.conv.weight", "head.fc.weight"],
    ("timm", True): ["stem.reparam_conv.weight", "stages.0.0.reparam_conv.bias", "stages.3.0.reparam_conv.weight",
                     "head.fc.bias"],
    ("mmpretrain", False): ["backbone.stem.branch_3x3.conv.weight", "backbone.stem.branch_3x3.norm.running_mean",
                            "backbone.stage_1.1.branch_norm.weight", "backbone.stage_3.13.branch_1x1.norm.bias",
                            "backbone.stage_4.0.branch_1x1.conv.weight", "head.fc.weight"],
    ("mmpretrain", True): ["backbone.stem.branch_reparam.weight", "backbone.stage_1.0.branch_reparam.bias",
                           "backbone.stage_4.0.branch_reparam.weight", "head.fc.bias"],
}  # fmt: skip


def rename(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    return {FOREIGN[layout](k): v for k, v in state.items()}


@pytest.mark.parametrize("layout,fused", sorted(KNOWN_KEYS))
def test_reverse_maps_produce_the_upstream_names(layout, fused):
    with torch.device("meta"):
        state = create_model("A0", num_classes=10, deploy=fused).state_dict()
    keys = set(rename(state, layout))
    assert set(KNOWN_KEYS[layout, fused]) <= keys
    assert len(keys) == len(state)


# ---------------------------------------------------------------------------------------------
# Foreign checkpoints load into an identical network


def _source(block: str, fused: bool) -> RepVGG:
    model = randomize_bn(create_model("A0", num_classes=10, in_chans=3, block=block), seed=1).eval()
    return reparameterize(model) if fused else model


@pytest.fixture(scope="module")
def sources() -> dict[tuple[str, bool], tuple[RepVGG, torch.Tensor]]:
    """A0 source models with randomized BN, train-time and fused, with their reference outputs."""
    out = {}
    with torch.no_grad():
        for block in ("repvgg", "qarepvgg"):
            train = _source(block, fused=False)
            for fused, model in ((False, train), (True, reparameterize(train))):
                out[block, fused] = (model, model(X))
    return out


def _write(path: Path, state: dict[str, torch.Tensor], wrapper: str) -> Path:
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if wrapper == "safetensors":
        save_file(state, str(path))
        return path
    wrapped = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3, "meta": {"note": "mmengine-style"}},
        "model": {"model": state, "optimizer": {"lr": 0.1}, "max_accuracy": 72.4},
        "module.": {"module." + k: v for k, v in state.items()},
        "module.+state_dict": {"state_dict": {"module." + k: v for k, v in state.items()}},
    }[wrapper]
    torch.save(wrapped, path)
    return path


def _check_loaded(path: Path, expected: torch.Tensor, block: str, fused: bool, layout: str) -> None:
    model, meta = load_checkpoint(path)
    assert (meta.variant, meta.block, meta.num_classes, meta.in_chans, meta.fused) == ("A0", block, 10, 3, fused)
    assert meta.extra["source_layout"] == layout
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("layout", ["official", "timm", "mmpretrain"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_foreign_layout_loads_exactly(tmp_path, sources, layout, fused, fmt):
    model, expected = sources["repvgg", fused]
    state = rename(model.state_dict(), layout)
    wrapper = {"official": "model", "timm": "plain", "mmpretrain": "state_dict"}[layout] if fmt == "pth" else fmt
    path = _write(tmp_path / f"ckpt.{fmt}", state, wrapper)
    _check_loaded(path, expected, "repvgg", fused, layout)


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "module.", "module.+state_dict"])
def test_wrappers_and_prefixes(tmp_path, sources, wrapper):
    model, expected = sources["repvgg", False]
    path = _write(tmp_path / "ckpt.pth", rename(model.state_dict(), "timm"), wrapper)
    _check_loaded(path, expected, "repvgg", False, "timm")


@pytest.mark.parametrize("fused", [False, True], ids=["train", "deploy"])
def test_qarepvgg_official_layout(tmp_path, sources, fused):
    model, expected = sources["qarepvgg", fused]
    keys = set(model.state_dict())
    if not fused:  # the authors' block: bare 1x1 conv, BN after the sum
        assert {"stage1.1.rbr_1x1.weight", "stage1.1.bn.running_var"} <= keys and "stage1.1.rbr_identity.weight" not in keys
    path = _write(tmp_path / "qa.pth", model.state_dict(), "module.")
    # A fused QARepVGG is a plain 3x3 stack, indistinguishable from a fused RepVGG.
    _check_loaded(path, expected, "repvgg" if fused else "qarepvgg", fused, "official")


def test_safetensors_content_is_recognized_whatever_the_suffix(tmp_path, sources):
    model, expected = sources["repvgg", True]
    path = _write(tmp_path / "weights.safetensors", rename(model.state_dict(), "timm"), "safetensors")
    path = path.rename(tmp_path / "weights.bin")
    _check_loaded(path, expected, "repvgg", True, "timm")


def test_timm_training_checkpoint_with_args(tmp_path, sources):
    """timm's trainer pickles its argparse.Namespace beside the weights: plain data, safe to read."""
    import argparse

    model, expected = sources["repvgg", False]
    ckpt = {"epoch": 5, "arch": "repvgg_a0", "state_dict": rename(model.state_dict(), "timm"),
            "args": argparse.Namespace(model="repvgg_a0", lr=0.1), "version": 2}  # fmt: skip
    torch.save(ckpt, tmp_path / "checkpoint-5.pth.tar")
    _check_loaded(tmp_path / "checkpoint-5.pth.tar", expected, "repvgg", False, "timm")


def test_variant_override(tmp_path, sources):
    model, expected = sources["repvgg", False]
    path = _write(tmp_path / "a0.pth", model.state_dict(), "plain")
    loaded, meta = load_checkpoint(path, variant="repvgg-a0")
    assert meta.variant == "A0"
    with pytest.raises(UserError, match="unknown model"):
        load_checkpoint(path, variant="Z9")
    with pytest.raises(UserError, match="shape"):
        load_checkpoint(path, variant="A1")


# ---------------------------------------------------------------------------------------------
# Our own format


@pytest.mark.parametrize("block,fused", [("repvgg", False), ("qarepvgg", False), ("qarepvgg", True)])
def test_own_format_round_trip(tmp_path, sources, block, fused):
    model, expected = sources[block, fused]
    meta = meta_for(model, accuracy=0.9)
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta and loaded_meta.block == block and loaded_meta.fused == fused
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)


def test_own_format_keeps_input_spec_and_grayscale(tmp_path):
    model = randomize_bn(create_model("A0", num_classes=10, in_chans=1, block="qarepvgg"), seed=2).eval()
    meta = meta_for(model, fashion_mnist_spec())
    path = save_checkpoint(tmp_path / "g.safetensors", model, meta)
    _, loaded = load_checkpoint(path)
    assert loaded.input_spec == fashion_mnist_spec() and loaded.in_chans == 1
    assert "source_layout" not in loaded.extra


def test_own_format_half_loads_as_float32(tmp_path, sources):
    model, expected = sources["repvgg", True]
    path = save_checkpoint(tmp_path / "h.safetensors", model, meta_for(model), half=True)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("stage1.0.rbr_reparam.weight").dtype == torch.float16
    loaded, _ = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        out = loaded(X)
    assert not torch.equal(out, expected)  # the weights really went through float16
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_own_format_refuses_newer_version(tmp_path, sources):
    model, _ = sources["repvgg", True]
    text = meta_for(model).to_json().replace('"version": 1', '"version": 99')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "n.safetensors"),
              metadata={"edgerepvgg": text})  # fmt: skip
    with pytest.raises(UserError, match="newer"):
        load_checkpoint(tmp_path / "n.safetensors")


# ---------------------------------------------------------------------------------------------
# Bad inputs: one UserError each, naming the problem


def _a0_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in create_model("A0", num_classes=10, deploy=True).state_dict().items()}


@pytest.fixture(scope="module")
def a0_state() -> dict[str, torch.Tensor]:
    return _a0_state()


def _side_effect(path: str) -> None:
    Path(path).write_text("executed")


class _Payload:
    """Unpickling this would call ``_side_effect``: a stand-in for arbitrary code in a pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (_side_effect, (self.path,))


def test_random_bytes(tmp_path):
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match="not a PyTorch or safetensors checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_truncated_safetensors(tmp_path, a0_state):
    save_file(a0_state, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a valid safetensors file.*truncated"):
        load_checkpoint(tmp_path / "t.safetensors")


def test_pickled_code_is_refused_and_not_run(tmp_path, a0_state):
    marker = tmp_path / "marker"
    torch.save({"state_dict": a0_state, "hook": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"_side_effect.*weights-only") as info:
        load_checkpoint(tmp_path / "evil.pth")
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="no state dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_unknown_layout(tmp_path):
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, tmp_path / "vgg.pth")
    with pytest.raises(UserError, match=r"unknown checkpoint layout.*features\.0\.weight"):
        load_checkpoint(tmp_path / "vgg.pth")


def test_unknown_keys(tmp_path, a0_state):
    torch.save({**a0_state, "extra.weight": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(UserError, match=r"unexpected keys \['extra\.weight'\]"):
        load_checkpoint(tmp_path / "x.pth")
    timm = rename(a0_state, "timm")
    timm["final_conv.conv.weight"] = torch.zeros(4, 1280, 1, 1)  # a weight must never be dropped silently
    torch.save(timm, tmp_path / "t.pth")
    with pytest.raises(UserError, match=r"unexpected keys \['final_conv\.conv\.weight'\]"):
        load_checkpoint(tmp_path / "t.pth")


def test_missing_key(tmp_path, a0_state):
    state = dict(a0_state)
    del state["stage3.5.rbr_reparam.bias"]
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"missing keys \['stage3\.5\.rbr_reparam\.bias'\]"):
        load_checkpoint(tmp_path / "m.pth")


def test_wrong_shape_names_the_first_mismatch(tmp_path, a0_state):
    state = dict(a0_state)
    state["linear.weight"] = torch.zeros(10, 1000)  # num_classes (10) still agrees with linear.bias
    torch.save(state, tmp_path / "s.pth")
    with pytest.raises(UserError, match=r"linear\.weight has shape \(10, 1000\), the model needs \(10, 1280\)"):
        load_checkpoint(tmp_path / "s.pth")


def test_squeeze_excitation_is_named(tmp_path, a0_state):
    state = rename(a0_state, "mmpretrain")
    state["backbone.stage_1.0.se_layer.conv1.conv.weight"] = torch.zeros(3, 48, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "d2se.pth")
    with pytest.raises(UserError, match="squeeze-excitation.*D2se"):
        load_checkpoint(tmp_path / "d2se.pth")


def test_not_a_classifier(tmp_path, a0_state):
    state = {k: v for k, v in a0_state.items() if not k.startswith("linear.")}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(UserError, match="lacks 'linear.weight'.*classifier"):
        load_checkpoint(tmp_path / "backbone.pth")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_damaged_metadata(tmp_path, a0_state):
    save_file(a0_state, str(tmp_path / "d.safetensors"), metadata={"edgerepvgg": "{not json"})
    with pytest.raises(UserError, match="damaged edgerepvgg metadata"):
        load_checkpoint(tmp_path / "d.safetensors")


def test_errors_are_one_line(tmp_path, a0_state):
    """The CLI prints a UserError as one line."""
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02garbage" * 10)
    state = dict(a0_state)
    state["linear.weight"] = torch.zeros(10, 7)
    torch.save(state, tmp_path / "s.pth")
    for path in (tmp_path / "junk.pth", tmp_path / "s.pth"):
        with pytest.raises(UserError) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Every official variant is recognized by its shapes (meta tensors: no memory, no init cost)


def _meta_state(name: str, block: str = "repvgg", fused: bool = False) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return create_model(name, num_classes=1000, block=block, deploy=fused).state_dict()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_detected(name):
    for block, fused in (("repvgg", False), ("qarepvgg", False), ("repvgg", True)):
        meta = infer_meta(_meta_state(name, block, fused))
        assert (meta.variant, meta.block, meta.fused, meta.num_classes, meta.in_chans) == (name, block, fused, 1000, 3)


@pytest.mark.parametrize("name", [n for n, cfg in VARIANTS.items() if cfg.groups > 1] + ["B0"])
@pytest.mark.parametrize("layout", ["timm", "mmpretrain"])
def test_foreign_layout_maps_every_key(name, layout):
    """Grouped variants through the foreign maps: the full key set comes back and the groups are read."""
    for fused in (False, True):
        state = _meta_state(name, fused=fused)
        back, detected = to_official(rename(state, layout))
        assert detected == layout
        assert set(back) == set(state)
        assert all(back[k].shape == v.shape for k, v in state.items())
        assert infer_meta(back).variant == name


def test_unknown_shape_lists_known_variants():
    state = _meta_state("A0")
    state = {k: v for k, v in state.items() if not k.startswith("stage3.13.")}
    with pytest.raises(UserError, match=r"no RepVGG variant has blocks \[2, 4, 13, 1\].*known variants: A0"):
        infer_meta(state)


def test_meta_json_round_trip():
    meta = ModelMeta("B1g4", "qarepvgg", 7, 1, True, fashion_mnist_spec(), {"note": "x"})
    assert ModelMeta.from_json(meta.to_json()) == meta
