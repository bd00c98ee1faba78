"""Small synthetic data for tests: Fashion-MNIST-shaped IDX files with learnable classes, and
random normalized batches for a model's input spec."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def synthetic_images(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class decides which horizontal band is bright (plus noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    band = 28 // classes
    for i, y in enumerate(labels):
        images[i, y * band : (y + 1) * band + 1, :] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_fake_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, seed=seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def random_batch(plain, n: int, seed: int = 0) -> np.ndarray:
    """``n`` standard-normal NCHW float32 images shaped for ``plain``'s input spec (what a
    runner takes: numpy, already normalized)."""
    s = plain.input_spec
    return np.random.default_rng(seed).standard_normal((n, *s.shape)).astype(np.float32)
