"""Facts about the machine this process runs on: CPU model and instruction-set flags, cores,
library versions. A leaf module, read by reports (where a figure was measured) and by the
quantization schemes (whether a CPU's integer kernels need narrower weights).

Why the flags matter: x86 CPUs without VNNI multiply u8 x s8 pairs with ``vpmaddubsw``, whose
int16 intermediate saturates for full 8-bit weights (255 * 127 * 2 > 32767) in ONNX Runtime's and
OpenVINO's integer convolutions; 7-bit weights are exact there (255 * 63 * 2 <= 32767). With VNNI
(AVX512-VNNI or AVX-VNNI) the products are summed in int32 and 8-bit weights are exact.

Where the flags come from (:func:`host_features`): ``/proc/cpuinfo`` on Linux; elsewhere (Windows,
macOS, a Linux without /proc) the features numpy detected at import. numpy has no key for
AVX-VNNI, so on a CPU with AVX2 but without AVX512-VNNI it cannot answer the VNNI question: the
answer is then *unknown* (:attr:`CPUFeatures.vnni` is ``None``), never "no file, so no VNNI".
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx512vnni"})
ARM_FLAGS = frozenset({"neon", "asimd", "sve", "asimddp"})  # flags only Arm CPUs report
PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "ai-edge-litert", "tensorrt")
_X86 = frozenset({"x86_64", "amd64", "x64", "i386", "i686", "x86"})
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "i686": "x86", "i386": "x86"}
# numpy's feature names that differ from /proc/cpuinfo's; the others are the same in lower case.
_NUMPY_NAMES = {"FMA3": "fma", "AVX512VNNI": "avx512_vnni", "SSE41": "sse4_1", "SSE42": "sse4_2",
                "AVX512_VNNI": "avx512_vnni", "ASIMDDP": "asimddp"}  # fmt: skip
NUMPY_BLIND = frozenset({"avx_vnni", "amx_int8"})  # features numpy's detector has no key for


def normalize_arch(name: str) -> str:
    """One name per architecture: "AMD64" (Windows) and "x86_64" -> "x86_64", "arm64" (macOS) -> "aarch64"."""
    name = name.strip().lower()
    return _ARCH_ALIASES.get(name, name)


@dataclass(frozen=True)
class CPUFeatures:
    """What is known about a CPU's instruction sets.

    ``flags``: the ISA flags known to be present (``/proc/cpuinfo`` names, lower case).
    ``reliable``: whether a flag missing from ``flags`` means the CPU lacks it; ``False`` when
    nothing could be read. ``blind_to``: flags the source cannot report even when reliable
    (numpy has no AVX-VNNI key). ``source`` says where the flags came from."""

    arch: str
    flags: frozenset[str]
    source: str
    reliable: bool
    blind_to: frozenset[str] = frozenset()

    @property
    def is_x86(self) -> bool:
        return self.arch in _X86

    @property
    def vnni(self) -> bool | None:
        """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); ``None`` when the source
        cannot tell; ``False`` on other architectures."""
        if not self.is_x86:
            return False
        if VNNI_FLAGS & self.flags:
            return True
        if not self.reliable:
            return None
        # AVX-VNNI only exists beside AVX2: a reliable source without AVX2 answers it too.
        if "avx_vnni" in self.blind_to and "avx2" in self.flags:
            return None
        return False

    def describe(self) -> str:
        """One phrase for logs and reports: architecture, source and the VNNI answer."""
        vnni = {True: "VNNI", False: "no VNNI", None: "VNNI unknown"}[self.vnni] if self.is_x86 else "not x86"
        return f"{self.arch}, flags from {self.source}, {vnni}"


def _read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or ``None`` where there is none (Windows, macOS)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _numpy_cpu_features() -> dict[str, bool] | None:
    """The CPU features numpy detected at import (``__cpu_features__``), or ``None`` where numpy
    or its table cannot be imported."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy >= 2, < 2
        try:
            table = importlib.import_module(module).__cpu_features__
        except (ImportError, AttributeError):
            continue
        if isinstance(table, dict) and table:
            return dict(table)
    return None


def _cpuinfo_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())  # the first processor's entry
    return fields


@functools.cache
def host_features() -> CPUFeatures:
    """This machine's CPU features, detected once: /proc/cpuinfo where it lists flags, else
    numpy's detected features, else nothing (``reliable=False``)."""
    arch = normalize_arch(platform.machine())
    text = _read_cpuinfo()
    if text is not None:
        fields = _cpuinfo_fields(text)
        listed = fields.get("flags", fields.get("Features"))
        if listed is not None:
            return CPUFeatures(arch, frozenset(listed.lower().split()), "/proc/cpuinfo", True)
    table = _numpy_cpu_features()
    if table is not None:
        flags = frozenset(_NUMPY_NAMES.get(k, k.lower()) for k, present in table.items() if present)
        return CPUFeatures(arch, flags, "numpy", True, NUMPY_BLIND)
    return CPUFeatures(arch, frozenset(), "nothing (no /proc/cpuinfo, no numpy feature table)", False)


def features_from_flags(flags: Iterable[str], arch: str | None = None) -> CPUFeatures:
    """The features of a device described by its ISA flags (a profile's ``cpu_flags``), taken as
    complete. ``arch`` defaults to what the flags show: Arm when an Arm-only flag (neon, asimd,
    sve) is listed, else x86_64."""
    flags = frozenset(f.strip().lower() for f in flags)
    if arch is None:
        arch = "aarch64" if ARM_FLAGS & flags else "x86_64"
    return CPUFeatures(normalize_arch(arch), flags, "the given flags", True)


_warned: set[str] = set()


def needs_reduced_weight_range(flags: CPUFeatures | Iterable[str] | None = None) -> bool:
    """Whether a CPU's integer convolutions (ONNX Runtime, OpenVINO) need 7-bit weights to be
    exact: x86 without VNNI. ``flags``: a :class:`CPUFeatures`, a device's ISA flags (complete,
    see :func:`features_from_flags`), or ``None`` for this host. When the VNNI question cannot
    be answered, say so once in a warning and answer ``True``: 7-bit weights are exact on every
    x86 CPU, 8-bit ones only with VNNI."""
    if flags is None:
        features = host_features()
    elif isinstance(flags, CPUFeatures):
        features = flags
    else:
        features = features_from_flags(flags)
    vnni = features.vnni
    if vnni is None:
        if features.source not in _warned:
            _warned.add(features.source)
            log.warning("cannot tell whether this x86 CPU has VNNI (%s); choosing 7-bit weights for the CPU integer "
                        "schemes, exact with or without VNNI; pass weight_bits=8 (--weight-bits 8) or a profile with "
                        "the device's cpu_flags if it has VNNI", features.describe())  # fmt: skip
        return True
    return features.is_x86 and not vnni


@dataclass(frozen=True)
class CPU:
    """The CPU: model name and family/model as ``/proc/cpuinfo`` describes it, ISA flags as detected."""

    model: str
    family_model: str
    flags: frozenset[str]


@functools.cache
def cpu() -> CPU:
    """This machine's CPU, read once; its flags are :func:`host_features`' (numpy's where there is no /proc/cpuinfo)."""
    fields = _cpuinfo_fields(_read_cpuinfo() or "")
    flags = host_features().flags
    return CPU(fields.get("model name", platform.processor() or "unknown"),
               f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}", flags)  # fmt: skip


def cpu_flags() -> set[str]:
    """Instruction-set flags known present on this CPU (see :func:`host_features`)."""
    return set(host_features().flags)


# Distributions that provide the same module: any of them is "the" package (never replaced).
ALTERNATIVES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-training"),
    "ai-edge-litert": ("ai-edge-litert", "tflite-runtime"),
}  # fmt: skip


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names; a package with alternative
    distributions, such as onnxruntime-gpu, reports the one installed as "name version"),
    'not installed' otherwise."""
    out = {}
    for name in packages:
        out[name] = "not installed"
        for dist in ALTERNATIVES.get(name, (name,)):
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            out[name] = version if dist == name else f"{dist} {version}"
            break
    return out


def machine_info(threads: int | None = None, packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """CPU, cores, the ISA flags that decide integer speed, library versions, load and time."""
    c, features = cpu(), host_features()
    return {
        "cpu": c.model,
        "cpu_family_model": c.family_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [f for f in CPU_FLAGS if f in c.flags],
        "isa_source": features.source,
        "vnni": features.vnni if features.is_x86 else None,  # None: unknown on x86, or not x86
        "hypervisor": "hypervisor" in c.flags,
        "threads": threads,
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions(packages),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
