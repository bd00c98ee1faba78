"""A small, resumable trainer: enough to produce the bundled models and to fine-tune.

Deterministic by construction: the shuffling and augmentation of epoch ``e`` depend only on
``(seed, e)``, so a run resumed from the checkpoint of epoch ``e`` continues exactly as the
uninterrupted run would have. A checkpoint is written atomically after every epoch; a kill
mid-epoch loses at most that epoch.

The epoch loop (:func:`run_epochs`) is shared with quantization-aware fine-tuning
(:mod:`edgerepvgg.quant.qat`), and so is its data-parallel mode: launched by ``torchrun``, every
rank draws the same per-epoch permutation and augmentation and takes its own slice of each global
batch (``batch_size / world_size`` images); DistributedDataParallel averages the gradients, so
the run computes what one process with the same global batch computes, up to float summation
order. Rank 0 alone reports and writes files. BatchNorm statistics stay per rank in ``train``
(torchvision's reference default without ``--sync-bn``); QAT keeps them frozen.

One process runs on the device it is given (``device=``, see :mod:`edgerepvgg.torch_device`;
default the CPU); ``TrainConfig.amp`` runs the training forward pass under bf16 or fp16 autocast
(fp16 with a loss scaler). ``train(init=CKPT)`` starts from a checkpoint's weights
(:func:`init_from_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from edgerepvgg.checkpoints import ModelMeta, meta_for, read_checkpoint, save_checkpoint
from edgerepvgg.checkpoints import load_state as load_weights
from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import predict, topk_accuracy
from edgerepvgg.io import atomic_path
from edgerepvgg.models import RepVGG, block_class, create_model
from edgerepvgg.torch_device import autocast, check_amp, device_name, distributed_backend, grad_scaler, resolve_device

log = logging.getLogger(__name__)

STATE_FILE = "last.pt"
MODEL_FILE = "model.safetensors"  # the checkpoint a training or QAT run writes in its folder
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved in its checkpoints; a resume must match)."""

    model: str = "A0"
    block: str = "repvgg"
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov momentum 0.9) or adamw
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    crop_padding: int = 4
    hflip: bool = True
    erase_prob: float = 0.5
    seed: int = 0
    amp: str = "off"  # autocast of the training forward pass: off, bf16 or fp16 (with a loss scaler)

    def __post_init__(self) -> None:
        validate_recipe(self)
        block_class(self.block)
        check_amp(self.amp)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")


class Recipe(Protocol):
    """What the shared loop reads from a run's config (:class:`TrainConfig`, ``QATConfig``)."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: float
    crop_padding: int
    hflip: bool
    erase_prob: float
    seed: int


def validate_recipe(config: Recipe) -> None:
    """The checks every run config shares (:class:`TrainConfig`, ``QATConfig``): one ``UserError``
    line naming the setting, its value and the valid range."""
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {config.optimizer!r}; use {' or '.join(OPTIMIZERS)}")
    checks = (
        ("--epochs", config.epochs, config.epochs >= 1, "at least 1"),
        ("--batch-size", config.batch_size, config.batch_size >= 1, "at least 1"),
        ("--lr", config.lr, config.lr > 0 and math.isfinite(config.lr), "positive"),
        ("--weight-decay", config.weight_decay, config.weight_decay >= 0, "0 or more"),
        ("--warmup-epochs", config.warmup_epochs, config.warmup_epochs >= 0, "0 or more"),
        ("crop padding", config.crop_padding, config.crop_padding >= 0, "0 or more"),
        ("erase probability", config.erase_prob, 0.0 <= config.erase_prob <= 1.0, "in [0, 1]"),
    )  # fmt: skip
    for name, value, ok, valid in checks:
        if not ok:
            raise UserError(f"{name} must be {valid}, got {value!r}")


def lr_at(config: Recipe, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero over the remaining steps."""
    warm = int(config.warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def augment(images: torch.Tensor, config: Recipe, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip and random erasing on a uint8 NCHW batch."""
    n, _, h, w = images.shape
    out = images.clone()
    p = config.crop_padding
    if p:
        padded = nn.functional.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        for i in range(n):
            out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    if config.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    if config.erase_prob > 0:
        erase = torch.rand(n, generator=gen) < config.erase_prob
        area = torch.empty(n).uniform_(0.02, 0.25, generator=gen) * h * w
        ratio = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=gen))
        eh = (area * ratio).sqrt().round().clamp(1, h).long()
        ew = (area / ratio).sqrt().round().clamp(1, w).long()
        y0 = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
        x0 = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
        for i in torch.nonzero(erase).flatten().tolist():
            out[i, :, y0[i] : y0[i] + eh[i], x0[i] : x0[i] + ew[i]] = 0
    return out


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN parameters and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: Recipe) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, config: Recipe, history: list,
               **extra) -> None:  # fmt: skip
    """Atomic checkpoint of a run after ``epoch`` epochs; ``extra`` adds keys (plain data only:
    the file must load with ``torch.load(weights_only=True)``)."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
             "config": asdict(config), "history": history, **extra}  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, config: Recipe) -> dict:
    """The run state :func:`save_state` wrote, refused if another config wrote it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which, do not guess
        raise UserError(f"cannot resume from {path} ({exc}); delete it to start over") from exc
    if state.get("config") != asdict(config):
        diff = {k: (v, asdict(config).get(k)) for k, v in state.get("config", {}).items() if asdict(config).get(k) != v}
        raise UserError(f"{path} was written by a run with other settings {diff}; use the same settings or another --out")
    return state


def resume_run(path: Path, config: Recipe, model: nn.Module, opt: torch.optim.Optimizer,
               source: dict | None = None, scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[dict]]:  # fmt: skip
    """Continue a run from its state file: load ``model``, ``opt`` and ``scaler`` (before any DDP
    wrapping, so every rank loads the same file) and return (epochs done, history). The file must
    exist, come from the same ``config`` and, where ``source`` is given, record that same source."""
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist; run without --resume")
    state = load_state(path, config)
    if source is not None and state.get("source") != source:
        raise UserError(f"{path} was written for another model or QuantSpec; use the same ones or another --out")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s after epoch %d", path, state["epoch"])
    return state["epoch"], list(state["history"])


# ---------------------------------------------------------------------------------------------
# Data parallelism (torchrun) and the shared epoch loop


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a data-parallel job; rank 0 of 1 when run plainly."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that reports and writes files."""
        return self.rank == 0

    def per_rank_batch(self, batch_size: int) -> int:
        """This rank's share of a global batch; the global batch must split evenly."""
        if batch_size % self.world_size:
            raise UserError(
                f"--batch-size {batch_size} is the global batch and must divide evenly among the {self.world_size} "
                f"processes; use a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when there is more than one rank."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (identity on one), e.g. the QuantSpec all ranks train with."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (identity on one)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device: str | torch.device | None = None) -> Dist:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), or the one the caller already set up:
    NCCL on each process's GPU, Gloo on the CPU, as ``device`` says
    (:func:`~edgerepvgg.torch_device.distributed_backend`; ``None``: NCCL on CUDA machines).
    Without either: a single process on ``device`` (``None``: the CPU)."""
    import torch.distributed as dist

    if not dist.is_available() or (not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        return Dist(device=resolve_device(device))
    if not dist.is_initialized():
        dist.init_process_group(distributed_backend(device))
    mine = torch.device("cpu")
    if dist.get_backend() == "nccl":
        mine = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(mine)
    return Dist(dist.get_rank(), dist.get_world_size(), mine)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one random stream of an epoch (its permutation, then its augmentation)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def run_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    config: Recipe,
    train_set: TensorDataset,
    step: Step,
    start: int = 0,
    history: list[dict] | None = None,
    evaluate: Callable[[], dict] | None = None,
    save: Callable[[int, list[dict]], None] | None = None,
    dist: Dist | None = None,
    progress: bool = True,
    scaler: torch.amp.GradScaler | None = None,
) -> list[dict]:
    """Epochs ``start .. config.epochs - 1``: each draws its permutation and augmentation from
    :func:`epoch_generator`, runs ``step(x, y) -> (loss, logits)`` on this rank's share of every
    global batch (moved to ``dist.device``) with the learning rate of :func:`lr_at`, then (rank 0)
    ``evaluate()`` and ``save(epoch_done, history)``; ``scaler`` scales the loss (fp16 autocast).
    Returns the history (one record per epoch, all epochs)."""
    from tqdm import tqdm

    dist = dist or Dist()
    history = list(history or [])
    spec = train_set.spec
    n, batch = len(train_set), config.batch_size
    share = dist.per_rank_batch(batch)
    mine = slice(dist.rank * share, (dist.rank + 1) * share)
    steps = n // batch  # drop the last partial batch: BN dislikes tiny batches
    if steps == 0:
        raise UserError(f"{n} training images are fewer than one batch of {batch}; lower --batch-size")
    for epoch in range(start, config.epochs):
        gen = epoch_generator(config.seed, epoch)
        perm = torch.randperm(n, generator=gen)
        model.train()
        t0, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and dist.main),
                   leave=False, mininterval=2)  # fmt: skip
        for i in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(config, epoch * steps + i, steps)
            idx = perm[i * batch : (i + 1) * batch]
            # Every rank augments the whole global batch, so the stream stays the same everywhere.
            images = augment(train_set.images[idx], config, gen)[mine]
            x, y = spec.normalize(images).to(dist.device), train_set.labels[idx][mine].to(dist.device)
            loss, logits = step(x, y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        loss_sum, correct, seen = dist.sum([loss_sum, correct, seen])
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen, "images": int(seen),
                  "seconds": time.time() - t0}  # fmt: skip
        if dist.main and evaluate is not None:
            record.update(evaluate())
        history.append(record)
        if dist.main:
            log.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                     ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch"))  # fmt: skip
            if save is not None:
                save(epoch + 1, history)
    return history


# ---------------------------------------------------------------------------------------------
# Starting from a checkpoint's weights (fine-tuning)

CHANNELS_RULE = {  # how a stem conv's input channels are adapted: (from, to) -> (rule, in words)
    (3, 1): (lambda w: w.sum(1, keepdim=True), "summed over the RGB channels"),
    (1, 3): (lambda w: w.repeat(1, 3, 1, 1) / 3, "repeated over RGB and divided by 3"),
}


def init_variant(ref: str | Path) -> tuple[str, str]:
    """(variant, block type) of the checkpoint ``ref``: what ``train --init`` builds when no
    ``--model`` is given."""
    _, meta, _ = read_checkpoint(ref)
    return meta.variant, meta.block


def init_from_checkpoint(model: RepVGG, ref: str | Path) -> dict:
    """Load the train-time checkpoint ``ref`` (any layout :func:`~edgerepvgg.checkpoints.read_checkpoint`
    reads) into ``model`` for fine-tuning, and return what happened (also logged).

    Every tensor is kept as it is, except: the head (``linear.*``) stays ``model``'s own fresh one
    when the class counts differ; the stem's convolutions are adapted when the input channels
    differ (3 -> 1: summed over the channels, so a grey image gives the stem the response the RGB
    model gives that image in grey; 1 -> 3: repeated and divided by 3). Another variant or block
    type, or a fused checkpoint (its branches are gone), is a one-line ``UserError``."""
    tensors, meta, path = read_checkpoint(ref)
    want = f"{model.block_type} RepVGG-{model.config.name}"
    if meta.fused:
        raise UserError(f"--init {path} is a fused (deploy) checkpoint: its branches are folded into one conv and "
                        f"cannot be trained as a multi-branch {want}; pass the train-time checkpoint")  # fmt: skip
    if (meta.variant, meta.block) != (model.config.name, model.block_type):
        raise UserError(f"--init {path} holds a {meta.block} RepVGG-{meta.variant}, this run trains a {want}; "
                        f"pass --model {meta.variant} --block {meta.block} (only the head and the stem's input "
                        "channels may differ)")  # fmt: skip
    own = model.state_dict()
    start = dict(tensors)
    new: list[str] = []
    adapted: list[str] = []
    if meta.num_classes != model.num_classes:
        for key in [k for k in own if k.startswith("linear.")]:
            start[key] = own[key]
            new.append(key)
    how = ""
    if meta.in_chans != model.in_chans:
        rule, how = CHANNELS_RULE[(meta.in_chans, model.in_chans)]
        for key, value in tensors.items():
            if key.startswith("stage0.") and value.ndim == 4 and value.shape[1] == meta.in_chans:
                start[key] = rule(value.float())
                adapted.append(key)
    load_weights(model, start, path)  # missing/unexpected keys, shapes, NaN: one line each
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    kept = [k for k in counted if k not in new and k not in adapted]
    record = {"source": str(path), "layout": meta.extra.get("source_layout", "edgerepvgg"), "variant": meta.variant,
              "num_classes": meta.num_classes, "in_chans": meta.in_chans, "kept": len(kept),
              "adapted": adapted, "new": new, "channels": how}  # fmt: skip
    log.info("init from %s (%s layout, RepVGG-%s, %d classes, %d channels): kept %d tensors%s%s", path, record["layout"],
             meta.variant, meta.num_classes, meta.in_chans, len(kept),
             f"; adapted {len(adapted)} ({', '.join(adapted)}: {meta.in_chans} -> {model.in_chans} input channels, {how})"
             if adapted else "",
             f"; new {len(new)} ({', '.join(new)}: {meta.num_classes} -> {model.num_classes} classes)" if new else "")  # fmt: skip
    return record


def train(
    config: TrainConfig,
    train_set: TensorDataset,
    eval_set: TensorDataset | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    device: str | torch.device | None = None,
    init: str | Path | None = None,
) -> tuple[nn.Module, ModelMeta]:
    """Train ``config.model`` on ``train_set``; checkpoint to ``out_dir`` every epoch; return the
    trained model (eval mode, on the CPU) and its metadata, also written to
    ``out_dir/model.safetensors`` (by rank 0 under ``torchrun``; see :func:`run_epochs`).

    ``device``: where one process trains (``cpu``, ``cuda``, ``cuda:N``, ``mps``; default the
    CPU); under ``torchrun`` it picks NCCL (``cuda``) or Gloo (``cpu``). ``init``: a checkpoint
    to start from (:func:`init_from_checkpoint`); ``resume`` then continues the run's own state."""
    out_dir = Path(out_dir)
    spec = train_set.spec
    num_classes = len(spec.class_names) or int(train_set.labels.max()) + 1
    dist = init_distributed(device)
    check_amp(config.amp, dist.device)
    dist.per_rank_batch(config.batch_size)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=num_classes, in_chans=spec.channels, block=config.block)
    started = init_from_checkpoint(model, init) if init is not None else None
    if dist.main and dist.device.type != "cpu":
        log.info("training on %s%s", device_name(dist.device), f" with {config.amp} autocast" if config.amp != "off" else "")
    # channels_last pays on CUDA; on the CPU (torch 2.13) its conv backward is ~4x slower and hangs
    # outright for 3-channel 64x64 batches, so CPU training keeps the default layout.
    layout = torch.channels_last if dist.device.type == "cuda" else torch.contiguous_format
    model = model.to(dist.device, memory_format=layout)
    opt = make_optimizer(model, config)
    scaler = grad_scaler(dist.device, config.amp)
    state_path = out_dir / STATE_FILE
    start, history = resume_run(state_path, config, model, opt, scaler=scaler) if resume else (0, [])

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(dist.device, config.amp):
            logits = ddp(x.contiguous(memory_format=layout))
        return loss_fn(logits.float(), y), logits

    def evaluate() -> dict:
        model.eval()
        return {"eval_top1": topk_accuracy(predict(lambda x: model(x.to(dist.device)).cpu(), eval_set), eval_set.labels)}

    def save(epoch: int, history: list[dict]) -> None:
        extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
        save_state(state_path, model, opt, epoch, config, history, **extra)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    ddp = dist.wrap(model)
    history = run_epochs(ddp, opt, config, train_set, step, start, history, evaluate if eval_set is not None else None,
                         save, dist, progress, scaler)  # fmt: skip
    model = model.cpu().eval()
    extra = {"train_config": asdict(config), "history": history, "train_set": train_set.source, "device": str(dist.device)}
    if started is not None:
        extra["init"] = started
    if eval_set is not None and history:
        extra.update(eval_top1=history[-1].get("eval_top1"), eval_set=eval_set.source)
    meta = meta_for(model, spec, **extra)
    if dist.main:
        save_checkpoint(out_dir / MODEL_FILE, model, meta)
    return model, meta
