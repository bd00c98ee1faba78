"""TensorRT: explicit quantization from a Q/DQ ONNX graph, honest about where TensorRT is absent.

TensorRT's INT8 calibrators are deprecated (10.1); INT8 engines are built from a Q/DQ ONNX graph
whose scales come from the QuantSpec, in a strongly typed network. What can be checked on any
machine is that graph: :mod:`edgerepvgg.targets.qdq_rules` holds it against TensorRT's rules, and
its numerics run in ONNX Runtime without graph optimizations, which computes exactly what the
graph says (float bias included).

``compile`` always writes the ONNX graph and a ready ``build_engine.sh`` (trtexec); where the
``tensorrt`` package and a CUDA GPU exist it also builds the engine with the Python API and
writes the engine inspector's layer report. Elsewhere the artifact is the ONNX graph, its info
says ``engine_built: False`` and why, and ``load`` returns an emulation marked ``emulated = True``
so that no report passes it off as an engine measurement.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerepvgg.errors import UserError
from edgerepvgg.io import atomic_path, write_text_atomic
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.spec import QuantSpec
from edgerepvgg.targets.base import Artifact, ArtifactMetadata, check_batch, check_precision
from edgerepvgg.targets.onnx_graph import INPUT, OUTPUT, artifact_metadata, build_model, read_metadata, save_onnx, simplify
from edgerepvgg.targets.onnxruntime import OnnxRuntimeRunner
from edgerepvgg.targets.qdq_rules import (  # noqa: F401 -- re-exported: the rules are TensorRT's
    RULES,
    Violation,
    check_explicit_quantization,
    quantized_layers,
    require_explicit_quantization,
)

log = logging.getLogger(__name__)

NOT_INSTALLED = "TensorRT is not installed (pip install 'edgerepvgg[tensorrt]' on a machine with an NVIDIA GPU)"
ONNX_FILE, PLAN_FILE, SCRIPT_FILE = "model.onnx", "model.plan", "build_engine.sh"
CACHE_FILE, LAYERS_FILE = "timing.cache", "layers.json"

# ---------------------------------------------------------------------------------------------
# The engine inspector's layer report


def summarize_layers(report: dict) -> dict:
    """Count the convolutions of an engine-inspector JSON report (``LayerInformationFormat.JSON``,
    DETAILED verbosity) and how many of them read INT8 input; the rest are named."""
    convs, int8, other, unknown = 0, 0, [], []
    for layer in report.get("Layers", []):
        if not isinstance(layer, dict):  # a report without DETAILED verbosity names layers only
            continue
        kind = f"{layer.get('LayerType', '')} {layer.get('ParameterType', '')}"
        if "Convolution" not in kind:
            continue
        convs += 1
        formats = [str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) if isinstance(t, dict)]
        if formats and formats[0].lower().startswith("n/a"):
            unknown.append(layer.get("Name", "?"))
        elif formats and "int8" in formats[0].lower():
            int8 += 1
        else:
            other.append(layer.get("Name", "?"))
    return {"convolutions": convs, "int8_convolutions": None if unknown else int8,
            "convolutions_not_int8": other, "convolutions_format_unknown": unknown}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Engine build (needs tensorrt and a CUDA GPU) and the trtexec equivalent (runs anywhere)


@dataclass(frozen=True)
class BuildOptions:
    """Batch range of the optimization profile (min, opt, max) and the builder's workspace."""

    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mb: int = 1024

    def __post_init__(self) -> None:
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"the batch range needs 1 <= min <= opt <= max, got {self.batch}")
        if self.workspace_mb < 1:
            raise UserError(f"workspace_mb must be positive, got {self.workspace_mb}")

    def shapes(self, plain: PlainNet) -> tuple[tuple[int, ...], ...]:
        """The (min, opt, max) NCHW input shapes of ``plain``'s profile."""
        s = plain.input_spec
        return tuple((b, s.channels, s.size, s.size) for b in self.batch)


def strongly_typed(precision: str) -> bool:
    """INT8 (types from Q/DQ) and FP32 build strongly typed; FP16 from an FP32 graph needs the
    FP16 builder flag, which TensorRT 10 refuses on a strongly typed network."""
    return precision != "fp16"


def trtexec_command(precision: str, shapes: tuple[tuple[int, ...], ...], workspace_mb: int) -> list[str]:
    """The trtexec arguments that build the same engine as :func:`build_engine` (from ``out_dir``)."""
    dims = ["x".join(map(str, s)) for s in shapes]
    cmd = ["trtexec", f"--onnx={ONNX_FILE}", f"--saveEngine={PLAN_FILE}"]
    cmd.append("--stronglyTyped" if strongly_typed(precision) else "--fp16")
    cmd += [f"--minShapes={INPUT}:{dims[0]}", f"--optShapes={INPUT}:{dims[1]}", f"--maxShapes={INPUT}:{dims[2]}",
            f"--memPoolSize=workspace:{workspace_mb}M", f"--timingCacheFile={CACHE_FILE}",
            "--profilingVerbosity=detailed", f"--exportLayerInfo={LAYERS_FILE}", "--skipInference"]  # fmt: skip
    return cmd


def _script(cmd: list[str], precision: str) -> str:
    return (
        "#!/bin/sh\n"
        f"# Build the TensorRT {precision} engine from {ONNX_FILE} on a machine with TensorRT 10 and an NVIDIA GPU.\n"
        f"# Writes {PLAN_FILE}, the timing cache {CACHE_FILE} and the layer report {LAYERS_FILE} beside this file.\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f"exec {' '.join(shlex.quote(c) for c in cmd)} \"$@\"\n"
    )


def build_engine(onnx_path: Path, out_dir: Path, precision: str, shapes: tuple[tuple[int, ...], ...], workspace_mb: int) -> dict:
    """Build and serialize the engine with TensorRT's Python API; write the timing cache, the
    inspector's layer report and, last, the plan into ``out_dir``; return facts for the info."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if not strongly_typed(precision) and int(trt.__version__.split(".")[0]) >= 11:
        raise UserError("TensorRT 11 builds strongly typed only: an fp16 engine needs an FP16 ONNX graph; build fp32 or int8")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed(precision) else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = out_dir / CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, *shapes)
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build the engine (its log above says why)")
    plan_path = out_dir / PLAN_FILE
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(config.get_timing_cache().serialize())

    runtime = trt.Runtime(logger)  # kept alive while its engine is in use
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    context.set_input_shape(INPUT, shapes[1])  # concrete shapes, so the report has formats, not "N/A"
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    report = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    write_text_atomic(out_dir / LAYERS_FILE, json.dumps(report, indent=1))
    with atomic_path(plan_path) as tmp:  # the artifact's entry point: written last
        tmp.write_bytes(plan)
    summary = summarize_layers(report)
    log.info("built %s: %s of %s convolutions in INT8", plan_path, summary["int8_convolutions"], summary["convolutions"])
    return {"tensorrt_version": trt.__version__, "device": torch.cuda.get_device_name(), **summary}


# ---------------------------------------------------------------------------------------------
# Runners


class EmulatedTensorRTRunner(OnnxRuntimeRunner):
    """The Q/DQ graph in ONNX Runtime with graph optimizations off: the integer function TensorRT
    is asked to compute (float bias included), not a TensorRT measurement (``emulated = True``)."""

    emulated: bool = True

    def __init__(self, path: str | Path, threads: int | None = None, optimize: bool = False):
        super().__init__(path, threads, optimize=optimize)


class TensorRTRunner:
    """A serialized engine on a CUDA device; batches above the profile's maximum run in chunks."""

    emulated: bool = False

    def __init__(self, plan_path: str | Path, device: int = 0):
        import tensorrt as trt
        import torch

        self._torch = torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise UserError(f"{plan_path} is not a TensorRT engine for this TensorRT version and GPU; rebuild it here")
        self.context = self.engine.create_execution_context()
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT, 0)[2][0])
        self.stream = torch.cuda.Stream(self.device)

    def enqueue(self, x):
        """Run on the runner's stream for a float32 CUDA tensor ``x`` (N <= max batch); returns the
        output tensor, valid once the stream has finished (``self.stream.synchronize()``)."""
        torch = self._torch
        self.context.set_input_shape(INPUT, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(INPUT, x.data_ptr())
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x was written on the current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine")
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        outs = []
        for chunk in x.split(self.max_batch):
            outs.append(self.enqueue(chunk.contiguous()))
            self.stream.synchronize()
        return torch.cat(outs).cpu().numpy()

    def latency(self, batch_size: int = 1, warmup: int = 20, runs: int = 100):
        """Engine time per batch from CUDA events on the stream (no host copies): an ``evaluate.Latency``."""
        from edgerepvgg.evaluate import Latency

        torch = self._torch
        shape = (batch_size, *tuple(self.engine.get_tensor_shape(INPUT))[1:])
        x = torch.randn(shape, device=self.device)
        for _ in range(warmup):
            self.enqueue(x)
        self.stream.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.enqueue(x)
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        t = np.asarray(times)
        return Latency(batch_size, runs, warmup, float(np.median(t)), float(np.percentile(t, 90)), float(t.mean()), float(t.min()))


# ---------------------------------------------------------------------------------------------
# The target


class TensorRTTarget:
    name = "tensorrt"
    constraint_set = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    description = "TensorRT on an NVIDIA GPU: explicit quantization from Q/DQ ONNX (emulated in ONNX Runtime where TensorRT is absent)"
    supports_fixed_batch = True  # a (b, b, b) optimization profile
    compiles_without_runtime = True  # the Q/DQ ONNX, its rule check and build_engine.sh need no GPU

    def available(self) -> str | None:
        """None where the tensorrt package imports and a CUDA device is visible, else why not."""
        if importlib.util.find_spec("tensorrt") is None:
            return NOT_INSTALLED
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # noqa: BLE001 -- placeholder wheels install but fail in many ways on import
            return f"{NOT_INSTALLED}: importing it failed ({type(exc).__name__}: {exc})"
        import torch

        if not torch.cuda.is_available():
            cpu_build = " (this torch is a CPU-only build; the runner needs a CUDA build)" if torch.version.cuda is None else ""
            return f"no CUDA device visible to torch{cpu_build}: TensorRT builds and runs engines only on an NVIDIA GPU"
        return None

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32", *,
                batch: int | None = None, profile: tuple[int, int, int] = (1, 8, 32),
                workspace_mb: int = 1024) -> Artifact:  # fmt: skip
        """Write ``build_engine.sh`` and then the ONNX graph (Q/DQ for int8, checked against
        TensorRT's rules before anything is written); build the engine too where TensorRT and a
        GPU are present. ``batch`` fixes the batch dimension (the profile becomes ``(b, b, b)``);
        else ``profile`` is the (min, opt, max) batch range."""
        check_precision(self, precision, spec)
        check_batch(self, batch)
        options = BuildOptions((batch,) * 3 if batch is not None else tuple(profile), workspace_mb)
        out_dir = Path(out_dir)
        info: dict = {"batch": dict(zip(("min", "opt", "max"), options.batch)), "workspace_mb": workspace_mb,
                      "strongly_typed": strongly_typed(precision)}  # fmt: skip
        if precision == "int8":
            model = build_model(plain, spec)
            require_explicit_quantization(model)
            info["qdq_check"] = "passed"
            info["graph_quantized_layers"] = len(quantized_layers(model))
        else:
            model = simplify(build_model(plain))
        if precision == "fp16":
            info["note"] = "fp16: FP32 graph built weakly typed with the FP16 builder flag (TensorRT 10.x)"
        cmd = trtexec_command(precision, options.shapes(plain), workspace_mb)
        script = out_dir / SCRIPT_FILE
        write_text_atomic(script, _script(cmd, precision))
        script.chmod(0o755)
        onnx_path = save_onnx(model, out_dir / ONNX_FILE)  # without an engine, the entry point: written last
        info["trtexec"] = " ".join(shlex.quote(c) for c in cmd)
        info["metadata"] = read_metadata(onnx_path)
        files = [onnx_path, script]

        why = self.available()
        if why is not None:
            log.info("TensorRT engine not built (%s); run %s where it is", why, script)
            info.update({"engine_built": False, "why": why, "emulated": True})
            return Artifact(self.name, precision, onnx_path, tuple(files), info)
        info.update(build_engine(onnx_path, out_dir, precision, options.shapes(plain), workspace_mb))
        info.update({"engine_built": True, "emulated": False, "layer_report": LAYERS_FILE})
        files += [out_dir / PLAN_FILE, out_dir / CACHE_FILE, out_dir / LAYERS_FILE]
        return Artifact(self.name, precision, out_dir / PLAN_FILE, tuple(files), info)

    def load(self, artifact: Artifact, threads: int | None = None) -> TensorRTRunner | EmulatedTensorRTRunner:
        """The engine's runner where it was built; else the ONNX graph in ONNX Runtime, marked
        ``emulated`` (for int8 node by node, which keeps TensorRT's float bias exact)."""
        path = Path(artifact.path)
        if path.suffix == ".plan":
            why = self.available()
            if why is not None:
                raise UserError(f"{path} is a TensorRT engine and cannot run here ({why}); load the ONNX artifact for the emulation")
            return TensorRTRunner(path)
        return EmulatedTensorRTRunner(path, threads, optimize=artifact.precision != "int8")

    def metadata(self, artifact: Artifact) -> ArtifactMetadata:
        """Read from the ONNX graph the engine is built from (``model.onnx`` beside the plan)."""
        return artifact_metadata(Path(artifact.path).with_name(ONNX_FILE))
