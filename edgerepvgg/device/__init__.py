"""Measuring on the device: a bundle per artifact (:func:`write_bundle`), the torch-free runner
copied into it (``runner.py``: ``python3 runner.py BUNDLE``) and reading its result back
(:func:`read_result`). See README "Measuring on the device (first slice)"."""

from edgerepvgg.device.bundle import read_manifest, write_bundle
from edgerepvgg.device.results import DeviceLatency, DeviceResult, NativeTiming, read_result

__all__ = ["DeviceLatency", "DeviceResult", "NativeTiming", "read_manifest", "read_result", "write_bundle"]
