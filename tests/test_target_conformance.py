"""The Target contract, run on every registered target (after timm's tests/test_models.py, which
runs the same tests over ``list_models()``): declared capabilities, atomic artifacts, metadata
read back from the artifact, FP32 equal to PlainNet, INT8 agreeing with the integer referee, and
the standard refusals as one-line UserErrors. A new target gets all of it by being registered.

A case whose runtime is missing here is skipped with the target's own reason, except where the
target compiles without its runtime (TensorRT without a GPU): then its emulated runner is what
runs, the test id says ``-emulated``, and the tests assert ``runner.emulated is True``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerepvgg import UserError
from edgerepvgg.evaluate import agreement, predict
from edgerepvgg.quant import constraints_for
from edgerepvgg.quant.emulate import IntegerNet
from edgerepvgg.quant.spec import CONSTRAINT_SETS, model_hash
from edgerepvgg.targets import (
    Artifact,
    ArtifactMetadata,
    FixedBatchRunner,
    Runner,
    Target,
    compile_with_batch,
    get_target,
    list_targets,
    target_names,
)

from helpers import random_batch
from quant_helpers import minmax_spec, tiny_plain

PRECISIONS = {"fp32", "fp16", "int8"}


def _cases() -> list:
    """One case per registered target: skipped where it can neither run nor compile here,
    ``<name>-emulated`` where it compiles without its runtime and an emulation runs instead."""
    cases = []
    for name in target_names():
        target = get_target(name)
        reason = target.available()
        emulated = reason is not None and target.compiles_without_runtime
        skip = pytest.mark.skipif(reason is not None and not emulated, reason=f"{name} does not run here: {reason}")
        cases.append(pytest.param(name, id=f"{name}-emulated" if emulated else name, marks=skip))
    return cases


CASES = _cases()


@pytest.fixture(params=CASES)
def target(request) -> Target:
    return get_target(request.param)


def _emulated_here(target: Target) -> bool:
    return target.available() is not None


def _spec(target: Target, plain, x: torch.Tensor | None = None):
    return minmax_spec(plain, constraints_for(target.constraint_set), x)


def _leftovers(out_dir: Path) -> list[str]:
    """Temporary files or folders a writer left behind (atomic writes use hidden ``.name.*``)."""
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ---------------------------------------------------------------------------------------------
# Declared capabilities (checked everywhere, runtime or not)


@pytest.mark.parametrize("name", target_names())
def test_declares_every_protocol_attribute_with_its_type(name):
    target = get_target(name)
    assert target.name == name
    assert target.constraint_set in CONSTRAINT_SETS
    assert isinstance(target.precisions, tuple) and "fp32" in target.precisions and set(target.precisions) <= PRECISIONS
    assert isinstance(target.description, str) and target.description and "\n" not in target.description
    assert type(target.supports_fixed_batch) is bool and type(target.compiles_without_runtime) is bool
    for method in ("available", "compile", "load", "metadata"):
        assert callable(getattr(target, method)), method
    batch = inspect.signature(target.compile).parameters["batch"]
    assert batch.kind is inspect.Parameter.KEYWORD_ONLY and batch.default is None


@pytest.mark.parametrize("name", target_names())
def test_available_is_none_or_a_one_line_reason(name):
    reason = get_target(name).available()
    assert reason is None or (isinstance(reason, str) and reason and "\n" not in reason)


@pytest.mark.parametrize("name", target_names())
def test_list_targets_reports_what_the_target_declares(name):
    target = get_target(name)
    status = {s.name: s for s in list_targets()}[name]
    assert (status.description, status.precisions, status.constraint_set) == (target.description, target.precisions, target.constraint_set)
    assert status.reason == target.available() and status.available == (target.available() is None)


def test_unknown_target_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(UserError, match="unknown target 'tpu'; choose one of onnxruntime") as exc:
        get_target("tpu")
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# The artifact on disk


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compile_writes_every_artifact_file_and_no_temporaries(target, plain, tmp_path, precision):
    spec = _spec(target, plain) if precision == "int8" else None
    art = target.compile(plain, spec, tmp_path, precision)
    assert isinstance(art, Artifact) and (art.target, art.precision) == (target.name, precision)
    assert art.path.is_file() and all(f.is_file() for f in art.files) and art.size_bytes > 0
    assert all(f.parent == tmp_path for f in art.files)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_compile_interrupted_at_any_file_commit_leaves_no_artifact(target, plain, tmp_path, monkeypatch, precision):
    """Every file lands by ``os.replace``; a KeyboardInterrupt at each of them in turn leaves no
    artifact entry point (``path`` is written last) and no temporaries."""
    spec = _spec(target, plain) if precision == "int8" else None
    real_replace = os.replace
    calls = 0

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real_replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", counting)
    art = target.compile(plain, spec, tmp_path / "complete", precision)
    n_commits = calls
    assert n_commits >= 1

    for k in range(1, n_commits + 1):
        out = tmp_path / f"interrupted-{k}"
        seen = 0

        def interrupted(*args, **kwargs):
            nonlocal seen
            seen += 1
            if seen == k:
                raise KeyboardInterrupt
            return real_replace(*args, **kwargs)

        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            target.compile(plain, spec, out, precision)
        assert not (out / art.path.name).exists(), f"commit {k} of {n_commits} left {art.path.name}"
        assert _leftovers(out) == [], f"commit {k} of {n_commits}"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_metadata_read_back_names_the_model_and_the_spec(target, plain, tmp_path, precision):
    spec = _spec(target, plain) if precision == "int8" else None
    art = target.compile(plain, spec, tmp_path, precision)
    meta = target.metadata(art)
    assert isinstance(meta, ArtifactMetadata)
    assert meta.model_hash == model_hash(plain)
    assert meta.spec_sha256 == (spec.sha256 if spec is not None else None)
    assert meta.constraints == (spec.constraints.name if spec is not None else None)
    assert meta.input_spec == plain.input_spec


# ---------------------------------------------------------------------------------------------
# Numerics on a tiny model


def test_fp32_runner_equals_the_plain_net(target, plain, tmp_path, one_thread):
    runner = target.load(target.compile(plain, None, tmp_path), threads=1)
    assert isinstance(runner, Runner) and runner.emulated is _emulated_here(target)
    x = random_batch(plain, 8, seed=1)
    got = runner(x)
    with torch.no_grad():
        ref = plain(torch.from_numpy(x)).numpy()
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (8, plain.num_classes)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_int8_runner_agrees_with_the_integer_net(target, plain, tmp_path, one_thread):
    x = torch.from_numpy(random_batch(plain, 64, seed=3)).clamp(-2.5, 2.5)
    spec = _spec(target, plain, x)
    runner = target.load(target.compile(plain, spec, tmp_path, "int8"), threads=1)
    assert isinstance(runner, Runner) and runner.emulated is _emulated_here(target)
    a = agreement(torch.from_numpy(runner(x.numpy())), IntegerNet(plain, spec)(x))
    assert a.top1 >= 0.95 and a.cosine > 0.999, a


# Rectangular inputs (height != width), odd sides included: every stride-2 conv pads differently
# in TFLite (PAD + VALID) than a square of even side would exercise.
SHAPES = [pytest.param((48, 64), id="48x64"), pytest.param((17, 30), id="17x30")]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_rectangular_input_runs_fp32_and_int8_like_the_plain_and_the_integer_net(target, shape, tmp_path, one_thread):
    rect = tiny_plain(seed=0, size=shape, classes=5).eval()
    x = torch.from_numpy(random_batch(rect, 16, seed=3)).clamp(-2.5, 2.5)
    fp32 = target.compile(rect, None, tmp_path / "fp32")
    assert target.metadata(fp32).input_spec == rect.input_spec and rect.input_spec.hw == shape
    with torch.no_grad():
        ref = rect(x).numpy()
    np.testing.assert_allclose(target.load(fp32, threads=1)(x.numpy()), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    spec = _spec(target, rect, x)
    int8 = target.compile(rect, spec, tmp_path / "int8", "int8")
    assert target.metadata(int8).input_spec == rect.input_spec
    got = target.load(int8, threads=1)(x.numpy())
    assert got.shape == (16, 5)
    a = agreement(torch.from_numpy(got), IntegerNet(rect, spec)(x))
    assert a.top1 >= 0.95 and a.cosine > 0.999, a


def test_fixed_batch_is_built_where_declared_and_refused_elsewhere(target, plain, tmp_path, one_thread):
    if not target.supports_fixed_batch:
        with pytest.raises(UserError, match="cannot fix the batch") as exc:
            target.compile(plain, None, tmp_path, batch=4)
        assert "\n" not in str(exc.value) and not any(tmp_path.iterdir())
        return
    runner = target.load(compile_with_batch(target, plain, None, tmp_path, "fp32", 4), threads=1)
    fixed = FixedBatchRunner(runner, 4)
    assert fixed.emulated is runner.emulated is _emulated_here(target)
    x = random_batch(plain, 10, seed=2)  # two full chunks and one padded
    with torch.no_grad():
        ref = plain(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fixed(x), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_predict_hands_the_runner_numpy_batches(target, plain, tmp_path):
    from quant_helpers import self_labelled

    runner = target.load(target.compile(plain, None, tmp_path), threads=1)
    seen: list[type] = []

    class Recording:
        emulated = runner.emulated

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            seen.append(type(batch))
            return runner(batch)

    logits = predict(Recording(), self_labelled(plain, 10), batch_size=4)
    assert seen == [np.ndarray] * 3 and logits.shape == (10, plain.num_classes)


# ---------------------------------------------------------------------------------------------
# Refusals: one line each, nothing written


def _refused(call, match: str, out_dir: Path) -> None:
    with pytest.raises(UserError, match=match) as exc:
        call()
    assert "\n" not in str(exc.value)
    assert not out_dir.exists() or not any(p.is_file() for p in out_dir.rglob("*")), sorted(out_dir.rglob("*"))


def test_a_precision_the_target_does_not_build_is_refused(target, plain, tmp_path):
    missing = sorted(PRECISIONS - set(target.precisions)) or ["int4"]
    _refused(lambda: target.compile(plain, None, tmp_path, missing[0]), f"not '{missing[0]}'", tmp_path)


def test_int8_without_a_spec_is_refused(target, plain, tmp_path):
    _refused(lambda: target.compile(plain, None, tmp_path, "int8"), "needs a QuantSpec", tmp_path)


def test_a_spec_made_for_another_model_is_refused(target, plain, tmp_path):
    other = _spec(target, tiny_plain(seed=1, size=16, classes=5))
    _refused(lambda: target.compile(plain, other, tmp_path, "int8"), "another model", tmp_path)


def test_a_fixed_batch_below_one_is_refused(target, plain, tmp_path):
    if target.supports_fixed_batch:
        _refused(lambda: compile_with_batch(target, plain, None, tmp_path, "fp32", 0), "at least 1", tmp_path)
    else:
        _refused(lambda: compile_with_batch(target, plain, None, tmp_path, "fp32", 0), "cannot fix the batch", tmp_path)


# ---------------------------------------------------------------------------------------------
# The bundled model on the bundled evaluation images


@pytest.mark.slow
def test_bundled_model_int8_agrees_with_the_integer_net(target, tmp_path, one_thread):
    from edgerepvgg import fuse, load_checkpoint
    from edgerepvgg.data import bundled_eval_dir, calibration_images, evaluation_set
    from edgerepvgg.evaluate import topk_accuracy
    from edgerepvgg.quant.calibrate import calibrate

    model, meta = load_checkpoint()
    plain, _ = fuse(model, meta.input_spec)
    spec = calibrate(plain, calibration_images(meta.input_spec), constraints_for(target.constraint_set), "minmax",
                     progress=False, cache=False)  # fmt: skip
    data = evaluation_set(meta.input_spec, bundled_eval_dir())
    assert len(data) == 1000
    runner = target.load(target.compile(plain, spec, tmp_path, "int8"), threads=1)
    assert runner.emulated is _emulated_here(target)
    got = predict(runner, data, batch_size=250)
    a = agreement(got, predict(IntegerNet(plain, spec), data, batch_size=250))
    assert a.top1 >= 0.998, a
    assert topk_accuracy(got, data.labels) > 0.85  # the bundled model's FP32 top-1 is 92%
