"""Scale: RepVGG-B3 at 224x224 through calibrate and INT8 export to every target, time and peak RSS
per step (goals: peak RSS <= 2 GB, first target <= 45 s on 2 cores).

Every step is one ``edgerepvgg`` command in its own process, so its peak RSS is its own
(``os.wait4``'s ``ru_maxrss``), as a user would run it:

- ``calibrate``: statistics pass (cold cache) + QuantSpec;
- ``export onnxruntime``: the first target, statistics pass included (its own cold cache);
- ``export openvino`` / ``tflite`` / ``tensorrt``: each further target, statistics from the cache
  the first export wrote (TensorRT: the Q/DQ ONNX; no TensorRT here, so no engine);

all with ``--no-eval --no-latency`` (compile and load the artifact; the accuracy check and latency
runs are other benchmarks' business). The checkpoint is the official train-time layout (``.pth``)
with random weights (seeded); the calibration images are generated (smooth random color fields
plus noise, seeded, PNG): nothing is downloaded, and neither time nor memory depends on what the
weights or pixels are.

    PYTHONPATH=.:benchmarks python benchmarks/scale.py                 # B3, 128 images (~10 min on 2 idle cores)
    PYTHONPATH=.:benchmarks python benchmarks/scale.py --variant A0 --images 16 --out /tmp/scale.json   # smoke
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine_info, md_table, save_results


log = logging.getLogger("scale")
TARGETS = ("onnxruntime", "openvino", "tflite", "tensorrt")
GOAL_RSS_MB, GOAL_FIRST_S = 2048, 45.0
PREPARE = """
import sys, numpy as np, torch
from PIL import Image
from edgerepvgg.models import create_model
variant, ckpt, folder, n, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = create_model(variant, num_classes=1000)
for m in model.modules():  # random BN statistics, as a trained net has
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
torch.save(model.state_dict(), ckpt)
rng = np.random.default_rng(0)
for i in range(n):
    field = rng.uniform(0, 255, (8, 8, 3))
    img = np.asarray(Image.fromarray(field.astype(np.uint8)).resize((size + 32, size + 32), Image.BILINEAR), dtype=np.float64)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(f"{folder}/img_{i:04d}.png")
print(sum(p.numel() for p in model.parameters()))
"""


FLOOR = """
import sys, time, torch
from edgerepvgg.checkpoints import load_checkpoint
from edgerepvgg._fuse import fuse
from edgerepvgg.data import calibration_images
model, meta = load_checkpoint(sys.argv[1])
plain, _ = fuse(model, meta.input_spec, check=False)
del model
batches = [x for x, _ in calibration_images(plain.input_spec, sys.argv[2], limit=None).batches(64)]
with torch.no_grad():
    plain(batches[0][:1])  # warm-up: oneDNN picks its kernels
    t0 = time.perf_counter()
    for x in batches:
        plain(x)
print(f"{time.perf_counter() - t0:.2f}")
"""


def run_measured(name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` in its own process: wall seconds, peak RSS (MB, the child's own ``wait4`` rusage), exit status."""
    log.info("%s: %s", name, " ".join(cmd))
    t0 = time.perf_counter()
    err_path = Path(env["SCALE_WORK"]) / f"{name.replace(' ', '_')}.stderr"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    result = {"step": name, "seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "rc": rc,
              "command": " ".join(cmd[2:]) if cmd[1] == "-m" else " ".join(cmd)}  # fmt: skip
    if rc != 0:
        result["stderr_tail"] = err_path.read_text()[-1500:]
        log.error("%s failed (%d): %s", name, rc, result["stderr_tail"])
    log.info("%s: %.1f s, peak RSS %.0f MB", name, seconds, result["peak_rss_mb"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="B3")
    p.add_argument("--images", type=int, default=128, help="generated calibration images")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--no-calibrate", action="store_true", help="skip the separate 'calibrate' step")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgerepvgg-scale"), help="scratch folder (checkpoint, images, artifacts)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.size != 224:
        raise SystemExit("only 224 is wired: a foreign checkpoint is read as 224x224 (resize 256)")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    env = {**os.environ, "SCALE_WORK": str(work), "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    py = sys.executable
    ckpt = work / f"repvgg_{args.variant.lower()}_official.pth"
    machine = machine_info(None, ("torch", "onnx", "onnxruntime", "openvino", "ai_edge_litert"))
    steps = [run_measured("prepare (not part of the pipeline)", [py, "-c", PREPARE, args.variant, str(ckpt), str(work / "images"),
                                                                  str(args.images), str(args.size)], env)]  # fmt: skip
    common = ["--images", str(work / "images"), "-q"]
    if not args.no_calibrate:
        steps.append(run_measured("calibrate", [py, "-m", "edgerepvgg.cli", "calibrate", str(ckpt), *common, "--constraints", "tensorrt",
                                                "-o", str(work / "spec.json")], {**env, "XDG_CACHE_HOME": str(work / "cache-calibrate")}))  # fmt: skip
    export_env = {**env, "XDG_CACHE_HOME": str(work / "cache-export")}
    for i, target in enumerate(args.targets):
        name = f"export {target}" + (" (first: statistics pass included)" if i == 0 else " (statistics cached)")
        steps.append(run_measured(name, [py, "-m", "edgerepvgg.cli", "export", str(ckpt), "--target", target, "--precision", "int8",
                                         *common, "--no-eval", "--no-latency", "-o", str(work / f"export-{target}")], export_env))  # fmt: skip
    fp32_mb = ckpt.stat().st_size / 2**20
    # The floor: plain FP32 inference of the fused net over the same images (forward passes only,
    # timed inside the process). The statistics pass cannot beat it, so neither can the first export.
    floor = subprocess.run([py, "-c", FLOOR, str(ckpt), str(work / "images")], env=env, capture_output=True, text=True)
    floor_s = float(floor.stdout.split()[-1]) if floor.returncode == 0 else None
    log.info("FP32 inference over the %d images: %s s", args.images, floor_s)
    pipeline = [s for s in steps if not s["step"].startswith("prepare")]
    result = {"machine": machine, "load_avg_end": list(os.getloadavg()), "variant": args.variant, "size": args.size,
              "images": args.images, "checkpoint_mb": round(fp32_mb, 1), "goal_peak_rss_mb": GOAL_RSS_MB,
              "goal_first_target_s": GOAL_FIRST_S, "peak_rss_mb": max(s["peak_rss_mb"] for s in pipeline),
              "fp32_inference_s": floor_s,
              "command": " ".join(["PYTHONPATH=.:benchmarks python benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
              "steps": steps}  # fmt: skip
    save_results(args.out, result, render(result))
    return 0 if all(s["rc"] == 0 for s in steps) else 1


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# Scale: RepVGG-{r['variant']} at {r['size']}x{r['size']} ({m['date']})", "",
             f"- CPU: {m['cpu']} ({m['cores']} cores); torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}, "
             f"openvino {m.get('openvino')}; load average (1, 5, 15 min) {_loads(m['load_avg_start'])} at the start, "
             f"{_loads(r['load_avg_end'])} at the end (the benchmark itself keeps ~1-2 busy). Peak RSS is per process and "
             "does not depend on load; seconds do.",
             f"- Random weights (seeded; official train-time layout, {r['checkpoint_mb']:.0f} MB .pth); {r['images']} generated "
             f"calibration images (PNG, seeded). Every step is its own process (`os.wait4` ru_maxrss); exports run with "
             "`--no-eval --no-latency`.",
             f"- Goals: peak RSS <= {r['goal_peak_rss_mb']} MB (this run: {r['peak_rss_mb']:.0f} MB); first target <= "
             f"{r['goal_first_target_s']:.0f} s.", ""]  # fmt: skip
    rows = [[s["step"], f"{s['seconds']:.1f}", f"{s['peak_rss_mb']:.0f}", "ok" if s["rc"] == 0 else f"failed ({s['rc']})"] for s in r["steps"]]
    if r.get("fp32_inference_s") is not None:
        rows.append([f"reference: FP32 inference of the fused net over the same {r['images']} images (forward passes only; "
                     "the floor of any statistics pass)", f"{r['fp32_inference_s']:.1f}", "", ""])  # fmt: skip
    lines += md_table(["step", "seconds", "peak RSS (MB)", "status"], rows, "lrrl")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def _loads(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
