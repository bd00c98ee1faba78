"""Command line: a thin layer over the library. Each sub-command parses, calls one library
function and prints; expected mistakes (``UserError``) are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edgerepvgg.errors import UserError

log = logging.getLogger("edgerepvgg")


# ---------------------------------------------------------------------------------------------
# info


def _load_any(ref: str | None, num_classes: int, in_chans: int, block: str):
    """A registered variant name builds a fresh model; anything else is a checkpoint."""
    from edgerepvgg.checkpoints import BUNDLED, default_spec, load_checkpoint, meta_for
    from edgerepvgg.models import VARIANTS, create_model, resolve_variant

    if ref is not None and ref not in BUNDLED and not Path(ref).exists():
        try:
            resolve_variant(ref)
        except UserError:
            raise UserError(
                f"{ref!r} is neither a checkpoint file nor a model name; pass a path, a bundled model or one of {', '.join(VARIANTS)}"
            ) from None
        model = create_model(ref, num_classes=num_classes, in_chans=in_chans, block=block).eval()
        return model, meta_for(model, default_spec(in_chans))
    return load_checkpoint(ref)


def cmd_info(args: argparse.Namespace) -> int:
    from edgerepvgg.fuse import to_plain
    from edgerepvgg.plain import count_macs

    model, meta = _load_any(args.model, args.num_classes, args.in_chans, args.block)
    plain = to_plain(model, meta.input_spec)
    size = args.size or meta.input_spec.size
    rows = count_macs(plain, size)
    train_params = sum(p.numel() for p in model.parameters())
    fused_params = sum(p.numel() for p in plain.parameters())
    total_macs = sum(r[2] for r in rows)
    form = "fused (deploy)" if meta.fused else "train-time"
    print(f"model       {plain.name}  ({meta.block} blocks, {form})")
    print(f"classes     {meta.num_classes}" + (f"  ({', '.join(meta.input_spec.class_names)})" if meta.input_spec.class_names else ""))
    s = meta.input_spec
    print(f"input       {s.channels}x{s.size}x{s.size}, resize {s.resize}, mean {list(s.mean)}, std {list(s.std)}")
    if not meta.fused:
        print(f"params      {train_params:,} train-time, {fused_params:,} fused")
    else:
        print(f"params      {fused_params:,}")
    print(f"MACs        {total_macs / 1e9:.3f} G at {size}x{size}")
    for key in ("eval_top1", "eval_set"):
        if key in meta.extra:
            print(f"{key:<11} {meta.extra[key]}")
    if args.layers:
        print(f"\n{'layer':<10} {'in':>5} {'out':>5} {'stride':>6} {'groups':>6} {'out size':>8} {'MMACs':>9}")
        for info, (_, side, macs) in zip(plain.layers(), rows):
            print(f"{info.name:<10} {info.in_channels:>5} {info.out_channels:>5} {info.stride:>6} {info.groups:>6} "
                  f"{side:>4}x{side:<3} {macs / 1e6:>9.2f}")  # fmt: skip
        print(f"{'head':<10} {plain.head.in_features:>5} {plain.head.out_features:>5} {'':>6} {'':>6} {'':>8} {rows[-1][2] / 1e6:>9.2f}")
    return 0


# ---------------------------------------------------------------------------------------------
# fuse


def cmd_fuse(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgerepvgg.checkpoints import load_checkpoint, save_checkpoint
    from edgerepvgg.fuse import fuse, reparameterize

    model, meta = load_checkpoint(args.checkpoint)
    _, checks = fuse(model, meta.input_spec)
    for check in checks:
        print(f"equivalence {check}")
    out = save_checkpoint(args.output, reparameterize(model), replace(meta, fused=True), half=args.half)
    print(f"wrote {out} (fused RepVGG-{meta.variant}, official deploy key layout)")
    return 0


# ---------------------------------------------------------------------------------------------
# calibrate


def _plain_of(ref: str | None):
    """Load a checkpoint and fuse it (the check runs; a failure is a bug, not a user error)."""
    from edgerepvgg.checkpoints import load_checkpoint
    from edgerepvgg.fuse import fuse

    model, meta = load_checkpoint(ref)
    plain, _ = fuse(model, meta.input_spec)
    return model, meta, plain


def _constraints(args: argparse.Namespace):
    from edgerepvgg.quant import constraints_for

    return constraints_for(args.constraints, weight_bits=args.weight_bits)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgerepvgg.data import calibration_images
    from edgerepvgg.quant.calibrate import calibrate, save_spec

    _, meta, plain = _plain_of(args.checkpoint)
    images = calibration_images(meta.input_spec, args.images)
    constraints = _constraints(args)
    spec = calibrate(plain, images, constraints, args.method, args.weight_method, args.percentile,
                     batch_size=args.batch_size, progress=not args.quiet, cache=False if args.no_cache else None)  # fmt: skip
    out = save_spec(spec, args.output)
    skipped = f", {len(images.skipped)} unreadable files skipped" if images.skipped else ""
    print(f"calibrated {plain.name} on {len(images)} images from {images.source}{skipped}")
    print(f"constraints {constraints.name}: activations {_grid(constraints.activation)}, weights {_grid(constraints.weight)}"
          f"{', bias float' if not constraints.int_bias else ''}; method {args.method}, weights {args.weight_method}")  # fmt: skip
    print(f"wrote {out} (sha256 {spec.sha256[:12]})")
    return 0


def _grid(scheme) -> str:
    kind = ("s" if scheme.signed else "u") + str(scheme.bits)
    return f"{kind} {'symmetric' if scheme.symmetric else 'affine'}{' per-channel' if scheme.per_channel else ''}"


# ---------------------------------------------------------------------------------------------
# train


def _training_data(args: argparse.Namespace):
    from edgerepvgg.data import InputSpec, fashion_mnist, fashion_mnist_spec, image_folder

    data = args.data
    if data == "fashion-mnist" or (Path(data).is_dir() and any(Path(data).glob("*idx*-ubyte*"))):
        root = None if data == "fashion-mnist" else data
        spec = fashion_mnist_spec()
        return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)
    root = Path(data)
    if not (root / "train").is_dir():
        raise UserError(f"--data {data}: expected 'fashion-mnist', a folder of Fashion-MNIST IDX files, or a folder with train/ (and val/) image folders")
    size = args.size or 224
    spec = InputSpec(size=size, resize=args.resize or int(round(size / 0.875)), channels=args.in_chans)
    train_set = image_folder(root / "train", spec)
    spec = train_set.spec
    val_set = image_folder(root / "val", spec, class_names=spec.class_names) if (root / "val").is_dir() else None
    return train_set, val_set


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from edgerepvgg.train import MODEL_FILE, TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(model=args.model, block=args.block, epochs=args.epochs, batch_size=args.batch_size,
                         optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_epochs=args.warmup_epochs, seed=args.seed)  # fmt: skip
    train_set, eval_set = _training_data(args)
    _, meta = train(config, train_set, eval_set, args.out, resume=args.resume, progress=not args.quiet)
    if "eval_top1" in meta.extra:
        print(f"top-1 {meta.extra['eval_top1']:.4f} on {meta.extra['eval_set']}")
    print(f"wrote {Path(args.out) / MODEL_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def _quant_args(s: argparse.ArgumentParser) -> None:
    from edgerepvgg.quant import CONSTRAINT_SETS
    from edgerepvgg.quant.calibrate import WEIGHT_METHODS
    from edgerepvgg.quant.observers import OBSERVERS

    s.add_argument("--constraints", default="tensorrt", choices=list(CONSTRAINT_SETS),
                   help="integer scheme of the target's kernels (default tensorrt)")  # fmt: skip
    s.add_argument("--weight-bits", type=int, help="override the weight bit width (default: 8, or 7 on x86 CPUs without VNNI for CPU targets)")
    s.add_argument("--method", default="entropy", choices=list(OBSERVERS), help="activation range method (default entropy)")
    s.add_argument("--weight-method", default="minmax", choices=list(WEIGHT_METHODS), help="per-channel weight range method")
    s.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgerepvgg", description="RepVGG from training checkpoint to INT8 engines on edge targets.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ckpt_help = "checkpoint file (ours, official, timm or MMPretrain layout) or bundled model name; default: the bundled RepVGG-A0"

    s = sub.add_parser("info", help="parameters, MACs and layers of a variant or checkpoint")
    s.add_argument("model", nargs="?", help=f"variant name (A0..B3g4) or {ckpt_help}")
    s.add_argument("--size", type=int, help="input side for MACs (default: the model's input size)")
    s.add_argument("--num-classes", type=int, default=1000, help="for a variant name (default 1000)")
    s.add_argument("--in-chans", type=int, default=3, help="for a variant name (default 3)")
    s.add_argument("--block", default="repvgg", choices=["repvgg", "qarepvgg"], help="for a variant name")
    s.add_argument("--layers", action="store_true", help="print the per-layer table")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("fuse", help="re-parameterize into a plain 3x3 network, checked equivalent")
    s.add_argument("checkpoint", nargs="?", help=ckpt_help)
    s.add_argument("-o", "--output", required=True, help="where to write the fused checkpoint (.safetensors)")
    s.add_argument("--half", action="store_true", help="store float16 weights")
    s.set_defaults(func=cmd_fuse)

    s = sub.add_parser("calibrate", help="post-training calibration with sample images -> QuantSpec JSON")
    s.add_argument("checkpoint", nargs="?", help=ckpt_help)
    s.add_argument("--images", help="folder of calibration images (default: the bundled Fashion-MNIST set, for Fashion-MNIST models)")
    _quant_args(s)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--no-cache", action="store_true", help="do not reuse or store activation statistics")
    s.add_argument("-o", "--output", default="quant_spec.json", help="QuantSpec JSON to write (default quant_spec.json)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("train", help="train a RepVGG/QARepVGG on Fashion-MNIST or an image folder (CPU)")
    s.add_argument("--model", default="A0", help="variant (default A0)")
    s.add_argument("--block", default="repvgg", choices=["repvgg", "qarepvgg"])
    s.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' (Debian's package), a folder of its IDX files, or a folder with train/ [val/] class subfolders")
    s.add_argument("--size", type=int, help="input side for image folders (default 224)")
    s.add_argument("--resize", type=int, help="shorter side before center crop (default size/0.875)")
    s.add_argument("--in-chans", type=int, default=3, choices=[1, 3], help="for image folders")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--weight-decay", type=float, default=5e-4)
    s.add_argument("--warmup-epochs", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    s.add_argument("--out", default="runs/train", help="output folder: last.pt every epoch, model.safetensors at the end")
    s.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    s.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"edgerepvgg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgerepvgg {args.command}: interrupted; artifacts already written are complete, the rest were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
