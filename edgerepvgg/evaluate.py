"""Accuracy metrics over the shared data contract (``TensorDataset.batches``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgerepvgg.data import TensorDataset


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset: TensorDataset, batch_size: int = 256) -> torch.Tensor:
    """Run ``fn`` (a module or any target runner) over the data set; return all logits (N, K)."""
    outs = [torch.as_tensor(fn(x)).float() for x, _ in dataset.batches(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the ``k`` highest logits (ties broken by index)."""
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels.reshape(-1, 1)).any(dim=1).double().mean())
