"""Device profiles: where and how a model is to run, and the gates it must pass there (TOML).

A profile names a backend (a registered target), a precision, the device it stands for, threads,
the throughput batch and accuracy gates; ``compare`` runs one row per profile and fails when a
gate fails. ``--target`` accepts a backend name or a profile file everywhere. The shipped
profiles live in the top-level ``targets/`` folder (packaged as ``edgerepvgg/_profiles``).
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from edgerepvgg.device.remote import Remote, parse_remote
from edgerepvgg.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

_PROFILES = Path(__file__).resolve().parent / "_profiles"  # in a wheel: targets/, mapped in by pyproject.toml
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Gates:
    """Limits a deployment must meet: top-1 drop against FP32 (points), top-1 agreement with
    the INT8 emulation (0..1), and the batch-1 median latency (ms). ``None``: not gated."""

    max_delta_top1: float | None = None
    min_agreement_emulation: float | None = None
    max_latency_ms: float | None = None


@dataclass(frozen=True)
class Profile:
    """One deployment: backend + precision on a device, with its gates."""

    name: str
    backend: str
    precision: str = "int8"
    device: str = "this machine"
    arch: str | None = None  # e.g. "aarch64": latency is only measured on a machine of this arch
    threads: int | None = None
    batch: int = 16  # throughput batch
    input_size: int | None = None  # the model's input side this profile is sized for (checked)
    constraints: str | None = None  # default: the backend's own constraint set
    weight_bits: int | None = None
    cpu_flags: tuple[str, ...] | None = None  # the device CPU's ISA flags (e.g. avx2, avx512_vnni); None: this host's
    tensorrt_version: str | None = None  # the device's TensorRT, e.g. "8.6" (JetPack 6.0) or "10.3"
    gates: Gates = field(default_factory=Gates)
    remote: Remote | None = None  # where it runs: the bundle goes there and is measured there (device/remote.py)
    source: str = "built-in"

    def runs_on_this_arch(self) -> bool:
        return self.arch is None or _arch(self.arch) == _arch(platform.machine())


def _arch(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


_TYPES = {"name": str, "backend": str, "precision": str, "device": str, "arch": str, "threads": int, "batch": int,
          "input_size": int, "constraints": str, "weight_bits": int, "cpu_flags": list, "tensorrt_version": str}  # fmt: skip
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list of strings"}
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")
_GATE_KEYS = {f.name for f in fields(Gates)}


def _bad(path: Path, key: str, problem: str) -> UserError:
    return UserError(f"{path}: field '{key}' {problem}; fix the profile (see targets/README.md)")


def load_profile(path: str | Path) -> Profile:
    """Read and validate one TOML profile; any malformed field is a one-line error naming the file
    and the field."""
    from edgerepvgg.targets import target_names

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML ({exc}); fix the profile") from exc
    values: dict = {}
    for key, value in data.items():
        if key == "gates":
            if not isinstance(value, dict):
                raise _bad(path, "gates", "must be a table ([gates])")
            for gate, limit in value.items():
                if gate not in _GATE_KEYS:
                    raise _bad(path, f"gates.{gate}", f"is unknown (known: {', '.join(sorted(_GATE_KEYS))})")
                if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
                    raise _bad(path, f"gates.{gate}", f"must be a non-negative number, got {limit!r}")
            values["gates"] = Gates(**{k: float(v) for k, v in value.items()})
            continue
        if key == "remote":
            values["remote"] = parse_remote(value, str(path))
            continue
        if key not in _TYPES:
            raise _bad(path, key, f"is unknown (known: {', '.join([*_TYPES, 'gates', 'remote'])})")
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]) or (
            isinstance(value, list) and not all(isinstance(v, str) for v in value)
        ):
            raise _bad(path, key, f"must be {_TYPE_NAMES[_TYPES[key]]}, got {value!r}")
        values[key] = tuple(v.lower() for v in value) if isinstance(value, list) else value
    if "backend" not in values:
        raise _bad(path, "backend", f"is missing (one of {', '.join(target_names())})")
    if values["backend"] not in target_names():
        raise _bad(path, "backend", f"names an unknown target {values['backend']!r} (one of {', '.join(target_names())})")
    if values.get("precision", "int8") not in PRECISIONS:
        raise _bad(path, "precision", f"must be one of {', '.join(PRECISIONS)}, got {values['precision']!r}")
    if "tensorrt_version" in values and not _VERSION.match(values["tensorrt_version"]):
        raise _bad(path, "tensorrt_version", f"must be a version such as \"8.6\" or \"10.3\", got {values['tensorrt_version']!r}")
    if "weight_bits" in values and not 2 <= values["weight_bits"] <= 8:
        raise _bad(path, "weight_bits", f"must be between 2 and 8, got {values['weight_bits']}")
    for key in ("threads", "batch", "input_size"):
        if key in values and values[key] < 1:
            raise _bad(path, key, f"must be at least 1, got {values[key]}")
    values.setdefault("name", path.stem)
    return Profile(**values, source=str(path))


def default_profile(backend: str, precision: str = "int8") -> Profile:
    """The profile a bare backend name stands for: this machine, the backend's defaults, no gates."""
    from edgerepvgg.targets import get_target

    get_target(backend)  # unknown names fail here, with the list
    return Profile(name=f"{backend}-{precision}", backend=backend, precision=precision)


def shipped_profiles() -> list[Path]:
    """The profile files shipped with edgerepvgg: the installed copy (a wheel), else the checkout's
    top-level ``targets/`` folder (an editable install)."""
    for root in (_PROFILES, Path(__file__).resolve().parents[1] / "targets"):
        if root.is_dir():
            return sorted(root.glob("*.toml"))
    return []


def lookup(name: str | Path) -> Profile | None:
    """The profile ``name`` stands for when it is a ``.toml`` file or a shipped profile's name;
    ``None`` when it is neither (e.g. a bare backend name)."""
    name = str(name)
    if name.endswith(".toml") or Path(name).is_file():
        return load_profile(name)
    shipped = {p.stem: p for p in shipped_profiles()}
    return load_profile(shipped[name]) if name in shipped else None


def resolve(names: list[str], precisions: tuple[str, ...] = ("fp32", "int8")) -> list[Profile]:
    """Profiles for ``names``: a profile file path, a shipped profile's name, a backend name (one
    profile per precision in ``precisions`` that the backend builds), or ``all`` (every backend)."""
    from edgerepvgg.targets import get_target, target_names

    out: list[Profile] = []
    for name in names:
        if name == "all":
            out += resolve(target_names(), precisions)
        elif (profile := lookup(name)) is not None:
            out.append(profile)
        elif name in target_names():
            built = get_target(name).precisions
            out += [default_profile(name, p) for p in precisions if p in built]
        else:
            raise UserError(f"unknown target or profile {name!r}; pass a backend ({', '.join(target_names())}), "
                            f"a shipped profile ({', '.join(p.stem for p in shipped_profiles()) or 'none'}) or a .toml file")  # fmt: skip
    seen: set[str] = set()
    unique = []
    for p in out:
        if p.name in seen:
            p = replace(p, name=f"{p.name}-{len(seen)}")
        seen.add(p.name)
        unique.append(p)
    return unique
