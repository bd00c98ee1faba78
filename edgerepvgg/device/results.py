"""Reading a device result back on the host, refusing one that is not for the bundle at hand."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerepvgg.device import runner as _runner
from edgerepvgg.device.bundle import read_manifest, sha256_file
from edgerepvgg.errors import UserError

RESULT_FORMAT, RESULT_VERSION = _runner.RESULT_FORMAT, _runner.RESULT_VERSION
RESULT_FILE, LOGITS_FILE = _runner.RESULT_FILE, _runner.LOGITS_FILE
_LATENCY_KEYS = ("p50_ms", "p90_ms", "mean_ms", "min_ms")


@dataclass(frozen=True)
class DeviceLatency:
    """Milliseconds per call at one batch size, measured on the device by ``timer``."""

    batch: int
    warmup: int
    runs: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    samples_ms: tuple[float, ...]


@dataclass(frozen=True)
class DeviceResult:
    """A device run of a bundle: logits (N, classes) float32 numpy in the bundle's input order,
    latency per batch size, the device's identity (host name, CPU, cores, GPU, runtime), and the
    timer that made the latency figures."""

    path: Path
    backend: str
    precision: str
    model_hash: str
    spec_sha256: str | None
    logits: np.ndarray
    latency: dict[int, DeviceLatency]
    device: dict
    timer: str
    fixed_batch: int | None = None

    @property
    def device_name(self) -> str:
        d = self.device
        return d.get("board") or d.get("gpu") or f"{d.get('hostname')} ({d.get('cpu_model')})"


def _fail(where: Path, what: str) -> UserError:
    return UserError(f"{where} {what}")


def _latency(where: Path, rows: object) -> dict[int, DeviceLatency]:
    if not isinstance(rows, list) or not rows:
        raise _fail(where, "has no latency figures; run the bundle's runner.py again")
    out = {}
    for row in rows:
        try:
            samples = tuple(float(v) for v in row["samples_ms"])
            lat = DeviceLatency(int(row["batch"]), int(row["warmup"]), int(row["runs"]),
                                *(float(row[k]) for k in _LATENCY_KEYS), samples)  # fmt: skip
        except (TypeError, KeyError, ValueError) as exc:
            raise _fail(where, f"has a malformed latency entry ({type(exc).__name__}: {exc})") from None
        values = (*samples, *(getattr(lat, k) for k in _LATENCY_KEYS))
        if len(samples) != lat.runs or not samples or not all(math.isfinite(v) and v > 0 for v in values):
            raise _fail(where, f"has invalid latency samples at batch {lat.batch} (need {lat.runs} positive finite samples)")
        out[lat.batch] = lat
    return out


def read_result(result_dir: str | Path, bundle: str | Path | dict) -> DeviceResult:
    """The device result in ``result_dir`` (``result.json`` + ``logits.npy``), checked against
    ``bundle`` (the bundle folder, its manifest.json, or the manifest dict): a result of another
    model, QuantSpec, backend or input set, a malformed file, or an unknown format is refused with
    a one-line UserError."""
    manifest = read_manifest(bundle)
    result_dir = Path(result_dir)
    path = result_dir / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run the bundle on the device first (python3 runner.py BUNDLE)") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, f"cannot be read as JSON ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
        raise _fail(path, "is not an edgerepvgg device result")
    if result.get("version") != RESULT_VERSION:
        raise _fail(path, f"is device result format version {result.get('version')!r}; this edgerepvgg reads version {RESULT_VERSION}")
    for key, what in (("model_hash", "model"), ("spec_sha256", "QuantSpec"), ("backend", "backend"), ("precision", "precision")):
        if key not in result:
            raise _fail(path, f"has no {key}")
        if result[key] != manifest.get(key):
            raise _fail(path, f"is for another {what} ({key} {str(result[key])[:16]!r}, the bundle's is {str(manifest.get(key))[:16]!r}); "
                              "run this bundle on the device again")  # fmt: skip
    inputs = result.get("inputs")
    if not isinstance(inputs, dict) or inputs.get("sha256") != manifest["inputs"]["sha256"]:
        raise _fail(path, "was run on other inputs than the bundle's (inputs sha256 differs); run this bundle on the device again")
    if inputs.get("count") != manifest["inputs"]["count"]:
        raise _fail(path, f"has {inputs.get('count')!r} inputs, the bundle {manifest['inputs']['count']}; run this bundle on the device again")
    timer = result.get("timer")
    device = result.get("device")
    if not isinstance(timer, str) or not timer or not isinstance(device, dict) or not device.get("hostname"):
        raise _fail(path, "has no timer or device identity")
    latency = _latency(path, result.get("latency"))

    logits_path = result_dir / LOGITS_FILE
    if not logits_path.is_file():
        raise UserError(f"{logits_path} does not exist; copy the whole result folder back")
    want = (result.get("logits") or {}).get("sha256")
    if want is not None and sha256_file(logits_path) != want:
        raise _fail(logits_path, "does not match its result.json (sha256 differs); copy the result folder again")
    try:
        logits = np.load(logits_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(logits_path, f"is not a numpy array file ({exc})") from None
    n = manifest["inputs"]["count"]
    if logits.dtype != np.float32 or logits.ndim != 2 or logits.shape[0] != n:
        raise _fail(logits_path, f"holds {logits.dtype} {list(logits.shape)}; expected float32 logits for {n} inputs")
    if not np.isfinite(logits).all():
        raise _fail(logits_path, "holds non-finite logits")
    return DeviceResult(result_dir, result["backend"], result["precision"], result["model_hash"], result["spec_sha256"],
                        logits, latency, device, timer, result.get("fixed_batch"))  # fmt: skip
