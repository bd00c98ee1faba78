"""QAT inside the pipeline: ``compare --qat`` fine-tunes once per integer scheme its INT8 targets
need, compiles every target from its scheme's result beside the PTQ row, and reuses the runs on a
re-run; ``export --qat`` compiles the kept result; both refuse to fine-tune without labelled data.
Fine-tunes are counted by instrumenting ``qat`` and by the cache's folders, never by timing."""

from __future__ import annotations

import json

import pytest

from edgerepvgg import UserError
from edgerepvgg._compare import compare
from edgerepvgg._export import export
from edgerepvgg.profiles import Profile
from edgerepvgg.quant import load_spec
from edgerepvgg.quant.qat import QATConfig, qat_cache_dir
from edgerepvgg.report import qat_runs_text, table_rows, text_table

from helpers import write_fake_fashion_mnist
from quant_helpers import self_labelled, tiny_plain

CONFIG = QATConfig(epochs=1, batch_size=32, lr=1e-4, crop_padding=0, stats_images=64)
PROFILES = [Profile("ort-int8", "onnxruntime", "int8", threads=1, batch=2, weight_bits=8),
            Profile("ort-int8-4t", "onnxruntime", "int8", threads=1, batch=4, weight_bits=8),  # the same scheme again
            Profile("tfl-int8", "tflite", "int8", threads=1, batch=2),
            Profile("ort-fp32", "onnxruntime", "fp32", threads=1, batch=2)]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain():
    return tiny_plain(classes=5).eval()


@pytest.fixture(scope="module")
def sets(plain):
    """(training, held-out) for QAT, and the comparison's own evaluation images."""
    return (self_labelled(plain, 64, seed=1), self_labelled(plain, 32, seed=2)), self_labelled(plain, 32, seed=5)


@pytest.fixture
def count_fine_tunes(monkeypatch) -> list[str]:
    """The scheme of every QAT run that really trains (a reused one does not call ``qat``)."""
    import edgerepvgg.quant.qat as qat_module

    runs, real = [], qat_module.qat

    def counting(plain, spec, *args, **kwargs):
        runs.append(spec.constraints.name)
        return real(plain, spec, *args, **kwargs)

    monkeypatch.setattr(qat_module, "qat", counting)
    return runs


def test_compare_qat_fine_tunes_once_per_scheme_and_reuses_the_runs(plain, sets, tmp_path, count_fine_tunes, capsys):
    qat_data, data = sets
    first = compare(plain, PROFILES, tmp_path / "a", data, data, calibration="minmax", threads=1, progress=True, qat=CONFIG,
                    qat_data=qat_data)  # fmt: skip
    # Two schemes, two fine-tunes, three QAT rows (the two ONNX Runtime profiles share one run).
    assert sorted(count_fine_tunes) == ["onnxruntime", "tflite"]
    assert len(list(qat_cache_dir().iterdir())) == 2
    names = [r.name for r in first.rows]
    rows = {r.name: r for r in first.rows}
    for ptq in ("ort-int8", "ort-int8-4t", "tfl-int8"):
        assert names[names.index(ptq) + 1] == f"{ptq}-qat"  # side by side: the QAT row right below its PTQ row
        assert rows[ptq].quant == "ptq" and rows[f"{ptq}-qat"].quant in ("qat", "ptq kept")
        assert rows[f"{ptq}-qat"].status == "ok", rows[f"{ptq}-qat"].why
        assert rows[f"{ptq}-qat"].agree_emulation >= 0.97  # the target computes the QAT spec's emulation
        assert "QAT 1 of 1 epoch(s)" in rows[f"{ptq}-qat"].why
    assert "ort-fp32-qat" not in rows and rows["ort-fp32"].quant == ""
    specs = {n: load_spec(tmp_path / "a" / n / "quant_spec.json") for n in ("ort-int8-qat", "ort-int8-4t-qat", "tfl-int8-qat", "ort-int8")}
    assert specs["ort-int8-qat"] == specs["ort-int8-4t-qat"]  # compiled from the one onnxruntime run ...
    assert specs["tfl-int8-qat"].constraints.name == "tflite"  # ... and the tflite rows from their own scheme's
    assert specs["ort-int8-qat"].calibration["qat"]["initial_spec_sha256"] == specs["ort-int8"].sha256  # started from PTQ
    assert {"emulation-onnxruntime-qat", "emulation-tflite-qat"} <= set(rows)
    assert [(s["scheme"], s["reused"]) for s in first.qat] == [("onnxruntime", False), ("tflite", False)]
    # The table: a quant column after precision, and the runs in words.
    header, body = table_rows(first)
    assert header[header.index("precision") + 1] == "quant"
    assert "onnxruntime: fine-tuned 1/1 epoch(s)" in qat_runs_text(first.qat) and text_table(header, body)
    # The progress bar counted the fine-tunes: 4 targets + 3 QAT rows + 1 epoch for each of 2 schemes.
    err = capsys.readouterr().err
    assert "| 9/9 " in err and "| 0/9 " in err and "QAT for tflite: epoch 1/1" in err
    # A re-run reuses both runs: no fine-tune, the same QAT rows.
    second = compare(plain, PROFILES, tmp_path / "b", data, data, calibration="minmax", threads=1, progress=False, qat=CONFIG,
                     qat_data=qat_data)  # fmt: skip
    assert len(count_fine_tunes) == 2 and len(list(qat_cache_dir().iterdir())) == 2
    assert [(s["scheme"], s["reused"]) for s in second.qat] == [("onnxruntime", True), ("tflite", True)]
    again = {r.name: r for r in second.rows}
    for name in ("ort-int8-qat", "ort-int8-4t-qat", "tfl-int8-qat"):
        assert (again[name].top1, again[name].agree_emulation, again[name].quant) == (rows[name].top1, rows[name].agree_emulation, rows[name].quant)
        assert "reused from" in again[name].why
    assert load_spec(tmp_path / "b" / "tfl-int8-qat" / "quant_spec.json") == specs["tfl-int8-qat"]
    # Other options are another run; --no-cache runs in the output folder and keeps nothing in the cache.
    compare(plain, PROFILES[:1], tmp_path / "c", data, data, calibration="minmax", threads=1, progress=False,
            qat=QATConfig(**{**CONFIG.__dict__, "lr": 2e-4}), qat_data=qat_data, cache=False)  # fmt: skip
    assert count_fine_tunes[2:] == ["onnxruntime"] and len(list(qat_cache_dir().iterdir())) == 2
    assert json.loads((tmp_path / "c" / "qat-onnxruntime" / "qat.json").read_text())["config"]["lr"] == 2e-4


def test_export_qat_compiles_the_kept_result_against_the_fp32_model_before_fine_tuning(plain, sets, tmp_path, count_fine_tunes):
    qat_data, data = sets
    report = export(plain, "onnxruntime", tmp_path / "a", "int8", images=data, eval_set=data, calibration="minmax",
                    qat=CONFIG, qat_data=qat_data)  # fmt: skip
    q = report.quant["qat"]
    assert count_fine_tunes == [q["scheme"]] and q["kept"] in ("qat", "ptq") and not q["reused"]
    assert report.quant["origin"].endswith("of 1 epoch(s) from calibrated for " + q["scheme"] + " on 32 images of random, "
                                           "labelled by the FP32 model (minmax)")  # fmt: skip
    assert report.accuracy.fp32_top1 == 1.0  # the labels are the original FP32 model's: it stays the reference
    assert report.accuracy.vs_emulation.top1 >= 0.97 and any(n.startswith("QAT 1 of 1 epoch(s)") for n in report.notes)
    spec = load_spec(tmp_path / "a" / "quant_spec.json")
    assert spec.calibration["qat"]["kept"] == q["kept"]
    again = export(plain, "onnxruntime", tmp_path / "b", "int8", images=data, eval_set=data, calibration="minmax",
                   qat=CONFIG, qat_data=qat_data)  # fmt: skip
    assert len(count_fine_tunes) == 1 and again.quant["qat"]["reused"] and again.quant["spec_sha256"] == report.quant["spec_sha256"]


def test_qat_without_labelled_data_or_int8_targets_is_refused(plain, sets, tmp_path, count_fine_tunes):
    qat_data, data = sets
    with pytest.raises(UserError, match=r"--qat needs labelled training images .* pass --data DIR"):
        compare(plain, PROFILES[:1], tmp_path / "a", data, data, qat=CONFIG, progress=False)
    with pytest.raises(UserError, match="none of the chosen targets is INT8"):
        compare(plain, PROFILES[3:], tmp_path / "b", data, data, qat=CONFIG, qat_data=qat_data, progress=False)
    with pytest.raises(UserError, match="--qat needs labelled training images"):
        export(plain, "onnxruntime", tmp_path / "c", "int8", images=data, eval_set=data, qat=CONFIG)
    with pytest.raises(UserError, match="fine-tunes an INT8 build, this one is fp32"):
        export(plain, "onnxruntime", tmp_path / "d", "fp32", eval_set=data, qat=CONFIG, qat_data=qat_data)
    assert count_fine_tunes == [] and not any((tmp_path / d).exists() for d in "abcd")


def test_cli_qat_in_export_and_compare(fmnist_ckpt, tmp_path, cli, count_fine_tunes):
    """The CLI: Fashion-MNIST-shaped training data from --data, the bundled calibration images,
    the QAT flags of the shared group; without labelled data, one line and exit 2."""
    fake = write_fake_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=32)
    common = ["--qat", "1", "--data", str(fake), "--batch-size", "32", "--lr", "1e-4", "--eval-limit", "20", "--method", "minmax"]
    code, out, err = cli("export", str(fmnist_ckpt), "--target", "onnxruntime", "--int8", "--no-latency", *common,
                         "-o", str(tmp_path / "export"))  # fmt: skip
    assert code == 0, err
    assert "note: QAT 1 of 1 epoch(s) on fashion-mnist:train" in out and len(count_fine_tunes) == 1
    code, out, err = cli("compare", str(fmnist_ckpt), "--targets", "cpu-onnxruntime-int8", *common, "-o", str(tmp_path / "compare"))
    assert code in (0, 1), err  # a gate may fail on random weights; the rows are what is checked
    assert "cpu-onnxruntime-int8-qat" in out and "QAT (each scheme fine-tuned once" in out
    doc = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [r["quant"] for r in doc["rows"] if r["name"].startswith("cpu-onnxruntime-int8")] == ["ptq", doc["rows"][-1]["quant"]]
    assert len(doc["qat"]) == 1
    code, out, err = cli("compare", "A0", "--num-classes", "5", "--in-chans", "1", "--targets", "onnxruntime", "--qat", "1",
                         "-o", str(tmp_path / "refused"))  # fmt: skip
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--qat needs labelled training images" in err
    code, _, err = cli("export", "A0", "--target", "onnxruntime", "--int8", "--qat", "1", "--data", str(tmp_path / "export"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train/" in err
