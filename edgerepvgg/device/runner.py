#!/usr/bin/env python3
"""edgerepvgg device runner: runs a device bundle's artifact on the device and writes a result.

    python3 runner.py BUNDLE_DIR [-o RESULT_DIR] [--native auto|off|require]

A single file, copied into every bundle. It needs Python 3.8 or newer, numpy and the bundle's
runtime only (ONNX Runtime, OpenVINO, LiteRT or TensorRT with cuda-python or pycuda); it never
imports torch or edgerepvgg. It checks ``inputs.npy`` against the manifest's sha256, runs every
input (in chunks of the manifest's batch) and keeps the logits, times the artifact (warm-up, then
N runs at batch 1 and at the manifest's batch, with Python's perf_counter, host copies included)
and writes ``result.json`` + ``logits.npy`` into RESULT_DIR (default BUNDLE_DIR/result), all at
once: a failed run leaves no result and an earlier result in RESULT_DIR is replaced whole.

After its own timing it runs the vendor's benchmark tool the manifest names (``native``: trtexec,
benchmark_app, TFLite's benchmark_model, litert-benchmark) where that tool is found here ($TRTEXEC,
$BENCHMARK_APP, $BENCHMARK_MODEL, $LITERT_BENCHMARK, else PATH, else beside this Python, else a
known folder), keeps its raw output in RESULT_DIR/native/ and records what ran and the figures it
gave (``--native auto``: a missing or failing tool is recorded and the run still succeeds; ``off``:
not run; ``require``: a tool that is missing or gives no figures is an error, exit 1).

Exit codes: 0 done; 1 a bad bundle or a failed run; 2 the runtime is not installed here.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
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


@functools.lru_cache(maxsize=None)
def openvino_core():
    """One Core for the process: OpenVINO's CPU plugin swaps the thread's signal stack per Core and
    can hand back an unmapped one when Cores are freed in creation order (a later signal crashes)."""
    ov = import_runtime("openvino")
    if not hasattr(ov, "Core"):  # OpenVINO before 2023.1 keeps the API in openvino.runtime
        ov = importlib.import_module("openvino.runtime")
    return ov.Core()


class OpenVINOSession:
    def __init__(self, path, threads):
        core = openvino_core()
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
# Native timers: the vendor's benchmark tool, run after the runner's own timing


class NativeTool:
    """How a vendor's benchmark tool is found here and what its figures mean (``timer``)."""

    def __init__(self, env, paths, timer):
        self.env, self.paths, self.timer = env, paths, timer


TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec",)  # JetPack and NGC containers install it here, off PATH
NATIVE_TOOLS = {
    "trtexec": NativeTool("TRTEXEC", TRTEXEC_PATHS,
                          "trtexec Latency: H2D + GPU compute + D2H per query (CUDA events), random inputs; "
                          "from --exportTimes, warm-up queries dropped"),
    "benchmark_app": NativeTool("BENCHMARK_APP", (),
                                "OpenVINO benchmark_app: latency per synchronous infer request, inputs filled once (random)"),
    "benchmark_model": NativeTool("BENCHMARK_MODEL", (),
                                  "TFLite benchmark_model: wall time per Invoke (C++), random inputs"),
    "litert-benchmark": NativeTool("LITERT_BENCHMARK", (),
                                   "litert-benchmark (ai_edge_litert.tools.benchmark_litert_model): Python perf_counter "
                                   "around CompiledModel.run_by_name, random inputs, 0.01 ms resolution"),
}  # fmt: skip
NATIVE_MODES = ("auto", "off", "require")
NATIVE_DIR = "native"
NATIVE_TIMEOUT = 600.0  # seconds per tool run
_FIGURES = ("p50_ms", "p90_ms", "mean_ms", "min_ms")


class NativeError(Exception):
    """A native tool ran but its output holds no figures (recorded; fatal only under --native require)."""


def find_tool(name, argv0):
    """(path, None) of the tool: $ENV if set, else PATH, else beside this Python (a venv's pip
    scripts), else a known folder; (None, why) where it is not found."""
    tool = NATIVE_TOOLS[name]
    override = os.environ.get(tool.env)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override, None
        return None, f"${tool.env}={override} is not an executable file"
    found = shutil.which(argv0)
    if found:
        return found, None
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), argv0)
    for candidate in (here,) + tuple(tool.paths):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate, None
    where = ", ".join(("PATH", os.path.dirname(here)) + tuple(tool.paths))
    return None, f"{argv0} not found (looked in {where}); set ${tool.env}=/path/to/{argv0}"


def _figures(batch, runs, p50=None, p90=None, mean=None, min_=None):
    """The parsed figures; a figure the tool did not give stays None, a non-positive one (below
    the tool's printed resolution) is dropped rather than recorded as 0."""
    out = {"batch": batch, "runs": runs}
    for key, value in zip(_FIGURES, (p50, p90, mean, min_)):
        out[key] = float(value) if value is not None and float(value) > 0 else None
    if all(out[k] is None for k in _FIGURES):
        raise NativeError("no latency figures in the tool's output")
    return out


def trtexec_records(path):
    """The per-query records of a trtexec ``--exportTimes`` JSON (those with ``computeMs``)."""
    try:
        with open(path) as f:
            rows = [r for r in json.load(f) if isinstance(r, dict) and "computeMs" in r]
    except (OSError, ValueError, TypeError) as exc:
        raise NativeError(f"{path} is not a trtexec --exportTimes file ({exc})")
    if not rows:
        raise NativeError(f"{path} holds no inference times (not a trtexec --exportTimes file?)")
    return rows


def drop_trtexec_warmup(rows, warmup_ms):
    """trtexec exports its warm-up queries too; its own summary drops those whose compute started
    within the first ``--warmUp`` milliseconds (sampleReporting.cpp), and so does this."""
    return [r for r in rows if float(r.get("startComputeMs", warmup_ms)) >= warmup_ms]


_TRT_LATENCY = re.compile(r"(?:^|\]\s*)Latency: min = ([0-9.eE+-]+) ms, max = [0-9.eE+-]+ ms, mean = ([0-9.eE+-]+) ms, "
                          r"median = ([0-9.eE+-]+) ms(.*)")  # fmt: skip
_TRT_P90 = re.compile(r"percentile\(90(?:\.0+)?%\) = ([0-9.eE+-]+) ms")
_TRT_QUERIES = re.compile(r"Timing trace has (\d+) queries")


def trtexec_percentile(values, percentile):
    """trtexec's own percentile of ``values`` (sampleReporting.cpp findPercentile: the sorted value
    at index n - 1 - int((1 - p/100) * n), in float32 as trtexec computes it: 90% of 10 excludes 1),
    so a figure read from the file is the one it prints."""
    import numpy as np

    v = sorted(values)
    f32 = np.float32
    exclude = int((f32(1) - f32(percentile) / f32(100)) * f32(len(v)))
    return v[max(len(v) - 1 - exclude, 0)]


def parse_trtexec(entry, out_dir, log_text):
    """From the --exportTimes file: the latencyMs of every query after the warm-up, with trtexec's
    definitions (median of the middle two, its percentile rule); without the file, trtexec's printed
    summary line ("Latency: min = ..., mean = ..., median = ..., percentile(90%) = ...", the p90 only
    where that release prints it)."""
    import numpy as np

    opts = dict(a.split("=", 1) for a in entry["argv"][1:] if a.startswith("--") and "=" in a)
    times = opts.get("--exportTimes")
    if times and os.path.isfile(os.path.join(out_dir, times)):
        rows = drop_trtexec_warmup(trtexec_records(os.path.join(out_dir, times)), float(opts.get("--warmUp", 0)))
        if not rows:
            raise NativeError(f"{times} holds only warm-up queries")
        t = [float(r["latencyMs"]) for r in rows]
        return times, _figures(entry["batch"], len(t), np.median(t), trtexec_percentile(t, 90), np.mean(t), min(t))
    lines = [m for m in map(_TRT_LATENCY.search, log_text.splitlines()) if m]  # "Latency:" itself, not "H2D Latency:"
    if not lines:
        raise NativeError("neither the --exportTimes file nor trtexec's 'Latency: min = ...' line is there")
    m = lines[-1]
    p90 = _TRT_P90.search(m.group(4))
    queries = _TRT_QUERIES.findall(log_text)
    return None, _figures(entry["batch"], int(queries[-1]) if queries else None, m.group(3), p90 and p90.group(1),
                          m.group(2), m.group(1))  # fmt: skip


def _number(text):
    m = re.search(r"[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?", text)
    return float(m.group(0)) if m else None


def parse_benchmark_app(entry, out_dir, log_text):
    """benchmark_app's report (``-report_folder``: benchmark_report.csv, ';'-separated sections):
    median ("latency (ms)" in the Python tool, "Median latency (ms)" in the C++ one), average and
    minimum latency, iterations and batch; else its printed "Median: / Average: / Min:" lines.
    benchmark_app reports one percentile (50 by default), so p90 stays None."""
    argv = entry["argv"]
    folder = argv[argv.index("-report_folder") + 1] if "-report_folder" in argv else None
    csv = os.path.join(folder, "benchmark_report.csv") if folder else None
    values = {}
    if csv and os.path.isfile(os.path.join(out_dir, csv)):
        with open(os.path.join(out_dir, csv)) as f:
            for line in f:
                key, sep, value = line.strip().partition(";")
                if sep:
                    values[key.strip().lower()] = value.strip()
        source = csv
    else:
        for key, label in (("median", "median latency (ms)"), ("average", "avg latency"), ("min", "min latency")):
            m = re.search(r"\]\s+" + key.capitalize() + r":\s+([0-9.]+) ms", log_text)
            if m:
                values[label] = m.group(1)
        m = re.search(r"Count:\s+(\d+) iterations", log_text)
        if m:
            values["total number of iterations"] = m.group(1)
        source = None

    def first(*keys):
        for k in keys:
            if values.get(k):
                return _number(values[k])
        return None

    if "-latency_percentile" in argv and argv[argv.index("-latency_percentile") + 1] != "50":
        raise NativeError("benchmark_app ran with -latency_percentile other than 50; its latency is not a median")
    batch = first("batch size")
    runs = first("total number of iterations")
    return source, _figures(int(batch) if batch else entry["batch"], int(runs) if runs else None,
                            first("median latency (ms)", "latency (ms)"), None,
                            first("average latency (ms)", "avg latency"), first("min latency (ms)", "min latency"))  # fmt: skip


_BM_STAT = re.compile(r"count=(\d+) first=\S+ curr=\S+ min=(\S+) max=\S+ avg=(\S+) std=\S+(.*)")


def parse_benchmark_model(entry, out_dir, log_text):
    """TFLite benchmark_model's measured-run statistics line, in microseconds: the last
    "count=N first=.. curr=.. min=.. max=.. avg=.. std=.." (the warm-up's comes first), with
    "median=" where the tool prints percentiles (p5/median/p95, no p90)."""
    stats = [m for m in map(_BM_STAT.search, log_text.splitlines()) if m]
    if not stats:
        raise NativeError("no 'count=... avg=...' statistics line in benchmark_model's output")
    m = stats[-1]
    median = re.search(r"\bmedian=(\S+)", m.group(4))
    us = lambda v: float(v) / 1000.0  # noqa: E731
    return None, _figures(entry["batch"], int(m.group(1)), us(median.group(1)) if median else None, None,
                          us(m.group(3)), us(m.group(2)))  # fmt: skip


def parse_litert_benchmark(entry, out_dir, log_text):
    """litert-benchmark's ``--result_json`` (latency.median_ms / avg_ms / min_ms / num_runs, in ms
    rounded to 0.01), else its printed "Inference (median|avg|min): X ms" lines; p5/p95, no p90."""
    path = next((a.split("=", 1)[1] for a in entry["argv"] if a.startswith("--result_json=")), None)
    if path and os.path.isfile(os.path.join(out_dir, path)):
        try:
            with open(os.path.join(out_dir, path)) as f:
                lat = json.load(f)["latency"]
            return path, _figures(entry["batch"], int(lat["num_runs"]), lat.get("median_ms"), None, lat.get("avg_ms"),
                                  lat.get("min_ms"))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NativeError(f"{path} is not a litert-benchmark result ({type(exc).__name__}: {exc})")
    found = dict(re.findall(r"Inference \((median|avg|min)\):\s+([0-9.]+) ms", log_text))
    runs = re.search(r"Inference \(avg\):\s+[0-9.]+ ms \((\d+) runs\)", log_text)
    return None, _figures(entry["batch"], int(runs.group(1)) if runs else None, found.get("median"), None,
                          found.get("avg"), found.get("min"))  # fmt: skip


NATIVE_PARSERS = {"trtexec": parse_trtexec, "benchmark_app": parse_benchmark_app,
                  "benchmark_model": parse_benchmark_model, "litert-benchmark": parse_litert_benchmark}  # fmt: skip


def native_entries(manifest):
    """The manifest's native benchmark commands (an older bundle has none)."""
    entries = manifest.get("native") or []
    for e in entries:
        if not isinstance(e, dict) or e.get("tool") not in NATIVE_TOOLS or not isinstance(e.get("argv"), list) or not e["argv"]:
            raise BundleError(f"the manifest's native entry {str(e)[:80]!r} is malformed; write the bundle again")
    return entries


def _mirror(bundle, manifest, work):
    """``work`` holds the bundle's files (links, or copies where links fail) so that a tool runs
    its argv verbatim there (bundle-relative names) and writes its output beside them, not into
    the bundle."""
    names = list(manifest.get("files") or [manifest["artifact"]])
    engine = manifest.get("engine")
    if engine and os.path.isfile(os.path.join(bundle, engine)):
        names.append(engine)
    for name in names:
        src, dst = os.path.join(bundle, name), os.path.join(work, name)
        if not os.path.exists(src):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def run_native_tool(entry, path, work, timeout):
    """Run one tool in ``work``: the record of what ran (tool, argv, path, exit code, seconds,
    status) and, where it gave them, the figures; its stdout and stderr go to native/<name>.log."""
    name = entry["tool"]
    rec = {"tool": name, "batch": entry["batch"], "argv": list(entry["argv"]), "path": path,
           "timer": NATIVE_TOOLS[name].timer, "log": None, "exit_code": None, "seconds": None,
           "status": None, "note": None, "source": None, "figures": None}  # fmt: skip
    for folder in entry.get("mkdir") or [NATIVE_DIR]:
        os.makedirs(os.path.join(work, folder), exist_ok=True)
    log_name = f"{NATIVE_DIR}/{name}_b{entry['batch']}.log"
    rec["log"] = log_name
    start = time.perf_counter()
    try:
        with open(os.path.join(work, log_name), "wb") as log_file:
            proc = subprocess.run([path] + list(entry["argv"][1:]), cwd=work, stdout=log_file, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout)  # fmt: skip
        rec["exit_code"] = proc.returncode
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", seconds=round(time.perf_counter() - start, 3),
                   note=f"{name} did not finish within {timeout:g} s; stopped")  # fmt: skip
        return rec
    except OSError as exc:
        rec.update(status="failed", seconds=round(time.perf_counter() - start, 3), note=f"{name} could not start: {exc}")
        return rec
    rec["seconds"] = round(time.perf_counter() - start, 3)
    with open(os.path.join(work, log_name), errors="replace") as f:
        text = f.read()
    if proc.returncode != 0:
        last = [ln.strip() for ln in text.splitlines() if ln.strip()]
        rec.update(status="failed", note=f"{name} exited with {proc.returncode}" + (f": {last[-1][:200]}" if last else ""))
        return rec
    try:
        rec["source"], rec["figures"] = NATIVE_PARSERS[name](entry, work, text)
    except NativeError as exc:
        rec.update(status="failed", note=f"{name} exited 0 but {exc}")
        return rec
    rec["source"] = rec["source"] or log_name
    rec["status"] = "ok"
    return rec


def resolve_native(manifest, mode):
    """[(entry, path or None, why not)] for the manifest's tools; under ``require`` a tool that
    is not here, or a bundle that names none, is a BundleError."""
    if mode == "off":
        return []
    entries = native_entries(manifest)
    if not entries and mode == "require":
        why = manifest.get("native_none") or "the bundle names no native benchmark tool"
        raise BundleError(f"--native require: {why}")
    out = []
    for e in entries:
        path, why = find_tool(e["tool"], e["argv"][0])
        if path is None and mode == "require":
            raise BundleError(f"--native require: {why}")
        out.append((e, path, why))
    return out


def run_native(bundle, manifest, tools, session, work, mode, timeout):
    """Run each found tool in ``work`` (a mirror of the bundle); the records of all of them."""
    if not tools:
        return []
    _mirror(bundle, manifest, work)
    records = []
    for entry, path, why in tools:
        if path is None:
            records.append({"tool": entry["tool"], "batch": entry["batch"], "argv": list(entry["argv"]), "path": None,
                            "timer": NATIVE_TOOLS[entry["tool"]].timer, "status": "not_found", "note": why})  # fmt: skip
            log.info("%s", why)
            continue
        fixed = session.fixed_batch
        if fixed and entry["batch"] != fixed:
            records.append({"tool": entry["tool"], "batch": entry["batch"], "argv": list(entry["argv"]), "path": path,
                            "timer": NATIVE_TOOLS[entry["tool"]].timer, "status": "skipped",
                            "note": f"the artifact's batch is fixed at {fixed}"})  # fmt: skip
            continue
        rec = run_native_tool(entry, path, work, timeout)
        if rec["status"] != "ok":
            if mode == "require":
                raise BundleError(f"--native require: {rec['note']}")
            log.info("%s (recorded; the run goes on)", rec["note"])
        records.append(rec)
    return records


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


def check_output(out_dir):
    """``out_dir`` may take a result: absent, empty, or an earlier result (replaced whole)."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise BundleError(f"{out_dir} exists and is not a folder; pass -o a folder for the result")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, RESULT_FILE)):
            raise BundleError(f"{out_dir} holds files that are not a device result; pass -o a new folder")


def write_result(out_dir, result, logits, native_dir=None):
    """result.json + logits.npy (and the native tools' output folder ``native_dir`` as native/)
    into ``out_dir`` at once: built in a temporary sibling folder, then renamed into place; an
    earlier result there is replaced whole, anything else refused."""
    import numpy as np

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    check_output(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".", suffix=".tmp", dir=parent)
    old = None
    try:
        if native_dir is not None and os.path.isdir(native_dir):
            shutil.move(native_dir, os.path.join(tmp, NATIVE_DIR))
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


def run(bundle, out_dir=None, native="auto", native_timeout=NATIVE_TIMEOUT):
    if native not in NATIVE_MODES:
        raise BundleError(f"native must be one of {', '.join(NATIVE_MODES)}, got {native!r}")
    bundle = os.path.abspath(bundle)
    out_dir = os.path.abspath(out_dir or os.path.join(bundle, "result"))
    manifest = read_manifest(bundle)
    backend = manifest["backend"]
    import_runtime(backend)  # a missing runtime is said before anything else is done
    tools = resolve_native(manifest, native)  # so is a required tool that is not here
    check_output(out_dir)
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
        "native_mode": native,
        "native": [],
        "native_none": manifest.get("native_none"),
        "finished": None,
    }
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".native-", suffix=".tmp", dir=parent)
    try:
        result["native"] = run_native(bundle, manifest, tools, session, work, native, native_timeout)
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return write_result(out_dir, result, logits, os.path.join(work, NATIVE_DIR)), result
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    parser.add_argument("--native", choices=NATIVE_MODES, default="auto",
                        help="the vendor's benchmark tool named in the manifest: auto (run it where found, record it "
                             "where not or where it fails), off, require (missing or failing: exit 1)")  # fmt: skip
    parser.add_argument("--native-timeout", type=float, default=NATIVE_TIMEOUT, metavar="SECONDS",
                        help=f"stop a native tool after this long (default {NATIVE_TIMEOUT:g})")
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        out, result = run(args.bundle, args.output, args.native, args.native_timeout)
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
    for rec in result["native"]:
        if rec["status"] == "ok":
            f = rec["figures"]
            shown = ", ".join(f"{k[:-3]} {f[k]:.3f} ms" for k in _FIGURES if f[k] is not None)
            log.info("%s, batch %s: %s (%s runs; %s)", rec["tool"], f["batch"], shown, f["runs"], rec["source"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
