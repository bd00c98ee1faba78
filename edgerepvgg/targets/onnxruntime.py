"""ONNX Runtime on the CPU execution provider: the reference runtime for FP32 and Q/DQ graphs."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.spec import QuantSpec
from edgerepvgg.targets.base import Artifact, ArtifactMetadata, check_batch, check_precision
from edgerepvgg.targets.onnx_graph import INPUT, artifact_metadata, read_metadata, write_onnx

log = logging.getLogger(__name__)


class OnnxRuntimeRunner:
    """An InferenceSession behind the runner call. ``optimize=False`` runs the graph node by node
    (Q/DQ nodes as written, float convolutions): slow, but it computes exactly what the graph
    says, e.g. TensorRT's float bias, which ORT's Q/DQ fusion would round to int32."""

    emulated: bool = False

    def __init__(self, path: str | Path | bytes, threads: int | None = None, optimize: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3  # warnings about hardware-specific fusions are not ours to act on
        model = path if isinstance(path, bytes) else str(path)  # a file, or a serialized ModelProto
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT: np.ascontiguousarray(batch, np.float32)})[0]


class OnnxRuntimeTarget:
    name = "onnxruntime"
    constraint_set = "onnxruntime"
    precisions = ("fp32", "int8")
    description = "ONNX Runtime, CPU execution provider (reference for Q/DQ graphs)"
    supports_fixed_batch = True
    compiles_without_runtime = False

    def available(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return ("onnxruntime is not installed; pip install 'edgerepvgg[onnxruntime]' "
                    "(or any ONNX Runtime build: onnxruntime-gpu, onnxruntime-openvino)")
        return None

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32", *,
                batch: int | None = None) -> Artifact:  # fmt: skip
        """Write ``model.onnx``: the FP32 graph, or the Q/DQ graph under ``spec``; ``batch`` fixes
        the batch dimension (dynamic by default)."""
        check_precision(self, precision, spec)
        check_batch(self, batch)
        path = write_onnx(plain, Path(out_dir) / "model.onnx", spec if precision == "int8" else None, batch)
        return Artifact(self.name, precision, path, (path,), {"metadata": read_metadata(path)})

    def load(self, artifact: Artifact, threads: int | None = None) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(artifact.path, threads)

    def metadata(self, artifact: Artifact) -> ArtifactMetadata:
        return artifact_metadata(artifact.path)
