"""InputSpec: what a network expects at its input. A leaf module (torch only, no image decoding),
so that the model, fusion and checkpoint modules can carry the spec without importing PIL.

The preprocessing (resize, center crop, channels, mean/std) is part of the model: it travels in
every checkpoint, so training, calibration, evaluation and every target see the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from edgerepvgg.errors import UserError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


# PIL's resampling filters by the names timm's configs and torchvision use.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def parse_size(text: str) -> int | tuple[int, int]:
    """``"224"`` -> 224, ``"48x64"`` -> (48, 64) (height x width): what ``--size``/``--resize`` take."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"expected a size N or HxW (e.g. 224 or 48x64), got {text!r}") from None
    if len(values) not in (1, 2):
        raise UserError(f"expected a size N or HxW (e.g. 224 or 48x64), got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def size_text(size: int | tuple[int, int]) -> str:
    """``224`` -> ``"224"``, ``(48, 64)`` -> ``"48x64"``."""
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"


def hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a size."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _canonical(size, what: str) -> int | tuple[int, int]:
    """A checked size: an int N for a square, else a (height, width) tuple."""
    values = [size] if isinstance(size, int) and not isinstance(size, bool) else list(size) if isinstance(size, (tuple, list)) else None
    if values is None or len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise UserError(f"{what} must be a whole number N or a pair (height, width), got {size!r}")
    if any(v < 1 for v in values):
        raise UserError(f"{what} must be at least 1 pixel, got {size_text(values[0] if len(values) == 1 else tuple(values))}")
    return values[0] if len(values) == 1 or values[0] == values[1] else (values[0], values[1])


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: a ``size`` crop (N, or (height, width)) from the center of an
    image resized, aspect ratio kept, until it covers ``resize`` (for a square N: its shorter side
    is N), with ``interpolation``; ``channels`` channels, scaled to [0, 1] and normalized by
    ``mean``/``std``. A square size is stored as an int, a rectangle as (height, width)."""

    size: int | tuple[int, int] = 224
    resize: int | tuple[int, int] = 256
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    class_names: tuple[str, ...] = field(default=())
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _canonical(self.size, "input size"))
        object.__setattr__(self, "resize", _canonical(self.resize, "resize"))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.channels not in (1, 3):
            raise UserError(f"input channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UserError(f"mean and std need one value per channel ({self.channels}), got {len(self.mean)} and {len(self.std)}")
        if any(r < s for r, s in zip(self.resize_hw, self.hw)):
            raise UserError(f"resize ({size_text(self.resize)}) must be at least the input size ({size_text(self.size)}) "
                            "in each dimension")  # fmt: skip
        if not all(math.isfinite(m) for m in self.mean):
            raise UserError(f"mean values must be finite numbers, got {list(self.mean)}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise UserError(f"std values must be positive, got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if any(not isinstance(n, str) or not n.strip() for n in self.class_names):
            raise UserError("class names must be non-empty strings")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        return hw(self.size)

    @property
    def height(self) -> int:
        return self.hw[0]

    @property
    def width(self) -> int:
        return self.hw[1]

    @property
    def resize_hw(self) -> tuple[int, int]:
        """(height, width) the image is resized to cover before the center crop."""
        return hw(self.resize)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width): one input image, CHW."""
        return (self.channels, *self.hw)

    def to_dict(self) -> dict:
        """JSON-ready: sizes as N or [height, width], sequences as lists."""
        d = asdict(self)
        for key in ("size", "resize", "mean", "std", "class_names"):
            d[key] = d[key] if isinstance(d[key], int) else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        for key in ("mean", "std", "class_names"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("size", "resize"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    def describe(self) -> str:
        """One line: ``3x48x64, resize 55x73 bilinear, mean [...], std [...]``."""
        return (f"{self.channels}x{self.height}x{self.width}, resize {size_text(self.resize)} {self.interpolation}, "
                f"mean {list(self.mean)}, std {list(self.std)}")  # fmt: skip

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


# ---------------------------------------------------------------------------------------------
# Overriding what a checkpoint carries (--size, --resize, --mean, --std, --interpolation, --class-names)

FIELDS = ("size", "resize", "mean", "std", "interpolation", "class_names")


@dataclass(frozen=True)
class InputOverrides:
    """Input-spec values given explicitly (the CLI's input options); each one set replaces what
    the checkpoint (or its timm ``config.json``) carries. ``class_names_from`` names the file the
    class names were read from, for the log."""

    size: int | tuple[int, int] | None = None
    resize: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    class_names: tuple[str, ...] | None = None
    class_names_from: str | None = None

    def given(self) -> list[str]:
        """The fields set, in :data:`FIELDS` order."""
        return [f for f in FIELDS if getattr(self, f) is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply_overrides(spec: InputSpec, overrides: InputOverrides | None, num_classes: int | None = None,
                    origins: dict[str, str] | None = None) -> tuple[InputSpec, dict[str, str]]:  # fmt: skip
    """``spec`` with ``overrides`` applied, checked, and where each value now comes from
    (``origins``: field -> source of ``spec``'s values, default ``"checkpoint"``).

    A new size without a new resize keeps the spec's resize/size ratio (224/256 at --size 320
    resizes to 365). Mean and std need one value per input channel; class names one per output
    of the head (``num_classes``). Any bad value is a one-line :class:`UserError`."""
    origins = {f: (origins or {}).get(f, "checkpoint") for f in FIELDS}
    o = overrides or InputOverrides()
    changes: dict = {}
    if o.size is not None:
        changes["size"] = _canonical(o.size, "--size")
        origins["size"] = "--size"
        if o.resize is None:
            (h, w), (rh, rw), (nh, nw) = spec.hw, spec.resize_hw, hw(changes["size"])
            changes["resize"] = (nh * rh // h, nw * rw // w)
            origins["resize"] = f"--size, at the {origins['resize']}'s resize/size ratio"
    if o.resize is not None:
        changes["resize"] = _canonical(o.resize, "--resize")
        origins["resize"] = "--resize"
    for name in ("mean", "std"):
        values = getattr(o, name)
        if values is None:
            continue
        values = tuple(float(v) for v in values)
        if len(values) != spec.channels:
            raise UserError(f"--{name} has {len(values)} value(s) but the model has {spec.channels} input channel(s); "
                            f"give {spec.channels}")  # fmt: skip
        changes[name] = values
        origins[name] = _flag(name)
    if o.interpolation is not None:
        changes["interpolation"] = o.interpolation
        origins["interpolation"] = "--interpolation"
    if o.class_names is not None:
        changes["class_names"] = tuple(o.class_names)
        origins["class_names"] = f"--class-names {o.class_names_from}" if o.class_names_from else "--class-names"
    new = replace(spec, **changes) if changes else spec
    if num_classes is not None and new.class_names and len(new.class_names) != num_classes:
        where = origins["class_names"]
        raise UserError(f"{len(new.class_names)} class names ({where}) for a model with {num_classes} outputs; "
                        f"give exactly {num_classes} names, one per line")  # fmt: skip
    return new, origins


def describe_origins(spec: InputSpec, origins: dict[str, str]) -> str:
    """One line saying each input-spec value and where it came from, for the log."""
    names = f"{len(spec.class_names)} class names" if spec.class_names else "no class names"
    parts = [f"size {size_text(spec.size)} ({origins['size']})", f"resize {size_text(spec.resize)} ({origins['resize']})",
             f"mean {list(spec.mean)} ({origins['mean']})", f"std {list(spec.std)} ({origins['std']})",
             f"interpolation {spec.interpolation} ({origins['interpolation']})", f"{names} ({origins['class_names']})"]  # fmt: skip
    return "input spec: " + ", ".join(parts)


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names from a text file, one per line in the head's output order (blank lines and
    surrounding spaces ignored). A name may repeat: ImageNet's readable names hold two "crane"s."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"class-names file {str(path)!r} not found; pass a text file with one class name per line")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read class-names file {path}: {exc}; pass a UTF-8 text file, one name per line") from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise UserError(f"class-names file {path} holds no names; put one class name per line")
    return names
