"""InputSpec: what a network expects at its input. A leaf module (torch only, no image decoding),
so that the model, fusion and checkpoint modules can carry the spec without importing PIL.

The preprocessing (resize, center crop, channels, mean/std) is part of the model: it travels in
every checkpoint, so training, calibration, evaluation and every target see the same tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from edgerepvgg.errors import UserError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: a ``size`` x ``size`` crop of an image whose shorter side was
    resized to ``resize``, with ``channels`` channels, scaled to [0, 1] and normalized."""

    size: int = 224
    resize: int = 256
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise UserError(f"input channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UserError(f"mean and std need one value per channel ({self.channels}), got {len(self.mean)} and {len(self.std)}")
        if self.size < 1:
            raise UserError(f"input size must be at least 1, got {self.size}")
        if self.resize < self.size:
            raise UserError(f"resize ({self.resize}) must be at least the input size ({self.size})")
        if any(not s > 0 for s in self.std):
            raise UserError(f"std values must be positive, got {list(self.std)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        for key in ("mean", "std", "class_names"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (or CHW) in [0, 255] -> normalized float32."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(shape)
        return (images.float() / 255.0 - mean) / std


def default_spec(in_chans: int) -> InputSpec:
    """ImageNet preprocessing for 3 channels; a neutral 0.5/0.5 normalization otherwise."""
    return InputSpec() if in_chans == 3 else InputSpec(channels=in_chans, mean=(0.5,) * in_chans, std=(0.5,) * in_chans)


def fashion_mnist_spec() -> InputSpec:
    """The input spec of the bundled default models: 28x28 grayscale resized to 32x32."""
    return InputSpec(size=32, resize=32, channels=1, mean=(0.2860,), std=(0.3530,), class_names=FASHION_MNIST_CLASSES)


def is_fashion_mnist_spec(spec: InputSpec) -> bool:
    return spec.class_names == FASHION_MNIST_CLASSES
