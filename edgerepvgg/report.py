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
