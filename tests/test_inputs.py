"""Input specs: rectangular sizes, the resize filter, overrides and where each value came from,
timm's config.json beside a foreign checkpoint, the class-names file, and the spec stored in (and
read back from) every artifact. The targets' agreement on rectangular inputs is in
test_target_conformance.py (parametrized over shapes)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from edgerepvgg import UserError
from edgerepvgg.checkpoints import load_checkpoint, load_model, read_timm_config
from edgerepvgg.data import TensorDataset, load_array, resize_and_crop
from edgerepvgg.inputs import InputOverrides, InputSpec, apply_overrides, parse_size, read_class_names
from edgerepvgg.models import create_model

from conftest import randomize_bn
from test_checkpoints import rename

# ---------------------------------------------------------------------------------------------
# InputSpec itself


def test_a_rectangle_is_height_by_width_and_a_square_collapses_to_an_int():
    spec = InputSpec(size=(48, 64), resize=(54, 73), channels=1, mean=(0.5,), std=(0.5,))
    assert (spec.height, spec.width, spec.shape, spec.resize_hw) == (48, 64, (1, 48, 64), (54, 73))
    square = InputSpec(size=(32, 32), resize=[40, 40])
    assert square.size == 32 and square.resize == 40 and square == InputSpec(size=32, resize=40)


def test_a_rectangular_spec_survives_json_and_old_records_read_as_bilinear():
    spec = InputSpec(size=(48, 64), resize=(54, 73), interpolation="bicubic", class_names=("a", "b"))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = {"size": 32, "resize": 32, "channels": 1, "mean": [0.5], "std": [0.5], "class_names": []}  # before this field
    assert InputSpec.from_dict(old).interpolation == "bilinear"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": -3}, "at least 1 pixel"),
    ({"size": (0, 64), "resize": 64}, "at least 1 pixel"),
    ({"size": True}, "whole number"),
    ({"size": (48, 64), "resize": 56}, r"resize \(56\) must be at least the input size \(48x64\)"),
    ({"std": (0.2, 0.0, 0.2)}, "std values must be positive"),
    ({"mean": (0.5, 0.5)}, "one value per channel"),
    ({"interpolation": "cubic"}, "unknown interpolation 'cubic'"),
    ({"class_names": ("a", " ")}, "class names must be non-empty strings"),
])  # fmt: skip
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as exc:
        InputSpec(**kwargs)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("text", "size"), [("224", 224), ("48x64", (48, 64)), ("48X64", (48, 64))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "a", "1.5", "1x2x3", "x64"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(UserError, match="N or HxW"):
        parse_size(text)


# ---------------------------------------------------------------------------------------------
# Overrides


def test_a_new_size_keeps_the_resize_ratio_and_each_value_says_where_it_came_from():
    spec, origins = apply_overrides(InputSpec(), InputOverrides(size=320, interpolation="bicubic"), 1000)
    assert (spec.size, spec.resize, spec.interpolation) == (320, 365, "bicubic")  # 320 * 256 / 224 = 365.7
    assert origins["size"] == "--size" and origins["resize"].startswith("--size") and origins["mean"] == "checkpoint"
    rect, _ = apply_overrides(InputSpec(), InputOverrides(size=(48, 64)), 1000)
    assert (rect.size, rect.resize) == ((48, 64), (54, 73))
    both, where = apply_overrides(InputSpec(), InputOverrides(size=(48, 64), resize=64), 1000)
    assert both.resize == 64 and where["resize"] == "--resize"


def test_no_overrides_leave_the_spec_as_it_was_and_a_config_origin_is_kept():
    spec = InputSpec(class_names=("a", "b", "c"))
    same, origins = apply_overrides(spec, None, 3)
    assert same is spec and set(origins.values()) == {"checkpoint"}
    _, origins = apply_overrides(spec, InputOverrides(std=(0.3, 0.3, 0.3)), 3, {"mean": "timm config.json"})
    assert origins["mean"] == "timm config.json" and origins["std"] == "--std" and origins["size"] == "checkpoint"


@pytest.mark.parametrize(("overrides", "match"), [
    (InputOverrides(mean=(0.5, 0.5)), r"--mean has 2 value\(s\) but the model has 3 input channel\(s\); give 3"),
    (InputOverrides(std=(0.5,)), r"--std has 1 value\(s\) but the model has 3"),
    (InputOverrides(class_names=("a", "b"), class_names_from="names.txt"), r"2 class names \(--class-names names.txt\) for a model with 4 outputs"),
    (InputOverrides(resize=100), r"resize \(100\) must be at least the input size \(224\)"),
    (InputOverrides(size=-1), "at least 1 pixel"),
])  # fmt: skip
def test_overrides_that_do_not_fit_the_model_are_one_line_errors(overrides, match):
    with pytest.raises(UserError, match=match) as exc:
        apply_overrides(InputSpec(), overrides, 4)
    assert "\n" not in str(exc.value)


def test_the_class_names_file_is_one_name_per_line(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("\ufeffcat\n  dog  \n\nbird\n")
    assert read_class_names(f) == ("cat", "dog", "bird")
    f.write_text("crane\nstork\ncrane\n")  # ImageNet's readable names: the bird and the machine
    assert read_class_names(f) == ("crane", "stork", "crane")
    f.write_text("\n \n")
    with pytest.raises(UserError, match="holds no names"):
        read_class_names(f)
    with pytest.raises(UserError, match="not found"):
        read_class_names(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------
# Preprocessing: one file -> one tensor


def _gradient(w: int, h: int) -> Image.Image:
    """An RGB image whose red channel is the column, green the row (mod 256), blue a checker."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x % 256, y % 256, ((x + y) % 2) * 255], axis=2).astype(np.uint8))


def test_a_rectangle_covers_resize_keeping_the_aspect_ratio_then_crops_the_center():
    img = _gradient(100, 60)  # width 100, height 60
    spec = InputSpec(size=(48, 64), resize=(48, 64), interpolation="nearest")
    out = resize_and_crop(img, spec)
    assert out.size == (64, 48)  # PIL: (width, height)
    # scale max(48/60, 64/100) = 0.8: 80x48, then the center 64 columns (8..71) of all 48 rows
    expected = img.resize((80, 48), Image.NEAREST).crop((8, 0, 72, 48))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_a_square_resizes_the_shorter_side_and_crops_the_center():
    img = _gradient(40, 30)
    out = resize_and_crop(img, InputSpec(size=16, resize=20))
    expected = img.resize((27, 20), Image.BILINEAR).crop((5, 2, 21, 18))  # 40 * 20/30 = 26.7 -> 27
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_the_interpolation_is_the_resize_filter():
    arr = (np.arange(28 * 28).reshape(28, 28) * 7 % 256).astype(np.uint8)
    base = InputSpec(size=(20, 24), resize=(20, 24), channels=1, mean=(0.5,), std=(0.5,))
    near = load_array(arr, replace(base, interpolation="nearest"))
    bil = load_array(arr, base)
    assert near.shape == bil.shape == (1, 20, 24)
    assert set(near.unique().tolist()) <= set(np.unique(arr).tolist())  # nearest only copies pixels
    assert not torch.equal(near, bil)


def test_calibration_statistics_are_not_shared_between_normalizations():
    from edgerepvgg.quant.calibrate import fingerprint

    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    a = InputSpec(size=8, resize=8, channels=1, mean=(0.5,), std=(0.5,))
    b = InputSpec(size=8, resize=8, channels=1, mean=(0.3,), std=(0.5,))
    labels = torch.zeros(4, dtype=torch.long)
    assert fingerprint(TensorDataset(images, labels, a, "x")) != fingerprint(TensorDataset(images, labels, b, "x"))


# ---------------------------------------------------------------------------------------------
# timm's config.json beside a timm checkpoint

LABELS = ["tench", "goldfish", "great white shark", "tiger shark"]


def timm_config(**pretrained) -> dict:
    """A config.json as timm's save_config_for_hf writes it (push_to_hf_hub / save_for_hf)."""
    cfg = {"tag": "ft_custom", "custom_load": False, "input_size": [3, 48, 64], "fixed_input_size": False,
           "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center", "mean": [0.5, 0.4, 0.3],
           "std": [0.2, 0.25, 0.3], "num_classes": 1000, "pool_size": [2, 2],
           "first_conv": ["stem.conv_kxk.conv", "stem.conv_1x1.conv"], "classifier": "head.fc"}  # fmt: skip
    cfg.update(pretrained)
    return {"architecture": "repvgg_a0", "num_classes": 4, "num_features": 1280, "global_pool": "avg",
            "label_names": LABELS, "pretrained_cfg": cfg}  # fmt: skip


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory) -> Path:
    """A timm-layout RepVGG-A0 (4 classes, RGB) as model.safetensors, as timm writes it, with no config yet."""
    model = randomize_bn(create_model("A0", num_classes=4)).eval()
    d = tmp_path_factory.mktemp("timm")
    save_file({k: v.contiguous() for k, v in rename(model.state_dict(), "timm").items()}, str(d / "model.safetensors"))
    return d


def _with_config(timm_dir: Path, tmp_path: Path, config: dict | str) -> Path:
    (tmp_path / "model.safetensors").symlink_to(timm_dir / "model.safetensors")
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path / "model.safetensors"


def test_timm_config_sets_the_input_spec(timm_dir, tmp_path):
    _, meta = load_checkpoint(_with_config(timm_dir, tmp_path, timm_config()))
    s = meta.input_spec
    assert (s.size, s.resize, s.interpolation) == ((48, 64), (53, 71), "bicubic")  # floor(48 / 0.9), floor(64 / 0.9)
    assert (s.mean, s.std, s.class_names) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), tuple(LABELS))
    _, plain_meta = load_checkpoint(timm_dir / "model.safetensors")  # no config.json: ImageNet's defaults
    assert plain_meta.input_spec == InputSpec()


def test_flags_win_over_the_config_and_the_log_names_each_source(timm_dir, tmp_path, caplog):
    path = _with_config(timm_dir, tmp_path, timm_config())
    with caplog.at_level(logging.INFO, logger="edgerepvgg.checkpoints"):
        _, meta = load_model(path, inputs=InputOverrides(size=32, interpolation="nearest"))
    s = meta.input_spec
    assert (s.size, s.resize, s.interpolation, s.mean) == (32, 35, "nearest", (0.5, 0.4, 0.3))  # 32 * 53/48 = 35.3
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input spec:")]
    assert "size 32 (--size)" in line and "interpolation nearest (--interpolation)" in line
    assert "mean [0.5, 0.4, 0.3] (timm config.json)" in line and "4 class names (timm config.json)" in line


def test_label_names_as_an_index_dict_and_timms_older_flat_layout(timm_dir, tmp_path):
    cfg = timm_config()
    cfg["label_names"] = {str(i): n for i, n in reversed(list(enumerate(LABELS)))}
    (tmp_path / "a").mkdir()
    _, meta = load_checkpoint(_with_config(timm_dir, tmp_path / "a", cfg))
    assert meta.input_spec.class_names == tuple(LABELS)
    flat = {"architecture": "repvgg_a0", **timm_config()["pretrained_cfg"], "num_classes": 4, "labels": LABELS}
    (tmp_path / "b").mkdir()
    _, meta = load_checkpoint(_with_config(timm_dir, tmp_path / "b", flat))
    assert meta.input_spec.size == (48, 64) and meta.input_spec.class_names == tuple(LABELS)


@pytest.mark.parametrize(("config", "match"), [
    ("{not json", "not readable JSON"),
    ({**timm_config(), "num_classes": 10}, "num_classes is 10 but the checkpoint's head has 4 outputs"),
    (timm_config(input_size=[1, 48, 64]), "input_size has 1 channels but the checkpoint's stem takes 3"),
    (timm_config(std=[0.2, 0.0, 0.3]), "std values must be positive"),
    (timm_config(mean=[0.5, 0.5]), "one value per channel"),
    (timm_config(interpolation="cubic-ish"), "interpolation 'cubic-ish' is unknown"),
    (timm_config(crop_pct=0), r"crop_pct must be in \(0, 1\]"),
    ({**timm_config(), "label_names": LABELS[:3]}, "label_names has 3 names but the head has 4 outputs"),
])  # fmt: skip
def test_a_bad_config_is_one_line_naming_the_file(timm_dir, tmp_path, config, match):
    with pytest.raises(UserError, match=match) as exc:
        load_checkpoint(_with_config(timm_dir, tmp_path, config))
    assert "config.json" in str(exc.value) and "\n" not in str(exc.value)


def test_a_config_json_that_is_not_timms_is_left_alone(timm_dir, tmp_path):
    _, meta = load_checkpoint(_with_config(timm_dir, tmp_path, {"model_type": "bert", "hidden_size": 768}))
    assert meta.input_spec == InputSpec()


def test_read_timm_config_keeps_what_it_does_not_say(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"architecture": "repvgg_a0", "pretrained_cfg": {"interpolation": "random"}}))
    spec, origins = read_timm_config(f, InputSpec(), 1000)
    assert spec == InputSpec()  # "random" is timm's training-time choice; bilinear is its eval default
    assert origins["size"] == "default" and origins["interpolation"] == "timm config.json"


# ---------------------------------------------------------------------------------------------
# The command line: one option group on every command that takes a model


@pytest.mark.parametrize(("argv", "match"), [
    (["fuse", "A0", "--size", "-3"], "argument --size: must be at least 1 pixel, got -3"),
    (["fuse", "A0", "--size", "48x0"], "argument --size: must be at least 1 pixel"),
    (["fuse", "A0", "--mean", "0.5", "0.5"], r"--mean has 2 value\(s\) but the model has 3 input channel\(s\); give 3"),
    (["fuse", "A0", "--std", "0"], r"argument --std: must be above 0, got 0"),
    (["fuse", "A0", "--interpolation", "cubic"], "argument --interpolation: invalid choice: 'cubic'"),
    (["fuse", "A0", "--num-classes", "4", "--class-names", "names.txt"], r"3 class names \(--class-names names.txt\) for a model with 4 outputs"),
    (["fuse", "A0", "--class-names", "missing.txt"], "class-names file 'missing.txt' not found"),
    (["fuse", "A0", "--size", "64", "--resize", "32"], r"resize \(32\) must be at least the input size \(64\)"),
    (["calibrate", "--size", "32", "--mean", "0.1", "0.2", "0.3"], r"--mean has 3 value\(s\) but the model has 1 input channel"),
    (["export", "--target", "onnxruntime", "--size", "1.5x2"], "argument --size"),
    (["compare", "--std", "0.2", "0.2"], r"--std has 2 value\(s\) but the model has 1"),
    (["info", "--size", "x"], "argument --size"),
])  # fmt: skip
def test_bad_input_spec_values_are_one_line_exit_2_and_nothing_written(argv, match, tmp_path, monkeypatch, capsys):
    from edgerepvgg.cli import EXIT_USAGE, main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    argv = [*argv, "-o", "out" if argv[0] != "fuse" else "out.safetensors"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == EXIT_USAGE and len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.txt"]


def test_fuse_stores_the_given_spec_in_the_checkpoint(cli, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    out = tmp_path / "fused.safetensors"
    code, stdout, err = cli("fuse", "--size", "40x48", "--interpolation", "bicubic", "--mean", "0.3", "--std", "0.4",
                            "--class-names", str(names), "-o", str(out))  # fmt: skip
    assert code == 0, err
    _, meta = load_checkpoint(out)
    s = meta.input_spec
    assert (s.size, s.resize, s.interpolation, s.mean, s.std) == ((40, 48), (40, 48), "bicubic", (0.3,), (0.4,))
    assert s.class_names == tuple(f"class {i}" for i in range(10))
    assert "on input [2, 1, 40, 48]" in stdout  # the equivalence check ran at the new size
    code, stdout, _ = cli("info", str(out))
    assert code == 0 and "1x40x48, resize 40x48 bicubic" in stdout


def test_export_stores_the_spec_in_every_artifact_and_reads_it_back(cli, tmp_path, one_thread):
    """report.json, quant_spec.json, the ONNX metadata and the device bundle's manifest all carry
    the rectangular spec; a QuantSpec calibrated under other normalization is refused."""
    from edgerepvgg.targets import get_target
    from edgerepvgg.targets.base import Artifact

    out = tmp_path / "ort"
    code, _, err = cli("export", "--target", "onnxruntime", "--int8", "--size", "40x48", "--interpolation", "bicubic",
                       "--method", "minmax", "--eval-limit", "20", "--no-latency", "--no-cache", "--bundle", "-o", str(out))  # fmt: skip
    assert code == 0, err
    want = {**InputSpec(size=(40, 48), resize=(40, 48), channels=1, mean=(0.2860,), std=(0.3530,),
                        interpolation="bicubic").to_dict()}  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    want["class_names"] = report["input_spec"]["class_names"]  # the bundled model's ten
    assert report["input_spec"] == want and len(want["class_names"]) == 10
    assert json.loads((out / "quant_spec.json").read_text())["calibration"]["input_spec"] == want
    onnx = out / report["artifact"]["path"]
    assert get_target("onnxruntime").metadata(Artifact("onnxruntime", "int8", onnx, (onnx,))).input_spec.to_dict() == want
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["input_spec"] == want and manifest["inputs"]["shape"][1:] == [1, 40, 48]

    code, _, err = cli("export", "--target", "onnxruntime", "--spec", str(out / "quant_spec.json"), "--size", "40x48",
                       "--mean", "0.5", "--no-eval", "--no-latency", "-o", str(tmp_path / "again"))  # fmt: skip
    assert code == 2 and "calibrated for inputs normalized with mean [0.286]" in err and "--mean" in err
    assert not (tmp_path / "again").exists()


def test_train_takes_the_same_input_options(tmp_path, cli):
    for split, n in (("train", 4), ("val", 2)):
        for label, shade in (("boots", 40), ("coats", 200)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (30, 20), shade + i).save(folder / f"{i}.png")
    code, _, err = cli("-q", "train", "--data", str(tmp_path / "data"), "--in-chans", "1", "--size", "12x20", "--mean", "0.4",
                       "--std", "0.3", "--interpolation", "nearest", "--epochs", "1", "--batch-size", "8",
                       "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 0, err
    _, meta = load_checkpoint(tmp_path / "run" / "model.safetensors")
    s = meta.input_spec
    assert (s.size, s.resize, s.mean, s.std, s.interpolation) == ((12, 20), (13, 22), (0.4,), (0.3,), "nearest")  # 224/256 ratio
    assert s.class_names == ("boots", "coats")
