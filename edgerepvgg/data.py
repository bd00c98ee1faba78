"""Image decoding and the data sets every stage reads, preprocessed with the model's
:class:`~edgerepvgg.inputs.InputSpec`.

Image folders come in two layouts. A *labelled* folder (:func:`image_folder`) has one subfolder
per class, ImageFolder style; a *flat* folder (:func:`image_files`) is any tree of unlabelled
images, e.g. calibration images. :func:`load_images` tells them apart. In both, files whose suffix
is not an image suffix, and hidden files and folders (``.DS_Store``, ``._x.jpg``,
``.ipynb_checkpoints``) are ignored quietly; an image file that cannot be decoded is skipped with
a warning, counted, and recorded in ``TensorDataset.skipped``.

Memory is bounded whatever the folder's size. A subset (``limit``: ``--eval-limit``,
``--calib-limit``) is chosen among the FILES, class-balanced where labelled and seeded, before
anything is decoded. A set whose decoded images fit in ``PRELOAD_BYTES`` is decoded once, by
worker processes, into a :class:`TensorDataset`; a larger one becomes an :class:`ImageFiles`,
whose headers are checked up front (a file that is not an image is skipped as above) and whose
images are decoded batch by batch, by worker processes, on every pass: at most
``workers * PREFETCH + 2`` batches of decoded images exist at once. A file whose header
passed but whose body cannot be decoded (truncated) stops such a pass with one line naming it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from edgerepvgg.errors import UserError
from edgerepvgg.inputs import FASHION_MNIST_CLASSES, InputSpec, default_spec, fashion_mnist_spec, is_fashion_mnist_spec  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared lower-cased
# What a file may decode as, whatever its suffix says (a PNG named .jpg is fine). PIL's JPEG
# opener also returns the multi-picture (MPO) JPEGs that many phone cameras write.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
# Decompression-bomb guard, checked from the header before any pixel is decoded. It replaces
# PIL's own check (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that) while we
# decode, and equals PIL's error threshold.
MAX_IMAGE_PIXELS = 178_956_970
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_BUNDLED = Path(__file__).resolve().parent / "_bundled"  # in a wheel: calibration/, mapped in by pyproject.toml

DEFAULT_CALIB_LIMIT = 512  # calibration images used by default (NNCF samples 300, ModelOpt suggests 128-512)
# Decoded sets up to this size (uint8 pixels) are held in memory, decoded once; larger ones stream.
PRELOAD_BYTES = 256 << 20
PREFETCH = 2  # batches each worker process decodes ahead
_PARALLEL_MIN_PIXELS = 25_000_000  # by default, fewer pixels in all are decoded here: starting workers would cost more

# What PIL raises for a file that is not a readable image (UnidentifiedImageError and a truncated
# file's error are OSErrors). Nothing broader: a bug must not pass for a bad file.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)


def slugify(name: str) -> str:
    """``"T-shirt/top"`` -> ``"t-shirt-top"``: lower case, runs of other characters -> ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Decoding one image

_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Decode with PIL's truncated-image tolerance off and its bomb check replaced by ours,
    whatever another library set globally; restored afterwards."""
    with _PIL_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L (``channels == 1``) or RGB: 16/32-bit integer and float
    grayscale are rescaled to 8 bits (not clipped, as ``Image.convert`` would); palette and
    alpha images are composited on black; CMYK, YCbCr, bilevel etc. go through ``convert``."""
    if img.mode.startswith("I;16"):  # 16-bit PNG, any byte order: full range is 0..65535
        arr = np.asarray(img).astype(np.float64) / 65535.0 * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "I":  # 32-bit integer: 8-bit data if it fits, else assume 16-bit
        arr = np.asarray(img).astype(np.float64)
        arr = arr / 65535.0 * 255.0 if arr.size and arr.max() > 255 else arr
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":  # float: [0, 1] if it fits, else [0, 255]
        arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return img.convert(target) if img.mode != target else img


_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
             "box": Image.BOX, "hamming": Image.HAMMING}  # fmt: skip


def resize_and_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize, aspect ratio kept, until the image covers ``spec.resize`` (for a square N: the
    shorter side becomes N; timm's ResizeKeepRatio for a rectangle), with ``spec.interpolation``;
    then center-crop ``spec.size`` (height x width)."""
    w, h = img.size
    (rh, rw), (ch, cw) = spec.resize_hw, spec.hw
    scale = max(rh / h, rw / w)
    nw, nh = max(cw, round(w * scale)), max(ch, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
    left, top = (nw - cw) // 2, (nh - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def _check_size(img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{w}x{h} pixels is over the decompression-bomb limit of {MAX_IMAGE_PIXELS}")
    if w == 0 or h == 0:
        raise ValueError(f"empty image ({w}x{h})")


def check_image(path: str | Path) -> None:
    """Read only the header of ``path``: raises as :func:`load_image` does for a file that is not
    a JPEG/PNG/BMP/WebP image or is too large; a truncated body is only found by decoding it."""
    with _strict_pil(), Image.open(path, formats=IMAGE_FORMATS) as img:
        _check_size(img)


def load_image(path: str | Path, spec: InputSpec) -> torch.Tensor:
    """Decode one JPEG/PNG/BMP/WebP file into a uint8 CHW tensor as the model expects it (EXIF
    orientation honoured). Raises ``OSError``/``ValueError`` (or another of PIL's decode errors)
    for a file that is not such an image, is truncated, or has more than ``MAX_IMAGE_PIXELS``."""
    with _strict_pil(), Image.open(path, formats=IMAGE_FORMATS) as img:
        _check_size(img)
        img.load()  # decodes fully; a truncated file raises here
        oriented = ImageOps.exif_transpose(img)
    return _to_tensor(resize_and_crop(_to_mode(oriented, spec.channels), spec))


def load_array(array: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """One raw (H, W) uint8 array -> uint8 CHW tensor with the spec's resize/crop/channels."""
    return _to_tensor(resize_and_crop(_to_mode(Image.fromarray(array), spec.channels), spec))


def prepare_arrays(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Apply the spec's resize/crop/channels to raw grayscale arrays: (N, H, W) -> uint8 NCHW."""
    out = [load_array(a, spec) for a in images]
    return torch.stack(out) if out else torch.empty(0, *spec.shape, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# The data set every stage reads


@dataclass
class TensorDataset:
    """Preprocessed uint8 images (N, C, H, W) with labels (N,) int64 (-1 where unknown), plus the
    spec that made them and where they came from (stated in every report). ``class_names[i]``
    names label ``i`` where known; ``skipped`` lists the files that could not be decoded.

    The data contract every stage reads is ``len()``, ``labels`` and :meth:`batches`;
    :class:`ImageFiles` streams the same contract from image files."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: InputSpec
    source: str
    class_names: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def labelled(self) -> bool:
        return len(self) > 0 and bool((self.labels >= 0).all())

    def batches(self, batch_size: int):
        """Normalized float batches in order: the one data contract for calibration,
        evaluation and every target."""
        for i in range(0, len(self), batch_size):
            yield self.spec.normalize(self.images[i : i + batch_size]), self.labels[i : i + batch_size]

    def fingerprint(self) -> str:
        """Hash of the preprocessed images and their normalization: identical tensors, identical statistics."""
        h = hashlib.sha256(self.images.contiguous().numpy().data)  # the buffer itself, not a copy of it
        h.update(str(tuple(self.images.shape)).encode())
        h.update(repr((self.spec.mean, self.spec.std)).encode())  # the same pixels normalized otherwise are other tensors
        return h.hexdigest()[:16]


def balanced_indices(labels: np.ndarray | Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """``n`` of the positions of ``labels`` (sorted), drawn at random with ``seed``: as many per
    label as the labels allow, evenly (a label with too few gives all of its own and the others
    make up the rest; the labels that get one more when ``n`` does not divide are drawn with the
    seed too); uniformly at random when any label is unknown (-1). All of them when ``n`` is at
    least their number. The same labels, ``n`` and seed give the same positions everywhere."""
    labels = np.asarray(labels, dtype=np.int64)
    if n < 1:
        raise ValueError("n must be at least 1")
    if n >= labels.size:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    if (labels < 0).any():
        return np.sort(rng.choice(labels.size, size=n, replace=False))
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.minimum(counts, n // classes.size)
    extra_order = np.random.default_rng((seed, 1)).permutation(classes.size)  # its own stream: quotas never shift the draws
    while quota.sum() < n:
        for k in extra_order:
            if quota.sum() < n and quota[k] < counts[k]:
                quota[k] += 1
    # One draw per class, in label order, from one generator (the same draws stratified_subset makes).
    keep = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep))


def _sample_note(index: np.ndarray, labels: np.ndarray, total: int, seed: int) -> str:
    """How a subset was chosen, for the data set's source (and so every report)."""
    chosen = labels[index]
    if (labels >= 0).all():
        per_class = np.unique(chosen, return_counts=True)[1]
        if per_class.size == np.unique(labels).size and (per_class == per_class[0]).all():
            return f", {int(per_class[0])} per class (seed {seed})"
        return f", a class-balanced sample of {total} (seed {seed})"
    return f", a random sample of {total} (seed {seed})"


def stratified_subset(dataset: TensorDataset, per_class: int, seed: int = 0) -> TensorDataset:
    """A class-balanced subset: ``per_class`` images drawn at random (``seed``) from each label,
    all of a class if it has fewer (with a warning); kept in the data set's original order."""
    if per_class < 1:
        raise ValueError("per_class must be at least 1")
    labels = dataset.labels.numpy()
    if len(dataset) == 0 or (labels < 0).any():
        raise UserError(f"{dataset.source} is not labelled; a class-balanced subset needs a labelled data set")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            log.warning("class %d has only %d of the %d images asked for; taking all of them", c, idx.size, per_class)
        keep.append(rng.choice(idx, size=min(per_class, idx.size), replace=False))
    return subset(dataset, np.sort(np.concatenate(keep)), f"{dataset.source}, {per_class} per class (seed {seed})")


def subset(dataset: TensorDataset, index: np.ndarray | Sequence[int], source: str) -> TensorDataset:
    """The images at positions ``index`` (in that order) under a new ``source``; an
    :class:`ImageFiles` stays a set of files (nothing is decoded)."""
    index = np.asarray(index, dtype=np.int64)
    if isinstance(dataset, ImageFiles):
        return ImageFiles([dataset.paths[i] for i in index], dataset.labels[torch.from_numpy(index)], dataset.spec, source,
                          dataset.class_names, list(dataset.skipped), root=dataset.root, workers=dataset.workers)  # fmt: skip
    t = torch.from_numpy(index)
    return replace(dataset, images=dataset.images[t], labels=dataset.labels[t], skipped=list(dataset.skipped), source=source)


# ---------------------------------------------------------------------------------------------
# Decoding many files: in worker processes (torch's DataLoader), or here for a few


def default_workers() -> int:
    """Decoding processes by default: up to 4, never more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus))


def _workers(requested: int | None, paths: Sequence[Path]) -> int:
    """Worker processes to decode ``paths``: ``requested``; by default (None)
    :func:`default_workers`, or none when there is little to decode (the files times the pixels
    of the first: starting workers costs more than 1,000 bundled 28x28 PNGs take to decode here)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
            raise UserError(f"workers must be a whole number of at least 0, got {requested!r}")
        return requested
    if not paths:
        return 0
    try:
        with _strict_pil(), Image.open(paths[0], formats=IMAGE_FORMATS) as img:
            pixels = img.size[0] * img.size[1]
    except _DECODE_ERRORS:
        pixels = 224 * 224  # a typical photo: the header check will name the file
    return default_workers() if len(paths) * pixels >= _PARALLEL_MIN_PIXELS else 0


class _Decode(torch.utils.data.Dataset):
    """File ``i`` -> ``(i, uint8 CHW tensor, None)``, or ``(i, None, reason)`` when it cannot be
    decoded: a bad file is an answer, not an exception, so no worker ever prints a traceback."""

    def __init__(self, paths: Sequence[Path], spec: InputSpec | None) -> None:
        self.paths, self.spec = list(paths), spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.spec is None:  # header only
                check_image(self.paths[i])
                return i, None, None
            return i, load_image(self.paths[i], self.spec), None
        except _DECODE_ERRORS as exc:
            return i, None, _reason(exc)


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch of :class:`_Decode` answers -> (positions decoded, their images stacked, the
    failures as (position, reason)). Stacked where decoded: a worker hands over one shared tensor
    per batch, not one (and one file descriptor) per image."""
    tensors = [t for _, t, reason in items if reason is None and t is not None]
    return ([i for i, _, reason in items if reason is None], torch.stack(tensors) if tensors else None,
            [(i, reason) for i, _, reason in items if reason is not None])  # fmt: skip


def _decoded(paths: Sequence[Path], spec: InputSpec | None, batch_size: int, workers: int) -> Iterator[tuple]:
    """:func:`_collate`'s batches for ``paths`` in order, ``batch_size`` files at a time,
    decoded (``spec``) or only header-checked (``spec=None``) by ``workers`` processes (0: in
    this process), each at most ``PREFETCH`` batches ahead of the reader."""
    extra = {"prefetch_factor": PREFETCH} if workers else {}
    loader = torch.utils.data.DataLoader(_Decode(paths, spec), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate, **extra)  # fmt: skip
    yield from loader


# ---------------------------------------------------------------------------------------------
# Image folders, streamed


class ImageFiles(TensorDataset):
    """Image files (already header-checked) read lazily: :meth:`batches` decodes them batch by
    batch in ``workers`` processes (0: in this process) on every pass, so memory stays bounded
    (about ``workers * PREFETCH + 2`` batches of decoded images) whatever the number of
    files. Labels, ``len()``, source and class names are known without decoding anything.
    ``images`` decodes them all into memory at once: for small sets and inspection only."""

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, spec: InputSpec, source: str,
                 class_names: tuple[str, ...] = (), skipped: list[str] | None = None, *, root: Path,
                 workers: int | None = None) -> None:  # fmt: skip
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} files but {labels.shape[0]} labels")
        self.paths, self.labels, self.spec, self.source = list(paths), labels, spec, source
        self.class_names, self.skipped, self.root, self.workers = tuple(class_names), list(skipped or []), Path(root), workers
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageFiles):
            return NotImplemented
        return (self.paths, self.spec, self.source, self.class_names) == (other.paths, other.spec, other.source,
                                                                          other.class_names) and torch.equal(self.labels, other.labels)  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def _uint8_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, slice]]:
        for kept, x, failed in _decoded(self.paths, self.spec, batch_size, _workers(self.workers, self.paths)):
            if failed:
                i, reason = failed[0]
                raise UserError(f"{self.paths[i]} cannot be decoded ({reason}) although its header could be read; "
                                f"remove or replace the file and run again")  # fmt: skip
            yield x, slice(kept[0], kept[-1] + 1)

    def batches(self, batch_size: int):
        """Normalized float batches in order, decoded as they are read (see the class)."""
        for x, where in self._uint8_batches(batch_size):
            yield self.spec.normalize(x), self.labels[where]

    @property
    def images(self) -> torch.Tensor:  # type: ignore[override]
        """Every image decoded, in one tensor (not kept): what the pipeline never asks for."""
        c, h, w = self.spec.shape
        log.warning("decoding all %d images of %s into memory (%.0f MB)", len(self), self.source, len(self) * c * h * w / 1e6)
        out = [x for x, _ in self._uint8_batches(256)]
        return torch.cat(out) if out else torch.empty(0, c, h, w, dtype=torch.uint8)

    def fingerprint(self) -> str:
        """Hash of the files' bytes, their relative paths and the input spec (computed once):
        the same files read the same way give the same statistics, with nothing decoded."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps({**self.spec.to_dict(), "class_names": None}, sort_keys=True).encode())
            for path in self.paths:
                h.update(path.relative_to(self.root).as_posix().encode() + b"\0")
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            self._fingerprint = "files-" + h.hexdigest()[:10]
        return self._fingerprint

# ---------------------------------------------------------------------------------------------
# Image folders

_SUFFIX_HELP = "JPEG, PNG, BMP or WebP"


def _check_dir(root: Path) -> None:
    if not root.exists():
        raise UserError(f"image folder {root} does not exist; pass a folder of {_SUFFIX_HELP} images")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass a folder of {_SUFFIX_HELP} images")


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_paths(folder: Path, root: Path) -> list[Path]:
    """Image-suffixed files under ``folder`` (recursively), hidden ones left out, sorted by their
    path relative to ``root`` so the order is the same on every machine."""
    found = [
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, root) and p.is_file()
    ]  # fmt: skip
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return f"not a {_SUFFIX_HELP} image"
    return f"{type(exc).__name__}: {exc}"


def _read_files(paths: list[Path], labels: list[int], root: Path, spec: InputSpec, source: Callable[[int], str],
                class_names: tuple[str, ...], limit: int | None, seed: int, workers: int | None,
                preload_bytes: float | None) -> TensorDataset:  # fmt: skip
    """The data set of ``paths`` (labels ``labels``, -1 where unknown): ``limit`` of them chosen
    first (:func:`balanced_indices` with ``seed``), then decoded into memory when their decoded
    pixels fit in ``preload_bytes``, else header-checked and streamed (:class:`ImageFiles`). Either
    way a file that fails is skipped with a warning, and the summary is warned once more."""
    if limit is not None and limit < 1:
        raise UserError(f"the image limit must be at least 1, got {limit}")
    total, label_array, note = len(paths), np.asarray(labels, dtype=np.int64), ""
    if limit is not None and limit < total:
        index = balanced_indices(label_array, limit, seed)
        note = _sample_note(index, label_array, total, seed)
        paths, label_array = [paths[i] for i in index], label_array[index]
        log.info("%s: reading %d of its %d images%s", root, len(paths), total, note)
    stream = len(paths) * math.prod(spec.shape) > (PRELOAD_BYTES if preload_bytes is None else preload_bytes)
    kept, batches, skipped, reasons = [], [], [], []
    for decoded, x, failed in _decoded(paths, None if stream else spec, 256 if stream else 64, _workers(workers, paths)):
        kept += decoded
        if x is not None:
            batches.append(x)
        for i, reason in failed:
            log.warning("skipping %s: %s", paths[i], reason)
            skipped.append(str(paths[i]))
            reasons.append(f"{paths[i].relative_to(root).as_posix()} ({reason})")
    if skipped:
        listed = "; ".join(reasons[:10]) + (f"; and {len(reasons) - 10} more" if len(reasons) > 10 else "")
        log.warning("skipped %d of %d files in %s: %s", len(skipped), len(paths), root, listed)
    if not kept:
        raise UserError(
            f"none of the {len(paths)} image files in {root} could be decoded (first: {reasons[0]}); "
            f"pass a folder of readable {_SUFFIX_HELP} images"
        )
    kept_labels = torch.from_numpy(label_array[kept])
    if stream:
        log.info("%s: %d images, decoded batch by batch on every pass (%.0f MB if all were held)", root, len(kept),
                 len(kept) * math.prod(spec.shape) / 1e6)  # fmt: skip
        return ImageFiles([paths[i] for i in kept], kept_labels, spec, source(len(kept)) + note, class_names, skipped,
                          root=root, workers=workers)  # fmt: skip
    return TensorDataset(torch.cat(batches), kept_labels, spec, source(len(kept)) + note, class_names, skipped)


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _match_class(folder: str, class_names: Sequence[str]) -> list[int]:
    """Indices of the classes a folder name can mean: its slug equals the class's slug, or it is
    ``"<i>-<slug of class i>"`` (the prefix makes folders sort in label order)."""
    slug = slugify(folder)
    prefixed = re.fullmatch(r"(\d+)[-_ ](.+)", folder)
    hits = [i for i, name in enumerate(class_names) if slugify(name) == slug]
    if prefixed and int(prefixed.group(1)) < len(class_names):
        i = int(prefixed.group(1))
        if slugify(class_names[i]) == slugify(prefixed.group(2)) and i not in hits:
            hits.append(i)
    return hits


def _assign_labels(
    folders: list[Path], root: Path, class_names: Sequence[str] | None
) -> tuple[list[int], tuple[str, ...]]:
    if not class_names:  # None, or a spec without class names
        return list(range(len(folders))), tuple(f.name for f in folders)
    class_names = tuple(class_names)
    labels, unknown, ambiguous, seen = [], [], [], {}
    for folder in folders:
        hits = _match_class(folder.name, class_names)
        if not hits:
            unknown.append(folder.name)
        elif len(hits) > 1:
            ambiguous.append(folder.name)
        else:
            labels.append(hits[0])
            seen.setdefault(hits[0], []).append(folder.name)
    if unknown or ambiguous:
        what = f"unknown class folders {unknown}" if unknown else f"ambiguous class folders {ambiguous}"
        raise UserError(
            f"{root} has {what}; the model's classes are {list(class_names)} "
            f"(folders are named after a class, e.g. {slugify(class_names[0])!r} or '0-{slugify(class_names[0])}')"
        )
    twice = {class_names[i]: names for i, names in seen.items() if len(names) > 1}
    if twice:
        raise UserError(f"{root} has more than one folder for the same class: {twice}; merge them")
    return labels, class_names


def image_folder(root: str | Path, spec: InputSpec, class_names: Sequence[str] | None = None, *, limit: int | None = None,
                 seed: int = 0, workers: int | None = None, preload_bytes: float | None = None) -> TensorDataset:  # fmt: skip
    """A labelled image folder: ``root/<class>/**/<image>``, preprocessed with ``spec``.

    Without ``class_names`` (or with an empty one) the labels follow the sorted subfolder names
    (torchvision's ImageFolder rule). With ``class_names`` (e.g. the model's
    ``spec.class_names``) label ``i`` is ``class_names[i]``, and each subfolder must name one
    class: the class name itself or its slug (``"T-shirt/top"`` -> ``t-shirt-top``), optionally
    prefixed with its index (``0-t-shirt-top``, which makes the folders sort in label order).
    Any other subfolder is a ``UserError`` naming it; a class without a folder has no images.

    ``limit``: a class-balanced, seeded choice of that many files, made before any is decoded.
    ``workers``: decoding processes (None: :func:`default_workers`; 0: this process). A set whose
    decoded pixels exceed ``preload_bytes`` (None: ``PRELOAD_BYTES``) is streamed
    (:class:`ImageFiles`), else held in memory.
    """
    root = Path(root)
    _check_dir(root)
    loose = [p for p in _image_paths(root, root) if p.parent == root]
    if loose:
        raise UserError(
            f"{root} has images outside class subfolders ({', '.join(p.name for p in loose[:3])}"
            f"{', ...' if len(loose) > 3 else ''}); move every image into a folder named after its class"
        )
    folders = _class_folders(root)
    folder_labels, names = _assign_labels(folders, root, class_names)
    paths, labels = [], []
    for folder, label in zip(folders, folder_labels):
        found = _image_paths(folder, root)
        if not found:
            log.warning("class folder %s has no %s images", folder, _SUFFIX_HELP)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise UserError(
            f"{root} has no {_SUFFIX_HELP} images in class subfolders; "
            "put each image in a subfolder named after its class (<folder>/<class>/<image>)"
        )
    return _read_files(paths, labels, root, spec, lambda n: f"image-folder:{root} ({n} images, {len(folders)} class folders)",
                       names, limit, seed, workers, preload_bytes)  # fmt: skip


def image_files(root: str | Path, spec: InputSpec, *, limit: int | None = None, seed: int = 0, workers: int | None = None,
                preload_bytes: float | None = None) -> TensorDataset:  # fmt: skip
    """Every image under ``root`` (recursively, sorted by path), unlabelled (labels are -1):
    e.g. calibration images from the deployment domain. ``limit`` (a seeded random choice of
    files, made before decoding), ``workers`` and ``preload_bytes`` as in :func:`image_folder`."""
    root = Path(root)
    _check_dir(root)
    paths = _image_paths(root, root)
    if not paths:
        raise UserError(f"{root} has no {_SUFFIX_HELP} images (subfolders searched too); pass a folder that holds some")
    return _read_files(paths, [-1] * len(paths), root, spec, lambda n: f"image-files:{root} ({n} images)", (), limit, seed,
                       workers, preload_bytes)  # fmt: skip


def is_labelled_folder(root: str | Path) -> bool:
    """True when ``root`` holds images and every one of them is inside a first-level subfolder
    (the ImageFolder layout); False for a flat folder or one with images directly in it."""
    root = Path(root)
    _check_dir(root)
    paths = _image_paths(root, root)
    return bool(paths) and all(p.parent != root for p in paths)


def load_images(path: str | Path, spec: InputSpec, class_names: Sequence[str] | None = None, *, limit: int | None = None,
                seed: int = 0, workers: int | None = None, preload_bytes: float | None = None) -> TensorDataset:  # fmt: skip
    """:func:`image_folder` if every image of ``path`` lives in a first-level subfolder, else
    :func:`image_files` (``class_names`` is then not used); the keywords as there."""
    options = {"limit": limit, "seed": seed, "workers": workers, "preload_bytes": preload_bytes}
    if is_labelled_folder(path):
        log.info("%s: one subfolder per class, reading it as a labelled image folder", path)
        return image_folder(path, spec, class_names, **options)
    return image_files(path, spec, **options)


# ---------------------------------------------------------------------------------------------
# Bundled calibration and evaluation images (calibration/ at the top of the repository)


def _bundled(*parts: str) -> Path:
    """The installed copy (a wheel), else the checkout's top-level ``calibration/`` (an editable install)."""
    candidates = (_BUNDLED.joinpath(*parts), Path(__file__).resolve().parents[1].joinpath("calibration", *parts))
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise UserError(
        f"the bundled images ({'/'.join(parts)}) are missing from this installation ({_BUNDLED}); "
        "reinstall edgerepvgg or pass your own folder of images"
    )


def bundled_calibration_dir() -> Path:
    """The flat folder of 256 class-balanced Fashion-MNIST training images for calibration."""
    return _bundled("fashion-mnist", "images")


def bundled_eval_dir() -> Path:
    """The labelled folder of 1,000 Fashion-MNIST test images (100 per class, ``<i>-<slug>/``),
    used when the full test set is not installed."""
    return _bundled("fashion-mnist", "eval")


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
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated (its header is incomplete); reinstall the data set")
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
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"Fashion-MNIST {split}: expected (N, H, W) images and (N,) labels in {root}")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def fashion_mnist_available(root: str | Path | None = None) -> bool:
    """True when the Fashion-MNIST test split (images and labels, raw or .gz) is installed."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    return all(
        (root / n).is_file() or (root / (n + ".gz")).is_file()
        for n in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    )


def fashion_mnist(split: str, spec: InputSpec, root: str | Path | None = None, limit: int | None = None, *,
                  sample: int | None = None, seed: int = 0) -> TensorDataset:  # fmt: skip
    """Fashion-MNIST preprocessed with ``spec``; ``limit`` keeps the first N images, ``sample`` a
    class-balanced choice of N (:func:`balanced_indices` with ``seed``), made before preprocessing."""
    images, labels = read_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    where = Path(root) if root is not None else FASHION_MNIST_DIR
    source = f"fashion-mnist:{split} ({where})"
    if sample is not None and sample < len(labels):
        index = balanced_indices(labels, sample, seed)
        source += _sample_note(index, labels, len(labels), seed)
        images, labels = images[index], labels[index]
    return TensorDataset(prepare_arrays(images, spec), torch.from_numpy(labels), spec, source, FASHION_MNIST_CLASSES)


def calibration_images(spec: InputSpec, images: str | Path | None = None, limit: int | None = DEFAULT_CALIB_LIMIT, *,
                       seed: int = 0, workers: int | None = None) -> TensorDataset:  # fmt: skip
    """The images to calibrate with: ``images`` if given, else the bundled Fashion-MNIST set when
    the model is a Fashion-MNIST model (no other model may calibrate on it silently). At most
    ``limit`` of them (None: all), chosen before decoding: class-balanced in a labelled folder,
    else at random, with ``seed``. The log says how many; so does the set's source."""
    if images is None and not is_fashion_mnist_spec(spec):
        raise UserError("this model was not trained on Fashion-MNIST, so the bundled images do not fit it; pass --images DIR")
    folder = images if images is not None else bundled_calibration_dir()
    data = load_images(folder, spec, limit=limit, seed=seed, workers=workers)
    log.info("calibrating on %d images of %s", len(data), data.source)
    return data


def evaluation_set(spec: InputSpec, images: str | Path | None = None, limit: int | None = None, *, seed: int = 0,
                   workers: int | None = None) -> TensorDataset:  # fmt: skip
    """The labelled set to evaluate on: ``images`` (an image folder) if given; for a Fashion-MNIST
    model, the full 10k test set when Debian's package is installed, else the bundled 1,000.
    ``limit``: a class-balanced, seeded choice of that many images, made before decoding."""
    if images is not None:
        return image_folder(images, spec, spec.class_names or None, limit=limit, seed=seed, workers=workers)
    if not is_fashion_mnist_spec(spec):
        raise UserError("this model was not trained on Fashion-MNIST; pass --eval-images DIR (one subfolder per class)")
    if fashion_mnist_available():
        return fashion_mnist("test", spec, sample=limit, seed=seed)
    log.info("Fashion-MNIST test set not installed; evaluating on the bundled 1,000 test images")
    return image_folder(bundled_eval_dir(), spec, spec.class_names, limit=limit, seed=seed, workers=workers)


# ---------------------------------------------------------------------------------------------
# Labelled training data: where `train` and `qat` read from


def is_fashion_mnist_source(data: str | Path) -> bool:
    """``fashion-mnist`` (Debian's package) or a folder holding Fashion-MNIST's IDX files."""
    return str(data) == "fashion-mnist" or (Path(data).is_dir() and any(Path(data).glob("*idx*-ubyte*")))


def training_spec(data: str | Path, in_chans: int = 3, size: int | None = None, resize: int | None = None) -> InputSpec:
    """The input spec a new model trained on ``data`` gets: Fashion-MNIST's own, or for image
    folders ImageNet mean/std (3 channels; 0.5/0.5 for 1) at ``size`` (default 224) after resizing
    the shorter side to ``resize`` (default size/0.875)."""
    if is_fashion_mnist_source(data):
        return fashion_mnist_spec()
    side = size or 224
    return replace(default_spec(in_chans), size=side, resize=resize or int(round(side / 0.875)))


def labelled_sets(data: str | Path, spec: InputSpec, workers: int | None = None) -> tuple[TensorDataset, TensorDataset | None]:
    """(train, eval) sets preprocessed with ``spec``: Fashion-MNIST (Debian's package or a folder
    of its IDX files), or ``DIR/train`` [+ ``DIR/val``] image folders, whose class names join the
    spec. The training images are held in memory (training draws random batches); a large
    ``val/`` is streamed like any evaluation set."""
    if is_fashion_mnist_source(data):
        root = None if str(data) == "fashion-mnist" else data
        return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)
    root = Path(data)
    if not (root / "train").is_dir():
        raise UserError(f"--data {data}: expected 'fashion-mnist', a folder of Fashion-MNIST IDX files, or a folder with train/ (and val/) image folders")
    train_set = image_folder(root / "train", spec, spec.class_names or None, workers=workers, preload_bytes=math.inf)
    spec = replace(spec, class_names=train_set.class_names)
    val_set = image_folder(root / "val", spec, spec.class_names, workers=workers) if (root / "val").is_dir() else None
    return replace(train_set, spec=spec), val_set


def default_training_data(spec: InputSpec) -> str:
    """Where a model fine-tunes by default: Fashion-MNIST for Fashion-MNIST models; others must say."""
    if is_fashion_mnist_spec(spec):
        return "fashion-mnist"
    raise UserError("this model was not trained on Fashion-MNIST; pass --data (a folder with train/ [val/] class subfolders)")
