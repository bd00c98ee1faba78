"""Results as a person reads them: a model's description, one export's report, and the comparison
table as console text, JSON, CSV, Markdown and a plot. Only rendering: the figures come computed."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgerepvgg.errors import install_hint, missing
from edgerepvgg.io import atomic_path, write_text_atomic
from edgerepvgg.machine import machine_info

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from edgerepvgg._compare import Comparison
    from edgerepvgg._export import ExportReport
    from edgerepvgg.checkpoints import ModelMeta


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _grid(scheme) -> str:
    kind = ("s" if scheme.signed else "u") + str(scheme.bits)
    return f"{kind} {'symmetric' if scheme.symmetric else 'affine'}{' per-channel' if scheme.per_channel else ''}"


def scheme_text(c) -> str:
    """A constraint set in words: its name and both integer grids (and a float bias)."""
    return f"{c.name} (activations {_grid(c.activation)}, weights {_grid(c.weight)}{', bias float' if not c.int_bias else ''})"


def spec_text(spec, plain, images) -> str:
    """What ``edgerepvgg calibrate`` says about the QuantSpec it made."""
    cal = spec.calibration
    skipped = f", {len(images.skipped)} unreadable files skipped" if images.skipped else ""
    return (f"calibrated {plain.name} on {len(images)} images from {images.source}{skipped}\n"
            f"constraints {scheme_text(spec.constraints)}; method {cal.get('method')}, weights {cal.get('weight_method')}")  # fmt: skip


def mixed_precision_text(record: dict, trace: list[dict], max_drop: float, eval_set) -> str:
    """The accuracy-gate search of ``calibrate --max-drop``: one line per step."""
    lines = [f"accuracy gate {max_drop:g} pt on {len(eval_set)} images of {eval_set.source}: FP32 top-1 {_pct(record['fp32_top1'])}"]
    for entry in trace:
        what = "all INT8" if entry["layer"] is None else f"+ {entry['layer']} in float"
        lines.append(f"  {what:<24} top-1 {_pct(entry['top1'])} ({-entry['drop']:+.2f} pt)")
    if record["status"] == "met":
        kept = [k["layer"] for k in record["kept_float"]]
        lines.append(f"gate met with {len(kept)} layer(s) in float: {', '.join(kept) or 'none'}")
    return "\n".join(lines)


def qat_text(plain, spec, metrics: dict, train_set, eval_set) -> str:
    """What ``edgerepvgg qat`` says: where it started, top-1 before and after, which result it
    kept (the better of PTQ and QAT on the held-out set) and why."""
    lines = [f"fine-tuned {plain.name} for {scheme_text(spec.constraints)} on {train_set.source}, starting from {metrics['start']}"]
    if metrics.get("stopped_early"):
        lines.append(f"stopped early after {metrics['epochs_run']} epoch(s): no better held-out top-1 (--patience)")
    if "qat_top1" in metrics:
        lines += [f"top-1 on {len(eval_set)} images of {metrics['eval_set']}: FP32 {_pct(metrics['fp32_top1'])}, "
                  f"PTQ {_pct(metrics['ptq_top1'])}, QAT {_pct(metrics['qat_top1'])} at its best epoch {metrics['best_epoch']} "
                  f"of {metrics['epochs_run']} (quantized: integer emulation)",
                  f"the exported spec reproduces {_pct(metrics['emulation_agreement'])} of the fake-quant model's top-1"]  # fmt: skip
    lines.append(kept_text(metrics))
    return "\n".join(lines)


def kept_text(record: dict) -> str:
    """One line: which INT8 result a QAT run kept (``kept``: qat or ptq) and on what evidence."""
    if record["kept"] == "ptq":
        return (f"kept PTQ: no QAT epoch beat it on the held-out set (best QAT {_pct(record.get('qat_top1'))} < "
                f"PTQ {_pct(record.get('ptq_top1'))}); the PTQ model and QuantSpec were written")  # fmt: skip
    if not record.get("checked", True):
        return f"kept QAT (epoch {record['best_epoch']}), unchecked: no held-out set to compare it with PTQ"
    return f"kept QAT: epoch {record['best_epoch']}, the best on the held-out set and not below PTQ"


def targets_text(rows) -> str:
    """Every target, whether it runs here (and why not), what it builds and its scheme."""
    width = max(len(t.name) for t in rows)
    lines = []
    for t in rows:
        state = "available" if t.available else f"not available: {t.reason}"
        detail = f"  [{', '.join(t.precisions)}; scheme {t.constraint_set}]" if t.precisions else ""
        lines.append(f"{t.name:<{width}}  {state}{detail}")
        if t.description:
            lines.append(f"{'':<{width}}  {t.description}")
    return "\n".join(lines)


def _hw_text(size: int | list[int]) -> str:
    """``7`` -> ``7x7``, ``[6, 8]`` -> ``6x8`` (height x width)."""
    h, w = (size, size) if isinstance(size, int) else size
    return f"{h}x{w}"


def info_text(info: dict, meta: "ModelMeta", layers: bool = False) -> str:
    """What ``edgerepvgg info`` prints: :func:`edgerepvgg.checkpoints.describe` as text."""
    form = "fused (deploy)" if meta.fused else "train-time"
    random = ", random weights" if meta.extra.get("random_weights") else ""
    s, names = meta.input_spec, meta.input_spec.class_names
    params = f"{info['params_fused']:,}" if meta.fused else f"{info['params_train']:,} train-time, {info['params_fused']:,} fused"
    lines = [f"model       {info['name']}  ({meta.block} blocks, {form}{random})",
             f"classes     {meta.num_classes}" + (f"  ({', '.join(names)})" if names else ""),
             f"input       {s.describe()}",
             f"params      {params}", f"MACs        {info['macs'] / 1e9:.3f} G at {_hw_text(info['size'])}",
             *(f"{key:<11} {meta.extra[key]}" for key in ("eval_top1", "eval_set") if key in meta.extra)]  # fmt: skip
    if layers:
        lines += ["", f"{'layer':<10} {'in':>5} {'out':>5} {'stride':>6} {'groups':>6} {'out size':>8} {'MMACs':>9}"]
        for r in info["layers"]:
            side = _hw_text(r["out_size"]) if r["name"] != "head" else ""
            lines.append(f"{r['name']:<10} {r['in']:>5} {r['out']:>5} {r.get('stride', ''):>6} {r.get('groups', ''):>6} {side:>8} {r['macs'] / 1e6:>9.2f}")
    return "\n".join(lines)


_ARTIFACT_FACTS = ("convs", "int8_convs", "float_convs", "qdq_check", "engine_built", "trtexec")


def export_text(report: "ExportReport") -> str:
    """What ``edgerepvgg export`` prints: the artifact, its accuracy check, its latency, notes."""
    origin = report.quant.get("origin")
    size = report.artifact["size_bytes"] / 1e6
    lines = [f"{report.target} {report.precision}: {report.artifact_path} ({size:.2f} MB)" + (f"; {origin}" if origin else "")]
    lines += [f"  {k}: {v}" for k, v in report.artifact["info"].items() if k in _ARTIFACT_FACTS]
    acc = report.accuracy
    if acc is not None:
        label = " (emulated: ONNX Runtime, not a TensorRT engine)" if report.emulated else ""
        lines.append(f"accuracy on {acc.images} images of {acc.source}{label}:")
        if acc.labelled:
            lines.append(f"  top-1 {_pct(acc.top1)} ({acc.delta_top1:+.2f} pt vs FP32 {_pct(acc.fp32_top1)}), top-5 {_pct(acc.top5)}")
        lines.append(f"  agreement with FP32: top-1 {_pct(acc.vs_fp32.top1)}, cosine {acc.vs_fp32.cosine:.5f}")
        if (e := acc.vs_emulation) is not None:
            lines.append(f"  agreement with the INT8 emulation: top-1 {_pct(e.top1)}, cosine {e.cosine:.6f}, max |diff| {e.max_abs:.3g}")
    for name, lat in report.latency.items():
        lines.append(f"latency {name}: p50 {lat.p50_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms ({lat.throughput:.0f} images/s, {lat.runs} runs)")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}"
    if kind == "pts":
        return f"{v:+.2f}"
    if kind == "ms":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if kind == "ips":
        return f"{v:.0f}"
    if kind == "mb":
        return f"{v:.2f}"
    return str(v)


COLUMNS = (("target", "name", ""), ("backend", "backend", ""), ("precision", "precision", ""), ("top-1 %", "top1", "pct"),
           ("Δtop-1", "delta_top1", "pts"), ("agree FP32 %", "agree_fp32", "pct"), ("agree emu %", "agree_emulation", "pct"),
           ("INT8 convs", "int8_convs", ""), ("p50 ms", "p50_ms", "ms"), ("p90 ms", "p90_ms", "ms"),
           ("timer", "timer", ""), ("native b1", "native", ""), ("img/s", "throughput_ips", "ips"), ("batch", "throughput_batch", ""), ("MB", "size_mb", "mb"), ("status", "status", ""))  # fmt: skip


QUANT_COLUMN = ("quant", "quant", "")  # after precision, in comparisons with QAT rows: ptq / qat / ptq kept


def table_rows(comparison: "Comparison") -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells, shared by the console table, Markdown and CSV. A comparison
    with QAT rows (``compare --qat``) gets a ``quant`` column: each INT8 target's PTQ row is
    followed by its QAT row, so the two read side by side."""
    columns = COLUMNS
    if any(r.quant not in ("", "ptq") for r in comparison.rows):
        at = [c[1] for c in COLUMNS].index("precision") + 1
        columns = (*COLUMNS[:at], QUANT_COLUMN, *COLUMNS[at:])
    header = [c[0] for c in columns]
    body = [[_fmt(getattr(r, attr), kind) if attr else "" for _, attr, kind in columns] for r in comparison.rows]
    return header, body


def qat_runs_text(runs) -> str:
    """The fine-tunes behind a comparison's QAT rows, one line each: scheme, epochs, held-out
    INT8 top-1 of PTQ and of the best QAT epoch, which was kept, and whether it was reused."""
    lines = ["QAT (each scheme fine-tuned once; its QAT rows compiled from the kept result):"]
    for r in runs:
        scores = (f"held-out top-1 PTQ {_pct(r.get('ptq_top1'))}, best QAT {_pct(r.get('qat_top1'))} (epoch {r['best_epoch']})"
                  if r.get("checked", True) else "no held-out set")  # fmt: skip
        kept = "kept PTQ (QAT did not beat it)" if r["kept"] == "ptq" else "kept QAT"
        how = "reused from the cache" if r["reused"] else f"fine-tuned {r['epochs_run']}/{r['epochs']} epoch(s)"
        lines.append(f"  {r['scheme']}: {how}; {scores}; {kept}")
    return "\n".join(lines)


def plot_points(comparison: "Comparison") -> list[tuple[str, float, float]]:
    """(name, batch-1 p50 ms, top-1 %) for every row with both figures."""
    return [(r.name, r.p50_ms, 100 * r.top1) for r in comparison.rows if r.p50_ms is not None and r.top1 is not None
            and np.isfinite(r.p50_ms)]  # fmt: skip


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if _numberish(c) else c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _numberish(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("+", "", 1).replace("-", "", 1).isdigit()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---:" if rows and all(_numberish(r[i]) or r[i] == "-" for r in rows) else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def write_comparison(comparison: "Comparison", out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.csv``, ``compare.md`` and ``compare.png`` atomically."""
    out_dir = Path(out_dir)
    header, body = table_rows(comparison)
    machine = machine_info()
    data = {"model": comparison.model, "eval_source": comparison.eval_source, "eval_images": comparison.eval_images,
            "failed": comparison.failed, "machine": machine, "rows": [r.to_dict() for r in comparison.rows]}  # fmt: skip
    if comparison.qat:
        data["qat"] = list(comparison.qat)
    paths = {"json": out_dir / "compare.json", "csv": out_dir / "compare.csv", "md": out_dir / "compare.md", "png": out_dir / "compare.png"}
    write_text_atomic(paths["json"], json.dumps(data, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*header, "device", "why"])
    for row, r in zip(body, comparison.rows):
        writer.writerow([*row, r.device, r.why])
    write_text_atomic(paths["csv"], buf.getvalue())
    notes = [f"- **{r.name}** ({r.status}): {r.why}" for r in comparison.rows if r.why]
    md = [f"# {comparison.model}: per-target accuracy and latency", "",
          f"Evaluated on {comparison.eval_images} images of {comparison.eval_source}. Latency: batch 1, median and p90; "
          f"throughput at the batch shown. Measured on {machine['cpu']} ({machine['cores_usable']} cores, "
          f"{', '.join(machine['isa']) or 'no listed ISA extensions'}), {machine['date']}.", "",
          markdown_table(header, body), "", *notes, ""]  # fmt: skip
    if comparison.qat:
        md += ["```", qat_runs_text(comparison.qat), "```", ""]
    write_text_atomic(paths["md"], "\n".join(md))
    if missing("matplotlib"):  # the figures are all in the other files; the plot is optional
        log.warning("no %s: %s", paths.pop("png"), install_hint("matplotlib", "plots"))
        return paths
    with atomic_path(paths["png"]) as tmp:
        plot_comparison(comparison, tmp)
    return paths


def plot_comparison(comparison: "Comparison", path: Path) -> None:
    """Top-1 against batch-1 latency, one labelled point per row that has both, as a PNG."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(comparison)
    fig.savefig(path, format="png")
    plt.close(fig)


def comparison_figure(comparison: "Comparison"):
    """The figure :func:`plot_comparison` saves (a matplotlib Figure on the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    points = plot_points(comparison)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    markers = {"fp32": "o", "fp16": "D", "int8": "^"}
    precision = {r.name: r.precision for r in comparison.rows}
    for i, (name, ms, top1) in enumerate(points):  # a legend, not labels: close points would overlap
        marker = "s" if name.startswith("pytorch") else markers.get(precision.get(name, ""), "o")
        ax.scatter(ms, top1, marker=marker, s=55, color=plt.cm.tab20(i % 20), label=f"{name} ({ms:.2f} ms, {top1:.2f}%)",
                   edgecolors="black", linewidths=0.4)  # fmt: skip
    if points:
        _latency_axis(ax, [ms for _, ms, _ in points])
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    unplotted = [r.name for r in comparison.rows if r.top1 is not None and r.p50_ms is None]
    title = f"{comparison.model}: top-1 vs batch-1 latency ({comparison.eval_images} images)"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("top-1 %")
    ax.grid(True, alpha=0.3)
    footer = textwrap.wrap("accuracy only, not plotted: " + ", ".join(unplotted), 170) if unplotted else []
    for i, line in enumerate(footer):  # wrapped: a long list would run off the figure
        fig.text(0.01, 0.01 + 0.025 * (len(footer) - 1 - i), line, fontsize=7)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * len(footer), 1, 1))
    return fig


def _latency_axis(ax, values: list[float]) -> None:
    """A readable latency axis at any range: logarithmic with plain-number labels on the decades
    (and no minor labels, which overlap) when the values span more than a decade, else linear
    with a few evenly spaced ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = min(values), max(values)
    label = lambda v, _: f"{v:g}"  # noqa: E731
    if lo > 0 and hi / lo > 10:
        ax.set_xscale("log")
        decades = math.log10(hi / lo)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,), numticks=12))
        ax.xaxis.set_major_formatter(FuncFormatter(label))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch-1 median latency, ms (log scale)")
    else:
        pad = 0.1 * (hi - lo) or 0.1 * hi or 1.0
        ax.set_xlim(max(0.0, lo - pad), hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
        ax.set_xlabel("batch-1 median latency, ms")
