"""Device bundles: everything a device needs to run one artifact, and nothing that needs torch.

A bundle is a folder: the artifact's files (same names), ``inputs.npy`` (the evaluation inputs
preprocessed exactly as the artifact expects: float32 NCHW, normalized, in evaluation-set order;
the labels stay on the host), ``manifest.json`` (what the artifact is, with the model and QuantSpec
hashes read from the artifact itself, how to time it, and the vendor's benchmark commands for it:
``native``), ``runner.py`` (the torch-free device runner) and ``run.sh`` (the one command:
``python3 runner.py .``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgerepvgg.data import TensorDataset
from edgerepvgg.device import runner as _runner
from edgerepvgg.errors import UserError
from edgerepvgg.io import fsync
from edgerepvgg.targets.base import Artifact, Target

log = logging.getLogger(__name__)

BUNDLE_FORMAT, BUNDLE_VERSION = _runner.BUNDLE_FORMAT, _runner.BUNDLE_VERSION
MANIFEST_FILE, INPUTS_FILE, RUNNER_FILE, SCRIPT_FILE = "manifest.json", "inputs.npy", "runner.py", "run.sh"
COMMAND = "python3 runner.py ."
_PREPROCESSING = ("size", "resize", "channels", "mean", "std", "interpolation")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _positive(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer of at least 1, got {value!r}")


def _relative_names(artifact: Artifact) -> list[tuple[Path, str]]:
    """(source, name in the bundle) for each of the artifact's files: its path relative to the
    entry point's folder, or its bare name for a file elsewhere."""
    root = Path(artifact.path).parent
    files = list(dict.fromkeys([Path(artifact.path), *map(Path, artifact.files)]))
    out = []
    for f in files:
        try:
            name = f.relative_to(root).as_posix()
        except ValueError:
            name = f.name
        if name in (MANIFEST_FILE, INPUTS_FILE, RUNNER_FILE, SCRIPT_FILE, "result"):
            raise UserError(f"the artifact file {f} would overwrite the bundle's own {name}")
        out.append((f, name))
    return out


#: why a backend's bundle names no native benchmark tool
NATIVE_NONE = {
    "onnxruntime": "ONNX Runtime's pip packages ship no benchmark tool (onnxruntime_perf_test is built from source); "
                   "the runner's own timing is the only one",
}  # fmt: skip


def native_commands(backend: str, artifact: str, timing: dict, sample_shape: list[int]) -> list[dict]:
    """The vendor's benchmark commands for a bundle's artifact, as argv lists with bundle-relative
    names (run in the bundle folder they time it by hand; the runner runs them in a mirror of it
    and keeps their output as result/native/...), at batch 1 and the bundle's batch where the tool
    takes a batch, with the bundle's threads, warm-up and runs where the tool has the option."""
    threads, runs, warmup = timing["threads"], timing["runs"], timing["warmup"]
    batches = sorted({1, timing["batch"]})
    out: list[dict] = []
    if backend == "tensorrt":
        for b in batches:
            times = f"{_runner.NATIVE_DIR}/trtexec_times_b{b}.json"
            dims = "x".join(map(str, [b, *sample_shape]))
            argv = ["trtexec", f"--loadEngine={_runner.ENGINE_FILE}", f"--shapes={_runner.INPUT_NAME}:{dims}", "--warmUp=500",
                    "--duration=0", f"--iterations={runs}", f"--avgRuns={runs}", f"--exportTimes={times}"]  # fmt: skip
            out.append({"tool": "trtexec", "batch": b, "argv": argv})
    elif backend == "openvino":
        for b in batches:
            report = f"{_runner.NATIVE_DIR}/benchmark_app_b{b}"
            # benchmark_app refuses -nthreads beside a performance hint: the hint goes, one stream stays
            tune = ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads)] if threads else ["-hint", "latency"]
            argv = ["benchmark_app", "-m", artifact, "-d", "CPU", *tune, "-api", "sync", "-nireq", "1", "-infer_precision", "f32",
                    "-shape", "[" + ",".join(map(str, [b, *sample_shape])) + "]", "-niter", str(runs),
                    "-report_type", "no_counters", "-report_folder", report]  # fmt: skip
            out.append({"tool": "benchmark_app", "batch": b, "argv": argv, "mkdir": [report]})
    elif backend == "tflite":  # both tools time the model's own input shape (batch 1)
        nt = [f"--num_threads={threads}"] if threads else []
        out.append({"tool": "benchmark_model", "batch": 1,
                    "argv": ["benchmark_model", f"--graph={artifact}", *nt, f"--num_runs={runs}", f"--warmup_runs={warmup}",
                             "--min_secs=0", "--warmup_min_secs=0"]})  # fmt: skip
        out.append({"tool": "litert-benchmark", "batch": 1,
                    "argv": ["litert-benchmark", f"--model={artifact}", *nt, f"--num_runs={runs}", f"--warmup_runs={warmup}",
                             f"--result_json={_runner.NATIVE_DIR}/litert_benchmark_b1.json"]})  # fmt: skip
    return out


def write_bundle(artifact: Artifact, target: Target, eval_set: TensorDataset, out_dir: str | Path, *,
                 threads: int | None = None, batch: int = 16, warmup: int = 10, runs: int = 50,
                 profile_name: str | None = None) -> Path:  # fmt: skip
    """Write the device bundle for ``artifact`` (compiled by ``target``) and ``eval_set`` into
    ``out_dir``, atomically: it is built in a temporary sibling folder and renamed into place; an
    earlier bundle there is replaced whole (a folder that is not a bundle is refused)."""
    if artifact.target != target.name:
        raise UserError(f"the artifact was compiled by {artifact.target!r}, not {target.name!r}; pass its own target")
    _positive("batch", batch)
    _positive("runs", runs)
    _positive("threads", threads, allow_none=True)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"warmup must be an integer of at least 0, got {warmup!r}")
    if len(eval_set) == 0:
        raise UserError(f"the evaluation set {eval_set.source} is empty; a bundle needs inputs")
    meta = target.metadata(artifact)
    want, have = meta.input_spec.to_dict(), eval_set.spec.to_dict()
    diff = [k for k in _PREPROCESSING if want[k] != have[k]]
    if diff:
        raise UserError(f"the evaluation set is preprocessed for another input spec than the artifact's ({', '.join(diff)} differ); "
                        "load it with the artifact's input spec")  # fmt: skip
    names = _relative_names(artifact)
    for src, _ in names:
        if not src.is_file():
            raise UserError(f"the artifact file {src} does not exist; compile the artifact again")

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST_FILE).is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UserError(f"{out_dir} exists and is not a device bundle; pass a new folder for the bundle")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old: Path | None = None
    try:
        for src, name in names:
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        x = np.concatenate([b.numpy().astype(np.float32, copy=False) for b, _ in eval_set.batches(256)])
        x = np.ascontiguousarray(x)
        with open(tmp / INPUTS_FILE, "wb") as f:
            np.save(f, x, allow_pickle=False)
        shutil.copy2(Path(_runner.__file__), tmp / RUNNER_FILE)
        entry = next(name for src, name in names if src == Path(artifact.path))
        engine_needed = target.name == "tensorrt" and not entry.endswith(".plan")
        command = f"sh build_engine.sh && {COMMAND}" if engine_needed else COMMAND
        (tmp / SCRIPT_FILE).write_text(f'#!/bin/sh\n# Run this bundle on the device: {command}\nset -e\ncd "$(dirname "$0")"\n'
                                       + ("sh build_engine.sh\n" if engine_needed else "") + 'exec "${PYTHON:-python3}" runner.py . "$@"\n')  # fmt: skip
        (tmp / SCRIPT_FILE).chmod(0o755)
        module = _runner.RUNTIMES[target.name][0] if target.name in _runner.RUNTIMES else None
        timing = {"threads": threads, "batch": batch, "warmup": warmup, "runs": runs}
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "backend": target.name,
            "precision": artifact.precision,
            "artifact": entry,
            "files": [name for _, name in names],
            "engine": _runner.ENGINE_FILE if engine_needed else None,
            "model_hash": meta.model_hash,
            "spec_sha256": meta.spec_sha256,
            "constraints": meta.constraints,
            "input_spec": meta.input_spec.to_dict(),
            "inputs": {"file": INPUTS_FILE, "count": int(x.shape[0]), "shape": list(x.shape), "dtype": "float32",
                       "layout": "NCHW", "normalized": True, "sha256": sha256_file(tmp / INPUTS_FILE)},  # fmt: skip
            "eval_source": eval_set.source,
            "timing": timing,
            "native": native_commands(target.name, entry, timing, list(x.shape[1:])),
            "native_none": NATIVE_NONE.get(target.name),
            "profile": profile_name,
            "runner": RUNNER_FILE,
            "command": command,
            "script": SCRIPT_FILE,
            "requires": {"python": ">=3.8", "modules": ["numpy", module], "install": _runner.RUNTIMES.get(target.name, (None, None))[1]},
        }  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync(f)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = out_dir.with_name(f"{tmp.name}.old")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("wrote the device bundle %s (%s %s, %d inputs); on the device: %s", out_dir, target.name,
             artifact.precision, x.shape[0], command)  # fmt: skip
    return out_dir


def read_manifest(bundle: str | Path | dict) -> dict:
    """A bundle's manifest (from the bundle folder, its manifest.json, or the dict itself), checked
    for this format and version (a one-line UserError otherwise)."""
    if isinstance(bundle, dict):
        manifest, where = bundle, "the manifest"
    else:
        path = Path(bundle)
        path = path / MANIFEST_FILE if path.is_dir() else path
        where = str(path)
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} does not exist; pass a device bundle folder (write_bundle makes one)") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the bundle manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{where} is not an edgerepvgg device bundle manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise UserError(f"{where} is bundle format version {manifest.get('version')!r}; this edgerepvgg reads version {BUNDLE_VERSION}")
    return manifest
