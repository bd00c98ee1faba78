"""Command line: a thin layer over the library. Each sub-command parses, calls one library
function and prints; expected mistakes (``UserError``) are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
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
    from edgerepvgg._fuse import to_plain
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
    from edgerepvgg._fuse import fuse, reparameterize

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
    from edgerepvgg._fuse import fuse

    model, meta = load_checkpoint(ref)
    plain, _ = fuse(model, meta.input_spec)
    return model, meta, plain


def _constraints(args: argparse.Namespace):
    from edgerepvgg.quant import constraints_for

    return constraints_for(args.constraints, weight_bits=args.weight_bits)


def _calibration(args: argparse.Namespace):
    from edgerepvgg.quant.calibrate import CalibrationConfig

    return CalibrationConfig(args.method, args.weight_method, args.percentile)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgerepvgg.data import calibration_images
    from edgerepvgg.quant.calibrate import calibrate, save_spec

    _check_eval_args(args)
    _, meta, plain = _plain_of(args.checkpoint)
    images = calibration_images(meta.input_spec, args.images)
    constraints = _constraints(args)
    spec = calibrate(plain, images, constraints, _calibration(args), batch_size=args.batch_size, progress=not args.quiet,
                     cache=False if args.no_cache else None)  # fmt: skip
    if args.max_drop is not None:
        spec = _mixed_precision(args, meta, plain, spec)
        if spec is None:
            return 1
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


def _check_eval_args(args: argparse.Namespace) -> None:
    if (getattr(args, "eval_limit", None) or 1) < 1 or getattr(args, "eval_limit", None) == 0:
        raise UserError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    max_drop = getattr(args, "max_drop", None)
    if max_drop is not None and not max_drop >= 0:
        raise UserError(f"--max-drop must be a non-negative number of top-1 points, got {max_drop}")


def _mixed_precision(args: argparse.Namespace, meta, plain, spec):
    """Keep the most sensitive layers in float until the gate holds; ``None`` when it cannot."""
    from edgerepvgg.data import evaluation_set
    from edgerepvgg.quant.mixed import keep_sensitive_layers

    eval_set = evaluation_set(meta.input_spec, args.eval_images, args.eval_limit)
    spec, trace = keep_sensitive_layers(plain, spec, eval_set, args.max_drop, progress=not args.quiet)
    record = spec.calibration["mixed_precision"]
    print(f"accuracy gate {args.max_drop:g} pt on {len(eval_set)} images of {eval_set.source}: FP32 top-1 {100 * record['fp32_top1']:.2f}%")
    for entry in trace:
        what = "all INT8" if entry["layer"] is None else f"+ {entry['layer']} in float"
        print(f"  {what:<24} top-1 {100 * entry['top1']:.2f}% ({-entry['drop']:+.2f} pt)")
    if record["status"] != "met":
        print(f"edgerepvgg calibrate: accuracy gate not met: {record['message']}; no QuantSpec written", file=sys.stderr)
        return None
    kept = [k["layer"] for k in record["kept_float"]]
    print(f"gate met with {len(kept)} layer(s) in float: {', '.join(kept) or 'none'}")
    return spec


# ---------------------------------------------------------------------------------------------
# analyze


def cmd_analyze(args: argparse.Namespace) -> int:
    from edgerepvgg.data import calibration_images, evaluation_set
    from edgerepvgg.quant.analysis import TABLE_LEGEND, analyze, summary, table, write

    _check_eval_args(args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass -o a folder for analysis.json and analysis.png")
    _, meta, plain = _plain_of(args.checkpoint)
    images = calibration_images(meta.input_spec, args.images)
    eval_set = evaluation_set(meta.input_spec, args.eval_images, args.eval_limit)
    constraints = _constraints(args)
    result = analyze(plain, images, eval_set, constraints, _calibration(args), batch_size=args.batch_size,
                     progress=not args.quiet, cache=False if args.no_cache else None)  # fmt: skip
    json_path, png_path = write(result, out_dir)
    print(f"{plain.name} for {constraints.name} (activations {_grid(constraints.activation)}, weights {_grid(constraints.weight)}): "
          f"statistics from {len(images)} images of {images.source}, accuracy on {len(eval_set)} images of {eval_set.source}")  # fmt: skip
    print(table(result))
    print(TABLE_LEGEND)
    print()
    print(summary(result))
    print(f"wrote {json_path} and {png_path}")
    return 0


# ---------------------------------------------------------------------------------------------
# train


def _is_fashion_mnist_source(data: str) -> bool:
    return data == "fashion-mnist" or (Path(data).is_dir() and any(Path(data).glob("*idx*-ubyte*")))


def _labelled_sets(data: str, spec):
    """(train, eval) sets preprocessed with ``spec``: Fashion-MNIST (Debian's package or a folder of
    its IDX files), or ``DIR/train`` [+ ``DIR/val``] image folders, whose class names join the spec."""
    from dataclasses import replace

    from edgerepvgg.data import fashion_mnist, image_folder

    if _is_fashion_mnist_source(data):
        root = None if data == "fashion-mnist" else data
        return fashion_mnist("train", spec, root), fashion_mnist("test", spec, root)
    root = Path(data)
    if not (root / "train").is_dir():
        raise UserError(f"--data {data}: expected 'fashion-mnist', a folder of Fashion-MNIST IDX files, or a folder with train/ (and val/) image folders")
    train_set = image_folder(root / "train", spec, spec.class_names or None)
    spec = replace(spec, class_names=train_set.class_names)
    val_set = image_folder(root / "val", spec, spec.class_names) if (root / "val").is_dir() else None
    return replace(train_set, spec=spec), val_set


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from edgerepvgg.train import MODEL_FILE, TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(model=args.model, block=args.block, epochs=args.epochs, batch_size=args.batch_size,
                         optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_epochs=args.warmup_epochs, seed=args.seed)  # fmt: skip
    from dataclasses import replace

    from edgerepvgg.checkpoints import default_spec
    from edgerepvgg.data import fashion_mnist_spec

    if _is_fashion_mnist_source(args.data):
        spec = fashion_mnist_spec()
    else:  # ImageNet mean/std for 3 channels, 0.5/0.5 for 1
        size = args.size or 224
        spec = replace(default_spec(args.in_chans), size=size, resize=args.resize or int(round(size / 0.875)))
    train_set, eval_set = _labelled_sets(args.data, spec)
    _, meta = train(config, train_set, eval_set, args.out, resume=args.resume, progress=not args.quiet)
    if not _main_rank():
        return 0
    if "eval_top1" in meta.extra:
        print(f"top-1 {meta.extra['eval_top1']:.4f} on {meta.extra['eval_set']}")
    print(f"wrote {Path(args.out) / MODEL_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------
# qat


def _main_rank() -> bool:
    """False in the non-zero ranks of a ``torchrun`` job, which stay silent."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_qat(args: argparse.Namespace) -> int:
    import torch

    from edgerepvgg.data import calibration_images, is_fashion_mnist_spec, stratified_subset
    from edgerepvgg.quant import load_spec
    from edgerepvgg.quant.calibrate import calibrate
    from edgerepvgg.quant.qat import QATConfig, qat

    if args.threads:
        torch.set_num_threads(args.threads)
    config = QATConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, distill_alpha=args.distill_alpha,
                       temperature=args.temperature, learn_scales=args.learn_scales, seed=args.seed)  # fmt: skip
    _, meta, plain = _plain_of(args.checkpoint)
    data = args.data or ("fashion-mnist" if is_fashion_mnist_spec(meta.input_spec) else None)
    if data is None:
        raise UserError("this model was not trained on Fashion-MNIST; pass --data (a folder with train/ [val/] class subfolders)")
    train_set, eval_set = _labelled_sets(data, meta.input_spec)
    if args.spec:
        spec, start = load_spec(args.spec), f"QuantSpec {args.spec}"
    else:
        if args.images or is_fashion_mnist_spec(meta.input_spec):
            images = calibration_images(meta.input_spec, args.images)
        elif len(train_set) <= 256:  # no calibration images of its own: (a sample of) the training set
            images = train_set
        else:
            images = stratified_subset(train_set, max(1, 256 // (int(train_set.labels.max()) + 1)))
        spec = calibrate(plain, images, _constraints(args), _calibration(args), progress=not args.quiet,
                         cache=False if args.no_cache else None)  # fmt: skip
        start = f"calibration on {len(images)} images of {images.source} ({args.method})"
    _, fine_spec, metrics = qat(plain, spec, train_set, eval_set, config, args.out, resume=args.resume, progress=not args.quiet)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not _main_rank():
        return 0
    c = fine_spec.constraints
    print(f"fine-tuned {plain.name} for {c.name} (activations {_grid(c.activation)}, weights {_grid(c.weight)}) "
          f"on {train_set.source}, starting from {start}")  # fmt: skip
    if "qat_top1" in metrics:
        print(f"top-1 on {len(eval_set)} images of {metrics['eval_set']}: FP32 {100 * metrics['fp32_top1']:.2f}%, "
              f"PTQ {100 * metrics['ptq_top1']:.2f}%, QAT {100 * metrics['qat_top1']:.2f}% (quantized: integer emulation)")
        print(f"the exported spec reproduces {100 * metrics['emulation_agreement']:.2f}% of the fake-quant model's top-1")
    print(f"wrote {metrics['model_file']} (fused checkpoint) and {metrics['spec_file']} (sha256 {fine_spec.sha256[:12]})")
    return 0


# ---------------------------------------------------------------------------------------------
# export, targets


def _spec_for_target(args: argparse.Namespace, meta, plain, target):
    """The QuantSpec an INT8 export uses: ``--spec``, or a calibration for the target's scheme."""
    from edgerepvgg.data import calibration_images
    from edgerepvgg.quant import constraints_for, load_spec
    from edgerepvgg.quant.calibrate import calibrate

    if args.spec:
        if args.images:
            raise UserError("pass --spec or --images, not both (a spec already holds its calibration)")
        return load_spec(args.spec), f"QuantSpec {args.spec}"
    images = calibration_images(meta.input_spec, args.images)
    constraints = constraints_for(getattr(args, "scheme", None) or target.constraint_set, weight_bits=args.weight_bits)
    spec = calibrate(plain, images, constraints, args.method, progress=not args.quiet, cache=False if args.no_cache else None)
    skipped = f", {len(images.skipped)} unreadable files skipped" if images.skipped else ""
    return spec, f"calibrated for {constraints.name} on {len(images)} images of {images.source} ({args.method}{skipped})"


def _profile_arg(name: str):
    """A device profile when ``--target`` names a .toml file or a shipped profile, else None."""
    from edgerepvgg.profiles import load_profile, shipped_profiles
    from edgerepvgg.targets import target_names

    if name in target_names():
        return None
    shipped = {p.stem: p for p in shipped_profiles()}
    if name.endswith(".toml") or Path(name).is_file():
        return load_profile(name)
    return load_profile(shipped[name]) if name in shipped else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def cmd_export(args: argparse.Namespace) -> int:
    from edgerepvgg.data import evaluation_set
    from edgerepvgg._export import REPORT_FILE, export
    from edgerepvgg.targets import get_target, require_exportable

    _check_eval_args(args)
    precision = "int8" if args.int8 else args.precision
    profile = _profile_arg(args.target)
    if profile is not None:  # a device profile sets backend, precision, threads, batch and the scheme
        precision = profile.precision if not args.int8 and args.precision == "fp32" else precision
        args.threads = args.threads or profile.threads
        args.throughput_batch = profile.batch
        args.weight_bits = args.weight_bits or profile.weight_bits
        args.scheme = profile.constraints
    target = get_target(profile.backend if profile else args.target)
    require_exportable(target)  # before the model is loaded and calibrated
    _, meta, plain = _plain_of(args.checkpoint)
    spec, origin = _spec_for_target(args, meta, plain, target) if precision == "int8" else (None, "")
    eval_set = None if args.no_eval else evaluation_set(meta.input_spec, args.eval_images, args.eval_limit)
    out_dir = Path(args.output or f"export/{profile.name if profile else f'{target.name}-{precision}'}")
    report = export(plain, target, out_dir, precision, spec, eval_set, threads=args.threads, latency=not args.no_latency,
                    throughput_batch=args.throughput_batch, fixed_batch=args.fixed_batch)  # fmt: skip
    print(f"{target.name} {precision}: {report.artifact['path']} ({report.artifact['size_bytes'] / 1e6:.2f} MB)" + (f"; {origin}" if origin else ""))
    for key, value in report.artifact["info"].items():
        if key in ("convs", "int8_convs", "float_convs", "qdq_check", "engine_built", "trtexec"):
            print(f"  {key}: {value}")
    acc = report.accuracy
    if acc is not None:
        label = " (emulated: ONNX Runtime, not a TensorRT engine)" if report.emulated else ""
        print(f"accuracy on {acc.images} images of {acc.source}{label}:")
        print(f"  top-1 {_pct(acc.top1)} ({acc.delta_top1:+.2f} pt vs FP32 {_pct(acc.fp32_top1)}), top-5 {_pct(acc.top5)}")
        print(f"  agreement with FP32: top-1 {_pct(acc.vs_fp32.top1)}, cosine {acc.vs_fp32.cosine:.5f}")
        if acc.vs_emulation is not None:
            e = acc.vs_emulation
            print(f"  agreement with the INT8 emulation: top-1 {_pct(e.top1)}, cosine {e.cosine:.6f}, max |diff| {e.max_abs:.3g}")
    for name, lat in report.latency.items():
        print(f"latency {name}: p50 {lat.p50_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms ({lat.throughput:.0f} images/s, {lat.runs} runs)")
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {out_dir / REPORT_FILE}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from edgerepvgg.report import table_rows
    from edgerepvgg._compare import compare as run_compare
    from edgerepvgg.data import calibration_images, evaluation_set
    from edgerepvgg.profiles import resolve, shipped_profiles
    from edgerepvgg.report import text_table, write_comparison

    _check_eval_args(args)
    names = [n for item in (args.targets or []) for n in item.split(",") if n] + list(args.profiles or [])
    profiles = resolve(names) if names else resolve([str(p) for p in shipped_profiles()])
    if not profiles:
        raise UserError("no targets to compare; pass --targets (e.g. all) or --profiles FILE.toml")
    model, meta, plain = _plain_of(args.checkpoint)
    calib = calibration_images(meta.input_spec, args.images) if any(p.precision == "int8" for p in profiles) else None
    eval_set = evaluation_set(meta.input_spec, args.eval_images, args.eval_limit)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass -o a folder")
    result = run_compare(plain, profiles, out_dir, calib, eval_set, train_model=None if meta.fused else model,
                         method=args.method, threads=args.threads, progress=not args.quiet)  # fmt: skip
    header, body = table_rows(result)
    print(f"{plain.name} on {result.eval_images} images of {result.eval_source}" + (f"; calibrated on {len(calib)} images of {calib.source}" if calib else ""))
    print(text_table(header, body))
    for r in result.rows:
        if r.status not in ("ok", "reference") and r.why:
            print(f"{r.name}: {r.status}: {r.why}")
    paths = write_comparison(result, out_dir)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if result.failed:
        print(f"edgerepvgg compare: {sum(1 for r in result.rows if r.gates_failed)} target(s) failed their gates", file=sys.stderr)
        return 1
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from edgerepvgg.targets import list_targets

    rows = list_targets()
    width = max(len(t.name) for t in rows)
    for t in rows:
        state = "available" if t.available else f"not available: {t.reason}"
        detail = f"  [{', '.join(t.precisions)}; scheme {t.constraint_set}]" if t.precisions else ""
        print(f"{t.name:<{width}}  {state}{detail}")
        if t.description:
            print(f"{'':<{width}}  {t.description}")
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
    s.add_argument("--method", default="mse", choices=list(OBSERVERS),
                   help="activation range method (default mse: best on both bundled models, see README)")
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
    s.add_argument("--max-drop", type=float, metavar="PTS", help="accuracy gate: keep the most sensitive layers in float until "
                   "INT8 top-1 is at most PTS points below FP32 (mixed precision)")  # fmt: skip
    s.add_argument("--eval-images", help="labelled image folder for --max-drop (default: the Fashion-MNIST test set)")
    s.add_argument("--eval-limit", type=int, default=1000, help="class-balanced evaluation images for --max-drop (default 1000)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("analyze", help="why a model will or won't quantize: per-layer weights, activations, sensitivity; table + plot")
    s.add_argument("checkpoint", nargs="?", help=ckpt_help)
    s.add_argument("--images", help="folder of calibration images (default: the bundled Fashion-MNIST set, for Fashion-MNIST models)")
    s.add_argument("--eval-images", help="labelled image folder, one subfolder per class (default: the Fashion-MNIST test set)")
    s.add_argument("--eval-limit", type=int, default=1000, help="class-balanced evaluation images for the sensitivities (default 1000)")
    _quant_args(s)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--no-cache", action="store_true", help="do not reuse or store activation statistics")
    s.add_argument("-o", "--output", default="analysis", help="folder for analysis.json and analysis.png (default analysis)")
    s.set_defaults(func=cmd_analyze)

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

    s = sub.add_parser("qat", help="quantization-aware fine-tuning of the fused net -> checkpoint + QuantSpec (torchrun-ready)")
    s.add_argument("checkpoint", nargs="?", help=ckpt_help)
    s.add_argument("--data", help="'fashion-mnist', a folder of its IDX files, or a folder with train/ [val/] class subfolders "
                   "(default: fashion-mnist for Fashion-MNIST models)")  # fmt: skip
    s.add_argument("--images", help="calibration images for the starting spec (default: the bundled set for Fashion-MNIST "
                   "models, else 256 training images)")  # fmt: skip
    s.add_argument("--spec", help="start from this QuantSpec JSON instead of calibrating")
    _quant_args(s)
    s.add_argument("--no-cache", action="store_true", help="do not reuse or store activation statistics")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--batch-size", type=int, default=64, help="global batch; under torchrun split evenly among the processes")
    s.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--warmup-epochs", type=float, default=0.0)
    s.add_argument("--learn-scales", action="store_true", help="learn activation and weight scales (LSQ)")
    s.add_argument("--distill-alpha", type=float, default=0.5, help="weight of distillation from the FP32 net (0: labels only)")
    s.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch intra-op threads per process (default: all cores)")
    s.add_argument("--out", default="runs/qat", help="output folder: last.pt every epoch, model.safetensors + quant_spec.json at the end")
    s.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    s.set_defaults(func=cmd_qat)

    s = sub.add_parser("export", help="compile for a target (FP32 or INT8), check accuracy per target, time it; artifact + report.json")
    s.add_argument("checkpoint", nargs="?", help=ckpt_help)
    s.add_argument("--target", required=True, help="onnxruntime, openvino, tensorrt or tflite ('edgerepvgg targets' lists them), "
                   "or a device profile (.toml file or shipped profile name)")  # fmt: skip
    s.add_argument("--int8", action="store_true", help="INT8 (same as --precision int8)")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="default fp32")
    s.add_argument("--images", help="calibration images for INT8 (default: the bundled set, for Fashion-MNIST models)")
    s.add_argument("--spec", help="use this QuantSpec JSON (from 'calibrate' or 'qat') instead of calibrating")
    s.add_argument("--method", default="mse", help="activation range method when calibrating (default mse)")
    s.add_argument("--weight-bits", type=int, help="override the weight bit width of the target's scheme")
    s.add_argument("--no-cache", action="store_true", help="do not reuse or store activation statistics")
    s.add_argument("--eval-images", help="labelled image folder for the accuracy check (default: the Fashion-MNIST test set)")
    s.add_argument("--eval-limit", type=int, help="class-balanced subset of the evaluation set (default: all of it)")
    s.add_argument("--no-eval", action="store_true", help="skip the accuracy check")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    s.add_argument("--threads", type=int, help="runtime threads (default: the runtime's own choice)")
    s.add_argument("--throughput-batch", type=int, default=16, help="batch for the throughput figure (default 16)")
    s.add_argument("--fixed-batch", type=int, metavar="N", help="fix the artifact's batch dimension to N (ONNX-based targets; "
                   "default: dynamic); it is then checked and timed at batch N")  # fmt: skip
    s.add_argument("-o", "--output", help="output folder (default export/TARGET-PRECISION)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("compare", help="every target side by side: accuracy, agreement, INT8 coverage, latency; table + JSON/CSV/MD/PNG, gates")
    s.add_argument("checkpoint", nargs="?", help=ckpt_help)
    s.add_argument("--targets", nargs="+", metavar="NAME", help="backends (each in FP32 and INT8), 'all', shipped profile names or "
                   ".toml files (default: every profile in targets/)")  # fmt: skip
    s.add_argument("--profiles", nargs="+", metavar="FILE", help="profile files (TOML)")
    s.add_argument("--images", help="calibration images for INT8 (default: the bundled set, for Fashion-MNIST models)")
    s.add_argument("--method", default="mse", help="activation range method (default mse)")
    s.add_argument("--eval-images", help="labelled image folder (default: the Fashion-MNIST test set)")
    s.add_argument("--eval-limit", type=int, help="class-balanced subset of the evaluation set (default: all of it)")
    s.add_argument("--threads", type=int, help="threads where a profile does not set them")
    s.add_argument("-o", "--output", default="compare", help="output folder (default compare)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("targets", help="list the targets and whether each runs here (and why not)")
    s.set_defaults(func=cmd_targets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = args.quiet or not _main_rank()  # other torchrun ranks: warnings only, no progress bars
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
