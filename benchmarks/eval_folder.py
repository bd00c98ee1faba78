"""Evaluation over a large image folder: peak memory against the folder's size.

Generates a labelled folder of 224x224 JPEG images (10 class subfolders; GENERATED images:
smooth random colour fields, no natural images exist on these machines), then evaluates over it
through the library's path (``evaluation_set`` + ``predict``, the calls ``export``/``compare``
make) in a fresh process per case, and records that process's peak RSS and the largest peak RSS
of its decoding worker processes (``getrusage``). Cases: the default, streamed (the folder's
decoded images exceed ``PRELOAD_BYTES``, so they are decoded batch by batch on every pass), and
for contrast everything held in memory (``preload_bytes=inf``: what the eager reader of the
first release did, there in one process). The model is a small hand-built PlainNet (two strided
3x3 convs, 10 classes): what is measured is the data path, not the network.

    PYTHONPATH=. python benchmarks/eval_folder.py                      # 2,500 and 10,000 images
    PYTHONPATH=. python benchmarks/eval_folder.py --sizes 300 1200 --preload-mb 8 --out /tmp/q.json  # smoke run

Writes ``benchmarks/results/eval_folder.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, md_table  # noqa: E402

SIDE, CLASSES = 224, 10
RESULTS = Path(__file__).resolve().parent / "results"


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` generated 224x224 JPEGs in ``root/<class>/``; kept between runs when complete."""
    from PIL import Image

    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % CLASSES
        coarse = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        coarse[..., label % 3] //= 4  # each class leans to a colour
        img = Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC)
        path = root / f"class-{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    marker.touch()
    return root


def first(root: Path, n: int, out: Path) -> Path:
    """A folder of the first ``n`` images of ``root`` (hard links: no copy)."""
    marker = out / f".complete-{n}"
    if marker.exists():
        return out
    files = sorted(root.glob("class-*/*.jpg"), key=lambda f: f.name)[:n]  # by index: every class alike
    for f in files:
        dst = out / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(f, dst)
    marker.touch()
    return out


def child(folder: str, mode: str, preload_mb: float | None, workers: int | None, batch: int) -> dict:
    """One case, in this (fresh) process: read the folder, evaluate, report memory."""
    import torch
    from torch import nn

    from edgerepvgg import data
    from edgerepvgg.evaluate import predict, topk_accuracy
    from edgerepvgg.plain import PlainNet

    torch.manual_seed(0)
    spec = data.InputSpec(size=SIDE, resize=256)
    convs = [nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.Conv2d(16, 32, 3, stride=4, padding=1)]
    plain = PlainNet(convs, nn.Linear(32, CLASSES), spec, name="tiny").eval()
    preload = math.inf if mode == "held" else (None if preload_mb is None else preload_mb * 2**20)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ds = data.evaluation_set(spec, folder, workers=workers) if preload is None else \
        data.image_folder(folder, spec, workers=workers, preload_bytes=preload)  # fmt: skip
    t_open = time.perf_counter() - t0
    logits = predict(plain, ds, batch_size=batch)
    t_total = time.perf_counter() - t0
    return {
        "mode": mode, "images": len(ds), "streamed": isinstance(ds, data.ImageFiles), "class": type(ds).__name__,
        "workers": data._workers(workers, getattr(ds, "paths", [])) if isinstance(ds, data.ImageFiles) else workers,
        "seconds_open": round(t_open, 2), "seconds_total": round(t_total, 2),
        "top1": topk_accuracy(logits, ds.labels), "logits": list(logits.shape),
        "decoded_mb_if_held": round(len(ds) * 3 * SIDE * SIDE / 2**20, 1),
        "peak_rss_mb_after_imports": round(rss_before / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "source": ds.source,
    }  # fmt: skip


def run_case(folder: Path, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), mode, "--batch", str(args.batch)]
    if args.preload_mb is not None:
        cmd += ["--preload-mb", str(args.preload_mb)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case {mode} on {folder} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Evaluation over a large image folder ({result['when']})", "",
             f"- CPU: {m['cpu']} ({m['cores_usable']} usable cores), load average at start "
             f"{[round(x, 1) for x in m.get('load_avg_start') or []]}; torch {m.get('torch')}; the machine was shared with other work",
             f"- images: GENERATED 224x224 JPEGs (smooth random colour fields), {CLASSES} class folders; "
             f"input spec 224 crop of 256; batch {result['batch']}; model: a two-conv PlainNet (the data path is measured)",
             f"- PRELOAD_BYTES {result['preload_mb']} MiB: larger sets stream; 'held' decodes everything into memory (preload_bytes=inf)",
             "", *md_table(["case", "images", "streamed", "decoded if held (MiB)", "peak RSS (MiB)", "largest worker peak RSS (MiB)",
                            "after imports (MiB)", "seconds"],
                           [[c["mode"], c["images"], c["streamed"], c["decoded_mb_if_held"], c["peak_rss_mb"],
                             c["peak_rss_mb_largest_worker"], c["peak_rss_mb_after_imports"], c["seconds_total"]]
                            for c in result["cases"]], "lrlrrrrr"), "", result["verdict"], "",
             f"Command: `{result['command']}`"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000])
    p.add_argument("--root", default="/tmp/edgerepvgg-eval-folder", help="where the generated images are kept")
    p.add_argument("--preload-mb", type=float, help="the preload budget for the streamed cases (default: the library's)")
    p.add_argument("--workers", type=int, help="decoding processes (default: the library's)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--no-held", action="store_true", help="skip the held-in-memory contrast cases")
    p.add_argument("--margin", type=float, default=0.10, help="streamed peaks within this share of each other pass")
    p.add_argument("--out", default=str(RESULTS / "eval_folder.json"))
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.preload_mb, args.workers, args.batch)))
        return

    from edgerepvgg.data import PRELOAD_BYTES

    sizes = sorted(args.sizes)
    root = Path(args.root)
    t0 = time.perf_counter()
    full = generate(root / f"all-{sizes[-1]}", sizes[-1])
    gen_s = time.perf_counter() - t0
    folders = {n: full if n == sizes[-1] else first(full, n, root / f"first-{n}") for n in sizes}
    machine = machine_info()
    cases = []
    for mode in ["streamed"] + ([] if args.no_held else ["held"]):
        for n in sizes:
            case = run_case(folders[n], mode, args)
            print(json.dumps(case), flush=True)
            cases.append(case)
    streamed = [c for c in cases if c["mode"] == "streamed"]
    lo, hi = min(c["peak_rss_mb"] for c in streamed), max(c["peak_rss_mb"] for c in streamed)
    growth = hi / lo - 1
    ok = growth <= args.margin and all(c["streamed"] for c in streamed)
    verdict = (f"Streamed: peak RSS {lo:.0f}-{hi:.0f} MiB over {sizes[0]:,}-{sizes[-1]:,} images ({100 * growth:.1f}% apart; "
               f"margin {100 * args.margin:.0f}%): {'bounded, not growing with the folder' if ok else 'NOT within the margin'}.")  # fmt: skip
    held = [c for c in cases if c["mode"] == "held"]
    if held:
        verdict += " Held in memory: " + ", ".join(f"{c['peak_rss_mb']:.0f} MiB at {c['images']:,}" for c in held) + "."
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine, "sizes": sizes,
              "batch": args.batch, "preload_mb": args.preload_mb if args.preload_mb is not None else PRELOAD_BYTES / 2**20,
              "generated_images": True, "generate_seconds": round(gen_s, 1), "cases": cases, "bounded": ok,
              "growth": round(growth, 4), "verdict": verdict,
              "command": "PYTHONPATH=. python benchmarks/eval_folder.py " + " ".join(sys.argv[1:])}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
