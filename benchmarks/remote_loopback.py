"""Remote profiles through real OpenSSH, on this machine: does a row measured "on the device" say
what the host row says?

For each CPU runtime (ONNX Runtime, OpenVINO, LiteRT), INT8, on the bundled model: ``compare`` runs
the shipped profile on the host and the same profile with ``remote = "ssh loopback"``, a throwaway
sshd on 127.0.0.1 whose "device" Python cannot import torch or edgerepvgg. The device rows must
match the host rows' accuracy exactly and agree with the integer emulation >= 99.8%; their latency
(the runner's timer) should be within noise of the host's. The round trip's overhead is its wall
time minus the same bundle run directly (``sh run.sh``) on this machine.

    PYTHONPATH=.:benchmarks:tests python benchmarks/remote_loopback.py                  # 10,000 test images
    PYTHONPATH=.:benchmarks:tests python benchmarks/remote_loopback.py --eval-limit 500 # quicker
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import machine_info, md_table, save_results
from helpers import loopback_sshd, openssh_missing, torch_free_python

from edgerepvgg._compare import compare
from edgerepvgg.device.remote import RoundTrip, parse_remote
from edgerepvgg.profiles import lookup

PROFILES = ("cpu-onnxruntime-int8", "cpu-openvino-int8", "cpu-litert-int8")
RESULTS = Path(__file__).resolve().parent / "results"


class _Trips(logging.Handler):
    """Collects the RoundTrip of every remote run (logged by edgerepvgg.device.remote)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.trips: dict[str, RoundTrip] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and len(record.args) == 3 and isinstance(record.args[2], RoundTrip):
            self.trips[record.args[0]] = record.args[2]


def direct_run_s(bundle: Path, python: Path) -> float:
    """Seconds to run ``bundle`` directly on this machine (the run the round trip wraps)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["cp", "-r", str(bundle), f"{tmp}/b"], check=True)
        start = time.perf_counter()
        subprocess.run(["sh", "run.sh"], cwd=f"{tmp}/b", env={**os.environ, "PYTHON": str(python)}, check=True,
                       capture_output=True)  # fmt: skip
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "remote_loopback.json"))
    args = ap.parse_args()
    if why := openssh_missing():
        sys.exit(f"cannot run: {why}")
    trips = _Trips()
    logging.getLogger("edgerepvgg.device.remote").addHandler(trips)
    logging.getLogger("edgerepvgg.device.remote").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp, loopback_sshd(Path(tmp) / "sshd") as config:
        python = torch_free_python(Path(tmp) / "device-python")
        remote = parse_remote({"ssh": f"ssh -F {config} loopback", "dir": f"{tmp}/device-home", "python": str(python)})
        profiles = []
        for name in PROFILES:
            host = lookup(name)
            profiles += [host, replace(host, name=f"{name}-ssh", device="loopback", remote=remote)]
        started = time.perf_counter()
        result = compare(None, profiles, f"{tmp}/compare", eval_limit=args.eval_limit, progress=True)
        total_s = time.perf_counter() - started
        rows = {r.name: r for r in result.rows}
        records = []
        for name in PROFILES:
            host, dev = rows[name], rows[f"{name}-ssh@device"]
            trip = trips.trips.get(f"{name}-ssh")
            direct = direct_run_s(Path(tmp) / "compare" / f"{name}-ssh" / "bundle", python) if trip else None
            records.append({
                "profile": name, "host_status": host.status, "device_status": dev.status, "device_why": dev.why,
                "host_top1": host.top1, "device_top1": dev.top1, "host_agree_emulation": host.agree_emulation,
                "device_agree_emulation": dev.agree_emulation, "host_p50_ms": host.p50_ms, "device_p50_ms": dev.p50_ms,
                "host_p90_ms": host.p90_ms, "device_p90_ms": dev.p90_ms, "host_timer": host.timer, "device_timer": dev.timer,
                "push_s": trip.push_s if trip else None, "run_s": trip.run_s if trip else None,
                "fetch_s": trip.pull_s if trip else None, "direct_run_s": direct,
                "overhead_s": (trip.push_s + trip.run_s + trip.pull_s - direct) if trip else None,
            })  # fmt: skip
    out = {"machine": machine_info(), "eval_source": result.eval_source, "eval_images": result.eval_images,
           "compare_s": total_s, "rows": records}  # fmt: skip
    save_results(args.out, out, report(out))


def report(out: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    def s(v):
        return "-" if v is None else f"{v:.1f}"

    m = out["machine"]
    rows = [[r["profile"], pct(r["host_top1"]), pct(r["device_top1"]), "yes" if r["host_top1"] == r["device_top1"] else "**no**",
             pct(r["device_agree_emulation"]), ms(r["host_p50_ms"]), ms(r["device_p50_ms"]),
             f"{r['device_p50_ms'] / r['host_p50_ms']:.2f}" if r["host_p50_ms"] and r["device_p50_ms"] else "-",
             s(r["push_s"]), s(r["run_s"]), s(r["fetch_s"]), s(r["direct_run_s"]), s(r["overhead_s"])] for r in out["rows"]]  # fmt: skip
    lines = [f"# Remote profiles over loopback SSH: {out['eval_images']} images of {out['eval_source']}", "",
             f"Machine: {m['cpu']}, {m['cores_usable']} cores, {m['date']}. Host rows: the host's timer "
             "(python, copies included); device rows: the device runner's (the same kind of clock, in the runner's "
             "process on the 'device'). Overhead: push + run + fetch minus the same bundle run directly.", "",
             *md_table(["profile", "host top-1 %", "device top-1 %", "equal", "device agree emu %", "host p50 ms",
                        "device p50 ms", "device/host", "push s", "run s", "fetch s", "direct run s", "overhead s"],
                       rows, "lrrlrrrrrrrrr")]  # fmt: skip
    bad = [r for r in out["rows"] if r["device_status"] != "ok"]
    lines += ["", *(f"- {r['profile']}: device row {r['device_status']}: {r['device_why']}" for r in bad)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
