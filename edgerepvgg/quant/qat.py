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

The epoch loop, its per-epoch seeding, resumable checkpoints and data-parallel mode under
``torchrun`` are the trainer's (:func:`edgerepvgg.train.run_epochs`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edgerepvgg.checkpoints import meta_for, save_checkpoint
from edgerepvgg.data import TensorDataset, calibration_images, stratified_subset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import predict, topk_accuracy
from edgerepvgg.inputs import is_fashion_mnist_spec
from edgerepvgg.models import RepVGG, create_model, resolve_variant
from edgerepvgg.models.blocks import fold_bn
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant.calibrate import CalibrationConfig, calibrate, save_spec
from edgerepvgg.quant.emulate import IntegerNet, round_mode
from edgerepvgg.quant.observers import weight_scales
from edgerepvgg.quant.spec import Constraints, QuantSpec, TensorQuant, model_hash, require_spec_for, resolve_constraints
from edgerepvgg.torch_device import require_float64
from edgerepvgg.train import (
    MODEL_FILE, STATE_FILE, init_distributed, make_optimizer, resume_run, run_epochs, save_state, validate_recipe,
)  # fmt: skip

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "SPEC_FILE", "ActQuant", "FrozenConvBN", "QATConfig", "QATNet", "WeightQuant", "conv_statistics",
    "distill_loss", "plain_to_repvgg", "qat", "qat_metrics",
]  # fmt: skip

CALIBRATION_SAMPLE = 256  # training images that calibrate the starting spec when nothing else is given
SPEC_FILE = "quant_spec.json"
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

    def __post_init__(self) -> None:
        validate_recipe(self)
        if self.stats_images < 1:
            raise UserError(f"stats images must be at least 1, got {self.stats_images!r}")
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
) -> tuple[PlainNet, QuantSpec, dict]:
    """Fine-tune ``plain`` under ``spec`` on ``train_set``, distilling from ``plain`` itself.

    Without a ``spec`` the starting spec is calibrated here (on rank 0, then shared): on
    :func:`starting_images` (``images`` if given), for ``constraints`` (a :class:`Constraints` or
    a constraint-set name; ``weight_bits`` overrides its weight width) under ``calibration``,
    through the statistics cache unless ``cache=False``. The keyword arguments are ignored when a
    spec is given.

    Checkpoints ``out_dir/last.pt`` every epoch (``resume`` continues from it); at the end writes
    ``out_dir/model.safetensors`` (a deploy-form RepVGG checkpoint of the fine-tuned PlainNet) and
    ``out_dir/quant_spec.json``. Returns that PlainNet, its spec and metrics: ``start`` (where
    the starting spec came from, in words), ``history``, and with ``eval_set`` on rank 0 those of
    :func:`qat_metrics`. ``device``: where one process fine-tunes, in float32 (see
    :func:`~edgerepvgg.train.init_distributed`; not MPS, which lacks the float64 of the rounding)."""
    out_dir, state_path = Path(out_dir), Path(out_dir) / STATE_FILE
    dist = init_distributed(device)
    require_float64(dist.device, "QAT")
    dist.per_rank_batch(config.batch_size)
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
    start_epoch, history = resume_run(state_path, config, net, opt, source) if resume else (0, [])
    model = dist.wrap(net)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        with torch.no_grad():
            target = teacher(x) if config.distill_alpha > 0 else logits
        return distill_loss(logits, target, y, config.distill_alpha, config.temperature), logits

    def run_net(x: torch.Tensor) -> torch.Tensor:
        return net(x.to(dist.device)).cpu()

    def evaluate() -> dict:
        net.eval()
        return {"eval_top1": _top1(run_net, eval_set)[0]}

    def save(epoch: int, history: list[dict]) -> None:
        save_state(state_path, net, opt, epoch, config, history, source=source)

    history = run_epochs(model, opt, config, train_set, step, start_epoch, history,
                         evaluate if eval_set is not None else None, save, dist, progress)  # fmt: skip
    net.eval()
    fine, fine_spec = net.export()
    fine_spec = replace(fine_spec, calibration={**spec.calibration, "qat": {
        "config": asdict(config), "initial_model_hash": spec.model_hash, "initial_spec_sha256": spec.sha256,
        "train_set": train_set.source}})  # fmt: skip
    metrics: dict = {"start": start, "history": history}
    if not dist.main:
        return fine, fine_spec, metrics
    if eval_set is not None:
        metrics.update(qat_metrics(plain, spec, fine, fine_spec, run_net, eval_set))
    extra = {"qat": {**{k: v for k, v in metrics.items() if k != "history"}, "config": asdict(config),
                     "history": history, "initial_spec_sha256": spec.sha256, "calibration": spec.calibration,
                     "train_set": train_set.source}, "quant_spec_sha256": fine_spec.sha256}  # fmt: skip
    deploy = plain_to_repvgg(fine)
    metrics["model_file"] = str(save_checkpoint(out_dir / MODEL_FILE, deploy, meta_for(deploy, fine.input_spec, **extra)))
    metrics["spec_file"] = str(save_spec(fine_spec, out_dir / SPEC_FILE))
    return fine, fine_spec, metrics


def qat_metrics(plain: PlainNet, spec: QuantSpec, fine: PlainNet, fine_spec: QuantSpec, fake_quant,
                eval_set: TensorDataset) -> dict:  # fmt: skip
    """Top-1 on ``eval_set`` of the FP32 net, of PTQ and of QAT (both as integer emulation), and
    ``emulation_agreement``, the top-1 agreement of the fake-quant model ``fake_quant`` with the
    QAT integer emulation (the check that the exported spec describes what was trained)."""
    log.info("evaluating FP32, PTQ and QAT on %d images of %s", len(eval_set), eval_set.source)
    out = {"fp32_top1": _top1(plain, eval_set)[0], "ptq_top1": _top1(IntegerNet(plain, spec), eval_set)[0]}
    out["qat_top1"], int_logits = _top1(IntegerNet(fine, fine_spec), eval_set)
    agreement = float((predict(fake_quant, eval_set).argmax(1) == int_logits.argmax(1)).float().mean())
    if agreement < 0.99:
        log.warning("the exported spec reproduces only %.2f%% of the fake-quant model's predictions", 100 * agreement)
    return {**out, "emulation_agreement": agreement, "eval_set": eval_set.source}
