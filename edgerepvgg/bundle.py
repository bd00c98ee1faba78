"""Writes the calibration and evaluation images bundled in ``calibration/fashion-mnist/``.

They are real Fashion-MNIST images picked deterministically from the IDX files of Debian's
``dataset-fashion-mnist``; regenerate them with::

    python -m edgerepvgg.bundle calibration/fashion-mnist --overwrite
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from edgerepvgg.data import FASHION_MNIST_CLASSES, read_fashion_mnist, slugify
from edgerepvgg.errors import UserError

log = logging.getLogger(__name__)

CALIBRATION_COUNT = 256  # training images, flat folder images/
EVAL_PER_CLASS = 100  # test images per class, ImageFolder layout eval/<i>-<slug>/


def balanced_counts(total: int, n_classes: int) -> list[int]:
    """``total`` split over the classes as evenly as possible, the first classes taking one more:
    256 over 10 -> six classes of 26, four of 25."""
    base, extra = divmod(total, n_classes)
    return [base + (c < extra) for c in range(n_classes)]


def pick_balanced(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of ``counts[c]`` images of each class ``c``, drawn without replacement with
    ``seed``; sorted, so the result depends only on the labels, counts and seed."""
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in enumerate(counts)]
    return np.sort(np.concatenate(picked))


def eval_folder_name(label: int) -> str:
    """``0-t-shirt-top``: the index prefix makes the folders sort in label order."""
    return f"{label}-{slugify(FASHION_MNIST_CLASSES[label])}"


def _save_png(array: np.ndarray, path: Path) -> None:
    # Fixed options and no metadata (PIL writes no time chunk), so the bytes depend only on the
    # pixels and the zlib build.
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    img.save(path, format="PNG", optimize=False, compress_level=9)


def write_calibration_set(
    out_dir: str | Path, seed: int = 0, root: str | Path | None = None, overwrite: bool = False
) -> dict[str, dict[str, int]]:
    """Write ``out_dir/images/`` (256 class-balanced training images, flat, named
    ``<train index>_<class slug>.png``) and ``out_dir/eval/<i>-<slug>/<test index>.png`` (100 test
    images per class) from the Fashion-MNIST IDX files in ``root``. Deterministic for a given
    ``seed``. Returns the number of images per class name for each of the two folders."""
    out_dir = Path(out_dir)
    images_dir, eval_dir = out_dir / "images", out_dir / "eval"
    for d in (images_dir, eval_dir):
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise UserError(f"{d} already has files; pass overwrite=True (--overwrite) to replace them")
            shutil.rmtree(d)
    n_classes = len(FASHION_MNIST_CLASSES)

    train_x, train_y = read_fashion_mnist("train", root)
    images_dir.mkdir(parents=True, exist_ok=True)
    calib = pick_balanced(train_y, balanced_counts(CALIBRATION_COUNT, n_classes), seed)
    for i in calib:
        _save_png(train_x[i], images_dir / f"{i:05d}_{slugify(FASHION_MNIST_CLASSES[train_y[i]])}.png")

    test_x, test_y = read_fashion_mnist("test", root)
    evals = pick_balanced(test_y, [EVAL_PER_CLASS] * n_classes, seed)
    for c in range(n_classes):
        (eval_dir / eval_folder_name(c)).mkdir(parents=True, exist_ok=True)
    for i in evals:
        _save_png(test_x[i], eval_dir / eval_folder_name(int(test_y[i])) / f"{i:05d}.png")

    counts = {
        "images": {FASHION_MNIST_CLASSES[c]: int((train_y[calib] == c).sum()) for c in range(n_classes)},
        "eval": {FASHION_MNIST_CLASSES[c]: int((test_y[evals] == c).sum()) for c in range(n_classes)},
    }
    log.info("wrote %d calibration and %d evaluation images to %s", len(calib), len(evals), out_dir)
    return counts


MAX_STORAGE_DROP = 0.001  # float16 weights may move top-1 by at most 0.1 pt


def bundle_model(src: str | Path, dst: str | Path, command: str) -> dict:
    """Ship a trained checkpoint in the package: store its conv/linear weights in float16 (to fit
    the size budget) and measure the stored model in FP32 on the full Fashion-MNIST test set. The
    shipped model *is* the stored one, so its top-1 is what the metadata records; the top-1 before
    rounding is recorded beside it, and a change over 0.1 pt is refused. ``command`` (the exact
    training command) is recorded too."""
    from dataclasses import replace

    from edgerepvgg.checkpoints import load_checkpoint, save_checkpoint
    from edgerepvgg.data import fashion_mnist
    from edgerepvgg.evaluate import predict, topk_accuracy

    model, meta = load_checkpoint(src)
    test = fashion_mnist("test", meta.input_spec)
    trained = topk_accuracy(predict(model, test), test.labels)
    save_checkpoint(dst, model, meta, half=True)
    stored, _ = load_checkpoint(dst)
    top1 = topk_accuracy(predict(stored, test), test.labels)
    if abs(top1 - trained) > MAX_STORAGE_DROP:
        Path(dst).unlink()
        raise UserError(f"float16 storage moved top-1 from {trained:.4f} to {top1:.4f}; ship float32 instead")
    extra = dict(meta.extra)  # keeps the per-epoch history: a rerun of the command can be compared with it
    extra.update(eval_top1=top1, eval_top1_before_float16=trained, eval_set=test.source, train_command=command,
                 stored="float16 conv/linear weights, float32 BN and biases")  # fmt: skip
    save_checkpoint(dst, stored, replace(meta, extra=extra), half=True)
    log.info("bundled %s: top-1 %.4f on %s (%.4f before float16 storage)", dst, top1, test.source, trained)
    return {"top1": top1, "top1_before_float16": trained, "eval_set": test.source, "bytes": Path(dst).stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerepvgg.bundle", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="e.g. calibration/fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images/ and eval/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = write_calibration_set(args.out_dir, args.seed, args.data, args.overwrite)
    except UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    for folder, per_class in counts.items():
        log.info("%s: %s", folder, ", ".join(f"{k} {v}" for k, v in per_class.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
