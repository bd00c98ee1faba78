"""Measuring on the device: a bundle per artifact (:func:`write_bundle`), the torch-free runner
copied into it (``runner.py``: ``python3 runner.py BUNDLE``), the round trip to a remote device
(:func:`run_remote`) and reading its result back (:func:`read_result`). See README "Measuring on
the device". Exports are lazy, so that reading a profile's ``remote`` loads no torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "read_manifest": "bundle", "write_bundle": "bundle",
    "DeviceLatency": "results", "DeviceResult": "results", "NativeTiming": "results", "read_result": "results",
    "Remote": "remote", "RemoteError": "remote", "RoundTrip": "remote", "parse_remote": "remote", "run_remote": "remote",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
