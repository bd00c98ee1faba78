"""A small, resumable CPU trainer: enough to produce the bundled models and to fine-tune.

Deterministic by construction: the shuffling and augmentation of epoch ``e`` depend only on
``(seed, e)``, so a run resumed from the checkpoint of epoch ``e`` continues exactly as the
uninterrupted run would have. A checkpoint is written atomically after every epoch; a kill
mid-epoch loses at most that epoch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgerepvgg.checkpoints import ModelMeta, meta_for, save_checkpoint
from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import predict, topk_accuracy
from edgerepvgg.io import atomic_path
from edgerepvgg.models import create_model

log = logging.getLogger(__name__)

STATE_FILE = "last.pt"
MODEL_FILE = "model.safetensors"


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

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; use sgd or adamw")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("epochs, batch size and learning rate must be positive")


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero over the remaining steps."""
    warm = int(config.warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def augment(images: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> torch.Tensor:
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


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, config: TrainConfig, history: list) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
             "config": asdict(config), "history": history}  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, config: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which, do not guess
        raise UserError(f"cannot resume from {path} ({exc}); delete it to start over") from exc
    if state.get("config") != asdict(config):
        diff = {k: (v, asdict(config).get(k)) for k, v in state.get("config", {}).items() if asdict(config).get(k) != v}
        raise UserError(f"{path} was written by a run with other settings {diff}; use the same settings or another --out")
    return state


def train(
    config: TrainConfig,
    train_set: TensorDataset,
    eval_set: TensorDataset | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, ModelMeta]:
    """Train ``config.model`` on ``train_set``; checkpoint to ``out_dir`` every epoch; return the
    trained model (eval mode) and its metadata, also written to ``out_dir/model.safetensors``."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    spec = train_set.spec
    num_classes = len(spec.class_names) or int(train_set.labels.max()) + 1
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=num_classes, in_chans=spec.channels, block=config.block)
    model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, config)
    history: list[dict] = []
    start = 0
    state_path = out_dir / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise UserError(f"nothing to resume: {state_path} does not exist; run without --resume")
        state = _load_state(state_path, config)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"], list(state["history"])
        log.info("resumed from %s after epoch %d", state_path, start)

    n = len(train_set)
    steps = n // config.batch_size  # drop the last partial batch: BN dislikes tiny batches
    if steps == 0:
        raise UserError(f"{n} training images are fewer than one batch of {config.batch_size}; lower --batch-size")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(start, config.epochs):
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        model.train()
        t0, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False, mininterval=2)
        for i in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(config, epoch * steps + i, steps)
            idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
            x = spec.normalize(augment(train_set.images[idx], config, gen)).contiguous(memory_format=torch.channels_last)
            y = train_set.labels[idx]
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen, "seconds": time.time() - t0}
        if eval_set is not None:
            model.eval()
            record["eval_top1"] = topk_accuracy(predict(model, eval_set), eval_set.labels)
        history.append(record)
        log.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))  # fmt: skip
        _save_state(state_path, model, opt, epoch + 1, config, history)

    model.eval()
    extra = {"train_config": asdict(config), "history": history, "train_set": train_set.source}
    if eval_set is not None and history:
        extra.update(eval_top1=history[-1].get("eval_top1"), eval_set=eval_set.source)
    meta = meta_for(model, spec, **extra)
    save_checkpoint(out_dir / MODEL_FILE, model, meta)
    return model, meta
