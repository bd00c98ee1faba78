"""Command line: a thin layer over the library. Each sub-command parses, calls the library
function below, and prints; every default and decision lives in that function, so Python users
get the same behaviour.

    info       checkpoints.load_model, plain.count_macs
    fuse       _fuse.fuse, checkpoints.save_checkpoint
    calibrate  quant.calibrate.calibrate (+ quant.mixed.keep_sensitive_layers for --max-drop)
    analyze    quant.analysis.analyze, rendered by quant.analysis_report
    train      train.train on data.labelled_sets
    qat        quant.qat.qat
    export     _export.export -> targets/<backend>.py
    compare    _compare.compare, rendered by report
    targets    targets.list_targets

Exit codes: 0 ok; 1 a check or gate failed (an accuracy gate not met, a target that errored in
``compare``, with ``--strict`` a gate that could not be checked); 2 a usage or user error (one line
on stderr, nothing written); 3 an internal error (a bug: the traceback, then one line); 130
interrupted (artifacts are written atomically: each is complete or absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

from edgerepvgg.errors import UserError

log = logging.getLogger("edgerepvgg")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# ---------------------------------------------------------------------------------------------
# Values checked at parse time: a bad one is one line and exit 2 before anything runs


def _whole(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _number(lo: float, hi: float | None = None, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > lo if lo_open else value >= lo
        if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
            left = "(" if lo_open else "["
            bound = f"in {left}{lo:g}, {hi:g}]" if hi is not None else f"{'above' if lo_open else 'at least'} {lo:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


POSITIVE = _whole(1)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is what --help is for)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------------------------
# Option groups, declared once and shared


def _model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", nargs="?", metavar="MODEL",
                   help="checkpoint file (ours, official, timm or MMPretrain layout), bundled model name, or a variant name "
                        "(A0..B3g4: random weights); default: the bundled RepVGG-A0")  # fmt: skip
    g = s.add_argument_group("for a variant name")
    g.add_argument("--num-classes", type=POSITIVE, default=1000, help="classes (default 1000)")
    g.add_argument("--in-chans", type=int, default=3, choices=[1, 3], help="input channels (default 3)")
    g.add_argument("--block", default="repvgg", choices=["repvgg", "qarepvgg"], help="block type (default repvgg)")
    _input_args(s)


def _size(text: str):
    from edgerepvgg.inputs import parse_size

    try:
        size = parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if min(size if isinstance(size, tuple) else (size,)) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text}")
    return size


def _input_args(s: argparse.ArgumentParser, default: str = "the checkpoint's, else timm's config.json beside it, else ImageNet's") -> None:
    """The input spec's options: each replaces what the checkpoint (or timm's config.json beside
    it) carries; the log says where every value came from."""
    from edgerepvgg.inputs import INTERPOLATIONS

    g = s.add_argument_group(f"input spec (default: {default})")
    g.add_argument("--size", type=_size, metavar="N|HxW", help="network input, e.g. 224 or 48x64 (height x width)")
    g.add_argument("--resize", type=_size, metavar="N|HxW", help="resize (aspect kept) to cover this before the center crop; "
                   "N: the shorter side (default: the checkpoint's resize/size ratio at --size)")  # fmt: skip
    g.add_argument("--mean", type=_number(0, 1), nargs="+", metavar="M", help="per-channel mean of [0, 1] pixels, in [0, 1] (one per input channel)")
    g.add_argument("--std", type=_number(0, lo_open=True), nargs="+", metavar="S", help="per-channel std (one per input channel, each > 0)")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize filter")
    g.add_argument("--class-names", metavar="FILE", help="class names, one per line in the head's order (as many as it has outputs)")


def _inputs(args: argparse.Namespace):
    """The input-spec overrides the flags give (None: none given)."""
    from edgerepvgg.inputs import InputOverrides, read_class_names

    names = read_class_names(args.class_names) if args.class_names else None
    o = InputOverrides(args.size, args.resize, tuple(args.mean) if args.mean else None, tuple(args.std) if args.std else None,
                       args.interpolation, names, args.class_names)  # fmt: skip
    return o if o.given() else None


def _calibration_args(s: argparse.ArgumentParser, spec: bool = False, scheme: bool = True, constraints: str | None = None) -> None:
    """The calibration flags of every command that quantizes; ``spec``: also --spec; ``scheme``:
    also --constraints, defaulting to ``constraints`` (None: the target's own scheme)."""
    from edgerepvgg.quant import CONSTRAINT_SETS
    from edgerepvgg.quant.calibrate import WEIGHT_METHODS
    from edgerepvgg.quant.observers import RANGE_METHODS

    g = s.add_argument_group("calibration")
    g.add_argument("--images", help="folder of calibration images (default: the bundled set, for Fashion-MNIST models)")
    g.add_argument("--calib-limit", type=_whole(0), metavar="N", help="calibrate on N images at most, a seeded sample chosen "
                   "before decoding, class-balanced in a labelled folder; 0: all (default 512)")  # fmt: skip
    g.add_argument("--workers", type=_whole(0), metavar="N", help="image-decoding processes (default: up to 4 for large "
                   "folders, none for small ones; 0: none)")  # fmt: skip
    if spec:
        g.add_argument("--spec", help="use this QuantSpec JSON (from 'calibrate' or 'qat') instead of calibrating")
    if scheme:
        g.add_argument("--constraints", default=constraints, choices=list(CONSTRAINT_SETS),
                       help=f"integer scheme of the target's kernels (default: {constraints or 'the target or profile scheme'})")  # fmt: skip
    g.add_argument("--method", default="mse", choices=list(RANGE_METHODS), help="activation range method (default mse)")
    g.add_argument("--weight-method", default="minmax", choices=list(WEIGHT_METHODS), help="per-channel weight range method")
    g.add_argument("--percentile", type=_number(50, 100, lo_open=True), default=99.99, help="for --method percentile, in (50, 100]")
    g.add_argument("--weight-bits", type=_whole(2, 8), help="weight bit width, 2..8 (default: the scheme's: 8, or 7 on x86 CPUs without VNNI)")
    g.add_argument("--no-cache", action="store_true", help="do not reuse or store activation statistics")


def _eval_args(s: argparse.ArgumentParser, limit: int | None, what: str) -> None:
    g = s.add_argument_group("evaluation")
    g.add_argument("--eval-images", help=f"labelled image folder, one subfolder per class, for {what} (default: the Fashion-MNIST test set)")
    g.add_argument("--eval-limit", type=POSITIVE, default=limit,
                   help=f"class-balanced subset of the evaluation set (default: {limit or 'all of it'})")  # fmt: skip


def _device_args(s: argparse.ArgumentParser, what: str, amp: bool = False, torchrun: bool = False) -> None:
    """--device (and for training --amp): where the PyTorch work of a command runs."""
    g = s.add_argument_group("device")
    note = "; under torchrun, each process's GPU where CUDA is available" if torchrun else ""
    g.add_argument("--device", metavar="DEV", help=f"where {what}: cpu, cuda, cuda:N or mps (default cpu{note})")
    if amp:
        g.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                       help="mixed precision: autocast the training forward pass to bf16 or fp16 (default off)")  # fmt: skip


def _recipe_args(s: argparse.ArgumentParser, defaults) -> None:
    """The training-loop flags, with defaults read from the recipe's config object."""
    g = s.add_argument_group("recipe")
    g.add_argument("--epochs", type=POSITIVE, default=defaults.epochs)
    g.add_argument("--batch-size", type=POSITIVE, default=defaults.batch_size, help="global batch (split among torchrun processes)")
    g.add_argument("--optimizer", default=defaults.optimizer, choices=["sgd", "adamw"])
    g.add_argument("--lr", type=_number(0, lo_open=True), default=defaults.lr)
    g.add_argument("--weight-decay", type=_number(0), default=defaults.weight_decay)
    g.add_argument("--warmup-epochs", type=_number(0), default=defaults.warmup_epochs)
    g.add_argument("--seed", type=_whole(0), default=defaults.seed)
    g.add_argument("--threads", type=POSITIVE, help="torch intra-op threads per process (default: all cores)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")


def _qat_args(s: argparse.ArgumentParser, pipeline: bool = False) -> None:
    """The QAT flags of ``qat``; ``pipeline``: those of ``export``/``compare``, where ``--qat
    EPOCHS`` turns fine-tuning on, with its data and the recipe flags (no --epochs/--threads/--resume)."""
    from edgerepvgg.quant.qat import QATConfig

    d = QATConfig()
    g = s.add_argument_group("quantization-aware fine-tuning" + (" (with --qat)" if pipeline else ""))
    if pipeline:
        g.add_argument("--qat", type=POSITIVE, metavar="EPOCHS", help="fine-tune each INT8 scheme for EPOCHS epochs after "
                       "calibrating and compile from the better of PTQ and QAT (cached: a re-run reuses it)")  # fmt: skip
        g.add_argument("--data", help="labelled training data for --qat: 'fashion-mnist', a folder of its IDX files, or a folder "
                       "with train/ [val/] class subfolders (default: fashion-mnist for Fashion-MNIST models)")  # fmt: skip
        for flag, kind, value in (("--batch-size", POSITIVE, d.batch_size), ("--lr", _number(0, lo_open=True), d.lr),
                                  ("--weight-decay", _number(0), d.weight_decay), ("--warmup-epochs", _number(0), d.warmup_epochs),
                                  ("--seed", _whole(0), d.seed)):  # fmt: skip
            g.add_argument(flag, type=kind, default=value, help=f"QAT {flag[2:].replace('-', ' ')} (default {value:g})")
        g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"])
    g.add_argument("--learn-scales", action="store_true", help="learn activation and weight scales (LSQ)")
    g.add_argument("--distill-alpha", type=_number(0, 1), default=d.distill_alpha, help="weight of distillation from the FP32 net, in [0, 1]")
    g.add_argument("--temperature", type=_number(0, lo_open=True), default=d.temperature, help="distillation temperature")
    g.add_argument("--patience", type=POSITIVE, metavar="N", help="stop after N epochs without a better held-out INT8 top-1 "
                   "(default: run every epoch; the best epoch is kept either way)")  # fmt: skip


def _qat_config(args: argparse.Namespace):
    """The QATConfig of ``export``/``compare --qat EPOCHS``, or None without --qat."""
    from edgerepvgg.quant.qat import QATConfig

    return None if args.qat is None else dataclasses.replace(_recipe(args, QATConfig), epochs=args.qat)


def _recipe(args: argparse.Namespace, cls):
    """A recipe config from the flags that name its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _output(s: argparse.ArgumentParser, default: str | None, help: str, **kwargs) -> None:
    s.add_argument("-o", "--output", "--out", dest="output", default=default, help=help, **kwargs)


def _common() -> argparse.ArgumentParser:
    """-v/-q, accepted before or after the sub-command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only, no progress bars")
    return p


# ---------------------------------------------------------------------------------------------
# Commands


def _plain(args: argparse.Namespace):
    """(PlainNet, train-time model or None) for the MODEL argument (fused and checked)."""
    from edgerepvgg._export import resolve_model

    return resolve_model(args.checkpoint, num_classes=args.num_classes, in_chans=args.in_chans, block=args.block, inputs=_inputs(args))


def _calibration(args: argparse.Namespace):
    from edgerepvgg.quant.calibrate import CalibrationConfig

    return CalibrationConfig(args.method, args.weight_method, args.percentile)


def _calib_limit(args: argparse.Namespace) -> int | None:
    """--calib-limit: the library's default when not given, None (all images) for 0."""
    from edgerepvgg.data import DEFAULT_CALIB_LIMIT

    return DEFAULT_CALIB_LIMIT if args.calib_limit is None else args.calib_limit or None


def _calib_set(args: argparse.Namespace, plain):
    """The calibration images --images, --calib-limit and --workers name."""
    from edgerepvgg._export import calibration_set

    return calibration_set(plain, args.images, _calib_limit(args), args.workers)


def _cache(args: argparse.Namespace) -> bool | None:
    return False if args.no_cache else None


def _write_json(path: str, data: dict | list) -> None:
    from edgerepvgg.io import write_text_atomic

    print(f"wrote {write_text_atomic(path, json.dumps(data, indent=1) + chr(10))}")


def cmd_info(args: argparse.Namespace) -> int:
    from edgerepvgg.checkpoints import describe, load_model
    from edgerepvgg.report import info_text

    model, meta = load_model(args.checkpoint, num_classes=args.num_classes, in_chans=args.in_chans, block=args.block,
                             inputs=_inputs(args))  # fmt: skip
    info = describe(model, meta)
    print(info_text(info, meta, layers=args.layers))
    if args.output:
        _write_json(args.output, {**info, "meta": json.loads(meta.to_json())})
    return EXIT_OK


def cmd_fuse(args: argparse.Namespace) -> int:
    from edgerepvgg._fuse import fuse, reparameterize
    from edgerepvgg.checkpoints import load_model, save_checkpoint

    model, meta = load_model(args.checkpoint, num_classes=args.num_classes, in_chans=args.in_chans, block=args.block,
                             inputs=_inputs(args))  # fmt: skip
    _, checks = fuse(model, meta.input_spec)
    for check in checks:
        print(f"equivalence {check}")
    out = save_checkpoint(args.output, reparameterize(model), dataclasses.replace(meta, fused=True), half=args.half)
    print(f"wrote {out} (fused RepVGG-{meta.variant}, official deploy key layout)")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgerepvgg.data import evaluation_set
    from edgerepvgg.quant import constraints_for
    from edgerepvgg.quant.calibrate import calibrate, save_spec
    from edgerepvgg.quant.mixed import keep_sensitive_layers
    from edgerepvgg.report import mixed_precision_text, spec_text

    plain = _plain(args)[0]  # the train-time net is not kept (RepVGG-B3: 0.5 GB)
    images = _calib_set(args, plain)
    c = constraints_for(args.constraints, weight_bits=args.weight_bits)
    spec = calibrate(plain, images, c, _calibration(args), batch_size=args.batch_size, progress=not args.quiet, cache=_cache(args),
                     device=args.device)  # fmt: skip
    if args.max_drop is not None:
        eval_set = evaluation_set(plain.input_spec, args.eval_images, args.eval_limit, workers=args.workers)
        spec, trace = keep_sensitive_layers(plain, spec, eval_set, args.max_drop, progress=not args.quiet)
        record = spec.calibration["mixed_precision"]
        print(mixed_precision_text(record, trace, args.max_drop, eval_set))
        if record["status"] != "met":
            print(f"edgerepvgg calibrate: accuracy gate not met: {record['message']}; no QuantSpec written", file=sys.stderr)
            return EXIT_FAILED
    out = save_spec(spec, args.output)
    print(spec_text(spec, plain, images))
    print(f"wrote {out} (sha256 {spec.sha256[:12]})")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    from edgerepvgg.io import claimed_output_dir

    with claimed_output_dir(args.output, "analysis.json and analysis.png"):
        return _analyze(args)


def _analyze(args: argparse.Namespace) -> int:
    from edgerepvgg.data import evaluation_set
    from edgerepvgg.quant import constraints_for
    from edgerepvgg.quant.analysis import analyze
    from edgerepvgg.quant.analysis_report import TABLE_LEGEND, summary, table, write
    from edgerepvgg.report import scheme_text

    plain, _ = _plain(args)
    images = _calib_set(args, plain)
    eval_set = evaluation_set(plain.input_spec, args.eval_images, args.eval_limit, workers=args.workers)
    c = constraints_for(args.constraints, weight_bits=args.weight_bits)
    result = analyze(plain, images, eval_set, c, _calibration(args), batch_size=args.batch_size, progress=not args.quiet, cache=_cache(args),
                     device=args.device)  # fmt: skip
    json_path, png_path = write(result, args.output)
    print(f"{plain.name} for {scheme_text(c)}: statistics from "
          f"{len(images)} images of {images.source}, accuracy on {len(eval_set)} images of {eval_set.source}")  # fmt: skip
    print(f"{table(result)}\n{TABLE_LEGEND}\n\n{summary(result)}")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return EXIT_OK


def _main_rank() -> bool:
    """False in the non-zero ranks of a ``torchrun`` job, which stay silent."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from edgerepvgg.data import labelled_sets, training_spec
    from edgerepvgg.inputs import apply_overrides
    from edgerepvgg.train import MODEL_FILE, TrainConfig, init_variant, train

    if args.threads:
        torch.set_num_threads(args.threads)
    variant, block = init_variant(args.init) if args.init and None in (args.model, args.block) else ("A0", "repvgg")
    args.model, args.block = args.model or variant, args.block or block
    config = _recipe(args, TrainConfig)
    square = isinstance(args.size, int) and not isinstance(args.resize, tuple)  # else the overrides set both
    base = training_spec(args.data, args.in_chans, args.size, args.resize) if square else training_spec(args.data, args.in_chans)
    spec, _ = apply_overrides(base, _inputs(args))
    train_set, eval_set = labelled_sets(args.data, spec)
    _, meta = train(config, train_set, eval_set, args.output, resume=args.resume, progress=not args.quiet, device=args.device,
                    init=args.init)  # fmt: skip
    if _main_rank():
        if "eval_top1" in meta.extra:
            print(f"top-1 {meta.extra['eval_top1']:.4f} on {meta.extra['eval_set']}")
        print(f"wrote {Path(args.output) / MODEL_FILE}")
    return EXIT_OK


def cmd_qat(args: argparse.Namespace) -> int:
    import torch

    from edgerepvgg.data import default_training_data, labelled_sets
    from edgerepvgg.quant import load_spec
    from edgerepvgg.quant.qat import QATConfig, qat
    from edgerepvgg.report import qat_text

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _recipe(args, QATConfig)
    if args.spec and args.images:
        raise UserError("pass --spec or --images, not both (a spec already holds its calibration)")
    plain, _ = _plain(args)
    train_set, eval_set = labelled_sets(args.data or default_training_data(plain.input_spec), plain.input_spec)
    _, fine_spec, metrics = qat(plain, load_spec(args.spec) if args.spec else None, train_set, eval_set, config, args.output,
                                images=_calib_set(args, plain) if args.images else None,
                                constraints=args.constraints, weight_bits=args.weight_bits, calibration=_calibration(args),
                                cache=_cache(args), resume=args.resume, progress=not args.quiet, device=args.device)  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not _main_rank():
        return EXIT_OK
    print(qat_text(plain, fine_spec, metrics, train_set, eval_set))
    print(f"wrote {metrics['model_file']} (fused checkpoint) and {metrics['spec_file']} (sha256 {fine_spec.sha256[:12]})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from edgerepvgg._export import REPORT_FILE, ExportOptions, export, resolve_target
    from edgerepvgg.report import export_text

    options = ExportOptions(threads=args.threads, latency=not args.no_latency, throughput_batch=args.throughput_batch,
                            fixed_batch=args.fixed_batch, constraints=args.constraints, weight_bits=args.weight_bits,
                            eval_limit=args.eval_limit, tensorrt_version=args.tensorrt_version, bundle=args.bundle,
                            device=args.device, calib_limit=_calib_limit(args), workers=args.workers)  # fmt: skip
    resolve_target(args.target, options)  # an unknown target fails before the model is read
    plain = _plain(args)[0]  # the train-time net is not kept (RepVGG-B3: 0.5 GB)
    report = export(plain, args.target, args.output, "int8" if args.int8 else args.precision, args.spec,
                    False if args.no_eval else args.eval_images, images=args.images, calibration=_calibration(args),
                    options=options, cache=_cache(args), progress=not args.quiet, qat=_qat_config(args),
                    qat_data=args.data)  # fmt: skip
    print(export_text(report))
    print(f"wrote {report.out_dir / REPORT_FILE}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from edgerepvgg._compare import compare
    from edgerepvgg.report import qat_runs_text, table_rows, text_table, write_comparison

    names = [n for item in (args.targets or []) for n in item.split(",") if n] + list(args.profiles or [])
    plain, train_model = _plain(args)
    result = compare(plain, names or None, args.output, args.images, args.eval_images, train_model=train_model,
                     calibration=_calibration(args), spec=args.spec, weight_bits=args.weight_bits, threads=args.threads,
                     eval_limit=args.eval_limit, strict=args.strict, cache=_cache(args), progress=not args.quiet,
                     bundles=args.bundles, results=args.results, device=args.device, calib_limit=_calib_limit(args),
                     workers=args.workers, qat=_qat_config(args), qat_data=args.data)  # fmt: skip
    header, body = table_rows(result)
    print(f"{plain.name} on {result.eval_images} images of {result.eval_source}")
    print(text_table(header, body))
    if result.qat:
        print(qat_runs_text(result.qat))
    for r in result.rows:
        if r.status not in ("ok", "reference") and r.why:
            print(f"{r.name}: {r.status}: {r.why}")
    paths = write_comparison(result, args.output)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    failed = [r.name for r in result.rows if r.gates_failed or r.status == "error" or (args.strict and r.gates_unchecked)]
    if result.failed:
        print(f"edgerepvgg compare: {len(failed)} target(s) failed (a gate failed{', a gate was not checked' if args.strict else ''} "
              f"or the target errored): {', '.join(failed)}", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    return EXIT_OK


def cmd_targets(args: argparse.Namespace) -> int:
    from edgerepvgg.report import targets_text
    from edgerepvgg.targets import list_targets

    rows = list_targets()
    print(targets_text(rows))
    if args.output:
        _write_json(args.output, [{**dataclasses.asdict(t), "available": t.available} for t in rows])
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    from edgerepvgg import __version__
    from edgerepvgg.profiles import PRECISIONS
    from edgerepvgg.targets import target_names

    common = _common()
    p = _Parser(prog="edgerepvgg", description="RepVGG from training checkpoint to INT8 engines on edge targets.",
                epilog="exit codes: 0 ok, 1 a check or gate failed, 2 usage or user error, 3 internal error")  # fmt: skip
    p.add_argument("--version", action="version", version=f"edgerepvgg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help, parents=[common])
        s.set_defaults(func=func)
        return s

    s = command("info", cmd_info, "parameters, MACs and layers of a variant or checkpoint")
    _model_args(s)
    s.add_argument("--layers", action="store_true", help="print the per-layer table")
    _output(s, None, "also write the information as JSON to this file")

    s = command("fuse", cmd_fuse, "re-parameterize into a plain 3x3 network, checked equivalent")
    _model_args(s)
    _output(s, None, "where to write the fused checkpoint (.safetensors)", required=True)
    s.add_argument("--half", action="store_true", help="store float16 weights")

    s = command("calibrate", cmd_calibrate, "post-training calibration with sample images -> QuantSpec JSON")
    _model_args(s)
    _calibration_args(s, constraints="tensorrt")
    s.add_argument("--batch-size", type=POSITIVE, default=64)
    s.add_argument("--max-drop", type=_number(0), metavar="PTS", help="accuracy gate: keep the most sensitive layers in float "
                   "until INT8 top-1 is at most PTS points below FP32 (mixed precision)")  # fmt: skip
    _eval_args(s, 1000, "--max-drop")
    _device_args(s, "the statistics pass runs")
    _output(s, "quant_spec.json", "QuantSpec JSON to write (default quant_spec.json)")

    s = command("analyze", cmd_analyze, "why a model will or won't quantize: per-layer weights, activations, sensitivity; table + plot")
    _model_args(s)
    _calibration_args(s, constraints="tensorrt")
    _eval_args(s, 1000, "the sensitivities")
    s.add_argument("--batch-size", type=POSITIVE, default=256)
    _device_args(s, "the statistics, FP32 and emulation passes run")
    _output(s, "analysis", "folder for analysis.json and analysis.png (default analysis)")

    from edgerepvgg.quant.qat import QATConfig
    from edgerepvgg.train import TrainConfig

    s = command("train", cmd_train, "train or fine-tune a RepVGG/QARepVGG on Fashion-MNIST or an image folder")
    s.add_argument("--model", help="variant (default: the --init checkpoint's, else A0)")
    s.add_argument("--block", choices=["repvgg", "qarepvgg"], help="block type (default: the --init checkpoint's, else repvgg)")
    s.add_argument("--init", metavar="CKPT", help="start from this train-time checkpoint (ours, official, timm or MMPretrain "
                   "layout): a new head when the class count differs, the stem's input channels adapted (3 -> 1: summed)")  # fmt: skip
    s.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' (Debian's package), a folder of its IDX files, "
                   "or a folder with train/ [val/] class subfolders")  # fmt: skip
    s.add_argument("--in-chans", type=int, default=3, choices=[1, 3], help="for image folders")
    _input_args(s, "for image folders: 224 (--resize default size/0.875), ImageNet mean/std; Fashion-MNIST's own")
    _recipe_args(s, TrainConfig())
    _device_args(s, "training runs", amp=True, torchrun=True)
    _output(s, "runs/train", "output folder: last.pt every epoch, model.safetensors at the end (default runs/train)")

    s = command("qat", cmd_qat, "quantization-aware fine-tuning of the fused net -> checkpoint + QuantSpec (torchrun-ready)")
    _model_args(s)
    s.add_argument("--data", help="'fashion-mnist', a folder of its IDX files, or a folder with train/ [val/] class subfolders "
                   "(default: fashion-mnist for Fashion-MNIST models)")  # fmt: skip
    _calibration_args(s, spec=True, constraints="tensorrt")
    _recipe_args(s, QATConfig())
    _qat_args(s)
    _device_args(s, "fine-tuning runs, in float32", torchrun=True)
    _output(s, "runs/qat", "output folder: last.pt every epoch, model.safetensors + quant_spec.json at the end (default runs/qat)")

    s = command("export", cmd_export, "compile for a target (FP32 or INT8), check accuracy per target, time it; artifact + report.json")
    _model_args(s)
    s.add_argument("--target", required=True, help=f"{', '.join(target_names())} ('edgerepvgg targets' lists them), "
                   "or a device profile (.toml file or shipped profile name)")  # fmt: skip
    s.add_argument("--int8", action="store_true", help="INT8 (same as --precision int8)")
    s.add_argument("--precision", choices=PRECISIONS, help="default: the profile's, int8 with --spec, else fp32")
    _calibration_args(s, spec=True)
    _eval_args(s, None, "the accuracy check; without labels, agreement only on the calibration images")
    s.add_argument("--no-eval", action="store_true", help="skip the accuracy check")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _device_args(s, "the PyTorch work runs (calibration, FP32 and emulation logits)")
    s.add_argument("--bundle", action="store_true", help="also write OUTPUT/bundle: the artifact, the evaluation inputs and "
                   "a torch-free runner to measure on the device ('python3 runner.py .' there)")  # fmt: skip
    s.add_argument("--threads", type=POSITIVE, help="runtime threads (default: the runtime's own choice)")
    s.add_argument("--throughput-batch", type=POSITIVE, default=16, help="batch for the throughput figure (default 16)")
    s.add_argument("--tensorrt-version", metavar="X.Y", help="the device's TensorRT (e.g. 8.6 on JetPack 6.0): its weight layout "
                   "and build flags (default: the profile's, else the installed one, else 10+)")  # fmt: skip
    s.add_argument("--fixed-batch", type=POSITIVE, metavar="N", help="fix the artifact's batch dimension to N (default: dynamic); "
                   "it is then checked and timed at batch N")  # fmt: skip
    _qat_args(s, pipeline=True)
    _output(s, None, "output folder (default export/TARGET-PRECISION or export/PROFILE)")

    s = command("compare", cmd_compare, "every target side by side: accuracy, agreement, INT8 coverage, latency; table + JSON/CSV/MD/PNG, gates")
    _model_args(s)
    s.add_argument("--targets", nargs="+", metavar="NAME", help="backends (each in FP32 and INT8), 'all', shipped profile names or "
                   ".toml files (default: every profile in targets/)")  # fmt: skip
    s.add_argument("--profiles", nargs="+", metavar="FILE", help="profile files (TOML)")
    _calibration_args(s, spec=True, scheme=False)  # each profile names its scheme
    _eval_args(s, None, "every row; without labels, agreement only on the calibration images")
    s.add_argument("--threads", type=POSITIVE, help="threads where a profile does not set them")
    s.add_argument("--strict", action="store_true", help="a gate that could not be checked fails (exit 1)")
    _device_args(s, "the PyTorch work runs (calibration, FP32 and emulation logits; the PyTorch rows are timed on the CPU)")
    s.add_argument("--bundles", action="store_true", help="also write a device bundle per target (OUTPUT/PROFILE/bundle)")
    s.add_argument("--results", nargs="+", metavar="DIR", help="device results (BUNDLE/result) to score beside the host rows; "
                   "alone (no --targets/--profiles), only they are compared")  # fmt: skip
    _qat_args(s, pipeline=True)
    _output(s, "compare", "output folder (default compare)")

    s = command("targets", cmd_targets, "list the targets and whether each runs here (and why not)")
    _output(s, None, "also write the list as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False) or not _main_rank()  # other torchrun ranks: warnings only, no progress bars
    verbose = getattr(args, "verbose", False)
    level = logging.DEBUG if verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if getattr(args, "device", None) is not None:  # a device that is not there fails before any work
            from edgerepvgg.torch_device import resolve_device

            resolve_device(args.device)
        return args.func(args)
    except UserError as exc:
        print(f"edgerepvgg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader stopped early (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"edgerepvgg {args.command}: interrupted; artifacts already written are complete, the rest were not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: keep the traceback, end with one line that says so
        traceback.print_exc()
        print(f"edgerepvgg {args.command}: internal error (a bug; please report it with the traceback above): "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
