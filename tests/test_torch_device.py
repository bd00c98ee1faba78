"""--device and --amp: parsed and checked in one place (a missing device is one line, exit 2,
before any work), the model and its batches really on the resolved device in train and QAT,
autocast reaching the training step, and the PyTorch references computed there. The CUDA runs
skip on machines without a GPU (this build machine has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import edgerepvgg.train as train_module
from edgerepvgg import UserError, load_checkpoint
from edgerepvgg.data import fashion_mnist, fashion_mnist_spec
from edgerepvgg.evaluate import predict
from edgerepvgg.quant.calibrate import calibrate
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.torch_device import (
    autocast, check_amp, distributed_backend, emulation_device, grad_scaler, placed, require_float64, resolve_device,
)  # fmt: skip
from edgerepvgg.train import STATE_FILE, TrainConfig, init_distributed, train

from helpers import write_fake_fashion_mnist
from quant_helpers import self_labelled, tiny_plain

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
WITHOUT_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
FAST = dict(model="A0", epochs=1, batch_size=32, lr=0.01, warmup_epochs=0.0, erase_prob=0.0, crop_padding=0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=32)


# ---------------------------------------------------------------------------------------------
# Parsing and checking


def test_cpu_is_the_default_and_parses_loosely():
    cpu = torch.device("cpu")
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(cpu) == cpu


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:1", "mps:0", "cuda:-1", "", "cuda:0:1"])
def test_unknown_device_names_the_valid_forms(bad):
    with pytest.raises(UserError) as err:
        resolve_device(bad)
    assert str(err.value) == f"unknown device {bad!r}; use cpu, cuda, cuda:N or mps"


@WITHOUT_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_names_the_fix(name):
    with pytest.raises(UserError, match=r"no CUDA GPU is usable here .*install a CUDA build of torch.*or use --device cpu"):
        resolve_device(name)


def test_cuda_index_beyond_the_visible_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the current device
    with pytest.raises(UserError) as err:
        resolve_device("cuda:3")
    assert str(err.value) == ("--device cuda:3: only 2 CUDA device(s) are visible (cuda:0 to cuda:1); pick one of them, "
                              "or check CUDA_VISIBLE_DEVICES")  # fmt: skip


def test_mps_unavailable_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="Metal backend is not available here.*use --device cpu"):
        resolve_device("mps")


def test_torchrun_backend_follows_the_device(monkeypatch):
    assert distributed_backend("cpu") == "gloo"
    assert distributed_backend(None) == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed_backend("cuda") == "nccl"
    with pytest.raises(UserError, match=r"--device cuda:1 under torchrun: each process uses its own GPU"):
        distributed_backend("cuda:1")


def test_a_missing_device_fails_before_joining_a_torchrun_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no group may be joined
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        init_distributed("tpu")
    assert not torch.distributed.is_initialized()


def test_float64_work_refuses_mps_and_the_emulation_moves_to_the_cpu():
    mps = torch.device("mps")  # only named here: nothing runs on it
    with pytest.raises(UserError, match="QAT takes its rounding decisions in float64, which MPS lacks; use --device cpu"):
        require_float64(mps, "QAT")
    assert emulation_device(mps) == torch.device("cpu")
    assert emulation_device(torch.device("cpu")) == torch.device("cpu")


def test_placed_never_moves_the_callers_module():
    net = torch.nn.Linear(2, 2)
    assert placed(net, torch.device("cpu")) is net


def test_amp_modes():
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="unknown --amp 'fp32'; use off, bf16, fp16"):
        check_amp("fp32")
    with pytest.raises(UserError, match="unknown --amp"):
        TrainConfig(amp="half")
    for amp in ("off", "bf16"):
        check_amp(amp, cpu)
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(cpu, "off"):
        assert not torch.is_autocast_enabled("cpu")
    assert grad_scaler(cpu, "bf16") is None and grad_scaler(cpu, "off") is None
    assert isinstance(grad_scaler(cpu, "fp16"), torch.amp.GradScaler)


# ---------------------------------------------------------------------------------------------
# Training and QAT really run on the device, under the autocast asked for


def _spy_on_models(monkeypatch) -> list[dict]:
    """Record, for every forward pass of the stem of each model ``train`` builds: mode, where
    the input and the weights are, the stem's output dtype and whether autocast is on."""
    seen: list[dict] = []
    real = train_module.create_model

    def create(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            x = inputs[0]
            seen.append({"training": module.training, "input": x.device, "weights": next(module.parameters()).device,
                         "dtype": output.dtype, "autocast": torch.is_autocast_enabled(x.device.type)})  # fmt: skip

        model.stage0.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "create_model", create)
    return seen


def _datasets(root: Path):
    spec = fashion_mnist_spec()
    return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_runs_on_the_device_under_its_autocast(fake_fmnist, tmp_path, monkeypatch, device, amp):
    seen = _spy_on_models(monkeypatch)
    train_set, eval_set = _datasets(fake_fmnist)
    model, meta = train(TrainConfig(amp=amp, **FAST), train_set, eval_set, tmp_path, progress=False, device=device)
    where = resolve_device(device)
    steps = [s for s in seen if s["training"]]
    evals = [s for s in seen if not s["training"]]
    assert len(steps) == 2 and evals  # 64 images / 32, then the evaluation
    assert all(s["input"] == where and s["weights"] == where for s in seen)
    want = torch.bfloat16 if amp == "bf16" else torch.float32
    assert all(s["dtype"] == want and s["autocast"] == (amp != "off") for s in steps)
    assert all(s["dtype"] == torch.float32 and not s["autocast"] for s in evals)  # evaluation in float32
    assert next(model.parameters()).device == torch.device("cpu")  # handed back on the CPU
    assert meta.extra["device"] == str(where) and meta.extra["train_config"]["amp"] == amp
    assert all(torch.isfinite(p).all() for p in model.parameters())
    loaded, _ = load_checkpoint(tmp_path / "model.safetensors")
    x = train_set.spec.normalize(eval_set.images[:4])
    torch.testing.assert_close(loaded(x), model(x))


def test_fp16_trains_with_a_loss_scaler_that_is_checkpointed(fake_fmnist, tmp_path, monkeypatch):
    seen = _spy_on_models(monkeypatch)
    train_set, _ = _datasets(fake_fmnist)
    scaled = []
    real = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(loss.dtype) or real(self, loss))
    train(TrainConfig(amp="fp16", **FAST), train_set, None, tmp_path, progress=False)
    assert [s["dtype"] for s in seen if s["training"]] == [torch.float16, torch.float16]
    assert scaled == [torch.float32, torch.float32]  # the loss (in float32) went through the scaler every step
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["config"]["amp"] == "fp16"


def test_resume_under_another_amp_is_refused(fake_fmnist, tmp_path):
    train_set, _ = _datasets(fake_fmnist)
    train(TrainConfig(**{**FAST, "epochs": 1}), train_set, None, tmp_path, progress=False)
    with pytest.raises(UserError, match="other settings.*'amp': \\('off', 'bf16'\\)"):
        train(TrainConfig(amp="bf16", **FAST), train_set, None, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_qat_runs_on_the_device_in_float32(tmp_path, monkeypatch, device):
    import edgerepvgg.quant.qat as qat_module
    from edgerepvgg.quant.qat import QATConfig, qat

    seen = []

    class Spy(qat_module.QATNet):
        def forward(self, x, quantize=True):
            out = super().forward(x, quantize)
            seen.append((x.device, next(self.parameters()).device, x.dtype, out.dtype))
            return out

    monkeypatch.setattr(qat_module, "QATNet", Spy)
    plain = tiny_plain(size=16, classes=5)
    data = self_labelled(plain, 64)
    spec = calibrate(plain, data, "tensorrt", progress=False, cache=False)
    config = QATConfig(epochs=1, batch_size=32, crop_padding=0, stats_images=32)
    fine, fine_spec, _ = qat(plain, spec, data, None, config, tmp_path, progress=False, device=device)
    where = resolve_device(device)
    assert len(seen) == 2 and all(s == (where, where, torch.float32, torch.float32) for s in seen)
    assert next(fine.parameters()).device == torch.device("cpu")
    assert (tmp_path / "quant_spec.json").is_file() and fine_spec.model_hash != spec.model_hash


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_export_and_compare_fine_tune_on_the_device_they_are_given(tmp_path, monkeypatch, device):
    """--device reaches the QAT inside the pipeline (export --qat, compare --qat), not only the
    calibration and the references around it."""
    import edgerepvgg.quant.qat as qat_module
    from edgerepvgg import compare, export
    from edgerepvgg._export import ExportOptions
    from edgerepvgg.profiles import Profile
    from edgerepvgg.quant.qat import QATConfig

    seen, real = [], qat_module.qat
    monkeypatch.setattr(qat_module, "qat", lambda *a, **k: seen.append(k.get("device")) or real(*a, **k))
    plain = tiny_plain(size=16, classes=5)
    train_set, held_out, data = self_labelled(plain, 64, seed=1), self_labelled(plain, 32, seed=2), self_labelled(plain, 32, seed=5)
    config = QATConfig(epochs=1, batch_size=32, crop_padding=0, stats_images=32)
    report = export(plain, "onnxruntime", tmp_path / "e", "int8", images=data, eval_set=data, calibration="minmax", cache=False,
                    options=ExportOptions(threads=1, latency=False, device=device), qat=config, qat_data=(train_set, held_out))  # fmt: skip
    result = compare(plain, [Profile("ort", "onnxruntime", "int8", threads=1)], tmp_path / "c", data, data, calibration="minmax",
                     threads=1, progress=False, cache=False, device=device, qat=config, qat_data=(train_set, held_out))  # fmt: skip
    assert seen == [device, device]
    assert report.quant["qat"]["kept"] in ("qat", "ptq") and {r.name for r in result.rows} >= {"ort", "ort-qat"}


# ---------------------------------------------------------------------------------------------
# Calibration and references on the device


def test_calibration_and_references_on_the_cpu_match_the_default(tmp_path):
    from edgerepvgg._export import references

    plain = tiny_plain(size=16, classes=5)
    data = self_labelled(plain, 48)
    default = calibrate(plain, data, "tensorrt", progress=False, cache=False)
    on_cpu = calibrate(plain, data, "tensorrt", progress=False, cache=False, device="cpu")
    assert on_cpu.to_json() == default.to_json()
    a, b = references(plain, default, data), references(plain, default, data, device="cpu")
    assert torch.equal(a.fp32, b.fp32) and torch.equal(a.emulation, b.emulation)


@CUDA
def test_cuda_calibration_and_emulation_match_the_cpu():
    plain = tiny_plain(size=16, classes=5)
    data = self_labelled(plain, 48)
    cpu = calibrate(plain, data, "tensorrt", progress=False, cache=False)
    gpu = calibrate(plain, data, "tensorrt", progress=False, cache=False, device="cuda")
    for a, b in zip(cpu.layers, gpu.layers):
        assert a.weight == b.weight  # from the weights alone
        assert a.input.scale == pytest.approx(b.input.scale, rel=1e-3)
    cuda = resolve_device("cuda")
    on_gpu = predict(IntegerNet(placed(plain, cuda), cpu), data, device=cuda)
    assert torch.equal(on_gpu, predict(IntegerNet(plain, cpu), data))  # integer sums: exact on either
    assert next(plain.parameters()).device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The command line


def test_train_device_cpu_end_to_end(fake_fmnist, tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, err = cli("-q", "train", "--data", str(fake_fmnist), "--epochs", "1", "--batch-size", "32",
                            "--device", "cpu", "--amp", "bf16", "--out", str(out))  # fmt: skip
    assert code == 0, err
    _, meta = load_checkpoint(out / "model.safetensors")
    assert meta.extra["device"] == "cpu" and meta.extra["train_config"]["amp"] == "bf16"
    assert f"wrote {out / 'model.safetensors'}" in stdout


@pytest.mark.parametrize("command", ["calibrate", "analyze"])
def test_quantization_commands_on_the_cpu(fmnist_ckpt, tmp_path, cli, command):
    out = tmp_path / ("spec.json" if command == "calibrate" else "analysis")
    extra = ["--eval-limit", "20"] if command == "analyze" else []
    code, _, err = cli("-q", command, str(fmnist_ckpt), "--device", "cpu", "--no-cache", *extra, "-o", str(out))
    assert code == 0, err
    assert out.exists()


COMMANDS = {
    "train": ["train", "--data", "{data}"],
    "qat": ["qat", "{ckpt}"],
    "calibrate": ["calibrate", "{ckpt}"],
    "analyze": ["analyze", "{ckpt}"],
    "export": ["export", "{ckpt}", "--target", "onnxruntime"],
    "compare": ["compare", "{ckpt}", "--targets", "onnxruntime"],
}


@pytest.mark.parametrize("device, message", [("tpu", "unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
                                             ("cuda:99", "--device cuda")])  # fmt: skip
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_device_that_is_not_there_is_one_line_and_exit_2(fmnist_ckpt, fake_fmnist, tmp_path, cli, command, device, message):
    out = tmp_path / "out"
    argv = [a.format(data=fake_fmnist, ckpt=fmnist_ckpt) for a in COMMANDS[command]]
    code, stdout, err = cli(*argv, "--device", device, "-o", str(out))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"edgerepvgg {command}: error: ") and message in err
    assert not out.exists() and stdout == ""


def test_amp_is_for_train_only(fmnist_ckpt, capsys):
    from edgerepvgg.cli import main

    for argv, message in ((["qat", str(fmnist_ckpt), "--amp", "bf16"], "unrecognized arguments: --amp bf16"),
                          (["train", "--amp", "fp8"], "invalid choice: 'fp8'")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
