"""PlainNet (+ QuantSpec) -> ONNX: the FP32 graph and the Q/DQ INT8 graph, from one writer.

The graph is written node by node from PlainNet rather than traced, so that every node is named
after the layer it computes (``convs.3``, ``convs.3.input.q``...) and a backend's layer report can
be mapped back to the spec. The FP32 graph is what ``torch.onnx.export`` + onnxsim give for a
PlainNet (Conv, Relu, GlobalAveragePool, Flatten, Gemm; tests pin the two equal); the INT8 graph
adds TensorRT's explicit-quantization placement, which ONNX Runtime and OpenVINO read too:

- a QuantizeLinear/DequantizeLinear pair on the input of every conv and of the head (per tensor,
  the spec's scale and zero point), and on the last ReLU's output (``pool``);
- weights per output channel (axis 0, zero point 0) in one of two layouts (``WEIGHT_LAYOUTS``):
  ``"int8"``, integers behind a DequantizeLinear (TensorRT >= 10, ONNX Runtime, OpenVINO), or
  ``"qdq"``, the float weights ``q * s`` behind a QuantizeLinear -> DequantizeLinear pair (what
  TensorRT 8.x parses; ModelOpt's and pytorch-quantization's default). ``q * s`` in float32
  re-quantizes to exactly ``q`` (the writer checks it), so both layouts compute one function;
- the bias in float where the constraint set keeps it float (TensorRT), else as int32 behind a
  DequantizeLinear with scale ``s_in * s_w`` (what the integer kernels add; ``IntegerNet`` too);
- logits quantized only where the constraint set's head emits integers (``spec.output``).

Layers the spec keeps in float (mixed precision) get no quantizers at all; with
``float_layers="fp16"`` they are written in FP16 (FP16 weights and bias between two Casts), which
is how a strongly typed TensorRT network runs them in FP16 (ModelOpt writes them so too).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from edgerepvgg.errors import UserError, install_hint, missing
from edgerepvgg.io import atomic_path
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.emulate import quantize
from edgerepvgg.quant.spec import QuantSpec, TensorQuant, model_hash, require_spec_for
from edgerepvgg.targets.base import ArtifactMetadata

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "input", "logits"
WEIGHT_LAYOUTS = ("int8", "qdq")  # int8 initializer -> DQ; float initializer -> Q -> DQ
FLOAT_LAYER_DTYPES = ("fp32", "fp16")
METADATA_KEYS = ("edgerepvgg.input_spec", "edgerepvgg.model_hash", "edgerepvgg.quant_spec_sha256",
                 "edgerepvgg.constraints", "edgerepvgg.precision")  # fmt: skip


def _dtype(q: TensorQuant) -> np.dtype:
    """int8 / uint8 for grids up to 8 bits; ONNX QuantizeLinear saturates to the full 8-bit range,
    so narrower activation grids could not be expressed without extra clipping and are refused."""
    if q.scheme.bits > 8:
        raise UserError(f"ONNX Q/DQ (opset {OPSET}) holds at most 8-bit integers, the spec asks for {q.scheme.bits}; recalibrate with 8 bits")
    return np.dtype(np.int8 if q.scheme.signed else np.uint8)


def requantizable_weight(wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weights ``wq * scale`` (per output channel, axis 0) that ONNX QuantizeLinear
    (``round_half_even(w / scale)`` in float32) maps back to exactly ``wq``; raises if any would
    not (it cannot happen for 8-bit integers and positive float32 scales, and is checked anyway)."""
    s = scale.astype(np.float32).reshape(-1, *([1] * (wq.ndim - 1)))
    wf = (wq.astype(np.float32) * s).astype(np.float32)
    back = np.round(wf / s)  # numpy rounds half to even, as QuantizeLinear
    if not np.array_equal(back, wq.astype(np.float32)):
        raise UserError(f"{int((back != wq).sum())} weights would not re-quantize to their integers in float32; use the int8 weight layout")
    return wf


class _Builder:
    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        output = output or name
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def qdq(self, x: str, q: TensorQuant, name: str) -> str:
        """Per-tensor QuantizeLinear -> DequantizeLinear on activation ``x``."""
        scale = self.const(f"{name}.scale", np.array(q.scale[0], np.float32))
        zp = self.const(f"{name}.zero_point", np.array(q.zero_point[0], _dtype(q)))
        xq = self.node("QuantizeLinear", [x, scale, zp], f"{name}.q")
        return self.node("DequantizeLinear", [xq, scale, zp], f"{name}.dq")

    def weight(self, name: str, w: torch.Tensor, q: TensorQuant | None, layout: str = "int8", fp16: bool = False) -> str:
        """Float weight (FP16 with ``fp16``), or a weight quantized per output channel (axis 0):
        integers behind a DequantizeLinear (``layout="int8"``) or the float32 values ``q * s``
        behind a QuantizeLinear -> DequantizeLinear pair (``layout="qdq"``)."""
        if q is None:
            return self.const(name, w.detach().numpy().astype(np.float16 if fp16 else np.float32))
        wq = quantize(w.detach().double(), q, "half_even", axis=0).numpy().astype(_dtype(q))
        scale = np.asarray(q.scale, np.float32)
        self.const(f"{name}.scale", scale)
        self.const(f"{name}.zero_point", np.zeros(len(q.scale), _dtype(q)))
        if layout == "int8":
            self.const(f"{name}.int", wq)
            return self.node("DequantizeLinear", [f"{name}.int", f"{name}.scale", f"{name}.zero_point"], f"{name}.dq", axis=0)
        wf = requantizable_weight(wq, scale)
        self.const(f"{name}.float", wf)
        wq_node = self.node("QuantizeLinear", [f"{name}.float", f"{name}.scale", f"{name}.zero_point"], f"{name}.q", axis=0)
        return self.node("DequantizeLinear", [wq_node, f"{name}.scale", f"{name}.zero_point"], f"{name}.dq", axis=0)

    def cast(self, x: str, to: str, name: str) -> str:
        from onnx import TensorProto

        return self.node("Cast", [x], name, to=TensorProto.FLOAT16 if to == "fp16" else TensorProto.FLOAT)

    def bias(self, name: str, b: torch.Tensor, s_in: float | None, s_w: tuple[float, ...] | None, fp16: bool = False) -> str:
        """Float bias (FP16 with ``fp16``), or the int32 bias ``round(b / (s_in * s_w))`` behind a DequantizeLinear."""
        if s_in is None:
            return self.const(name, b.detach().numpy().astype(np.float16 if fp16 else np.float32))
        s = s_in * np.asarray(s_w, np.float64)
        bq = np.round(b.detach().double().numpy() / s)  # half to even, as IntegerNet
        if np.abs(bq).max(initial=0) >= 2**31:
            raise UserError(f"{name}: the int32 bias overflows (scales too small); recalibrate")
        self.const(f"{name}.int", bq.astype(np.int32))
        self.const(f"{name}.scale", s.astype(np.float32))
        self.const(f"{name}.zero_point", np.zeros(len(s), np.int32))
        return self.node("DequantizeLinear", [f"{name}.int", f"{name}.scale", f"{name}.zero_point"], f"{name}.dq", axis=0)


def build_model(plain: PlainNet, spec: QuantSpec | None = None, batch: int | None = None, *,
                weight_layout: str = "int8", float_layers: str = "fp32"):  # fmt: skip
    """The ONNX ModelProto of ``plain``: FP32, or Q/DQ INT8 under ``spec``. ``batch=None`` makes
    the batch dimension dynamic; an int fixes it (some runtimes build faster for a fixed shape).
    ``weight_layout`` is one of ``WEIGHT_LAYOUTS`` (how quantized weights are stored);
    ``float_layers="fp16"`` writes every layer that is not quantized (all of them without a spec)
    in FP16 between Casts, the graph's inputs and outputs staying float32."""
    from onnx import TensorProto, checker, helper

    if weight_layout not in WEIGHT_LAYOUTS:
        raise UserError(f"weight layout {weight_layout!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
    if float_layers not in FLOAT_LAYER_DTYPES:
        raise UserError(f"float layers {float_layers!r} is not one of {', '.join(FLOAT_LAYER_DTYPES)}")
    if spec is not None:
        require_spec_for(plain, spec)
    b = _Builder()
    fp16 = float_layers == "fp16"
    int_bias = spec is not None and spec.constraints.int_bias
    x = INPUT
    for i, conv in enumerate(plain.convs):
        name = f"convs.{i}"
        layer = spec.layers[i] if spec is not None else None
        quantized = layer is not None and layer.precision != "float"
        half = fp16 and not quantized
        if quantized:
            x = b.qdq(x, layer.input, f"{name}.input")
        elif half:
            x = b.cast(x, "fp16", f"{name}.input.cast")
        w = b.weight(f"{name}.weight", conv.weight, layer.weight if quantized else None, weight_layout, half)
        bias = b.bias(f"{name}.bias", conv.bias, *((layer.input.scale[0], layer.weight.scale) if quantized and int_bias else (None, None)), fp16=half)
        x = b.node("Conv", [x, w, bias], name, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[conv.stride[0]] * 2, group=conv.groups)
        x = b.node("Relu", [x], f"{name}.relu")
        if half:
            x = b.cast(x, "fp32", f"{name}.output.cast")
    if spec is not None:
        x = b.qdq(x, spec.pool, "pool")
    x = b.node("GlobalAveragePool", [x], "pool.gap")
    x = b.node("Flatten", [x], "pool.flatten", axis=1)
    head = spec.layers[-1] if spec is not None else None
    quantized = head is not None and head.precision != "float"
    half = fp16 and not quantized
    if quantized:
        x = b.qdq(x, head.input, "head.input")
    elif half:
        x = b.cast(x, "fp16", "head.input.cast")
    w = b.weight("head.weight", plain.head.weight, head.weight if quantized else None, weight_layout, half)
    bias = b.bias("head.bias", plain.head.bias, *((head.input.scale[0], head.weight.scale) if quantized and int_bias else (None, None)), fp16=half)
    out = "head.out" if (spec is not None and spec.output is not None) or half else OUTPUT
    x = b.node("Gemm", [x, w, bias], "head", output=out, transB=1)
    if half:
        x = b.cast(x, "fp32", "head.output.cast")
    if spec is not None and spec.output is not None:
        x = b.qdq(x, spec.output, "output")
    if x != OUTPUT:
        b.node("Identity", [x], "output", output=OUTPUT)

    s = plain.input_spec
    n = "batch" if batch is None else batch
    graph = helper.make_graph(
        b.nodes, plain.name or "plain",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, *s.shape])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [n, plain.num_classes])],
        b.inits,
    )  # fmt: skip
    model = helper.make_model(graph, producer_name="edgerepvgg", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # opset 17's IR; readable by every runtime we target
    meta = {
        "edgerepvgg.input_spec": json.dumps(s.to_dict()),
        "edgerepvgg.model_hash": model_hash(plain),
        "edgerepvgg.precision": "int8" if spec is not None else "fp32",
    }
    if spec is not None:
        meta["edgerepvgg.quant_spec_sha256"] = spec.sha256
        meta["edgerepvgg.constraints"] = spec.constraints.name
    helper.set_model_props(model, meta)
    checker.check_model(model, full_check=True)
    return model


def simplify(model):
    """Run onnxsim on an FP32 graph (with its numeric self-check); Q/DQ graphs are left alone,
    because constant folding would fold the weight DequantizeLinear nodes TensorRT needs."""
    if missing("onnxsim"):  # optional: the graph is written node by node and has nothing to fold
        log.info("not simplifying the FP32 graph: %s", install_hint("onnxsim", "cpu"))
        return model
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's check failed on the FP32 graph")
    return simplified


def write_onnx(plain: PlainNet, path: str | Path, spec: QuantSpec | None = None, batch: int | None = None) -> Path:
    """Write the FP32 (simplified) or Q/DQ INT8 graph of ``plain`` to ``path`` atomically."""
    model = build_model(plain, spec, batch)
    return save_onnx(simplify(model) if spec is None else model, path)


def save_onnx(model, path: str | Path) -> Path:
    """Write a ModelProto from :func:`build_model` to ``path`` atomically."""
    import onnx

    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    log.info("wrote %s (%s, %.1f MB)", path, read_metadata(model).get("edgerepvgg.precision", "?"), path.stat().st_size / 1e6)
    return path


def read_metadata(path_or_model) -> dict[str, str]:
    """The edgerepvgg metadata of an ONNX file or ModelProto."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, Path)) else path_or_model
    return {p.key: p.value for p in model.metadata_props}


def artifact_metadata(path: str | Path) -> ArtifactMetadata:
    """The model hash, QuantSpec sha256 and input spec embedded in the ONNX file at ``path``."""
    return ArtifactMetadata.from_props(read_metadata(path), path)
