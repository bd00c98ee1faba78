"""compare: fuse and quantize once, compile for every profile, evaluate every artifact on the
same images, and gather one row per deployment (plus PyTorch reference rows) with gates.

Each profile's export lands in ``out_dir/<profile name>/`` with its own ``report.json``; the rows
here are what a person reads to decide where to deploy. A gate that cannot be evaluated (no
labels for a top-1 gate, no latency measured for a latency gate) is "not checked", never passed.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgerepvgg._export import (
    BUNDLE_DIR, NO_LABELS, SPEC_FILE, ExportOptions, ExportReport, Images, References, calibration_set, default_evaluation, export,
    qat_note, quant_spec_for, references, resolve_model, score,
)  # fmt: skip
from edgerepvgg.data import DEFAULT_CALIB_LIMIT, TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.io import claimed_output_dir
from edgerepvgg.device import read_manifest, read_result, run_remote
from edgerepvgg.evaluate import Latency, measure_latency, predict
from edgerepvgg.plain import PlainNet
from edgerepvgg.profiles import Profile, lookup, resolve, shipped_profiles
from edgerepvgg.quant.calibrate import CalibrationConfig
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.qat import QATConfig, QATResult, fine_tune, training_sets
from edgerepvgg.quant.spec import QuantSpec, constraints_for, load_spec, model_hash, require_spec_for
from edgerepvgg.targets import cannot_export, get_target
from edgerepvgg.torch_device import placed, resolve_device

log = logging.getLogger(__name__)

HOST_TIMER, DEVICE_TIMER = "host, python", "device, python"  # perf_counter around one call, host copies included


@dataclass(frozen=True)
class Row:
    """One line of the comparison. ``status``: ok, gate failed, emulated, accuracy only (each may
    add ", not checked" for a gate that could not be evaluated), skipped, error, or reference (the
    PyTorch rows); ``why`` says what lies behind a status that is not ok."""

    name: str
    backend: str
    device: str
    precision: str
    status: str
    why: str = ""
    top1: float | None = None
    delta_top1: float | None = None  # points vs FP32 PyTorch
    agree_fp32: float | None = None
    agree_emulation: float | None = None
    int8_convs: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    throughput_ips: float | None = None
    throughput_batch: int | None = None
    size_mb: float | None = None
    timer: str = ""  # what made p50/p90: HOST_TIMER or DEVICE_TIMER (never compare figures of unlike timers)
    native: str = ""  # the vendor tool's own batch-1 figure on the device, e.g. "0.912 ms p50 (trtexec)"
    gates_failed: tuple[str, ...] = ()
    gates_unchecked: tuple[str, ...] = ()
    quant: str = ""  # INT8 rows: "ptq", "qat", or "ptq kept" (a QAT run that did not beat PTQ)

    @classmethod
    def skipped(cls, profile: Profile, status: str, why: str) -> "Row":
        """A row for a profile that produced no figures (``skipped`` or ``error``)."""
        return cls(profile.name, profile.backend, profile.device, profile.precision, status, why)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gates_failed"] = list(self.gates_failed)
        d["gates_unchecked"] = list(self.gates_unchecked)
        return d


@dataclass(frozen=True)
class Comparison:
    rows: tuple[Row, ...]
    eval_source: str
    eval_images: int
    model: str
    labelled: bool = True
    strict: bool = False
    qat: tuple[dict, ...] = ()  # with --qat: one summary per fine-tune (QATResult.summary)

    @property
    def errors(self) -> list[Row]:
        return [r for r in self.rows if r.status == "error"]

    @property
    def failed(self) -> bool:
        """True when a gate failed, a target errored, or (``strict``) a gate could not be checked:
        the CLI then exits 1."""
        unchecked = self.strict and any(r.gates_unchecked for r in self.rows)
        return bool(self.errors) or unchecked or any(r.gates_failed for r in self.rows)


def check_gates(profile: Profile, report: ExportReport) -> tuple[list[str], list[str]]:
    """The gates of ``profile`` that ``report`` fails, and those it could not evaluate, each as a
    short sentence."""
    g, acc, lat = profile.gates, report.accuracy, report.latency.get("batch1")
    failed: list[str] = []
    unchecked: list[str] = []
    if g.max_delta_top1 is not None:
        if acc is None or acc.delta_top1 is None:
            unchecked.append(f"top-1 drop at most {g.max_delta_top1:g} pt: not checked ({'no labels' if acc else 'no evaluation'})")
        elif -acc.delta_top1 > g.max_delta_top1:
            failed.append(f"top-1 {acc.delta_top1:+.2f} pt vs FP32 (gate: at most {g.max_delta_top1:g} pt below)")
    if g.min_agreement_emulation is not None and report.precision == "int8":
        if acc is None or acc.vs_emulation is None:
            unchecked.append(f"agreement with the emulation at least {100 * g.min_agreement_emulation:g}%: not checked (no evaluation)")
        elif acc.vs_emulation.top1 < g.min_agreement_emulation:
            failed.append(f"agreement with the emulation {100 * acc.vs_emulation.top1:.2f}% (gate: at least {100 * g.min_agreement_emulation:g}%)")
    if g.max_latency_ms is not None:
        if lat is None:
            unchecked.append(f"batch-1 latency at most {g.max_latency_ms:g} ms: not checked (no latency measured here)")
        elif lat.p50_ms > g.max_latency_ms:
            failed.append(f"batch-1 latency {lat.p50_ms:.2f} ms (gate: at most {g.max_latency_ms:g} ms)")
    return failed, unchecked


def _int8_convs(report: ExportReport, spec: QuantSpec | None, n_convs: int) -> str:
    """'k/n' convolutions in INT8: read back from the runtime where the target reports it, else
    as written in the graph (marked)."""
    info = report.artifact.get("info", {})
    if "int8_convs" in info and "convs" in info:
        return f"{info['int8_convs']}/{info['convs']}"
    if report.precision != "int8" or spec is None:
        return f"0/{n_convs}"
    k = sum(1 for layer in spec.layers[:n_convs] if layer.precision != "float")
    return f"{k}/{n_convs} (graph)"


def _row(profile: Profile, report: ExportReport, spec: QuantSpec | None, n_convs: int, extra_why: str = "") -> Row:
    acc, lat = report.accuracy, report.latency
    failed, unchecked = check_gates(profile, report)
    status = "gate failed" if failed else "emulated" if report.emulated else "accuracy only" if extra_why else "ok"
    if unchecked and not failed:  # never shown as passed: "not checked", or e.g. "emulated, not checked"
        status = "not checked" if status == "ok" else f"{status}, not checked"
    why = "; ".join([*failed, *unchecked, *report.notes, *([extra_why] if extra_why else [])])
    tput = next((v for k, v in lat.items() if k != "batch1"), None)
    return Row(
        profile.name, profile.backend, profile.device, profile.precision, status, why,
        top1=acc.top1 if acc else None, delta_top1=acc.delta_top1 if acc else None,
        agree_fp32=acc.vs_fp32.top1 if acc else None,
        agree_emulation=acc.vs_emulation.top1 if acc and acc.vs_emulation else None,
        int8_convs=_int8_convs(report, spec, n_convs),
        p50_ms=lat["batch1"].p50_ms if "batch1" in lat else None, p90_ms=lat["batch1"].p90_ms if "batch1" in lat else None,
        throughput_ips=tput.throughput if tput else None, throughput_batch=tput.batch if tput else None,
        size_mb=report.artifact.get("size_bytes", 0) / 1e6, timer=HOST_TIMER if "batch1" in lat else "",
        gates_failed=tuple(failed), gates_unchecked=tuple(unchecked), quant=quant_kind(spec) if report.precision == "int8" else "",
    )  # fmt: skip


def _torch_row(name: str, device: str, precision: str, fn, plain: PlainNet, refs: References, logits: torch.Tensor,
               batch: int, latency: bool, why: str) -> Row:  # fmt: skip
    acc = score(logits, refs)
    p50 = p90 = tput = None
    if latency:
        x1 = plain.example_input(1).detach().numpy()
        xb = plain.example_input(batch).detach().numpy()
        with torch.no_grad():
            call = lambda x: fn(torch.from_numpy(x))  # noqa: E731
            l1, lb = measure_latency(call, x1), measure_latency(call, xb)
        p50, p90, tput = l1.p50_ms, l1.p90_ms, lb.throughput
    return Row(name, "pytorch", device, precision, "reference", why, acc.top1, acc.delta_top1, acc.vs_fp32.top1,
               acc.vs_emulation.top1 if acc.vs_emulation else None, "", p50, p90, tput, batch if latency else None,
               timer=HOST_TIMER if latency else "")  # fmt: skip


def _skip_reason(profile: Profile, plain: PlainNet) -> str:
    """Why ``profile`` cannot run for ``plain`` here, or ''."""
    target = get_target(profile.backend)
    if profile.precision not in target.precisions:
        return f"{target.name} builds {', '.join(target.precisions)}, not {profile.precision}"
    if (blocked := cannot_export(target)) is not None:
        return blocked
    (h, w) = plain.input_spec.hw
    if profile.input_size is not None and (profile.input_size, profile.input_size) != (h, w):
        return f"profile is sized for {profile.input_size}x{profile.input_size} inputs, the model takes {h}x{w}"
    return ""


def compare(
    model: PlainNet | str | Path | None,
    profiles: list[Profile | str] | None = None,
    out_dir: str | Path = "compare",
    images: Images = None,
    eval_set: Images = None,
    *,
    train_model: torch.nn.Module | None = None,
    calibration: CalibrationConfig | str | None = None,
    spec: QuantSpec | str | Path | None = None,
    weight_bits: int | None = None,
    threads: int | None = None,
    eval_limit: int | None = None,
    strict: bool = False,
    cache: bool | None = None,
    progress: bool = True,
    bundles: bool = False,
    results: list[str | Path] | None = None,
    device: str | None = None,
    calib_limit: int | None = DEFAULT_CALIB_LIMIT,
    workers: int | None = None,
    qat: QATConfig | None = None,
    qat_data: str | Path | tuple[TensorDataset, TensorDataset | None] | None = None,
) -> Comparison:
    """Run every profile on ``model`` and return the rows.

    ``profiles``: Profile objects or names (backends, ``all``, shipped profiles, ``.toml`` files);
    default: every shipped profile. INT8 profiles share one calibration per integer scheme on
    ``images``, or use ``spec`` (e.g. a QAT result) where its scheme is the profile's; profiles of
    another scheme are then skipped, saying so. ``eval_set`` as in :func:`export`: labelled images
    by default, else agreement only on the calibration images. ``strict``: a gate that cannot be
    checked fails. ``bundles``: each export also writes a device bundle. ``results``: device result
    folders (``BUNDLE/result``, or the bundle itself) scored like host rows, with the same gates.
    ``device``: where the PyTorch work runs (calibration, FP32 and emulation logits; the PyTorch
    rows' latency is measured on the CPU whatever it is).
    ``calib_limit``/``workers``: how many images a calibration folder gives (a seeded sample;
    None: all) and how many processes decode images.
    ``qat``: also fine-tune once per integer scheme the INT8 profiles need (on ``qat_data``, as
    ``edgerepvgg qat`` reads it; cached by model, starting spec, options and data unless
    ``cache=False``) and add a ``<profile>-qat`` row per INT8 profile compiled from its scheme's
    result, beside the PTQ row."""
    names = [p for p in (profiles or []) if not isinstance(p, Profile)]
    chosen = [p for p in (profiles or []) if isinstance(p, Profile)]
    if names:
        chosen += resolve([str(n) for n in names])
    if profiles is None:
        chosen = resolve([str(p) for p in shipped_profiles()])
    if results and profiles is None:
        chosen = []  # scoring device results alone
    if not chosen and not results:
        raise UserError("no targets to compare; pass --targets (e.g. all) or --profiles FILE.toml")
    with claimed_output_dir(out_dir, "the comparison"):
        return _compare(model, chosen, Path(out_dir), images=images, eval_set=eval_set, train_model=train_model,
                        calibration=calibration, spec=spec, weight_bits=weight_bits, threads=threads, eval_limit=eval_limit,
                        strict=strict, cache=cache, progress=progress, bundles=bundles,
                        results=[Path(r) for r in results or ()], device=device, calib_limit=calib_limit, workers=workers,
                        qat=qat, qat_data=qat_data)  # fmt: skip


def _compare(model, chosen: list[Profile], out_dir: Path, *, images: Images, eval_set: Images,
             train_model: torch.nn.Module | None, calibration: CalibrationConfig | str | None, spec: QuantSpec | str | Path | None,
             weight_bits: int | None, threads: int | None, eval_limit: int | None, strict: bool, cache: bool | None,
             progress: bool, bundles: bool, results: list[Path], device: str | None, calib_limit: int | None,
             workers: int | None, qat: QATConfig | None, qat_data) -> Comparison:  # fmt: skip
    """:func:`compare` once its profiles are resolved and its output folder claimed (keywords as there)."""
    plain, loaded_train_model = resolve_model(model)
    qat_sets = _qat_sets(plain, chosen, qat, qat_data)  # refused before any work
    train_model = train_model if train_model is not None else loaded_train_model
    if spec is not None:
        spec = spec if isinstance(spec, QuantSpec) else load_spec(spec)
        require_spec_for(plain, spec)
        if images is not None:
            raise UserError("pass a QuantSpec or calibration images, not both (a spec already holds its calibration)")
    int8 = any(p.precision == "int8" for p in chosen)
    calib = calibration_set(plain, images, calib_limit, workers) if images is not None or (int8 and spec is None) else None
    data = default_evaluation(plain, eval_set, calib, eval_limit, workers)
    if data is None:
        raise UserError("nothing to evaluate on: this model has no default test set; pass --eval-images DIR (labelled) "
                        "or --images DIR (agreement only)")  # fmt: skip
    n_convs = len(plain.convs)
    specs: dict[str, QuantSpec] = {}
    refs_by_spec: dict[str | None, References] = {}
    rows: list[Row] = []
    torch_threads = threads or torch.get_num_threads()

    def spec_for(profile: Profile, target) -> QuantSpec:
        c = _constraints(profile, target.constraint_set, weight_bits)
        if spec is not None:
            if spec.constraints.name != c.name:
                raise _Skip(f"the given QuantSpec is for the {spec.constraints.name} scheme, this profile needs {c.name}; "
                            "compare it on profiles of that scheme, or calibrate")  # fmt: skip
            return spec
        if c.name not in specs:
            specs[c.name], _ = quant_spec_for(plain, c, None, calib, calibration, cache=cache, device=device)
        return specs[c.name]

    def refs_for(q: QuantSpec | None) -> References:
        """One FP32 pass over the evaluation set, one emulation pass per spec."""
        key = q.sha256 if q is not None else None
        if key not in refs_by_spec:
            fp32 = refs_by_spec[None].fp32 if key is not None else None
            refs_by_spec[key] = references(plain, q, data, fp32=fp32, device=device)
        return refs_by_spec[key]

    fp32_refs = refs_for(None)  # first, so that every spec's references reuse its FP32 logits
    inputs_cache: list[np.ndarray] = []

    def host_inputs() -> np.ndarray:
        """The evaluation inputs as every bundle must hold them (read once)."""
        if not inputs_cache:
            inputs_cache.append(torch.cat([x for x, _ in data.batches(256)]).numpy())
        return inputs_cache[0]

    tuner = _QATRuns(plain, qat, qat_sets, data, fp32_refs, out_dir, cache, device) if qat_sets is not None else None
    extra = tuner.steps(chosen, weight_bits, spec) if tuner is not None else 0
    bar = tqdm(total=len(chosen) + extra, desc="compare", unit="step" if extra else "target", disable=not progress)
    for profile in _ticking(chosen, bar):
        try:
            why = _skip_reason(profile, plain)
        except UserError as exc:
            why = str(exc)
        if why:
            rows.append(Row.skipped(profile, "skipped", why))
            continue
        remote = profile.remote
        options = ExportOptions(threads=profile.threads or threads, latency=profile.runs_on_this_arch(), bundle=bundles,
                                on_device=remote is not None, device=device).with_profile(profile)  # fmt: skip
        target = get_target(profile.backend, **options.target_settings(profile.backend))
        here = profile.runs_on_this_arch()
        arch_why = "" if here else f"latency not measured: the profile is for {profile.arch}, this machine is {platform.machine()}"
        try:
            q = spec_for(profile, target) if profile.precision == "int8" else None
            report = export(plain, profile, out_dir / profile.name, profile.precision, q, data, refs=refs_for(q), options=options)
            if remote is not None:
                bar.set_postfix_str(f"{profile.name} on {remote.where}")
                trip = run_remote(remote, out_dir / profile.name / BUNDLE_DIR, profile.name)
                row, _ = _device_row(trip.result, plain, data, host_inputs(), chosen, n_convs, refs_for, q, profile)
                rows.append(replace(row, why=f"{row.why}; over {remote.transport} to {remote.where}: {trip}"))
                continue
        except _Skip as exc:
            rows.append(Row.skipped(profile, "skipped", str(exc)))
            continue
        except UserError as exc:
            rows.append(Row.skipped(profile, "error", str(exc)))
            continue
        rows.append(_row(profile, report, q, n_convs, arch_why))
        if tuner is not None and q is not None:
            rows.append(tuner.row(profile, q, options, arch_why, n_convs, bar))
    bar.update(bar.total - bar.n)  # steps not taken (a profile skipped or stopped early) are done too
    bar.close()

    device_specs: dict[str, QuantSpec] = {}
    for where in results:  # measured on a device: scored exactly like the host rows
        row, q = _device_row(where, plain, data, host_inputs(), chosen, n_convs, refs_for, spec)
        rows.append(row)
        if q is not None:
            device_specs[q.constraints.name] = q

    # PyTorch reference rows: the train-time model, the fused PlainNet, and each INT8 emulation.
    torch.set_num_threads(torch_threads)
    ref_rows = []
    if train_model is not None:
        train_model = train_model.eval()
        dev = resolve_device(device)
        logits = predict(placed(train_model, dev), data, device=dev)
        ref_rows.append(_torch_row("pytorch-train-time", "this CPU (PyTorch)", "fp32", train_model, plain, fp32_refs, logits,
                                   16, True, "the multi-branch model before fusion"))  # fmt: skip
    ref_rows.append(_torch_row("pytorch-fused", "this CPU (PyTorch)", "fp32", plain, plain, fp32_refs, fp32_refs.fp32,
                               16, True, "the plain 3x3 network every target is compiled from"))  # fmt: skip
    used = {**device_specs, **(dict(specs) if spec is None else {spec.constraints.name: spec})}
    for name, q in used.items():
        r = refs_for(q)
        ref_rows.append(replace(_torch_row(f"emulation-{name}", "PyTorch integer emulation", "int8", IntegerNet(plain, q), plain, r,
                                           r.emulation, 16, False, "the referee: what every INT8 target should compute"),
                                quant=quant_kind(q)))  # fmt: skip
    ref_rows = tuner.with_reference_rows(ref_rows) if tuner is not None else ref_rows
    source = data.source + ("" if data.labelled else f" ({NO_LABELS})")
    return Comparison(tuple(ref_rows + rows), source, len(data), plain.name, data.labelled, strict,
                      tuple(tuner.summaries()) if tuner is not None else ())  # fmt: skip


def _device_row(where: Path, plain: PlainNet, data: TensorDataset, host: np.ndarray, profiles: list[Profile], n_convs: int,
                refs_for, spec: QuantSpec | None, profile: Profile | None = None) -> tuple[Row, QuantSpec | None]:  # fmt: skip
    """A row for a device result folder: its logits scored against this comparison's labels, FP32
    and the emulation of the QuantSpec it was built with (saved beside the bundle by ``export``),
    its latency as the device measured it, and its profile's gates."""
    bundle = where if (where / "manifest.json").is_file() else where.parent
    result_dir = where / "result" if where == bundle else where
    manifest = read_manifest(bundle)
    result = read_result(result_dir, manifest)
    if result.model_hash != model_hash(plain):
        raise UserError(f"{result_dir} was measured with another model (hash {result.model_hash}); pass the checkpoint its bundle was made from")
    inputs = np.load(bundle / manifest["inputs"]["file"], allow_pickle=False)
    if inputs.shape != host.shape or not np.array_equal(inputs, host):
        raise UserError(f"{result_dir} was measured on other images than {data.source}; pass the evaluation images "
                        f"(and --eval-limit) its bundle was made with: {manifest.get('eval_source')}")  # fmt: skip
    q = None
    if result.spec_sha256 is not None:
        q = spec if spec is not None and spec.sha256 == result.spec_sha256 else None
        saved = bundle.parent / SPEC_FILE
        if q is None and saved.is_file():
            q = load_spec(saved)
        if q is None or q.sha256 != result.spec_sha256:
            raise UserError(f"the QuantSpec {result_dir} was built with (sha256 {result.spec_sha256[:12]}) is not at {saved}; "
                            "pass it with --spec")  # fmt: skip
    name = manifest.get("profile") or f"{result.backend}-{result.precision}"
    profile = profile or next((p for p in profiles if p.name == name), None) or lookup(name) or Profile(name, result.backend, result.precision)
    lat = {f"batch{b}": Latency(b, d.runs, d.warmup, d.p50_ms, d.p90_ms, d.mean_ms, d.min_ms) for b, d in result.latency.items()}
    report = ExportReport(result.backend, result.precision, {"size_bytes": sum((bundle / f).stat().st_size for f in manifest["files"]),
                          "info": {}}, score(torch.from_numpy(result.logits), refs_for(q)), lat,
                          notes=(f"measured on the device {result.device_name}; timer: {result.timer}",),
                          input_spec=manifest.get("input_spec", {}))  # fmt: skip
    row = _row(profile, report, q, n_convs)
    why = "; ".join([row.why, *result.native_notes]).strip("; ")
    return replace(row, name=f"{name}@device", device=result.device_name, timer=DEVICE_TIMER, native=_native(result),
                   why=why), q  # fmt: skip


def _native(result) -> str:
    """The vendor tools' batch-1 figures, each with its statistic and tool: p50 where the tool gives
    one, else its mean (said so); '' when no tool ran."""
    cells = []
    for n in result.native:
        if n.batch != 1:
            continue
        value, stat = (n.p50_ms, "p50") if n.p50_ms is not None else (n.mean_ms, "mean") if n.mean_ms is not None else (n.min_ms, "min")
        cells.append(f"{value:.3f} ms {stat} ({n.tool})")
    return "; ".join(cells)


class _Skip(Exception):
    """A profile that does not apply (its reason becomes the row's ``why``)."""


def _constraints(profile: Profile, constraint_set: str, weight_bits: int | None):
    """The integer scheme of an INT8 ``profile`` whose target's own scheme is ``constraint_set``."""
    return constraints_for(profile.constraints or constraint_set, weight_bits=weight_bits or profile.weight_bits,
                           cpu_flags=profile.cpu_flags)  # fmt: skip


def _ticking(profiles: list[Profile], bar):
    """``profiles``, one step of ``bar`` each (counted when the loop moves on, ``continue`` too)."""
    for profile in profiles:
        bar.set_postfix_str(profile.name)
        yield profile
        bar.update(1)


# ---------------------------------------------------------------------------------------------
# compare --qat: one fine-tune per integer scheme, a QAT row beside every INT8 row


def quant_kind(spec: QuantSpec | None) -> str:
    """How an INT8 build's spec was made, from its provenance: ``ptq``, ``qat``, or ``ptq kept``
    (a QAT run whose epochs all fell below the PTQ spec it started from)."""
    if spec is None:
        return ""
    run = spec.calibration.get("qat")
    return "ptq" if run is None else "ptq kept" if run.get("kept") == "ptq" else "qat"


def _qat_sets(plain: PlainNet, chosen: list[Profile], qat: QATConfig | None, qat_data):
    """The (training, held-out) sets of ``compare --qat``, or None without it; refused at once
    when there is nothing to fine-tune or no labelled data."""
    if qat is None:
        return None
    if not any(p.precision == "int8" for p in chosen):
        raise UserError("--qat fine-tunes INT8 builds and none of the chosen targets is INT8; add one (e.g. --targets all) or drop --qat")
    return training_sets(plain, qat_data)


class _QATRuns:
    """The QAT side of a comparison: :func:`fine_tune` once per PTQ spec (one per integer scheme),
    through the QAT cache, and per INT8 profile a ``<profile>-qat`` row compiled from its scheme's
    result and scored against the FP32 model before fine-tuning and the QAT spec's emulation."""

    def __init__(self, plain: PlainNet, config: QATConfig, sets, data: TensorDataset, fp32_refs: References, out_dir: Path,
                 cache: bool | None, device: str | None = None):  # fmt: skip
        self.plain, self.config, self.data, self.fp32, self.out_dir, self.cache = plain, config, data, fp32_refs.fp32, out_dir, cache
        self.device = device  # where the fine-tunes and their references run
        self.train_set, self.held_out = sets
        self.runs: dict[str, QATResult] = {}  # by the sha256 of the PTQ spec each started from
        self.refs: dict[str, References] = {}

    def steps(self, profiles: list[Profile], weight_bits: int | None, spec: QuantSpec | None) -> int:
        """Progress steps the QAT side adds: one per QAT row, one per epoch of each fine-tune."""
        schemes, rows = set(), 0
        for p in profiles:
            try:
                if p.precision != "int8" or _skip_reason(p, self.plain):
                    continue
                name = _constraints(p, get_target(p.backend).constraint_set, weight_bits).name
            except UserError:  # the loop makes it that profile's row
                continue
            if spec is None or spec.constraints.name == name:
                schemes.add(name)
                rows += 1
        return rows + self.config.epochs * len(schemes)

    def result(self, ptq: QuantSpec, bar) -> QATResult:
        """The QAT run that starts from ``ptq``: fine-tuned (or reused) the first time it is asked for."""
        if ptq.sha256 not in self.runs:
            name, done = ptq.constraints.name, [0]

            def tick(record: dict) -> None:
                done[0] += 1
                bar.update(1)
                bar.set_postfix_str(f"QAT for {name}: epoch {record['epoch']}/{self.config.epochs}")

            bar.set_postfix_str(f"QAT for {name}")
            run = fine_tune(self.plain, ptq, self.train_set, self.held_out, self.config, self.out_dir / f"qat-{name}",
                            cache=False if self.cache is False else None, on_epoch=tick, device=self.device)  # fmt: skip
            bar.update(self.config.epochs - done[0])  # reused, or stopped early
            self.runs[ptq.sha256] = run
            self.refs[ptq.sha256] = references(run.plain, run.spec, self.data, fp32=self.fp32, device=self.device)
        return self.runs[ptq.sha256]

    def row(self, profile: Profile, ptq: QuantSpec, options: ExportOptions, arch_why: str, n_convs: int, bar) -> Row:
        """The ``<profile>-qat`` row: ``profile`` compiled from the QAT result of its scheme."""
        name = f"{profile.name}-qat"
        try:
            run = self.result(ptq, bar)
            report = export(run.plain, profile, self.out_dir / name, "int8", run.spec, self.data, refs=self.refs[ptq.sha256],
                            options=options)  # fmt: skip
        except UserError as exc:
            return replace(Row.skipped(profile, "error", str(exc)), name=name, quant="qat")
        finally:
            bar.update(1)
        row = _row(profile, report, run.spec, n_convs, arch_why)
        return replace(row, name=name, why="; ".join(w for w in (row.why, qat_note(run)) if w))

    def with_reference_rows(self, ref_rows: list[Row]) -> list[Row]:
        """``ref_rows`` with one emulation row per QAT result (the referee of its QAT rows) right
        below the PTQ emulation row of its scheme."""
        out = list(ref_rows)
        for key, run in self.runs.items():
            r, name = self.refs[key], run.spec.constraints.name
            row = _torch_row(f"emulation-{name}-qat", "PyTorch integer emulation", "int8", IntegerNet(run.plain, run.spec),
                             run.plain, r, r.emulation, 16, False,
                             "the referee of the QAT rows: what their INT8 targets should compute")  # fmt: skip
            at = next((i + 1 for i, x in enumerate(out) if x.name == f"emulation-{name}"), len(out))
            out.insert(at, replace(row, quant=quant_kind(run.spec)))
        return out

    def summaries(self) -> list[dict]:
        return [run.summary() for run in self.runs.values()]
