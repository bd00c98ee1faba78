"""Packaging: what pyproject.toml promises (honest bounds, runtimes as extras, an SPDX licence),
the 3.10 floor checked statically the way CI does, package data found without symlinks, and the
wheel itself: its file list, a build without warnings, and an install in a fresh venv that runs
``edgerepvgg targets`` and one small export from outside the checkout."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgerepvgg import data, profiles

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CI_RUN = ROOT / ".ci" / "run"
TORCH_PIN = "torch==2.13.0"  # README's and .ci/run's pin: the CPU build on these machines' disk
# The source tree a wheel is built from: what an sdist or a fresh clone holds (no symlinks).
SOURCE_PATHS = ("pyproject.toml", "LICENSE", "README.md", "calibration", "targets", "edgerepvgg")

needs_checkout = pytest.mark.skipif(not PYPROJECT.is_file(), reason="not run from a source checkout (no pyproject.toml)")


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def _clean_env() -> dict[str, str]:
    """The environment for child tools: no PYTHONPATH (it would import the checkout) and
    bytecode allowed (with PYTHONDONTWRITEBYTECODE, setuptools warns that it skips byte-compiling)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# pyproject.toml says the truth


@needs_checkout
def test_every_subpackage_of_the_source_is_listed_for_the_wheel():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    source = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgerepvgg").rglob("__init__.py")}
    assert source <= listed, f"add {sorted(source - listed)} to [tool.setuptools] packages"


@needs_checkout
def test_core_dependencies_are_what_import_fuse_and_calibrate_need():
    deps = {_name(r): r for r in _pyproject()["project"]["dependencies"]}
    # runtimes, the simplifier and plotting are extras: each can be missing (a skipped row)
    assert not {"onnxruntime", "onnxruntime-gpu", "openvino", "onnxsim", "matplotlib", "tensorrt", "ai-edge-litert"} & set(deps)
    torch = deps["torch"]
    assert "<" not in torch and "~=" not in torch and "==" not in torch, f"torch has an upper bound or pin: {torch}"
    assert re.fullmatch(r"torch>=2\.5", torch.replace(" ", "")), "safe_globals (checkpoints.py) needs torch 2.5"
    assert "tomli" in deps and "python_version" in deps["tomli"] and "3.11" in deps["tomli"]


@needs_checkout
def test_every_requirement_line_carries_its_reason():
    """Each bound is justified in a comment on its own line of pyproject.toml."""
    text = PYPROJECT.read_text()
    block = re.search(r"^dependencies = \[\n(.*?)^\]", text, re.S | re.M).group(1)
    lines = [line for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines and all("#" in line for line in lines), [line for line in lines if "#" not in line]
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    rows = [line for line in extras.splitlines() if re.match(r"^[a-z]+ = \[", line)]
    assert len(rows) == len(_pyproject()["project"]["optional-dependencies"])
    assert all("#" in line for line in rows), [line for line in rows if "#" not in line]


@needs_checkout
def test_extras_name_each_runtime_and_cpu_covers_the_cpu_host():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"onnxruntime", "openvino", "tflite", "tensorrt", "cpu", "plots", "dev"} <= set(extras)
    assert {_name(r) for r in extras["onnxruntime"]} == {"onnxruntime"}
    assert {_name(r) for r in extras["plots"]} == {"matplotlib"}
    assert {"pytest", "hypothesis", "vermin", "build"} <= {_name(r) for r in extras["dev"]}
    cpu = " ".join(extras["cpu"])
    for extra in ("onnxruntime", "openvino", "tflite", "plots"):
        assert re.search(rf"edgerepvgg\[[^\]]*\b{extra}\b", cpu), f"the cpu extra misses {extra}"
    assert "onnxsim" in {_name(r) for r in extras["cpu"]}
    assert "tensorrt" not in cpu  # not a CPU runtime


@needs_checkout
def test_licence_is_an_spdx_expression_with_its_files():
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] and all((ROOT / f).is_file() for f in project["license-files"])
    build = " ".join(_pyproject()["build-system"]["requires"])
    assert re.search(r"setuptools>=(7[7-9]|[89]\d)", build), "SPDX license strings need setuptools>=77"


@needs_checkout
def test_readme_and_ci_install_the_same_extras_and_pin_torch():
    readme = (ROOT / "README.md").read_text()
    ci = CI_RUN.read_text()
    assert f"pip install {TORCH_PIN}" in readme and f"pip install -q {TORCH_PIN}" in ci
    assert "-e '.[cpu]'" in readme and "-e '.[cpu,dev]'" in readme and "-e '.[cpu,dev]'" in ci


# ---------------------------------------------------------------------------------------------
# Messages that name the extra


def test_missing_onnxruntime_names_the_extra_and_other_builds(monkeypatch):
    from edgerepvgg.targets import onnxruntime as ort_target

    real = importlib.util.find_spec
    monkeypatch.setattr(ort_target.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    why = ort_target.OnnxRuntimeTarget().available()
    assert why and "pip install 'edgerepvgg[onnxruntime]'" in why and "onnxruntime-gpu" in why and "\n" not in why


def test_missing_litert_names_the_extra(monkeypatch):
    from edgerepvgg.targets import tflite

    def fail(name, *a):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(tflite.importlib, "import_module", fail)
    why = tflite.TFLiteTarget().available()
    assert why and "pip install 'edgerepvgg[tflite]'" in why and "\n" not in why


# ---------------------------------------------------------------------------------------------
# Python 3.10, statically (CI's vermin line, read from .ci/run)


def _vermin_line() -> list[str]:
    line = next(line for line in CI_RUN.read_text().splitlines() if line.startswith(".venv/bin/vermin "))
    args = shlex.split(line)[1:-1]  # the flags; the last word is the folder
    exe = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if exe is None:
        pytest.skip("vermin is not installed (pip install -e '.[dev]')")
    return [exe, *args]


@needs_checkout
def test_package_passes_the_python_310_check():
    run = subprocess.run([*_vermin_line(), str(ROOT / "edgerepvgg")], capture_output=True, text=True, env=_clean_env())
    assert run.returncode == 0, run.stdout + run.stderr


@needs_checkout
def test_python_310_check_fails_on_a_311_module(tmp_path):
    """The same line catches what broke 3.10 before: an unguarded ``import tomllib`` (3.11)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import tomli as tomllib\n")
    ok = subprocess.run([*_vermin_line(), str(pkg)], capture_output=True, text=True, env=_clean_env())
    assert ok.returncode == 0, ok.stdout + ok.stderr  # a version guard is not a violation
    (pkg / "bad.py").write_text("import tomllib\n")
    bad = subprocess.run([*_vermin_line(), str(pkg)], capture_output=True, text=True, env=_clean_env())
    assert bad.returncode != 0 and "tomllib" in bad.stdout, bad.stdout + bad.stderr


# ---------------------------------------------------------------------------------------------
# Package data, found in this install (editable in CI), and no symlinks in the tree


def test_bundled_images_and_profiles_are_found_in_this_install():
    assert len(list(data.bundled_calibration_dir().glob("*.png"))) == 256
    eval_dir = data.bundled_eval_dir()
    assert len([d for d in eval_dir.iterdir() if d.is_dir()]) == 10 and len(list(eval_dir.glob("*/*.png"))) == 1000
    names = {p.stem for p in profiles.shipped_profiles()}
    assert {"cpu-onnxruntime-int8", "jetson-orin-tensorrt-int8"} <= names
    if PYPROJECT.is_file():
        assert names == {p.stem for p in (ROOT / "targets").glob("*.toml")}


@needs_checkout
def test_no_symlinks_in_the_tracked_tree():
    """A Windows checkout cannot make symlinks: package data must not come from them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line.split("\t")[1] for line in listing.splitlines() if line.startswith("120000 ")] == []


# ---------------------------------------------------------------------------------------------
# The wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """Build the wheel from a copy of the source tree (what a fresh clone holds, no build/ left
    in the checkout); returns the wheel and the build's output."""
    if not PYPROJECT.is_file():
        pytest.skip("not run from a source checkout (no pyproject.toml)")
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' frontend is not installed (pip install -e '.[dev]')")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCE_PATHS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
                         capture_output=True, text=True, env=_clean_env())  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    (whl,) = out.glob("edgerepvgg-*.whl")
    return whl, log


@pytest.mark.slow
def test_wheel_builds_without_warnings(wheel):
    _, log = wheel
    # file names in "copying ..."/"adding ..." lines are not warnings
    warnings = [line for line in log.splitlines() if re.search(r"warn", line, re.I) and not re.match(r"\s*(copying|adding) ", line)]
    assert warnings == [], "\n".join(warnings)


@pytest.mark.slow
def test_wheel_holds_every_module_image_profile_and_weight(wheel):
    whl, _ = wheel
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    expected = {f"edgerepvgg/_bundled/{p.relative_to(ROOT / 'calibration').as_posix()}"
                for p in (ROOT / "calibration").rglob("*") if p.is_file() and p.suffix in (".png", ".md")}  # fmt: skip
    assert sum(n.endswith(".png") for n in expected) == 256 + 1000
    expected |= {f"edgerepvgg/_profiles/{p.name}" for p in (ROOT / "targets").glob("*.toml")}
    expected |= {f"edgerepvgg/weights/{p.name}" for p in (ROOT / "edgerepvgg" / "weights").glob("*.safetensors")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "edgerepvgg").rglob("*.py")}  # a subpackage left out of pyproject's list fails here
    assert expected - names == set()
    assert "License-Expression: MIT" in metadata
    assert not [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch") and "<" in line]


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_exports_from_outside_the_checkout(wheel, tmp_path):
    """``pip install torch==2.13.0`` then ``wheel[cpu]`` into a new venv; ``edgerepvgg targets``
    and an INT8 ONNX Runtime export (bundled calibration and eval images, from the wheel) run
    from a folder outside the checkout. About 2-3 minutes on 2 cores, most of it pip."""
    whl, _ = wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python, env = bin_dir / "python", _clean_env()
    torch = subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH_PIN], capture_output=True, text=True, env=env)
    if torch.returncode != 0 and re.search(r"No matching distribution|Could not find a version", torch.stdout + torch.stderr):
        pytest.skip(f"{TORCH_PIN} is not available to pip on this machine (README's pin; an unpinned torch pulls GBs)")
    assert torch.returncode == 0, torch.stdout + torch.stderr
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{whl}[cpu]"], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"  # not the checkout: nothing there to import by accident
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import edgerepvgg, edgerepvgg.data as d, edgerepvgg.profiles as p; "
         "print(edgerepvgg.__file__); print(d.bundled_calibration_dir()); print(d.bundled_eval_dir()); "
         "print(len(p.shipped_profiles()))"],
        cwd=work, capture_output=True, text=True, env=env, check=True).stdout.split("\n")  # fmt: skip
    module, calib, eval_dir, n_profiles = where[:4]
    site = venv.resolve()
    for path in (module, calib, eval_dir):
        assert Path(path).resolve().is_relative_to(site), f"{path} is not inside the fresh venv {site}"
    assert int(n_profiles) == len(list((ROOT / "targets").glob("*.toml")))

    cli = bin_dir / "edgerepvgg"
    targets = subprocess.run([str(cli), "targets"], cwd=work, capture_output=True, text=True, env=env)
    assert targets.returncode == 0, targets.stdout + targets.stderr
    assert re.search(r"^onnxruntime\s+available", targets.stdout, re.M), targets.stdout

    export = subprocess.run([str(cli), "export", "--target", "onnxruntime", "--int8", "--eval-images", eval_dir,
                             "--eval-limit", "100", "--no-latency", "-q", "-o", "out"],
                            cwd=work, capture_output=True, text=True, env=env)  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr
    assert (work / "out" / "model.onnx").is_file() and (work / "out" / "report.json").is_file()
