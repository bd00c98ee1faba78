"""The trainer: loss falls, checkpoints every epoch, resume is exact, a SIGKILL loses one epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgerepvgg import UserError, load_checkpoint
from edgerepvgg.data import fashion_mnist, fashion_mnist_spec
from edgerepvgg.train import STATE_FILE, TrainConfig, augment, lr_at, train

from helpers import write_fake_fashion_mnist

# Small data, short schedule: no vertical shifts (the synthetic classes are horizontal bands).
FAST = dict(model="A0", batch_size=32, lr=0.01, warmup_epochs=0.5, erase_prob=0.0, crop_padding=0)


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise-reproducible runs


def datasets(root: Path):
    spec = fashion_mnist_spec()
    return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)


def test_short_run_loss_falls_and_writes_model(fake_fmnist, tmp_path):
    train_set, eval_set = datasets(fake_fmnist)
    model, meta = train(TrainConfig(epochs=3, **FAST), train_set, eval_set, tmp_path, progress=False)
    history = meta.extra["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["eval_top1"] > 0.5  # 10 classes: chance is 0.1
    loaded, loaded_meta = load_checkpoint(tmp_path / "model.safetensors")
    assert loaded_meta.input_spec == train_set.spec and loaded_meta.extra["eval_top1"] == history[-1]["eval_top1"]
    x = train_set.spec.normalize(eval_set.images[:4])
    torch.testing.assert_close(loaded(x), model(x))


def test_resume_continues_exactly(fake_fmnist, tmp_path):
    train_set, _ = datasets(fake_fmnist)
    full, _ = train(TrainConfig(epochs=2, **FAST), train_set, None, tmp_path / "full", progress=False)
    train(TrainConfig(epochs=2, **FAST), train_set, None, tmp_path / "part", progress=False)
    # Roll the state file back to epoch 1 by re-running epoch 1 alone in another folder.
    one = tmp_path / "one"
    cfg1 = TrainConfig(epochs=2, **FAST)
    state = torch.load(tmp_path / "part" / STATE_FILE, weights_only=True)
    assert state["epoch"] == 2
    first = _train_first_epoch_only(cfg1, train_set, one)
    resumed, _ = train(cfg1, train_set, None, one, resume=True, progress=False)
    assert first == 1
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def _train_first_epoch_only(config: TrainConfig, train_set, out: Path) -> int:
    """Run one epoch of a 2-epoch schedule by interrupting after the first checkpoint."""
    import edgerepvgg.train as tr

    real = tr.save_state

    class Stop(Exception):
        pass

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise Stop

    tr.save_state = save_then_stop
    try:
        with pytest.raises(Stop):
            train(config, train_set, None, out, progress=False)
    finally:
        tr.save_state = real
    return torch.load(out / STATE_FILE, weights_only=True)["epoch"]


def test_resume_refuses_other_settings(fake_fmnist, tmp_path):
    train_set, _ = datasets(fake_fmnist)
    _train_first_epoch_only(TrainConfig(epochs=2, **FAST), train_set, tmp_path)
    with pytest.raises(UserError, match="other settings"):
        train(TrainConfig(epochs=2, **{**FAST, "lr": 0.02}), train_set, None, tmp_path, resume=True, progress=False)


def test_resume_without_state_is_a_user_error(fake_fmnist, tmp_path):
    train_set, _ = datasets(fake_fmnist)
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(epochs=1, **FAST), train_set, None, tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_at_most_that_epoch(fake_fmnist, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgerepvgg", "-q", "train", "--data", str(fake_fmnist), "--epochs", "3",
           "--batch-size", "32", "--lr", "0.05", "--threads", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / STATE_FILE
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in time"
    time.sleep(0.3)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] in (1, 2)  # the epoch in flight is lost, nothing before it
    assert not list(out.glob(".*.tmp")), "a half-written checkpoint was left behind"
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    final = torch.load(state, weights_only=True)
    assert final["epoch"] == 3 and [h["epoch"] for h in final["history"]] == [1, 2, 3]
    assert (out / "model.safetensors").is_file()


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1)
    lrs = [lr_at(cfg, s, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.001) and lrs[99] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < 1e-4
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))


def test_augment_is_seeded_and_keeps_shape():
    images = torch.randint(0, 255, (8, 1, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig()
    a = augment(images, cfg, torch.Generator().manual_seed(3))
    b = augment(images, cfg, torch.Generator().manual_seed(3))
    c = augment(images, cfg, torch.Generator().manual_seed(4))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, images)


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "--epochs must be at least 1, got 0"),
    (dict(batch_size=-2), "--batch-size must be at least 1, got -2"),
    (dict(lr=0.0), "--lr must be positive, got 0.0"),
    (dict(weight_decay=-1e-4), "--weight-decay must be 0 or more, got -0.0001"),
    (dict(warmup_epochs=-1.0), "--warmup-epochs must be 0 or more, got -1.0"),
    (dict(erase_prob=1.5), "erase probability must be in [0, 1], got 1.5"),
    (dict(block="resnet"), "unknown block type 'resnet'; choose one of repvgg, qarepvgg"),
])  # fmt: skip
def test_train_and_qat_configs_share_one_validation(bad, message):
    from edgerepvgg.quant.qat import QATConfig

    configs = [TrainConfig] + ([QATConfig] if "block" not in bad else [])
    for config in configs:
        with pytest.raises(UserError) as err:
            config(**bad)
        assert str(err.value) == message


def test_one_model_file_name_for_train_and_qat():
    import edgerepvgg.quant.qat as qat_module
    import edgerepvgg.train as train_module

    assert qat_module.MODEL_FILE is train_module.MODEL_FILE == "model.safetensors"


def test_train_on_an_image_folder_records_its_class_names(tmp_path, cli):
    from PIL import Image

    for split, n in (("train", 8), ("val", 2)):
        for label, shade in (("boots", 40), ("coats", 200)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (20, 20), shade + i).save(folder / f"{i}.png")
    code, out, err = cli("-q", "train", "--data", str(tmp_path / "data"), "--size", "16", "--resize", "16",
                         "--in-chans", "1", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 0, err
    _, meta = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert meta.input_spec.class_names == ("boots", "coats") and meta.num_classes == 2
    assert "val" in meta.extra["eval_set"]


def test_training_on_rgb_64x64_images_finishes_on_the_cpu(tmp_path):
    """RGB at 64x64 is the size a user's own folder has; torch's channels_last conv backward hangs
    on it on the CPU, so CPU training must not use that layout (a subprocess with a time limit, so
    a regression fails instead of hanging the suite)."""
    import subprocess
    import sys

    from PIL import Image

    for split, n in (("train", 8), ("val", 3)):
        for label, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (72, 72), tuple(c + i for c in colour)).save(folder / f"{i}.png")
    proc = subprocess.run([sys.executable, "-m", "edgerepvgg", "-q", "train", "--data", str(tmp_path / "data"), "--size", "64",
                           "--epochs", "1", "--batch-size", "8", "--threads", "2", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, meta = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert meta.input_spec.channels == 3 and meta.input_spec.hw == (64, 64) and meta.num_classes == 3
