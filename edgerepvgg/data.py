"""Image decoding and the data sets every stage reads, preprocessed with the model's
:class:`~edgerepvgg.inputs.InputSpec`.

Image folders come in two layouts. A *labelled* folder (:func:`image_folder`) has one subfolder
per class, ImageFolder style; a *flat* folder (:func:`image_files`) is any tree of unlabelled
images, e.g. calibration images. :func:`load_images` tells them apart. In both, files whose suffix
is not an image suffix, and hidden files and folders (``.DS_Store``, ``._x.jpg``,
``.ipynb_checkpoints``) are ignored quietly; an image file that cannot be decoded is skipped with
a warning, counted, and recorded in ``TensorDataset.skipped``.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
import struct
import threading
from collections.abc import Iterator, Sequence
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


def load_image(path: str | Path, spec: InputSpec) -> torch.Tensor:
    """Decode one JPEG/PNG/BMP/WebP file into a uint8 CHW tensor as the model expects it (EXIF
    orientation honoured). Raises ``OSError``/``ValueError`` (or another of PIL's decode errors)
    for a file that is not such an image, is truncated, or has more than ``MAX_IMAGE_PIXELS``."""
    with _strict_pil(), Image.open(path, formats=IMAGE_FORMATS) as img:
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"{w}x{h} pixels is over the decompression-bomb limit of {MAX_IMAGE_PIXELS}")
        if w == 0 or h == 0:
            raise ValueError(f"empty image ({w}x{h})")
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
    names label ``i`` where known; ``skipped`` lists the files that could not be decoded."""

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
    index = torch.from_numpy(np.sort(np.concatenate(keep)))
    return replace(
        dataset, images=dataset.images[index], labels=dataset.labels[index], skipped=list(dataset.skipped),
        source=f"{dataset.source}, {per_class} per class (seed {seed})",
    )  # fmt: skip


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


def _decode_all(paths: Sequence[Path], root: Path, spec: InputSpec) -> tuple[list[int], list[torch.Tensor], list[str]]:
    """Decode ``paths``; a file that fails is skipped with a warning. Returns the indices of the
    decoded paths, their tensors and the skipped paths; warns once more with the summary."""
    kept, tensors, skipped, reasons = [], [], [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(load_image(path, spec))
        except _DECODE_ERRORS as exc:
            reason = _reason(exc)
            log.warning("skipping %s: %s", path, reason)
            skipped.append(str(path))
            reasons.append(f"{path.relative_to(root).as_posix()} ({reason})")
            continue
        kept.append(i)
    if skipped:
        listed = "; ".join(reasons[:10]) + (f"; and {len(reasons) - 10} more" if len(reasons) > 10 else "")
        log.warning("skipped %d of %d files in %s: %s", len(skipped), len(paths), root, listed)
    if paths and not kept:
        raise UserError(
            f"none of the {len(paths)} image files in {root} could be decoded (first: {reasons[0]}); "
            f"pass a folder of readable {_SUFFIX_HELP} images"
        )
    return kept, tensors, skipped


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


def image_folder(root: str | Path, spec: InputSpec, class_names: Sequence[str] | None = None) -> TensorDataset:
    """A labelled image folder: ``root/<class>/**/<image>``, preprocessed with ``spec``.

    Without ``class_names`` (or with an empty one) the labels follow the sorted subfolder names
    (torchvision's ImageFolder rule). With ``class_names`` (e.g. the model's
    ``spec.class_names``) label ``i`` is ``class_names[i]``, and each subfolder must name one
    class: the class name itself or its slug (``"T-shirt/top"`` -> ``t-shirt-top``), optionally
    prefixed with its index (``0-t-shirt-top``, which makes the folders sort in label order).
    Any other subfolder is a ``UserError`` naming it; a class without a folder has no images.
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
    kept, tensors, skipped = _decode_all(paths, root, spec)
    label_tensor = torch.tensor([labels[i] for i in kept], dtype=torch.int64)
    source = f"image-folder:{root} ({len(kept)} images, {len(folders)} class folders)"
    return TensorDataset(torch.stack(tensors), label_tensor, spec, source, names, skipped)


def image_files(root: str | Path, spec: InputSpec) -> TensorDataset:
    """Every image under ``root`` (recursively, sorted by path), unlabelled (labels are -1):
    e.g. calibration images from the deployment domain."""
    root = Path(root)
    _check_dir(root)
    paths = _image_paths(root, root)
    if not paths:
        raise UserError(f"{root} has no {_SUFFIX_HELP} images (subfolders searched too); pass a folder that holds some")
    kept, tensors, skipped = _decode_all(paths, root, spec)
    labels = torch.full((len(kept),), -1, dtype=torch.int64)
    return TensorDataset(torch.stack(tensors), labels, spec, f"image-files:{root} ({len(kept)} images)", (), skipped)


def is_labelled_folder(root: str | Path) -> bool:
    """True when ``root`` holds images and every one of them is inside a first-level subfolder
    (the ImageFolder layout); False for a flat folder or one with images directly in it."""
    root = Path(root)
    _check_dir(root)
    paths = _image_paths(root, root)
    return bool(paths) and all(p.parent != root for p in paths)


def load_images(path: str | Path, spec: InputSpec, class_names: Sequence[str] | None = None) -> TensorDataset:
    """:func:`image_folder` if every image of ``path`` lives in a first-level subfolder, else
    :func:`image_files` (``class_names`` is then not used)."""
    if is_labelled_folder(path):
        log.info("%s: one subfolder per class, reading it as a labelled image folder", path)
        return image_folder(path, spec, class_names)
    return image_files(path, spec)


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


def fashion_mnist(split: str, spec: InputSpec, root: str | Path | None = None, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST preprocessed with ``spec``; ``limit`` keeps the first N images."""
    images, labels = read_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    where = Path(root) if root is not None else FASHION_MNIST_DIR
    source = f"fashion-mnist:{split} ({where})"
    return TensorDataset(prepare_arrays(images, spec), torch.from_numpy(labels), spec, source, FASHION_MNIST_CLASSES)


def calibration_images(spec: InputSpec, images: str | Path | None = None) -> TensorDataset:
    """The images to calibrate with: ``images`` if given, else the bundled Fashion-MNIST set when
    the model is a Fashion-MNIST model (no other model may calibrate on it silently)."""
    if images is not None:
        return load_images(images, spec)
    if not is_fashion_mnist_spec(spec):
        raise UserError("this model was not trained on Fashion-MNIST, so the bundled images do not fit it; pass --images DIR")
    return image_files(bundled_calibration_dir(), spec)


def evaluation_set(spec: InputSpec, images: str | Path | None = None, limit: int | None = None) -> TensorDataset:
    """The labelled set to evaluate on: ``images`` (an image folder) if given; for a Fashion-MNIST
    model, the full 10k test set when Debian's package is installed, else the bundled 1,000."""
    if images is not None:
        ds = image_folder(images, spec, spec.class_names or None)
    elif not is_fashion_mnist_spec(spec):
        raise UserError("this model was not trained on Fashion-MNIST; pass --eval-images DIR (one subfolder per class)")
    elif fashion_mnist_available():
        ds = fashion_mnist("test", spec)
    else:
        log.info("Fashion-MNIST test set not installed; evaluating on the bundled 1,000 test images")
        ds = image_folder(bundled_eval_dir(), spec, spec.class_names)
    if limit is not None and limit < len(ds):
        ds = stratified_subset(ds, max(1, limit // max(1, len(ds.class_names) or 1)))
    return ds


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


def labelled_sets(data: str | Path, spec: InputSpec) -> tuple[TensorDataset, TensorDataset | None]:
    """(train, eval) sets preprocessed with ``spec``: Fashion-MNIST (Debian's package or a folder
    of its IDX files), or ``DIR/train`` [+ ``DIR/val``] image folders, whose class names join the spec."""
    if is_fashion_mnist_source(data):
        root = None if str(data) == "fashion-mnist" else data
        return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)
    root = Path(data)
    if not (root / "train").is_dir():
        raise UserError(f"--data {data}: expected 'fashion-mnist', a folder of Fashion-MNIST IDX files, or a folder with train/ (and val/) image folders")
    train_set = image_folder(root / "train", spec, spec.class_names or None)
    spec = replace(spec, class_names=train_set.class_names)
    val_set = image_folder(root / "val", spec, spec.class_names) if (root / "val").is_dir() else None
    return replace(train_set, spec=spec), val_set


def default_training_data(spec: InputSpec) -> str:
    """Where a model fine-tunes by default: Fashion-MNIST for Fashion-MNIST models; others must say."""
    if is_fashion_mnist_spec(spec):
        return "fashion-mnist"
    raise UserError("this model was not trained on Fashion-MNIST; pass --data (a folder with train/ [val/] class subfolders)")
