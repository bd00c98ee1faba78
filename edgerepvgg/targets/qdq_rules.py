"""TensorRT's explicit-quantization rules, and this project's conventions, checked on a Q/DQ ONNX
graph: pure ONNX, no TensorRT.

TensorRT builds INT8 engines from Q/DQ ONNX graphs (its calibrators are deprecated since 10.1).
:func:`check_explicit_quantization` lists every finding by node on any machine, each with its
``kind``: ``"tensorrt"`` for what TensorRT's ONNX parser or builder refuses or mis-computes
(uint8 or asymmetric Q/DQ, per-channel activations, an int32 bias DequantizeLinear, an int8 weight
initializer on TensorRT 8.x...), ``"convention"`` for what this project does by choice and
TensorRT accepts (per-channel weights, Q/DQ on both inputs of every conv, none on conv outputs;
ModelOpt's and pytorch-quantization's placement too). Only ``"tensorrt"`` findings fail an export
(:func:`require_explicit_quantization`); conventions are notes.

Sources per rule: onnx-tensorrt's QuantDequantLinearHelper (8.5-GA..10.x: zero point all zeros,
no UINT8, scales per output channel), TensorRT's ``IDequantizeLayer`` docs ("Activations cannot be
quantized per-channel"; per-tensor weights allowed), onnx/onnx-tensorrt#850 (int32 bias), and
onnxruntime#14229 / TensorRT#2163 (TensorRT 8.x: "only activation types allowed as input"), as
collected in the project's TensorRT review.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerepvgg.errors import UserError

__all__ = ["CONVENTION", "KINDS", "RULES", "TENSORRT", "Violation", "check_explicit_quantization", "quantized_layers",
           "require_explicit_quantization"]  # fmt: skip

log = logging.getLogger(__name__)

TENSORRT, CONVENTION = "tensorrt", "convention"

RULES: dict[str, str] = {
    "int8": "Q/DQ tensors are int8",
    "uint8": "uint8 Q/DQ is not supported by TensorRT (activations are symmetric int8)",
    "symmetric": "zero points are 0 (symmetric quantization)",
    "activation_per_tensor": "activations are quantized per tensor (one scalar scale)",
    "weight_axis": "per-channel weight scales lie on the output-channel axis (axis 0; 1 for a Gemm without transB)",
    "qdq_pair": "a QuantizeLinear feeds DequantizeLinear nodes only",
    "float_bias": "the bias stays float (TensorRT's parser rejects an int32 DequantizeLinear on a bias)",
    "weight_int8_initializer_trt8": "TensorRT 8.x refuses an int8 initializer fed straight into DequantizeLinear; "
                                    "store float weights behind QuantizeLinear -> DequantizeLinear",
    # This project's conventions (valid TensorRT layouts, kept for accuracy or speed):
    "weight_per_channel": "a conv/gemm weight is quantized per output channel (one scale per output channel)",
    "weight_layout": "a conv/gemm weight is a constant: an int8 initializer behind a DequantizeLinear, or a float "
                     "initializer behind QuantizeLinear -> DequantizeLinear",
    "qdq_same_scale": "a QuantizeLinear and its DequantizeLinear share scale and zero point",
    "qdq_inputs": "a quantized conv/gemm has Q/DQ on both its data input and its weight",
    "qdq_on_output": "no QuantizeLinear directly on a conv/gemm output (before the ReLU): it forces a reformat between the fused conv+ReLU",
    "not_quantized": "an INT8 graph quantizes at least one conv/gemm",
}  # fmt: skip

#: What each rule is: TensorRT's own rule, or this project's convention.
KINDS: dict[str, str] = {rule: CONVENTION for rule in ("weight_per_channel", "weight_layout", "qdq_same_scale", "qdq_inputs",
                                                       "qdq_on_output", "not_quantized")}  # fmt: skip
KINDS.update({rule: TENSORRT for rule in RULES if rule not in KINDS})

_MATMULS = ("Conv", "Gemm")


@dataclass(frozen=True)
class Violation:
    """One finding: ``rule`` (a key of ``RULES``), the offending ``node``, what is wrong, and its
    ``kind`` (``"tensorrt"``: TensorRT refuses it; ``"convention"``: this project's choice only),
    taken from ``KINDS`` when not given."""

    rule: str
    node: str
    detail: str
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", KINDS[self.rule])
        if self.kind not in (TENSORRT, CONVENTION):
            raise ValueError(f"a Violation's kind is {TENSORRT!r} or {CONVENTION!r}, got {self.kind!r}")

    @property
    def tensorrt(self) -> bool:
        """True for a TensorRT rule (the graph fails or mis-computes there), False for a convention."""
        return self.kind == TENSORRT

    def __str__(self) -> str:
        what = self.rule if self.tensorrt else f"{self.rule}, convention"
        return f"{self.node}: {self.detail} [{what}]"


class _OnnxIndex:
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


def _qdq_dtype(g: _OnnxIndex, node) -> np.dtype | None:
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


def _weight_source(g: _OnnxIndex, dq) -> tuple[str | None, np.ndarray | None, object]:
    """How the weight DequantizeLinear ``dq`` gets its integers: ``("int8", array, None)`` for an
    initializer read directly, ``("qdq", float array, q)`` for a constant float weight behind the
    QuantizeLinear ``q``, ``(None, None, None)`` for a computed tensor."""
    w = g.const(g.input(dq, 0))
    if w is not None:
        return "int8", w, None
    q = g.made_by(g.input(dq, 0), "QuantizeLinear")
    if q is not None:
        wf = g.const(g.input(q, 0))
        if wf is not None:
            return "qdq", wf, q
    return None, None, None


def _is_weight_qdq(g: _OnnxIndex, node) -> bool:
    """A Q/DQ node on a constant (a weight): a DQ reading an initializer or a Q on a constant,
    a DQ after a Q on a constant."""
    if g.const(g.input(node, 0)) is not None:
        return True
    q = g.made_by(g.input(node, 0), "QuantizeLinear") if node.op_type == "DequantizeLinear" else None
    return q is not None and g.const(g.input(q, 0)) is not None


def _check_qdq_node(g: _OnnxIndex, node, bias_dqs: set[str]) -> list[Violation]:
    """The per-node rules: integer type, zero point 0, per-tensor activations, Q->DQ pairing."""
    name, out = _OnnxIndex.name(node), []
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
    scale = g.const(g.input(node, 1))
    if not _is_weight_qdq(g, node) and scale is not None and scale.size != 1:
        out.append(Violation("activation_per_tensor", name, f"an activation {node.op_type} has {scale.size} scales; TensorRT needs one per tensor"))
    if node.op_type == "QuantizeLinear":
        for consumer, _ in g.consumers.get(node.output[0], []):
            if consumer.op_type != "DequantizeLinear":
                out.append(Violation("qdq_pair", name, f"feeds {consumer.op_type} {_OnnxIndex.name(consumer)!r}, not a DequantizeLinear"))
                continue
            same = all(np.array_equal(g.const(g.input(node, i)), g.const(g.input(consumer, i))) for i in (1, 2))
            if not same:
                out.append(Violation("qdq_same_scale", name, f"its DequantizeLinear {_OnnxIndex.name(consumer)!r} has another scale or zero point"))
        producer = g.producer.get(g.input(node, 0) or "")
        if producer is not None and producer.op_type in _MATMULS:
            out.append(Violation("qdq_on_output", name, f"quantizes the output of {producer.op_type} {_OnnxIndex.name(producer)!r} directly; put Q/DQ on the next layer's input (after the ReLU)"))  # fmt: skip
    return out


def _check_matmul(g: _OnnxIndex, node, major: int | None = None) -> tuple[list[Violation], bool]:
    """Rules on one Conv/Gemm: both inputs quantized or neither, weight per channel on axis 0,
    float bias. Returns the violations and whether the layer is quantized."""
    name, out = _OnnxIndex.name(node), []
    data_dq = g.made_by(g.input(node, 0), "DequantizeLinear")
    weight_dq = g.made_by(g.input(node, 1), "DequantizeLinear")
    bias_dq = g.made_by(g.input(node, 2), "DequantizeLinear")
    if bias_dq is not None:
        dtype = _qdq_dtype(g, bias_dq)
        out.append(Violation("float_bias", _OnnxIndex.name(bias_dq), f"the bias of {name!r} is dequantized from {dtype or 'integers'}; keep it float (TensorRT's parser rejects it)"))  # fmt: skip
    if (data_dq is None) != (weight_dq is None):
        missing = "data input" if data_dq is None else "weight"
        out.append(Violation("qdq_inputs", name, f"{node.op_type} has Q/DQ on one input but not on its {missing}"))
    if data_dq is not None and g.made_by(g.input(data_dq, 0), "QuantizeLinear") is None and g.const(g.input(data_dq, 0)) is None:
        out.append(Violation("qdq_inputs", _OnnxIndex.name(data_dq), f"the data DequantizeLinear of {name!r} is not fed by a QuantizeLinear"))
    if weight_dq is not None:
        out += _check_weight(g, node, weight_dq, major)
    return out, data_dq is not None and weight_dq is not None


def _check_weight(g: _OnnxIndex, node, dq, major: int | None) -> list[Violation]:
    name, out = _OnnxIndex.name(dq), []
    layout, w, q = _weight_source(g, dq)
    if layout is None:
        out.append(Violation("weight_layout", name, f"the weight of {_OnnxIndex.name(node)!r} is a computed tensor, not a constant"))
        return out
    if layout == "int8" and w.dtype == np.int8 and major is not None and major < 10:
        out.append(Violation("weight_int8_initializer_trt8", name, f"the weight of {_OnnxIndex.name(node)!r} is an int8 initializer read by DequantizeLinear, "
                             f"which TensorRT {major}.x refuses; write the 'qdq' weight layout"))  # fmt: skip
    elif layout == "int8" and w.dtype not in (np.int8, np.uint8):  # uint8 is reported by its own rule
        out.append(Violation("weight_layout", name, f"the weight of {_OnnxIndex.name(node)!r} is a {w.dtype} initializer read by DequantizeLinear"))
    # Output channels: Conv weight (O, I, kh, kw); Gemm B is (K, N), or (N, K) with transB=1.
    axis_expected = 0 if node.op_type == "Conv" or _attr(node, "transB", 0) else 1
    channels = w.shape[axis_expected] if w.ndim > axis_expected else 1
    scale = g.const(g.input(dq, 1))
    n_scales = 1 if scale is None else scale.size
    if n_scales == 1 and channels > 1:
        out.append(Violation("weight_per_channel", name, f"1 weight scale(s) for {channels} output channels of {_OnnxIndex.name(node)!r}; "
                             "per tensor is valid in TensorRT, this project quantizes per output channel"))  # fmt: skip
    elif n_scales != channels:
        out.append(Violation("weight_axis", name, f"{n_scales} weight scales for {channels} output channels of {_OnnxIndex.name(node)!r}"))
    elif n_scales > 1 or (scale is not None and scale.ndim == 1):
        for qdq in (dq,) if q is None else (q, dq):
            axis = _attr(qdq, "axis", 1)  # Quantize/DequantizeLinear's default axis is 1
            if axis < 0:
                axis += w.ndim
            if axis != axis_expected:
                out.append(Violation("weight_axis", _OnnxIndex.name(qdq), f"per-channel axis {axis}, the output channels of {_OnnxIndex.name(node)!r} are on axis {axis_expected}"))  # fmt: skip
    return out


def _major(version: str | None) -> int | None:
    if version is None:
        return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise UserError(f"TensorRT version {version!r} is not a version such as '8.6' or '10.3'") from None


def _load(model_or_path):
    import onnx

    return onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path


def check_explicit_quantization(model_or_path, tensorrt_version: str | None = None) -> list[Violation]:
    """Every finding on a Q/DQ ONNX graph (ModelProto or path), TensorRT's rules and this project's
    conventions alike (each ``Violation`` says its ``kind``); empty when both hold.
    ``tensorrt_version`` ("8.6", "10.3"...) adds the rules of that release (TensorRT 8.x refuses
    int8 weight initializers); ``None`` checks the rules every supported release shares."""
    model = _load(model_or_path)
    major = _major(tensorrt_version)
    g = _OnnxIndex(model)
    violations: list[Violation] = []
    bias_dqs: set[str] = set()
    quantized = 0
    for node in g.nodes:
        if node.op_type in _MATMULS:
            found, is_quantized = _check_matmul(g, node, major)
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


def require_explicit_quantization(model_or_path, tensorrt_version: str | None = None) -> list[Violation]:
    """Raise a one-line UserError naming every node that breaks a TensorRT rule; return the
    convention notes (logged, never fatal: TensorRT builds such a graph)."""
    violations = check_explicit_quantization(model_or_path, tensorrt_version)
    broken = [v for v in violations if v.tensorrt]
    notes = [v for v in violations if not v.tensorrt]
    for v in notes:
        log.info("Q/DQ convention note (valid for TensorRT): %s", v)
    if broken:
        by_rule: dict[str, list[str]] = {}
        for v in broken:
            by_rule.setdefault(v.rule, []).append(v.node)
        parts = [f"{rule} ({RULES[rule]}): {', '.join(_first(nodes, 5))}" for rule, nodes in by_rule.items()]
        release = f"TensorRT {tensorrt_version}'s" if tensorrt_version else "TensorRT's"
        raise UserError(f"the Q/DQ graph breaks {release} explicit-quantization rules: {'; '.join(parts)}; "
                        "calibrate for the 'tensorrt' constraint set")  # fmt: skip
    return notes


def _first(names: list[str], n: int) -> list[str]:
    return names if len(names) <= n else [*names[:n], f"and {len(names) - n} more"]


def quantized_layers(model_or_path) -> list[str]:
    """Names of the Conv/Gemm nodes of a graph with Q/DQ on both data input and weight."""
    g = _OnnxIndex(_load(model_or_path))
    return [_OnnxIndex.name(n) for n in g.nodes if n.op_type in _MATMULS and _check_matmul(g, n)[1]]
