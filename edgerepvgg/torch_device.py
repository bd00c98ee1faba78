"""Where PyTorch computes: ``--device cpu|cuda|cuda:N|mps`` and ``--amp off|bf16|fp16``, parsed
and checked in one place.

A device that is not there (``cuda`` without a CUDA build or GPU, ``cuda:3`` on a two-GPU
machine, ``mps`` off Apple silicon) is one :class:`~edgerepvgg.errors.UserError` line naming the
fix, before any work starts. The default (``None``) is the CPU: the same numbers on every machine
unless a GPU is asked for. Under ``torchrun`` the device picks the process group's backend
instead (:func:`distributed_backend`): NCCL on each process's own GPU, Gloo on the CPU.

Not named ``device``: :mod:`edgerepvgg.device` is the on-device runner package.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from collections.abc import Iterator

import torch

from edgerepvgg.errors import UserError

log = logging.getLogger(__name__)

DEVICES = "cpu, cuda, cuda:N or mps"
AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _no_cuda() -> str:
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    return (f"--device cuda: no CUDA GPU is usable here (this torch {torch.__version__} is built with {built}); "
            "install a CUDA build of torch on a machine with an NVIDIA GPU, or use --device cpu")  # fmt: skip


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The ``torch.device`` for ``device`` (``None``: the CPU), checked to exist here: ``cuda``
    is the current CUDA device, ``cuda:N`` must be below the visible GPU count, ``mps`` must be
    available. Anything else is a ``UserError`` naming the valid forms."""
    if device is None:
        return torch.device("cpu")
    text = str(device).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise UserError(f"unknown device {str(device)!r}; use {DEVICES}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError("--device mps: Apple's Metal backend is not available here (it needs Apple silicon, macOS 12.3+ "
                            "and a torch built with MPS); use --device cpu")  # fmt: skip
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise UserError(_no_cuda())
    count = torch.cuda.device_count()
    i = torch.cuda.current_device() if index is None else int(index)
    if i >= count:
        raise UserError(f"--device {text}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
                        "pick one of them, or check CUDA_VISIBLE_DEVICES")  # fmt: skip
    return torch.device("cuda", i)


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, ``mps``, ``cpu``: what a log line or a run record says."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def distributed_backend(device: str | torch.device | None = None) -> str:
    """The process-group backend of a ``torchrun`` job for ``device``: ``nccl`` for ``cuda``
    (each process on its own ``cuda:LOCAL_RANK``), ``gloo`` for ``cpu``; ``None``: NCCL where
    CUDA is available, else Gloo (the behaviour without ``--device``). A fixed ``cuda:N`` or
    ``mps`` cannot be split among processes: a ``UserError``."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    text = str(device).strip().lower()
    if text == "cpu":
        return "gloo"
    if text == "cuda":
        if not torch.cuda.is_available():
            raise UserError(_no_cuda())
        return "nccl"
    resolve_device(device)  # an unknown or missing device says so first
    raise UserError(f"--device {text} under torchrun: each process uses its own GPU (cuda:LOCAL_RANK); "
                    "pass --device cuda or --device cpu, or run without torchrun")  # fmt: skip


def require_float64(device: torch.device, what: str) -> None:
    """Refuse ``device`` for work that needs float64 (integer emulation, QAT's rounding
    decisions): MPS has no float64."""
    if device.type == "mps":
        raise UserError(f"{what} takes its rounding decisions in float64, which MPS lacks; use --device cpu (or cuda)")


def emulation_device(device: torch.device) -> torch.device:
    """Where the float64 integer emulation runs for ``device``: there, except on MPS (no float64),
    where it runs on the CPU."""
    if device.type == "mps":
        log.info("the integer emulation runs on the CPU: MPS has no float64")
        return torch.device("cpu")
    return device


def placed(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device`` without moving the caller's copy: itself where its parameters
    already are there, else a deep copy moved there (``nn.Module.to`` works in place)."""
    first = next(iter(module.parameters()), None)
    if first is None or first.device == device:
        return module
    return copy.deepcopy(module).to(device)


@contextlib.contextmanager
def full_fp32(device: torch.device | None) -> Iterator[None]:
    """Float32 that is float32 on CUDA: no TF32 in cuDNN convolutions (on by default) or cuBLAS
    matmuls while reference logits or calibration statistics are computed; nothing elsewhere."""
    if device is None or device.type != "cuda":
        yield
        return
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


# ---------------------------------------------------------------------------------------------
# Mixed precision (training only: QAT's fake quantization stays float32)


def check_amp(amp: str, device: torch.device | None = None) -> None:
    """``amp`` is one of :data:`AMP_MODES` and, with ``device``, runs there (bf16 needs an Ampere
    or newer GPU on CUDA; CPU autocast takes bf16 and, in recent torch, fp16)."""
    if amp not in AMP_MODES:
        raise UserError(f"unknown --amp {amp!r}; use {', '.join(AMP_MODES)}")
    if amp == "off" or device is None:
        return
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {device_name(device)} has no bfloat16 support; use --amp fp16")
    with warnings.catch_warnings():  # torch warns and silently disables an unsupported autocast dtype
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=_AMP_DTYPES[amp]):
            enabled = torch.is_autocast_enabled(device.type)
    if not enabled:
        raise UserError(f"--amp {amp}: this torch has no {amp} autocast on {device.type}; use --amp off or another --amp")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context of a training step: ``torch.autocast`` in ``amp``'s dtype on
    ``device``, or nothing for ``off``."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler for ``fp16`` (its narrow exponent underflows small gradients); ``None`` for
    ``bf16`` (float32's exponent) and ``off``."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
