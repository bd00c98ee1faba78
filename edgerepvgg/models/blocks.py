"""RepVGG and QARepVGG blocks: multi-branch for training, one 3x3 conv for inference.

Every block implements the re-parameterization protocol:

- ``fused_kernel_bias()`` returns the (kernel, bias) of the single 3x3 conv that computes what the
  block computes before its ReLU (exact in eval mode: BN uses its running statistics);
- ``fuse_()`` swaps the branches for that conv in place; calling it again does nothing;
- ``deploy=True`` builds the block directly in its fused form, for loading deploy checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from edgerepvgg.errors import UserError


def fold_bn(kernel: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into that conv's kernel and bias."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias + (b - bn.running_mean) * scale


def _pad_1x1(kernel: torch.Tensor) -> torch.Tensor:
    return nn.functional.pad(kernel, [1, 1, 1, 1])


def _identity_kernel(channels: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel that copies each input channel to the same output channel, per group."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group, 1, 1] = 1.0
    return kernel


class ConvBN(nn.Sequential):
    """Conv (no bias) followed by BatchNorm; the official repo names them ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn(self.conv.weight, None, self.bn)


class _ReparamBlock(nn.Module):
    """Shared shape bookkeeping and the fuse protocol for both block types."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, deploy: bool):
        super().__init__()
        if cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} are not divisible by groups={groups}")
        self.in_channels, self.out_channels = cin, cout
        self.stride, self.groups = stride, groups
        self.has_identity = cin == cout and stride == 1
        self.act = nn.ReLU()
        if deploy:
            self.rbr_reparam = self._fused_conv()

    def _fused_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, groups=self.groups, bias=True)

    @property
    def is_fused(self) -> bool:
        return hasattr(self, "rbr_reparam")

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def fuse_(self) -> "_ReparamBlock":
        """Replace the training branches by one 3x3 conv, in place. Idempotent."""
        if self.is_fused:
            return self
        kernel, bias = self.fused_kernel_bias()
        conv = self._fused_conv().to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        for name in self._branch_names:
            if hasattr(self, name):
                delattr(self, name)
        self.rbr_reparam = conv
        return self

    _branch_names: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, groups={self.groups}, fused={self.is_fused}"


class RepVGGBlock(_ReparamBlock):
    """RepVGG block (Ding et al., 2021): ReLU(BN(3x3) + BN(1x1) + BN(x)).

    The identity branch exists only when input and output shapes match (stride 1, same channels).
    """

    _branch_names = ("rbr_dense", "rbr_1x1", "rbr_identity")

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False):
        super().__init__(cin, cout, stride, groups, deploy)
        if deploy:
            return
        self.rbr_dense = ConvBN(cin, cout, 3, stride, groups)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride, groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if self.has_identity else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fused:
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_fused:
            return self.rbr_reparam.weight, self.rbr_reparam.bias
        k3, b3 = self.rbr_dense.fused()
        k1, b1 = self.rbr_1x1.fused()
        kernel, bias = k3 + _pad_1x1(k1), b3 + b1
        if self.rbr_identity is not None:
            kid, bid = fold_bn(_identity_kernel(self.in_channels, self.groups, k3), None, self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias


class QARepVGGBlock(_ReparamBlock):
    """Quantization-aware RepVGG block (Chu et al., "Make RepVGG Greater Again", AAAI 2024).

    ReLU(BN_post(BN(3x3) + 1x1 + x)): the identity branch has no BN and the 1x1 branch is a bare
    conv, so the fused weight distribution stays narrow; one BN after the sum keeps training
    stable. The 1x1 conv has no bias, as in the authors' release: a bias before a BN is cancelled
    by the BN's mean subtraction while training, so it would only add dead parameters.
    """

    _branch_names = ("rbr_dense", "rbr_1x1", "bn")

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False):
        super().__init__(cin, cout, stride, groups, deploy)
        if deploy:
            return
        self.rbr_dense = ConvBN(cin, cout, 3, stride, groups)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fused:
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            out = out + x
        return self.act(self.bn(out))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_fused:
            return self.rbr_reparam.weight, self.rbr_reparam.bias
        k3, b3 = self.rbr_dense.fused()
        kernel = k3 + _pad_1x1(self.rbr_1x1.weight)
        if self.has_identity:
            kernel = kernel + _identity_kernel(self.in_channels, self.groups, k3)
        return fold_bn(kernel, b3, self.bn)


BLOCKS: dict[str, type[_ReparamBlock]] = {"repvgg": RepVGGBlock, "qarepvgg": QARepVGGBlock}


def block_class(block: str) -> type[_ReparamBlock]:
    """The block class of a block type name: the one place a block type is validated."""
    try:
        return BLOCKS[block]
    except (KeyError, TypeError):
        raise UserError(f"unknown block type {block!r}; choose one of {', '.join(BLOCKS)}") from None
