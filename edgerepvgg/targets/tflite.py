"""TFLite: a full-integer (or FP32) ``.tflite`` flatbuffer written from PlainNet + QuantSpec, run by
LiteRT (``ai_edge_litert``) with its default XNNPACK delegate.

No converter is involved: the graph is tiny (CONV_2D, MEAN, FULLY_CONNECTED, plus PAD before
stride-2 convs and QUANTIZE/DEQUANTIZE for float I/O), so it is built with the ``tflite`` schema
bindings and ``flatbuffers``, and every integer in it comes from the QuantSpec: weights and int32
biases are quantized exactly as :class:`edgerepvgg.quant.emulate.IntegerNet` quantizes them, and
every activation tensor carries the scale and zero point of the quantizer the spec puts there.

Why PAD: PyTorch pads a 3x3 stride-2 conv by 1 on every side, TF's SAME pads an even-sized input
by 0 before and 1 after, so their outputs sample different pixels. An explicit PAD (by the zero
point in INT8, which is how integer kernels represent 0) and a VALID conv compute PyTorch's conv
for any input size. Stride-1 SAME pads 1 on each side, which is PyTorch's padding already.
Grouped convs are CONV_2D with an OHW(I/groups) filter (LiteRT runs them, XNNPACK included).

Numerics: with LiteRT's default XNNPACK delegate (what :meth:`TFLiteTarget.load` uses) every
int8 tensor equals IntegerNet's except where a value lands on a rounding boundary. TFLite's own
builtin kernels (no delegate) round twice in MEAN (the mean in input units, then the rescale) and
in the fixed-point requantization, so they disagree with the referee more often.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgerepvgg.errors import UserError
from edgerepvgg.io import atomic_path
from edgerepvgg.plain import PlainNet, conv_output_size
from edgerepvgg.quant.emulate import quantize, round_mode
from edgerepvgg.quant.spec import QuantSpec, TensorQuant, model_hash, require_spec_for
from edgerepvgg.inputs import InputSpec
from edgerepvgg.targets.base import Artifact, ArtifactMetadata, check_batch, check_precision

log = logging.getLogger(__name__)

METADATA_NAME = "edgerepvgg"
FORMAT_VERSION = 1
INSTALL_HINT = "pip install 'edgerepvgg[tflite]'"

# tflite schema enums (tflite.TensorType, tflite.BuiltinOperator, ...), spelled out here so that
# building the graph description needs no import; the writer checks them against the bindings.
_FLOAT32, _INT32, _INT8 = 0, 2, 9
_NUMPY = {_FLOAT32: np.float32, _INT32: np.int32, _INT8: np.int8}
_TYPE_NAMES = {_FLOAT32: "FLOAT32", _INT32: "INT32", _INT8: "INT8"}


# ---------------------------------------------------------------------------------------------
# A small, schema-shaped description of the graph (built first, serialized in one go)


@dataclass(frozen=True)
class _Quant:
    """Quantization parameters of one tensor (one scale per channel along ``dim`` or one in all)."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    dim: int = 0


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    dtype: int
    buffer: int = 0  # 0: the empty buffer (activations)
    quant: _Quant | None = None
    dynamic_batch: bool = False  # shape_signature with batch -1


@dataclass
class _Op:
    code: str  # tflite.BuiltinOperator attribute name
    inputs: list[int]
    outputs: list[int]
    options: str | None = None  # tflite.BuiltinOptions attribute name
    fields: dict[str, Any] = field(default_factory=dict)  # <Options>Add<Field> values
    version: int = 1


@dataclass
class _TFLiteGraph:
    tensors: list[_Tensor] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=lambda: [b""])  # buffer 0 is empty by convention
    ops: list[_Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def activation(self, name: str, shape: list[int], dtype: int, quant: _Quant | None = None) -> int:
        self.tensors.append(_Tensor(name, shape, dtype, 0, quant, dynamic_batch=True))
        return len(self.tensors) - 1

    def constant(self, name: str, array: np.ndarray, dtype: int, quant: _Quant | None = None) -> int:
        self.buffers.append(np.ascontiguousarray(array, dtype=_NUMPY[dtype]).tobytes())
        self.tensors.append(_Tensor(name, list(array.shape), dtype, len(self.buffers) - 1, quant))
        return len(self.tensors) - 1

    def op(self, code: str, inputs: list[int], outputs: list[int], options: str | None = None, version: int = 1,
           **fields: Any) -> None:  # fmt: skip
        self.ops.append(_Op(code, inputs, outputs, options, fields, version))


def _act_quant(q: TensorQuant) -> _Quant:
    return _Quant(tuple(q.scale), tuple(q.zero_point))


def _check_spec(plain: PlainNet, spec: QuantSpec) -> None:
    """Refuse a spec that full-integer TFLite cannot express or that was made for another model."""
    require_spec_for(plain, spec)
    floats = [layer.name for layer in spec.layers if layer.precision == "float"]
    if floats:
        raise UserError(f"full-integer TFLite cannot keep layers in float (mixed precision: {', '.join(floats[:4])}); "
                        "calibrate without --max-drop or choose another target")  # fmt: skip
    c = spec.constraints
    act, w = c.activation, c.weight
    if not (act.signed and act.qmin == -128 and act.qmax == 127) or not (w.signed and w.bits <= 8):
        raise UserError(f"QuantSpec for {c.name!r} ({act.bits}-bit {'signed' if act.signed else 'unsigned'} activations, "
                        f"{w.bits}-bit weights) does not fit TFLite's int8 kernels; calibrate for the 'tflite' constraint set")  # fmt: skip
    if spec.output is None or not c.int_bias:
        raise UserError(f"QuantSpec for {c.name!r} has no int8 output quantizer or int32 bias; calibrate for the 'tflite' constraint set")
    if c.rounding != "half_away":
        log.warning("QuantSpec rounds %s; TFLite rounds half away from zero (ties may differ)", c.rounding)


def _int_weights(module: torch.nn.Module, layer) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """int8 weights, int32 bias and the bias scales, exactly as IntegerNet quantizes them."""
    w = quantize(module.weight.detach().double().cpu(), layer.weight, "half_even", axis=0)
    s = layer.input.scale[0] * torch.tensor(layer.weight.scale, dtype=torch.float64)
    b = round_mode(module.bias.detach().double().cpu() / s, "half_even")
    if b.abs().max() > 2**31 - 1:
        raise UserError(f"{layer.name}: the bias does not fit int32 at this input x weight scale; recalibrate")
    return w.numpy().astype(np.int8), b.numpy().astype(np.int32), tuple(float(v) for v in s)


def _build_graph(plain: PlainNet, spec: QuantSpec | None, int8: bool, int8_io: bool = False) -> _TFLiteGraph:
    """The TFLite graph of ``plain``: float32 throughout, or int8 under ``spec`` (float or int8 I/O)."""
    g = _TFLiteGraph()
    s = plain.input_spec
    (h, w), ch = s.hw, s.channels
    dt = _INT8 if int8 else _FLOAT32
    layers = spec.layers if int8 and spec is not None else None

    def aq(point: TensorQuant | None) -> _Quant | None:
        return _act_quant(point) if layers is not None else None

    x = g.activation("input", [1, h, w, ch], _INT8 if int8_io else _FLOAT32, aq(layers[0].input) if int8_io else None)
    g.inputs.append(x)
    if int8 and not int8_io:
        xq = g.activation("input_int8", [1, h, w, ch], _INT8, aq(layers[0].input))
        g.op("QUANTIZE", [x], [xq], "QuantizeOptions", version=2)
        x = xq
    n = len(plain.convs)
    for i, conv in enumerate(plain.convs):
        name, stride, groups = f"convs.{i}", conv.stride[0], conv.groups
        cin, cout = conv.in_channels, conv.out_channels
        q_in = aq(layers[i].input) if layers else None
        padding = 0  # SAME: for a stride-1 3x3 conv, 1 on each side, as PyTorch
        if stride != 1:
            pads = g.constant(f"{name}/paddings", np.array([[0, 0], [1, 1], [1, 1], [0, 0]]), _INT32)
            padded = g.activation(f"{name}/padded", [1, h + 2, w + 2, cin], dt, q_in)
            g.op("PAD", [x, pads], [padded], "PadOptions", version=3 if int8 else 1)
            x, padding = padded, 1  # VALID on the explicitly padded input
        h, w = conv_output_size(h, stride), conv_output_size(w, stride)
        w_ohwi = conv.weight.detach().permute(0, 2, 3, 1)
        if layers:
            wq, bq, bias_scales = _int_weights(conv, layers[i])
            wq = np.ascontiguousarray(wq.transpose(0, 2, 3, 1))
            w_t = g.constant(f"{name}/weight", wq, _INT8, _Quant(tuple(layers[i].weight.scale), (0,) * cout, 0))
            b_t = g.constant(f"{name}/bias", bq, _INT32, _Quant(bias_scales, (0,) * cout, 0))
            q_out = aq(layers[i + 1].input if i + 1 < n else spec.pool)
        else:
            w_t = g.constant(f"{name}/weight", w_ohwi.float().cpu().numpy(), _FLOAT32)
            b_t = g.constant(f"{name}/bias", conv.bias.detach().float().cpu().numpy(), _FLOAT32)
            q_out = None
        y = g.activation(f"{name}/relu", [1, h, w, cout], dt, q_out)
        version = 6 if groups != 1 else 3 if int8 else 1  # grouped CONV_2D (filter OHW(I/groups)) is version 6
        g.op("CONV_2D", [x, w_t, b_t], [y], "Conv2DOptions", version=version,
             Padding=padding, StrideW=stride, StrideH=stride, FusedActivationFunction=1,
             DilationWFactor=1, DilationHFactor=1)  # fmt: skip
        x = y
    feat = plain.head.in_features
    axes = g.constant("pool/axes", np.array([1, 2]), _INT32)
    pooled = g.activation("pool/mean", [1, 1, 1, feat], dt, aq(layers[-1].input) if layers else None)
    g.op("MEAN", [x, axes], [pooled], "ReducerOptions", version=2 if int8 else 1, KeepDims=True)
    k = plain.num_classes
    if layers:
        wq, bq, bias_scales = _int_weights(plain.head, layers[-1])
        w_t = g.constant("head/weight", wq, _INT8, _Quant(tuple(layers[-1].weight.scale), (0,) * k, 0))
        b_t = g.constant("head/bias", bq, _INT32, _Quant(bias_scales, (0,) * k, 0))
    else:
        w_t = g.constant("head/weight", plain.head.weight.detach().float().cpu().numpy(), _FLOAT32)
        b_t = g.constant("head/bias", plain.head.bias.detach().float().cpu().numpy(), _FLOAT32)
    out_name = "logits" if not int8 or int8_io else "logits_int8"
    logits = g.activation(out_name, [1, k], dt, aq(spec.output) if layers else None)
    g.op("FULLY_CONNECTED", [pooled, w_t, b_t], [logits], "FullyConnectedOptions", version=4 if int8 else 1,
         FusedActivationFunction=0, KeepNumDims=False)  # fmt: skip
    if int8 and not int8_io:
        out = g.activation("logits", [1, k], _FLOAT32)
        g.op("DEQUANTIZE", [logits], [out], "DequantizeOptions", version=2)
        logits = out
    g.outputs.append(logits)
    return g


# ---------------------------------------------------------------------------------------------
# Flatbuffer writing and reading


def _aligned_bytes(builder, data: bytes, alignment: int = 16) -> int:
    """A [ubyte] vector whose payload starts on ``alignment`` bytes (the schema's force_align)."""
    builder.StartVector(1, len(data), alignment)
    builder.head = builder.head - len(data)
    builder.Bytes[builder.head : builder.head + len(data)] = data
    return builder.EndVector()


def _vector(builder, values: list[int] | tuple, dtype) -> int:
    return builder.CreateNumpyVector(np.asarray(values, dtype=dtype))


def _offsets(builder, start: Callable[[Any, int], None], items: list[int]) -> int:
    start(builder, len(items))
    for off in reversed(items):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()


def _serialize(graph: _TFLiteGraph, metadata: dict[str, bytes], description: str = "edgerepvgg") -> bytes:
    """The graph as .tflite flatbuffer bytes, with ``metadata`` entries in Buffer-backed Metadata."""
    import flatbuffers
    import tflite

    b = flatbuffers.Builder(1024 + sum(len(d) for d in graph.buffers))
    codes = list(dict.fromkeys(op.code for op in graph.ops))
    versions = {c: max(op.version for op in graph.ops if op.code == c) for c in codes}

    all_buffers = list(graph.buffers)
    meta_buffers = {}
    for key, data in metadata.items():
        all_buffers.append(data)
        meta_buffers[key] = len(all_buffers) - 1
    buffer_offs = []
    for data in all_buffers:
        data_off = _aligned_bytes(b, data) if data else None
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        buffer_offs.append(tflite.BufferEnd(b))

    tensor_offs = []
    for t in graph.tensors:
        name = b.CreateString(t.name)
        shape = _vector(b, t.shape, np.int32)
        signature = _vector(b, [-1, *t.shape[1:]], np.int32) if t.dynamic_batch else None
        quant = None
        if t.quant is not None:
            scale = _vector(b, t.quant.scale, np.float32)
            zp = _vector(b, t.quant.zero_point, np.int64)
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale)
            tflite.QuantizationParametersAddZeroPoint(b, zp)
            tflite.QuantizationParametersAddQuantizedDimension(b, t.quant.dim)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        if signature is not None:
            tflite.TensorAddShapeSignature(b, signature)
        tflite.TensorAddType(b, t.dtype)
        tflite.TensorAddBuffer(b, t.buffer)
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensor_offs.append(tflite.TensorEnd(b))

    op_offs = []
    for op in graph.ops:
        options = None
        if op.options is not None:
            getattr(tflite, f"{op.options}Start")(b)
            for key, value in op.fields.items():
                getattr(tflite, f"{op.options}Add{key}")(b, value)
            options = getattr(tflite, f"{op.options}End")(b)
        ins, outs = _vector(b, op.inputs, np.int32), _vector(b, op.outputs, np.int32)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(op.code))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, op.options))
            tflite.OperatorAddBuiltinOptions(b, options)
        op_offs.append(tflite.OperatorEnd(b))

    tensors = _offsets(b, tflite.SubGraphStartTensorsVector, tensor_offs)
    operators = _offsets(b, tflite.SubGraphStartOperatorsVector, op_offs)
    inputs, outputs = _vector(b, graph.inputs, np.int32), _vector(b, graph.outputs, np.int32)
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors)
    tflite.SubGraphAddInputs(b, inputs)
    tflite.SubGraphAddOutputs(b, outputs)
    tflite.SubGraphAddOperators(b, operators)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    code_offs = []
    for c in codes:
        value = getattr(tflite.BuiltinOperator, c)
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(value, 127))  # 127: "see builtin_code"
        tflite.OperatorCodeAddBuiltinCode(b, value)
        tflite.OperatorCodeAddVersion(b, versions[c])
        code_offs.append(tflite.OperatorCodeEnd(b))

    meta_offs = []
    for key, index in meta_buffers.items():
        name = b.CreateString(key)
        tflite.MetadataStart(b)
        tflite.MetadataAddName(b, name)
        tflite.MetadataAddBuffer(b, index)
        meta_offs.append(tflite.MetadataEnd(b))

    opcodes = _offsets(b, tflite.ModelStartOperatorCodesVector, code_offs)
    subgraphs = _offsets(b, tflite.ModelStartSubgraphsVector, [subgraph])
    buffers = _offsets(b, tflite.ModelStartBuffersVector, buffer_offs)
    metas = _offsets(b, tflite.ModelStartMetadataVector, meta_offs)
    desc = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)  # the TFLite schema version
    tflite.ModelAddOperatorCodes(b, opcodes)
    tflite.ModelAddSubgraphs(b, subgraphs)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers)
    tflite.ModelAddMetadata(b, metas)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def read_model(path: str | Path):
    """The ``tflite.Model`` of a .tflite file (the schema bindings' read-only view)."""
    import tflite

    data = Path(path).read_bytes()
    if data[4:8] != b"TFL3":
        raise UserError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier)")
    return tflite.Model.GetRootAsModel(data, 0)


def read_metadata(path: str | Path) -> dict:
    """The edgerepvgg metadata (input spec, class names, spec and model hashes) of a .tflite file."""
    model = read_model(path)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_NAME:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode())
    raise UserError(f"{path} has no {METADATA_NAME!r} metadata; it was not written by edgerepvgg")


# ---------------------------------------------------------------------------------------------
# The target


def _missing(modules: tuple[str, ...]) -> str | None:
    """Why the first of ``modules`` that does not import fails, with the fix; ``None`` if all do."""
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, OSError) as exc:
            return f"{module} does not import ({exc}); {INSTALL_HINT}"
    return None


class TFLiteRunner:
    """A LiteRT interpreter behind the runner protocol: NCHW float32 in, float32 logits out."""

    emulated: bool = False

    def __init__(self, path: Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._shape = tuple(int(v) for v in self._in["shape"])

    def _quant(self, details: dict) -> tuple[float, int]:
        scale, zero_point = details["quantization"]
        return float(scale), int(zero_point)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a normalized NCHW float32 batch."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self._shape[3]:
            raise ValueError(f"expected an NCHW batch with {self._shape[3]} channels, got shape {x.shape}")
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if x.shape != self._shape:
            self.interpreter.resize_tensor_input(self._in["index"], list(x.shape), strict=False)
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()[0]
            self._out = self.interpreter.get_output_details()[0]
            self._shape = x.shape
        if self._in["dtype"] == np.int8:
            scale, zp = self._quant(self._in)
            v = x / np.float32(scale)
            x = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zp, -128, 127).astype(np.int8)  # TFLite rounds half away
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._out["index"])
        if self._out["dtype"] == np.int8:
            scale, zp = self._quant(self._out)
            return (y.astype(np.float32) - zp) * np.float32(scale)
        return np.array(y, dtype=np.float32)


class TFLiteTarget:
    """Full-integer TFLite via a flatbuffer written from PlainNet + QuantSpec; LiteRT/XNNPACK on CPU."""

    name = "tflite"
    constraint_set = "tflite"
    precisions = ("fp32", "int8")
    description = "TFLite flatbuffer (full-integer INT8 or FP32) written directly, run by LiteRT/XNNPACK on CPU"
    supports_fixed_batch = False  # the runner resizes the input to each batch
    compiles_without_runtime = False

    def available(self) -> str | None:
        """``None`` when LiteRT, the tflite schema bindings and flatbuffers import, else why not."""
        return _missing(("ai_edge_litert.interpreter", "tflite", "flatbuffers"))

    def compile(self, plain: PlainNet, spec: QuantSpec | None, out_dir: Path, precision: str = "fp32", *,
                batch: int | None = None, int8_io: bool = False) -> Artifact:  # fmt: skip
        """Write ``out_dir/model.tflite``; INT8 needs a spec calibrated for the 'tflite' constraint
        set. ``batch`` is refused: the runner resizes the input to each batch."""
        check_precision(self, precision, spec)
        check_batch(self, batch)
        int8 = precision == "int8"
        if int8_io and not int8:
            raise UserError("int8 input/output needs an INT8 build (--precision int8)")
        reason = _missing(("tflite", "flatbuffers"))  # writing needs no runtime
        if reason:
            raise UserError(reason)
        if int8:
            _check_spec(plain, spec)
        graph = _build_graph(plain, spec if int8 else None, int8, int8_io)
        meta = {
            "format": "edgerepvgg-tflite",
            "format_version": FORMAT_VERSION,
            "model_name": plain.name,
            "precision": precision,
            "int8_io": int8_io,
            "input_spec": plain.input_spec.to_dict(),
            "class_names": list(plain.input_spec.class_names),
            "model_hash": spec.model_hash if int8 else model_hash(plain),
            "spec_sha256": spec.sha256 if int8 else None,
            "constraints": spec.constraints.name if int8 else None,
        }
        data = _serialize(graph, {METADATA_NAME: json.dumps(meta, sort_keys=True).encode()}, f"edgerepvgg {plain.name}")
        path = Path(out_dir) / "model.tflite"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        convs = sum(1 for op in graph.ops if op.code == "CONV_2D")
        info = {"ops": [op.code for op in graph.ops], "int8_convs": convs if int8 else 0, "int8_io": int8_io,
                "pads": sum(1 for op in graph.ops if op.code == "PAD"), "spec_sha256": meta["spec_sha256"]}  # fmt: skip
        log.info("wrote %s (%s, %d ops, %d bytes)", path, precision, len(graph.ops), len(data))
        return Artifact(target=self.name, precision=precision, path=path, files=(path,), info=info)

    def load(self, artifact: Artifact, threads: int | None = None) -> TFLiteRunner:
        """A LiteRT runner (default XNNPACK delegate) with ``threads`` threads."""
        reason = self.available()
        if reason:
            raise UserError(reason)
        if not Path(artifact.path).is_file():
            raise UserError(f"{artifact.path} does not exist; compile it first")
        return TFLiteRunner(Path(artifact.path), threads)

    def metadata(self, artifact: Artifact) -> ArtifactMetadata:
        """Read from the flatbuffer's ``edgerepvgg`` Metadata entry."""
        meta = read_metadata(artifact.path)
        return ArtifactMetadata(meta["model_hash"], meta["spec_sha256"], meta["constraints"], InputSpec.from_dict(meta["input_spec"]))
