"""TensorRT: explicit quantization from a Q/DQ ONNX graph, honest about where TensorRT is absent.

TensorRT's INT8 calibrators are deprecated (10.1); INT8 engines are built from a Q/DQ ONNX graph
whose scales come from the QuantSpec, in a strongly typed network. What can be checked on any
machine is that graph: :func:`check_explicit_quantization` holds it against TensorRT's rules
(symmetric int8, weights per output channel on axis 0, activations per tensor, Q/DQ on conv
inputs and not on their outputs, bias in float), and its numerics run in ONNX Runtime without
graph optimizations, which computes exactly what the graph says (float bias included).

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
from edgerepvgg.targets.base import Artifact, check_precision
from edgerepvgg.targets.onnx_graph import INPUT, OUTPUT, build_model, read_metadata, save_onnx, write_onnx
from edgerepvgg.targets.onnxruntime import OnnxRuntimeRunner

log = logging.getLogger(__name__)

NOT_INSTALLED = "TensorRT is not installed (pip install 'edgerepvgg[tensorrt]' on a machine with an NVIDIA GPU)"
ONNX_FILE, PLAN_FILE, SCRIPT_FILE = "model.onnx", "model.plan", "build_engine.sh"
CACHE_FILE, LAYERS_FILE = "timing.cache", "layers.json"

# ---------------------------------------------------------------------------------------------
# TensorRT's explicit-quantization rules, checked on the ONNX graph (runs everywhere)

RULES: dict[str, str] = {
    "int8": "Q/DQ tensors are int8",
    "uint8": "uint8 Q/DQ is not supported by TensorRT (activations are symmetric int8)",
    "symmetric": "zero points are 0 (symmetric quantization)",
    "weight_per_channel": "a conv/gemm weight is quantized per output channel (one scale per output channel)",
    "weight_axis": "a conv/gemm weight is quantized along its output-channel axis (axis 0)",
    "weight_int8_initializer": "a conv/gemm weight DequantizeLinear reads an int8 initializer",
    "activation_per_tensor": "activations are quantized per tensor (one scalar scale)",
    "qdq_inputs": "a quantized conv/gemm has Q/DQ on both its data input and its weight",
    "qdq_pair": "a QuantizeLinear feeds only DequantizeLinear nodes with the same scale and zero point",
    "qdq_on_output": "no QuantizeLinear directly on a conv/gemm output (before the ReLU): it forces a reformat between the fused conv+ReLU",
    "float_bias": "the bias stays float (TensorRT's parser rejects an int32 DequantizeLinear on a bias)",
    "not_quantized": "an INT8 graph quantizes at least one conv/gemm",
}  # fmt: skip

_MATMULS = ("Conv", "Gemm")


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` (a key of ``RULES``), the offending ``node``, and what is wrong."""

    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.detail} [{self.rule}]"


class _Graph:
    """Producers, consumers and constant values of an ONNX graph."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))

    @staticmethod
    def name(node) -> str:
        return node.name or f"<{node.op_type} -> {node.output[0]}>"

    def input(self, node, i: int) -> str | None:
        return node.input[i] if len(node.input) > i and node.input[i] else None

    def const(self, name: str | None) -> np.ndarray | None:
        return None if name is None else self.consts.get(name)

    def made_by(self, name: str | None, op: str):
        node = None if name is None else self.producer.get(name)
        return node if node is not None and node.op_type == op else None


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _qdq_dtype(g: _Graph, node) -> np.dtype | None:
    """The integer type a QuantizeLinear writes or a DequantizeLinear reads (None: unknown)."""
    from onnx import helper

    zp = g.const(g.input(node, 2))
    if zp is not None:
        return zp.dtype
    if node.op_type == "QuantizeLinear":
        out = _attr(node, "output_dtype", 0)  # opset 21; absent: uint8 by the ONNX spec
        return np.dtype(helper.tensor_dtype_to_np_dtype(out)) if out else np.dtype(np.uint8)
    x = g.const(g.input(node, 0))
    if x is not None:
        return x.dtype
    q = g.made_by(g.input(node, 0), "QuantizeLinear")
    return _qdq_dtype(g, q) if q is not None else None


def _check_qdq_node(g: _Graph, node, bias_dqs: set[str]) -> list[Violation]:
    """The per-node rules: integer type, zero point 0, per-tensor activations, Q->DQ pairing."""
    name, out = _Graph.name(node), []
    if node.output[0] in bias_dqs:
        return out  # reported once, as float_bias
    dtype = _qdq_dtype(g, node)
    if dtype == np.uint8:
        out.append(Violation("uint8", name, f"{node.op_type} uses uint8; TensorRT needs symmetric int8"))
    elif dtype is not None and dtype != np.int8:
        out.append(Violation("int8", name, f"{node.op_type} uses {dtype}; TensorRT's explicit quantization needs int8"))
    zp = g.const(g.input(node, 2))
    if zp is not None and np.any(zp.astype(np.int64) != 0):
        out.append(Violation("symmetric", name, f"zero point {zp.ravel()[:4].tolist()} is not 0"))
    weight = node.op_type == "DequantizeLinear" and g.const(g.input(node, 0)) is not None
    scale = g.const(g.input(node, 1))
    if not weight and scale is not None and scale.size != 1:
        out.append(Violation("activation_per_tensor", name, f"an activation {node.op_type} has {scale.size} scales; TensorRT needs one per tensor"))
    if node.op_type == "QuantizeLinear":
        for consumer, _ in g.consumers.get(node.output[0], []):
            if consumer.op_type != "DequantizeLinear":
                out.append(Violation("qdq_pair", name, f"feeds {consumer.op_type} {_Graph.name(consumer)!r}, not a DequantizeLinear"))
                continue
            same = all(np.array_equal(g.const(g.input(node, i)), g.const(g.input(consumer, i))) for i in (1, 2))
            if not same:
                out.append(Violation("qdq_pair", name, f"its DequantizeLinear {_Graph.name(consumer)!r} has another scale or zero point"))
        producer = g.producer.get(g.input(node, 0) or "")
        if producer is not None and producer.op_type in _MATMULS:
            out.append(Violation("qdq_on_output", name, f"quantizes the output of {producer.op_type} {_Graph.name(producer)!r} directly; put Q/DQ on the next layer's input (after the ReLU)"))  # fmt: skip
    return out


def _check_matmul(g: _Graph, node) -> tuple[list[Violation], bool]:
    """Rules on one Conv/Gemm: both inputs quantized or neither, weight per channel on axis 0,
    float bias. Returns the violations and whether the layer is quantized."""
    name, out = _Graph.name(node), []
    data_dq = g.made_by(g.input(node, 0), "DequantizeLinear")
    weight_dq = g.made_by(g.input(node, 1), "DequantizeLinear")
    bias_dq = g.made_by(g.input(node, 2), "DequantizeLinear")
    if bias_dq is not None:
        dtype = _qdq_dtype(g, bias_dq)
        out.append(Violation("float_bias", _Graph.name(bias_dq), f"the bias of {name!r} is dequantized from {dtype or 'integers'}; keep it float (TensorRT's parser rejects it)"))  # fmt: skip
    if (data_dq is None) != (weight_dq is None):
        missing = "data input" if data_dq is None else "weight"
        out.append(Violation("qdq_inputs", name, f"{node.op_type} has Q/DQ on one input but not on its {missing}"))
    if data_dq is not None and g.made_by(g.input(data_dq, 0), "QuantizeLinear") is None and g.const(g.input(data_dq, 0)) is None:
        out.append(Violation("qdq_inputs", _Graph.name(data_dq), f"the data DequantizeLinear of {name!r} is not fed by a QuantizeLinear"))
    if weight_dq is not None:
        out += _check_weight(g, node, weight_dq)
    return out, data_dq is not None and weight_dq is not None


def _check_weight(g: _Graph, node, dq) -> list[Violation]:
    name, out = _Graph.name(dq), []
    w = g.const(g.input(dq, 0))
    if w is None or w.dtype != np.int8:
        what = "a computed tensor" if w is None else f"a {w.dtype} initializer"
        if w is None or w.dtype != np.uint8:  # uint8 is reported by its own rule
            out.append(Violation("weight_int8_initializer", name, f"the weight of {_Graph.name(node)!r} is {what}, not an int8 initializer"))
        if w is None:
            return out
    # Output channels: Conv weight (O, I, kh, kw); Gemm B is (K, N), or (N, K) with transB=1.
    axis_expected = 0 if node.op_type == "Conv" or _attr(node, "transB", 0) else 1
    channels = w.shape[axis_expected] if w.ndim > axis_expected else 1
    scale = g.const(g.input(dq, 1))
    n_scales = 1 if scale is None else scale.size
    if n_scales != channels:
        out.append(Violation("weight_per_channel", name, f"{n_scales} weight scale(s) for {channels} output channels of {_Graph.name(node)!r}; quantize per output channel"))  # fmt: skip
    elif n_scales > 1 or (scale is not None and scale.ndim == 1):
        axis = _attr(dq, "axis", 1)  # DequantizeLinear's default axis is 1
        if axis < 0:
            axis += w.ndim
        if axis != axis_expected:
            out.append(Violation("weight_axis", name, f"per-channel axis {axis}, the output channels of {_Graph.name(node)!r} are on axis {axis_expected}"))  # fmt: skip
    return out


def check_explicit_quantization(model_or_path) -> list[Violation]:
    """Every way a Q/DQ ONNX graph (ModelProto or path) breaks TensorRT's explicit-quantization
    rules (``RULES``); an empty list when TensorRT can build it as written."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    g = _Graph(model)
    violations: list[Violation] = []
    bias_dqs: set[str] = set()
    quantized = 0
    for node in g.nodes:
        if node.op_type in _MATMULS:
            found, is_quantized = _check_matmul(g, node)
            violations += found
            quantized += is_quantized
            bias = g.made_by(g.input(node, 2), "DequantizeLinear")
            if bias is not None:
                bias_dqs.add(bias.output[0])
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            violations += _check_qdq_node(g, node, bias_dqs)
    if quantized == 0:
        violations.append(Violation("not_quantized", model.graph.name or "graph", "no Conv/Gemm has Q/DQ on its inputs; this is not an INT8 graph"))
    return violations


def require_explicit_quantization(model_or_path) -> None:
    """Raise a one-line UserError naming every node that breaks TensorRT's Q/DQ rules."""
    violations = check_explicit_quantization(model_or_path)
    if violations:
        by_rule: dict[str, list[str]] = {}
        for v in violations:
            by_rule.setdefault(v.rule, []).append(v.node)
        parts = [f"{rule} ({RULES[rule]}): {', '.join(_first(nodes, 5))}" for rule, nodes in by_rule.items()]
        raise UserError(f"the Q/DQ graph breaks TensorRT's explicit-quantization rules: {'; '.join(parts)}; "
                        "calibrate for the 'tensorrt' constraint set")  # fmt: skip


def _first(names: list[str], n: int) -> list[str]:
    return names if len(names) <= n else [*names[:n], f"and {len(names) - n} more"]


def quantized_layers(model_or_path) -> list[str]:
    """Names of the Conv/Gemm nodes of a graph with Q/DQ on both data input and weight."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    g = _Graph(model)
    return [_Graph.name(n) for n in g.nodes if n.op_type in _MATMULS and _check_matmul(g, n)[1]]


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
    """Build and serialize the engine with TensorRT's Python API; write the plan, the timing cache
    and the inspector's layer report into ``out_dir``; return facts for the artifact's info."""
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
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(plan)
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
    summary = summarize_layers(report)
    log.info("built %s: %s of %s convolutions in INT8", plan_path, summary["int8_convolutions"], summary["convolutions"])
    return {"tensorrt_version": trt.__version__, "device": torch.cuda.get_device_name(), **summary}


# ---------------------------------------------------------------------------------------------
# Runners


class EmulatedTensorRTRunner(OnnxRuntimeRunner):
    """The Q/DQ graph in ONNX Runtime with graph optimizations off: the integer function TensorRT
    is asked to compute (float bias included), not a TensorRT measurement (``emulated = True``)."""

    emulated = True

    def __init__(self, path: str | Path, threads: int | None = None, optimize: bool = False):
        super().__init__(path, threads, optimize=optimize)


class TensorRTRunner:
    """A serialized engine on a CUDA device; batches above the profile's maximum run in chunks."""

    emulated = False

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
    compiles_without_runtime = True  # the Q/DQ ONNX, its rule check and build_engine.sh need no GPU

    @property
    def runs_here(self) -> bool:
        """False where only the emulation runs here (no TensorRT or no CUDA device)."""
        return self.available() is None

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
                batch: tuple[int, int, int] = (1, 8, 32), workspace_mb: int = 1024) -> Artifact:  # fmt: skip
        """Write the ONNX graph (Q/DQ for int8, checked against TensorRT's rules) and
        ``build_engine.sh``; build the engine too where TensorRT and a GPU are present."""
        check_precision(self, precision, spec)
        options = BuildOptions(tuple(batch), workspace_mb)
        out_dir = Path(out_dir)
        qspec = spec if precision == "int8" else None
        info: dict = {"batch": dict(zip(("min", "opt", "max"), options.batch)), "workspace_mb": workspace_mb,
                      "strongly_typed": strongly_typed(precision)}  # fmt: skip
        if qspec is not None:  # checked before anything is written
            model = build_model(plain, qspec)
            require_explicit_quantization(model)
            onnx_path = save_onnx(model, out_dir / ONNX_FILE)
        else:
            onnx_path = write_onnx(plain, out_dir / ONNX_FILE)
        if qspec is not None:
            info["qdq_check"] = "passed"
            info["graph_quantized_layers"] = len(quantized_layers(onnx_path))
        if precision == "fp16":
            info["note"] = "fp16: FP32 graph built weakly typed with the FP16 builder flag (TensorRT 10.x)"
        cmd = trtexec_command(precision, options.shapes(plain), workspace_mb)
        script = out_dir / SCRIPT_FILE
        write_text_atomic(script, _script(cmd, precision))
        script.chmod(0o755)
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
