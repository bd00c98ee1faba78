"""train --init: fine-tuning starts from a checkpoint in any supported layout. Kept tensors start
exactly as the checkpoint holds them, the head is new when the class count differs, the stem's
input channels are adapted (3 -> 1 summed, 1 -> 3 repeated / 3), the log and the model's record
say which; another variant or block type, a fused checkpoint or a wrong shape is one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import edgerepvgg.train as train_module
from edgerepvgg import UserError, create_model, load_checkpoint
from edgerepvgg._fuse import reparameterize
from edgerepvgg.data import fashion_mnist, fashion_mnist_spec
from edgerepvgg.train import TrainConfig, init_from_checkpoint, train

from conftest import randomize_bn
from helpers import write_fake_fashion_mnist
from test_checkpoints import to_timm_key

FAST = dict(model="A0", epochs=1, batch_size=32, lr=0.01, warmup_epochs=0.0, erase_prob=0.0, crop_padding=0)
STEM = ["stage0.rbr_dense.conv.weight", "stage0.rbr_1x1.conv.weight"]
HEAD = ["linear.weight", "linear.bias"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=32)


def _datasets(root: Path):
    spec = fashion_mnist_spec()
    return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)


def official_checkpoint(path: Path, classes: int, in_chans: int, block: str = "repvgg", seed: int = 1) -> dict[str, torch.Tensor]:
    """A train-time A0 saved as the official repo's training script does (``{"model": state_dict}``
    with the official key names, which are ours); returns its tensors."""
    torch.manual_seed(seed)
    model = randomize_bn(create_model("A0", num_classes=classes, in_chans=in_chans, block=block), seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return state


def _snapshot_first_step(monkeypatch) -> dict:
    """The weights of the model ``train`` builds, as they are at its first training step."""
    box: dict = {}
    real = train_module.create_model

    def create(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs):
            if module.training and not box:
                box.update({k: v.detach().cpu().clone() for k, v in module.state_dict().items()})

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(train_module, "create_model", create)
    return box


def test_fine_tune_from_an_official_imagenet_style_checkpoint(fake_fmnist, tmp_path, monkeypatch, caplog):
    ckpt = official_checkpoint(tmp_path / "repvgg_a0_train.pth", classes=7, in_chans=3)
    start = _snapshot_first_step(monkeypatch)
    train_set, eval_set = _datasets(fake_fmnist)  # 1 channel, 10 classes
    with caplog.at_level(logging.INFO, logger="edgerepvgg.train"):
        model, meta = train(TrainConfig(**FAST), train_set, eval_set, tmp_path / "run", progress=False,
                            init=tmp_path / "repvgg_a0_train.pth")  # fmt: skip

    counted = [k for k in start if not k.endswith("num_batches_tracked")]
    kept = [k for k in counted if k not in STEM + HEAD]
    for k in kept:  # every kept tensor started exactly as the checkpoint holds it
        assert torch.equal(start[k], ckpt[k]), k
    for k in STEM:  # 3 -> 1 input channels: summed
        assert start[k].shape[1] == 1
        torch.testing.assert_close(start[k], ckpt[k].sum(1, keepdim=True), rtol=0, atol=0)
    assert start["linear.weight"].shape == (10, ckpt["linear.weight"].shape[1])  # a new 10-class head

    record = meta.extra["init"]
    assert record["layout"] == "official" and record["variant"] == "A0" and record["num_classes"] == 7
    assert record["kept"] == len(kept) and record["adapted"] == STEM and record["new"] == HEAD
    assert record["channels"] == "summed over the RGB channels"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("init from"))
    assert f"kept {len(kept)} tensors" in line
    assert f"adapted 2 ({', '.join(STEM)}: 3 -> 1 input channels, summed over the RGB channels)" in line
    assert "new 2 (linear.weight, linear.bias: 7 -> 10 classes)" in line

    trained = model.state_dict()
    assert not torch.equal(trained["stage1.0.rbr_dense.conv.weight"], start["stage1.0.rbr_dense.conv.weight"])  # it trained
    loaded, loaded_meta = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert loaded_meta.num_classes == 10 and loaded_meta.in_chans == 1 and loaded_meta.extra["init"] == record
    x = train_set.spec.normalize(eval_set.images[:4])
    torch.testing.assert_close(loaded(x), model(x))


def test_a_matching_timm_safetensors_checkpoint_is_kept_whole(fake_fmnist, tmp_path, monkeypatch):
    state = official_checkpoint(tmp_path / "unused.pth", classes=10, in_chans=1, seed=2)
    save_file({to_timm_key(k): v.contiguous() for k, v in state.items()}, str(tmp_path / "timm.safetensors"))
    start = _snapshot_first_step(monkeypatch)
    train_set, _ = _datasets(fake_fmnist)
    _, meta = train(TrainConfig(**FAST), train_set, None, tmp_path / "run", progress=False, init=tmp_path / "timm.safetensors")
    assert meta.extra["init"]["layout"] == "timm" and meta.extra["init"]["adapted"] == meta.extra["init"]["new"] == []
    for k, v in state.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(start[k], v), k


def test_one_channel_to_rgb_repeats_and_divides(tmp_path):
    ckpt = official_checkpoint(tmp_path / "gray.pth", classes=10, in_chans=1)
    model = create_model("A0", num_classes=10, in_chans=3)
    record = init_from_checkpoint(model, tmp_path / "gray.pth")
    assert record["adapted"] == STEM and record["new"] == []
    for k in STEM:
        torch.testing.assert_close(model.state_dict()[k], ckpt[k].repeat(1, 3, 1, 1) / 3, rtol=0, atol=0)
    x = torch.randn(2, 1, 32, 32)  # a grey image as RGB: the stem responds as the grey model's does
    gray = create_model("A0", num_classes=10, in_chans=1)
    init_from_checkpoint(gray, tmp_path / "gray.pth")
    torch.testing.assert_close(model.stage0.eval()(x.repeat(1, 3, 1, 1)), gray.stage0.eval()(x))


@pytest.mark.parametrize("case, message", [
    ("variant", "holds a repvgg RepVGG-A0, this run trains a repvgg RepVGG-A1; pass --model A0 --block repvgg"),
    ("block", "holds a qarepvgg RepVGG-A0, this run trains a repvgg RepVGG-A0; pass --model A0 --block qarepvgg"),
    ("fused", "is a fused (deploy) checkpoint"),
    ("shape", "stage2.0.rbr_dense.bn.running_mean has shape (3,), the model needs (96,)"),
])  # fmt: skip
def test_other_networks_are_one_line(tmp_path, case, message):
    path = tmp_path / "ckpt.pth"
    model_name = "A1" if case == "variant" else "A0"
    state = official_checkpoint(path, classes=10, in_chans=1, block="qarepvgg" if case == "block" else "repvgg")
    if case == "fused":
        fused = reparameterize(create_model("A0", num_classes=10, in_chans=1))
        torch.save(fused.state_dict(), path)
    if case == "shape":
        state["stage2.0.rbr_dense.bn.running_mean"] = torch.zeros(3)
        torch.save(state, path)
    with pytest.raises(UserError) as err:
        init_from_checkpoint(create_model(model_name, num_classes=10, in_chans=1), path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_takes_variant_and_block_from_the_checkpoint(fake_fmnist, tmp_path, cli, caplog):
    official_checkpoint(tmp_path / "qa.pth", classes=7, in_chans=3, block="qarepvgg")
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="edgerepvgg")
    code, stdout, err = cli("train", "--init", str(tmp_path / "qa.pth"), "--data", str(fake_fmnist), "--epochs", "1",
                            "--batch-size", "32", "--device", "cpu", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "new 2 (linear.weight, linear.bias: 7 -> 10 classes)" in caplog.text  # on stderr outside pytest
    _, meta = load_checkpoint(out / "model.safetensors")
    assert (meta.variant, meta.block, meta.num_classes) == ("A0", "qarepvgg", 10)
    code, _, err = cli("-q", "train", "--init", str(tmp_path / "qa.pth"), "--model", "A1", "--data", str(fake_fmnist),
                       "--out", str(tmp_path / "other"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "pass --model A0 --block qarepvgg" in err
    assert not (tmp_path / "other").exists()
