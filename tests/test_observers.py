"""Calibration observers against hand-computed values and straightforward reference implementations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edgerepvgg.errors import UserError
from edgerepvgg.quant.observers import (
    RANGE_METHODS,
    Histogram,
    activation_range,
    entropy_levels,
    entropy_threshold,
    kl_divergences,
    mse_errors,
    weight_scales,
)
from edgerepvgg.quant.spec import CONSTRAINT_SETS, Scheme, qparams

INT8 = Scheme(8, signed=True, symmetric=True)  # TensorRT activations
UINT8 = Scheme(8, signed=False, symmetric=False)  # OpenVINO / ONNX Runtime activations
INT8_AFFINE = Scheme(8, signed=True, symmetric=False)  # TFLite activations
W8 = Scheme(8, signed=True, symmetric=True, per_channel=True)


def hist_of(*batches, bins: int = 2048) -> Histogram:
    h = Histogram(bins)
    for b in batches:
        h.update(torch.as_tensor(b))
    return h


# ---------------------------------------------------------------------------------------------
# Histogram


def test_histogram_bins_by_hand():
    # max|x| = 3.9 -> R = 4 (smallest power of two above it), 8 bins per sign -> w = 0.5
    h = hist_of(torch.tensor([0.0, 0.5, 1.0, 3.0, 0.49, -0.25, -3.9, -0.0]), bins=8)
    assert (h.min, h.max, h.count, h.zeros) == (-3.9 if False else float(torch.tensor(-3.9)), 3.0, 8, 2)
    assert h.limit == 4.0 and h.width == 0.5
    assert h.pos.tolist() == [3, 1, 1, 0, 0, 0, 1, 0]  # {0, 0.49, -0.0}, {0.5}, {1.0}, {3.0}
    assert h.neg.tolist() == [1, 0, 0, 0, 0, 0, 0, 1]  # {-0.25}, {-3.9}
    assert h.edges().tolist() == [0.5 * k for k in range(-8, 9)]
    assert h.counts().tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 3, 1, 1, 0, 0, 0, 1, 0]


def test_histogram_power_of_two_max_goes_to_next_range():
    h = hist_of(torch.tensor([1.0, 2.0]), bins=4)  # R must be > 2.0: R = 4, w = 1
    assert h.limit == 4.0 and h.pos.tolist() == [0, 1, 1, 0]


def test_histogram_exact_statistics_and_counts_sum():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 7, generator=gen) * (k + 1) for k in range(4)]
    h = hist_of(*batches)
    everything = torch.cat([b.reshape(-1) for b in batches])
    assert h.min == float(everything.min()) and h.max == float(everything.max())
    assert h.count == everything.numel() == int(h.counts().sum())
    amax = float(everything.abs().max())
    assert h.limit / 2 <= amax < h.limit  # the resolution guarantee
    assert h.width == h.limit / h.bins


def test_histogram_matches_numpy_histogram_at_final_width():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(5000, generator=gen, dtype=torch.float64) * 6 - 2  # in [-2, 4): R = 4
    h = hist_of(x[:100] * 0.01, x[100:], bins=256)  # first batch tiny: forces regrowth by 2^9
    data = torch.cat([x[:100] * 0.01, x[100:]]).numpy()
    pos, _ = np.histogram(data[data >= 0], bins=256, range=(0, 4))
    neg, _ = np.histogram(-data[data < 0], bins=256, range=(0, 4))
    assert h.pos.tolist() == pos.tolist() and h.neg.tolist() == neg.tolist()


def test_same_data_any_split_or_order_gives_identical_dict():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6000, generator=gen) * torch.logspace(-3, 1, 6000)  # growing scale: many regrowths
    one = hist_of(x).to_dict()
    chunks = hist_of(*x.split(700)).to_dict()
    perm = torch.randperm(6000, generator=gen)
    shuffled = hist_of(*x[perm].split(333)).to_dict()
    reversed_ = hist_of(*reversed(x.split(1000))).to_dict()
    assert json.dumps(one) == json.dumps(chunks) == json.dumps(shuffled) == json.dumps(reversed_)


def test_regrowth_keeps_every_count():
    h = hist_of(torch.full((10,), 0.3), bins=16)  # R = 0.5
    assert h.limit == 0.5 and h.pos.sum() == 10
    h.update(torch.tensor([100.0, -7.0]))  # R = 128: 0.3 falls into bin 0 after merging 2^8 pairs
    assert h.limit == 128.0 and h.count == 12 == h.counts().sum()
    assert h.pos[0] == 10 and h.pos[12] == 1 and h.neg[0] == 1  # 100 // 8 = 12, 7 // 8 = 0


def test_merge_equals_one_stream():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(500, generator=gen), torch.randn(300, generator=gen) * 50
    merged = hist_of(a, bins=64).merge(hist_of(b, bins=64))
    assert merged.to_dict() == hist_of(a, b, bins=64).to_dict()
    assert hist_of(b, bins=64).merge(hist_of(a, bins=64)).to_dict() == merged.to_dict()


def test_zeros_first_then_values():
    h = hist_of(torch.zeros(5), torch.tensor([0.0, 3.0]), bins=8)
    assert h.zeros == 6 and h.pos[0] == 6 and h.count == 7 and h.limit == 4.0
    assert hist_of(torch.tensor([3.0]), torch.zeros(6), bins=8).to_dict() == h.to_dict()


def test_round_trip_through_json():
    gen = torch.Generator().manual_seed(4)
    h = hist_of(torch.relu(torch.randn(2, 8, 9, 9, generator=gen)), torch.randn(50, generator=gen) * 3)
    text = json.dumps(h.to_dict())
    back = Histogram.from_dict(json.loads(text))
    assert json.dumps(back.to_dict()) == text
    assert np.array_equal(back.counts(), h.counts()) and np.array_equal(back.edges(), h.edges())
    assert (back.min, back.max, back.count, back.zeros) == (h.min, h.max, h.count, h.zeros)
    for method in RANGE_METHODS:
        assert activation_range(back, method, INT8) == activation_range(h, method, INT8)
    empty = Histogram.from_dict(json.loads(json.dumps(Histogram().to_dict())))
    assert empty.count == 0 and empty.exponent is None


def test_post_relu_dict_is_compact():
    d = hist_of(torch.relu(torch.randn(1000))).to_dict()
    assert d["neg"] == [] and len(d["pos"]) <= 2048


def test_damaged_dict_is_rejected():
    d = hist_of(torch.randn(100)).to_dict()
    with pytest.raises(ValueError):
        Histogram.from_dict({**d, "count": d["count"] + 1})
    with pytest.raises(ValueError):
        Histogram.from_dict({**d, "max": 1e9})
    with pytest.raises(KeyError):
        Histogram.from_dict({k: v for k, v in d.items() if k != "pos"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_raise(bad):
    h = Histogram()
    with pytest.raises(UserError, match="NaN" if math.isnan(bad) else "infinite"):
        h.update(torch.tensor([1.0, bad, 2.0]))
    assert h.count == 0  # nothing half-added


def test_bins_must_be_power_of_two():
    with pytest.raises(ValueError):
        Histogram(1000)


@pytest.mark.parametrize("chunk", [7, 1 << 18])
@pytest.mark.parametrize("signed", [False, True])
def test_float32_binning_equals_the_float64_reference(monkeypatch, chunk, signed):
    """The float32 hot path (chunked, int16 indices, zeros counted per chunk) gives the histogram
    of the exact float64 path bit for bit: bin edges, zeros and -0.0, subnormals, regrowth, and
    chunk boundaries that cut through a batch (chunk 7)."""
    import edgerepvgg.quant.observers as observers

    calls = []
    fast = observers._bin_float32
    monkeypatch.setattr(observers, "_CHUNK", chunk)
    monkeypatch.setattr(observers, "_bin_float32", lambda *a, **k: calls.append(a[0].dtype) or fast(*a, **k))
    g = torch.Generator().manual_seed(3)
    batches = []
    for scale in (0.5, 3.0, 40.0):  # R grows twice: earlier counts merge
        x = torch.randn(2000, generator=g) * scale
        x[::4] = torch.floor(x[::4] * 8) / 8  # values exactly on bin edges
        x[1::9] = 0.0
        x[2::9] = -0.0
        x[3::50] = 1e-40  # subnormal float32: bin 0, not a zero
        batches.append(x if signed else torch.relu(x))
    fast_hist, ref_hist = Histogram(), Histogram()
    for x in batches:
        fast_hist.update(x.float())
        ref_hist.update(x.double())
    assert calls and all(dtype == torch.float32 for dtype in calls)
    assert fast_hist.to_dict() == ref_hist.to_dict()
    assert (fast_hist.neg.sum() > 0) == signed and fast_hist.zeros == ref_hist.zeros > 0


def test_tiny_float32_range_stays_exact():
    """Below float32's normal range the bin width is not a normal float32: the exact path bins it."""
    x = torch.tensor([0.0, 1e-40, 3e-40, 5e-40])
    assert hist_of(x).to_dict() == hist_of(x.double()).to_dict()


def test_other_dtypes():
    x = torch.tensor([-1.5, 0.25, 2.0])
    ref = hist_of(x).to_dict()
    assert hist_of(x.half()).to_dict() == ref and hist_of(x.double()).to_dict() == ref
    assert hist_of(torch.tensor([1, 2, 3])).max == 3.0


# ---------------------------------------------------------------------------------------------
# minmax and percentile


def test_minmax():
    h = hist_of(torch.tensor([-0.5, 2.0, 1.0]), torch.tensor([3.25]))
    for scheme in (INT8, UINT8, INT8_AFFINE):
        assert activation_range(h, "minmax", scheme) == (-0.5, 3.25)


def test_percentile_of_0_to_9999():
    # 0..9999: 9900 of the values are below 9900 (0..9899), 9999 below 9999.
    h = hist_of(torch.arange(10000, dtype=torch.float32))
    assert h.width == 8.0  # R = 16384: 8 integers a bin, so the bin-uniform reading is exact
    assert activation_range(h, "percentile", INT8, 99) == (0.0, 9900.0)
    assert activation_range(h, "percentile", INT8, 99.99) == (0.0, 9999.0)
    assert activation_range(h, "percentile", INT8, 100) == (0.0, 9999.0)  # the max, exactly
    assert activation_range(h, "percentile", UINT8, 99) == (0.0, 9900.0)  # lower percentile 100 -> 0


def test_percentile_signed_symmetric_and_affine():
    x = torch.arange(-5000, 5000, dtype=torch.float64) + 0.5  # -4999.5 .. 4999.5, w = 4: 4 a bin
    h = hist_of(x)
    # |x|: 0.5..4949.5 twice = 9900 values below 4950
    assert activation_range(h, "percentile", INT8, 99) == (-4950.0, 4950.0)
    # x: 100 values below -4900, 9900 below 4900
    assert activation_range(h, "percentile", INT8_AFFINE, 99) == (-4900.0, 4900.0)
    assert activation_range(h, "percentile", UINT8, 99) == (-4900.0, 4900.0)


def assert_quantile_within_a_bin(value: float, data: np.ndarray, percent: float, width: float) -> None:
    """``percent`` % of the n values (k = percent * n / 100 of them) lie below ``value``: so the
    ceil(k)-th smallest value is below ``value + w`` and the floor(k)+1-th above ``value - w``."""
    s = np.sort(data)
    k = percent * len(s) / 100
    assert s[math.ceil(k) - 1] - width <= value <= s[math.floor(k)] + width


def test_percentile_matches_order_statistics_within_a_bin():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20000, generator=gen, dtype=torch.float64) * 2 + 0.5
    h = hist_of(x)
    for p in (99.0, 99.9, 99.99):
        lo, hi = activation_range(h, "percentile", INT8_AFFINE, p)
        assert_quantile_within_a_bin(hi, x.numpy(), p, h.width)
        assert_quantile_within_a_bin(lo, x.numpy(), 100 - p, h.width)
        _, t = activation_range(h, "percentile", INT8, p)
        assert_quantile_within_a_bin(t, x.abs().numpy(), p, h.width)
        assert abs(t - np.percentile(x.abs().numpy(), p)) < 0.2  # sparse tail: order statistics apart


# ---------------------------------------------------------------------------------------------
# entropy


def reference_entropy(h: list[float], levels: int) -> tuple[list[int], list[float]]:
    """The algorithm as described (TensorRT GTC 2017, s7310): for each candidate i >= levels, P is
    bins[0..i-1] with the outliers summed into bin i-1; Q quantizes bins[0..i-1] into `levels`
    equal groups and expands each group back over its non-empty bins; KL(P || Q). Where Q is 0 and
    P is not, Q gets 1e-4 of a count (MXNet's smoothing eps); no data kept at all is infinite."""
    n = max(b for b in range(len(h)) if h[b] > 0) + 1
    cands, kls = [], []
    for i in range(levels, n + 1):
        p = list(h[:i])
        p[-1] += sum(h[i:])
        q = [0.0] * i
        for j in range(levels):
            members = [b for b in range(i) if j * i <= b * levels < (j + 1) * i]
            nonempty = [b for b in members if h[b] > 0]
            for b in nonempty:
                q[b] = sum(h[m] for m in members) / len(nonempty)
        if sum(q) == 0:
            cands.append(i)
            kls.append(math.inf)
            continue
        q = [1e-4 if qb == 0 and pb > 0 else qb for pb, qb in zip(p, q)]
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pb, qb in zip(p, q):
            if pb > 0:
                kl += pb / sp * math.log((pb / sp) / (qb / sq))
        cands.append(i)
        kls.append(kl)
    return cands, kls


def test_kl_divergences_match_reference_on_small_histogram():
    rng = np.random.default_rng(0)
    h = np.floor(200 * np.exp(-np.arange(40) / 6.0)) + rng.integers(0, 3, 40)
    h[[25, 31]] = 0  # empty bins, including candidates' last bins
    h = np.concatenate([h, np.zeros(10), [2.0]])  # a far outlier bin
    for levels in (8, 16):
        cands, kls = kl_divergences(h, levels)
        ref_c, ref_k = reference_entropy(h.tolist(), levels)
        assert cands.tolist() == ref_c
        np.testing.assert_allclose(kls, ref_k, rtol=1e-12, atol=1e-15)
        # last kept bin empty but the outliers land there: finite, dearer than both neighbours
        assert kls[ref_c.index(25)] < kls[ref_c.index(26)] > kls[ref_c.index(27)]


def test_kl_divergences_keeping_no_data_is_infinite():
    h = np.array([0.0] * 12 + [4, 2, 1])
    cands, kls = kl_divergences(h, 8)
    assert cands.tolist() == list(range(8, 16))
    assert np.isinf(kls[:5]).all() and np.isfinite(kls[5:]).all()
    np.testing.assert_allclose(kls, reference_entropy(h.tolist(), 8)[1], rtol=1e-12, atol=1e-15)


def test_entropy_threshold_matches_reference_argmin():
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.rand(3000, generator=gen) ** 3 * 2, torch.tensor([7.5])])  # R = 8, w = 1/8
    h = hist_of(x, bins=64)
    scheme = Scheme(4, signed=True, symmetric=True)  # 8 positive levels
    counts = (h.pos + h.neg).astype(float)
    cands, kls = reference_entropy(counts.tolist(), 8)
    best = max(i for i, k in zip(cands, kls) if k == min(kls))
    assert entropy_threshold(h, scheme) == min(best * h.width, 7.5)
    assert activation_range(h, "entropy", scheme) == (0.0, min(best * h.width, 7.5))
    assert best * h.width < 3  # the outlier at 7.5 is clipped


def test_entropy_keeps_uniform_data_whole():
    # one value per bin, every bin equal: only the full range has KL = 0
    h = hist_of(torch.arange(1536, dtype=torch.float32) + 0.5)
    assert h.width == 1.0
    assert activation_range(h, "entropy", INT8) == (0.0, 1535.5)
    assert activation_range(h, "entropy", UINT8) == (0.0, 1535.5)


def test_entropy_clips_far_outlier():
    # half-normal bulk (deterministic quantiles) and one value at 100
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    bulk = math.sqrt(2) * torch.erfinv(u)
    h = hist_of(torch.cat([bulk, torch.tensor([100.0])]))
    lo, hi = activation_range(h, "entropy", INT8)
    assert lo == 0.0 and 3.0 < hi < 10.0  # the bulk reaches 3.9, the outlier is at 100
    # 256 levels: the smallest candidate keeps 256 bins of w = 1/16, i.e. t >= 16
    assert activation_range(h, "entropy", UINT8)[1] == 16.0


def test_entropy_ignores_relu_zeros():
    # a ReLU's exact zeros (exact on every grid) must not sway the threshold; the bulk spans ~1900
    # bins, so the zero spike would share the first group with ~15 other bins if it were counted
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    bulk = math.sqrt(2) * torch.erfinv(u)
    with_zeros = hist_of(bulk, torch.zeros(200000, dtype=torch.float64))
    assert with_zeros.zeros == 200000
    assert activation_range(with_zeros, "entropy", INT8) == activation_range(hist_of(bulk), "entropy", INT8)


def test_entropy_ties_go_to_the_larger_threshold():
    # two equal spikes at 1 and 3: clipping the 3s onto the bin of the 1s gives KL = 0 just like
    # keeping everything; the tie must keep everything
    h = hist_of(torch.tensor([1.0] * 100 + [3.0] * 100))
    _, kls = kl_divergences((h.pos + h.neg).astype(float), 128)
    assert (kls == 0).sum() == 2
    assert activation_range(h, "entropy", INT8) == (0.0, 3.0)


def test_entropy_levels_follow_the_grid():
    post_relu, signed = hist_of(torch.tensor([0.0, 1.0])), hist_of(torch.tensor([-1.0, 1.0]))
    assert entropy_levels(post_relu, INT8) == 128 and entropy_levels(signed, INT8) == 128
    assert entropy_levels(post_relu, UINT8) == 256 and entropy_levels(signed, UINT8) == 128
    assert entropy_levels(post_relu, Scheme(8, signed=False, symmetric=True)) == 256
    assert entropy_levels(post_relu, Scheme(4)) == 8


def test_entropy_signed_affine_window_is_clipped_to_data():
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    x = torch.cat([math.sqrt(2) * torch.erfinv(2 * u - 1), torch.tensor([80.0])]) * 0.5 - 0.2
    h = hist_of(x)
    lo, hi = activation_range(h, "entropy", INT8_AFFINE)
    assert lo == h.min and 1.0 < hi < 10.0  # left side whole, the outlier on the right clipped
    t = activation_range(h, "entropy", INT8)[1]
    assert activation_range(h, "entropy", INT8)[0] == -t


# ---------------------------------------------------------------------------------------------
# mse


def raw_sq_error(x: np.ndarray, lo: float, hi: float, scheme: Scheme) -> float:
    s, z = qparams(lo, hi, scheme)
    q = np.clip(np.round(x / s) + z, scheme.qmin, scheme.qmax)
    return float(np.sum(((q - z) * s - x) ** 2))


def test_mse_clips_single_outlier_at_brute_force_optimum():
    # N uniform values in [0, 1] and one at A = 50 on a 5-bit symmetric grid (step t/15): clipping
    # at t costs ~(A - t)^2 + N (t/15)^2 / 12, minimal near t = A / (1 + N/2700) = 4.5
    scheme = Scheme(5, signed=True, symmetric=True)
    x = np.concatenate([(np.arange(27000) + 0.5) / 27000, [50.0]])
    lo, hi = activation_range(hist_of(torch.from_numpy(x)), "mse", scheme)
    grid = np.arange(0.5, 50.0001, 0.01)
    brute = np.array([raw_sq_error(x, 0.0, t, scheme) for t in grid])
    best_t = grid[np.argmin(brute)]
    assert lo == 0.0 and abs(hi - best_t) < 0.15 and 3.5 < best_t < 5.5
    assert raw_sq_error(x, lo, hi, scheme) <= 1.01 * brute.min()
    assert raw_sq_error(x, lo, hi, scheme) < 0.3 * raw_sq_error(x, 0.0, 50.0, scheme)  # minmax


def test_mse_errors_match_raw_error():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40000, generator=gen, dtype=torch.float64) * 1.3
    h = hist_of(x)
    for scheme in (INT8, INT8_AFFINE, UINT8):
        ts = np.array([1.0, 2.5, 4.0])
        model = mse_errors(h, scheme, ts)
        for t, e in zip(ts, model):
            lo, hi = (-t, t) if scheme.symmetric else (max(h.min, -t), min(h.max, t))
            assert e == pytest.approx(raw_sq_error(x.numpy(), lo, hi, scheme), rel=0.03)


@pytest.mark.parametrize("scheme", [INT8, UINT8])
def test_mse_is_brute_force_optimal_on_relu_data(scheme):
    gen = torch.Generator().manual_seed(11)
    x = torch.relu(torch.randn(20000, generator=gen, dtype=torch.float64)).numpy()
    lo, hi = activation_range(hist_of(torch.from_numpy(x)), "mse", scheme)
    brute = min(raw_sq_error(x, 0.0, t, scheme) for t in np.linspace(1.0, x.max(), 400))
    assert lo == 0.0 and raw_sq_error(x, lo, hi, scheme) <= 1.01 * brute


# ---------------------------------------------------------------------------------------------
# every method: degenerate data and errors


@pytest.mark.parametrize("data", [[0.0] * 7, [2.5] * 7, [-3.0], [0.0, -0.0], [5e-30, 0.0]])
@pytest.mark.parametrize("method", RANGE_METHODS)
def test_degenerate_data_gives_a_valid_range(data, method):
    h = hist_of(torch.tensor(data, dtype=torch.float64))
    for c in CONSTRAINT_SETS.values():
        lo, hi = activation_range(h, method, c.activation)
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
        scale, zp = qparams(lo, hi, c.activation)
        assert scale > 0 and math.isfinite(scale) and c.activation.qmin <= zp <= c.activation.qmax
        assert max(abs(lo), abs(hi)) <= h.amax + 1e-12


@pytest.mark.parametrize("method", RANGE_METHODS)
def test_constant_data_is_kept_whole(method):
    for value, sym, aff in ((2.5, (0.0, 2.5), (0.0, 2.5)), (-1.5, (-1.5, 1.5), (-1.5, 0.0))):
        h = hist_of(torch.full((10,), value))
        expected_sym, expected_aff = ((value, value),) * 2 if method == "minmax" else (sym, aff)
        assert activation_range(h, method, INT8) == expected_sym
        assert activation_range(h, method, INT8_AFFINE) == expected_aff


def test_an_empty_histogram_is_a_user_error():
    with pytest.raises(UserError, match="no values"):
        activation_range(Histogram(), "minmax", INT8)


def test_method_names_are_one_table():
    from edgerepvgg.quant import observers
    from edgerepvgg.quant.calibrate import WEIGHT_METHODS, CalibrationConfig

    assert list(RANGE_METHODS) == ["minmax", "percentile", "entropy", "mse"]
    assert not hasattr(observers, "OBSERVERS")  # one name for the table
    assert WEIGHT_METHODS is observers.WEIGHT_METHODS == ("minmax", "mse")
    assert not hasattr(observers, "WEIGHT_OBSERVERS")
    for method in RANGE_METHODS:  # every name in the table is a config a user may pick
        assert CalibrationConfig(method=method).method == method
    # Internal callers pass validated names; a wrong one is a bug, not a user mistake.
    with pytest.raises(KeyError):
        activation_range(hist_of(torch.tensor([1.0])), "kl", INT8)
    with pytest.raises(ValueError, match="minmax, mse"):
        weight_scales(torch.ones(2, 2), W8, "entropy")


def test_every_method_is_deterministic():
    gen = torch.Generator().manual_seed(8)
    batches = [torch.relu(torch.randn(4, 16, 8, 8, generator=gen)) for _ in range(3)]
    a, b = hist_of(*batches), hist_of(*batches)
    for scheme in (INT8, UINT8):
        for method in RANGE_METHODS:
            assert activation_range(a, method, scheme) == activation_range(b, method, scheme)


# ---------------------------------------------------------------------------------------------
# weights


def test_weight_minmax_per_channel_exact():
    w = torch.zeros(3, 2, 3, 3)
    w[0, 1, 2, 2] = -2.54
    w[1, 0, 0, 0] = 1.27
    w[2] = 0.5
    w[2, 0, 1, 1] = -6.35
    scales = weight_scales(w, W8)
    assert scales.dtype == torch.float32
    assert scales.tolist() == torch.tensor([2.54 / 127, 1.27 / 127, 6.35 / 127]).tolist()
    w7 = Scheme(7, signed=True, symmetric=True, per_channel=True)
    assert weight_scales(w[:1], w7).tolist() == torch.tensor([2.54 / 63]).tolist()


def weight_error(w: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    w = w.double().reshape(len(w), -1)
    s = scales.double()[:, None]
    return ((torch.clamp(torch.round(w / s), scheme.qmin, scheme.qmax) * s - w) ** 2).sum(1)


def test_weight_mse_never_worse_than_minmax_and_is_the_grid_minimum():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(6, 8, 3, 3, generator=gen) * 0.1
    w[0, 0, 0, 0] = 3.0  # one channel with a far outlier: clipping it pays
    w[5] = (torch.arange(72).reshape(8, 3, 3) % 15 - 7) * 0.25  # on the minmax grid: minmax is optimal
    scheme = Scheme(4, signed=True, symmetric=True, per_channel=True)  # coarse: differences are large
    mse, mm = weight_scales(w, scheme, "mse"), weight_scales(w, scheme, "minmax")
    err_mse, err_mm = weight_error(w, mse, scheme), weight_error(w, mm, scheme)
    assert (err_mse <= err_mm).all() and (err_mse < err_mm).sum() >= 3
    assert mse[5] == mm[5] == 0.25 and err_mse[5] == 0  # the scale evaluated is the scale returned
    # straightforward search over the same 100 fractions, channel by channel
    for c in range(len(w)):
        amax = float(w[c].abs().max())
        errs = [float(weight_error(w[c : c + 1], torch.tensor([f * amax / scheme.qmax]), scheme)[0])
                for f in np.linspace(0.5, 1.0, 100)]  # fmt: skip
        assert float(err_mse[c]) == pytest.approx(min(errs), rel=1e-5)


def test_weight_zero_channel_gets_a_safe_scale():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(10))
    w[2] = 0
    for method in ("minmax", "mse"):
        scales = weight_scales(w, W8, method)
        assert torch.isfinite(scales).all() and (scales > 0).all()
        assert scales[2] == scales[[0, 1, 3]].min()
    all_zero = weight_scales(torch.zeros(2, 4), W8, "mse")
    assert all_zero.tolist() == [pytest.approx(1 / 127)] * 2


def test_weight_nan_raises():
    with pytest.raises(UserError):
        weight_scales(torch.tensor([[1.0, math.nan]]), W8)
