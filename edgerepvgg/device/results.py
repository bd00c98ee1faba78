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
class NativeTiming:
    """What a vendor's benchmark tool (``tool``: trtexec, benchmark_app, benchmark_model,
    litert-benchmark) measured on the device, as the tool reported it: milliseconds per call at
    ``batch``; a figure the tool does not give is None, never derived (benchmark_app and the LiteRT
    tools give no p90). ``timer`` says what the tool timed (not the runner's Python wall-clock with
    host copies); ``source`` is the raw file the figures were read from (in the result's native/)."""

    tool: str
    batch: int
    p50_ms: float | None
    p90_ms: float | None
    mean_ms: float | None
    min_ms: float | None
    runs: int | None
    source: Path
    timer: str


@dataclass(frozen=True)
class DeviceResult:
    """A device run of a bundle: logits (N, classes) float32 numpy in the bundle's input order,
    latency per batch size, the device's identity (host name, CPU, cores, GPU, runtime), and the
    timer that made the latency figures. ``native``: the vendor's benchmark tool's figures, one per
    tool and batch that ran and reported (empty where none ran: ``--native off``, a runner before
    native timers, ONNX Runtime); ``native_notes``: one line per tool that gave none, and why (not
    found, failed, timed out, skipped)."""

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
    native: tuple[NativeTiming, ...] = ()
    native_notes: tuple[str, ...] = ()

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


def _native(where: Path, result_dir: Path, result: dict) -> tuple[tuple[NativeTiming, ...], tuple[str, ...]]:
    """The native tools' figures and, for each tool that gave none, one line saying why."""
    rows = result.get("native")
    if rows is None:  # a result written before native timers
        return (), ()
    if not isinstance(rows, list):
        raise _fail(where, "has a malformed native list; run the bundle's runner.py again")
    if result.get("native_mode") == "off":
        return (), ("native benchmark tools not run (runner.py --native off)",)
    if not rows and isinstance(result.get("native_none"), str):
        return (), (result["native_none"],)
    timings, notes = [], []
    for row in rows:
        try:
            tool, status = str(row["tool"]), row["status"]
            if status != "ok":
                notes.append(f"{tool} (batch {int(row['batch'])}): {str(status).replace('_', ' ')}" + (f": {row['note']}" if row.get("note") else ""))
                continue
            f = row["figures"]
            values = [None if f[k] is None else float(f[k]) for k in _LATENCY_KEYS]
            runs = None if f["runs"] is None else int(f["runs"])
            timing = NativeTiming(tool, int(f["batch"]), *values, runs, result_dir / str(row["source"]), str(row["timer"]))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise _fail(where, f"has a malformed native entry ({type(exc).__name__}: {exc})") from None
        given = [v for v in values if v is not None]
        if not given or not all(math.isfinite(v) and v > 0 for v in given) or timing.batch < 1 or (runs is not None and runs < 1):
            raise _fail(where, f"has invalid native figures from {tool} at batch {timing.batch} (need positive finite milliseconds)")
        if Path(str(row["source"])).is_absolute() or ".." in Path(str(row["source"])).parts:
            raise _fail(where, f"names a native source outside the result folder ({row['source']!r})")
        timings.append(timing)
    return tuple(timings), tuple(notes)


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
    native, native_notes = _native(path, result_dir, result)

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
                        logits, latency, device, timer, result.get("fixed_batch"), native, native_notes)  # fmt: skip
