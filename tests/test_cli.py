"""The command line: a thin layer that prints what the library checked, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from edgerepvgg import create_model, load_checkpoint, save_checkpoint
from edgerepvgg.checkpoints import meta_for







def test_fuse_prints_its_check_and_writes_a_loadable_deploy_checkpoint(cli, fmnist_ckpt, tmp_path):
    out_path = tmp_path / "deploy.safetensors"
    code, out, _ = cli("fuse", str(fmnist_ckpt), "-o", str(out_path))
    assert code == 0
    assert "float64: max abs err" in out and "float32: max abs err" in out and out.count(": ok") == 2
    model, meta = load_checkpoint(out_path)
    assert meta.fused and all(b.is_fused for b in model.blocks())
    ref, _ = load_checkpoint(fmnist_ckpt)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_info_on_a_variant_name(cli):
    code, out, _ = cli("info", "B1g4", "--size", "224")
    assert code == 0
    assert "36,125,416" in out and "7.307 G" in out


def test_info_layer_table_on_a_checkpoint(cli, fmnist_ckpt):
    code, out, _ = cli("info", str(fmnist_ckpt), "--layers")
    assert code == 0
    assert "1x32x32" in out and "Ankle boot" in out
    assert sum(line.startswith("convs.") for line in out.splitlines()) == 22


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "nonexistent.pth"], "not found; pass a file path, a bundled model"),
        (["fuse", "missing.safetensors", "-o", "x.safetensors"], "not found"),
        (["calibrate", "{ckpt}", "--images", "{empty}"], "has no JPEG, PNG, BMP or WebP images"),
        (["calibrate", "{ckpt}", "--images", "{missing}"], "{missing}"),
    ],
)
def test_expected_mistakes_are_one_line_with_exit_2(cli, tmp_path, fmnist_ckpt, argv, message):
    (tmp_path / "empty").mkdir()
    subs = {"ckpt": str(fmnist_ckpt), "empty": str(tmp_path / "empty"), "missing": str(tmp_path / "nope")}
    argv = [a.format(**subs) for a in argv]
    code, _, err = cli(*argv)
    assert code == 2
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and message.format(**subs).lower() in lines[0].lower()
    assert "Traceback" not in err


def test_corrupt_checkpoint_is_one_line(cli, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    code, _, err = cli("fuse", str(bad), "-o", str(tmp_path / "o.safetensors"))
    assert code == 2 and "Traceback" not in err and "error:" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_calibrate_writes_a_deterministic_spec(cli, fmnist_ckpt, tmp_path):
    from edgerepvgg.quant import load_spec

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out, cache in ((a, []), (b, ["--no-cache"])):
        code, stdout, _ = cli("-q", "calibrate", str(fmnist_ckpt), "--method", "percentile",
                              "--constraints", "openvino", "--weight-bits", "7", "-o", str(out), *cache)  # fmt: skip
        assert code == 0, stdout
    assert a.read_bytes() == b.read_bytes()
    spec = load_spec(a)
    assert spec.constraints.weight.bits == 7 and spec.calibration["images"] == 256
    assert spec.calibration["method"] == "percentile"
    assert len(spec.layers) == 23 and json.loads(a.read_text())["version"] == 1


def test_calibrate_refuses_bundled_images_for_a_foreign_model(cli, tmp_path):
    model = create_model("A0", num_classes=3).eval()
    path = tmp_path / "rgb.safetensors"
    save_checkpoint(path, model, meta_for(model))
    code, _, err = cli("calibrate", str(path), "-o", str(tmp_path / "s.json"))
    assert code == 2 and "pass --images" in err


def test_cli_bundle_then_results_puts_a_device_row_in_the_table(cli, fmnist_ckpt, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ort"
    code, stdout, err = cli("-q", "export", str(fmnist_ckpt), "--target", "onnxruntime", "--eval-limit", "20", "--threads", "1",
                            "--no-latency", "--bundle", "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert "device bundle in bundle/" in stdout
    run = subprocess.run([sys.executable, "runner.py", "."], cwd=out / "bundle", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    code, stdout, err = cli("-q", "compare", str(fmnist_ckpt), "--results", str(out / "bundle" / "result"), "--eval-limit", "20",
                            "-o", str(tmp_path / "cmp"))  # fmt: skip
    assert code == 0, err
    assert "onnxruntime-fp32@device" in stdout
