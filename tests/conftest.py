"""Shared fixtures: tiny models with randomized BatchNorm (trivial BN hides fusion bugs)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model


@pytest.fixture
def rand_bn():
    return randomize_bn


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Calibration statistics are cached under XDG_CACHE_HOME: keep tests out of the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module():
    """Module-scoped fixtures (a module's shared spec, its compiled artifacts) draw from the same
    random state whichever module ran before."""
    _seed_everything()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (as pytest-randomly does): a test's draws must
    not depend on which tests ran before it, or a full run and an isolated one test different inputs."""
    _seed_everything()


@pytest.fixture(autouse=True)
def _host_detected_afresh():
    """The host's CPU is detected once per process (functools.cache): a test that fakes another
    CPU or architecture must not leave its answer to the tests after it (the integer scheme
    follows it)."""
    from edgerepvgg import machine

    yield
    machine.host_features.cache_clear()
    machine.cpu.cache_clear()


@pytest.fixture
def one_thread():
    """One torch thread: bitwise-reproducible runs, and no thread contention on 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fmnist_ckpt(tmp_path_factory) -> Path:
    """A train-time A0 with the bundled models' input spec (random weights, randomized BN)."""
    from edgerepvgg import create_model, save_checkpoint
    from edgerepvgg.checkpoints import meta_for
    from edgerepvgg.data import fashion_mnist_spec

    model = randomize_bn(create_model("A0", num_classes=10, in_chans=1)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "a0.safetensors"
    save_checkpoint(path, model, meta_for(model, fashion_mnist_spec()))
    return path


@pytest.fixture(scope="module")
def plain():
    """A tiny fused A0 (1x16x16 input, 5 classes, randomized BN), one copy per test module."""
    from quant_helpers import tiny_plain  # imported here: quant_helpers imports this module

    return tiny_plain(seed=0, size=16, classes=5).eval()


@pytest.fixture(scope="module")
def x(plain) -> torch.Tensor:
    """16 normalized images for ``plain`` (torch; ``x.numpy()`` for a runner), seeded: the same
    images whatever ran before (unseeded, a full run drew ones that hit a requantization tie)."""
    torch.manual_seed(0)
    return plain.example_input(16).detach()


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: ``code, stdout, stderr = cli("fuse", ...)``."""
    from edgerepvgg.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
