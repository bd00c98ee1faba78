"""Image decoding, image folders, Fashion-MNIST IDX reading and the bundled images."""

from __future__ import annotations

import gzip
import io
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from edgerepvgg import bundle, data
from edgerepvgg.data import FASHION_MNIST_CLASSES, InputSpec, UserError

GRAY = InputSpec(size=8, resize=8, channels=1, mean=(0.5,), std=(0.5,))
RGB = InputSpec(size=8, resize=8, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def solid(mode: str, value, size=(8, 8)) -> Image.Image:
    return Image.new(mode, size, value)


def pixels(t: torch.Tensor) -> np.ndarray:
    """CHW tensor -> the set of distinct per-pixel values, as an (n, C) array."""
    return np.unique(t.numpy().reshape(t.shape[0], -1).T, axis=0)


# ---------------------------------------------------------------------------------------------
# One image: formats, modes, orientation, resize/crop

LOSSLESS = [("png", {}), ("bmp", {}), ("webp", {"lossless": True})]


@pytest.mark.parametrize("suffix,kwargs", LOSSLESS + [("jpg", {"quality": 95}), ("JPEG", {"format": "JPEG"})])
def test_every_format_decodes_to_the_spec(tmp_path, suffix, kwargs):
    path = save(solid("RGB", (10, 200, 30)), tmp_path / f"a.{suffix}", **kwargs)
    rgb, gray = data.load_image(path, RGB), data.load_image(path, GRAY)
    assert rgb.shape == (3, 8, 8) and rgb.dtype == torch.uint8
    assert gray.shape == (1, 8, 8) and gray.dtype == torch.uint8
    tol = 0 if kwargs in [k for _, k in LOSSLESS] else 4
    assert np.abs(pixels(rgb).astype(int) - [10, 200, 30]).max() <= tol
    luma = round(10 * 0.299 + 200 * 0.587 + 30 * 0.114)  # PIL's ITU-R 601-2 conversion
    assert np.abs(pixels(gray).astype(int) - luma).max() <= tol + 1


def _palette_image() -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 40, 80, 120] + [0] * (254 * 3))
    return img


@pytest.mark.parametrize(
    "name,make,expect_rgb",
    [
        ("L.png", lambda: solid("L", 77), (77, 77, 77)),
        ("1.png", lambda: solid("1", 1), (255, 255, 255)),
        ("P.png", _palette_image, (40, 80, 120)),
        ("P.bmp", _palette_image, (40, 80, 120)),
        ("RGBA-opaque.png", lambda: solid("RGBA", (200, 100, 50, 255)), (200, 100, 50)),
        ("RGBA-half.png", lambda: solid("RGBA", (200, 100, 50, 128)), (100, 50, 25)),  # on black
        ("RGBA-clear.webp", lambda: solid("RGBA", (200, 100, 50, 0)), (0, 0, 0)),
        ("LA.png", lambda: solid("LA", (90, 255)), (90, 90, 90)),
        ("I16-full.png", lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
        ("I16-half.png", lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)),
        ("CMYK.jpg", lambda: solid("CMYK", (0, 255, 0, 0)), (255, 0, 255)),
    ],
)
def test_every_mode_converts(tmp_path, name, make, expect_rgb):
    img = make()
    kwargs = {"lossless": True} if name.endswith(".webp") else {"quality": 95} if name.endswith(".jpg") else {}
    path = save(img, tmp_path / name, **kwargs)
    if name.startswith("I16"):
        assert Image.open(path).mode == "I;16"  # the case under test really is 16-bit
    got = pixels(data.load_image(path, RGB)).astype(int)
    tol = 3 if name.endswith(".jpg") else 1
    assert got.shape[0] == 1 or np.ptp(got, axis=0).max() <= tol
    assert np.abs(got - expect_rgb).max() <= tol, got


def test_float_and_int32_modes_are_rescaled_not_clipped():
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, np.nan]], np.float32))
    assert np.asarray(data._to_mode(f, 1)).tolist() == [[0, 128], [255, 0]]
    i = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert np.asarray(data._to_mode(i, 1)).tolist() == [[0, 255]]
    small = Image.fromarray(np.array([[0, 200]], np.int32))
    assert np.asarray(data._to_mode(small, 1)).tolist() == [[0, 200]]


def _left_black_right_white() -> Image.Image:
    arr = np.zeros((8, 16), np.uint8)
    arr[:, 8:] = 255
    return Image.fromarray(arr)  # 16 wide, 8 high


@pytest.mark.parametrize("orientation,top,bottom", [(None, None, None), (6, 0, 255), (8, 255, 0)])
def test_exif_orientation_is_honoured(tmp_path, orientation, top, bottom):
    img = _left_black_right_white()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path = save(img, tmp_path / "o.jpg", quality=95, exif=exif)
    got = data.load_image(path, GRAY)[0].numpy().astype(int)  # shorter side 8, center crop 8x8
    if orientation is None:  # landscape: the crop keeps the black/white split in its columns
        assert got[:, :3].max() < 30 and got[:, 5:].min() > 225
    else:  # rotated to portrait: the split runs across the rows
        assert abs(got[0].mean() - top) < 30 and abs(got[-1].mean() - bottom) < 30
        assert np.ptp(got[0]) < 30


def test_resize_and_center_crop_on_a_known_image(tmp_path):
    cols = np.tile(np.arange(6, dtype=np.uint8) * 10, (4, 1))  # 6 wide, 4 high, column c = 10c
    path = save(Image.fromarray(cols), tmp_path / "cols.png")
    spec = InputSpec(size=4, resize=4, channels=1, mean=(0.0,), std=(1.0,))
    got = data.load_image(path, spec)
    assert got.shape == (1, 4, 4)
    assert got[0].tolist() == [[10, 20, 30, 40]] * 4  # no resize (short side is 4), crop cols 1..4
    spec = InputSpec(size=10, resize=10, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    half = np.zeros((20, 40), np.uint8)
    half[:, 20:] = 255
    got = data.load_image(save(Image.fromarray(half), tmp_path / "half.png"), spec)
    assert got.shape == (3, 10, 10)  # 40x20 -> 20x10 -> center 10x10 = cols 5..14 of the resized
    assert int(got[:, :, :4].max()) == 0 and int(got[:, :, 6:].min()) == 255
    normalized = spec.normalize(got)
    assert normalized.dtype == torch.float32 and float(normalized.max()) == 1.0


# ---------------------------------------------------------------------------------------------
# Folders: bad files, empty and missing folders


def _good_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    return [save(solid("L", 10 * (start + i)), folder / f"g{start + i:02d}.png") for i in range(n)]


def _noise_bytes(fmt: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, shape, np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _folder_with_bad_files(root: Path) -> None:
    _good_images(root, 6)
    (root / "notes.png").write_text("this is text, not a PNG\n")
    png, jpg = _noise_bytes("PNG", (32, 32)), _noise_bytes("JPEG", (32, 32, 3))
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "empty.JPG").write_bytes(b"")
    (root / "README.md").write_text("readme")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "._g00.png").write_bytes(b"\0\5\26\7")  # macOS AppleDouble junk: hidden, ignored
    (root / "data.txt").write_text("1,2,3")


def test_bad_files_are_skipped_with_warnings_and_counted(tmp_path, caplog, monkeypatch):
    _folder_with_bad_files(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone else's global setting
    with caplog.at_level(logging.WARNING, logger="edgerepvgg.data"):
        ds = data.image_files(tmp_path, GRAY)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after decoding
    assert len(ds) == 6 and ds.labels.tolist() == [-1] * 6
    bad = ["cut.jpg", "cut.png", "empty.JPG", "notes.png"]
    assert sorted(Path(p).name for p in ds.skipped) == bad
    messages = [r.getMessage() for r in caplog.records]
    for name in bad:
        assert any(m.startswith("skipping") and name in m for m in messages), name
    summary = [m for m in messages if m.startswith("skipped")]
    assert len(summary) == 1 and summary[0].startswith(f"skipped 4 of 10 files in {tmp_path}")
    assert "truncated" in summary[0]
    for quiet in ("README.md", ".DS_Store", "._g00.png", "data.txt"):
        assert not any(quiet in m for m in messages), quiet
    assert ds.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50]  # sorted, deterministic order


def test_a_truncated_file_raises_from_load_image(tmp_path):
    png = _noise_bytes("PNG", (32, 32))
    path = tmp_path / "cut.png"
    path.write_bytes(png[: len(png) // 2])
    with pytest.raises(OSError, match="truncated"):
        data.load_image(path, GRAY)
    path.write_text("plain text")
    with pytest.raises(OSError):
        data.load_image(path, GRAY)


def test_decompression_bomb_limit_is_ours_and_pil_is_restored(tmp_path, monkeypatch, caplog):
    _good_images(tmp_path, 1)
    save(solid("L", 0, size=(40, 40)), tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
    pil_limit = Image.MAX_IMAGE_PIXELS
    with caplog.at_level(logging.WARNING, logger="edgerepvgg.data"):
        ds = data.image_files(tmp_path, GRAY)
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    assert len(ds) == 1 and [Path(p).name for p in ds.skipped] == ["big.png"]
    assert any("decompression-bomb" in r.getMessage() for r in caplog.records)


def test_missing_empty_and_unusable_folders_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        data.image_files(tmp_path / "nope", GRAY)
    with pytest.raises(UserError, match="does not exist"):
        data.load_images(tmp_path / "nope", GRAY)
    (tmp_path / "file.png").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        data.image_files(tmp_path / "file.png", GRAY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape(str(empty)) + " has no JPEG, PNG"):
        data.image_files(empty, GRAY)
    with pytest.raises(UserError, match=re.escape(str(empty))):
        data.load_images(empty, GRAY)
    (empty / "README.md").write_text("only text here")
    with pytest.raises(UserError, match="has no JPEG, PNG, BMP or WebP images"):
        data.image_files(empty, GRAY)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not an image")
    with pytest.raises(UserError, match=r"none of the 1 image files .*junk.*could be decoded"):
        data.image_files(junk, GRAY)
    with pytest.raises(UserError, match=re.escape(str(empty)) + " has no .* images in class subfolders"):
        data.image_folder(empty, GRAY)


# ---------------------------------------------------------------------------------------------
# Labelled folders: layout detection and class order


def _labelled(root: Path, classes: dict[str, int]) -> None:
    for k, (name, n) in enumerate(classes.items()):
        _good_images(root / name, n, start=10 * k)


def test_flat_and_labelled_layouts_are_told_apart(tmp_path):
    flat, labelled, mixed = tmp_path / "flat", tmp_path / "labelled", tmp_path / "mixed"
    _good_images(flat, 2)
    _good_images(flat / "more" / "deeper", 1, start=5)  # flat folders are searched recursively
    _labelled(labelled, {"cat": 2, "dog": 3})
    _labelled(mixed, {"cat": 1})
    _good_images(mixed, 1)  # one loose image makes it flat
    assert [data.is_labelled_folder(f) for f in (flat, labelled, mixed)] == [False, True, False]
    a = data.load_images(flat, GRAY)
    assert len(a) == 3 and a.labels.tolist() == [-1] * 3 and a.class_names == ()
    b = data.load_images(labelled, GRAY)
    assert b.labels.tolist() == [0, 0, 1, 1, 1] and b.class_names == ("cat", "dog")
    assert len(data.load_images(mixed, GRAY)) == 2
    with pytest.raises(UserError, match="outside class subfolders.*g00.png"):
        data.image_folder(mixed, GRAY)


def test_class_names_fix_the_label_order(tmp_path):
    _labelled(tmp_path, {"cat": 1, "dog": 2})
    ds = data.image_folder(tmp_path, GRAY, class_names=("dog", "cat", "bird"))
    assert ds.labels.tolist() == [1, 0, 0] and ds.class_names == ("dog", "cat", "bird")
    assert ds.images[:, 0, 0, 0].tolist() == [0, 100, 110]  # cat's image, then dog's
    (tmp_path / "horse").mkdir()
    _good_images(tmp_path / "horse", 1)
    with pytest.raises(UserError, match=r"unknown class folders \['horse'\]"):
        data.image_folder(tmp_path, GRAY, class_names=("dog", "cat"))


def test_prefixed_and_slugged_folders_map_to_the_models_classes(tmp_path):
    # Bundled-eval style: "<i>-<slug>"; a plain slug or the exact name works too.
    names = {0: "0-t-shirt-top", 1: "Trouser", 9: "ankle-boot", 5: "5-sandal"}
    for label, folder in names.items():
        _good_images(tmp_path / folder, 1, start=label)
    ds = data.image_folder(tmp_path, GRAY, class_names=FASHION_MNIST_CLASSES)
    got = dict(zip(ds.images[:, 0, 0, 0].tolist(), ds.labels.tolist()))
    assert got == {10 * label: label for label in names}
    assert ds.class_names == FASHION_MNIST_CLASSES
    _good_images(tmp_path / "3-trouser", 1)  # a wrong prefix does not match
    with pytest.raises(UserError, match="3-trouser"):
        data.image_folder(tmp_path, GRAY, class_names=FASHION_MNIST_CLASSES)


def test_two_folders_for_one_class_are_refused(tmp_path):
    _labelled(tmp_path, {"Coat": 1, "4-coat": 1})
    with pytest.raises(UserError, match="more than one folder"):
        data.image_folder(tmp_path, GRAY, class_names=FASHION_MNIST_CLASSES)


def test_empty_class_folder_keeps_its_label_and_warns(tmp_path, caplog):
    _labelled(tmp_path, {"a": 1, "c": 1})
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.WARNING, logger="edgerepvgg.data"):
        ds = data.image_folder(tmp_path, GRAY)
    assert ds.labels.tolist() == [0, 2] and ds.class_names == ("a", "b", "c")
    assert any("no JPEG" in r.getMessage() and r.getMessage().endswith("images") for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Stratified subset


def _toy(labels: list[int]) -> data.TensorDataset:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1)
    return data.TensorDataset(images, torch.tensor(labels), GRAY, "toy", ("a", "b", "c"), ["bad.png"])


def test_stratified_subset_is_balanced_deterministic_and_ordered(caplog):
    ds = _toy([0] * 10 + [1] * 5 + [2] * 20)
    sub = data.stratified_subset(ds, per_class=4, seed=3)
    assert torch.bincount(sub.labels).tolist() == [4, 4, 4]
    picked = sub.images.flatten().tolist()
    assert picked == sorted(picked) and len(set(picked)) == 12
    assert data.stratified_subset(ds, 4, seed=3).images.flatten().tolist() == picked
    other = [data.stratified_subset(ds, 4, seed=s).images.flatten().tolist() for s in range(4, 8)]
    assert any(o != picked for o in other)
    assert sub.skipped == ["bad.png"] and sub.class_names == ds.class_names and "4 per class" in sub.source
    with caplog.at_level(logging.WARNING, logger="edgerepvgg.data"):
        short = data.stratified_subset(ds, per_class=8, seed=0)
    assert torch.bincount(short.labels).tolist() == [8, 5, 8]
    assert any("only 5" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="not labelled"):
        data.stratified_subset(_toy([-1, -1]), 1)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST IDX files


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_on_a_tiny_synthetic_set(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([2, 0, 9], np.uint8)
    for stem, arr in [("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)]:
        if compress:
            (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(_idx(arr), mtime=0))
        else:
            (tmp_path / stem).write_bytes(_idx(arr))
    assert data.fashion_mnist_available(tmp_path)
    x, y = data.read_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 4, 5) and np.array_equal(x, images)
    assert y.dtype == np.int64 and y.tolist() == [2, 0, 9]
    ds = data.fashion_mnist("test", InputSpec(size=4, resize=4, channels=1, mean=(0.0,), std=(1.0,)), tmp_path)
    assert ds.images.shape == (3, 1, 4, 4) and ds.labels.tolist() == [2, 0, 9]
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert ds.images[0, 0].tolist() == images[0, :, :4].tolist()  # center crop of a 5-wide image: cols 0..3
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*not found"):
        data.read_fashion_mnist("train", tmp_path)


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    body = _idx(np.zeros((10, 28, 28), np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(body[:-100])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(10, np.uint8)))
    with pytest.raises(UserError, match="truncated"):
        data.read_fashion_mnist("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(body[:9])  # header cut inside the dims
    with pytest.raises(UserError, match="truncated"):
        data.read_fashion_mnist("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(body)[:-20])
    with pytest.raises(UserError, match="cannot read IDX"):
        data.read_fashion_mnist("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"%PDF-1.4 not idx"))
    with pytest.raises(UserError, match="not a uint8 IDX"):
        data.read_fashion_mnist("test", tmp_path)
    assert not data.fashion_mnist_available(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------
# The bundled calibration and evaluation images

needs_fashion_mnist = pytest.mark.skipif(
    not data.fashion_mnist_available() or not (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)",
)


def test_balanced_counts():
    assert bundle.balanced_counts(256, 10) == [26] * 6 + [25] * 4
    assert bundle.balanced_counts(1000, 10) == [100] * 10
    assert [bundle.eval_folder_name(c) for c in (0, 9)] == ["0-t-shirt-top", "9-ankle-boot"]


def test_bundled_folders_are_found():
    calib, evals = data.bundled_calibration_dir(), data.bundled_eval_dir()
    assert calib.is_dir() and evals.is_dir() and calib.parent == evals.parent
    assert (calib.parent.parent / "README.md").is_file()


@needs_fashion_mnist
def test_bundled_calibration_images_are_the_chosen_training_images():
    x, y = data.read_fashion_mnist("train")
    files = sorted(data.bundled_calibration_dir().glob("*.png"))
    assert len(files) == 256
    index = np.array([int(f.name.split("_")[0]) for f in files])
    assert np.bincount(y[index], minlength=10).tolist() == [26] * 6 + [25] * 4
    assert np.array_equal(index, bundle.pick_balanced(y, bundle.balanced_counts(256, 10), seed=0))
    for f, i in zip(files, index):
        assert f.name == f"{i:05d}_{data.slugify(FASHION_MNIST_CLASSES[y[i]])}.png"
        with Image.open(f) as img:
            assert img.mode == "L" and np.array_equal(np.asarray(img), x[i]), f.name
    ds = data.load_images(data.bundled_calibration_dir(), data.fashion_mnist_spec())
    assert len(ds) == 256 and not ds.skipped and (ds.labels == -1).all()


@needs_fashion_mnist
def test_bundled_eval_images_are_balanced_test_images_in_label_order():
    x, y = data.read_fashion_mnist("test")
    root = data.bundled_eval_dir()
    folders = sorted(p.name for p in root.iterdir())
    assert folders == [bundle.eval_folder_name(c) for c in range(10)]
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 1000
    index = np.array([int(f.stem) for f in files])
    assert np.array_equal(np.sort(index), bundle.pick_balanced(y, [100] * 10, seed=0))
    for f, i in zip(files, index):
        assert f.parent.name == bundle.eval_folder_name(int(y[i]))
        with Image.open(f) as img:
            assert np.array_equal(np.asarray(img), x[i]), f
    spec = data.fashion_mnist_spec()
    ds = data.load_images(root, spec, class_names=spec.class_names)
    assert ds.labels.tolist() == y[index].tolist()  # labels come from the folders, in file order
    assert torch.bincount(ds.labels).tolist() == [100] * 10
    assert torch.equal(ds.images, data.prepare_arrays(x[index], spec))  # same tensors as the IDX path
