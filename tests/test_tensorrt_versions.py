"""TensorRT 8.5 to 11 without TensorRT: per-release rules (graph_for / build_flags), every generated
trtexec line checked against that release's option list (tests/data/trtexec_options, written from
NVIDIA/TensorRT samples/common/sampleOptions.cpp per release branch), build_engine.sh and
time_engine.sh run against a fake trtexec per release, and the Python engine build's version
branches against a STAND-IN ``tensorrt`` module. The stand-in only checks API shape (which flags,
enums and calls each release has); it builds no engine and proves nothing about TensorRT itself."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgerepvgg.errors import UserError
from edgerepvgg.quant.spec import constraints_for, with_float_layers
from edgerepvgg.targets import get_target
from edgerepvgg.targets import tensorrt as trt_target
from edgerepvgg.targets.tensorrt import (
    GraphChoice,
    TensorRTTarget,
    build_engine,
    build_flags,
    graph_for,
    is_aligned,
    read_trtexec_times,
    require_supported,
    script_commands,
    time_command,
)

from quant_helpers import minmax_spec

OPTIONS = Path(__file__).parent / "data" / "trtexec_options"
#: release -> the NV_TENSORRT_VERSION number its trtexec banner prints ([TensorRT v8502] ...).
BANNERS = {"8.5": 8502, "8.6": 8602, "9.3": 9300, "10.0": 100000, "10.3": 100300, "10.16": 101600, "11.0": 110000, "11.1": 110100}
FAMILY = {"8.5": "8.5", "8.6": "8.5", "9.3": "8.5", "10.0": "10", "10.3": "10", "10.16": "10", "11.0": "11", "11.1": "11"}
SHAPES = ((1, 1, 16, 16), (8, 1, 16, 16), (32, 1, 16, 16))


def options(release: str) -> set[str]:
    return {line for line in (OPTIONS / f"{release}.txt").read_text().splitlines() if line and not line.startswith("#")}


def names(cmd: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in cmd[1:]}


# ---------------------------------------------------------------------------------------------
# Per-release rules


def test_the_option_lists_cite_their_source_and_hold_what_the_review_found():
    for release in BANNERS:
        head = (OPTIONS / f"{release}.txt").read_text().splitlines()[:3]
        assert f"NVIDIA/TensorRT release/{release} samples/common/sampleOptions.cpp" in " ".join(head)
    assert "--stronglyTyped" not in options("8.5") | options("8.6") and "--stronglyTyped" in options("10.3")
    assert "--skipInference" not in options("8.5") and "--skipInference" in options("8.6")
    assert "--fp16" in options("10.16") and "--fp16" not in options("11.0") | options("11.1")


@pytest.mark.parametrize("version, layout, strongly, flags", [
    ("8.5", "qdq", False, ("INT8",)), ("8.6", "qdq", False, ("INT8",)), ("9.3", "qdq", False, ("INT8",)),
    ("10.0", "int8", True, ()), ("10.3", "int8", True, ()), ("11.1", "int8", True, ()), (None, "int8", True, ()),
])  # fmt: skip
def test_int8_layout_and_build_per_release(version, layout, strongly, flags):
    graph = graph_for("int8", version)
    assert graph.weight_layout == layout
    assert build_flags("int8", version, graph) == trt_target.BuildFlags(strongly, flags)


def test_fp16_is_a_builder_flag_before_11_and_an_fp16_graph_on_11():
    assert graph_for("fp16", "10.3") == GraphChoice("int8", "fp32") and build_flags("fp16", "10.3", graph_for("fp16", "10.3")).builder_flags == ("FP16",)
    assert graph_for("fp16", "11.0").float_layers == "fp16" and build_flags("fp16", "11.0", graph_for("fp16", "11.0")).strongly_typed
    with pytest.raises(UserError, match="no FP16 builder flag"):
        build_flags("fp16", "11.0", GraphChoice("int8", "fp32"))  # an FP32 graph made for 10.x cannot become fp16 on 11


@pytest.mark.parametrize("version", ["8.4", "7.1.3", "eight"])
def test_below_8_5_or_not_a_version_is_one_line(version):
    with pytest.raises(UserError) as exc:
        require_supported(version)
    assert "\n" not in str(exc.value) and ("8.5" in str(exc.value) or "not a version" in str(exc.value))
    with pytest.raises(UserError):
        TensorRTTarget(version=version)


def test_get_target_defaults_to_tensorrt_10_where_tensorrt_is_absent():
    t = get_target("tensorrt")
    if trt_target.installed_version() is None:
        assert t.version is None and graph_for("int8", t.version).weight_layout == "int8"
    else:
        assert t.version == trt_target.installed_version()


def test_alignment_is_tensorrts_256_bytes():
    assert is_aligned(0) and is_aligned(4096) and not is_aligned(15_680)  # batch 5 of 1x28x28 float32: an offset view


# ---------------------------------------------------------------------------------------------
# Generated trtexec lines against each release's option list


@pytest.mark.parametrize("written_for", ["8.6", "10.3", "11.0"])
@pytest.mark.parametrize("precision, mixed", [("int8", False), ("int8", True), ("fp32", False), ("fp16", False)])
def test_every_generated_trtexec_line_uses_only_options_its_release_has(written_for, precision, mixed):
    graph = graph_for(precision, written_for)
    commands = script_commands(precision, SHAPES, 1024, graph, mixed)
    for release, family in FAMILY.items():
        cmd = commands[family]
        if isinstance(cmd, str):  # that release cannot build this graph: the script says why
            assert (family == "8.5" and graph.weight_layout == "int8") or (family == "11" and precision == "fp16"), (release, cmd)
            continue
        assert names(cmd) <= options(release), (release, names(cmd) - options(release))
        assert "--skipInference" not in cmd and "--exportLayerInfo" in names(cmd) and "--profilingVerbosity=detailed" in cmd
        assert ("--stronglyTyped" in cmd) == (family != "8.5" and not (precision == "fp16" and graph.float_layers == "fp32"))
    for release in BANNERS:
        assert names(time_command(1, SHAPES[0])) <= options(release)


# ---------------------------------------------------------------------------------------------
# The scripts, run against a fake trtexec per release

FAKE = r"""#!/bin/sh
# Fake trtexec: prints the banner of TensorRT v%(banner)s, refuses options its release lacks, records argv.
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v%(banner)s] # trtexec $*"
[ "$1" = "--help" ] && exit 0
printf '%%s\n' "$@" > "$FAKE_ARGV"
for a in "$@"; do
    name=${a%%%%=*}
    grep -qx -- "$name" "%(options)s" || { echo "Unknown option: $a"; exit 1; }
    case "$a" in --saveEngine=*|--exportTimes=*|--exportProfile=*|--exportLayerInfo=*) printf '[{"count": 1}, {"computeMs": 0.5, "latencyMs": 0.7}]' > "${a#*=}" ;; esac
done
"""


def fake_trtexec(folder: Path, release: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trtexec"
    path.write_text(FAKE % {"banner": BANNERS.get(release, 8401), "options": OPTIONS / f"{release if release in BANNERS else '8.5'}.txt"})
    path.chmod(0o755)
    return path


def run(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["sh", str(script), *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def spec(plain):
    return minmax_spec(plain, constraints_for("tensorrt"))


@pytest.fixture(scope="module")
def artifacts(plain, spec, tmp_path_factory):
    """int8 artifacts written for TensorRT 8.6 (qdq) and 10.3 (int8 weights), with the default profile."""
    out = {}
    for version in ("8.6", "10.3"):
        folder = tmp_path_factory.mktemp(f"trt{version}")
        out[version] = (TensorRTTarget(version=version).compile(plain, spec, folder, "int8"), folder)
    return out


def test_scripts_are_valid_shell(artifacts):
    for _, folder in artifacts.values():
        for script in ("build_engine.sh", "time_engine.sh"):
            assert subprocess.run(["bash", "-n", str(folder / script)], capture_output=True).returncode == 0, script


@pytest.mark.parametrize("release", list(BANNERS))
def test_build_engine_sh_picks_the_flags_of_the_trtexec_it_finds(artifacts, tmp_path, release):
    _, folder = artifacts["8.6"]  # the qdq graph: every release from 8.5 builds it
    fake_trtexec(tmp_path / "bin", release)
    argv = tmp_path / "argv"
    done = run(folder / "build_engine.sh", {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_ARGV": str(argv)})
    assert done.returncode == 0, done.stdout + done.stderr
    got = argv.read_text().split()
    assert set(a.split("=", 1)[0] for a in got) <= options(release)
    assert ("--stronglyTyped" in got) == (FAMILY[release] != "8.5") and ("--int8" in got) == (FAMILY[release] == "8.5")
    assert "--exportLayerInfo=layers.json" in got and "--skipInference" not in got


def test_trtexec_is_found_through_TRTEXEC_and_the_jetpack_folder(artifacts, tmp_path, plain, spec, monkeypatch):
    _, folder = artifacts["10.3"]
    fake = fake_trtexec(tmp_path / "elsewhere", "10.3")
    done = run(folder / "build_engine.sh", {"TRTEXEC": str(fake), "FAKE_ARGV": str(tmp_path / "a1")})
    assert done.returncode == 0 and "TensorRT 10.3" in done.stderr, done.stderr
    jetpack = tmp_path / "usr-src-tensorrt-bin"
    fake_trtexec(jetpack, "8.6")
    monkeypatch.setattr(trt_target, "TRTEXEC_PATHS", (str(jetpack / "trtexec"),))  # stands in for /usr/src/tensorrt/bin
    TensorRTTarget(version="8.6").compile(plain, spec, tmp_path / "jp", "int8")
    done = run(tmp_path / "jp" / "build_engine.sh", {"FAKE_ARGV": str(tmp_path / "a2")})
    assert done.returncode == 0 and "--int8" in (tmp_path / "a2").read_text().split(), done.stderr


def test_build_engine_sh_says_why_it_cannot_build(artifacts, tmp_path):
    _, folder = artifacts["10.3"]
    missing = run(folder / "build_engine.sh", {})
    assert missing.returncode == 127 and "trtexec not found" in missing.stderr and "TRTEXEC=" in missing.stderr
    fake_trtexec(tmp_path / "bin8", "8.6")
    on8 = run(folder / "build_engine.sh", {"PATH": f"{tmp_path / 'bin8'}:/usr/bin:/bin", "FAKE_ARGV": str(tmp_path / "a")})
    assert on8.returncode == 1 and "refuses int8 weight initializers" in on8.stderr and not (tmp_path / "a").exists()
    fake_trtexec(tmp_path / "bin84", "8.4")
    old = run(folder / "build_engine.sh", {"PATH": f"{tmp_path / 'bin84'}:/usr/bin:/bin", "FAKE_ARGV": str(tmp_path / "b")})
    assert old.returncode == 1 and "too old" in old.stderr


@pytest.mark.parametrize("release", ["8.5", "10.3", "11.1"])
def test_time_engine_sh_writes_the_json_files_compare_reads(artifacts, tmp_path, release):
    art, folder = artifacts["8.6"]
    fake_trtexec(tmp_path / "bin", release)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_ARGV": str(tmp_path / "argv")}
    (folder / "model.plan").unlink(missing_ok=True)  # the fake build of another test may have left one
    assert run(folder / "time_engine.sh", env).returncode == 1  # no engine yet
    (folder / "model.plan").write_bytes(b"engine")
    try:
        done = run(folder / "time_engine.sh", env)
        assert done.returncode == 0, done.stderr
        got = (tmp_path / "argv").read_text().split()
        assert {"--loadEngine=model.plan", "--exportTimes=trtexec_times_b8.json", "--exportProfile=trtexec_profile_b8.json"} <= set(got)
        for b in (1, 8):  # the profile's min and opt batches
            assert read_trtexec_times(folder / f"trtexec_times_b{b}.json") == {
                "count": 1, "computeMs": {"median": 0.5, "p90": 0.5, "mean": 0.5}, "latencyMs": {"median": 0.7, "p90": 0.7, "mean": 0.7}}
        assert run(folder / "time_engine.sh", env, "64").returncode == 2  # outside the profile [1, 32]
    finally:
        (folder / "model.plan").unlink()


# ---------------------------------------------------------------------------------------------
# The Python engine build against a stand-in tensorrt module (API shape only; no engine)


def stand_in_tensorrt(version: str, calls: list, cache_ok: bool = True) -> types.ModuleType:
    """A fake ``tensorrt`` with the enums and calls ``release`` has; records what the build does."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    kinds = {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1} if major < 10 else ({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 0})
    trt.NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (), kinds)
    trt.BuilderFlag = type("BuilderFlag", (), {} if major >= 11 else {"FP16": 0, "INT8": 1})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED=2)
    trt.LayerInformationFormat = types.SimpleNamespace(JSON=1)

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"fresh-cache"

    class Config:
        profiling_verbosity = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("timing_cache", cache.data))
            self.cache = cache
            return cache_ok or cache.data == b""

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            p = types.SimpleNamespace(shapes=None)
            p.set_shape = lambda name, *shapes: setattr(p, "shapes", (name, shapes))
            return p

        def build_serialized_network(self, network, config):
            return b"plan"

    trt.Builder = Builder
    trt.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)

    class Context:
        def set_input_shape(self, name, shape):
            calls.append(("input_shape", tuple(shape)))
            return True

    engine = types.SimpleNamespace(create_execution_context=Context, create_engine_inspector=lambda: types.SimpleNamespace(
        get_engine_information=lambda fmt: json.dumps({"Layers": []})))  # fmt: skip
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    return trt


def _build(monkeypatch, tmp_path, version, precision="int8", cache_ok=True, flags=None):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt(version, calls, cache_ok))
    monkeypatch.setitem(sys.modules, "torch", None)  # the build needs no torch: importing it would fail here
    try:
        info = build_engine(tmp_path / "model.onnx", tmp_path, precision, SHAPES, 256, flags)
    finally:
        monkeypatch.undo()
    return info, calls


@pytest.mark.parametrize("version, network, builder_flags", [
    ("8.5.2", 1 << 0, [1]), ("8.6.2", 1 << 0, [1]), ("9.3.0", 1 << 0, [1]), ("10.3.0", 1 << 1, []), ("11.0.0", 1 << 0, []),
])  # fmt: skip
def test_python_build_int8_per_release_against_a_stand_in(monkeypatch, tmp_path, version, network, builder_flags):
    """8.x/9.x: explicit batch + the INT8 flag (no STRONGLY_TYPED there); 10: STRONGLY_TYPED; 11: no BuilderFlag.INT8 touched."""
    info, calls = _build(monkeypatch, tmp_path, version)
    assert ("network", network) in calls and [c[1] for c in calls if c[0] == "flag"] == builder_flags
    assert ("input_shape", SHAPES[1]) in calls and ("profile", ("input", SHAPES)) in calls
    assert info["tensorrt_version"] == version and (tmp_path / "model.plan").read_bytes() == b"plan"


def test_python_build_fp16_and_mixed_precision_flags(monkeypatch, tmp_path):
    _, calls = _build(monkeypatch, tmp_path, "8.6.2", "fp16")
    assert [c[1] for c in calls if c[0] == "flag"] == [0]  # FP16
    mixed = build_flags("int8", "8.6", graph_for("int8", "8.6"), has_float_layers=True)
    _, calls = _build(monkeypatch, tmp_path, "8.6.2", "int8", flags=mixed)
    assert [c[1] for c in calls if c[0] == "flag"] == [1, 0]  # INT8, FP16
    info, calls = _build(monkeypatch, tmp_path, "11.0.0", "fp16")  # strongly typed FP16 graph: no flag to set
    assert info["strongly_typed"] is True and not [c for c in calls if c[0] == "flag"]


def test_python_build_refuses_tensorrt_below_8_5_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="needs TensorRT >= 8.5") as exc:
        _build(monkeypatch, tmp_path, "8.4.3")
    assert "\n" not in str(exc.value)


def test_a_rejected_timing_cache_is_replaced_with_a_warning(monkeypatch, tmp_path, caplog):
    (tmp_path / "timing.cache").write_bytes(b"from another gpu")
    with caplog.at_level(logging.WARNING, logger="edgerepvgg.targets.tensorrt"):
        _, calls = _build(monkeypatch, tmp_path, "10.3.0", cache_ok=False)
    assert [c[1] for c in calls if c[0] == "timing_cache"] == [b"from another gpu", b""]
    assert "rejected the timing cache" in caplog.text and (tmp_path / "timing.cache").read_bytes() == b"fresh-cache"


def test_mixed_precision_spec_on_tensorrt_8_sets_fp16_in_the_script(plain, spec, tmp_path):
    art = TensorRTTarget(version="8.6").compile(plain, with_float_layers(spec, ["convs.2"]), tmp_path, "int8")
    assert "--int8 --fp16" in (tmp_path / "build_engine.sh").read_text() and art.info["builder_flags"] == ["INT8", "FP16"]
