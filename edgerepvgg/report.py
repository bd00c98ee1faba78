"""What a report records besides its numbers: the machine they were measured on."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")
PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "ai-edge-litert", "tensorrt")


@functools.cache
def _cpu() -> tuple[str, str, frozenset[str]]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return fields.get("model name", platform.processor() or "unknown"), f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}", flags


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names), 'not installed' otherwise."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_info(threads: int | None = None, packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """CPU, cores, the ISA flags that decide integer speed, library versions, load and time."""
    cpu, family_model, flags = _cpu()
    return {
        "cpu": cpu,
        "cpu_family_model": family_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [f for f in CPU_FLAGS if f in flags],
        "hypervisor": "hypervisor" in flags,
        "threads": threads,
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions(packages),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# The comparison table: console, JSON, CSV, Markdown and a plot


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


def write_comparison(comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.csv``, ``compare.md`` and ``compare.png`` atomically."""
    import csv
    import io
    import json

    from edgerepvgg.compare import table_rows
    from edgerepvgg.io import atomic_path, write_text_atomic

    out_dir = Path(out_dir)
    header, body = table_rows(comparison)
    machine = machine_info()
    data = {"model": comparison.model, "eval_source": comparison.eval_source, "eval_images": comparison.eval_images,
            "failed": comparison.failed, "machine": machine, "rows": [r.to_dict() for r in comparison.rows]}  # fmt: skip
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
    write_text_atomic(paths["md"], "\n".join(md))
    with atomic_path(paths["png"]) as tmp:
        plot_comparison(comparison, tmp)
    return paths


def plot_comparison(comparison, path: Path) -> None:
    """Top-1 against batch-1 latency, one labelled point per row that has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgerepvgg.compare import plot_points

    points = plot_points(comparison)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    markers = {"fp32": "o", "fp16": "D", "int8": "^"}
    precision = {r.name: r.precision for r in comparison.rows}
    for i, (name, ms, top1) in enumerate(points):  # a legend, not labels: close points would overlap
        marker = "s" if name.startswith("pytorch") else markers.get(precision.get(name, ""), "o")
        ax.scatter(ms, top1, marker=marker, s=55, color=plt.cm.tab20(i % 20), label=f"{name} ({ms:.2f} ms, {top1:.2f}%)",
                   edgecolors="black", linewidths=0.4)  # fmt: skip
    if points:
        ax.set_xscale("log")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    missing = [r.name for r in comparison.rows if r.top1 is not None and r.p50_ms is None]
    title = f"{comparison.model}: top-1 vs batch-1 latency ({comparison.eval_images} images)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("batch-1 median latency, ms (log)")
    ax.set_ylabel("top-1 %")
    ax.grid(True, alpha=0.3)
    if missing:
        fig.text(0.01, 0.01, "accuracy only, not plotted: " + ", ".join(missing), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)
