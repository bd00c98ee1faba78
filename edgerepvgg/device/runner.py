#!/usr/bin/env python3
"""edgerepvgg device runner: runs a device bundle's artifact on the device and writes a result.

    python3 runner.py BUNDLE_DIR [-o RESULT_DIR]

A single file, copied into every bundle. It needs Python 3.8 or newer, numpy and the bundle's
runtime only (ONNX Runtime, OpenVINO, LiteRT or TensorRT with cuda-python or pycuda); it never
imports torch or edgerepvgg. It checks ``inputs.npy`` against the manifest's sha256, runs every
input (in chunks of the manifest's batch) and keeps the logits, times the artifact (warm-up, then
N runs at batch 1 and at the manifest's batch, with Python's perf_counter, host copies included)
and writes ``result.json`` + ``logits.npy`` into RESULT_DIR (default BUNDLE_DIR/result), all at
once: a failed run leaves no result and an earlier result in RESULT_DIR is replaced whole.

Exit codes: 0 done; 1 a bad bundle or a failed run; 2 the runtime is not installed here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time

log = logging.getLogger("runner")

BUNDLE_FORMAT, BUNDLE_VERSION = "edgerepvgg-device-bundle", 1
RESULT_FORMAT, RESULT_VERSION = "edgerepvgg-device-result", 1
RESULT_FILE, LOGITS_FILE = "result.json", "logits.npy"
TIMER = "python perf_counter, host copies included"
INPUT_NAME = "input"  # the ONNX graph's input (edgerepvgg.targets.onnx_graph.INPUT)
ENGINE_FILE = "model.plan"  # what the TensorRT bundle's build_engine.sh writes

# backend -> (module to import, the pip packages that provide it)
RUNTIMES = {
    "onnxruntime": ("onnxruntime", "pip install onnxruntime (or any ONNX Runtime build: onnxruntime-gpu, onnxruntime-openvino)"),
    "openvino": ("openvino", "pip install openvino"),
    "tflite": ("ai_edge_litert.interpreter", "pip install ai-edge-litert (or tflite-runtime)"),
    "tensorrt": ("tensorrt", "pip install tensorrt cuda-python (on a Jetson: TensorRT comes with JetPack; pip install cuda-python or pycuda)"),
}
# distribution names a runtime module may come from, first installed one is reported
DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                    "onnxruntime-silicon", "onnxruntime-qnn", "onnxruntime-training"),
    "openvino": ("openvino",),
    "tflite": ("ai-edge-litert", "tflite-runtime"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-lean"),
}


class BundleError(Exception):
    """A bad bundle or a failed run: one line, exit 1."""


class MissingRuntime(Exception):
    """The bundle's runtime is not installed here: one line, exit 2."""


def import_runtime(backend):
    module, hint = RUNTIMES[backend]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if backend == "tflite":
            try:
                return importlib.import_module("tflite_runtime.interpreter")
            except ImportError:
                pass
        raise MissingRuntime(f"the {backend} runtime is not installed here ({exc}); {hint}") from None
    return mod


def distribution(backend):
    """(distribution name, version) of the installed runtime, or (module, module.__version__)."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python 3.8 has it
        metadata = None
    if metadata is not None:
        for name in DISTRIBUTIONS[backend]:
            try:
                return name, metadata.version(name)
            except Exception:
                continue
    return backend, "unknown"


# ---------------------------------------------------------------------------------------------
# Sessions: NCHW float32 normalized in, float32 logits (N, classes) out; fixed_batch where the
# artifact takes exactly that many images (chunks are padded with zeros, padding dropped).


class OnnxRuntimeSession:
    def __init__(self, path, threads):
        ort = import_runtime("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.provider = "CPUExecutionProvider"

    def __call__(self, x):
        return self.session.run(None, {self.input_name: x})[0]


class OpenVINOSession:
    def __init__(self, path, threads):
        ov = import_runtime("openvino")
        if not hasattr(ov, "Core"):  # OpenVINO before 2023.1 keeps the API in openvino.runtime
            ov = importlib.import_module("openvino.runtime")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        dim = self.compiled.input(0).get_partial_shape()[0]
        self.fixed_batch = dim.get_length() if dim.is_static else None

    def __call__(self, x):
        import numpy as np

        return np.array(self.request.infer({0: x})[self.output], np.float32, copy=True)


class LiteRTSession:
    """LiteRT's interpreter: NHWC inside (the input is transposed here), int8 input/output
    quantized with the tensor's scale and zero point (rounding half away from zero, as TFLite)."""

    fixed_batch = None

    def __init__(self, path, threads):
        interpreter = import_runtime("tflite")
        self.interpreter = interpreter.Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        self._details()

    def _details(self):
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._shape = tuple(int(v) for v in self._in["shape"])

    def __call__(self, x):
        import numpy as np

        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if x.shape != self._shape:
            self.interpreter.resize_tensor_input(self._in["index"], list(x.shape), strict=False)
            self.interpreter.allocate_tensors()
            self._details()
        if self._in["dtype"] == np.int8:
            scale, zp = self._in["quantization"]
            v = x / np.float32(scale)
            x = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zp, -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._out["index"])
        if self._out["dtype"] == np.int8:
            scale, zp = self._out["quantization"]
            return (y.astype(np.float32) - zp) * np.float32(scale)
        return np.array(y, dtype=np.float32)


class TensorRTSession:
    """A serialized engine (TensorRT 10 tensor API) with device buffers from cuda-python, else
    pycuda. Not run in edgerepvgg's own test suite (no GPU there); the engine must be built on
    this device (``sh build_engine.sh`` in the bundle writes model.plan)."""

    def __init__(self, path, threads):
        import numpy as np

        trt = import_runtime("tensorrt")
        self.np = np
        self.cuda = self._cuda_library()
        with open(path, "rb") as f:
            plan = f.read()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"{path} is not a TensorRT engine for this TensorRT version and GPU; rebuild it here (sh build_engine.sh)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name = inputs[0]
        self.output_name = [n for n in names if n != self.input_name][0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.fixed_batch = None
        self.stream = self.cuda.stream()
        self.gpu_name = self.cuda.device_name()

    @staticmethod
    def _cuda_library():
        try:
            return _CudaPython()
        except ImportError:
            pass
        try:
            return _PyCuda()
        except ImportError:
            raise MissingRuntime("TensorRT needs a CUDA buffer library here; pip install cuda-python (or pycuda)") from None

    def __call__(self, x):
        np = self.np
        outs = []
        for i in range(0, x.shape[0], self.max_batch):
            chunk = np.ascontiguousarray(x[i : i + self.max_batch])
            if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
                raise BundleError(f"the engine refuses input shape {tuple(chunk.shape)}")
            out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), np.float32)
            d_in, d_out = self.cuda.alloc(chunk.nbytes), self.cuda.alloc(out.nbytes)
            try:
                self.cuda.to_device(d_in, chunk, self.stream)
                self.context.set_tensor_address(self.input_name, int(d_in))
                self.context.set_tensor_address(self.output_name, int(d_out))
                if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
                    raise BundleError("TensorRT failed to enqueue the engine")
                self.cuda.to_host(out, d_out, self.stream)
                self.cuda.synchronize(self.stream)
            finally:
                self.cuda.free(d_in)
                self.cuda.free(d_out)
            outs.append(out)
        return np.concatenate(outs)


class _CudaPython:
    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart
        self.rt = cudart

    def _check(self, result):
        err, rest = result[0], result[1:]
        if int(err) != 0:
            raise BundleError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def device_name(self):
        props = self._check(self.rt.cudaGetDeviceProperties(0))
        name = props.name
        return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name))

    def stream(self):
        return self._check(self.rt.cudaStreamCreate())

    def handle(self, stream):
        return int(stream)

    def alloc(self, nbytes):
        return self._check(self.rt.cudaMalloc(nbytes))

    def free(self, ptr):
        self.rt.cudaFree(ptr)

    def to_device(self, dst, array, stream):
        self._check(self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, array, src, stream):
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def synchronize(self, stream):
        self._check(self.rt.cudaStreamSynchronize(stream))


class _PyCuda:
    def __init__(self):
        import pycuda.autoinit  # noqa: F401 -- creates the context
        import pycuda.driver as drv

        self.drv = drv

    def device_name(self):
        return self.drv.Device(0).name()

    def stream(self):
        return self.drv.Stream()

    def handle(self, stream):
        return stream.handle

    def alloc(self, nbytes):
        return self.drv.mem_alloc(nbytes)

    def free(self, ptr):
        ptr.free()

    def to_device(self, dst, array, stream):
        self.drv.memcpy_htod_async(dst, array, stream)

    def to_host(self, array, src, stream):
        self.drv.memcpy_dtoh_async(array, src, stream)

    def synchronize(self, stream):
        stream.synchronize()


SESSIONS = {"onnxruntime": OnnxRuntimeSession, "openvino": OpenVINOSession, "tflite": LiteRTSession,
            "tensorrt": TensorRTSession}


def run_all(session, x, batch):
    """Logits for every row of ``x``, in chunks of ``batch`` (a fixed-batch artifact: chunks of its
    batch, the last padded with zeros and the padding dropped)."""
    import numpy as np

    step = session.fixed_batch or batch
    outs = []
    for i in range(0, x.shape[0], step):
        chunk = np.ascontiguousarray(x[i : i + step], np.float32)
        n = chunk.shape[0]
        if session.fixed_batch and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:], np.float32)])
        outs.append(np.asarray(session(chunk), np.float32)[:n])
    return np.concatenate(outs)


def time_batch(session, x, batch, warmup, runs):
    """Warm-up, then ``runs`` timed calls on ``batch`` rows (the bundle's first inputs, repeated
    if there are fewer): milliseconds per call with perf_counter, host copies included."""
    import numpy as np

    reps = -(-batch // x.shape[0])
    xb = np.ascontiguousarray(np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch], np.float32)
    for _ in range(warmup):
        run_all(session, xb, batch)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run_all(session, xb, batch)
        samples.append((time.perf_counter() - start) * 1000.0)
    t = np.asarray(samples)
    return {"batch": batch, "warmup": warmup, "runs": runs, "p50_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(t.mean()), "min_ms": float(t.min()),
            "samples_ms": [float(v) for v in samples]}


# ---------------------------------------------------------------------------------------------
# Device identity


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def board_model():
    """The board's name where the firmware gives one (Raspberry Pi, Jetson: /proc/device-tree/model)."""
    try:
        with open("/proc/device-tree/model", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace").strip() or None
    except OSError:
        return None


def gpu_name(session):
    name = getattr(session, "gpu_name", None)
    if name:
        return name
    smi = shutil.which("nvidia-smi")
    if smi:
        import subprocess

        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=10, check=True, universal_newlines=True).stdout
            return out.strip().splitlines()[0] if out.strip() else None
        except Exception:
            return None
    return None


def identity(backend, session):
    import numpy as np

    dist, version = distribution(backend)
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "system": platform.system(),
            "machine": platform.machine(), "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "board": board_model(), "gpu": gpu_name(session), "python": platform.python_version(),
            "numpy": np.__version__, "runtime": {"name": dist, "version": version, "backend": backend}}


# ---------------------------------------------------------------------------------------------


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle):
    path = os.path.join(bundle, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}; pass the folder write_bundle made")
    except ValueError as exc:
        raise BundleError(f"{path} is not JSON ({exc})")
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not an edgerepvgg device bundle manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path} is bundle format version {manifest.get('version')!r}; this runner reads version {BUNDLE_VERSION}")
    if manifest.get("backend") not in SESSIONS:
        raise BundleError(f"{path} names backend {manifest.get('backend')!r}; this runner runs {', '.join(SESSIONS)}")
    return manifest


def load_inputs(bundle, manifest):
    import numpy as np

    spec = manifest["inputs"]
    path = os.path.join(bundle, spec["file"])
    if not os.path.isfile(path):
        raise BundleError(f"{path} is missing; copy the whole bundle folder")
    digest = sha256_file(path)
    if digest != spec["sha256"]:
        raise BundleError(f"{path} does not match the manifest (sha256 {digest[:12]}..., expected {spec['sha256'][:12]}...); copy the bundle again")
    x = np.load(path, allow_pickle=False)
    if x.dtype != np.float32 or list(x.shape) != list(spec["shape"]):
        raise BundleError(f"{path} holds {x.dtype} {list(x.shape)}, the manifest says float32 {spec['shape']}")
    return x


def artifact_path(bundle, manifest):
    name = manifest["artifact"]
    if manifest["backend"] == "tensorrt" and not name.endswith(".plan"):
        name = manifest.get("engine", ENGINE_FILE)
        path = os.path.join(bundle, name)
        if not os.path.isfile(path):
            raise BundleError(f"no TensorRT engine at {path}; build it on this device first: sh {os.path.join(bundle, 'build_engine.sh')}")
        return path
    path = os.path.join(bundle, name)
    if not os.path.isfile(path):
        raise BundleError(f"{path} is missing; copy the whole bundle folder")
    return path


def write_result(out_dir, result, logits):
    """result.json + logits.npy into ``out_dir`` at once: built in a temporary sibling folder,
    then renamed into place; an earlier result there is replaced whole, anything else refused."""
    import numpy as np

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise BundleError(f"{out_dir} exists and is not a folder; pass -o a folder for the result")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, RESULT_FILE)):
            raise BundleError(f"{out_dir} holds files that are not a device result; pass -o a new folder")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".", suffix=".tmp", dir=parent)
    old = None
    try:
        with open(os.path.join(tmp, LOGITS_FILE), "wb") as f:
            np.save(f, logits)
            f.flush()
            os.fsync(f.fileno())
        result["logits"]["sha256"] = sha256_file(os.path.join(tmp, LOGITS_FILE))
        with open(os.path.join(tmp, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            old = out_dir + ".old-" + os.path.basename(tmp)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def run(bundle, out_dir=None):
    bundle = os.path.abspath(bundle)
    manifest = read_manifest(bundle)
    backend = manifest["backend"]
    import_runtime(backend)  # a missing runtime is said before anything else is done
    x = load_inputs(bundle, manifest)
    timing = manifest["timing"]
    session = SESSIONS[backend](artifact_path(bundle, manifest), timing.get("threads"))
    batch = int(timing["batch"])
    logits = run_all(session, x, batch)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise BundleError(f"the artifact returned logits of shape {list(logits.shape)} for {x.shape[0]} inputs")
    latency = [time_batch(session, x, b, int(timing["warmup"]), int(timing["runs"]))
               for b in sorted({1, batch})]  # fmt: skip
    result = {
        "format": RESULT_FORMAT, "version": RESULT_VERSION,
        "backend": backend, "precision": manifest["precision"],
        "model_hash": manifest["model_hash"], "spec_sha256": manifest["spec_sha256"],
        "inputs": {"count": int(x.shape[0]), "sha256": manifest["inputs"]["sha256"]},
        "artifact": os.path.basename(artifact_path(bundle, manifest)),
        "fixed_batch": session.fixed_batch,
        "logits": {"file": LOGITS_FILE, "shape": list(logits.shape), "dtype": "float32"},
        "timer": TIMER, "threads": timing.get("threads"), "latency": latency,
        "device": identity(backend, session),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_result(out_dir or os.path.join(bundle, "result"), result, logits), result


def _log_to_stderr() -> None:
    """The runner is its own command line: its one-line errors and its summary go to this
    process's stderr, whatever logging the host process set up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("runner.py: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="runner.py", description="Run an edgerepvgg device bundle on this device.")
    parser.add_argument("bundle", help="the bundle folder (holds manifest.json)")
    parser.add_argument("-o", "--output", help="result folder (default: BUNDLE/result); replaced whole on a re-run")
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        out, result = run(args.bundle, args.output)
    except MissingRuntime as exc:
        log.error("%s", exc)
        return 2
    except BundleError as exc:
        log.error("error: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; no result written")
        return 130
    except Exception as exc:  # a runtime's own failure: one line, no result
        first = (str(exc).strip().splitlines() or [""])[0]
        log.error("error: %s: %s", type(exc).__name__, first)
        return 1
    dev = result["device"]
    lat = ", ".join(f"batch {r['batch']}: p50 {r['p50_ms']:.3f} ms" for r in result["latency"])
    log.info("%s %s on %s (%s): %d inputs; %s (%s) -> %s", result["backend"], result["precision"], dev["hostname"],
             dev["cpu_model"], result["inputs"]["count"], lat, TIMER, out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
