"""Calibration observers: activation statistics and the clip ranges chosen from them.

An activation point is observed once, into a :class:`Histogram` (exact min, max, count and a
histogram that grows without re-reading data); every method (``minmax``, ``percentile``,
``entropy``, ``mse``) then reads only that histogram, so changing the method or the constraint set
never runs the model again. Activations are per tensor; weights are per output channel and
symmetric (:func:`weight_scales`), computed from the weights themselves. Nothing here is random:
the same batches give the same histogram, and the same histogram the same ranges, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from edgerepvgg.errors import UserError
from edgerepvgg.quant.spec import Scheme, qparams

#: Per-channel weight range methods (:func:`weight_scales`); activation range methods are the
#: keys of :data:`RANGE_METHODS`, defined below with their functions.
WEIGHT_METHODS: tuple[str, ...] = ("minmax", "mse")

HISTOGRAM_FORMAT = 1
_MSE_FRACTIONS = 100  # weight "mse": clip candidates in [0.5, 1.0] x max|w| per channel
_MSE_CHUNK = 64  # activation "mse": candidates evaluated at once (memory: chunk x occupied bins)
_KL_EPS = 1e-4  # entropy: the count given to an empty last bin that receives the outliers
_CHUNK = 1 << 18  # values per step of the float32 binning (buffers of 1 MB float, 0.5 MB int16)
_FAST_MIN_WIDTH, _FAST_MAX_LIMIT = 2.0**-100, 2.0**100  # float32 binning only far from under/overflow


# ---------------------------------------------------------------------------------------------
# Histogram


class Histogram:
    """Running statistics of one activation tensor over many batches: exact ``min``, ``max``,
    ``count`` and ``zeros`` (values exactly 0), and a histogram that grows without re-reading data.

    Layout: ``bins`` bins of width ``w = R / bins`` for each sign, ``R = 2**exponent`` the
    smallest power of two *strictly* above ``max|x|`` seen so far: positive bin ``i`` holds
    ``x`` in ``[i*w, (i+1)*w)``, negative bin ``i`` holds the ``x < 0`` with ``-x`` in that interval
    (0 and -0.0 go to positive bin 0, and are also counted in ``zeros``). When a batch reaches ``R``, ``R`` doubles (or more) and adjacent bins
    merge in pairs. ``bins`` is a power of two, so ``w`` is one too: ``floor(|x| / w)`` is exact in
    floating point and merging is exact.

    Resolution guarantee: ``R/2 <= max|x| < R``, so ``max|x| / bins < w <= 2 * max|x| / bins``; the
    data spans at least ``bins / 2`` bins on its larger side (1024 of the default 2048), and the
    negative side has the same width (signed inputs are resolved as finely as post-ReLU ones).

    Determinism: every value ends in bin ``floor(|x| / w_final)`` whenever it was seen, and
    ``R`` depends only on the overall ``max|x|``, so *any* split or order of the same values gives
    an identical histogram and identical :meth:`to_dict` (min/max/count/zeros are exact too).
    Histograms merge exactly (:meth:`merge`); :meth:`to_dict` is plain JSON-able lists.
    """

    def __init__(self, bins: int = 2048):
        if not (isinstance(bins, int) and 2 <= bins <= 2**20 and bins & (bins - 1) == 0):
            raise ValueError(f"bins must be a power of two in 2..2^20, got {bins!r}")
        self.bins = bins
        self.exponent: int | None = None  # R = 2**exponent; None until a nonzero value is seen
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)
        self.count = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf

    # -- geometry ---------------------------------------------------------------------------

    @property
    def _log2_bins(self) -> int:
        return self.bins.bit_length() - 1

    @property
    def limit(self) -> float:
        """``R``: every observed ``|x|`` is below it (1.0 while only zeros were seen)."""
        return math.ldexp(1.0, self.exponent if self.exponent is not None else 0)

    @property
    def width(self) -> float:
        """Bin width ``R / bins`` (a power of two)."""
        return math.ldexp(self.limit, -self._log2_bins)

    @property
    def amax(self) -> float:
        """``max|x|`` (0.0 before any data)."""
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    def edges(self) -> np.ndarray:
        """The ``2*bins + 1`` edges ``-R, ..., -w, 0, w, ..., R`` of :meth:`counts` (float64, exact)."""
        return np.arange(-self.bins, self.bins + 1, dtype=np.float64) * self.width

    def counts(self) -> np.ndarray:
        """Counts of the signed histogram over :meth:`edges` (int64): negative side, then positive."""
        return np.concatenate([self.neg[::-1], self.pos])

    # -- collecting -------------------------------------------------------------------------

    def update(self, x: torch.Tensor) -> None:
        """Add every value of ``x`` (any shape). NaN or infinite values raise ``UserError``."""
        x = torch.as_tensor(x).detach()
        if not x.is_floating_point():
            x = x.double()
        elif x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        x = x.reshape(-1).cpu()
        n = x.numel()
        if n == 0:
            return
        lo_t, hi_t = torch.aminmax(x)
        lo, hi = float(lo_t), float(hi_t)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = "NaN" if bool(torch.isnan(x).any()) else "infinite values"
            raise UserError(f"activation contains {bad}; the model or its input is broken (check the checkpoint "
                            "and the preprocessing)")
        amax = max(-lo, hi)
        if amax > 0:
            self._grow(math.frexp(amax)[1])  # 2**e > amax >= 2**(e-1)
            w = self.width
            if x.dtype == torch.float32 and _FAST_MIN_WIDTH <= w and self.limit <= _FAST_MAX_LIMIT:
                zeros, counts = _bin_float32(x, 1.0 / w, self.bins, signed=lo < 0)
            else:
                zeros, counts = _bin_exact(x, w, self.bins, signed=lo < 0)
            self.pos += counts[: self.bins]
            if lo < 0:
                self.neg += counts[self.bins :]
        else:  # only zeros: bin 0 whatever R becomes
            zeros = n
            self.pos[0] += n
        self.count += n
        self.zeros += zeros
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def _grow(self, exponent: int) -> None:
        """Make ``R = 2**exponent`` if that is larger, merging bins exactly."""
        if self.exponent is None:
            self.exponent = exponent
            return
        shift = exponent - self.exponent
        if shift <= 0:
            return
        self.pos = _merge_bins(self.pos, shift)
        self.neg = _merge_bins(self.neg, shift)
        self.exponent = exponent

    def merge(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s data to this histogram (exact); returns ``self``.

        Calibration itself never merges (it streams every batch into one histogram); this method
        exists to state, and let the tests check, the determinism property of the class: a
        histogram of a split stream, merged, equals the histogram of the whole stream."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        if other.count == 0:
            return self
        other = Histogram.from_dict(other.to_dict())  # a copy we may regrow
        for exponent in (self.exponent, other.exponent):
            if exponent is not None:
                self._grow(exponent)
                other._grow(exponent)
        self.pos += other.pos
        self.neg += other.neg
        self.count += other.count
        self.zeros += other.zeros
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    # -- serialization ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON types; trailing empty bins are left out (a post-ReLU tensor has ``neg: []``)."""
        return {
            "format": HISTOGRAM_FORMAT,
            "bins": self.bins,
            "exponent": self.exponent,
            "count": self.count,
            "zeros": self.zeros,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "pos": _trim(self.pos),
            "neg": _trim(self.neg),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        """Inverse of :meth:`to_dict`; raises ``ValueError``/``KeyError``/``TypeError`` on a damaged dict."""
        if d.get("format", HISTOGRAM_FORMAT) > HISTOGRAM_FORMAT:
            raise ValueError(f"histogram format {d['format']} is newer than this edgerepvgg")
        h = cls(int(d["bins"]))
        h.exponent = None if d["exponent"] is None else int(d["exponent"])
        for side in ("pos", "neg"):
            values = np.asarray(d[side], dtype=np.int64)
            if values.ndim != 1 or len(values) > h.bins or (values < 0).any():
                raise ValueError(f"histogram side {side!r} is not {h.bins} non-negative counts")
            getattr(h, side)[: len(values)] = values
        h.count, h.zeros = int(d["count"]), int(d["zeros"])
        if h.count:
            h.min, h.max = float(d["min"]), float(d["max"])
        if int(h.pos.sum() + h.neg.sum()) != h.count or not 0 <= h.zeros <= h.pos[0]:
            raise ValueError("histogram counts do not add up to its count")
        amax = h.amax
        fits = h.exponent is None if amax == 0 else h.exponent is not None and h.limit / 2 <= amax < h.limit
        if h.count and not (h.min <= h.max and fits):
            raise ValueError("histogram min/max are inconsistent with its range")
        return h

    def __repr__(self) -> str:
        return f"Histogram(bins={self.bins}, count={self.count}, min={self.min}, max={self.max}, R={self.limit})"


def _bin_exact(x: torch.Tensor, w: float, bins: int, signed: bool) -> tuple[int, np.ndarray]:
    """(exact zeros, counts) of ``x`` at bin width ``w``: ``bins`` positive counts, then ``bins``
    negative ones when ``signed``. The reference way, for any dtype and width (float64 where ``w``
    is not a normal float32)."""
    zeros = x.numel() - int(torch.count_nonzero(x))
    if x.dtype == torch.float32 and w < 2.0**-126:  # w not a normal float32: stay exact
        x = x.double()
    inv = 1.0 / w  # a power of two: x * inv is exact, and truncation is floor for |x|
    if not signed:  # post-ReLU activations: one side, half the work
        return zeros, torch.bincount((x * inv).long(), minlength=bins).numpy()
    idx = (x.abs() * inv).long()
    idx += (x < 0).long() * bins
    return zeros, torch.bincount(idx, minlength=2 * bins).numpy()


def _bin_float32(x: torch.Tensor, inv: float, bins: int, signed: bool) -> tuple[int, np.ndarray]:
    """:func:`_bin_exact` for float32 ``x``, the calibration hot path, with the same result.

    The data goes through in chunks of ``_CHUNK`` values, so that the scaled values, the bin
    indices (int16) and the sign flags live in small buffers that are reused (and stay in cache)
    instead of three full-size temporaries per activation, and the exact zeros are counted on the
    chunk in hand (a comparison and a sum: ``count_nonzero`` costs several times more). Exact:
    ``inv`` is a power of two in float32's normal range (the caller checks), so ``|x| * inv`` is
    exact or, below 1, lands in bin 0 anyway, and the int16 cast truncates, which is floor here."""
    n = x.numel()
    size = min(n, _CHUNK)
    span = 2 * bins if signed else bins
    scaled = torch.empty(size, dtype=torch.float32)
    index = torch.empty(size, dtype=torch.int16 if span <= 2**15 else torch.int32)
    flag = torch.empty(size, dtype=torch.bool)
    counts = torch.zeros(span, dtype=torch.int64)
    flagged = 0  # signed: exact zeros; else: values above zero
    for start in range(0, n, size):
        part = x[start : start + size]
        m = part.numel()
        s, i, f = scaled[:m], index[:m], flag[:m]
        if signed:
            torch.abs(part, out=s).mul_(inv)
            i.copy_(s)
            i.add_(torch.lt(part, 0, out=f), alpha=bins)
            flagged += int(torch.eq(part, 0, out=f).sum())
        else:
            i.copy_(torch.mul(part, inv, out=s))
            flagged += int(torch.gt(part, 0, out=f).sum())
        counts += torch.bincount(i, minlength=span)
    return (flagged if signed else n - flagged), counts.numpy()


def _merge_bins(counts: np.ndarray, shift: int) -> np.ndarray:
    """Counts at ``2**shift`` times the bin width: groups of ``2**shift`` adjacent bins summed."""
    bins = len(counts)
    out = np.zeros_like(counts)
    if 2**shift >= bins:
        out[0] = counts.sum()
    else:
        merged = counts.reshape(bins >> shift, 1 << shift).sum(axis=1)
        out[: len(merged)] = merged
    return out


def _trim(counts: np.ndarray) -> list[int]:
    nonzero = np.flatnonzero(counts)
    return counts[: nonzero[-1] + 1].tolist() if len(nonzero) else []


# ---------------------------------------------------------------------------------------------
# Views of a histogram used by the methods


def _abs_counts(hist: Histogram) -> np.ndarray:
    """Counts of ``|x|`` over ``[i*w, (i+1)*w)`` with the exact zeros taken out (float64)."""
    h = (hist.pos + hist.neg).astype(np.float64)
    h[0] -= hist.zeros
    return h


def _intervals(hist: Histogram, signed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lefts, rights, counts) in ascending order: values spread uniformly inside each bin, the
    exact zeros a point mass at 0. ``signed=False`` describes ``|x|``."""
    w = hist.width
    i = np.arange(hist.bins, dtype=np.float64)
    pos = hist.pos.astype(np.float64)
    pos[0] -= hist.zeros
    if signed:
        lefts = np.concatenate([-(i[::-1] + 1) * w, [0.0], i * w])
        rights = np.concatenate([-i[::-1] * w, [0.0], (i + 1) * w])
        counts = np.concatenate([hist.neg[::-1].astype(np.float64), [float(hist.zeros)], pos])
    else:
        lefts = np.concatenate([[0.0], i * w])
        rights = np.concatenate([[0.0], (i + 1) * w])
        counts = np.concatenate([[float(hist.zeros)], pos + hist.neg])
    return lefts, rights, counts


def quantile(hist: Histogram, percent: float, signed: bool) -> float:
    """The value below which ``percent`` % of the data lies (of ``x``, or of ``|x|``), reading the
    histogram as uniform inside each bin; clamped to the observed range (exact at 0 and 100 %)."""
    lo, hi = (hist.min, hist.max) if signed else (0.0, hist.amax)
    target = percent * hist.count / 100
    if target <= 0:
        return lo
    if target >= hist.count:
        return hi
    lefts, rights, counts = _intervals(hist, signed)
    cum = np.cumsum(counts)
    j = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[j] - counts[j]
    frac = min(max((target - before) / counts[j], 0.0), 1.0) if counts[j] > 0 else 1.0
    value = float(lefts[j] + frac * (rights[j] - lefts[j]))
    return min(max(value, lo), hi)


def _window(t: float, hist: Histogram, scheme: Scheme) -> tuple[float, float]:
    """The clip range of a one-parameter method at threshold ``t``: ``(-t, t)`` (symmetric grids,
    ``(0, t)`` for non-negative data); on affine grids ``(0, t)`` for non-negative data, else the
    data range cut to ``[-t, t]`` (the symmetric search ONNX Runtime also uses for signed data),
    widened to include 0 like every range."""
    if hist.min >= 0:
        return 0.0, t
    if scheme.symmetric:
        return -t, t
    return min(max(hist.min, -t), 0.0), max(min(hist.max, t), 0.0)


# ---------------------------------------------------------------------------------------------
# Activation ranges

#: ``method(histogram, scheme, percentile) -> (lo, hi)``: one entry of :data:`RANGE_METHODS`.
RangeMethod = Callable[[Histogram, Scheme, float], tuple[float, float]]


def _minmax_range(hist: Histogram, scheme: Scheme, percentile: float) -> tuple[float, float]:
    return hist.min, hist.max


def _percentile_range(hist: Histogram, scheme: Scheme, percentile: float) -> tuple[float, float]:
    assert 50 < percentile <= 100, percentile  # CalibrationConfig enforces it
    if scheme.symmetric:
        t = quantile(hist, percentile, signed=False)
        return (0.0, t) if hist.min >= 0 else (-t, t)
    lo = quantile(hist, 100 - percentile, signed=True)
    hi = quantile(hist, percentile, signed=True)
    return min(lo, 0.0), max(hi, 0.0)


def _searched_range(search: Callable[[Histogram, Scheme], float]) -> RangeMethod:
    """A method that searches one threshold ``t`` over the histogram of ``|x|``."""

    def range_of(hist: Histogram, scheme: Scheme, percentile: float) -> tuple[float, float]:
        if hist.amax == 0 or hist.min == hist.max:  # fast path: nothing to search
            return _window(hist.amax, hist, scheme)
        return _window(search(hist, scheme), hist, scheme)

    return range_of


def activation_range(hist: Histogram, method: str, scheme: Scheme, percentile: float = 99.99) -> tuple[float, float]:
    """Clip range ``[lo, hi]`` for one per-tensor activation on ``scheme``'s grid
    (:func:`~edgerepvgg.quant.spec.qparams` turns it into a scale and zero point).

    - ``minmax``: ``(min, max)``.
    - ``percentile``: symmetric grids clip at ``t`` = the ``percentile`` of ``|x|``: ``(-t, t)``, or
      ``(0, t)`` for non-negative data; affine grids take the ``100 - p`` and ``p`` percentiles of
      ``x`` (widened to include 0). Percentiles read the histogram as uniform within a bin, so they
      are exact to one bin width.
    - ``entropy``: TensorRT's KL-divergence calibration (:func:`entropy_threshold`).
    - ``mse``: the threshold minimizing the expected squared quantization error (rounding inside,
      clipping outside) of the histogram (:func:`mse_threshold`).

    ``entropy`` and ``mse`` search one threshold ``t`` over the histogram of ``|x|`` and return
    :func:`_window`'s range. Degenerate data (all zeros, one value) gives ``(min, max)``-like
    ranges, never NaN; ``qparams`` handles a zero span.

    ``method`` must be a key of :data:`RANGE_METHODS` and ``percentile`` in (50, 100]: the
    caller's config (:class:`~edgerepvgg.quant.calibrate.CalibrationConfig`) validates both.
    """
    if hist.count == 0:
        raise UserError("no values were observed for this activation; calibrate on at least one image")
    return RANGE_METHODS[method](hist, scheme, percentile)


def entropy_levels(hist: Histogram, scheme: Scheme) -> int:
    """Quantization levels the entropy search gives to ``[0, t]``: ``qmax + 1`` on symmetric grids
    (128 for int8, 256 for uint8); the whole grid (``qmax - qmin + 1``) on affine grids for
    non-negative data; half of it on affine grids for signed data (symmetric window)."""
    if scheme.symmetric:
        return scheme.qmax + 1
    levels = scheme.qmax - scheme.qmin + 1
    return levels if hist.min >= 0 else levels // 2


def kl_divergences(h: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorRT's entropy-calibration objective over a histogram ``h`` of ``|x|`` (float counts).

    For each candidate ``i`` (bins kept, ``levels <= i <= n``, ``n`` the last occupied bin + 1):
    the reference ``P`` is ``h[:i]`` with the outliers ``sum(h[i:])`` added to its last bin; the
    candidate ``Q`` merges ``h[:i]`` (without outliers) into ``levels`` groups (bin ``b`` to group
    ``floor(b * levels / i)``) and spreads each group's count evenly over its *non-empty* bins
    (empty bins stay empty); both are normalized and ``KL(P || Q) = sum P log(P / Q)`` over
    ``P > 0``. ``Q = 0 < P`` happens only in the last bin, when it is empty but receives the
    outliers: that bin gets ``Q = 1e-4`` of a count before normalizing (the ``eps`` of
    MXNet's / ONNX Runtime's ``smooth_distribution``), a large but finite penalty. NVIDIA's
    pytorch-quantization makes it infinite instead, which leaves a far outlier unclippable when
    the bulk spans fewer bins than the grid has levels. A candidate keeping no data (``h[:i]`` all
    empty) is infinite. Returns ``(candidates, divergences)``; empty when ``n <= levels`` (the grid
    is finer than the data: nothing to clip)."""
    nz = np.flatnonzero(h)
    n = int(nz[-1]) + 1 if len(nz) else 0
    if n <= levels:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    h = np.asarray(h[:n], dtype=np.float64)
    total = h.sum()
    inside = np.cumsum(h)
    candidates = np.arange(levels, n + 1)
    kl = np.empty(len(candidates))
    for k, i in enumerate(candidates):
        hi_ = h[:i]
        p = hi_.copy()
        p[-1] += total - inside[i - 1]
        group = (np.arange(i) * levels) // i
        occupied = hi_ > 0
        group_sum = np.bincount(group, weights=hi_, minlength=levels)
        group_nonempty = np.bincount(group, weights=occupied, minlength=levels)
        q = np.where(occupied, group_sum[group] / np.maximum(group_nonempty[group], 1), 0.0)
        if q.sum() <= 0:
            kl[k] = math.inf
            continue
        if q[-1] == 0 and p[-1] > 0:
            q[-1] = _KL_EPS
        p /= p.sum()
        q /= q.sum()
        m = p > 0
        kl[k] = float(np.sum(p[m] * np.log(p[m] / q[m])))
    return candidates, kl


def entropy_threshold(hist: Histogram, scheme: Scheme) -> float:
    """``t`` minimizing :func:`kl_divergences` of the ``|x|`` histogram (exact zeros left out:
    zero is exact on every grid, and a ReLU's spike at 0 would otherwise dominate the first
    group; NVIDIA's pytorch-quantization copies bin 1 into bin 0 for the same reason). ``t`` is
    the upper edge of the last kept bin, clamped to ``max|x|``; ties go to the larger ``t``.
    Resolution limit: at least ``levels`` bins are kept, so ``t >= levels * w > max|x| * levels /
    bins`` (1/16 of ``max|x|`` for int8 with 2048 bins, 1/8 for uint8)."""
    candidates, kl = kl_divergences(_abs_counts(hist), entropy_levels(hist, scheme))
    if len(candidates) == 0 or not np.isfinite(kl).any():
        return hist.amax
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return min(float(candidates[best]) * hist.width, hist.amax)


def _sq_error_antiderivative(x: np.ndarray, s: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``E(x) = integral_0^x (Q(u) - u)^2 du`` for the grid ``Q`` of step ``s`` clamped to ``[a, b]``
    (``a <= 0 <= b`` grid points). Inside, the error is a sawtooth: ``s^3 (k/12 + r^3/3)`` with
    ``x/s = k + r``, ``k = round(x/s)``; outside, ``(x - b)^3/3`` or ``(x - a)^3/3`` is added."""
    xc = np.clip(x, a, b)
    y = xc / s
    k = np.round(y)
    r = y - k
    inside = s**3 * (k / 12.0 + r**3 / 3.0)
    return inside + np.maximum(x - b, 0.0) ** 3 / 3.0 - np.maximum(a - x, 0.0) ** 3 / 3.0


def mse_errors(hist: Histogram, scheme: Scheme, thresholds: np.ndarray) -> np.ndarray:
    """Expected total squared quantize-dequantize error of the histogram's data for each threshold
    (range from :func:`_window`, scale and zero point from ``qparams``), reading the values as
    uniform within their bin; the exact zeros cost nothing (0 is on every grid)."""
    w = hist.width
    n_neg, n_pos = (int(np.flatnonzero(c)[-1]) + 1 if c.any() else 0 for c in (hist.neg, hist.pos))
    edges = np.arange(-n_neg, n_pos + 1, dtype=np.float64) * w  # only the occupied range
    pos = hist.pos[:n_pos].astype(np.float64)
    if n_pos:
        pos[0] -= hist.zeros
    density = np.concatenate([hist.neg[:n_neg][::-1].astype(np.float64), pos]) / w
    params = []
    for t in thresholds:
        lo, hi = _window(float(t), hist, scheme)
        s, z = qparams(lo, hi, scheme)
        params.append((s, (scheme.qmin - z) * s, (scheme.qmax - z) * s))
    s_all, a_all, b_all = (np.array(v, dtype=np.float64)[:, None] for v in zip(*params))
    errors = np.empty(len(thresholds))
    for start in range(0, len(thresholds), _MSE_CHUNK):
        sl = slice(start, start + _MSE_CHUNK)
        at_edges = _sq_error_antiderivative(edges, s_all[sl], a_all[sl], b_all[sl])
        errors[sl] = (np.diff(at_edges, axis=1) * density).sum(axis=1)
    return errors


def mse_threshold(hist: Histogram, scheme: Scheme) -> float:
    """``t`` minimizing :func:`mse_errors` over the bin edges ``i * w`` up to ``max|x|`` (which is
    always a candidate); ties go to the larger ``t``."""
    if hist.amax == 0:
        return 0.0
    n = int(np.flatnonzero(hist.pos + hist.neg)[-1]) + 1
    thresholds = np.unique(np.minimum(np.arange(1, n + 1) * hist.width, hist.amax))
    errors = mse_errors(hist, scheme, thresholds)
    best = len(errors) - 1 - int(np.argmin(errors[::-1]))
    return float(thresholds[best])


#: The activation range methods, name -> function: the one table every caller (the config's
#: validation, the CLI's choices, :func:`activation_range`) reads.
RANGE_METHODS: dict[str, RangeMethod] = {
    "minmax": _minmax_range,
    "percentile": _percentile_range,
    "entropy": _searched_range(entropy_threshold),
    "mse": _searched_range(mse_threshold),
}


# ---------------------------------------------------------------------------------------------
# Weights


def weight_scales(weight: torch.Tensor, scheme: Scheme, method: str = "minmax") -> torch.Tensor:
    """Per-output-channel (axis 0) symmetric scales for a conv/linear weight on ``scheme``, as
    float32 (what every target stores).

    - ``minmax``: ``max|w| / qmax`` per channel.
    - ``mse``: per channel, the clip ``f * max|w|`` for ``f`` in 100 steps over ``[0.5, 1.0]``
      minimizing the squared error of quantize-dequantize (round half to even) on the actual
      weights; ``f = 1`` (minmax) is a candidate and wins ties, so the error is never above minmax's.

    An all-zero channel quantizes to 0 at any scale, but the scale still sets its int32 bias
    ``round(b / (s_in * s_w))``, which a tiny scale would overflow; it gets the smallest scale
    of the layer's other channels (``1 / qmax`` when the whole weight is zero). Never 0 or NaN.
    """
    if method not in WEIGHT_METHODS:  # CalibrationConfig validates what users pass
        raise ValueError(f"unknown weight method {method!r}; choose one of {', '.join(WEIGHT_METHODS)}")
    if not scheme.symmetric:
        raise ValueError("weights are quantized on symmetric grids")
    w = weight.detach().reshape(weight.shape[0], -1).cpu()
    if not bool(torch.isfinite(w).all()):
        raise UserError("weight contains NaN or infinite values; the checkpoint is broken")
    # max|w| in the weight's own dtype is one of its values, so exact in float64 too; only the MSE
    # search needs the whole weight in float64 (RepVGG-B3: a 0.9 GB copy that minmax skips).
    amax = w.abs().amax(dim=1).to(torch.float64)
    scales = (amax / scheme.qmax).float().double()
    if method == "mse":
        w = w.to(torch.float64)
        fractions = torch.linspace(0.5, 1.0, _MSE_FRACTIONS, dtype=torch.float64)
        best_err = torch.full_like(amax, math.inf)
        for f in fractions.flip(0):  # from 1.0 down: strict improvement needed to move off minmax
            s = (f * amax / scheme.qmax).float().double()
            safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
            dq = torch.clamp(torch.round(w / safe), scheme.qmin, scheme.qmax) * safe
            err = ((dq - w) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scales = torch.where(better, s, scales)
    zero = scales <= 0
    if bool(zero.any()):
        fill = scales[~zero].min() if bool((~zero).any()) else torch.tensor(1.0 / scheme.qmax, dtype=torch.float64)
        scales = torch.where(zero, fill.float().double(), scales)
    return scales.float()
