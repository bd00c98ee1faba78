"""Rendering of an :class:`~edgerepvgg.quant.analysis.Analysis` (its findings are part of the
record, written by the analysis itself): the aligned table and its legend, the summary text, the four-panel plot, and the two files
(``analysis.json``, ``analysis.png``). Nothing here measures anything."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from edgerepvgg.errors import install_hint, missing
from edgerepvgg.io import atomic_path, output_dir, write_text_atomic
from edgerepvgg.quant.analysis import Analysis, fmt_num, fmt_ratio


log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The table and the plot


def _fmt_db(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.1f}"


def table(a: Analysis) -> str:
    """One aligned row per quantizer."""
    head = (f"{'layer':<9} {'ch':>4} {'ch ratio':>8} {'kurt':>6} {'outl%':>6} {'wSQNR pt':>8} {'pc':>5}  "
            f"{'act max':>8} {'p99.99':>8} {'max/p':>6} {'clip':>8}  {'naive dpt':>9} {'dpt':>6} {'lSQNR':>6}")  # fmt: skip
    lines = [head]
    for r in a.layers:
        w, x = r.weight, r.activation
        wcols = " " * 42  # pool has no weight
        if w:
            wcols = (f"{w.channels:>4} {fmt_ratio(w.channel_ratio):>8} {w.kurtosis:>6.1f} {100 * w.outlier_share:>6.2f} "
                     f"{_fmt_db(w.sqnr_per_tensor):>8} {_fmt_db(w.sqnr_per_channel):>5}")  # fmt: skip
        amax = max(-x.min, x.max)
        clip = "-" if x.clip is None else fmt_num(max(-x.clip[0], x.clip[1]))
        tail = "-" if x.tail_ratio is None else f"{x.tail_ratio:.1f}"
        lines.append(f"{r.name:<9} {wcols}  {fmt_num(amax):>8} {fmt_num(x.p99_99):>8} {tail:>6} {clip:>8}  "
                     f"{r.naive.drop:>9.1f} {r.chosen.drop:>6.1f} {_fmt_db(r.chosen.logit_sqnr):>6}")  # fmt: skip
    return "\n".join(lines)


TABLE_LEGEND = ("ch ratio: largest/smallest channel max|w|; kurt: excess kurtosis; outl%: weights beyond 3 sigma; "
                "wSQNR pt/pc: weight SQNR (dB, mean over channels) per-tensor/per-channel;\nact max, p99.99: of |x| at the layer's input; "
                "clip: chosen range; naive dpt / dpt: top-1 drop (pt) with only this layer quantized, naive / chosen; "
                "lSQNR: logit SQNR (dB), chosen")  # fmt: skip


def summary(a: Analysis) -> str:
    lines = [
        f"FP32 top-1 {100 * a.fp32_top1:.2f}%  |  naive INT8 {100 * a.naive_top1:.2f}% ({100 * (a.naive_top1 - a.fp32_top1):+.2f} pt)"
        f"  |  {a.method} INT8 {100 * a.chosen_top1:.2f}% ({100 * (a.chosen_top1 - a.fp32_top1):+.2f} pt)"
        f"  on {a.evaluation['images']} images ({a.constraints}, integer emulation)",
        f"most sensitive, naive: {', '.join(a.most_sensitive('naive'))};  {a.method}: {', '.join(a.most_sensitive('chosen'))}",
    ]  # fmt: skip
    return "\n".join(lines + [f"- {f}" for f in a.findings])


def plot(a: Analysis, path: str | Path) -> Path:
    """A four-panel PNG: channel range ratio, weight SQNR per-tensor vs per-channel, activation
    max vs p99.99 (and the chosen clip), sensitivity naive vs chosen; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names = [r.name.replace("convs.", "") for r in a.layers]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(10.0, 0.45 * len(names) + 4), 9), layout="constrained")
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2, sharex=True)

    def val(v):
        return np.nan if v is None or not math.isfinite(v) else v

    ratio = [val(r.weight.channel_ratio) if r.weight else np.nan for r in a.layers]
    ax1.bar(x, ratio, color="tab:purple")
    ax1.set_yscale("log")
    ax1.set_ylabel("max / min channel max|w|")
    ax1.set_title("weight channel range ratio")
    w = 0.4
    ax2.bar(x - w / 2, [val(r.weight.sqnr_per_tensor) if r.weight else np.nan for r in a.layers], w, label="per-tensor (naive)")
    ax2.bar(x + w / 2, [val(r.weight.sqnr_per_channel) if r.weight else np.nan for r in a.layers], w, label="per-channel")
    ax2.set_ylabel("dB")
    ax2.set_title("weight quantization SQNR")
    ax2.legend(fontsize=8)
    ax3.plot(x, [max(-r.activation.min, r.activation.max) for r in a.layers], "o-", label="max|x|")
    ax3.plot(x, [r.activation.p99_99 for r in a.layers], "s-", label="p99.99")
    ax3.plot(x, [max(-r.activation.clip[0], r.activation.clip[1]) if r.activation.clip else np.nan for r in a.layers],
             "^--", label=f"{a.method} clip")  # fmt: skip
    ax3.set_yscale("log")
    ax3.set_title("activation range at each quantizer's input")
    ax3.legend(fontsize=8)
    ax4.bar(x - w / 2, [r.naive.drop for r in a.layers], w, label="naive", color="tab:red")
    ax4.bar(x + w / 2, [r.chosen.drop for r in a.layers], w, label=a.method, color="tab:green")
    ax4.set_ylabel("top-1 drop (pt)")
    ax4.set_title("sensitivity: only this layer quantized")
    ax4.axhline(0, color="black", lw=0.5)
    ax5 = ax4.twinx()  # drops on a small eval set are coarse; the logit SQNR is not
    ax5.plot(x, [val(r.naive.logit_sqnr) for r in a.layers], "v:", color="tab:red", label="naive logit SQNR")
    ax5.plot(x, [val(r.chosen.logit_sqnr) for r in a.layers], "^:", color="tab:green", label=f"{a.method} logit SQNR")
    ax5.set_ylabel("logit SQNR (dB)")
    handles = ax4.get_legend_handles_labels()[0] + ax5.get_legend_handles_labels()[0]
    ax4.legend(handles, [h.get_label() for h in handles], fontsize=8)
    for ax in (ax3, ax4):
        ax.set_xticks(x, names, rotation=90, fontsize=7)
        ax.set_xlabel("layer (conv index, pool, head)")
    fig.suptitle(f"{a.model} / {a.constraints}: FP32 {100 * a.fp32_top1:.1f}%, naive INT8 {100 * a.naive_top1:.1f}%, "
                 f"{a.method} INT8 {100 * a.chosen_top1:.1f}% top-1 ({a.evaluation['images']} images)")  # fmt: skip
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def write(a: Analysis, out_dir: str | Path) -> tuple[Path, Path | None]:
    """``out_dir/analysis.json`` and ``out_dir/analysis.png``, each written atomically (the folder
    is created; a path that is not a folder is a one-line ``UserError``). Without matplotlib the
    plot is skipped with a warning naming the extra that adds it (``None``)."""
    out_dir = output_dir(out_dir, "analysis.json and analysis.png")
    json_path = write_text_atomic(out_dir / "analysis.json", a.to_json() + "\n")
    if missing("matplotlib"):
        log.warning("no analysis.png: %s", install_hint("matplotlib", "plots"))
        return json_path, None
    return json_path, plot(a, out_dir / "analysis.png")


__all__ = ["TABLE_LEGEND", "plot", "summary", "table", "write"]
