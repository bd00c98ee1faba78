"""What every benchmark shares: the machine it ran on, and Markdown tables."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine_info(threads: int, packages: tuple[str, ...] = ("torch", "onnxruntime", "onnx", "onnxsim")) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, relevant ISA flags, library versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    versions = {}
    for name in packages:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            versions[name] = "not installed"
    return {
        "cpu": fields.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "isa": [f for f in CPU_FLAGS if f in flags],
        "hypervisor": "hypervisor" in flags,
        "threads": threads,
        "load_avg_start": list(os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def md_table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one character per column, ``l`` or ``r``."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(map(str, row)) + " |" for row in [header, rule, *rows]]
