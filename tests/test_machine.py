"""Host CPU detection and the weight-range rule, with the detection sources monkeypatched:
Linux (/proc/cpuinfo), Windows/macOS (numpy's detected features only), Arm, and nothing at all."""

from __future__ import annotations

import logging

import pytest

from edgerepvgg import machine
from edgerepvgg.machine import CPUFeatures, features_from_flags, host_features, needs_reduced_weight_range

AVX2_ONLY = {"AVX": True, "AVX2": True, "FMA3": True, "AVX512F": False, "AVX512VNNI": False}
AVX512_VNNI = {**AVX2_ONLY, "AVX512F": True, "AVX512VNNI": True}


@pytest.fixture
def host(monkeypatch):
    """Set this 'host': its architecture, its /proc/cpuinfo text (None: no file) and numpy's
    feature table (None: not importable); detection runs afresh and warns afresh."""

    def set_host(arch: str, cpuinfo: str | None, numpy_features: dict[str, bool] | None) -> CPUFeatures:
        monkeypatch.setattr("platform.machine", lambda: arch)
        monkeypatch.setattr(machine, "_read_cpuinfo", lambda: cpuinfo)
        monkeypatch.setattr(machine, "_numpy_cpu_features", lambda: numpy_features)
        monkeypatch.setattr(machine, "_warned", set())
        host_features.cache_clear()
        machine.cpu.cache_clear()
        return host_features()

    yield set_host
    host_features.cache_clear()
    machine.cpu.cache_clear()


def test_linux_reads_proc_cpuinfo_and_ignores_numpy(host):
    f = host("x86_64", "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 fma avx512_vnni\n", AVX2_ONLY)
    assert f.source == "/proc/cpuinfo" and f.reliable and f.vnni is True
    assert not needs_reduced_weight_range()
    assert machine.cpu().model == "Xeon"


def test_linux_without_vnni_in_proc_cpuinfo_needs_7_bit_weights(host):
    f = host("x86_64", "flags\t: fpu sse4_2 avx2 fma\n", AVX512_VNNI)
    assert f.vnni is False and needs_reduced_weight_range()


def test_windows_without_proc_cpuinfo_reads_numpy_and_finds_avx512_vnni(host):
    f = host("AMD64", None, AVX512_VNNI)
    assert (f.arch, f.source) == ("x86_64", "numpy")
    assert {"avx2", "fma", "avx512_vnni"} <= f.flags
    assert f.vnni is True and not needs_reduced_weight_range()


def test_missing_proc_cpuinfo_never_means_no_vnni(host, caplog):
    # numpy has no key for AVX-VNNI: an AVX2 CPU without AVX512-VNNI may still have it (Alder Lake)
    f = host("x86_64", None, AVX2_ONLY)
    assert f.vnni is None
    with caplog.at_level(logging.WARNING, "edgerepvgg.machine"):
        assert needs_reduced_weight_range()  # the safe side: 7 bits are exact with or without VNNI
        assert needs_reduced_weight_range()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot tell whether this x86 CPU has VNNI" in warnings[0]
    assert "numpy" in warnings[0] and "--weight-bits 8" in warnings[0]


def test_numpy_without_avx2_answers_no_vnni(host):
    f = host("x86_64", None, {"SSE42": True, "AVX": True, "AVX2": False, "AVX512VNNI": False})
    assert f.vnni is False  # AVX-VNNI only exists beside AVX2


def test_nothing_to_read_is_unknown_not_no_vnni(host, caplog):
    f = host("x86_64", None, None)
    assert not f.reliable and f.vnni is None
    with caplog.at_level(logging.WARNING, "edgerepvgg.machine"):
        assert needs_reduced_weight_range()
    assert "cannot tell" in caplog.text


def test_proc_cpuinfo_without_a_flags_line_falls_back_to_numpy(host):
    f = host("x86_64", "processor\t: 0\n", AVX512_VNNI)
    assert f.source == "numpy" and f.vnni is True


@pytest.mark.parametrize("arch,cpuinfo", [("arm64", None), ("aarch64", "Features\t: fp asimd evtstrm\n")])
def test_arm_never_narrows_weights(host, arch, cpuinfo, caplog):
    f = host(arch, cpuinfo, {"NEON": True, "ASIMD": True})
    assert f.arch == "aarch64" and not f.is_x86
    with caplog.at_level(logging.WARNING):
        assert not needs_reduced_weight_range()
    assert caplog.text == ""


def test_device_flags_are_taken_as_complete_and_show_their_architecture():
    assert needs_reduced_weight_range(["AVX2", "fma"])  # upper case is fine (profiles)
    assert not needs_reduced_weight_range(["avx2", "avx_vnni"])
    assert not needs_reduced_weight_range({"avx2", "avx512_vnni"})
    assert not needs_reduced_weight_range(["neon", "asimd"])
    assert features_from_flags(["asimd"]).arch == "aarch64"
    assert features_from_flags([]).arch == "x86_64" and needs_reduced_weight_range([])


def test_device_flags_do_not_depend_on_this_host(host):
    host("aarch64", "Features\t: asimd\n", None)
    assert needs_reduced_weight_range(["avx2"])  # an x86 device described from an Arm build host


def test_machine_info_says_where_the_flags_came_from(host):
    host("x86_64", None, AVX512_VNNI)
    info = machine.machine_info()
    assert info["isa_source"] == "numpy" and info["vnni"] is True
    assert "avx512_vnni" in info["isa"] and "avx2" in info["isa"]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_this_linux_machine_answers_the_vnni_question():
    f = host_features()
    assert f.source == "/proc/cpuinfo" and f.reliable and f.vnni is not None


@pytest.mark.parametrize(
    "cpuinfo,numpy_features,bits,expected",
    [("flags\t: avx2 fma\n", None, 8, "this CPU has no VNNI: the first conv's 8-bit weights can saturate"),
     (None, AVX2_ONLY, 8, "cannot tell whether this CPU has VNNI (x86_64, flags from numpy, VNNI unknown)"),
     ("flags\t: avx2 avx512_vnni\n", None, 8, ""),
     ("flags\t: avx2 fma\n", None, 7, ""),
     ("flags\t: avx2 fma\n", None, None, "")],  # None: the default for this CPU (7-bit first conv)
)  # fmt: skip
def test_openvino_warns_about_8_bit_weights_from_the_same_detection(host, caplog, cpuinfo, numpy_features, bits, expected):
    from quant_helpers import minmax_spec, tiny_plain

    from edgerepvgg.quant import constraints_for
    from edgerepvgg.targets.openvino import OpenVINOTarget

    host("x86_64", cpuinfo, numpy_features)
    spec = minmax_spec(tiny_plain(), constraints_for("openvino", weight_bits=bits))
    assert bits is not None or spec.layers[0].weight.scheme.bits == 7 and spec.layers[1].weight.scheme.bits == 8
    with caplog.at_level(logging.WARNING, "edgerepvgg.targets.openvino"):
        OpenVINOTarget._warn_constraints(spec)
    assert (expected in caplog.text) if expected else caplog.text == ""


def test_openvino_unavailable_names_the_extra_that_adds_it(monkeypatch):
    import sys

    from edgerepvgg.targets.openvino import OpenVINOTarget

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert "pip install 'edgerepvgg[openvino]'" in OpenVINOTarget().available()


def test_versions_name_the_onnx_runtime_distribution_that_is_installed(monkeypatch):
    import importlib.metadata

    from edgerepvgg import machine

    installed = {"onnxruntime-gpu": "1.20.0"}

    def version(dist):
        if dist not in installed:
            raise importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert machine.versions(("onnxruntime", "openvino")) == {"onnxruntime": "onnxruntime-gpu 1.20.0", "openvino": "not installed"}
