"""Facts about the machine this process runs on: CPU model and instruction-set flags, cores,
library versions. A leaf module, read by reports (where a figure was measured) and by the
quantization schemes (whether this CPU's integer kernels need narrower weights)."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx512vnni"})
PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "ai-edge-litert", "tensorrt")
_X86 = ("x86_64", "amd64", "i686", "x86")


@dataclass(frozen=True)
class CPU:
    """The CPU as ``/proc/cpuinfo`` describes it (model name, family/model, ISA flags)."""

    model: str
    family_model: str
    flags: frozenset[str]


@functools.cache
def cpu() -> CPU:
    """This machine's CPU, read once. Without ``/proc/cpuinfo`` (not Linux) the flags are empty."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())  # the first processor's entry
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return CPU(fields.get("model name", platform.processor() or "unknown"),
               f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}", flags)  # fmt: skip


def cpu_flags() -> set[str]:
    """Instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    return set(cpu().flags)


def needs_reduced_weight_range(flags: set[str] | None = None) -> bool:
    """x86 CPUs without VNNI multiply u8 x s8 pairs with vpmaddubsw, whose int16 intermediate
    saturates for full 8-bit weights; 7-bit weights are exact there (NNCF's overflow fix exists
    for the same reason)."""
    if platform.machine().lower() not in _X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return not (VNNI_FLAGS & flags)


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
    c = cpu()
    return {
        "cpu": c.model,
        "cpu_family_model": c.family_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [f for f in CPU_FLAGS if f in c.flags],
        "hypervisor": "hypervisor" in c.flags,
        "threads": threads,
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions(packages),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
