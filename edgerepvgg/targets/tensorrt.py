"""TensorRT: explicit quantization from a Q/DQ ONNX graph, honest about where TensorRT is absent.

TensorRT's INT8 calibrators are deprecated (10.1); INT8 engines are built from a Q/DQ ONNX graph
whose scales come from the QuantSpec, in a strongly typed network. What can be checked on any
machine is that graph: :mod:`edgerepvgg.targets.qdq_rules` holds it against TensorRT's rules, and
its numerics run in ONNX Runtime without graph optimizations, which computes exactly what the
graph says (float bias included).

TensorRT 8.5 to 11 differ (DESIGN.md "Target constraints"; the project's TensorRT review cites
the sources): 8.x/9.x refuse int8 weight initializers (the ``qdq`` weight layout: float weights
behind Q -> DQ) and build Q/DQ graphs weakly typed with the INT8 builder flag; 10.x builds them
strongly typed (types from the graph: float layers of a mixed-precision spec are written in FP16);
11 has no FP16/INT8 builder flags and no ``trtexec --fp16``. :func:`graph_for` picks the graph for
a version and :func:`build_flags` the build of a graph on a version (one rule for the Python build
and for trtexec). A version that is not given or installed is taken as >= 10.

``compile`` always writes the ONNX graph, a ready ``build_engine.sh`` (finds trtexec, reads its
version, picks that version's flags) and ``time_engine.sh`` (times the engine into JSON files);
where the ``tensorrt`` package and a CUDA GPU exist it also builds the engine with the Python API
and writes the engine inspector's layer report. Elsewhere the artifact is the ONNX graph, its info
says ``engine_built: False`` and why, and ``load`` returns an emulation marked ``emulated = True``
so that no report passes it off as an engine measurement.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgerepvgg.device import runner as _runner
from edgerepvgg.errors import UserError
from edgerepvgg.io import atomic_path, write_text_atomic
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.spec import QuantSpec
from edgerepvgg.targets.base import Artifact, ArtifactMetadata, check_batch, check_precision
from edgerepvgg.targets.onnx_graph import (
    INPUT,
    OUTPUT,
    WEIGHT_LAYOUTS,
    artifact_metadata,
    build_model,
    read_metadata,
    save_onnx,
    simplify,
)
from edgerepvgg.targets.onnxruntime import OnnxRuntimeRunner
from edgerepvgg.targets.qdq_rules import (  # noqa: F401 -- re-exported: the rules are TensorRT's
    KINDS,
    RULES,
    Violation,
    check_explicit_quantization,
    quantized_layers,
    require_explicit_quantization,
)

log = logging.getLogger(__name__)

NOT_INSTALLED = "TensorRT is not installed (pip install 'edgerepvgg[tensorrt]' on a machine with an NVIDIA GPU)"
ONNX_FILE, PLAN_FILE, SCRIPT_FILE, TIME_SCRIPT_FILE = "model.onnx", "model.plan", "build_engine.sh", "time_engine.sh"
CACHE_FILE, LAYERS_FILE = "timing.cache", "layers.json"
MIN_VERSION = (8, 5)  # JetPack 5.1; older parsers are not supported
DEFAULT_VERSION = "10"  # assumed where none is given and TensorRT is absent
ALIGNMENT = 256  # bytes: IExecutionContext::setTensorAddress ("at least 256-byte alignment", NvInferRuntime.h 10.3)
#: trtexec releases grouped by the command they take: (family, first release, last release or None).
TRTEXEC_FAMILIES = (("8.5", (8, 5), (9, 99)), ("10", (10, 0), (10, 99)), ("11", (11, 0), None))
TRTEXEC_PATHS = _runner.TRTEXEC_PATHS  # JetPack and NGC containers install it here, off PATH (one list: the device runner's)


# ---------------------------------------------------------------------------------------------
# Versions: which graph a release reads, and how it builds it


def parse_version(version: str) -> tuple[int, int]:
    """``"8.6"``, ``"8.6.2.3"``, ``"10"`` -> (major, minor); a UserError for anything else."""
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.[0-9A-Za-z.+-]*)?", str(version).strip())
    if m is None:
        raise UserError(f"TensorRT version {version!r} is not a version such as '8.6' or '10.3'")
    return int(m.group(1)), int(m.group(2) or 0)


def require_supported(version: str) -> tuple[int, int]:
    """(major, minor) of ``version``; a one-line UserError below TensorRT 8.5."""
    v = parse_version(version)
    if v < MIN_VERSION:
        raise UserError(f"TensorRT {version} is too old: edgerepvgg needs TensorRT >= 8.5 (JetPack >= 5.1); upgrade TensorRT or JetPack")
    return v


def installed_version() -> str | None:
    """The version of the ``tensorrt`` package importable here (JetPack's or pip's), else None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001 -- placeholder wheels install but fail in many ways on import
        return None


@dataclass(frozen=True)
class GraphChoice:
    """How the ONNX graph is written for a TensorRT release: the weight layout (``"int8"`` or
    ``"qdq"``) and the dtype of layers that are not quantized (``"fp32"`` or ``"fp16"``)."""

    weight_layout: str
    float_layers: str


def weight_layout_for(version: str | None) -> str:
    """``"qdq"`` (float weights behind Q -> DQ) below TensorRT 10, ``"int8"`` from 10 on and when
    the version is unknown."""
    return "qdq" if version is not None and require_supported(version)[0] < 10 else "int8"


def graph_for(precision: str, version: str | None = None, weight_layout: str | None = None, fp16: bool = True) -> GraphChoice:
    """The graph to write for ``precision`` on TensorRT ``version`` (None: >= 10). ``fp16=False``
    keeps float layers in FP32. INT8 on >= 10 (strongly typed) writes a mixed-precision spec's
    float layers in FP16 (on 8.x/9.x the FP16 builder flag does it); FP16 on 11 (no FP16 flag)
    writes the whole net in FP16."""
    if weight_layout is not None and weight_layout not in WEIGHT_LAYOUTS:
        raise UserError(f"weight layout {weight_layout!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
    major = require_supported(version)[0] if version is not None else int(DEFAULT_VERSION)
    if precision == "int8":
        float_layers = "fp16" if fp16 and major >= 10 else "fp32"
    else:
        float_layers = "fp16" if precision == "fp16" and major >= 11 else "fp32"
    return GraphChoice(weight_layout or weight_layout_for(version), float_layers)


@dataclass(frozen=True)
class BuildFlags:
    """How a release builds a graph: strongly typed or not, and the ``BuilderFlag`` names to set."""

    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()

    def trtexec(self) -> list[str]:
        """The matching trtexec options."""
        return ["--stronglyTyped"] if self.strongly_typed else [f"--{f.lower()}" for f in self.builder_flags]


def build_flags(precision: str, version: str | None, graph: GraphChoice, has_float_layers: bool = False, fp16: bool = True) -> BuildFlags:
    """How TensorRT ``version`` (None: >= 10) builds the graph ``graph`` of ``precision``; a
    one-line UserError where that release cannot build it. 8.x/9.x: weakly typed, the INT8 flag
    for Q/DQ (plus FP16 for a spec's float layers), FP16 for fp16. 10.x: strongly typed, except
    fp16 from an FP32 graph (the FP16 flag, deprecated in 10.12). 11: strongly typed only."""
    major = require_supported(version)[0] if version is not None else int(DEFAULT_VERSION)
    if precision == "int8" and graph.weight_layout == "int8" and major < 10:
        raise UserError(f"TensorRT {major}.x refuses int8 weight initializers: this graph was written for TensorRT >= 10; "
                        "re-export with the 'qdq' weight layout (the device's TensorRT version in the profile)")  # fmt: skip
    strongly = major >= 10 and not (precision == "fp16" and graph.float_layers == "fp32")
    if major >= 11 and not strongly:
        raise UserError(f"TensorRT {major}.x has no FP16 builder flag (strongly typed only): this fp16 graph is FP32; "
                        "re-export it for TensorRT 11, which writes an FP16 graph")  # fmt: skip
    if strongly:
        return BuildFlags(True)
    if precision == "int8":
        return BuildFlags(False, ("INT8", "FP16") if has_float_layers and fp16 else ("INT8",))
    return BuildFlags(False, ("FP16",) if precision == "fp16" else ())

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
        return tuple((b, *s.shape) for b in self.batch)


def strongly_typed(precision: str, version: str | None = None) -> bool:
    """Whether ``precision`` builds strongly typed on ``version`` (None: >= 10) from the graph
    :func:`graph_for` writes there."""
    return build_flags(precision, version, graph_for(precision, version)).strongly_typed


def trtexec_command(precision: str, shapes: tuple[tuple[int, ...], ...], workspace_mb: int, flags: BuildFlags | None = None,
                    trtexec: str = "trtexec") -> list[str]:  # fmt: skip
    """The trtexec arguments that build the same engine as :func:`build_engine` (from ``out_dir``),
    with ``flags`` (default: TensorRT >= 10's). The layer report keeps its formats: trtexec runs
    a few inferences (no ``--skipInference``), so it exports the layers with an execution context."""
    flags = flags or build_flags(precision, None, graph_for(precision))
    dims = ["x".join(map(str, s)) for s in shapes]
    cmd = [trtexec, f"--onnx={ONNX_FILE}", f"--saveEngine={PLAN_FILE}", *flags.trtexec()]
    cmd += [f"--minShapes={INPUT}:{dims[0]}", f"--optShapes={INPUT}:{dims[1]}", f"--maxShapes={INPUT}:{dims[2]}",
            f"--memPoolSize=workspace:{workspace_mb}", f"--timingCacheFile={CACHE_FILE}",
            "--profilingVerbosity=detailed", f"--exportLayerInfo={LAYERS_FILE}",
            "--warmUp=0", "--duration=0", "--iterations=1"]  # fmt: skip
    return cmd


def timing_files(batch: int) -> tuple[str, str]:
    """The JSON files ``time_engine.sh`` writes for ``batch``: (per-inference times, per-layer profile)."""
    return f"trtexec_times_b{batch}.json", f"trtexec_profile_b{batch}.json"


def time_command(batch: int, shape: tuple[int, ...], trtexec: str = "trtexec") -> list[str]:
    """trtexec arguments that time the built engine at ``batch`` and export its times and profile."""
    times, profile = timing_files(batch)
    dims = "x".join(map(str, (batch, *shape[1:])))
    return [trtexec, f"--loadEngine={PLAN_FILE}", f"--shapes={INPUT}:{dims}", "--warmUp=500", "--duration=10",
            "--iterations=100", f"--exportTimes={times}", f"--exportProfile={profile}", "--separateProfileRun"]  # fmt: skip


def read_trtexec_times(path: str | Path, warmup_ms: float = 0.0) -> dict:
    """Summary of a trtexec ``--exportTimes`` JSON (one object per inference): the count and the
    median / p90 / mean of ``computeMs`` (GPU time) and ``latencyMs`` (with host copies). trtexec
    exports its warm-up queries too: pass its ``--warmUp`` (time_engine.sh: 500) to drop them as
    its own summary does. The file is read by the device runner's reader (one parser for both)."""
    try:
        rows = _runner.drop_trtexec_warmup(_runner.trtexec_records(str(path)), warmup_ms)
    except _runner.NativeError as exc:
        raise UserError(str(exc)) from None
    if not rows:
        raise UserError(f"{path} holds only warm-up queries (none started after {warmup_ms:g} ms)")
    out: dict = {"count": len(rows)}
    for key in ("computeMs", "latencyMs"):
        v = np.asarray([float(r[key]) for r in rows if key in r])
        out[key] = {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "mean": float(v.mean())}
    return out


_FIND_TRTEXEC = r"""# trtexec: $TRTEXEC if set, else on PATH, else JetPack's /usr/src/tensorrt/bin.
if [ -z "${TRTEXEC:-}" ]; then
    TRTEXEC=$(command -v trtexec || true)
    for candidate in %(paths)s; do
        if [ -z "$TRTEXEC" ] && [ -x "$candidate" ]; then TRTEXEC=$candidate; fi
    done
fi
if [ -z "$TRTEXEC" ] || [ ! -x "$TRTEXEC" ]; then
    echo "$0: trtexec not found on PATH or in %(paths)s; set TRTEXEC=/path/to/trtexec" >&2
    exit 127
fi
# Its version from the banner every trtexec prints first: [TensorRT v8502] is 8.5.2, [TensorRT v100300] 10.3.0.
v=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9][0-9]*\)\].*/\1/p' | head -n 1)
if [ -z "$v" ]; then
    echo "$0: could not read the TensorRT version of $TRTEXEC" >&2
    exit 1
fi
if [ "$v" -ge 10000 ]; then major=$((v / 10000)); minor=$((v / 100 % 100)); else major=$((v / 1000)); minor=$((v / 100 % 10)); fi
echo "$0: $TRTEXEC is TensorRT $major.$minor" >&2
if [ "$major" -lt 8 ] || { [ "$major" -eq 8 ] && [ "$minor" -lt 5 ]; }; then
    echo "$0: TensorRT $major.$minor is too old: edgerepvgg needs TensorRT >= 8.5 (JetPack >= 5.1)" >&2
    exit 1
fi
"""


def _find_trtexec() -> str:
    return _FIND_TRTEXEC.replace("%(paths)s", " ".join(shlex.quote(p) for p in TRTEXEC_PATHS))


def _quote(cmd: list[str]) -> str:
    return " ".join(['"$TRTEXEC"', *(shlex.quote(c) for c in cmd[1:])])


def _script(commands: dict[str, list[str] | str], precision: str, graph: GraphChoice) -> str:
    """``build_engine.sh``: one trtexec line per family of releases (or the reason that family
    cannot build this graph), picked by the version of the trtexec it finds."""
    lines = [
        "#!/bin/sh",
        f"# Build the TensorRT {precision} engine from {ONNX_FILE} (weights: {graph.weight_layout} layout, float layers: "
        f"{graph.float_layers}) with trtexec, on a machine with TensorRT >= 8.5 and an NVIDIA GPU.",
        f"# Writes {PLAN_FILE}, the timing cache {CACHE_FILE} and the layer report {LAYERS_FILE} (with formats) beside this file;",
        "# extra arguments go to trtexec. Generated by edgerepvgg: the flags per release follow trtexec's own option list.",
        "set -e",
        'cd "$(dirname "$0")"',
        _find_trtexec().rstrip(),
        'case "$major" in',
    ]  # fmt: skip
    for family, lo, hi in TRTEXEC_FAMILIES:
        majors = " | ".join(str(m) for m in range(lo[0], (hi[0] if hi else lo[0]) + 1)) if hi else "*"
        cmd = commands[family]
        if isinstance(cmd, str):
            body = f"echo \"$0: {cmd}\" >&2; exit 1"
        else:
            body = f'exec {_quote(cmd)} "$@"'
        lines.append(f"    {majors}) {body} ;;")
    lines.append("esac")
    return "\n".join(lines) + "\n"


def _time_script(batches: tuple[int, ...], lo: int, hi: int, shape: tuple[int, ...]) -> str:
    """``time_engine.sh``: times ``model.plan`` with trtexec at each batch (default: ``batches``)
    into ``trtexec_times_b<B>.json`` and ``trtexec_profile_b<B>.json`` (and a log)."""
    cmd = time_command(0, shape)
    times, profile = timing_files(0)
    args = " ".join(shlex.quote(c) for c in cmd[1:])
    args = args.replace(f"--shapes={INPUT}:0x", f"--shapes={INPUT}:${{b}}x").replace(times, times.replace("b0", "b${b}"))
    args = args.replace(profile, profile.replace("b0", "b${b}"))
    return "\n".join([
        "#!/bin/sh",
        f"# Time the engine {PLAN_FILE} built by {SCRIPT_FILE} with trtexec, at each batch given (default: {' '.join(map(str, batches))}).",
        "# Writes trtexec_times_b<B>.json (--exportTimes: one record per inference), trtexec_profile_b<B>.json",
        "# (--exportProfile: per layer) and trtexec_time_b<B>.log beside this file, for a later compare to read.",
        "set -e",
        'cd "$(dirname "$0")"',
        _find_trtexec().rstrip(),
        f'[ -f {PLAN_FILE} ] || {{ echo "$0: no {PLAN_FILE} here; run ./{SCRIPT_FILE} first" >&2; exit 1; }}',
        f'[ $# -gt 0 ] || set -- {" ".join(map(str, batches))}',
        'for b in "$@"; do',
        f'    case "$b" in *[!0-9]*|"") echo "$0: batch \"$b\" is not a number" >&2; exit 2 ;; esac',
        f'    if [ "$b" -lt {lo} ] || [ "$b" -gt {hi} ]; then echo "$0: batch $b is outside the engine\'s profile [{lo}, {hi}]" >&2; exit 2; fi',
        f'    "$TRTEXEC" {args} > "trtexec_time_b$b.log" 2>&1 || {{ cat "trtexec_time_b$b.log" >&2; exit 1; }}',
        '    echo "$0: batch $b timed: trtexec_times_b$b.json, trtexec_profile_b$b.json" >&2',
        "done",
    ]) + "\n"  # fmt: skip


def script_commands(precision: str, shapes: tuple[tuple[int, ...], ...], workspace_mb: int, graph: GraphChoice,
                    has_float_layers: bool = False, fp16: bool = True) -> dict[str, list[str] | str]:  # fmt: skip
    """Per family of trtexec releases (``TRTEXEC_FAMILIES``): its command for this graph, or why
    that release cannot build it."""
    out: dict[str, list[str] | str] = {}
    for family, _, _ in TRTEXEC_FAMILIES:
        try:
            flags = build_flags(precision, family, graph, has_float_layers, fp16)
        except UserError as exc:
            out[family] = str(exc).replace('"', "'")
            continue
        out[family] = trtexec_command(precision, shapes, workspace_mb, flags)
    return out


def _timing_cache(config, path: Path):
    """The builder's timing cache: the one at ``path`` if TensorRT accepts it, else a fresh one
    (with a warning: a cache from another GPU or TensorRT version is rejected, not an error)."""
    data = path.read_bytes() if path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
            ok = cache is not None and config.set_timing_cache(cache, False)
        except Exception as exc:  # noqa: BLE001 -- a corrupt cache raises in some releases
            log.debug("timing cache %s: %s", path, exc)
            ok = False
        if ok:
            return cache
        log.warning("TensorRT rejected the timing cache %s (another GPU or TensorRT version?); building with a fresh one, which replaces it", path)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        raise RuntimeError("TensorRT refused a fresh timing cache")
    return cache


def build_engine(onnx_path: Path, out_dir: Path, precision: str, shapes: tuple[tuple[int, ...], ...], workspace_mb: int,
                 flags: BuildFlags | None = None) -> dict:  # fmt: skip
    """Build and serialize the engine with TensorRT's Python API (no torch needed); write the
    timing cache, the inspector's layer report and, last, the plan into ``out_dir``; return facts
    for the info. ``flags`` default to what the installed TensorRT does with :func:`graph_for`'s
    graph; below 8.5 a one-line UserError."""
    import tensorrt as trt

    version = str(trt.__version__)
    major = require_supported(version)[0]
    flags = flags or build_flags(precision, version, graph_for(precision, version))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    kinds = trt.NetworkDefinitionCreationFlag
    if flags.strongly_typed:  # 10.x: opt in; 11: deprecated, every network is strongly typed
        network_flags = 1 << int(kinds.STRONGLY_TYPED) if hasattr(kinds, "STRONGLY_TYPED") else 0
    elif major < 10:  # 8.x/9.x: 0 would be an implicit-batch network, which the ONNX parser refuses
        network_flags = 1 << int(kinds.EXPLICIT_BATCH)
    else:  # 10.x weakly typed: explicit batch is the only kind (EXPLICIT_BATCH deprecated)
        network_flags = 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT {version}'s ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in flags.builder_flags:
        if not hasattr(trt.BuilderFlag, name):
            raise UserError(f"TensorRT {version} has no BuilderFlag.{name}; re-export for this TensorRT version")
        config.set_flag(getattr(trt.BuilderFlag, name))
    cache_path = out_dir / CACHE_FILE
    _timing_cache(config, cache_path)
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
    if not context.set_input_shape(INPUT, shapes[1]):  # concrete shapes, so the report has formats, not "N/A"
        raise RuntimeError(f"TensorRT refused the input shape {shapes[1]} for the layer report")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    report = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    write_text_atomic(out_dir / LAYERS_FILE, json.dumps(report, indent=1))
    with atomic_path(plan_path) as tmp:  # the artifact's entry point: written last
        tmp.write_bytes(plan)
    summary = summarize_layers(report)
    log.info("built %s: %s of %s convolutions in INT8", plan_path, summary["int8_convolutions"], summary["convolutions"])
    return {"tensorrt_version": version, "strongly_typed": flags.strongly_typed, "builder_flags": list(flags.builder_flags), **summary}


# ---------------------------------------------------------------------------------------------
# The referee for float layers in FP16


# ---------------------------------------------------------------------------------------------
# Runners


def is_aligned(address: int) -> bool:
    """Whether a device address meets TensorRT's ``ALIGNMENT`` (256 bytes) for tensor addresses."""
    return address % ALIGNMENT == 0


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
        """Run on the runner's stream for a float32 CUDA tensor ``x`` (N <= max batch, 256-byte
        aligned); returns the output tensor, valid once the stream has finished."""
        torch = self._torch
        if not self.context.set_input_shape(INPUT, tuple(x.shape)):
            raise UserError(f"the engine refuses input shape {tuple(x.shape)} (its profile allows batch 1..{self.max_batch} at its build shape)")
        if not is_aligned(x.data_ptr()):
            raise RuntimeError(f"input at {x.data_ptr():#x} is not {ALIGNMENT}-byte aligned, as TensorRT requires")
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
            chunk = chunk.contiguous()
            if not is_aligned(chunk.data_ptr()):  # a split's offset view: copy it to a fresh allocation
                chunk = chunk.clone()
            outs.append(self.enqueue(chunk))
            self.stream.synchronize()
        return torch.cat(outs).cpu().numpy()

    def latency(self, batch_size: int = 1, warmup: int = 20, runs: int = 100):
        """Engine time per batch from CUDA events on the stream (no host copies): an ``evaluate.Latency``."""
        from edgerepvgg.evaluate import Latency

        torch = self._torch
        if not 1 <= batch_size <= self.max_batch:
            raise UserError(f"latency at batch {batch_size}: the engine's profile allows batch 1..{self.max_batch}; rebuild it for larger batches")
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
    """TensorRT from a Q/DQ ONNX graph. ``version`` is the device's TensorRT (``"8.6"``, ``"10.3"``;
    a profile's ``tensorrt_version``): it picks the weight layout, how float layers are written and
    the build flags; None takes the installed TensorRT's, else >= 10. ``weight_layout`` (``"int8"``
    or ``"qdq"``) overrides the layout; ``fp16_float_layers=False`` keeps a mixed-precision spec's
    float layers in FP32."""

    name = "tensorrt"
    constraint_set = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    description = "TensorRT on an NVIDIA GPU: explicit quantization from Q/DQ ONNX (emulated in ONNX Runtime where TensorRT is absent)"
    supports_fixed_batch = True  # a (b, b, b) optimization profile
    compiles_without_runtime = True  # the Q/DQ ONNX, its rule check and build_engine.sh need no GPU

    def __init__(self, version: str | None = None, weight_layout: str | None = None, fp16_float_layers: bool = True):
        if version is not None:
            require_supported(version)
        if weight_layout is not None and weight_layout not in WEIGHT_LAYOUTS:
            raise UserError(f"weight layout {weight_layout!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
        self._version = None if version is None else str(version)
        self.weight_layout = weight_layout
        self.fp16_float_layers = fp16_float_layers

    @property
    def version(self) -> str | None:
        """The TensorRT version artifacts are written for: the one given, else the installed one."""
        return self._version if self._version is not None else installed_version()

    def available(self) -> str | None:
        """None where the tensorrt package imports and a CUDA device is visible, else why not."""
        if importlib.util.find_spec("tensorrt") is None:
            return NOT_INSTALLED
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # noqa: BLE001 -- placeholder wheels install but fail in many ways on import
            return f"{NOT_INSTALLED}: importing it failed ({type(exc).__name__}: {exc})"
        if not torch.cuda.is_available():
            cpu_build = " (this torch is a CPU-only build; the runner needs a CUDA build)" if torch.version.cuda is None else ""
            return f"no CUDA device visible to torch{cpu_build}: TensorRT builds and runs engines only on an NVIDIA GPU"
        return None

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32", *,
                batch: int | None = None, profile: tuple[int, int, int] = (1, 8, 32),
                workspace_mb: int = 1024) -> Artifact:  # fmt: skip
        """Write ``build_engine.sh``, ``time_engine.sh`` and then the ONNX graph for this target's
        TensorRT version (Q/DQ for int8, checked against that version's rules before anything is
        written); build the engine too where TensorRT and a GPU are present. ``batch`` fixes the
        batch dimension (the profile becomes ``(b, b, b)``); else ``profile`` is the (min, opt,
        max) batch range."""
        check_precision(self, precision, spec)
        check_batch(self, batch)
        options = BuildOptions((batch,) * 3 if batch is not None else tuple(profile), workspace_mb)
        out_dir = Path(out_dir)
        version = self.version
        graph = graph_for(precision, version, self.weight_layout, self.fp16_float_layers)
        has_float = precision == "int8" and any(layer.precision == "float" for layer in spec.layers)
        flags = build_flags(precision, version, graph, has_float, self.fp16_float_layers)
        info: dict = {"batch": dict(zip(("min", "opt", "max"), options.batch)), "workspace_mb": workspace_mb,
                      "tensorrt_version": version, "weight_layout": graph.weight_layout if precision == "int8" else None,
                      "float_layers": graph.float_layers, "strongly_typed": flags.strongly_typed,
                      "builder_flags": list(flags.builder_flags)}  # fmt: skip
        if precision == "int8":
            model = build_model(plain, spec, weight_layout=graph.weight_layout, float_layers=graph.float_layers)
            notes = require_explicit_quantization(model, version)
            info["qdq_check"] = "passed"
            info["qdq_conventions"] = [str(v) for v in notes]
            info["graph_quantized_layers"] = len(quantized_layers(model))
            if has_float:
                how = "FP16 in the graph (strongly typed)" if graph.float_layers == "fp16" else (
                    "FP32 in the graph, FP16 allowed by the builder flag" if "FP16" in flags.builder_flags else "FP32")
                info["note"] = f"mixed precision: float layers run {how}; the referee is IntegerNet(plain, spec, float_layers={graph.float_layers!r})"
        elif graph.float_layers == "fp16":
            model = build_model(plain, float_layers="fp16")
            info["note"] = "fp16: an FP16 graph built strongly typed (TensorRT 11 has no FP16 builder flag)"
        else:
            model = simplify(build_model(plain))
            if precision == "fp16":
                info["note"] = "fp16: FP32 graph built weakly typed with the FP16 builder flag (TensorRT 8.5-10.x)"
        shapes = options.shapes(plain)
        commands = script_commands(precision, shapes, workspace_mb, graph, has_float, self.fp16_float_layers)
        script = out_dir / SCRIPT_FILE
        write_text_atomic(script, _script(commands, precision, graph))
        script.chmod(0o755)
        timer = out_dir / TIME_SCRIPT_FILE
        write_text_atomic(timer, _time_script(tuple(sorted({options.batch[0], options.batch[1]})), options.batch[0], options.batch[2], shapes[0]))
        timer.chmod(0o755)
        onnx_path = save_onnx(model, out_dir / ONNX_FILE)  # without an engine, the entry point: written last
        info["trtexec"] = " ".join(shlex.quote(c) for c in trtexec_command(precision, shapes, workspace_mb, flags))
        info["trtexec_by_release"] = {f: c if isinstance(c, str) else " ".join(shlex.quote(a) for a in c) for f, c in commands.items()}
        info["metadata"] = read_metadata(onnx_path)
        files = [onnx_path, script, timer]

        why = self.available()
        if why is not None:
            log.info("TensorRT engine not built (%s); run %s where it is", why, script)
            info.update({"engine_built": False, "why": why, "emulated": True})
            return Artifact(self.name, precision, onnx_path, tuple(files), info)
        info.update(build_engine(onnx_path, out_dir, precision, shapes, workspace_mb, flags))
        info["device"] = torch.cuda.get_device_name()
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
