"""compare: fuse and quantize once, compile for every profile, evaluate every artifact on the
same images, and gather one row per deployment (plus PyTorch reference rows) with gates.

Each profile's export lands in ``out_dir/<profile name>/`` with its own ``report.json``; the rows
here are what a person reads to decide where to deploy.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from edgerepvgg.data import TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.evaluate import measure_latency, predict
from edgerepvgg._export import ExportReport, References, export, references, score
from edgerepvgg.plain import PlainNet
from edgerepvgg.profiles import Profile
from edgerepvgg.quant.calibrate import CalibrationConfig, calibrate
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.spec import QuantSpec, constraints_for
from edgerepvgg.targets import cannot_export, get_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One line of the comparison. ``status``: ok, gate failed, emulated, accuracy only, skipped,
    error, or reference (the PyTorch rows); ``why`` says what lies behind a status that is not ok."""

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
    gates_failed: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gates_failed"] = list(self.gates_failed)
        return d


@dataclass(frozen=True)
class Comparison:
    rows: tuple[Row, ...]
    eval_source: str
    eval_images: int
    model: str

    @property
    def failed(self) -> bool:
        """True when any gate failed (the CLI then exits non-zero)."""
        return any(r.gates_failed for r in self.rows)


def check_gates(profile: Profile, report: ExportReport) -> list[str]:
    """The gates of ``profile`` that ``report`` fails, each as a short sentence."""
    g, acc, failed = profile.gates, report.accuracy, []
    if acc is not None and g.max_delta_top1 is not None and -acc.delta_top1 > g.max_delta_top1:
        failed.append(f"top-1 {acc.delta_top1:+.2f} pt vs FP32 (gate: at most {g.max_delta_top1:g} pt below)")
    if acc is not None and acc.vs_emulation is not None and g.min_agreement_emulation is not None \
            and acc.vs_emulation.top1 < g.min_agreement_emulation:  # fmt: skip
        failed.append(f"agreement with the emulation {100 * acc.vs_emulation.top1:.2f}% (gate: at least {100 * g.min_agreement_emulation:g}%)")
    lat = report.latency.get("batch1")
    if lat is not None and g.max_latency_ms is not None and lat.p50_ms > g.max_latency_ms:
        failed.append(f"batch-1 latency {lat.p50_ms:.2f} ms (gate: at most {g.max_latency_ms:g} ms)")
    return failed


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
    failed = check_gates(profile, report)
    status = "gate failed" if failed else "emulated" if report.emulated else "accuracy only" if extra_why else "ok"
    why = "; ".join([*failed, *report.notes, *([extra_why] if extra_why else [])])
    tput = next((v for k, v in lat.items() if k != "batch1"), None)
    return Row(
        profile.name, profile.backend, profile.device, profile.precision, status, why,
        top1=acc.top1 if acc else None, delta_top1=acc.delta_top1 if acc else None,
        agree_fp32=acc.vs_fp32.top1 if acc else None,
        agree_emulation=acc.vs_emulation.top1 if acc and acc.vs_emulation else None,
        int8_convs=_int8_convs(report, spec, n_convs),
        p50_ms=lat["batch1"].p50_ms if "batch1" in lat else None, p90_ms=lat["batch1"].p90_ms if "batch1" in lat else None,
        throughput_ips=tput.throughput if tput else None, throughput_batch=tput.batch if tput else None,
        size_mb=report.artifact.get("size_bytes", 0) / 1e6, gates_failed=tuple(failed),
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
               acc.vs_emulation.top1 if acc.vs_emulation else None, "", p50, p90, tput, batch if latency else None)  # fmt: skip


def compare(
    plain: PlainNet,
    profiles: list[Profile],
    out_dir: str | Path,
    calibration: TensorDataset | None,
    eval_set: TensorDataset,
    train_model: torch.nn.Module | None = None,
    method: CalibrationConfig | str = "mse",
    threads: int | None = None,
    progress: bool = True,
) -> Comparison:
    """Run every profile on ``plain`` and return the rows; INT8 profiles share one calibration
    per constraint set (statistics are collected once)."""
    out_dir = Path(out_dir)
    n_convs = len(plain.convs)
    specs: dict[str, QuantSpec] = {}
    refs_by_spec: dict[str | None, References] = {}
    rows: list[Row] = []
    torch_threads = threads or torch.get_num_threads()

    def spec_for(profile: Profile, target) -> QuantSpec:
        c = constraints_for(profile.constraints or target.constraint_set, weight_bits=profile.weight_bits)
        if c.name not in specs:
            if calibration is None:
                raise UserError("INT8 profiles need calibration images; pass --images DIR")
            specs[c.name] = calibrate(plain, calibration, c, method, progress=False)
        return specs[c.name]

    def refs_for(spec: QuantSpec | None) -> References:
        """One FP32 pass over the evaluation set, one emulation pass per spec."""
        key = spec.sha256 if spec is not None else None
        if key not in refs_by_spec:
            fp32 = refs_by_spec[None].fp32 if key is not None else None
            refs_by_spec[key] = references(plain, spec, eval_set, fp32=fp32)
        return refs_by_spec[key]

    fp32_refs = refs_for(None)  # first, so that every spec's references reuse its FP32 logits
    bar = tqdm(profiles, desc="compare", unit="target", disable=not progress)
    for profile in bar:
        bar.set_postfix_str(profile.name)
        try:
            target = get_target(profile.backend)
        except UserError as exc:
            rows.append(Row(profile.name, profile.backend, profile.device, profile.precision, "skipped", str(exc)))
            continue
        if profile.precision not in target.precisions:
            why = f"{target.name} builds {', '.join(target.precisions)}, not {profile.precision}"
        elif (blocked := cannot_export(target)) is not None:
            why = blocked
        elif profile.input_size is not None and profile.input_size != plain.input_spec.size:
            why = f"profile is sized for {profile.input_size}x{profile.input_size} inputs, the model takes {plain.input_spec.size}x{plain.input_spec.size}"
        else:
            why = ""
        if why:
            rows.append(Row(profile.name, profile.backend, profile.device, profile.precision, "skipped", why))
            continue
        here = profile.runs_on_this_arch()
        arch_why = "" if here else f"latency not measured: the profile is for {profile.arch}, this machine is {platform.machine()}"
        try:
            spec = spec_for(profile, target) if profile.precision == "int8" else None
            report = export(plain, target, out_dir / profile.name, profile.precision, spec, eval_set, refs_for(spec),
                            threads=profile.threads or threads, latency=here, throughput_batch=profile.batch)  # fmt: skip
        except UserError as exc:
            rows.append(Row(profile.name, profile.backend, profile.device, profile.precision, "error", str(exc)))
            continue
        rows.append(_row(profile, report, spec, n_convs, arch_why))

    # PyTorch reference rows: the train-time model, the fused PlainNet, and each INT8 emulation.
    torch.set_num_threads(torch_threads)
    ref_rows = []
    if train_model is not None:
        train_model = train_model.eval()
        logits = predict(train_model, eval_set)
        ref_rows.append(_torch_row("pytorch-train-time", "this CPU (PyTorch)", "fp32", train_model, plain, fp32_refs, logits,
                                   16, True, "the multi-branch model before fusion"))  # fmt: skip
    ref_rows.append(_torch_row("pytorch-fused", "this CPU (PyTorch)", "fp32", plain, plain, fp32_refs, fp32_refs.fp32,
                               16, True, "the plain 3x3 network every target is compiled from"))  # fmt: skip
    for name, spec in specs.items():
        r = refs_for(spec)
        ref_rows.append(_torch_row(f"emulation-{name}", "PyTorch integer emulation", "int8", IntegerNet(plain, spec), plain, r,
                                   r.emulation, 16, False, "the referee: what every INT8 target should compute"))  # fmt: skip
    return Comparison(tuple(ref_rows + rows), eval_set.source, len(eval_set), plain.name)
