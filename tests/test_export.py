"""export: compile, accuracy check (labels, FP32, emulation), latency and report, library and CLI;
the one-line errors for expected mistakes, and no half-written artifact after an interruption."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from quant_helpers import minmax_spec, self_labelled, tiny_plain

from edgerepvgg import UserError
from edgerepvgg._export import REPORT_FILE, ExportOptions, export, references, score
from edgerepvgg.quant import constraints_for
from edgerepvgg.targets.onnxruntime import OnnxRuntimeTarget


@pytest.fixture(scope="module")
def plain():
    return tiny_plain(classes=5).eval()


@pytest.fixture(scope="module")
def eval_set(plain):
    return self_labelled(plain, 64, seed=3)


def test_int8_export_writes_artifact_and_report_with_all_three_comparisons(plain, eval_set, tmp_path):
    spec = minmax_spec(plain, constraints_for("onnxruntime", weight_bits=8))
    report = export(plain, "onnxruntime", tmp_path, "int8", spec, eval_set, options=ExportOptions(threads=1, throughput_batch=4, runs=5))
    acc = report.accuracy
    assert acc.images == 64 and acc.fp32_top1 == 1.0 and acc.top5 is not None
    assert acc.delta_top1 == pytest.approx(100 * (acc.top1 - 1.0))
    assert acc.vs_emulation.top1 >= 0.98 and acc.vs_emulation.cosine > 0.9999
    assert acc.vs_fp32.cosine < acc.vs_emulation.cosine  # quantization error is visible, the runtime's is not
    assert set(report.latency) == {"batch1", "batch4"} and report.latency["batch4"].batch == 4
    d = json.loads((tmp_path / REPORT_FILE).read_text())
    assert d["status"] == "ok" and d["quant"]["spec_sha256"] == spec.sha256
    assert d["accuracy"]["vs_emulation"]["top1"] == acc.vs_emulation.top1
    assert d["artifact"]["size_bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert d["machine"]["cores"] >= 1 and "onnxruntime" in d["machine"]


def test_fp32_export_has_no_emulation_comparison(plain, eval_set, tmp_path):
    report = export(plain, "onnxruntime", tmp_path, "fp32", None, eval_set, options=ExportOptions(latency=False))
    assert report.accuracy.vs_emulation is None and report.latency == {}
    assert report.accuracy.vs_fp32.top1 == 1.0 and report.accuracy.vs_fp32.max_abs < 1e-3


def test_score_counts_disagreement_with_the_emulation(plain, eval_set):
    import torch

    spec = minmax_spec(plain, constraints_for("onnxruntime"))
    refs = references(plain, spec, eval_set)
    flipped = refs.emulation.clone()
    flipped[:8] = -flipped[:8]  # eight rows now pick another class
    acc = score(flipped, refs)
    assert acc.vs_emulation.top1 == pytest.approx(56 / 64)
    assert score(refs.emulation, refs).vs_emulation.sqnr_db == float("inf")
    assert torch.equal(refs.labels, eval_set.labels)


def test_spec_of_another_model_is_a_user_error(plain, tmp_path):
    other = minmax_spec(tiny_plain(seed=1, classes=5), constraints_for("onnxruntime"))
    with pytest.raises(UserError, match="another model"):
        export(plain, "onnxruntime", tmp_path, "int8", other)
    assert not (tmp_path / "model.onnx").exists()


def test_interrupted_write_leaves_no_artifact(plain, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        OnnxRuntimeTarget().compile(plain, None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_export_without_tensorrt_is_labelled_emulated(plain, eval_set, tmp_path):
    from edgerepvgg.targets.tensorrt import TensorRTTarget

    if TensorRTTarget().available() is None:
        pytest.skip("TensorRT and a GPU are present: the engine path runs instead")
    spec = minmax_spec(plain, constraints_for("tensorrt"))
    report = export(plain, "tensorrt", tmp_path, "int8", spec, eval_set)
    assert report.emulated and report.status == "emulated" and report.latency == {}
    assert any("emulated" in n for n in report.notes)
    assert (tmp_path / "build_engine.sh").exists()
    assert report.accuracy.vs_emulation.top1 >= 0.98


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_export_int8_on_a_checkpoint(cli, fmnist_ckpt, tmp_path):
    code, out, err = cli("-q", "export", str(fmnist_ckpt), "--target", "onnxruntime", "--int8", "--eval-limit", "50",
                         "--throughput-batch", "2", "--threads", "1", "-o", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert "agreement with the INT8 emulation" in out and "latency batch1" in out
    d = json.loads((tmp_path / REPORT_FILE).read_text())
    assert d["precision"] == "int8" and d["accuracy"]["images"] == 50
    assert d["quant"]["constraints"].startswith("onnxruntime")


def test_cli_export_with_a_saved_spec_and_the_both_sources_error(cli, fmnist_ckpt, tmp_path):
    spec_path = tmp_path / "spec.json"
    assert cli("-q", "calibrate", str(fmnist_ckpt), "--constraints", "onnxruntime", "--method", "minmax", "-o", str(spec_path))[0] == 0
    code, out, err = cli("-q", "export", str(fmnist_ckpt), "--target", "onnxruntime", "--int8", "--spec", str(spec_path),
                         "--no-eval", "--no-latency", "-o", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    sha = json.loads((tmp_path / "out" / REPORT_FILE).read_text())["quant"]["spec_sha256"]
    from edgerepvgg.quant import load_spec

    assert sha == load_spec(spec_path).sha256
    code, _, err = cli("export", str(fmnist_ckpt), "--target", "onnxruntime", "--int8", "--spec", str(spec_path), "--images", str(tmp_path))
    assert code == 2 and "not both" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "tpu"], "unknown target or profile 'tpu'"),
        (["--target", "onnxruntime", "--int8", "--spec", "missing.json"], "cannot read QuantSpec"),
        (["--target", "onnxruntime", "--int8", "--images", "no-such-dir"], "no-such-dir"),
        (["--target", "onnxruntime", "--precision", "fp16"], "not 'fp16'"),
    ],
)
def test_cli_export_bad_input_is_one_line(cli, fmnist_ckpt, argv, message, tmp_path):
    code, out, err = cli("export", str(fmnist_ckpt), *argv, "--no-eval", "--no-latency", "-o", str(tmp_path))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_export_missing_runtime_is_one_line(cli, fmnist_ckpt, monkeypatch, tmp_path):
    monkeypatch.setattr(OnnxRuntimeTarget, "available", lambda self: "onnxruntime is not installed; pip install onnxruntime")
    code, _, err = cli("export", str(fmnist_ckpt), "--target", "onnxruntime", "-o", str(tmp_path))
    assert code == 2 and "not available here: onnxruntime is not installed" in err
    assert not any(tmp_path.iterdir())


def test_cli_targets_lists_every_target_with_why_not(cli):
    code, out, _ = cli("targets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert set(lines) == {"onnxruntime", "openvino", "tensorrt", "tflite"}
    assert "available" in lines["onnxruntime"] and "not available" not in lines["onnxruntime"]
    from edgerepvgg.targets.tensorrt import TensorRTTarget

    if TensorRTTarget().available() is not None:
        assert "not available: " in lines["tensorrt"]


def test_fixed_batch_export_checks_and_times_at_that_batch(plain, eval_set, tmp_path):
    dynamic = export(plain, "onnxruntime", tmp_path / "dyn", "fp32", None, eval_set, options=ExportOptions(latency=False))
    fixed = export(plain, "onnxruntime", tmp_path / "fix", "fp32", None, eval_set, options=ExportOptions(threads=1, fixed_batch=5, runs=5))
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "fix" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == 5  # 64 images: 12 full chunks and one padded chunk of 4
    assert fixed.accuracy.vs_fp32.max_abs < 1e-4 and dynamic.accuracy.vs_fp32.max_abs < 1e-4
    assert fixed.accuracy.top1 == dynamic.accuracy.top1 and set(fixed.latency) == {"batch5"}


def test_fixed_batch_runner_pads_the_last_chunk_and_drops_the_padding():
    from edgerepvgg.targets import FixedBatchRunner

    seen = []

    def runner(x):
        seen.append(x.shape[0])
        return x.reshape(x.shape[0], -1)[:, :2] * 2

    x = np.arange(7 * 2 * 1 * 1, dtype=np.float32).reshape(7, 2, 1, 1)
    out = FixedBatchRunner(runner, 3)(x)
    assert seen == [3, 3, 3] and out.shape == (7, 2)
    np.testing.assert_array_equal(out, x.reshape(7, 2) * 2)


def test_fixed_batch_is_refused_where_the_runner_adapts(plain, tmp_path):
    from edgerepvgg.targets.tflite import TFLiteTarget

    if TFLiteTarget().available() is not None:
        pytest.skip(TFLiteTarget().available())
    with pytest.raises(UserError, match="cannot fix the batch"):
        export(plain, "tflite", tmp_path, "fp32", options=ExportOptions(fixed_batch=4))
    with pytest.raises(UserError, match="at least 1"):
        export(plain, "onnxruntime", tmp_path, "fp32", options=ExportOptions(fixed_batch=0))


def test_fixed_batch_gives_tensorrt_a_single_shape_profile(plain, tmp_path):
    spec = minmax_spec(plain, constraints_for("tensorrt"))
    report = export(plain, "tensorrt", tmp_path, "int8", spec, options=ExportOptions(latency=False, fixed_batch=4))
    assert report.artifact["info"]["batch"] == {"min": 4, "opt": 4, "max": 4}
    script = (tmp_path / "build_engine.sh").read_text()
    assert "--minShapes=input:4x" in script and "--maxShapes=input:4x" in script


def test_report_paths_are_relative_to_the_report(plain, eval_set, tmp_path):
    report = export(plain, "onnxruntime", tmp_path / "out", "fp32", None, eval_set, options=ExportOptions(latency=False))
    d = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert d["artifact"]["path"] == "model.onnx" and d["artifact"]["files"] == ["model.onnx"]
    assert report.artifact_path == tmp_path / "out" / "model.onnx" and report.artifact_path.exists()


def test_without_labels_export_checks_agreement_on_the_calibration_images(plain, eval_set, tmp_path):
    from dataclasses import replace

    unlabelled = replace(eval_set, labels=eval_set.labels * 0 - 1)  # image files: label -1
    report = export(plain, "onnxruntime", tmp_path, "int8", None, images=unlabelled, calibration="minmax",
                    options=ExportOptions(latency=False, weight_bits=8))  # fmt: skip
    acc = report.accuracy
    assert acc is not None and not acc.labelled and acc.top1 is None and acc.delta_top1 is None
    assert acc.images == len(unlabelled) and acc.vs_emulation.top1 >= 0.98
    assert any(n.startswith("no labels: agreement only") for n in report.notes)
    assert json.loads((tmp_path / REPORT_FILE).read_text())["accuracy"]["labelled"] is False


def test_a_spec_alone_means_int8_and_a_spec_for_fp32_is_refused(plain, eval_set, tmp_path):
    spec = minmax_spec(plain, constraints_for("onnxruntime", weight_bits=8))
    report = export(plain, "onnxruntime", tmp_path / "a", spec=spec, eval_set=False, options=ExportOptions(latency=False))
    assert report.precision == "int8" and report.accuracy is None
    with pytest.raises(UserError, match="for INT8 builds"):
        export(plain, "onnxruntime", tmp_path / "b", "fp32", spec)


def test_cli_export_of_a_foreign_checkpoint_without_labels_is_agreement_only(cli, tmp_path, caplog):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 20, 200 - 30 * i)).save(images / f"{i}.png")
    code, out, err = cli("-q", "export", "A0", "--num-classes", "4", "--target", "onnxruntime", "--int8", "--images", str(images),
                         "--no-latency", "--method", "minmax", "-o", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    assert "random weights" in caplog.text  # a variant name builds an untrained model, and says so
    assert "no labels: agreement only" in out and "agreement with the INT8 emulation" in out
    assert not any(line.startswith("  top-1") for line in out.splitlines())  # no labels, no top-1


def test_a_failed_export_leaves_no_folder_behind(cli, tmp_path):
    out = tmp_path / "new" / "out"
    code, _, err = cli("export", str(tmp_path / "missing.pth"), "--target", "onnxruntime", "-o", str(out))
    assert code == 2 and "not found" in err
    assert not (tmp_path / "new").exists()  # the folders export created for itself are gone again


def test_no_report_mentions_an_absolute_path_inside_its_folder(plain, tmp_path):
    spec = minmax_spec(plain, constraints_for("tensorrt"))
    export(plain, "tensorrt", tmp_path / "trt", "int8", spec, eval_set=False, options=ExportOptions(latency=False))
    text = (tmp_path / "trt" / REPORT_FILE).read_text()
    assert str(tmp_path) not in text
    assert json.loads(text)["artifact"]["path"] == "model.onnx"


def test_a_profile_tensorrt_version_chooses_the_weight_layout(plain, tmp_path):
    from edgerepvgg.profiles import Profile

    spec = minmax_spec(plain, constraints_for("tensorrt"))
    old = export(plain, Profile("jp60", "tensorrt", "int8", tensorrt_version="8.6"), tmp_path / "jp60", spec=spec,
                 eval_set=False, options=ExportOptions(latency=False))  # fmt: skip
    new = export(plain, "tensorrt", tmp_path / "trt10", "int8", spec, eval_set=False,
                 options=ExportOptions(latency=False, tensorrt_version="10.3"))  # fmt: skip
    assert old.artifact["info"]["weight_layout"] == "qdq" and new.artifact["info"]["weight_layout"] == "int8"
    weights = {i.name: i.data_type for i in onnx.load(str(tmp_path / "jp60" / "model.onnx")).graph.initializer}
    assert weights["convs.0.weight.float"] == onnx.TensorProto.FLOAT  # TensorRT 8.x: float weights behind Q -> DQ
    assert onnx.TensorProto.INT8 not in {t for n, t in weights.items() if n.endswith("weight.float")}


def test_a_profile_cpu_flags_decide_the_cpu_scheme(plain, eval_set, tmp_path):
    from edgerepvgg.profiles import Profile

    calib = eval_set
    vnni = export(plain, Profile("xeon", "onnxruntime", "int8", cpu_flags=("avx2", "avx512_vnni")), tmp_path / "a",
                  images=calib, eval_set=False, calibration="minmax", options=ExportOptions(latency=False))  # fmt: skip
    old = export(plain, Profile("old", "onnxruntime", "int8", cpu_flags=("avx2", "fma")), tmp_path / "b",
                 images=calib, eval_set=False, calibration="minmax", options=ExportOptions(latency=False))  # fmt: skip
    assert vnni.quant["constraints"] == "onnxruntime"
    assert old.quant["constraints"] == "onnxruntime-w7first"


def test_cli_bad_tensorrt_version_is_one_line(cli, tmp_path):
    code, _, err = cli("export", "--target", "tensorrt", "--int8", "--tensorrt-version", "8.0", "-o", str(tmp_path / "x"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "8.5" in err
    assert not (tmp_path / "x").exists()


def test_tensorrt_fp16_float_layers_are_refereed_in_fp16(plain, eval_set, tmp_path):
    from dataclasses import replace

    from edgerepvgg.evaluate import agreement, predict
    from edgerepvgg.quant.emulate import IntegerNet
    from edgerepvgg.targets.tensorrt import TensorRTTarget

    spec = minmax_spec(plain, constraints_for("tensorrt"))
    spec = replace(spec, layers=tuple(replace(l, precision="float") if l.name == "convs.3" else l for l in spec.layers))
    report = export(plain, "tensorrt", tmp_path, "int8", spec, eval_set, options=ExportOptions(latency=False, tensorrt_version="10.3"))
    assert report.artifact["info"]["float_layers"] == "fp16"
    target = TensorRTTarget(version="10.3")
    logits = predict(target.load(target.compile(plain, spec, tmp_path / "again", "int8")), eval_set)
    fp16 = agreement(logits, predict(IntegerNet(plain, spec, float_layers="fp16"), eval_set))
    assert report.accuracy.vs_emulation.max_abs == pytest.approx(fp16.max_abs)  # the referee ran convs.3 in FP16
