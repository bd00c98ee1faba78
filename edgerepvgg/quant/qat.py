"""Quantization-aware fine-tuning (QAT) of a fused PlainNet, exported as PlainNet + QuantSpec.

The network being fine-tuned (:class:`QATNet`) computes exactly what :class:`IntegerNet` computes
for the spec it exports, in float32 with fake quantization and straight-through gradients: each
conv and the head quantize their input per tensor on the constraint set's activation grid (zero
point fixed) and their weight per output channel, symmetric; an int32 bias is rounded to
``s_in * s_w`` steps where the target has one; the last ReLU output (``pool``) and, for targets
that emit integers, the logits (``output``) are quantized too. Layers a spec keeps in float stay
float.

**Partial fusion.** Every fused conv is split again into a bias-free conv and a BatchNorm (the
re-parameterization YOLOv6 and super-gradients fine-tune with). The BN's statistics are the
conv's output mean and variance on a sample of the training images, its affine parameters
``gamma = sqrt(var + eps)`` and ``beta = mean + bias``, so the folded network is the fused one
(exactly for the weights, to float rounding for the biases). The statistics are **frozen** for
the whole run (torch.ao's ``ConvBn2d`` with ``freeze_bn``): the BN is a per-channel
re-parameterization (``w * gamma / std``, ``beta - mean * gamma / std``) with no batch
statistics, so training, evaluation and every data-parallel rank see the same function and no
SyncBatchNorm is needed. The weight that is fake-quantized is the *folded* weight, the one
exported, so the spec describes what was trained.

**Scales.** With ``learn_scales=False`` activation scales stay the calibrated ones and each weight
scale follows its folded weight (``max|w| / qmax`` per channel, float32, recomputed every step as
torch.ao's weight observers do). With ``learn_scales=True`` every scale is a parameter (LSQ, Esser
et al. 2020), initialized from the spec: ``d y / d s = round(x/s) - x/s`` inside the clip range,
``qmin - z`` or ``qmax - z`` outside, scaled by ``1 / sqrt(n * qmax)`` with ``n`` the elements
one scale covers (a sample's activation tensor; one output channel's weights); zero points stay
the calibrated integers. Either way :meth:`QATNet.export` reads the scales through the same
method the forward pass uses, so the exported spec holds exactly the values trained with: float32,
as every target stores them (a calibrated float64 scale is rounded to float32 once, at the start).
Rounding decisions are taken in float64 like :class:`IntegerNet` takes them, so the exported
PlainNet + QuantSpec reproduce the fake-quant model up to float32 accumulation in the convs.

**Distillation.** The loss is ``(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T)``
with the FP32 PlainNet as teacher and both logits softened by the temperature ``T``.

**The best INT8 model, never a worse one.** With a held-out set, every epoch is scored as the
integer emulation of the spec it exports (:class:`IntegerNet`, what every target computes), and
the best epoch is kept, not the last. PTQ, the spec QAT started from, is scored the same way
first: when no epoch beats it, the PTQ model and spec are written instead, with a warning and
``"kept": "ptq"`` in the run's record (``qat.json``, the checkpoint's metadata and the spec's
provenance). ``patience`` stops a run after that many epochs without a better held-out top-1.

The epoch loop, its per-epoch seeding, resumable checkpoints and data-parallel mode under
``torchrun`` are the trainer's (:func:`edgerepvgg.train.run_epochs`). :func:`fine_tune` is QAT as
``export --qat`` and ``compare --qat`` run it: through an on-disk cache of finished runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edgerepvgg.checkpoints import load_checkpoint, meta_for, save_checkpoint
from edgerepvgg.data import TensorDataset, calibration_images, default_training_data, labelled_sets, stratified_subset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import predict, topk_accuracy
from edgerepvgg.inputs import is_fashion_mnist_spec
from edgerepvgg.io import write_text_atomic
from edgerepvgg.models import RepVGG, create_model, resolve_variant
from edgerepvgg.models.blocks import fold_bn
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.calibrate import CalibrationConfig, cache_dir, calibrate, fingerprint, save_spec
from edgerepvgg.quant.emulate import IntegerNet, round_mode
from edgerepvgg.quant.observers import weight_scales
from edgerepvgg.quant.spec import (
    Constraints, QuantSpec, TensorQuant, load_spec, model_hash, require_spec_for, resolve_constraints,
)  # fmt: skip
from edgerepvgg.torch_device import require_float64
from edgerepvgg.train import (
    MODEL_FILE, STATE_FILE, init_distributed, make_optimizer, resume_run, run_epochs, save_state, validate_recipe,
)  # fmt: skip

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "RECORD_FILE", "SPEC_FILE", "ActQuant", "FrozenConvBN", "QATConfig", "QATNet", "QATResult",
    "WeightQuant", "conv_statistics", "distill_loss", "fine_tune", "plain_to_repvgg", "qat", "qat_cache_dir", "qat_key",
    "training_sets",
]  # fmt: skip

CALIBRATION_SAMPLE = 256  # training images that calibrate the starting spec when nothing else is given
SPEC_FILE = "quant_spec.json"
RECORD_FILE = "qat.json"  # the run's record, written last: which result was kept and why
_MIN_SCALE = 1e-12  # a learned scale is used as |s|, never below this


@dataclass(frozen=True)
class QATConfig:
    """Everything that determines a QAT run (saved in its checkpoints; a resume must match)."""

    epochs: int = 3
    batch_size: int = 64  # the global batch: split evenly among data-parallel ranks
    optimizer: str = "adamw"  # adamw or sgd (Nesterov momentum 0.9)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    distill_alpha: float = 0.5  # weight of the distillation term; 0 = labels only
    temperature: float = 4.0
    learn_scales: bool = False  # LSQ: activation and weight scales become parameters
    crop_padding: int = 2  # lighter augmentation than training: small shifts, flips, no erasing
    hflip: bool = True
    erase_prob: float = 0.0
    stats_images: int = 512  # training images that set the re-inserted BN statistics
    seed: int = 0
    patience: int | None = None  # stop after this many epochs without a better held-out top-1 (None: run them all)

    def __post_init__(self) -> None:
        validate_recipe(self)
        if self.stats_images < 1:
            raise UserError(f"stats images must be at least 1, got {self.stats_images!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1):
            raise UserError(f"--patience must be a whole number of at least 1, got {self.patience!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise UserError(f"--distill-alpha must be in [0, 1], got {self.distill_alpha!r}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature!r}")


# ---------------------------------------------------------------------------------------------
# Fake quantization with straight-through and LSQ gradients


def _grad_scaled(s: torch.Tensor, g: float) -> torch.Tensor:
    """``s`` in the forward pass, ``g * grad`` in the backward pass (LSQ's gradient scale)."""
    return (s - s * g).detach() + s * g


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   rounding: str) -> torch.Tensor:  # fmt: skip
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, the same arithmetic as
    :func:`edgerepvgg.quant.emulate.quantize`; gradient 1 for ``x`` inside the clip range and 0
    outside, and LSQ's gradient for ``scale`` where it requires one.

    The rounding decision is taken in float64, as the integer emulation takes it: inputs on a
    coarse grid (8-bit images) divided by a scale derived from the same grid land exactly on .5
    more often than chance, and float32 would round some of those the other way."""
    v = x / scale
    v = v + (round_mode(x.detach().double() / scale.detach().double(), rounding).to(v.dtype) - v).detach()
    q = torch.clamp(v + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class ActQuant(nn.Module):
    """Per-tensor activation quantizer: the calibrated scale (a parameter under LSQ) and zero point."""

    def __init__(self, q: TensorQuant, rounding: str, learn: bool):
        super().__init__()
        scale = torch.tensor(q.scale[0], dtype=torch.float32)
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.tensor(float(q.zero_point[0])))
        self.scheme, self.rounding, self.learn = q.scheme, rounding, learn

    def value(self) -> torch.Tensor:
        """The scale the forward pass uses (and the spec exports)."""
        return self.scale.abs().clamp_min(_MIN_SCALE) if self.learn else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.value()
        if self.learn:
            s = _grad_scaled(s, 1.0 / math.sqrt(x[0].numel() * self.scheme.qmax))
        return fake_quant_ste(x, s, self.zero_point, self.scheme.qmin, self.scheme.qmax, self.rounding)

    def export(self) -> TensorQuant:
        return TensorQuant(self.scheme, (float(self.value()),), (int(self.zero_point),))


class WeightQuant(nn.Module):
    """Per-output-channel symmetric weight quantizer: scales follow the weight (``max|w| / qmax``)
    or, under LSQ, are parameters initialized from the spec."""

    def __init__(self, q: TensorQuant, learn: bool):
        super().__init__()
        self.scheme, self.learn = q.scheme, learn
        if learn:
            self.scale = nn.Parameter(torch.tensor(q.scale, dtype=torch.float32))

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """Per-channel scales (float32, shape ``(out,)``) for weight ``w``."""
        if self.learn:
            return self.scale.abs().clamp_min(_MIN_SCALE)
        return weight_scales(w.detach(), self.scheme, "minmax").to(w.device)

    def forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-quantized weight and the scales it used."""
        s = self.value(w)
        shape = (-1,) + (1,) * (w.ndim - 1)
        used = _grad_scaled(s, 1.0 / math.sqrt(w[0].numel() * self.scheme.qmax)) if self.learn else s
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        # Weights always round half to even (emulate.IntegerNet does the same, for every target).
        return fake_quant_ste(w, used.reshape(shape), zero, self.scheme.qmin, self.scheme.qmax, "half_even"), s

    def export(self, w: torch.Tensor) -> TensorQuant:
        scales = tuple(float(v) for v in self.value(w))
        return TensorQuant(self.scheme, scales, (0,) * len(scales))


# ---------------------------------------------------------------------------------------------
# Partial fusion: conv + frozen BN, folded on every forward


class FrozenConvBN(nn.Module):
    """A fused 3x3 conv split into a bias-free conv and a BatchNorm whose statistics stay frozen.
    ``folded()`` is the (weight, bias) of the equivalent fused conv; the BN module is never run."""

    def __init__(self, conv: nn.Conv2d, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups, bias=False)
        self.bn = nn.BatchNorm2d(conv.out_channels)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
            self.bn.running_mean.copy_(mean)
            self.bn.running_var.copy_(var)
            self.bn.weight.copy_((self.bn.running_var + self.bn.eps).sqrt())  # gamma / std == 1 exactly
            self.bn.bias.copy_(mean + conv.bias)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn(self.conv.weight, None, self.bn)


@torch.no_grad()
def conv_statistics(plain: PlainNet, x: torch.Tensor, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (population) variance of every conv's bias-free output on ``x``."""
    sums = [torch.zeros(c.out_channels, 2, dtype=torch.float64, device=x.device) for c in plain.convs]
    count = [0] * len(plain.convs)
    for chunk in x.split(batch_size):
        h = chunk
        for i, conv in enumerate(plain.convs):
            y = F.conv2d(h, conv.weight, None, conv.stride, 1, 1, conv.groups)
            flat = y.transpose(0, 1).reshape(y.shape[1], -1).double()
            sums[i] += torch.stack([flat.sum(1), flat.square().sum(1)], 1)
            count[i] += flat.shape[1]
            h = torch.relu(y + conv.bias.reshape(1, -1, 1, 1))
    out = []
    for s, n in zip(sums, count):
        mean = s[:, 0] / n
        out.append((mean.float(), (s[:, 1] / n - mean.square()).clamp_min(0).float()))
    return out


class QATNet(nn.Module):
    """The fake-quantized, partially fused network that QAT trains (see the module docstring).
    ``forward(x, quantize=False)`` is its float function (the fused net it folds into)."""

    def __init__(self, plain: PlainNet, spec: QuantSpec, stats: list[tuple[torch.Tensor, torch.Tensor]], learn_scales: bool):
        super().__init__()
        require_spec_for(plain, spec)
        self.spec, self.input_spec, self.identity = spec, plain.input_spec, plain.identity()
        self.convs = nn.ModuleList(FrozenConvBN(c, m, v) for c, (m, v) in zip(plain.convs, stats))
        self.head = copy.deepcopy(plain.head).requires_grad_(True)
        self.quantized = [layer.precision != "float" for layer in spec.layers]
        r = spec.constraints.rounding
        self.inputs = nn.ModuleList(ActQuant(layer.input, r, learn_scales and on) for layer, on in zip(spec.layers, self.quantized))
        self.weights = nn.ModuleList(WeightQuant(layer.weight, learn_scales and on) for layer, on in zip(spec.layers, self.quantized))
        self.pool = ActQuant(spec.pool, r, learn_scales)
        self.output = ActQuant(spec.output, r, learn_scales) if spec.output is not None else None

    def _layer(self, i: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, quantize: bool) -> torch.Tensor:
        """Layer ``i`` (conv or head) before its ReLU, quantized as IntegerNet computes it."""
        if quantize and self.quantized[i]:
            x = self.inputs[i](x)
            w, s_w = self.weights[i](w)
            if self.spec.constraints.int_bias:  # int32 bias in steps of s_in * s_w (straight-through)
                step = self.inputs[i].value().detach().double() * s_w.detach().double()
                b = b + ((round_mode(b.detach().double() / step, "half_even") * step).to(b.dtype) - b).detach()
        if i < len(self.convs):
            conv = self.convs[i].conv
            return F.conv2d(x, w, b, conv.stride, 1, 1, conv.groups)
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        for i, cb in enumerate(self.convs):
            x = torch.relu(self._layer(i, x, *cb.folded(), quantize))
        if quantize:
            x = self.pool(x)
        x = self._layer(len(self.convs), x.mean(dim=(2, 3)), self.head.weight, self.head.bias, quantize)
        if quantize and self.output is not None:
            x = self.output(x)
        return x

    @torch.no_grad()
    def export(self) -> tuple[PlainNet, QuantSpec]:
        """Fold the BNs back: a PlainNet of plain Conv2d + bias, and the spec whose scales are the
        ones the forward pass uses (float layers keep their spec entries)."""
        convs = []
        for cb in self.convs:
            w, b = cb.folded()
            src = cb.conv
            conv = nn.Conv2d(src.in_channels, src.out_channels, 3, src.stride, 1, groups=src.groups, bias=True)
            conv.weight.copy_(w.cpu())
            conv.bias.copy_(b.cpu())
            convs.append(conv)
        plain = PlainNet(convs, copy.deepcopy(self.head).cpu(), self.input_spec, **self.identity).eval()
        layers = []
        for i, (layer, module) in enumerate(zip(self.spec.layers, [*plain.convs, plain.head])):
            if self.quantized[i]:
                layer = replace(layer, input=self.inputs[i].export(), weight=self.weights[i].export(module.weight))
            layers.append(layer)
        output = self.output.export() if self.output is not None else None
        spec = replace(self.spec, layers=tuple(layers), pool=self.pool.export(), output=output, model_hash=model_hash(plain))
        return plain, spec


# ---------------------------------------------------------------------------------------------
# The fine-tuning run


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``."""
    ce = F.cross_entropy(student, labels)
    if alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * t * t * kl


def plain_to_repvgg(plain: PlainNet) -> RepVGG:
    """A deploy-form RepVGG (one ``rbr_reparam`` conv per block) holding ``plain``'s weights, so
    that a fine-tuned PlainNet is saved in the checkpoint format every command reads. The variant
    and block type are the ones the PlainNet carries (:func:`edgerepvgg.fuse` sets them)."""
    if plain.variant is None or plain.block is None:
        raise UserError(f"the PlainNet {plain.name!r} does not say which RepVGG variant and block type it was fused from; "
                        "build it with edgerepvgg.fuse(model), or pass PlainNet(..., variant='A0', block='repvgg')")  # fmt: skip
    variant = resolve_variant(plain.variant).name
    model = create_model(variant, plain.num_classes, plain.input_spec.channels, plain.block, deploy=True)
    blocks = model.blocks()
    if len(blocks) != len(plain.convs):
        raise UserError(f"RepVGG-{variant} has {len(blocks)} blocks but the PlainNet {len(plain.convs)} convs; "
                        "its variant is wrong: fuse the model again")  # fmt: skip
    for block, conv in zip(blocks, plain.convs):
        block.rbr_reparam.load_state_dict(conv.state_dict())
    model.linear.load_state_dict(plain.head.state_dict())
    return model.eval()


def _sample(train_set: TensorDataset, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_set), generator=gen)[:count]
    return train_set.spec.normalize(train_set.images[idx])


def _top1(fn, dataset: TensorDataset) -> tuple[float, torch.Tensor]:
    logits = predict(fn, dataset)
    return topk_accuracy(logits, dataset.labels), logits


def starting_images(plain: PlainNet, train_set: TensorDataset, images: TensorDataset | None = None) -> TensorDataset:
    """The images that calibrate QAT's starting spec: ``images`` if given; for a Fashion-MNIST
    model the bundled calibration images; else the training set itself when it has at most
    ``CALIBRATION_SAMPLE`` (256) images, or a class-stratified sample of about that many."""
    if images is not None:
        return images
    if is_fashion_mnist_spec(plain.input_spec):
        return calibration_images(plain.input_spec)
    if len(train_set) <= CALIBRATION_SAMPLE:
        return train_set
    return stratified_subset(train_set, max(1, CALIBRATION_SAMPLE // (int(train_set.labels.max()) + 1)))


class _EarlyStop(Exception):
    """Raised on every rank at the start of an epoch once ``patience`` has run out."""


def _should_stop(history: list[dict], ptq_top1: float, patience: int | None) -> bool:
    """True when the last ``patience`` epochs brought no better held-out top-1 than the best
    before them (the PTQ start counts as epoch 0; a tie is no improvement)."""
    if patience is None:
        return False
    values = [ptq_top1] + [h["eval_top1"] for h in history if "eval_top1" in h]
    return len(values) - 1 - values.index(max(values)) >= patience


def _emulated_top1(plain: PlainNet, spec: QuantSpec, eval_set: TensorDataset) -> float:
    """Top-1 of the integer emulation of ``plain`` under ``spec``: what every target computes."""
    return _top1(IntegerNet(plain, spec), eval_set)[0]


def qat(
    plain: PlainNet,
    spec: QuantSpec | None,
    train_set: TensorDataset,
    eval_set: TensorDataset | None,
    config: QATConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    images: TensorDataset | None = None,
    constraints: Constraints | str = "tensorrt",
    weight_bits: int | None = None,
    calibration: CalibrationConfig | str = "mse",
    cache: Path | None | bool = None,
    device: str | torch.device | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[PlainNet, QuantSpec, dict]:
    """Fine-tune ``plain`` under ``spec`` on ``train_set``, distilling from ``plain`` itself, and
    keep the best INT8 result: the best epoch on ``eval_set`` (the held-out set), or PTQ itself
    when no epoch beats it (see the module docstring).

    Without a ``spec`` the starting spec is calibrated here (on rank 0, then shared): on
    :func:`starting_images` (``images`` if given), for ``constraints`` (a :class:`Constraints` or
    a constraint-set name; ``weight_bits`` overrides its weight width) under ``calibration``,
    through the statistics cache unless ``cache=False``. The keyword arguments are ignored when a
    spec is given. ``on_epoch(record)`` is called after every epoch (rank 0; a progress hook).

    Checkpoints ``out_dir/last.pt`` every epoch (``resume`` continues from it); at the end writes
    ``out_dir/model.safetensors`` (a deploy-form RepVGG checkpoint of the kept PlainNet),
    ``out_dir/quant_spec.json`` and the run's record ``out_dir/qat.json``. Returns that PlainNet,
    its spec and metrics: ``start`` (where the starting spec came from, in words), ``history``,
    ``kept`` ("qat" or "ptq"), ``best_epoch`` (0: PTQ), ``stopped_early``, and with ``eval_set``
    on rank 0 the held-out top-1 of FP32, PTQ and the best QAT epoch (integer emulation) and
    ``emulation_agreement`` (the fake-quant model against the integer emulation of its export). ``device``: where one process fine-tunes, in float32 (see
    :func:`~edgerepvgg.train.init_distributed`; not MPS, which lacks the float64 of the rounding)."""
    out_dir, state_path = Path(out_dir), Path(out_dir) / STATE_FILE
    dist = init_distributed(device)
    require_float64(dist.device, "QAT")
    dist.per_rank_batch(config.batch_size)
    if config.patience is not None and eval_set is None:
        raise UserError("--patience watches the held-out top-1 and there is no held-out set; pass --data with a val/ folder, "
                        "or drop --patience")  # fmt: skip
    if spec is None:
        calib = starting_images(plain, train_set, images)
        calib_config = CalibrationConfig.of(calibration)
        target = resolve_constraints(constraints, weight_bits)
        start = f"calibration on {len(calib)} images of {calib.source} ({calib_config.method})"
        if dist.main:
            spec = calibrate(plain, calib, target, calib_config, progress=progress, cache=cache)
    else:
        start = "the given QuantSpec"
    spec = dist.broadcast(spec)  # every rank trains with rank 0's spec, however it calibrated
    require_spec_for(plain, spec)
    source = {"model_hash": spec.model_hash, "spec_sha256": spec.sha256}
    if not train_set.labelled:
        raise UserError(f"{train_set.source} is not labelled; QAT needs labelled training images")
    if int(train_set.labels.max()) >= plain.num_classes:
        raise UserError(f"{train_set.source} has labels up to {int(train_set.labels.max())}, the model {plain.num_classes} classes")
    plain_to_repvgg(plain)  # a PlainNet no checkpoint can hold fails now, not after training
    plain = copy.deepcopy(plain).float().eval().requires_grad_(False)
    teacher = copy.deepcopy(plain).to(dist.device)
    stats = conv_statistics(teacher, _sample(train_set, config.stats_images, config.seed).to(dist.device))
    net = QATNet(plain, spec, stats, config.learn_scales).to(dist.device)
    opt = make_optimizer(net, config)
    watch = dist.main and eval_set is not None  # this process scores every epoch and keeps the best
    baseline: dict = {}
    if watch:
        log.info("scoring FP32 and PTQ on %d held-out images of %s", len(eval_set), eval_set.source)
        baseline = {"fp32_top1": _top1(plain, eval_set)[0], "ptq_top1": _emulated_top1(plain, spec, eval_set)}
    best: dict = {"epoch": 0, "top1": None, "state": None}  # the best QAT epoch so far and its weights
    start_epoch, history = resume_run(state_path, config, net, opt, source) if resume else (0, [])
    if resume and watch:
        saved = torch.load(state_path, map_location="cpu", weights_only=True).get("best")
        if saved is not None:
            best = {"epoch": saved["epoch"], "top1": saved["top1"], "state": saved["model"]}
    model = dist.wrap(net)
    seen = {"history": history, "epoch": start_epoch,
            "stop": watch and _should_stop(history, baseline["ptq_top1"], config.patience)}  # fmt: skip
    steps_per_epoch, calls = len(train_set) // config.batch_size, [0]

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if config.patience is not None and steps_per_epoch and calls[0] % steps_per_epoch == 0:
            if dist.broadcast(seen["stop"]):  # rank 0 decides; every rank stops at the same step
                raise _EarlyStop
        calls[0] += 1
        logits = model(x)
        with torch.no_grad():
            target = teacher(x) if config.distill_alpha > 0 else logits
        return distill_loss(logits, target, y, config.distill_alpha, config.temperature), logits

    def run_net(x: torch.Tensor) -> torch.Tensor:
        return net(x.to(dist.device)).cpu()

    def evaluate() -> dict:
        """The epoch's held-out top-1 as the integer emulation of the spec it exports."""
        net.eval()
        seen["epoch"] += 1
        top1 = _emulated_top1(*net.export(), eval_set)
        if best["top1"] is None or top1 > best["top1"]:
            best.update(epoch=seen["epoch"], top1=top1, state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        return {"eval_top1": top1}

    def save(epoch: int, history: list[dict]) -> None:
        extra = {"source": source}
        if best["state"] is not None:
            extra["best"] = {"epoch": best["epoch"], "top1": best["top1"], "model": best["state"]}
        save_state(state_path, net, opt, epoch, config, history, **extra)
        seen["history"] = history
        seen["stop"] = watch and _should_stop(history, baseline["ptq_top1"], config.patience)
        if on_epoch is not None:
            on_epoch(history[-1])

    try:
        history = run_epochs(model, opt, config, train_set, step, start_epoch, history,
                             evaluate if watch else None, save, dist, progress)  # fmt: skip
        stopped = False
    except _EarlyStop:
        history, stopped = seen["history"], True
        if dist.main:
            log.info("stopping early after epoch %d of %d: no better held-out top-1 in %d epoch(s)",
                     len(history), config.epochs, config.patience)  # fmt: skip
    net.eval()
    record: dict = {"start": start, "train_set": train_set.source, "epochs_run": len(history), "stopped_early": stopped,
                    "checked": eval_set is not None}  # fmt: skip
    if watch:
        if best["state"] is not None:
            net.load_state_dict(best["state"])
        else:  # nothing scored in this process and nothing saved: the net as it stands
            best.update(epoch=len(history), top1=_emulated_top1(*net.export(), eval_set))
    fine, fine_spec = net.export()
    kept = "qat"
    if watch:
        agreement = float((predict(run_net, eval_set).argmax(1) == predict(IntegerNet(fine, fine_spec), eval_set).argmax(1)).float().mean())
        if agreement < 0.99:
            log.warning("the exported spec reproduces only %.2f%% of the fake-quant model's predictions", 100 * agreement)
        record.update(baseline, qat_top1=best["top1"], best_epoch=best["epoch"], emulation_agreement=agreement,
                      eval_set=eval_set.source)  # fmt: skip
        if best["top1"] < baseline["ptq_top1"]:
            kept = "ptq"
            log.warning("QAT did not beat PTQ on %s: its best epoch (%d of %d) has INT8 top-1 %.2f%%, PTQ %.2f%%; "
                        "writing the PTQ model and QuantSpec instead (the better INT8 result)", eval_set.source, best["epoch"],
                        len(history), 100 * best["top1"], 100 * baseline["ptq_top1"])  # fmt: skip
            fine, fine_spec = plain, spec
    else:
        record["best_epoch"] = len(history)
        if dist.main:
            log.warning("no held-out set to check QAT against PTQ: the last epoch is written unchecked; "
                        "give --data a val/ folder to keep the better of the two")  # fmt: skip
    record["kept"] = kept
    provenance = {"config": asdict(config), "initial_model_hash": spec.model_hash, "initial_spec_sha256": spec.sha256,
                  "train_set": train_set.source, "kept": kept, "best_epoch": record["best_epoch"],
                  **{k: record[k] for k in ("eval_set", "ptq_top1", "qat_top1") if k in record}}  # fmt: skip
    fine_spec = replace(fine_spec, calibration={**spec.calibration, "qat": provenance})
    metrics: dict = {**record, "history": history}
    if not dist.main:
        return fine, fine_spec, metrics
    extra = {"qat": {**record, "config": asdict(config), "history": history, "initial_spec_sha256": spec.sha256,
                     "calibration": spec.calibration}, "quant_spec_sha256": fine_spec.sha256}  # fmt: skip
    deploy = plain_to_repvgg(fine)
    metrics["model_file"] = str(save_checkpoint(out_dir / MODEL_FILE, deploy, meta_for(deploy, fine.input_spec, **extra)))
    metrics["spec_file"] = str(save_spec(fine_spec, out_dir / SPEC_FILE))
    full = {**record, "history": history, "config": asdict(config), "initial_spec_sha256": spec.sha256,
            "quant_spec_sha256": fine_spec.sha256, "model_hash": fine_spec.model_hash, "model_file": MODEL_FILE,
            "spec_file": SPEC_FILE}  # fmt: skip
    metrics["record_file"] = str(write_text_atomic(out_dir / RECORD_FILE, json.dumps(full, indent=1) + "\n"))
    return fine, fine_spec, metrics


# ---------------------------------------------------------------------------------------------
# QAT in the pipeline (export --qat, compare --qat): its data, and a cache of finished runs


def training_sets(plain: PlainNet, data: str | Path | tuple[TensorDataset, TensorDataset | None] | None
                  ) -> tuple[TensorDataset, TensorDataset | None]:  # fmt: skip
    """The labelled (training, held-out) sets QAT fine-tunes on, read as ``edgerepvgg qat`` reads
    them (:func:`edgerepvgg.data.labelled_sets`): ``data`` ('fashion-mnist', a folder of its IDX
    files, a folder with train/ [val/] class subfolders, or a pair of data sets); by default
    Fashion-MNIST for Fashion-MNIST models. Any other model without ``data`` is refused: the
    calibration images carry no labels."""
    if isinstance(data, tuple):
        return data
    if data is None:
        if not is_fashion_mnist_spec(plain.input_spec):
            raise UserError("--qat needs labelled training images and this model has none by default: pass --data DIR "
                            "(a folder with train/ [val/] class subfolders); calibration images (--images) carry no labels")  # fmt: skip
        data = default_training_data(plain.input_spec)
    return labelled_sets(data, plain.input_spec)


@dataclass(frozen=True)
class QATResult:
    """A finished QAT run as the pipeline uses it: the PlainNet and QuantSpec it wrote (QAT's, or
    PTQ's when that was better), its record (``qat.json``), its folder, and whether an earlier
    run was reused rather than fine-tuned again."""

    plain: PlainNet
    spec: QuantSpec
    record: dict
    folder: Path
    reused: bool

    @property
    def kept(self) -> str:
        """``"qat"``, or ``"ptq"`` when no epoch beat the spec QAT started from."""
        return self.record["kept"]

    def summary(self) -> dict:
        """What a report keeps of the run (its figures and decision, not the per-epoch history)."""
        keys = ("kept", "best_epoch", "epochs_run", "stopped_early", "checked", "fp32_top1", "ptq_top1", "qat_top1",
                "eval_set", "train_set", "initial_spec_sha256")  # fmt: skip
        return {"scheme": self.spec.constraints.name, "epochs": self.record["config"]["epochs"],
                **{k: self.record[k] for k in keys if k in self.record}, "reused": self.reused, "folder": str(self.folder)}  # fmt: skip


def qat_cache_dir() -> Path:
    """Where finished QAT runs are kept (beside the calibration statistics; XDG_CACHE_HOME)."""
    return cache_dir().parent / "qat"


def _data_key(dataset: TensorDataset | None) -> str:
    if dataset is None:
        return "-"
    return fingerprint(dataset) + hashlib.sha256(dataset.labels.contiguous().numpy().tobytes()).hexdigest()[:16]


def qat_key(plain: PlainNet, spec: QuantSpec, train_set: TensorDataset, eval_set: TensorDataset | None, config: QATConfig) -> str:
    """The cache key of a QAT run: the model, the spec it starts from (its scheme, calibration
    method and images), every option, and both data sets (images and labels)."""
    text = json.dumps([model_hash(plain), spec.sha256, asdict(config), _data_key(train_set), _data_key(eval_set)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load_result(folder: Path) -> QATResult:
    from edgerepvgg._fuse import fuse

    record = json.loads((folder / RECORD_FILE).read_text())
    model, meta = load_checkpoint(folder / MODEL_FILE)
    fine, _ = fuse(model, meta.input_spec)
    spec = load_spec(folder / SPEC_FILE)
    require_spec_for(fine, spec)
    return QATResult(fine, spec, record, folder, reused=True)


def fine_tune(
    plain: PlainNet,
    spec: QuantSpec,
    train_set: TensorDataset,
    eval_set: TensorDataset | None,
    config: QATConfig,
    folder: str | Path | None = None,
    cache: Path | None | bool = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    device: str | torch.device | None = None,
) -> QATResult:
    """QAT as ``export --qat`` and ``compare --qat`` run it, from ``spec``: a finished run of the
    same :func:`qat_key` is reused from the cache (``cache=None``: the user cache directory; a
    Path: that folder), else :func:`qat` runs there, on ``device``; ``cache=False`` runs in
    ``folder`` and reuses nothing. The run's optimizer state is deleted once it has finished.
    The key leaves the device out: a run made on a GPU serves a later one on the CPU."""
    key = qat_key(plain, spec, train_set, eval_set, config)
    if cache is False:
        if folder is None:
            raise ValueError("fine_tune(cache=False) needs a folder to run in")
        where = Path(folder)
    else:
        where = (cache if isinstance(cache, Path) else qat_cache_dir()) / key
        if (where / RECORD_FILE).is_file():
            try:
                result = _load_result(where)
                log.info("reusing the QAT run in %s", where)
                return result
            except (UserError, ValueError, KeyError, OSError) as exc:  # a damaged entry is run again
                log.warning("ignoring the damaged QAT run in %s (%s)", where, exc)
                shutil.rmtree(where, ignore_errors=True)
    fine, fine_spec, metrics = qat(plain, spec, train_set, eval_set, config, where, progress=progress, device=device,
                                   on_epoch=on_epoch)  # fmt: skip
    (where / STATE_FILE).unlink(missing_ok=True)
    return QATResult(fine, fine_spec, json.loads(Path(metrics["record_file"]).read_text()), where, reused=False)
