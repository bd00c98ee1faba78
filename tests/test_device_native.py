"""Native timers side by side: the vendor's benchmark tool named in each bundle, run by the device
runner after its own timing, its raw output kept and its figures parsed (never a derived one).

OpenVINO's benchmark_app and LiteRT's pip ``litert-benchmark`` are installed here and run for real,
in the torch-free device interpreter of test_device.py; trtexec (no GPU here) and a missing or
failing tool are fakes: shell scripts put where the runner looks ($TRTEXEC, $BENCHMARK_APP).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgerepvgg.device import NativeTiming, read_manifest, read_result
from edgerepvgg.device import runner as device_runner
from edgerepvgg.errors import UserError
from edgerepvgg.targets.tensorrt import read_trtexec_times
from test_device import BATCH, RUNS, WARMUP, artifacts, dataset, leftovers, run_device  # noqa: F401 -- fixtures

from edgerepvgg.device import write_bundle

DATA = Path(__file__).parent / "data"
TRT = DATA / "trtexec_native"
TRT_OPTIONS = DATA / "trtexec_options"
VENV_BIN = Path(sys.executable).parent


def make(artifacts, dataset, out: Path, name: str, **kwargs) -> Path:
    target, artifact = artifacts(name)
    kwargs = {"batch": BATCH, "warmup": WARMUP, "runs": RUNS, **kwargs}
    return write_bundle(artifact, target, dataset, out, **kwargs)


def fake_tool(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def needs_tool(name: str) -> None:
    if not (VENV_BIN / name).exists() and not shutil.which(name):
        pytest.skip(f"{name} is not installed here (pip install openvino / ai-edge-litert brings it)")


# ---------------------------------------------------------------------------------------------
# Real tools, in the torch-free device interpreter


def test_openvino_bundle_runs_benchmark_app_and_reads_its_report(artifacts, dataset, tmp_path):
    needs_tool("benchmark_app")
    b = make(artifacts, dataset, tmp_path / "bundle", "openvino", threads=1)
    manifest = read_manifest(b)
    assert [(e["tool"], e["batch"]) for e in manifest["native"]] == [("benchmark_app", 1), ("benchmark_app", BATCH)]
    proc = run_device(tmp_path, str(b / "runner.py"), str(b), "--native", "require")
    assert proc.returncode == 0, proc.stderr
    assert "benchmark_app, batch 1: p50" in proc.stderr

    raw = json.loads((b / "result" / "result.json").read_text())
    assert raw["native_mode"] == "require" and len(raw["native"]) == 2
    result = read_result(b / "result", b)
    assert [(t.tool, t.batch) for t in result.native] == [("benchmark_app", 1), ("benchmark_app", BATCH)]
    assert result.native_notes == ()
    for rec, timing, entry in zip(raw["native"], result.native, manifest["native"]):
        assert rec["status"] == "ok" and rec["exit_code"] == 0 and rec["seconds"] > 0 and rec["argv"] == entry["argv"]
        assert Path(rec["path"]).name == "benchmark_app"
        # the figures are the report's own, read back here independently of the runner's parser
        report = timing.source
        assert report == b / "result" / "native" / f"benchmark_app_b{timing.batch}" / "benchmark_report.csv" and report.is_file()
        rows = dict(line.split(";", 1) for line in report.read_text().splitlines() if line.count(";") == 1)
        median = rows.get("latency (ms)") or rows["Median latency (ms)"]
        assert timing.p50_ms == float(median) and timing.mean_ms == float(rows.get("avg latency") or rows["Average latency (ms)"])
        assert timing.min_ms == float(rows.get("min latency") or rows["Min latency (ms)"])
        assert timing.batch == int(rows["batch size"]) and timing.runs == int(rows["total number of iterations"]) == RUNS
        assert timing.p90_ms is None  # benchmark_app reports one percentile; none is made up
        assert "benchmark_app" in timing.timer and "perf_counter" not in timing.timer
        assert (b / "result" / rec["log"]).read_text().count("[Step 11/11]") == 1  # its own output kept, whole
        assert "-nthreads" in entry["argv"] and entry["argv"][entry["argv"].index("-nthreads") + 1] == "1"
    assert not (b / "native").exists() and leftovers(b) == []  # the tool wrote into the result, not the bundle


def test_tflite_bundle_runs_litert_benchmark_and_notes_benchmark_model(artifacts, dataset, tmp_path):
    needs_tool("litert-benchmark")
    b = make(artifacts, dataset, tmp_path / "bundle", "tflite")
    assert [e["tool"] for e in read_manifest(b)["native"]] == ["benchmark_model", "litert-benchmark"]
    proc = run_device(tmp_path, str(b / "runner.py"), str(b))
    assert proc.returncode == 0, proc.stderr
    result = read_result(b / "result", b)
    (timing,) = result.native
    saved = json.loads(timing.source.read_text())["latency"]
    assert timing.tool == "litert-benchmark" and timing.batch == 1 and timing.runs == saved["num_runs"] == RUNS
    assert (timing.p50_ms, timing.mean_ms, timing.min_ms) == (saved["median_ms"], saved["avg_ms"], saved["min_ms"])
    assert timing.p90_ms is None and "perf_counter" in timing.timer  # the pip tool is a Python timer: it says so
    if not shutil.which("benchmark_model"):  # TFLite's C++ tool is not installed here: recorded, not fatal
        (note,) = result.native_notes
        assert note.startswith("benchmark_model (batch 1): not found") and "$BENCHMARK_MODEL" in note


# ---------------------------------------------------------------------------------------------
# The commands the manifest carries


def trtexec_options(release: str) -> set[str]:
    return {ln.strip() for ln in (TRT_OPTIONS / f"{release}.txt").read_text().splitlines() if ln.startswith("--")}


def test_manifest_commands_use_only_options_the_tools_have(artifacts, dataset, tmp_path):
    needs_tool("benchmark_app")
    trt = read_manifest(make(artifacts, dataset, tmp_path / "trt", "tensorrt"))
    assert [e["batch"] for e in trt["native"]] == [1, BATCH]
    for entry in trt["native"]:
        argv = entry["argv"]
        assert argv[0] == "trtexec" and "--loadEngine=model.plan" in argv and f"--iterations={RUNS}" in argv
        assert f"--shapes=input:{entry['batch']}x1x16x16" in argv and f"--exportTimes=native/trtexec_times_b{entry['batch']}.json" in argv
        for release in ("8.5", "8.6", "10.0", "10.3", "10.16", "11.0", "11.1"):
            assert {a.split("=", 1)[0] for a in argv[1:]} <= trtexec_options(release), release
    helptext = subprocess.run([str(VENV_BIN / "benchmark_app"), "-h"], capture_output=True, text=True, timeout=120).stdout
    known = set(re.findall(r"(?<![\w-])(-{1,2}[a-z_]+)\b", helptext))
    for threads in (None, 2):
        ov = read_manifest(make(artifacts, dataset, tmp_path / f"ov{threads}", "openvino", threads=threads))
        for entry in ov["native"]:
            opts = {a for a in entry["argv"][1:] if a.startswith("-")}
            assert opts <= known, opts - known
            assert ("-nthreads" in opts) == (threads is not None) and ("-hint" in opts)
    ort = read_manifest(make(artifacts, dataset, tmp_path / "ort", "onnxruntime"))
    assert ort["native"] == [] and "onnxruntime_perf_test" in ort["native_none"]


# ---------------------------------------------------------------------------------------------
# trtexec: its recorded output, parsed


def trt_entry(batch: int = 1, warmup: str = "500") -> dict:
    return {"tool": "trtexec", "batch": batch, "argv": ["trtexec", "--loadEngine=model.plan", f"--warmUp={warmup}",
                                                        f"--exportTimes=native/trtexec_times_b{batch}.json"]}  # fmt: skip


def test_trtexec_times_file_parsed_with_trtexecs_own_rules(tmp_path):
    (tmp_path / "native").mkdir()
    shutil.copy(TRT / "times_b1.json", tmp_path / "native" / "trtexec_times_b1.json")
    log = (TRT / "trtexec_b1.log").read_text()
    source, f = device_runner.parse_trtexec(trt_entry(), str(tmp_path), log)
    assert source == "native/trtexec_times_b1.json"
    # 10 measured queries of 1..10 ms; the 3 warm-up queries of 50 ms are dropped as trtexec drops them
    assert f["runs"] == 10 and f["min_ms"] == pytest.approx(1.0) and f["mean_ms"] == pytest.approx(5.5)
    assert f["p50_ms"] == pytest.approx(5.5) and f["p90_ms"] == pytest.approx(9.0)  # trtexec's rule, not numpy's 9.1
    # the same figures as trtexec's own printed summary of that run
    _, printed = device_runner.parse_trtexec(trt_entry(), str(tmp_path / "elsewhere"), log)
    assert printed == pytest.approx(f) and printed["runs"] == 10
    # with the warm-up kept (--warmUp=0) the 50 ms queries show: the filter is what made the figures
    _, kept = device_runner.parse_trtexec(trt_entry(warmup="0"), str(tmp_path), log)
    assert kept["runs"] == 13 and kept["mean_ms"] > 15
    # the host's reader is the same one
    assert read_trtexec_times(TRT / "times_b1.json", warmup_ms=500)["count"] == 10
    assert read_trtexec_times(TRT / "times_b1.json")["count"] == 13


def test_trtexec_summary_of_an_old_release_has_no_p90(tmp_path):
    _, f = device_runner.parse_trtexec(trt_entry(), str(tmp_path), (TRT / "trtexec_8.0_b1.log").read_text())
    assert f["p90_ms"] is None and f["p50_ms"] == 5.5 and f["min_ms"] == 1.0 and f["mean_ms"] == 5.5  # not End-to-End's
    with pytest.raises(device_runner.NativeError, match="Latency: min"):
        device_runner.parse_trtexec(trt_entry(), str(tmp_path), "[I] Throughput: 52.6 qps\n")


def test_trtexec_runs_from_the_bundle_command_with_a_recorded_trtexec(artifacts, dataset, tmp_path, monkeypatch):
    """No GPU here: the TensorRT bundle's own trtexec commands are run through the runner's native
    step against a stand-in trtexec that refuses options 10.3 lacks and replays the recorded output."""
    b = make(artifacts, dataset, tmp_path / "bundle", "tensorrt")
    manifest = read_manifest(b)
    (b / "model.plan").write_bytes(b"engine")  # what build_engine.sh would have built
    fake = fake_tool(tmp_path / "bin", "trtexec", f"""
for a in "$@"; do
    grep -qx -- "${{a%%=*}}" "{TRT_OPTIONS / '10.3.txt'}" || {{ echo "Unknown option: $a"; exit 1; }}
    case "$a" in --exportTimes=*) cp "{TRT / 'times_b1.json'}" "${{a#*=}}" ;; esac
done
[ -f model.plan ] || {{ echo "no engine"; exit 1; }}
cat "{TRT / 'trtexec_b1.log'}"
""")
    monkeypatch.setenv("TRTEXEC", str(fake))
    tools = device_runner.resolve_native(manifest, "require")
    assert [p for _, p, _ in tools] == [str(fake)] * 2
    work = tmp_path / "work"
    work.mkdir()
    session = type("Session", (), {"fixed_batch": None})()
    records = device_runner.run_native(str(b), manifest, tools, session, str(work), "require", 60)
    assert [r["status"] for r in records] == ["ok", "ok"], records
    assert [r["source"] for r in records] == [f"native/trtexec_times_b{n}.json" for n in (1, BATCH)]
    assert records[0]["figures"] == pytest.approx({"batch": 1, "runs": 10, "p50_ms": 5.5, "p90_ms": 9.0, "mean_ms": 5.5, "min_ms": 1.0})
    assert "H2D + GPU compute + D2H" in records[0]["timer"]
    assert not (b / "native").exists()


# ---------------------------------------------------------------------------------------------
# --native off / a missing tool / a failing tool


def test_native_off_runs_no_tool(artifacts, dataset, tmp_path, monkeypatch, capsys):
    b = make(artifacts, dataset, tmp_path / "bundle", "openvino")
    fake = fake_tool(tmp_path / "bin", "benchmark_app", f'touch "{tmp_path}/ran"\n')
    monkeypatch.setenv("BENCHMARK_APP", str(fake))
    assert device_runner.main([str(b), "--native", "off"]) == 0
    assert not (tmp_path / "ran").exists() and not (b / "result" / "native").exists()
    result = read_result(b / "result", b)
    assert result.native == () and result.native_notes == ("native benchmark tools not run (runner.py --native off)",)
    assert device_runner.main([str(b)]) == 0 and (tmp_path / "ran").exists()  # auto: the same tool does run
    capsys.readouterr()


def test_missing_tool_is_recorded_in_auto_and_fatal_in_require(artifacts, dataset, tmp_path, monkeypatch, capsys):
    b = make(artifacts, dataset, tmp_path / "bundle", "openvino")
    monkeypatch.setenv("BENCHMARK_APP", str(tmp_path / "nowhere" / "benchmark_app"))
    assert device_runner.main([str(b)]) == 0
    result = read_result(b / "result", b)
    assert result.native == () and len(result.native_notes) == 2
    assert all("not found" in n and "BENCHMARK_APP" in n for n in result.native_notes)
    shutil.rmtree(b / "result")
    capsys.readouterr()
    assert device_runner.main([str(b), "--native", "require"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "--native require" in line and "BENCHMARK_APP" in line
    assert not (b / "result").exists() and leftovers(b) == []


def test_missing_tool_on_path_in_the_device_interpreter(artifacts, dataset, tmp_path):
    """A bundle whose backend has no native tool, under require: exit 1, one line, no result."""
    b = make(artifacts, dataset, tmp_path / "bundle", "onnxruntime")
    proc = run_device(tmp_path, str(b / "runner.py"), str(b), "--native", "require")
    assert proc.returncode == 1 and "onnxruntime_perf_test" in one_line(proc.stderr)
    assert not (b / "result").exists() and leftovers(b) == []
    proc = run_device(tmp_path, str(b / "runner.py"), str(b))  # auto: the note is the result's
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime_perf_test" in read_result(b / "result", b).native_notes[0]


FAILING = {
    "exit code": ('echo "[ ERROR ] Cannot compile the model"\nexit 3\n', "failed", "exited with 3: [ ERROR ] Cannot compile the model"),
    "no figures": ('echo "all good"\n', "failed", "exited 0 but no latency figures"),
    "timeout": ("exec sleep 30\n", "timeout", "did not finish within 1 s"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FAILING))
def test_failing_tool_is_recorded_and_the_run_succeeds(case, artifacts, dataset, tmp_path, monkeypatch, capsys):
    body, status, note = FAILING[case]
    b = make(artifacts, dataset, tmp_path / "bundle", "openvino", batch=1)  # one benchmark_app run
    monkeypatch.setenv("BENCHMARK_APP", str(fake_tool(tmp_path / "bin", "benchmark_app", body)))
    assert device_runner.main([str(b), "--native-timeout", "1"]) == 0
    raw = json.loads((b / "result" / "result.json").read_text())
    (rec,) = raw["native"]
    assert rec["status"] == status and note in rec["note"] and rec["figures"] is None and rec["seconds"] >= 0
    assert rec["exit_code"] == (3 if case == "exit code" else 0 if case == "no figures" else None)
    assert (b / "result" / rec["log"]).is_file()  # what the tool printed is kept
    result = read_result(b / "result", b)
    assert result.native == () and result.native_notes[0].startswith(f"benchmark_app (batch 1): {status}")
    assert result.logits.shape[0] == len(dataset)  # the run itself is whole
    capsys.readouterr()
    old = (b / "result" / "result.json").read_bytes()
    assert device_runner.main([str(b), "--native", "require", "--native-timeout", "1"]) == 1
    assert note.split(":")[0] in one_line(capsys.readouterr().err)
    assert (b / "result" / "result.json").read_bytes() == old and leftovers(b) == []  # the earlier result kept


# ---------------------------------------------------------------------------------------------
# read_result: the native entries validated like the rest


def _with_native(b: Path, native) -> None:
    path = b / "result" / "result.json"
    data = json.loads(path.read_text())
    data["native"], data["native_mode"] = native, "auto"
    path.write_text(json.dumps(data))


def _ok(batch=1, **figures):
    f = {"batch": batch, "runs": 3, "p50_ms": 0.5, "p90_ms": None, "mean_ms": 0.6, "min_ms": 0.4, **figures}
    return {"tool": "benchmark_app", "batch": batch, "status": "ok", "timer": "t", "source": "native/x.csv", "figures": f}


NATIVE_REFUSALS = {
    "not a list": ({"tool": "x"}, "malformed native list"),
    "no figures key": ([{**_ok(), "figures": None}], "malformed native entry"),
    "negative": ([_ok(p50_ms=-1.0)], "invalid native figures"),
    "nan": ([_ok(mean_ms=float("nan"))], "invalid native figures"),
    "all none": ([_ok(p50_ms=None, mean_ms=None, min_ms=None)], "invalid native figures"),
    "outside": ([{**_ok(), "source": "../../etc/passwd"}], "outside the result folder"),
}  # fmt: skip


@pytest.fixture(scope="module")
def ov_result(artifacts, dataset, tmp_path_factory):
    b = make(artifacts, dataset, tmp_path_factory.mktemp("ov") / "bundle", "openvino", batch=1)
    assert device_runner.main([str(b), "--native", "off"]) == 0
    return b


@pytest.mark.parametrize("case", list(NATIVE_REFUSALS))
def test_read_result_refuses_malformed_native(case, ov_result, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(ov_result, b)
    _with_native(b, [_ok()])
    ok = read_result(b / "result", b)  # a well-formed one is accepted, as given
    assert ok.native == (NativeTiming("benchmark_app", 1, 0.5, None, 0.6, 0.4, 3, b / "result" / "native" / "x.csv", "t"),)
    native, message = NATIVE_REFUSALS[case]
    _with_native(b, native)
    with pytest.raises(UserError, match=message) as exc:
        read_result(b / "result", b)
    assert "\n" not in str(exc.value)


def test_result_from_a_runner_before_native_timers_reads_as_none(ov_result, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(ov_result, b)
    path = b / "result" / "result.json"
    data = json.loads(path.read_text())
    for key in ("native", "native_mode", "native_none"):
        data.pop(key)
    path.write_text(json.dumps(data))
    result = read_result(b / "result", b)
    assert result.native == () and result.native_notes == () and np.isfinite(result.logits).all()
