"""Calibration: statistics collected once and cached, specs made from them deterministically."""

from __future__ import annotations

import pytest
import torch

import edgerepvgg.quant.calibrate as cal
from edgerepvgg import UserError
from edgerepvgg.data import TensorDataset
from edgerepvgg.quant import CONSTRAINT_SETS, constraints_for
from edgerepvgg.quant.calibrate import cached_stats, calibrate, input_range, make_spec

from quant_helpers import tiny_plain


def images(plain, n: int = 12, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    s = plain.input_spec
    x = torch.randint(0, 256, (n, s.channels, s.size, s.size), generator=gen, dtype=torch.uint8)
    return TensorDataset(x, torch.full((n,), -1), s, "random test images")


def test_network_input_range_comes_from_the_input_spec_not_the_data():
    plain = tiny_plain()
    lo, hi = input_range(plain.input_spec)
    assert (lo, hi) == pytest.approx((-1.0, 1.0))  # mean 0.5, std 0.5
    dark = images(plain)
    dark.images //= 8  # the data covers an eighth of the range; the quantizer still covers it all
    for method in ("minmax", "entropy"):
        spec = calibrate(plain, dark, CONSTRAINT_SETS["openvino"], method, progress=False, cache=False)
        q = spec.layer("convs.0").input
        assert q.scale[0] == pytest.approx(2.0 / 255) and q.zero_point[0] in (127, 128)


def test_statistics_are_cached_and_reused(tmp_path, monkeypatch):
    plain = tiny_plain()
    data = images(plain)
    first = cached_stats(plain, data, progress=False, cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(cal, "collect_stats", must_not_run)
    again = cached_stats(plain, data, progress=False, cache=tmp_path)
    assert again.to_json() == first.to_json()
    # Other images: another cache entry, so the model must run.
    with pytest.raises(AssertionError, match="ran again"):
        cached_stats(plain, images(plain, seed=1), progress=False, cache=tmp_path)


def test_methods_and_constraint_sets_from_one_pass_are_deterministic(tmp_path):
    plain = tiny_plain()
    stats = cal.collect_stats(plain, images(plain), progress=False)
    # Every method once, every constraint set once (MSE and entropy cost ~0.5 s a tensor here).
    pairs = (("tensorrt", "entropy"), ("openvino", "mse"), ("tflite", "percentile"), ("onnxruntime", "minmax"))
    for name, method in pairs:
        c = CONSTRAINT_SETS[name]
        a = make_spec(plain, stats, c, method).to_json()
        b = make_spec(plain, cal.CalibrationStats.from_json(stats.to_json()), c, method).to_json()
        assert a == b, (name, method)


def test_the_spec_does_not_depend_on_how_many_threads_search_the_ranges():
    """make_spec searches the activation points concurrently, one thread per core; the result is the
    serial one, byte for byte, as is a minmax weight scale taken without a float64 copy."""
    plain = tiny_plain()
    stats = cal.collect_stats(plain, images(plain), progress=False)
    before = torch.get_num_threads()
    try:
        specs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            specs.append(make_spec(plain, stats, CONSTRAINT_SETS["openvino"], "mse").to_json())
    finally:
        torch.set_num_threads(before)
    assert specs[0] == specs[1]
    w = plain.convs[3].weight.detach()
    reference = (w.double().abs().reshape(w.shape[0], -1).amax(dim=1) / 127).float()
    assert torch.equal(cal.weight_scales(w, CONSTRAINT_SETS["tensorrt"].weight, "minmax"), reference)


def test_per_tensor_weights_share_one_scale_per_layer():
    plain = tiny_plain()
    stats = cal.collect_stats(plain, images(plain), progress=False)
    spec = make_spec(plain, stats, CONSTRAINT_SETS["tensorrt"], cal.NAIVE)
    assert all(len(set(layer.weight.scale)) == 1 for layer in spec.layers)
    per_channel = make_spec(plain, stats, CONSTRAINT_SETS["tensorrt"], "minmax")
    assert any(len(set(layer.weight.scale)) > 1 for layer in per_channel.layers)


def test_statistics_of_another_model_are_refused():
    plain, other = tiny_plain(0), tiny_plain(1)
    stats = cal.collect_stats(plain, images(plain), progress=False)
    with pytest.raises(UserError, match="another model"):
        make_spec(other, stats, CONSTRAINT_SETS["tensorrt"])


def test_unknown_method_is_a_user_error():
    plain = tiny_plain()
    stats = cal.collect_stats(plain, images(plain, n=2), progress=False)
    with pytest.raises(UserError, match="unknown calibration method 'kl'"):
        make_spec(plain, stats, CONSTRAINT_SETS["tensorrt"], "kl")


def test_calibration_config_is_validated_and_recorded_in_the_spec():
    from dataclasses import FrozenInstanceError

    config = cal.CalibrationConfig("percentile", "mse", percentile=99.9)
    assert config.record() == {"method": "percentile", "weight_method": "mse", "percentile": 99.9}
    assert cal.CalibrationConfig.of("entropy") == cal.CalibrationConfig(method="entropy")
    with pytest.raises(FrozenInstanceError):
        config.method = "minmax"  # type: ignore[misc]
    for bad, match in ((dict(method="kl"), "unknown calibration method"), (dict(weight_method="l1"), "unknown weight method"),
                       (dict(percentile=0.0), "percentile must be in")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            cal.CalibrationConfig(**bad)
    plain = tiny_plain()
    stats = cal.collect_stats(plain, images(plain), progress=False)
    spec = make_spec(plain, stats, CONSTRAINT_SETS["tensorrt"], config)
    assert {k: spec.calibration[k] for k in ("method", "weight_method", "percentile")} == config.record()


@pytest.mark.parametrize("percentile", [40.0, 50.0, 100.5, float("nan")])
def test_percentile_outside_what_the_observer_computes_is_refused_by_the_config(percentile):
    """The observer needs (50, 100]; the config enforces exactly that, naming value and range."""
    with pytest.raises(UserError, match=r"--percentile must be in \(50, 100\], got") as err:
        cal.CalibrationConfig(method="percentile", percentile=percentile)
    assert "\n" not in str(err.value)


def test_percentile_at_the_bounds_calibrates():
    plain = tiny_plain()
    stats = cal.collect_stats(plain, images(plain, n=2), progress=False)
    for p in (50.001, 100):
        spec = make_spec(plain, stats, CONSTRAINT_SETS["tensorrt"], cal.CalibrationConfig("percentile", percentile=p))
        assert spec.calibration["percentile"] == p


def test_calibrate_takes_a_constraint_set_name(tmp_path):
    plain = tiny_plain()
    data = images(plain, n=2)
    by_name = calibrate(plain, data, "openvino", "minmax", progress=False, cache=tmp_path)
    by_value = calibrate(plain, data, constraints_for("openvino"), "minmax", progress=False, cache=tmp_path)
    assert by_name == by_value
    with pytest.raises(UserError, match="unknown constraint set 'tpu'"):
        calibrate(plain, data, "tpu", progress=False, cache=tmp_path)


def test_stats_for_is_the_one_cache_decision(tmp_path, monkeypatch):
    plain = tiny_plain()
    data = images(plain, n=2)
    cached = cal.stats_for(plain, data, progress=False, cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(cal, "collect_stats", lambda *a, **k: pytest.fail("the cache was not used"))
    assert cal.stats_for(plain, data, progress=False, cache=tmp_path).to_json() == cached.to_json()
    calls = []
    monkeypatch.setattr(cal, "collect_stats", lambda *a, **k: calls.append(a) or cached)
    cal.stats_for(plain, data, progress=False, cache=False)
    assert len(calls) == 1  # cache=False: collected afresh, nothing read
