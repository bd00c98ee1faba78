"""Structural re-parameterization: a train-time RepVGG becomes a PlainNet, checked equivalent.

``fuse(model)`` is the one public verb: it returns the PlainNet *and* the numerical check it ran
(float64 and float32, on the model's own input size), so the check cannot be skipped.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from edgerepvgg.errors import UserError
from edgerepvgg.inputs import InputSpec, default_spec
from edgerepvgg.models import RepVGG
from edgerepvgg.plain import PlainNet

log = logging.getLogger(__name__)

# Max error relative to the largest output magnitude. float64: 1e-9, the fusion math alone (float64
# end to end, so anything above it is a wrong formula, not rounding); float32: what we hold on every
# variant with randomized BN statistics (measured ~5e-7 on A0 and B1g4 at 64x64).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


@dataclass(frozen=True)
class Equivalence:
    """Result of comparing the train-time model with its fused form on the same input."""

    dtype: str
    max_abs: float
    max_rel: float  # max |a - b| / max |a|
    tolerance: float
    input_shape: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"{self.dtype}: max abs err {self.max_abs:.3e}, max rel err {self.max_rel:.3e} "
                f"(tolerance {self.tolerance:.0e}) on input {list(self.input_shape)}: {verdict}")  # fmt: skip


def reparameterize(model: RepVGG, inplace: bool = False) -> RepVGG:
    """Fuse every block of ``model`` (a copy unless ``inplace``). Idempotent."""
    target = model if inplace else copy.deepcopy(model)
    for block in target.blocks():
        block.fuse_()
    return target


def to_plain(model: RepVGG, input_spec: InputSpec | None = None) -> PlainNet:
    """Build the PlainNet of ``model`` (the input model is not changed). Blocks are copied and
    fused one at a time, so the peak memory is the model, the PlainNet and one block, not two
    more copies of the model (measured: RepVGG-B3 needs ~0.9 GB less)."""
    convs = []
    for block in model.blocks():
        if block.is_fused:
            convs.append(copy.deepcopy(block.rbr_reparam))
        else:
            convs.append(copy.deepcopy(block).fuse_().rbr_reparam)
    return PlainNet(convs, copy.deepcopy(model.linear), input_spec or default_spec(model.in_chans),
                    variant=model.config.name, block=model.block_type).eval()  # fmt: skip


def require_finite(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN or infinite values: fusing it would
    only fail later, in the equivalence check, without saying which tensor is broken."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor.detach())
        if bool(bad.any()):
            nans = int(torch.isnan(tensor.detach()).sum())
            what = f"{nans} NaN value(s)" if nans else f"{int(bad.sum())} infinite value(s)"
            if nans and int(bad.sum()) > nans:
                what += f" and {int(bad.sum()) - nans} infinite value(s)"
            raise UserError(f"{name} holds {what}; the checkpoint is corrupt")


@torch.no_grad()
def compare_outputs(reference: torch.nn.Module, candidate: torch.nn.Module, x: torch.Tensor) -> Equivalence:
    """Run both modules in eval mode on ``x`` and report their largest disagreement."""
    a, b = reference.eval()(x), candidate.eval()(x)
    max_abs = float((a - b).abs().max())
    scale = float(a.abs().max())
    return Equivalence(str(x.dtype).removeprefix("torch."), max_abs, max_abs / scale if scale else max_abs,
                       TOLERANCE.get(x.dtype, 1e-2), tuple(x.shape))  # fmt: skip


def check_equivalence(model: RepVGG, plain: PlainNet, batch: int = 2, seed: int = 0) -> list[Equivalence]:
    """Compare on one seeded random batch: in float64, the fusion math itself (each block of
    ``model`` in float64 against its float64 fusion, the activations carried through the whole
    network on both sides); in float32, the ``plain`` net as shipped against ``model``."""
    x = _check_input(plain.input_spec, batch, seed)
    return [_float64_equivalence(model, x), compare_outputs(model, plain, x.to(plain.head.weight.dtype))]


def _check_input(spec: InputSpec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """The seeded float64 batch both checks run on."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *spec.shape, generator=gen, dtype=torch.float64)


@torch.no_grad()
def _float64_equivalence(model: RepVGG, x: torch.Tensor) -> Equivalence:
    """What ``compare_outputs(model in float64, its PlainNet in float64, x)`` gives, computed one
    block at a time: only one block is ever held in float64 (RepVGG-B3 whole in float64, twice,
    would be ~1.9 GB)."""
    reference, fused = x, x
    for block in model.blocks():
        block64 = copy.deepcopy(block).to(torch.float64).eval()
        reference = block64(reference)
        fused = torch.relu(block64.fuse_().rbr_reparam(fused))  # as PlainNet computes it
        del block64  # before the next block is copied
    head = copy.deepcopy(model.linear).to(torch.float64)
    a = head(torch.flatten(model.gap(reference), 1))
    b = head(fused.mean(dim=(2, 3)))
    max_abs = float((a - b).abs().max())
    scale = float(a.abs().max())
    return Equivalence("float64", max_abs, max_abs / scale if scale else max_abs, TOLERANCE[torch.float64], tuple(x.shape))


def fuse(model: RepVGG, input_spec: InputSpec | None = None, check: bool = True) -> tuple[PlainNet, list[Equivalence]]:
    """Fuse ``model`` into a PlainNet and check it computes the same function.

    A model holding NaN or infinite weights or BatchNorm statistics is a ``UserError`` naming the
    tensor (a corrupt checkpoint). Raises ``AssertionError`` if the fused network disagrees
    beyond tolerance: that is a fusion bug, and it must never produce an artifact."""
    require_finite(model)
    spec = input_spec or default_spec(model.in_chans)
    x = _check_input(spec) if check else None
    # check_equivalence's two checks, the float64 one before the PlainNet exists: its float64
    # copy of the largest block then never meets the PlainNet in memory (RepVGG-B3: ~0.45 GB less)
    results = [_float64_equivalence(model, x)] if check else []
    plain = to_plain(model, spec)
    if check:
        results.append(compare_outputs(model, plain, x.to(plain.head.weight.dtype)))
    for r in results:
        log.debug("fusion check %s", r)
        if not r.ok:
            raise AssertionError(f"fused network is not equivalent to the train-time one: {r}")
    return plain, results
