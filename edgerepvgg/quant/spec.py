"""QuantSpec: the single, versioned description of how a PlainNet is quantized.

Every target is compiled from PlainNet + QuantSpec, so every target computes the same integer
function; the PyTorch integer emulation (:mod:`edgerepvgg.quant.emulate`) is its referee.

Layout of the quantized network (TensorRT's explicit-quantization placement, which every other
target can also express): each conv and the head quantize their *input* activation per tensor and
their *weight* per output channel (symmetric); the bias stays float in the spec (targets that need
an int32 bias derive it as ``round(bias / (s_in * s_w))``); after a conv, ReLU, and the next
layer's input quantizer requantizes. The last conv's ReLU output is quantized by ``pool`` (the
global-average-pool input); ``output`` quantizes the logits where the target's kernels emit
integers (TFLite), and is absent where they emit float (TensorRT, OpenVINO, ONNX Runtime).

Activation points are named by what reads them: ``convs.i`` (input of conv i; ``convs.0`` is the
network input), ``pool``, ``head`` and ``output``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgerepvgg.errors import UserError
from edgerepvgg.machine import features_from_flags, host_features, needs_reduced_weight_range

if TYPE_CHECKING:
    from edgerepvgg.plain import PlainNet

SPEC_VERSION = 1


@dataclass(frozen=True)
class Scheme:
    """An integer grid: ``bits`` wide, signed or not, symmetric (zero point 0) or affine."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if self.symmetric and not self.signed and self.per_channel:
            raise ValueError("unsigned symmetric per-channel grids are not supported")

    @property
    def qmin(self) -> int:
        """Smallest integer on the grid. Signed symmetric grids drop -2^(b-1) (TensorRT, TFLite
        weights: [-127, 127]) so that the grid is symmetric around zero."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class Constraints:
    """What a target's integer kernels can do: the grids for activations and weights, and how
    the target rounds when it requantizes."""

    name: str
    activation: Scheme
    weight: Scheme
    int_bias: bool = True  # int32 bias in the kernel (TFLite, OpenVINO, ORT) vs float bias (TensorRT)
    int_output: bool = False  # the head emits integers (quantized logits) rather than float
    rounding: str = "half_even"  # how quantizers round: half_even (ONNX, TensorRT) or half_away (TFLite)
    note: str = ""
    # The kernels multiply u8 x s8 pairs into an int16 intermediate on x86 CPUs without VNNI
    # (vpmaddubsw: ONNX Runtime, OpenVINO), where 8-bit weights saturate and 7-bit ones are exact:
    # constraints_for gives such a device 7-bit weights.
    narrow_weights_without_vnni: bool = False
    # The first conv's weight width where it differs from ``weight`` (NNCF's overflow fix: the
    # network input uses the whole u8 range, so its products are the ones that saturate).
    first_layer_weight_bits: int | None = None

    def __post_init__(self) -> None:
        if not self.weight.symmetric or not self.weight.per_channel:
            raise ValueError("weights are always quantized symmetric per output channel")
        if self.rounding not in ("half_even", "half_away"):
            raise ValueError(f"unknown rounding {self.rounding!r}")
        if self.first_layer_weight_bits is not None and not 2 <= self.first_layer_weight_bits <= self.weight.bits:
            raise ValueError(f"first_layer_weight_bits must be in 2..{self.weight.bits}, got {self.first_layer_weight_bits}")

    def layer_weight(self, index: int) -> Scheme:
        """The weight grid of layer ``index`` (0: the first conv)."""
        if index == 0 and self.first_layer_weight_bits is not None:
            return replace(self.weight, bits=self.first_layer_weight_bits)
        return self.weight

    def with_weight_bits(self, bits: int) -> "Constraints":
        """Every layer's weights ``bits`` wide (named e.g. "openvino-w7")."""
        return replace(self, name=f"{self.name}-w{bits}", weight=replace(self.weight, bits=bits), first_layer_weight_bits=None)

    def with_first_layer_weight_bits(self, bits: int) -> "Constraints":
        """The first conv's weights ``bits`` wide, the others as they are (named e.g. "openvino-w7first")."""
        return replace(self, name=f"{self.name}-w{bits}first", first_layer_weight_bits=bits)


_W8 = Scheme(8, signed=True, symmetric=True, per_channel=True)
CONSTRAINT_SETS: dict[str, Constraints] = {
    c.name: c
    for c in (
        Constraints("tensorrt", Scheme(8, True, True), _W8, int_bias=False,
                    note="explicit quantization: symmetric int8, zero point 0, bias kept float"),
        Constraints("openvino", Scheme(8, False, False), _W8, narrow_weights_without_vnni=True,
                    note="OpenVINO CPU: u8 activations (affine), i8 symmetric per-channel weights"),
        Constraints("tflite", Scheme(8, True, False), _W8, rounding="half_away", int_output=True,
                    note="TFLite full integer: int8 affine activations, int8 symmetric per-channel weights"),
        Constraints("onnxruntime", Scheme(8, False, False), _W8, narrow_weights_without_vnni=True,
                    note="ONNX Runtime CPU: u8 activations, s8 weights (QLinearConv)"),
    )
}  # fmt: skip


WEIGHT_BITS = (2, 8)  # the weight widths a user may ask for: every target's kernels take int8 weights


def _check_weight_bits(bits: int) -> None:
    lo, hi = WEIGHT_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise UserError(f"--weight-bits must be between {lo} and {hi}, got {bits!r}")


NARROW_FIRST_LAYER_BITS = 7  # the first conv's weight width on x86 without VNNI (benchmarks/first_layer_weights.py)


def constraints_for(name: str, *, weight_bits: int | None = None, cpu_flags: Iterable[str] | None = None,
                    host: bool = True) -> Constraints:
    """The constraint set ``name`` for the device that will run it.

    A set whose kernels saturate 8-bit weights on x86 without VNNI
    (``narrow_weights_without_vnni``: openvino, onnxruntime) gets 7-bit weights in its first conv
    (named e.g. "openvino-w7first") when that device lacks VNNI, or when that cannot be told. The
    first conv reads the network input, which fills the u8 range, so its products are the ones
    that saturate: measured on a CPU without VNNI, 7 bits there alone match IntegerNet as closely
    as 7 bits everywhere and lose less accuracy (``benchmarks/results/first_layer_weights.md``).
    ``cpu_flags`` are the device CPU's ISA flags (a profile's, taken as complete); without them,
    ``host=True`` asks this machine (:func:`edgerepvgg.machine.host_features`; Linux, Windows,
    macOS) and ``host=False`` keeps the set as declared. ``weight_bits`` (2..8) sets every
    layer's width and overrides either way (``weight_bits=7``: 7 bits everywhere, exact by
    construction)."""
    try:
        c = CONSTRAINT_SETS[name]
    except KeyError:
        raise UserError(f"unknown constraint set {name!r}; choose one of {', '.join(CONSTRAINT_SETS)}") from None
    if weight_bits is not None:
        _check_weight_bits(weight_bits)
        return c if weight_bits == c.weight.bits else c.with_weight_bits(weight_bits)
    if not c.narrow_weights_without_vnni or (cpu_flags is None and not host):
        return c
    if isinstance(cpu_flags, str):
        raise TypeError(f"cpu_flags must be a collection of flag names, got the string {cpu_flags!r}")
    features = host_features() if cpu_flags is None else features_from_flags(cpu_flags)
    return c.with_first_layer_weight_bits(NARROW_FIRST_LAYER_BITS) if needs_reduced_weight_range(features) else c


def resolve_constraints(constraints: Constraints | str, weight_bits: int | None = None) -> Constraints:
    """``constraints`` itself, or the constraint set of that name (:func:`constraints_for` on this
    host); ``weight_bits`` (2..8) overrides the weight width of either."""
    if isinstance(constraints, str):
        return constraints_for(constraints, weight_bits=weight_bits)
    if not isinstance(constraints, Constraints):
        raise TypeError(f"constraints must be a Constraints or a constraint-set name, got {constraints!r}")
    if weight_bits is None or weight_bits == constraints.weight.bits:
        return constraints
    _check_weight_bits(weight_bits)
    return constraints.with_weight_bits(weight_bits)


# ---------------------------------------------------------------------------------------------
# Quantization parameters


@dataclass(frozen=True)
class TensorQuant:
    """Scale(s) and zero point(s) of one quantized tensor on a given grid."""

    scheme: Scheme
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.scale) != len(self.zero_point) or not self.scale:
            raise ValueError("need one zero point per scale")
        if any(not (s > 0 and math.isfinite(s)) for s in self.scale):
            raise ValueError(f"scales must be positive and finite, got {self.scale[:4]}")
        if any(not self.scheme.qmin <= z <= self.scheme.qmax for z in self.zero_point):
            raise ValueError("zero point outside the integer grid")
        if self.scheme.symmetric and any(self.zero_point):
            raise ValueError("a symmetric grid has zero point 0")

    def to_dict(self) -> dict:
        return {"scheme": asdict(self.scheme), "scale": list(self.scale), "zero_point": list(self.zero_point)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorQuant":
        return cls(Scheme(**d["scheme"]), tuple(float(s) for s in d["scale"]), tuple(int(z) for z in d["zero_point"]))


def qparams(lo: float, hi: float, scheme: Scheme) -> tuple[float, int]:
    """Scale and zero point that map the clip range [lo, hi] onto ``scheme``'s grid. The range is
    widened to include 0 so that zero (ReLU's floor, conv padding) is exactly representable."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if scheme.symmetric:
        bound = max(-lo, hi)
        # Unsigned symmetric ([0, qmax] with zero point 0) only holds non-negative data.
        scale = bound / scheme.qmax if bound > 0 else 1.0
        return scale, 0
    span = hi - lo
    if span <= 0:
        return 1.0, max(scheme.qmin, min(scheme.qmax, 0))
    scale = span / (scheme.qmax - scheme.qmin)
    zero_point = int(round(scheme.qmin - lo / scale))
    return scale, max(scheme.qmin, min(scheme.qmax, zero_point))


@dataclass(frozen=True)
class LayerQuant:
    """How one layer (``convs.i`` or ``head``) is quantized; ``precision='float'`` keeps it in
    floating point (mixed precision, where the target allows)."""

    name: str
    input: TensorQuant
    weight: TensorQuant
    precision: str = "int"

    def to_dict(self) -> dict:
        return {"name": self.name, "input": self.input.to_dict(), "weight": self.weight.to_dict(), "precision": self.precision}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerQuant":
        return cls(d["name"], TensorQuant.from_dict(d["input"]), TensorQuant.from_dict(d["weight"]), d.get("precision", "int"))


@dataclass(frozen=True)
class QuantSpec:
    """Per-layer quantization of one PlainNet for one constraint set. ``model_hash`` ties it to the
    exact weights it was made for (a spec for another model is refused)."""

    constraints: Constraints
    layers: tuple[LayerQuant, ...]
    pool: TensorQuant
    output: TensorQuant | None
    model_hash: str
    calibration: dict = field(default_factory=dict)  # method, images, source: provenance only
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if (self.output is not None) != self.constraints.int_output:
            raise ValueError(f"constraint set {self.constraints.name!r} {'needs' if self.constraints.int_output else 'takes no'} output quantizer")

    def layer(self, name: str) -> LayerQuant:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_json(self) -> str:
        d = {"version": self.version, "model_hash": self.model_hash,
             "constraints": asdict(self.constraints), "calibration": self.calibration,
             "layers": [layer.to_dict() for layer in self.layers], "pool": self.pool.to_dict(),
             "output": None if self.output is None else self.output.to_dict()}  # fmt: skip
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        try:
            d = json.loads(text)
            if d.get("version", 0) > SPEC_VERSION:
                raise UserError(f"QuantSpec version {d['version']} is newer than this edgerepvgg; upgrade it")
            c = d["constraints"]
            constraints = Constraints(c["name"], Scheme(**c["activation"]), Scheme(**c["weight"]),
                                      c["int_bias"], c["int_output"], c["rounding"], c.get("note", ""),
                                      bool(c.get("narrow_weights_without_vnni", False)),
                                      c.get("first_layer_weight_bits"))  # fmt: skip
            layers = tuple(LayerQuant.from_dict(x) for x in d["layers"])
            output = None if d["output"] is None else TensorQuant.from_dict(d["output"])
            return cls(constraints, layers, TensorQuant.from_dict(d["pool"]), output, d["model_hash"],
                       d.get("calibration", {}), d["version"])  # fmt: skip
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"not a valid QuantSpec JSON ({type(exc).__name__}: {exc}); regenerate it with 'edgerepvgg calibrate'") from exc

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def with_float_layers(spec: QuantSpec, names: Sequence[str]) -> QuantSpec:
    """``spec`` with the layers ``names`` set to ``precision='float'`` (mixed precision)."""
    known = {layer.name for layer in spec.layers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"no layer {unknown[0]!r} in this QuantSpec; layers are {', '.join(sorted(known))}")
    keep = set(names)
    layers = tuple(replace(layer, precision="float") if layer.name in keep else layer for layer in spec.layers)
    return replace(spec, layers=layers)


def narrow_layer_weights(spec: QuantSpec, names: Sequence[str], bits: int) -> QuantSpec:
    """``spec`` with the weights of layers ``names`` re-quantized for a ``bits``-wide grid over
    the same clip range per channel (scale x old qmax / new qmax): only the resolution changes,
    so calibration need not run again. Used for the first-layer-only 7-bit rule."""
    known = {layer.name for layer in spec.layers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"no layer {unknown[0]!r} in this QuantSpec; layers are {', '.join(sorted(known))}")
    keep = set(names)
    layers = []
    for layer in spec.layers:
        old = layer.weight
        if layer.name in keep and old.scheme.bits != bits:
            scheme = replace(old.scheme, bits=bits)
            scale = tuple(s * old.scheme.qmax / scheme.qmax for s in old.scale)
            layer = replace(layer, weight=TensorQuant(scheme, scale, old.zero_point))
        layers.append(layer)
    constraints = spec.constraints
    if list(names) == [spec.layers[0].name] and bits < constraints.weight.bits:  # the first-layer rule: say so in the name
        constraints = constraints.with_first_layer_weight_bits(bits)
    return replace(spec, constraints=constraints, layers=tuple(layers))


def load_spec(path: str | Path) -> QuantSpec:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read QuantSpec {path}: {exc.strerror or exc}") from exc
    return QuantSpec.from_json(text)


def require_spec_for(plain: PlainNet, spec: QuantSpec) -> None:
    """THE check that a QuantSpec belongs to a model: its layers must be this PlainNet's and its
    model hash this PlainNet's weights'. Every consumer of a (PlainNet, QuantSpec) pair calls it
    before computing or writing anything: the integer emulation, QAT, the exporters."""
    names = plain.layer_names()
    if [layer.name for layer in spec.layers] != names:
        raise UserError(f"the QuantSpec's {len(spec.layers)} layers do not match the model's {len(names)}; calibrate this checkpoint")
    if spec.model_hash != model_hash(plain):
        raise UserError("the QuantSpec was made for another model (its model hash differs); calibrate this checkpoint, "
                        "or pass the checkpoint the spec was made with (e.g. the QAT output's model.safetensors)")  # fmt: skip
    recorded = spec.calibration.get("input_spec")  # the input quantizer's range follows the normalization
    want = plain.input_spec
    if recorded and (tuple(recorded.get("mean", ())), tuple(recorded.get("std", ()))) != (want.mean, want.std):
        raise UserError(f"the QuantSpec was calibrated for inputs normalized with mean {list(recorded.get('mean', ()))}, std "
                        f"{list(recorded.get('std', ()))}, the model now takes mean {list(want.mean)}, std {list(want.std)}; "
                        "calibrate again with this --mean/--std, or drop them")  # fmt: skip


def model_hash(plain: PlainNet) -> str:
    """A short hash of a PlainNet's weights and structure."""
    h = hashlib.sha256()
    for name, tensor in plain.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    for info in plain.layers():
        h.update(f"{info.stride},{info.groups}".encode())
    return h.hexdigest()[:16]
