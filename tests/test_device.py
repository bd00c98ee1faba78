"""Measuring on the device, first slice: the bundle, the torch-free runner, reading a result back.

The runner is run as the device runs it: a subprocess of this venv's Python in which importing
torch or edgerepvgg fails (a ``sitecustomize`` meta-path blocker first on PYTHONPATH, checked to
block), started outside the checkout; its logits must equal the host runner's for the same
artifact and inputs.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgerepvgg.device import read_manifest, read_result, write_bundle
from edgerepvgg.device import runner as device_runner
from edgerepvgg.errors import UserError
from edgerepvgg.quant import constraints_for
from edgerepvgg.targets import get_target
from edgerepvgg.targets.base import FixedBatchRunner

from quant_helpers import minmax_spec, self_labelled

RUNNER_SRC = Path(device_runner.__file__)
N = 12  # inputs per bundle: not a multiple of the batch, so the last chunk is short
BATCH, WARMUP, RUNS = 5, 1, 3
# what a blocked runtime's module is, per backend (the runner's fallbacks blocked too)
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                   "tflite": ("ai_edge_litert", "tflite_runtime"), "tensorrt": ("tensorrt",)}  # fmt: skip
PIP_NAMES = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino",
             "tflite": "pip install ai-edge-litert", "tensorrt": "pip install tensorrt"}  # fmt: skip

BLOCKER = '''
import sys

BLOCKED = {blocked!r}


class _Blocker:
    """Refuses to import the blocked top-level packages: this interpreter stands for a device."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("import of " + name + " is blocked: a device has no " + name.split(".")[0])
        return None


sys.meta_path.insert(0, _Blocker())
'''


def device_env(tmp_path: Path, *blocked: str) -> dict[str, str]:
    """Environment of a 'device' interpreter: torch and edgerepvgg (and ``blocked``) unimportable."""
    folder = tmp_path / f"device-site-{'-'.join(blocked) or 'base'}"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted({"torch", "edgerepvgg", *blocked})))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(folder)
    return env


def run_device(tmp_path: Path, *args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [-P] ARGS`` in a device interpreter, started in an empty folder (not the checkout)."""
    cwd = tmp_path / "device-cwd"
    cwd.mkdir(exist_ok=True)
    isolate = ["-P"] if sys.version_info >= (3, 11) else []  # no script/CWD folder on sys.path
    return subprocess.run([sys.executable, *isolate, *args], cwd=cwd, env=device_env(tmp_path, *blocked),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name or ".old" in p.name)


@pytest.fixture(scope="module")
def dataset(plain):
    return self_labelled(plain, N)


@pytest.fixture(scope="module")
def artifacts(plain, tmp_path_factory):
    """INT8 artifacts of the tiny model, compiled on first use, one per target."""
    made: dict[str, object] = {}

    def get(name: str, **kwargs):
        key = f"{name}{sorted(kwargs.items())}"
        if key not in made:
            target = get_target(name)
            why = target.available() if name != "tensorrt" else None
            if why:
                pytest.skip(f"{name}: {why}")
            spec = minmax_spec(plain, constraints_for(name, host=False))
            out = tmp_path_factory.mktemp(f"art-{name}")
            made[key] = (target, target.compile(plain, spec, out, "int8", **kwargs))
        return made[key]

    return get


def bundle(artifacts, dataset, out: Path, name: str = "onnxruntime", **kwargs) -> Path:
    target, artifact = artifacts(name)
    return write_bundle(artifact, target, dataset, out, batch=BATCH, warmup=WARMUP, runs=RUNS, **kwargs)


@pytest.fixture(scope="module")
def ort_run(artifacts, dataset, tmp_path_factory):
    """An ONNX Runtime bundle and its result (run in-process), to be copied and tampered with."""
    root = tmp_path_factory.mktemp("ort-run")
    b = bundle(artifacts, dataset, root / "bundle")
    assert device_runner.main([str(b)]) == 0
    return b


def fresh(ort_run: Path, tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(ort_run, b)
    return b


# ---------------------------------------------------------------------------------------------
# The runner in a torch-free interpreter


def test_device_interpreter_really_blocks_torch_and_edgerepvgg(tmp_path):
    for module in ("torch", "edgerepvgg", "edgerepvgg.device.runner"):
        proc = run_device(tmp_path, "-c", f"import {module}")
        assert proc.returncode != 0 and "is blocked" in proc.stderr, (module, proc.stderr)
    proc = run_device(tmp_path, "-c", "import numpy; print('ok')")  # and the rest still imports
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "tflite"])
def test_runner_without_torch_matches_host_runner(name, artifacts, dataset, tmp_path):
    target, artifact = artifacts(name)
    b = write_bundle(artifact, target, dataset, tmp_path / "bundle", batch=BATCH, warmup=WARMUP, runs=RUNS)
    out = tmp_path / "out"
    proc = run_device(tmp_path, str(b / "runner.py"), str(b), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"{name} int8 on" in proc.stderr and "perf_counter" in proc.stderr  # the summary, logged

    result = read_result(out, b)
    x = np.load(b / "inputs.npy")
    host = np.concatenate([target.load(artifact)(x[i : i + BATCH]) for i in range(0, N, BATCH)])
    assert result.logits.shape == host.shape == (N, 5)
    np.testing.assert_allclose(result.logits, host, rtol=0, atol=1e-6)

    manifest, raw = read_manifest(b), json.loads((out / "result.json").read_text())
    meta = target.metadata(artifact)
    assert manifest["model_hash"] == meta.model_hash and manifest["spec_sha256"] == meta.spec_sha256
    for key in ("model_hash", "spec_sha256", "backend", "precision"):
        assert raw[key] == manifest[key]
    assert raw["inputs"] == {"count": N, "sha256": manifest["inputs"]["sha256"]}
    assert result.spec_sha256 is not None and result.model_hash == meta.model_hash

    assert sorted(result.latency) == [1, BATCH]
    for batch, lat in result.latency.items():
        assert lat.batch == batch and lat.runs == RUNS and lat.warmup == WARMUP and len(lat.samples_ms) == RUNS
        samples = np.asarray(lat.samples_ms)  # the statistics are the samples', whatever the speed
        assert (lat.p50_ms, lat.p90_ms, lat.min_ms) == (float(np.median(samples)), float(np.percentile(samples, 90)), float(samples.min()))
    assert result.timer == "python perf_counter, host copies included"

    dev = result.device
    assert dev["hostname"] and dev["cpu_model"] and dev["cpu_model"] != "unknown" and dev["cpu_cores"] >= 1
    assert dev["python"] == ".".join(map(str, sys.version_info[:3])) and dev["platform"] and dev["machine"]
    assert dev["runtime"]["backend"] == name and dev["runtime"]["version"] not in ("", "unknown")
    assert dev["runtime"]["name"] in device_runner.DISTRIBUTIONS[name]
    assert "gpu" in dev and "numpy" in dev


def test_run_sh_is_the_one_command(artifacts, dataset, tmp_path):
    """``sh run.sh`` (= ``python3 runner.py .`` in the bundle, or ``$PYTHON`` when set: a venv's
    Python on the device) with python3 the device interpreter."""
    b = bundle(artifacts, dataset, tmp_path / "bundle")
    manifest = read_manifest(b)
    assert manifest["command"] == "python3 runner.py ." and manifest["script"] == "run.sh"
    assert 'exec "${PYTHON:-python3}" runner.py .' in (b / "run.sh").read_text()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a symlink would lose the venv
    (bindir / "python3").chmod(0o755)
    env = device_env(tmp_path)
    env["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["sh", str(b / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_result(b / "result", b).logits.shape == (N, 5)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "tflite"])
def test_missing_runtime_exit_2_one_line_no_result(name, artifacts, dataset, tmp_path):
    target, artifact = artifacts(name)
    b = write_bundle(artifact, target, dataset, tmp_path / "bundle", batch=BATCH, warmup=WARMUP, runs=RUNS)
    proc = run_device(tmp_path, str(b / "runner.py"), str(b), blocked=RUNTIME_MODULES[name])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and PIP_NAMES[name] in lines[0], proc.stderr
    assert not (b / "result").exists() and leftovers(b) == []


def test_tensorrt_bundle_says_how_to_build_the_engine_and_needs_tensorrt(artifacts, dataset, tmp_path):
    """No GPU here: the TensorRT bundle carries the ONNX graph and build_engine.sh; the runner
    needs TensorRT's bindings (exit 2 where absent) and, with them, the engine built on the device."""
    target, artifact = artifacts("tensorrt")
    b = write_bundle(artifact, target, dataset, tmp_path / "bundle")
    manifest = read_manifest(b)
    if artifact.path.suffix == ".plan":  # pragma: no cover - a machine with TensorRT and a GPU
        assert manifest["command"] == "python3 runner.py ."
        return
    assert (b / "model.onnx").is_file() and (b / "build_engine.sh").is_file()
    assert manifest["engine"] == "model.plan" and manifest["command"] == "sh build_engine.sh && python3 runner.py ."
    assert "sh build_engine.sh" in (b / "run.sh").read_text()
    proc = run_device(tmp_path, str(b / "runner.py"), str(b), blocked=("tensorrt",))
    assert proc.returncode == 2 and PIP_NAMES["tensorrt"] in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (b / "result").exists()


# ---------------------------------------------------------------------------------------------
# The runner's source: Python 3.8 grammar, nothing of torch or edgerepvgg


def test_runner_source_parses_as_python_38_and_imports_neither_torch_nor_edgerepvgg():
    src = RUNNER_SRC.read_text()
    tree = ast.parse(src, feature_version=(3, 8))
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            func = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if func in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                imported.append(node.args[0].value)
    assert imported and "numpy" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "edgerepvgg")]
    # imported modules' names given as data (the runtimes) do not name them either
    assert not [m for m, _ in device_runner.RUNTIMES.values() if m.split(".")[0] in ("torch", "edgerepvgg")]
    # newer-than-3.8 library calls the grammar check cannot see
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"removeprefix", "removesuffix", "file_digest", "packages_distributions", "is_relative_to", "cache"}
    assert "from __future__ import annotations" in src  # annotations are never evaluated on 3.8


# ---------------------------------------------------------------------------------------------
# The bundle


def test_bundle_contents(artifacts, dataset, tmp_path):
    target, artifact = artifacts("openvino")
    b = write_bundle(artifact, target, dataset, tmp_path / "b", threads=2, batch=4, warmup=3, runs=7, profile_name="x86-openvino")
    assert sorted(p.name for p in b.iterdir()) == ["inputs.npy", "manifest.json", "model.bin", "model.xml", "run.sh", "runner.py"]
    assert (b / "model.xml").read_bytes() == artifact.path.read_bytes()
    assert (b / "runner.py").read_text() == RUNNER_SRC.read_text()
    x = np.load(b / "inputs.npy")
    expected = dataset.spec.normalize(dataset.images).numpy()
    assert x.dtype == np.float32 and x.shape == (N, 1, 16, 16)
    np.testing.assert_array_equal(x, expected)  # preprocessed as the host preprocesses, in order
    m = read_manifest(b)
    assert (m["format"], m["version"], m["backend"], m["precision"], m["artifact"]) == ("edgerepvgg-device-bundle", 1, "openvino", "int8", "model.xml")
    assert m["files"] == ["model.xml", "model.bin"]
    assert m["inputs"]["count"] == N and m["inputs"]["shape"] == [N, 1, 16, 16] and m["inputs"]["layout"] == "NCHW"
    assert m["inputs"]["sha256"] == device_runner.sha256_file(b / "inputs.npy")
    assert m["timing"] == {"threads": 2, "batch": 4, "warmup": 3, "runs": 7} and m["profile"] == "x86-openvino"
    assert m["eval_source"] == dataset.source and m["input_spec"] == json.loads(json.dumps(dataset.spec.to_dict()))
    assert "labels" not in json.dumps(m) and m["requires"]["modules"] == ["numpy", "openvino"]


def test_bundle_refusals(artifacts, dataset, plain, tmp_path):
    from dataclasses import replace

    target, artifact = artifacts("onnxruntime")
    with pytest.raises(UserError, match="another input spec"):
        write_bundle(artifact, target, replace(dataset, spec=replace(dataset.spec, mean=(0.4,))), tmp_path / "a")
    with pytest.raises(UserError, match="compiled by 'onnxruntime'"):
        write_bundle(artifact, get_target("tflite"), dataset, tmp_path / "a")
    with pytest.raises(UserError, match="batch must be"):
        write_bundle(artifact, target, dataset, tmp_path / "a", batch=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a device bundle"):
        write_bundle(artifact, target, dataset, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing half-made


def test_fixed_batch_artifact_is_padded_on_the_device(artifacts, dataset, tmp_path):
    target, artifact = artifacts("onnxruntime", batch=4)  # 12 inputs in chunks of 4, timed at 1 and 5
    b = write_bundle(artifact, target, dataset, tmp_path / "b", batch=BATCH, warmup=WARMUP, runs=RUNS)
    assert device_runner.main([str(b)]) == 0
    result = read_result(b / "result", b)
    assert result.fixed_batch == 4 and sorted(result.latency) == [1, BATCH]
    host = FixedBatchRunner(target.load(artifact), 4)  # the host's own padding of a fixed batch
    np.testing.assert_allclose(result.logits, host(np.load(b / "inputs.npy")), rtol=0, atol=1e-6)


def test_rebundle_replaces_the_old_bundle_cleanly(artifacts, dataset, tmp_path, monkeypatch):
    b = bundle(artifacts, dataset, tmp_path / "b")
    assert device_runner.main([str(b)]) == 0 and (b / "result" / "result.json").is_file()
    small = self_labelled_subset(dataset, 7)
    target, artifact = artifacts("onnxruntime")
    write_bundle(artifact, target, small, b, batch=BATCH)
    assert read_manifest(b)["inputs"]["count"] == 7 and np.load(b / "inputs.npy").shape[0] == 7
    assert not (b / "result").exists()  # the old result belonged to the old inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # a failure while writing leaves the earlier bundle as it was, and nothing else
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    monkeypatch.setattr("edgerepvgg.device.bundle.np.save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_bundle(artifact, target, dataset, b)
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def self_labelled_subset(dataset, n):
    from dataclasses import replace

    return replace(dataset, images=dataset.images[:n], labels=dataset.labels[:n], source=f"{dataset.source}, first {n}")


# ---------------------------------------------------------------------------------------------
# The runner's faults: nothing half-written, a re-run replaces the old result


def test_rerun_replaces_the_result_cleanly(ort_run, tmp_path, capsys):
    b = fresh(ort_run, tmp_path)
    out = tmp_path / "res"
    assert device_runner.main([str(b), "-o", str(out)]) == 0
    first = json.loads((out / "result.json").read_text())
    (out / "stale.txt").write_text("from an earlier run")
    assert device_runner.main([str(b), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["logits.npy", "result.json"]
    second = json.loads((out / "result.json").read_text())
    assert second["latency"] != first["latency"]  # measured again, not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "res"]
    capsys.readouterr()


def test_failed_run_leaves_no_result_and_keeps_the_old_one(ort_run, tmp_path, capsys):
    b = fresh(ort_run, tmp_path)
    old = (b / "result" / "result.json").read_bytes()
    x = np.load(b / "inputs.npy")
    np.save(b / "inputs.npy", x + 1)  # inputs that are not the manifest's
    assert device_runner.main([str(b)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the manifest" in err[0]
    assert (b / "result" / "result.json").read_bytes() == old and leftovers(b) == []
    shutil.rmtree(b / "result")
    assert device_runner.main([str(b), "-o", str(tmp_path / "new")]) == 1
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_runner_refuses_a_foreign_output_folder(ort_run, tmp_path, capsys):
    b = fresh(ort_run, tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("mine")
    assert device_runner.main([str(b), "-o", str(tmp_path / "docs")]) == 1
    assert "not a device result" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["a.txt"]


# ---------------------------------------------------------------------------------------------
# read_result refusals


def _edit(key_path: tuple[str, ...], value):
    def edit(b: Path) -> None:
        path = b / "result" / "result.json"
        data = json.loads(path.read_text())
        node = data
        for k in key_path[:-1]:
            node = node[k]
        node[key_path[-1]] = value
        path.write_text(json.dumps(data))

    return edit


REFUSALS = {
    "model hash": (_edit(("model_hash",), "0123456789abcdef"), "another model"),
    "spec hash": (_edit(("spec_sha256",), "f" * 64), "another QuantSpec"),
    "backend": (_edit(("backend",), "openvino"), "another backend"),
    "inputs sha": (_edit(("inputs", "sha256"), "0" * 64), "other inputs"),
    "inputs count": (_edit(("inputs", "count"), N + 1), "inputs, the bundle"),
    "format": (_edit(("format",), "polygraphy-outputs"), "not an edgerepvgg device result"),
    "version": (_edit(("version",), 99), "format version 99"),
    "latency": (_edit(("latency",), [{"batch": 1}]), "malformed latency"),
    "non-positive sample": (lambda b: _edit(("latency",), [{**json.loads((b / "result" / "result.json").read_text())["latency"][0], "samples_ms": [0.0] * RUNS}])(b), "invalid latency"),
    "no identity": (_edit(("device",), {}), "device identity"),
    "missing result": (lambda b: (b / "result" / "result.json").unlink(), "does not exist"),
    "missing logits": (lambda b: (b / "result" / "logits.npy").unlink(), "does not exist"),
    "bad json": (lambda b: (b / "result" / "result.json").write_text("{not json"), "cannot be read as JSON"),
    "other logits": (lambda b: np.save(b / "result" / "logits.npy", np.zeros((N, 5), np.float32)), "does not match its result.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_read_result_refuses(case, ort_run, tmp_path):
    b = fresh(ort_run, tmp_path)
    assert read_result(b / "result", b).logits.shape == (N, 5)  # untouched: accepted
    tamper, message = REFUSALS[case]
    tamper(b)
    with pytest.raises(UserError, match=message) as exc:
        read_result(b / "result", b)
    assert "\n" not in str(exc.value)


def test_read_result_takes_the_manifest_file_or_dict_and_refuses_a_non_bundle(ort_run, tmp_path):
    b = fresh(ort_run, tmp_path)
    manifest = read_manifest(b)
    a = read_result(b / "result", b / "manifest.json")
    c = read_result(b / "result", manifest)
    np.testing.assert_array_equal(a.logits, c.logits)
    assert a.device_name and a.latency.keys() == c.latency.keys()
    other = dict(manifest, model_hash="feedfacefeedface")  # the bundle of another model
    with pytest.raises(UserError, match="another model"):
        read_result(b / "result", other)
    with pytest.raises(UserError, match="not an edgerepvgg device bundle manifest"):
        read_result(b / "result", {"format": "something else"})
    with pytest.raises(UserError, match="does not exist"):
        read_result(b / "result", tmp_path / "nowhere")
