"""Export one PlainNet to one target and check it: compile, evaluate, time, report.

The accuracy check is defined once: on a labelled evaluation set, top-1 (and top-5 with at least
5 classes), the change in top-1 against the FP32 PyTorch model, and agreement (top-1, cosine,
SQNR) against the FP32 model and against the PyTorch INT8 emulation of the same QuantSpec. The
emulation comparison separates "quantization costs accuracy" from "this target computes something
else", and needs no labels: without a labelled set, the agreements are checked on the calibration
images ("no labels: agreement only"). ``compare`` runs the same steps for many targets.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edgerepvgg._fuse import fuse
from edgerepvgg.checkpoints import load_model
from edgerepvgg.data import DEFAULT_CALIB_LIMIT, TensorDataset, calibration_images, evaluation_set
from edgerepvgg.device import write_bundle
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import Agreement, Latency, agreement, measure_latency, predict, topk_accuracy
from edgerepvgg.inputs import is_fashion_mnist_spec
from edgerepvgg.io import claimed_output_dir, write_text_atomic
from edgerepvgg.machine import machine_info
from edgerepvgg.plain import PlainNet
from edgerepvgg.profiles import PRECISIONS, Profile, lookup
from edgerepvgg.quant.calibrate import CalibrationConfig, calibrate
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.qat import QATConfig, QATResult, fine_tune, training_sets
from edgerepvgg.quant.spec import Constraints, QuantSpec, constraints_for, load_spec, require_spec_for
from edgerepvgg.targets import Artifact, FixedBatchRunner, Runner, Target, compile_with_batch, get_target, require_exportable
from edgerepvgg.torch_device import emulation_device, placed, resolve_device

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
SPEC_FILE = "quant_spec.json"  # the QuantSpec an INT8 artifact was compiled from, beside its report
BUNDLE_DIR = "bundle"  # the device bundle, with export(options=ExportOptions(bundle=True))


log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
SPEC_FILE = "quant_spec.json"  # the QuantSpec an INT8 artifact was compiled from, beside its report
BUNDLE_DIR = "bundle"  # the device bundle, with export(options=ExportOptions(bundle=True))
NO_LABELS = "no labels: agreement only"

Images = TensorDataset | str | Path | None


# ---------------------------------------------------------------------------------------------
# What to build: the target, its options, the model and the QuantSpec


@dataclass(frozen=True)
class ExportOptions:
    """How an artifact is built, checked and timed: one place for every knob (after torchao's
    configs). ``constraints``/``weight_bits`` override the target's integer scheme; a device
    profile fills what is not set (:meth:`with_profile`)."""

    threads: int | None = None
    latency: bool = True
    throughput_batch: int = 16
    runs: int = 50
    fixed_batch: int | None = None
    constraints: str | None = None
    weight_bits: int | None = None
    eval_limit: int | None = None
    calib_limit: int | None = DEFAULT_CALIB_LIMIT  # calibration images from a folder, a seeded sample (None: all)
    workers: int | None = None  # image-decoding processes (None: the data module's default)
    cpu_flags: tuple[str, ...] | None = None  # the device CPU's ISA flags: its integer scheme (None: this host's)
    tensorrt_version: str | None = None  # the device's TensorRT: the Q/DQ weight layout and build flags
    bundle: bool = False  # also write out_dir/bundle: the artifact + inputs + torch-free runner for the device
    on_device: bool = False  # compile and bundle only: the device runs, checks and times it (a remote profile)
    device: str | None = None  # where the PyTorch work runs (calibration, FP32 and emulation logits): cpu, cuda[:N], mps

    def __post_init__(self) -> None:
        for name in ("threads", "throughput_batch", "runs", "fixed_batch", "weight_bits", "eval_limit", "calib_limit"):
            value = getattr(self, name)
            if value is None and name not in ("throughput_batch", "runs"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")

    def with_profile(self, profile: Profile) -> "ExportOptions":
        """These options with ``profile``'s threads, scheme and weight bits where none were given,
        and its throughput batch."""
        return replace(self, threads=self.threads or profile.threads, throughput_batch=profile.batch,
                       constraints=self.constraints or profile.constraints,
                       weight_bits=self.weight_bits or profile.weight_bits,
                       cpu_flags=self.cpu_flags if self.cpu_flags is not None else profile.cpu_flags,
                       tensorrt_version=self.tensorrt_version or profile.tensorrt_version)  # fmt: skip

    def target_settings(self, backend: str) -> dict:
        """What the device says to the target itself (TensorRT: its version)."""
        return {"version": self.tensorrt_version} if backend == "tensorrt" and self.tensorrt_version else {}


def resolve_target(target: str | Path | Target | Profile, options: ExportOptions | None = None
                   ) -> tuple[Target, Profile | None, ExportOptions]:  # fmt: skip
    """A target, the device profile it came from (a backend name, a profile object, ``.toml`` file
    or shipped profile name, or a Target object) and the options with the profile's filled in; the
    target is built for the device (e.g. its TensorRT version)."""
    from edgerepvgg.profiles import shipped_profiles
    from edgerepvgg.targets import target_names

    options = options or ExportOptions()
    if not isinstance(target, (str, Path, Profile)):
        return target, None, options
    profile = target if isinstance(target, Profile) else None if str(target) in target_names() else lookup(target)
    if profile is None and str(target) not in target_names():
        raise UserError(f"unknown target or profile {str(target)!r}; pass a backend ({', '.join(target_names())}), "
                        f"a shipped profile ({', '.join(p.stem for p in shipped_profiles())}) or a .toml file")  # fmt: skip
    if profile is not None:
        options = options.with_profile(profile)
    backend = profile.backend if profile is not None else str(target)
    return get_target(backend, **options.target_settings(backend)), profile, options


def resolve_model(model: PlainNet | str | Path | None, **variant) -> tuple[PlainNet, torch.nn.Module | None]:
    """The PlainNet to compile and, when ``model`` was a train-time checkpoint, the multi-branch
    model it was fused from: ``model`` is a PlainNet, or anything :func:`load_model` takes (a
    checkpoint, a bundled model name, ``None`` for the default one, a variant name, built with
    ``variant``'s num_classes/in_chans/block)."""
    if isinstance(model, PlainNet):
        return model.eval(), None
    net, meta = load_model(model, **variant)
    plain, _ = fuse(net, meta.input_spec)
    _return_freed_memory()
    return plain, None if meta.fused else net


def _return_freed_memory() -> None:
    """Hand the heap pages freed by loading and fusing back to the OS (glibc's ``malloc_trim``;
    elsewhere nothing). glibc serves allocations below its mmap threshold, which it raises to
    the largest block freed so far (up to 32 MB), from the heap and keeps them once freed: after
    fusing RepVGG-B3, ~0.3 GB of freed weight copies stayed resident through calibration and
    compilation."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return
    if trim is not None:
        trim(0)


def calibration_set(plain: PlainNet, images: Images, limit: int | None = DEFAULT_CALIB_LIMIT,
                    workers: int | None = None) -> TensorDataset:  # fmt: skip
    """Calibration images for ``plain``: a data set, a folder (preprocessed with the model's input
    spec; at most ``limit`` images, a seeded sample chosen before decoding; None: all), or ``None``
    for the bundled images, which only Fashion-MNIST models may use."""
    if isinstance(images, TensorDataset):
        return images
    return calibration_images(plain.input_spec, images, limit, workers=workers)


def quant_spec_for(plain: PlainNet, constraints: str | Constraints, spec: QuantSpec | str | Path | None = None, images: Images = None,
                   calibration: CalibrationConfig | str | None = None, weight_bits: int | None = None,
                   cache: bool | None = None, progress: bool = False,
                   cpu_flags: tuple[str, ...] | None = None, device: str | None = None) -> tuple[QuantSpec, str]:  # fmt: skip
    """The QuantSpec an INT8 build uses and where it came from: ``spec`` (an object or a JSON
    file, checked against the model), or a calibration on ``images`` for the ``constraints``
    scheme (a Constraints, or a name resolved for the device's ``cpu_flags`` (None: this host), whose
    weight width ``weight_bits`` overrides), its statistics pass on ``device``."""
    if spec is not None:
        if images is not None:
            raise UserError("pass a QuantSpec or calibration images, not both (a spec already holds its calibration)")
        origin = "the given QuantSpec" if isinstance(spec, QuantSpec) else f"QuantSpec {spec}"
        spec = spec if isinstance(spec, QuantSpec) else load_spec(spec)
        require_spec_for(plain, spec)
        return spec, origin
    data = calibration_set(plain, images)
    scheme = constraints if isinstance(constraints, Constraints) else constraints_for(constraints, weight_bits=weight_bits,
                                                                                        cpu_flags=cpu_flags)  # fmt: skip
    config = CalibrationConfig.of(calibration or CalibrationConfig())
    spec = calibrate(plain, data, scheme, config, progress=progress, cache=False if cache is False else None, device=device)
    skipped = f", {len(data.skipped)} unreadable files skipped" if data.skipped else ""
    return spec, f"calibrated for {scheme.name} on {len(data)} images of {data.source} ({config.method}{skipped})"


def default_evaluation(plain: PlainNet, eval_set: Images | bool, fallback: TensorDataset | None = None,
                       limit: int | None = None, workers: int | None = None) -> TensorDataset | None:  # fmt: skip
    """The images an artifact is checked on: ``eval_set`` (a data set or a labelled folder); by
    default the Fashion-MNIST test set for Fashion-MNIST models, else ``fallback`` (the
    calibration images: agreement with FP32 and the emulation needs no labels); ``False``: none."""
    if eval_set is False:
        return None
    if isinstance(eval_set, TensorDataset):
        return eval_set
    if eval_set is not None or is_fashion_mnist_spec(plain.input_spec):
        return evaluation_set(plain.input_spec, eval_set, limit, workers=workers)
    return fallback


# ---------------------------------------------------------------------------------------------
# The accuracy check


@dataclass(frozen=True)
class References:
    """Logits every target is compared with, computed once per model, spec and evaluation set.
    ``labels`` is ``None`` for unlabelled images (agreement only)."""

    labels: torch.Tensor | None
    fp32: torch.Tensor
    emulation: torch.Tensor | None  # IntegerNet under the spec; None for float exports
    source: str

    @property
    def fp32_top1(self) -> float | None:
        return None if self.labels is None else topk_accuracy(self.fp32, self.labels)


def references(plain: PlainNet, spec: QuantSpec | None, eval_set: TensorDataset, batch_size: int = 256,
               fp32: torch.Tensor | None = None, float_layers: str = "fp32", device: str | None = None) -> References:  # fmt: skip
    """FP32 PyTorch logits (``fp32`` if already computed on ``eval_set``) and, with a spec, the
    INT8 emulation's logits on ``eval_set`` (the spec's float layers as the target runs them:
    ``float_layers``, fp32 or fp16), computed on ``device`` (default the CPU)."""
    if len(eval_set) == 0:
        raise UserError(f"the evaluation set {eval_set.source} is empty; pass a folder with images")
    plain = plain.eval()
    dev = resolve_device(device)
    fp32 = predict(placed(plain, dev), eval_set, batch_size, dev) if fp32 is None else fp32
    emu = None
    if spec is not None:
        emu_dev = emulation_device(dev)
        emu = predict(IntegerNet(placed(plain, emu_dev), spec, float_layers=float_layers), eval_set, batch_size, emu_dev)
    return References(eval_set.labels if eval_set.labelled else None, fp32, emu, eval_set.source)


@dataclass(frozen=True)
class Accuracy:
    """One target's accuracy on the evaluation set, and how it follows FP32 and the emulation.
    Without labels, ``top1``/``top5``/``fp32_top1`` are ``None`` and only the agreements count."""

    images: int
    source: str
    top1: float | None
    top5: float | None
    fp32_top1: float | None
    vs_fp32: Agreement
    vs_emulation: Agreement | None

    @property
    def labelled(self) -> bool:
        return self.top1 is not None

    @property
    def delta_top1(self) -> float | None:
        """Top-1 minus FP32 top-1, in points (``None`` without labels)."""
        return None if self.top1 is None or self.fp32_top1 is None else 100 * (self.top1 - self.fp32_top1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vs_fp32"] = self.vs_fp32.to_dict()
        d["vs_emulation"] = self.vs_emulation.to_dict() if self.vs_emulation else None
        d["delta_top1_pts"] = self.delta_top1
        d["labelled"] = self.labelled
        return d


def score(logits: torch.Tensor, refs: References) -> Accuracy:
    """Score one target's logits against the labels (if any) and the reference logits."""
    labels = refs.labels
    top5 = labels is not None and logits.shape[1] >= 5
    return Accuracy(
        images=int(logits.shape[0]), source=refs.source,
        top1=None if labels is None else topk_accuracy(logits, labels),
        top5=topk_accuracy(logits, labels, 5) if top5 else None,
        fp32_top1=refs.fp32_top1, vs_fp32=agreement(logits, refs.fp32),
        vs_emulation=agreement(logits, refs.emulation) if refs.emulation is not None else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The report


def _relative_tree(obj, root: Path):
    """``obj`` (JSON-like) with every mention of a file under ``root`` made relative to ``root``:
    whole paths and paths inside strings such as a build command."""
    prefixes = sorted({f"{root.resolve()}{os.sep}", f"{root}{os.sep}"}, key=len, reverse=True)
    if isinstance(obj, dict):
        return {k: _relative_tree(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_relative_tree(v, root) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if isinstance(obj, str):
        for prefix in prefixes:
            obj = obj.replace(prefix, "")
    return obj


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` did and measured. ``emulated`` is True when no engine of the target ran
    here (TensorRT without a GPU): the accuracy is then the Q/DQ graph in ONNX Runtime under the
    target's constraint set, and there is no latency. Paths in ``artifact`` are relative to
    ``out_dir``, where ``report.json`` lies, so a report stays true when its folder moves."""

    target: str
    precision: str
    artifact: dict
    accuracy: Accuracy | None
    latency: dict[str, Latency] = field(default_factory=dict)
    emulated: bool = False
    quant: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    out_dir: Path = Path(".")
    input_spec: dict = field(default_factory=dict)  # what the artifact's input expects (InputSpec.to_dict)

    @property
    def status(self) -> str:
        return "emulated" if self.emulated else "ok"

    @property
    def artifact_path(self) -> Path:
        """The artifact's file (absolute, or relative to the working directory)."""
        return self.out_dir / self.artifact["path"]

    def to_dict(self) -> dict:
        return {"target": self.target, "precision": self.precision, "status": self.status, "emulated": self.emulated,
                "artifact": self.artifact, "accuracy": self.accuracy.to_dict() if self.accuracy else None,
                "latency": {k: v.to_dict() for k, v in self.latency.items()}, "quant": self.quant,
                "input_spec": self.input_spec, "notes": list(self.notes), "machine": machine_info()}  # fmt: skip


def _example_batch(plain: PlainNet, batch: int, eval_set: TensorDataset | None) -> np.ndarray:
    """Real images for timing where there are enough, else random input of the right shape."""
    if eval_set is not None and len(eval_set) >= batch:
        return next(iter(eval_set.batches(batch)))[0][:batch].numpy()
    return plain.example_input(batch).detach().cpu().float().numpy()


def time_runner(runner: Runner, plain: PlainNet, eval_set: TensorDataset | None, batches: tuple[int, ...] = (1, 16),
                runs: int = 50) -> dict[str, Latency]:  # fmt: skip
    """Latency at each batch size in ``batches`` (median/p90 of ``runs`` timed calls)."""
    out = {}
    for b in batches:
        name = f"batch{b}"
        if b < 1 or name in out:
            continue
        out[name] = measure_latency(runner, _example_batch(plain, b, eval_set), warmup=max(3, runs // 5), runs=runs)
        log.info("%s: p50 %.3f ms, p90 %.3f ms at batch %d", name, out[name].p50_ms, out[name].p90_ms, b)
    return out


# ---------------------------------------------------------------------------------------------
# QAT in the pipeline (export --qat; compare --qat runs the same per scheme)


QAT_DIR = "qat"  # the QAT run of an export, with --no-cache (else it lies in the QAT cache)


def qat_note(tuned: QATResult) -> str:
    """One sentence on a QAT run a build was compiled from: what it kept, on what evidence, and
    whether it was fine-tuned now or reused."""
    r = tuned.record
    how = f"reused from {tuned.folder}" if tuned.reused else f"fine-tuned now (run in {tuned.folder})"
    epochs = f"{r['epochs_run']} of {r['config']['epochs']} epoch(s)" + (", stopped early" if r.get("stopped_early") else "")
    if not r.get("checked", True):
        return f"QAT {epochs} on {r['train_set']}, {how}; last epoch kept unchecked: no held-out set"
    scores = f"held-out INT8 top-1 on {r['eval_set']}: PTQ {100 * r['ptq_top1']:.2f}%, best QAT {100 * r['qat_top1']:.2f}%"
    if tuned.kept == "ptq":
        return f"QAT {epochs} on {r['train_set']}, {how}; no epoch beat PTQ ({scores}), so this is the PTQ build"
    return f"QAT {epochs} on {r['train_set']}, {how}; kept epoch {r['best_epoch']} ({scores})"


def _fine_tuned(plain: PlainNet, spec: QuantSpec, origin: str, train_sets, config: QATConfig, data: TensorDataset | None,
                refs: References | None, out_dir: Path, cache, progress: bool, device: str | None = None):  # fmt: skip
    """``export --qat``: the QAT result (PlainNet, spec) that replaces the PTQ one, its origin in
    words, references whose FP32 logits stay the model's before fine-tuning, and the run (all on
    ``device``)."""
    train_set, held_out = train_sets
    tuned = fine_tune(plain, spec, train_set, held_out, config, out_dir / QAT_DIR, cache=False if cache is False else None,
                      progress=progress, device=device)  # fmt: skip
    if refs is None and data is not None:
        dev = resolve_device(device)
        refs = references(tuned.plain, tuned.spec, data, fp32=predict(placed(plain.eval(), dev), data, device=dev), device=device)
    kind = "PTQ (QAT did not beat it)" if tuned.kept == "ptq" else f"QAT epoch {tuned.record['best_epoch']}"
    return tuned.plain, tuned.spec, f"{kind} of {config.epochs} epoch(s) from {origin or 'the PTQ spec'}", refs, tuned


# ---------------------------------------------------------------------------------------------
# The verb


def export(
    model: PlainNet | str | Path | None,
    target: str | Path | Target | Profile,
    out_dir: str | Path | None = None,
    precision: str | None = None,
    spec: QuantSpec | str | Path | None = None,
    eval_set: Images | bool = None,
    *,
    images: Images = None,
    calibration: CalibrationConfig | str | None = None,
    options: ExportOptions | None = None,
    refs: References | None = None,
    cache: bool | None = None,
    progress: bool = False,
    qat: QATConfig | None = None,
    qat_data: str | Path | tuple[TensorDataset, TensorDataset | None] | None = None,
) -> ExportReport:
    """Compile ``model`` for ``target``, check it, time it, and write ``report.json`` beside the
    artifact in ``out_dir`` (default ``export/<profile or target-precision>``).

    ``model``: a PlainNet or a checkpoint/bundled/variant name. ``target``: a backend name or a
    device profile, which sets precision, threads, batch and scheme unless given. ``precision``
    defaults to the profile's, else ``int8`` when a ``spec`` is given, else ``fp32``. INT8 uses
    ``spec`` or calibrates for the target's scheme on ``images``. ``eval_set``: labelled images
    (a data set or a folder), ``False`` for no check; by default the model's own test set, or,
    without one, agreement only on the calibration images. ``qat``: fine-tune the INT8 spec
    (:func:`edgerepvgg.quant.qat.fine_tune`, cached unless ``cache=False``) on ``qat_data`` (as
    ``edgerepvgg qat`` reads it) and compile the better of PTQ and QAT; accuracy stays measured
    against the FP32 model before fine-tuning.
    """
    target, profile, options = resolve_target(target, options)
    precision = precision or (profile.precision if profile else "int8" if spec is not None else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if spec is not None and images is not None:
        raise UserError("pass a QuantSpec or calibration images, not both (a spec already holds its calibration)")
    if spec is not None and precision != "int8":
        raise UserError(f"a QuantSpec is for INT8 builds, this one is {precision}; drop the spec or build int8")
    if precision not in target.precisions:
        raise UserError(f"target {target.name!r} builds {', '.join(target.precisions)}, not {precision!r}")
    if qat is not None and precision != "int8":
        raise UserError(f"--qat fine-tunes an INT8 build, this one is {precision}; add --int8 or drop --qat")
    require_exportable(target)  # before the model is loaded and calibrated
    out_dir = Path(out_dir or f"export/{profile.name if profile else f'{target.name}-{precision}'}")
    with claimed_output_dir(out_dir, "the artifact and report"):
        return _export(model, target, out_dir, precision, spec, eval_set, images, calibration, options, refs, cache, progress,
                       profile.name if profile else None, qat, qat_data)  # fmt: skip


def _export(model, target: Target, out_dir: Path, precision: str, spec, eval_set, images, calibration,
            options: ExportOptions, refs: References | None, cache, progress: bool, profile_name: str | None,
            qat: QATConfig | None = None, qat_data=None) -> ExportReport:  # fmt: skip
    plain = resolve_model(model)[0]  # the train-time net is not kept: RepVGG-B3's is 0.5 GB
    train_sets = training_sets(plain, qat_data) if qat is not None else None  # refused before any work
    if images is not None or (precision == "int8" and spec is None):  # read once: calibration and fallback
        images = calibration_set(plain, images, options.calib_limit, options.workers)
    origin = ""
    if precision == "int8":
        spec, origin = quant_spec_for(plain, options.constraints or target.constraint_set, spec, images, calibration,
                                      options.weight_bits, cache, progress, options.cpu_flags, options.device)  # fmt: skip
    data = default_evaluation(plain, eval_set, images, options.eval_limit, options.workers)
    tuned = None
    if train_sets is not None:
        plain, spec, origin, refs, tuned = _fine_tuned(plain, spec, origin, train_sets, qat, data, refs, out_dir, cache, progress,
                                                       options.device)  # fmt: skip
    artifact: Artifact = compile_with_batch(target, plain, spec, out_dir, precision, options.fixed_batch)
    notes = list(artifact.info.get("notes", ()))
    if options.on_device:
        if data is None:
            raise UserError("a device run needs evaluation images for its bundle; pass --eval-images DIR or --images DIR")
        runner, emulated, options = None, False, replace(options, bundle=True, latency=False)
    else:
        runner = target.load(artifact, options.threads)
        if options.fixed_batch is not None:
            runner = FixedBatchRunner(runner, options.fixed_batch)
        emulated = runner.emulated
    if emulated:
        notes.append(f"no {target.name} engine ran here ({target.available()}); accuracy is the Q/DQ graph in ONNX Runtime "
                     f"under the {target.constraint_set} constraint set (emulated), and there is no latency")  # fmt: skip
    accuracy = None
    if runner is None:
        notes.append("compiled here, run on the device: its accuracy and latency come from the device's result")
    elif data is None:
        notes.append("accuracy not checked: no evaluation images (pass labelled --eval-images DIR, or --images DIR for agreement only)")
    else:
        float_layers = artifact.info.get("float_layers", "fp32")  # how the target runs a spec's float layers
        if spec is not None and float_layers != "fp32" and any(layer.precision == "float" for layer in spec.layers):
            refs = references(plain, spec, data, fp32=refs.fp32 if refs else None, float_layers=float_layers, device=options.device)
        refs = refs or references(plain, spec, data, device=options.device)
        log.info("evaluating %s %s on %d images of %s", target.name, precision, len(data), data.source)
        accuracy = score(predict(runner, data), refs)
        if not accuracy.labelled:
            notes.append(f"{NO_LABELS}: {data.source} has no labels, so top-1 is not measured; "
                         "agreement with FP32 and with the INT8 emulation is")  # fmt: skip
    timings = {}
    if options.latency and not emulated:
        batches = (options.fixed_batch,) if options.fixed_batch is not None else (1, options.throughput_batch)
        timings = time_runner(runner, plain, data, batches, options.runs)
    quant = {}
    if spec is not None:
        quant = {"constraints": spec.constraints.name, "spec_sha256": spec.sha256, "calibration": spec.calibration,
                 "origin": origin, "float_layers": [layer.name for layer in spec.layers if layer.precision == "float"],
                 "file": SPEC_FILE}  # fmt: skip
        if tuned is not None:
            quant["qat"] = tuned.summary()
            notes.append(qat_note(tuned))
        write_text_atomic(out_dir / SPEC_FILE, spec.to_json() + "\n")  # what a device result is scored against
    if options.bundle:
        if data is None:
            notes.append("no device bundle: it needs evaluation images (--eval-images DIR or --images DIR)")
        else:
            where = write_bundle(artifact, target, data, out_dir / BUNDLE_DIR, threads=options.threads, runs=options.runs,
                                 batch=options.fixed_batch or options.throughput_batch, profile_name=profile_name)  # fmt: skip
            notes.append(f"device bundle in {BUNDLE_DIR}/: run 'python3 runner.py .' in it on the device, then "
                         f"'edgerepvgg compare --results {where}' scores what it measured")  # fmt: skip
    artifact_dict = _relative_tree(artifact.to_dict(), out_dir)
    report = ExportReport(target.name, precision, artifact_dict, accuracy, timings, emulated, quant, tuple(notes), out_dir,
                          plain.input_spec.to_dict())  # fmt: skip
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=1) + "\n")
    return report
