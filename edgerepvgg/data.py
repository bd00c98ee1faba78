"""Input specification, image decoding and the data sets every stage reads.

The preprocessing (resize, center crop, channels, mean/std) is part of the model: it travels in
every checkpoint as an :class:`InputSpec`, so training, calibration, evaluation and every target
see exactly the same tensors.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from edgerepvgg.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
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
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size})")

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


def fashion_mnist_spec() -> InputSpec:
    """The input spec of the bundled default models: 28x28 grayscale resized to 32x32."""
    return InputSpec(size=32, resize=32, channels=1, mean=(0.2860,), std=(0.3530,), class_names=FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# Decoding one image


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (16-bit, palette, RGBA, CMYK, ...) to L or RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * (255.0 if np.asarray(img).max() <= 1 else 1), 0, 255).astype(np.uint8))
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    target = "L" if channels == 1 else "RGB"
    return img.convert(target) if img.mode != target else img


def resize_and_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize`` (bilinear), then center-crop ``spec.size``."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    return img.crop((left, top, left + spec.size, top + spec.size))


def load_image(path: str | Path, spec: InputSpec) -> torch.Tensor:
    """Decode one image file into a uint8 CHW tensor as the model expects it (EXIF orientation
    honoured). Raises ``OSError``/``ValueError`` for files that are not readable images."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = resize_and_crop(_to_mode(img, spec.channels), spec)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files from Debian's dataset-fashion-mnist)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}; reinstall the data set") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file; point --data at the Fashion-MNIST folder")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} bytes); reinstall the data set")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; "
        "install it with 'apt-get install dataset-fashion-mnist' or pass --data DIR"
    )


def read_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def fashion_mnist_available(root: str | Path | None = None) -> bool:
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    return all(
        (root / n).is_file() or (root / (n + ".gz")).is_file()
        for n in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    )


def prepare_arrays(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Apply the spec's resize/crop/channels to raw grayscale arrays: (N, H, W) -> uint8 NCHW."""
    out = [load_array(a, spec) for a in images]
    return torch.stack(out) if out else torch.empty(0, spec.channels, spec.size, spec.size, dtype=torch.uint8)


def load_array(array: np.ndarray, spec: InputSpec) -> torch.Tensor:
    img = resize_and_crop(_to_mode(Image.fromarray(array), spec.channels), spec)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


@dataclass
class TensorDataset:
    """Preprocessed uint8 images (N, C, H, W) with labels (N,) (-1 where unknown), plus the
    spec that made them and where they came from (stated in every report)."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: InputSpec
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int):
        """Normalized float batches in order: the one data contract for calibration,
        evaluation and every target."""
        for i in range(0, len(self), batch_size):
            yield self.spec.normalize(self.images[i : i + batch_size]), self.labels[i : i + batch_size]


def fashion_mnist(split: str, spec: InputSpec, root: str | Path | None = None, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST preprocessed with ``spec``; ``limit`` keeps the first N images."""
    images, labels = read_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    where = Path(root) if root is not None else FASHION_MNIST_DIR
    return TensorDataset(prepare_arrays(images, spec), torch.from_numpy(labels), spec, f"fashion-mnist:{split} ({where})")
