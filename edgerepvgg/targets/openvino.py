"""OpenVINO on the CPU: the FP32 or Q/DQ ONNX converted to IR (``model.xml`` + ``model.bin``).

OpenVINO reads our Q/DQ graph as FakeQuantize nodes and its low-precision transformations turn a
conv into an INT8 kernel only when both its input and its weights pass through FakeQuantize; any
other conv silently stays in floating point. So ``compile`` does not assume: it compiles the IR
for this CPU and reads ``runtimePrecision`` of every executed Convolution / FullyConnected from
the compiled model's runtime graph (``u8``/``i8`` = INT8), maps each back to our layer names
(``convs.i``, ``head``) and refuses an INT8 artifact in which a layer the spec quantizes runs in
float. Where every layer does run in INT8, the logits can still differ from ``IntegerNet``'s on
requantization ties: OpenVINO rescales in float32, the referee in float64.

The IR carries the ONNX graph's ``edgerepvgg.*`` metadata in its ``rt_info`` (OpenVINO's ONNX
reader drops ONNX metadata), so :meth:`OpenVINOTarget.metadata` reads it from ``model.xml``.

Every OpenVINO call here goes through one ``ov.Core`` per process (:func:`core`): the CPU plugin
gives the calling thread a new signal stack for each Core and, when Cores are freed in the order
they were made, hands back one it has already unmapped; the next Python signal handler to run
(Ctrl-C, a DataLoader's SIGCHLD) then crashes the process (measured: OpenVINO 2026.4, exit 139).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerepvgg.errors import UserError
from edgerepvgg.io import fsync
from edgerepvgg.machine import host_features
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.spec import QuantSpec
from edgerepvgg.targets.base import Artifact, ArtifactMetadata, check_batch, check_precision
from edgerepvgg.targets.onnx_graph import read_metadata, write_onnx

log = logging.getLogger(__name__)

DEVICE = "CPU"
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
INT8_PRECISIONS = frozenset({"u8", "i8"})
# Runtime node types that carry a layer's arithmetic (grouped convs are "Convolution" too on CPU).
_COMPUTE_TYPES = frozenset({"Convolution", "GroupConvolution", "FullyConnected", "MatMul"})
_HEAD_TYPES = frozenset({"FullyConnected", "MatMul"})
_LAYER_NAME = re.compile(r"^(convs\.\d+|head)$")
_RT_INFO = "edgerepvgg"  # rt_info section of the IR holding the ONNX graph's edgerepvgg.* metadata


@functools.cache
def core() -> Any:
    """The process's one ``openvino.Core``, kept for the life of the process (see the module's
    docstring: a Core freed in creation order leaves the thread a dead signal stack)."""
    import openvino as ov

    return ov.Core()


def compile_config(threads: int | None, hint: str) -> dict[str, Any]:
    """compile_model properties: the performance hint, threads, and f32 inference precision
    (on CPUs with bf16/fp16 OpenVINO would otherwise lower FP32 layers on its own)."""
    if hint not in HINTS:
        raise UserError(f"unknown OpenVINO performance hint {hint!r}; choose one of {', '.join(HINTS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    config: dict[str, Any] = {"PERFORMANCE_HINT": HINTS[hint], "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


@dataclass(frozen=True)
class Coverage:
    """What OpenVINO really executes: each conv/head layer (execution order) with its runtime
    precision, as read from the compiled model's runtime graph."""

    precisions: dict[str, str]  # layer name ("convs.3", "head") -> runtimePrecision ("u8", "f32"...)

    @property
    def convs(self) -> list[str]:
        return [n for n in self.precisions if n != "head"]

    @property
    def int8_convs(self) -> list[str]:
        return [n for n in self.convs if self.is_int8(n)]

    @property
    def float_convs(self) -> list[str]:
        return [n for n in self.convs if not self.is_int8(n)]

    def is_int8(self, name: str) -> bool:
        return self.precisions[name].lower() in INT8_PRECISIONS

    def to_info(self) -> dict[str, Any]:
        return {"convs": len(self.convs), "int8_convs": len(self.int8_convs), "float_convs": self.float_convs,
                "head_int8": "head" in self.precisions and self.is_int8("head"),
                "runtime_precisions": dict(self.precisions)}  # fmt: skip


def _layer_name(node_name: str, original: str) -> str | None:
    """Our layer name for a runtime node: its friendly name or one of the original layers it
    fused, up to the first '/' ("convs.3/WithoutBiases" -> "convs.3")."""
    for candidate in [node_name, *original.split(",")]:
        stem = candidate.strip().split("/", 1)[0]
        if _LAYER_NAME.match(stem):
            return stem
    return None


def runtime_coverage(compiled) -> Coverage:
    """Read the executed convolutions and the head, with their runtime precisions, from an
    ``openvino.CompiledModel``. A FullyConnected/MatMul that kept no name of ours (OpenVINO names
    the last node after the graph output, e.g. "logits") is the head."""
    precisions: dict[str, str] = {}
    unnamed_heads: list[str] = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer_type not in _COMPUTE_TYPES:
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
        original = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        name = _layer_name(op.get_friendly_name(), original)
        if name is None and layer_type in _HEAD_TYPES:
            unnamed_heads.append(precision)
            continue
        name = name or op.get_friendly_name()
        if name in precisions:
            raise RuntimeError(f"OpenVINO's runtime model has two compute nodes for {name}; cannot map its precisions")
        precisions[name] = precision
    if len(unnamed_heads) == 1 and "head" not in precisions:
        precisions["head"] = unnamed_heads[0]
    elif unnamed_heads:
        raise RuntimeError(f"OpenVINO's runtime model has {len(unnamed_heads)} unnamed FullyConnected/MatMul nodes; cannot tell which is the head")
    return Coverage(precisions)


def int8_coverage(model_path: str | Path, threads: int | None = None) -> Coverage:
    """Compile ``model_path`` (IR .xml or ONNX) for this CPU and report what runs in INT8."""
    compiled = core().compile_model(core().read_model(str(model_path)), DEVICE, compile_config(threads, "latency"))
    return runtime_coverage(compiled)


def check_int8(coverage: Coverage, spec: QuantSpec | Iterable[str], where: str = "") -> None:
    """Raise ``UserError`` naming every layer that ``spec`` quantizes (or every name given) but
    OpenVINO runs in floating point, or that the runtime model does not contain at all."""
    expected = [l.name for l in spec.layers if l.precision != "float"] if isinstance(spec, QuantSpec) else list(spec)
    missing = [n for n in expected if n not in coverage.precisions]
    if missing:
        raise UserError(f"OpenVINO's compiled model has no convolution for {', '.join(missing)}; "
                        f"the IR does not match the spec{where}")  # fmt: skip
    floating = [n for n in expected if not coverage.is_int8(n)]
    if floating:
        n_convs, n_float_convs = len(coverage.convs), sum(n != "head" for n in floating)
        head = " and the head" if "head" in floating else ""
        detail = ", ".join(f"{n} ({coverage.precisions[n]})" for n in floating)
        raise UserError(f"OpenVINO runs {n_float_convs} of {n_convs} convolutions{head} in floating point although the spec "
                        f"quantizes them: {detail}; each needs FakeQuantize on both its input and its weights{where}")  # fmt: skip


class OpenVINORunner:
    """A compiled IR behind the runner call; one infer request, reshaped to each batch size."""

    emulated: bool = False

    def __init__(self, xml: str | Path, threads: int | None = None, hint: str = "latency"):
        self.config = compile_config(threads, hint)
        self.compiled = core().compile_model(core().read_model(str(xml)), DEVICE, self.config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        if x.ndim != 4:
            raise UserError(f"the runner takes NCHW batches, got shape {x.shape}")
        return np.array(self.request.infer({0: x})[self.output], np.float32, copy=True)


class OpenVINOTarget:
    name = "openvino"
    constraint_set = "openvino"
    precisions = ("fp32", "int8")
    description = "OpenVINO IR on the CPU (INT8 through FakeQuantize; per-layer INT8 coverage checked)"
    supports_fixed_batch = True
    compiles_without_runtime = False

    def available(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return f"openvino is not importable ({exc}); pip install 'edgerepvgg[openvino]'"
        try:
            devices = core().available_devices
        except RuntimeError as exc:
            return f"OpenVINO cannot list its devices ({str(exc).splitlines()[0]}); reinstall openvino"
        if DEVICE not in devices:
            return f"OpenVINO finds no CPU device (devices: {', '.join(devices) or 'none'}); reinstall openvino with its CPU plugin"
        return None

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32", *,
                batch: int | None = None) -> Artifact:  # fmt: skip
        """Write ``model.onnx`` and the IR pair ``model.xml``/``model.bin`` (batch dynamic, or fixed
        to ``batch``); for INT8, refuse an IR in which OpenVINO would run a quantized layer in float."""
        import openvino as ov

        check_precision(self, precision, spec)
        check_batch(self, batch)
        spec = spec if precision == "int8" else None
        if spec is not None:
            self._warn_constraints(spec)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = write_onnx(plain, out_dir / "model.onnx", spec, batch)
        xml, bin_ = out_dir / "model.xml", out_dir / "model.bin"
        tmp_dir = Path(tempfile.mkdtemp(prefix=".model.ir.", dir=out_dir))
        try:
            tmp_xml = tmp_dir / "model.xml"
            model = ov.convert_model(str(onnx_path))
            for key, value in read_metadata(onnx_path).items():
                model.set_rt_info(value, [_RT_INFO, key])
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
            coverage = int8_coverage(tmp_xml)
            if spec is not None:
                check_int8(coverage, spec, f" (ONNX kept for inspection: {onnx_path})")
            # The xml is the artifact's entry point: it goes away first and comes back last, so a
            # crash at any moment leaves either no model.xml or a complete, matching pair.
            for f in (tmp_xml, tmp_dir / "model.bin"):
                fsync(f)
            xml.unlink(missing_ok=True)
            os.replace(tmp_dir / "model.bin", bin_)
            os.replace(tmp_xml, xml)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        info = {**coverage.to_info(), "ir": str(xml), "onnx": str(onnx_path), "openvino": ov.__version__,
                "metadata": read_metadata(onnx_path)}  # fmt: skip
        log.info("wrote %s: %d of %d convolutions run in INT8 on this CPU", xml, info["int8_convs"], info["convs"])
        return Artifact(self.name, precision, xml, (xml, bin_), info)  # the ONNX it came from: info['onnx']

    def load(self, artifact: Artifact, threads: int | None = None, hint: str = "latency") -> OpenVINORunner:
        """A runner for the IR on this CPU: ``hint`` is "latency" or "throughput"; FP32 stays f32."""
        if not Path(artifact.path).is_file():
            raise UserError(f"no OpenVINO IR at {artifact.path}; compile it first")
        return OpenVINORunner(artifact.path, threads, hint)

    def metadata(self, artifact: Artifact) -> ArtifactMetadata:
        """The ONNX graph's ``edgerepvgg.*`` metadata, read from the IR's ``rt_info``."""
        model = core().read_model(str(artifact.path))
        props = {}
        if model.has_rt_info(_RT_INFO):
            props = {key: value.astype(str) for key, value in model.get_rt_info(_RT_INFO).astype(dict).items()}
        return ArtifactMetadata.from_props(props, artifact.path)

    @staticmethod
    def _warn_constraints(spec: QuantSpec) -> None:
        """Say so when the spec was made for another integer scheme, or gives the first conv 8-bit
        weights on a CPU that may lack VNNI (measured: the first conv's products saturate there)."""
        if not spec.constraints.name.startswith("openvino"):
            log.warning("the QuantSpec was calibrated for %r, not 'openvino' (u8 activations); OpenVINO runs it, "
                        "but recalibrate with constraints 'openvino' for its native scheme", spec.constraints.name)  # fmt: skip
        quantized = [l for l in spec.layers if l.precision != "float"]
        first = quantized[0].weight.scheme.bits if quantized and quantized[0] is spec.layers[0] else 0
        features = host_features()  # OpenVINO runs the IR here, so this CPU's kernels matter
        if first <= 7 or not features.is_x86 or features.vnni:
            return
        if features.vnni is None:
            log.warning("cannot tell whether this CPU has VNNI (%s): if it has none, the first conv's %d-bit weights can "
                        "saturate in its int16 intermediate; 7 bits there are exact", features.describe(), first)  # fmt: skip
        else:
            log.warning("this CPU has no VNNI: the first conv's %d-bit weights can saturate in its int16 intermediate; "
                        "recalibrate for this CPU (constraints_for gives its first conv 7-bit weights here)", first)  # fmt: skip
