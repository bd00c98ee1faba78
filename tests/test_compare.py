"""compare and device profiles: one consistent table in every format, gates that fail with the
right exit code, unavailable targets skipped with their reason, malformed profiles named."""

from __future__ import annotations

import csv
import json

import pytest

from edgerepvgg import UserError
from edgerepvgg._compare import compare
from edgerepvgg.profiles import Gates, Profile, load_profile, resolve, shipped_profiles
from edgerepvgg.report import write_comparison
from edgerepvgg.targets.onnxruntime import OnnxRuntimeTarget

from quant_helpers import self_labelled, tiny_plain


@pytest.fixture(scope="module")
def plain():
    return tiny_plain(classes=5).eval()


@pytest.fixture(scope="module")
def data(plain):
    return self_labelled(plain, 64, seed=5)


def test_every_shipped_profile_is_valid_and_names_a_known_backend():
    paths = shipped_profiles()
    assert {p.stem for p in paths} >= {"cpu-onnxruntime-int8", "cpu-openvino-int8", "cpu-litert-int8",
                                       "jetson-orin-tensorrt-int8", "intel-cpu-openvino-int8", "arm-litert-int8"}  # fmt: skip
    for path in paths:
        p = load_profile(path)
        assert p.name == path.stem and p.backend in ("onnxruntime", "openvino", "tensorrt", "tflite")
        if p.precision == "int8":
            assert p.gates.min_agreement_emulation is not None


@pytest.mark.parametrize(
    "text, field",
    [
        ('backend = "onnxruntime"\nthreads = "two"\n', "threads"),
        ('backend = "onnxruntime"\nprecison = "int8"\n', "precison"),
        ('precision = "int8"\n', "backend"),
        ('backend = "tpu"\n', "backend"),
        ('backend = "onnxruntime"\nprecision = "int4"\n', "precision"),
        ('backend = "onnxruntime"\nbatch = 0\n', "batch"),
        ('backend = "onnxruntime"\n[gates]\nmax_delta_top1 = "1"\n', "gates.max_delta_top1"),
        ('backend = "onnxruntime"\n[gates]\nmin_top1 = 0.9\n', "gates.min_top1"),
        ('backend = "tensorrt"\ntensorrt_version = "ten"\n', "tensorrt_version"),
        ('backend = "openvino"\ncpu_flags = "avx2"\n', "cpu_flags"),
        ('backend = "openvino"\ncpu_flags = ["avx2", 3]\n', "cpu_flags"),
        ('backend = "openvino"\nweight_bits = 12\n', "weight_bits"),
    ],
)
def test_malformed_profile_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value)


def test_invalid_toml_is_one_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("backend = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(path)


def test_resolve_expands_backends_and_refuses_unknown_names():
    names = [p.name for p in resolve(["onnxruntime", "cpu-openvino-int8"])]
    assert names == ["onnxruntime-fp32", "onnxruntime-int8", "cpu-openvino-int8"]
    assert "tensorrt-fp32" in [p.name for p in resolve(["all"])]
    with pytest.raises(UserError, match="unknown target or profile 'npu'"):
        resolve(["npu"])


def test_compare_rows_agree_across_json_csv_and_markdown(plain, data, tmp_path):
    profiles = [Profile("ort-fp32", "onnxruntime", "fp32", threads=1, batch=2),
                Profile("ort-int8", "onnxruntime", "int8", threads=1, batch=2, weight_bits=8),
                Profile("trt-int8", "tensorrt", "int8")]  # fmt: skip
    result = compare(plain, profiles, tmp_path, data, data, calibration="minmax", threads=1, progress=False)
    paths = write_comparison(result, tmp_path)
    rows = {r.name: r for r in result.rows}
    assert {"pytorch-fused", "ort-fp32", "ort-int8", "trt-int8"} <= set(rows)
    assert rows["ort-fp32"].status == "ok" and rows["ort-fp32"].top1 == 1.0
    assert rows["ort-fp32"].p50_ms is not None and rows["ort-fp32"].throughput_batch == 2  # timed, at the profile's batch
    assert rows["ort-int8"].agree_emulation >= 0.98 and rows["ort-int8"].int8_convs == "22/22 (graph)"
    assert rows["pytorch-fused"].status == "reference" and rows["pytorch-fused"].agree_fp32 == 1.0
    assert any(name.startswith("emulation-onnxruntime") for name in rows)
    from edgerepvgg.targets.tensorrt import TensorRTTarget

    if TensorRTTarget().available() is not None:
        assert rows["trt-int8"].status == "emulated" and rows["trt-int8"].p50_ms is None
    doc = json.loads(paths["json"].read_text())
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    md_lines = [line for line in paths["md"].read_text().splitlines() if line.startswith("| ")]
    assert len(doc["rows"]) == len(table) == len(md_lines) - 2 == len(result.rows)  # header and rule rows
    for d, c in zip(doc["rows"], table):
        assert c["target"] == d["name"] and c["status"] == d["status"]
        if d["top1"] is not None:
            assert float(c["top-1 %"]) == pytest.approx(100 * d["top1"], abs=0.005)
    assert paths["png"].stat().st_size > 1000 and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_unavailable_target_is_skipped_with_its_reason_not_an_error(plain, data, tmp_path, monkeypatch):
    monkeypatch.setattr(OnnxRuntimeTarget, "available", lambda self: "onnxruntime is not installed; pip install onnxruntime")
    profiles = [Profile("ort", "onnxruntime", "fp32"), Profile("big", "tensorrt", "fp32", input_size=224),
                Profile("arm", "onnxruntime", "fp32", arch="riscv64")]  # fmt: skip
    result = compare(plain, profiles, tmp_path, None, data, progress=False)
    rows = {r.name: r for r in result.rows}
    assert rows["ort"].status == "skipped" and "pip install onnxruntime" in rows["ort"].why
    assert rows["big"].status == "skipped" and "224x224" in rows["big"].why
    assert not result.failed


def test_other_architecture_gives_accuracy_without_latency(plain, data, tmp_path):
    result = compare(plain, [Profile("arm", "onnxruntime", "fp32", arch="riscv64")], tmp_path, None, data, progress=False)
    row = {r.name: r for r in result.rows}["arm"]
    assert row.status == "accuracy only" and row.top1 == 1.0 and row.p50_ms is None and "riscv64" in row.why


def test_impossible_gate_fails_compare(plain, data, tmp_path):
    tight = Profile("ort-int8", "onnxruntime", "int8", threads=1, batch=2, gates=Gates(max_latency_ms=1e-6))
    result = compare(plain, [tight], tmp_path, data, data, calibration="minmax", progress=False)
    row = {r.name: r for r in result.rows}["ort-int8"]
    assert result.failed and row.status == "gate failed" and "latency" in row.gates_failed[0]


def test_cli_compare_exit_code_follows_the_gates(cli, fmnist_ckpt, tmp_path):
    ok = tmp_path / "ok.toml"
    ok.write_text('backend = "onnxruntime"\nprecision = "fp32"\nthreads = 1\nbatch = 2\n[gates]\nmax_delta_top1 = 0.5\n')
    tight = tmp_path / "tight.toml"
    tight.write_text('backend = "onnxruntime"\nprecision = "fp32"\nthreads = 1\nbatch = 2\n[gates]\nmax_latency_ms = 0.000001\n')
    code, out, err = cli("-q", "compare", str(fmnist_ckpt), "--profiles", str(ok), "--eval-limit", "30", "-o", str(tmp_path / "a"))
    assert code == 0, err
    assert "ok " in out and (tmp_path / "a" / "compare.md").exists()
    code, out, err = cli("-q", "compare", str(fmnist_ckpt), "--profiles", str(ok), str(tight), "--eval-limit", "30", "-o", str(tmp_path / "b"))
    assert code == 1 and "1 target(s) failed" in err and "gate failed" in out
    code, _, err = cli("compare", str(fmnist_ckpt), "--targets", "npu", "-o", str(tmp_path / "c"))
    assert code == 2 and "unknown target or profile 'npu'" in err and len(err.strip().splitlines()) == 1


def test_a_gate_that_cannot_be_evaluated_is_not_checked_and_fails_only_under_strict(plain, data, tmp_path):
    gated = Profile("arm", "onnxruntime", "fp32", arch="riscv64", gates=Gates(max_latency_ms=5.0))
    lenient = compare(plain, [gated], tmp_path / "a", None, data, progress=False)
    row = {r.name: r for r in lenient.rows}["arm"]
    assert row.status == "accuracy only, not checked" and "not checked" in row.gates_unchecked[0] and not row.gates_failed
    assert not lenient.failed
    strict = compare(plain, [gated], tmp_path / "b", None, data, strict=True, progress=False)
    assert strict.failed


def test_a_target_that_errors_fails_the_comparison(plain, data, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise UserError("the runtime refused the graph")

    monkeypatch.setattr(OnnxRuntimeTarget, "compile", broken)
    result = compare(plain, [Profile("ort", "onnxruntime", "fp32")], tmp_path, None, data, progress=False)
    row = {r.name: r for r in result.rows}["ort"]
    assert row.status == "error" and "refused the graph" in row.why
    assert result.failed and [r.name for r in result.errors] == ["ort"]


def test_unlabelled_images_give_agreement_only_rows(plain, data, tmp_path):
    from dataclasses import replace

    unlabelled = replace(data, labels=data.labels * 0 - 1)  # image files: label -1
    result = compare(plain, [Profile("ort-int8", "onnxruntime", "int8", threads=1, weight_bits=8,
                                     gates=Gates(max_delta_top1=0.5, min_agreement_emulation=0.9))],
                     tmp_path, unlabelled, unlabelled, calibration="minmax", progress=False)  # fmt: skip
    row = {r.name: r for r in result.rows}["ort-int8"]
    assert row.top1 is None and row.delta_top1 is None and row.agree_emulation >= 0.9
    assert row.status == "not checked" and any("top-1" in g for g in row.gates_unchecked)
    assert not result.labelled and "agreement only" in result.eval_source


def test_a_qat_spec_is_compared_on_profiles_of_its_own_scheme(plain, data, tmp_path):
    from quant_helpers import minmax_spec

    from edgerepvgg.quant import constraints_for

    spec = minmax_spec(plain, constraints_for("onnxruntime", weight_bits=8))
    profiles = [Profile("ort-int8", "onnxruntime", "int8", weight_bits=8, threads=1),
                Profile("tfl-int8", "tflite", "int8")]  # fmt: skip
    result = compare(plain, profiles, tmp_path, None, data, spec=spec, progress=False)
    rows = {r.name: r for r in result.rows}
    assert rows["ort-int8"].status == "ok" and rows["ort-int8"].agree_emulation >= 0.98
    assert rows["tfl-int8"].status == "skipped"
    assert f"emulation-{spec.constraints.name}" in rows


@pytest.mark.parametrize("latencies", [(0.41, 0.43, 0.47, 0.55), (0.05, 0.4, 3.2, 25.0, 180.0), (0.01, 9000.0), (2.0, 2.0)])
def test_plot_latency_tick_labels_never_overlap(latencies):
    import matplotlib.pyplot as plt

    from edgerepvgg._compare import Comparison, Row
    from edgerepvgg.report import comparison_figure

    rows = tuple(Row(f"t{i}", "onnxruntime", "cpu", "int8", "ok", top1=0.9, p50_ms=ms) for i, ms in enumerate(latencies))
    fig = comparison_figure(Comparison(rows, "x", 10, "m"))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
              if t.get_text() and lo <= t.get_position()[0] <= hi]  # fmt: skip
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    plt.close(fig)
    assert len(boxes) >= 2  # the axis is labelled
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))  # left to right, no two touching


def test_a_profile_reads_the_device_cpu_flags_and_tensorrt_version(tmp_path):
    path = tmp_path / "dev.toml"
    path.write_text('backend = "tensorrt"\ntensorrt_version = "8.6"\n')
    assert load_profile(path).tensorrt_version == "8.6"
    path.write_text('backend = "openvino"\ncpu_flags = ["AVX2", "fma"]\n')
    assert load_profile(path).cpu_flags == ("avx2", "fma")


def test_without_matplotlib_compare_writes_every_file_but_the_plot(plain, data, tmp_path, monkeypatch, caplog):
    import edgerepvgg.report as report

    result = compare(plain, [Profile("ort", "onnxruntime", "fp32", threads=1)], tmp_path, None, data, progress=False)
    monkeypatch.setattr(report, "missing", lambda module: module == "matplotlib")
    paths = write_comparison(result, tmp_path / "out")
    assert set(paths) == {"json", "csv", "md"} and all(p.exists() for p in paths.values())
    assert not (tmp_path / "out" / "compare.png").exists() and "edgerepvgg[plots]" in caplog.text


def test_without_onnxsim_the_fp32_graph_is_written_as_built(plain, monkeypatch):
    import edgerepvgg.targets.onnx_graph as onnx_graph

    monkeypatch.setattr(onnx_graph, "missing", lambda module: module == "onnxsim")
    model = onnx_graph.build_model(plain)
    assert onnx_graph.simplify(model) is model


def test_a_device_result_is_scored_like_the_host_row(plain, data, tmp_path):
    """Export with a bundle, run the bundle's runner as a device would (a subprocess here), and
    score its result: the same accuracy as the host row, latency from the device, named as such."""
    import subprocess
    import sys

    from edgerepvgg._export import ExportOptions, export
    from edgerepvgg.quant import constraints_for

    profile = Profile("ort-int8", "onnxruntime", "int8", threads=1, batch=4, weight_bits=7)
    host = export(plain, profile, tmp_path / "ort-int8", images=data, eval_set=data, calibration="minmax",
                  options=ExportOptions(threads=1, runs=5, bundle=True))  # fmt: skip
    bundle = tmp_path / "ort-int8" / "bundle"
    run = subprocess.run([sys.executable, "runner.py", "."], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = compare(plain, [], tmp_path / "cmp", None, data, results=[bundle / "result"], progress=False)
    row = {r.name: r for r in result.rows}["ort-int8@device"]
    assert row.top1 == host.accuracy.top1 and row.agree_emulation == host.accuracy.vs_emulation.top1
    assert row.p50_ms is not None and row.throughput_batch == 4 and "measured on the device" in row.why
    assert row.device != "this machine" and row.status == "ok"
    assert any(r.name.startswith("emulation-") for r in result.rows)  # the referee of the device's spec


def test_a_device_result_of_another_model_is_refused(plain, data, tmp_path):
    import subprocess
    import sys

    from edgerepvgg._export import ExportOptions, export

    export(plain, Profile("ort", "onnxruntime", "fp32", threads=1), tmp_path / "ort", eval_set=data,
           options=ExportOptions(threads=1, runs=3, bundle=True))  # fmt: skip
    bundle = tmp_path / "ort" / "bundle"
    assert subprocess.run([sys.executable, "runner.py", "."], cwd=bundle, capture_output=True, timeout=300).returncode == 0
    with pytest.raises(UserError, match="another model"):
        compare(tiny_plain(seed=1, classes=5), [], tmp_path / "cmp", None, data, results=[bundle], progress=False)


def test_compare_bundles_name_their_profile_and_a_result_keeps_it(plain, data, tmp_path):
    import json
    import subprocess
    import sys

    compare(plain, [Profile("ort-fp32", "onnxruntime", "fp32", threads=1, batch=2)], tmp_path / "a", None, data,
            bundles=True, progress=False)  # fmt: skip
    bundle = tmp_path / "a" / "ort-fp32" / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["profile"] == "ort-fp32"
    assert subprocess.run([sys.executable, "runner.py", "."], cwd=bundle, capture_output=True, timeout=300).returncode == 0
    both = compare(plain, [Profile("ort-fp32", "onnxruntime", "fp32", threads=1, batch=2)], tmp_path / "b", None, data,
                   results=[bundle / "result"], progress=False)  # fmt: skip
    rows = {r.name: r for r in both.rows}
    assert rows["ort-fp32@device"].top1 == rows["ort-fp32"].top1 == 1.0 and not both.failed
