"""Quantization analysis and mixed precision: statistics checked by hand, a constructed network
whose one badly scaled layer the analysis must name and mixed precision must keep in float, and
the ``analyze`` / ``calibrate --max-drop`` commands."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgerepvgg.data import InputSpec, TensorDataset
from edgerepvgg.errors import UserError
from edgerepvgg.plain import PlainNet
from edgerepvgg.quant import QuantSpec, Scheme, TensorQuant, constraints_for, qparams
from edgerepvgg.quant.observers import activation_range
from edgerepvgg.quant.analysis import (
    activation_stats,
    analyze,
    channel_range_ratio,
    excess_kurtosis,
    integer_top1,
    outlier_share,
    sqnr_db,
    weight_stats,
)
from edgerepvgg.quant.calibrate import collect_stats
from edgerepvgg.quant.mixed import keep_sensitive_layers


BAD = "convs.2"  # the layer the constructed network breaks


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: a second thread only adds contention


# ---------------------------------------------------------------------------------------------
# Statistics by hand


def test_sqnr_formula_on_a_known_signal_and_noise():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)  # 100 / (100 * 0.01)
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])) == pytest.approx(10 * math.log10(25.0))
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


def test_excess_kurtosis_and_outlier_share_of_known_arrays():
    assert excess_kurtosis(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])) == pytest.approx(6.8 / 4 - 3)  # m4 6.8, var 2
    assert excess_kurtosis(torch.tensor([-1.0, 1.0] * 50)) == pytest.approx(-2.0)
    assert excess_kurtosis(torch.full((7,), 3.0)) == 0.0
    x = torch.zeros(100)
    x[0] = 10.0  # mean 0.1, std 0.995: 9.9 away is an outlier, 0.1 away is not
    assert outlier_share(x) == pytest.approx(0.01)
    assert outlier_share(torch.tensor([-1.0, 1.0] * 10)) == 0.0


def test_channel_range_ratio_and_weight_sqnr_of_a_constructed_weight():
    w = torch.zeros(4, 1, 1, 2)
    w[0, 0, 0] = torch.tensor([1.0, -0.5])
    w[1, 0, 0] = torch.tensor([-2.0, 0.0])
    w[2, 0, 0] = torch.tensor([0.0, 8.0])
    assert channel_range_ratio(w) == 8.0  # the all-zero channel 3 is left out
    s = weight_stats(w, Scheme(8, True, True, True))
    assert (s.channels, s.zero_channels, s.channel_range_min, s.channel_range_max) == (4, 1, 1.0, 8.0)

    # Channel 0 is exact on the per-tensor grid (scale 127/127 = 1); channel 1 rounds to zeros.
    w = torch.tensor([[127.0, -127.0], [0.25, -0.5]]).reshape(2, 1, 1, 2)
    s = weight_stats(w, Scheme(8, True, True, True))
    assert s.sqnr_per_tensor == 0.0  # channel mean: channel 1's noise equals its signal
    assert s.sqnr_per_tensor_pooled == pytest.approx(10 * math.log10((2 * 127**2 + 0.3125) / 0.3125), abs=1e-6)
    assert 45 < s.sqnr_per_channel < 55  # 0.25 is half a step of 0.5/127 off the grid
    assert s.channel_ratio == 127.0 / 0.5


# ---------------------------------------------------------------------------------------------
# A network with one badly scaled layer


def bad_channel_net(seed: int = 0) -> PlainNet:
    """Four 8-channel convs on 8x8 inputs. Output channel 0 of ``convs.2`` has weights 100x the
    others, all negative, and a negative bias: on non-negative input it is always 0 after ReLU,
    so the function is untouched, but one per-tensor weight scale rounds the other seven channels
    of that layer to (nearly) nothing. The fused-RepVGG failure, isolated."""
    g = torch.Generator().manual_seed(seed)
    chans = [1, 8, 8, 8, 8]
    convs = []
    with torch.no_grad():
        for i in range(4):
            conv = nn.Conv2d(chans[i], chans[i + 1], 3, padding=1)
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (9 * chans[i])) ** 0.5)
            conv.bias.copy_(torch.randn(chans[i + 1], generator=g) * 0.1)
            convs.append(conv)
        bad = convs[int(BAD.split(".")[1])]
        bad.weight[0] = -100 * bad.weight[0].abs().clamp_min(0.05)
        bad.bias[0] = -1.0
        head = nn.Linear(8, 4)
        head.weight.copy_(torch.randn(4, 8, generator=g))
        head.bias.zero_()
    plain = PlainNet(convs, head, InputSpec(size=8, resize=8, channels=1, mean=(0.5,), std=(0.25,)), "bad-channel").eval()
    x = _images(256, seed=99)
    with torch.no_grad():  # centre the logits so that every class is predicted somewhere
        head.bias.copy_(-plain(plain.input_spec.normalize(x)).mean(dim=0))
    return plain


def _images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """Blocky images (a random 2x2 pattern, upsampled, plus noise) that differ in more than noise,
    so that the constructed network's logits are far apart and 8-bit rounding rarely flips them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 2, 2, generator=g) * 255
    x = nn.functional.interpolate(coarse, size=(size, size), mode="nearest") + torch.randn(n, 1, size, size, generator=g) * 20
    return x.clamp(0, 255).round().to(torch.uint8)


def _sets(plain: PlainNet, n_eval: int = 300) -> tuple[TensorDataset, TensorDataset]:
    spec = plain.input_spec
    calib = TensorDataset(_images(64, seed=1), torch.full((64,), -1), spec, "synthetic calibration")
    x = _images(3 * n_eval, seed=2)
    with torch.no_grad():
        logits = plain(spec.normalize(x))
    # Labels are the FP32 predictions (FP32 top-1 is 100%: every drop is a disagreement), on the
    # third of the images with the clearest FP32 decision, so that only real damage flips one.
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:n_eval].sort().values
    return calib, TensorDataset(x[keep], logits[keep].argmax(dim=1), spec, "synthetic evaluation")


@pytest.fixture(scope="module")
def bad_analysis():
    plain = bad_channel_net()
    calib, ev = _sets(plain)
    return plain, calib, ev, analyze(plain, calib, ev, constraints_for("tensorrt"), "percentile", cache=False)


def test_analysis_names_the_badly_scaled_layer(bad_analysis):
    plain, _, ev, a = bad_analysis
    assert len(set(ev.labels.tolist())) >= 3
    bad = a.row(BAD)
    # Weights: the channel range ratio and the per-tensor SQNR single it out; per-channel fixes it.
    assert bad.weight.channel_ratio > 50 and all(r.weight.channel_ratio < 10 for r in a.layers if r.weight and r.name != BAD)
    assert bad.weight.sqnr_per_tensor < bad.weight.sqnr_per_channel - 20
    assert min(a.layers, key=lambda r: r.weight.sqnr_per_tensor if r.weight else math.inf).name == BAD
    # Sensitivity: it alone carries the naive loss; with per-channel weights nothing much is left.
    assert a.most_sensitive("naive")[0] == BAD
    assert bad.naive.drop > 30 and bad.naive.logit_sqnr < min(r.naive.logit_sqnr for r in a.layers if r.name != BAD)
    assert all(r.naive.drop < 5 for r in a.layers if r.name != BAD)
    assert all(r.chosen.drop < 5 for r in a.layers)
    assert a.fp32_top1 == 1.0 and a.naive_top1 < 0.7 and a.chosen_top1 > 0.95
    assert a.naive_top1 == pytest.approx(integer_top1(plain, a.naive_spec, ev))
    assert any(BAD in f and "per-tensor" in f for f in a.findings)
    assert [r.name for r in a.layers] == ["convs.0", "convs.1", "convs.2", "convs.3", "pool", "head"]
    d = json.loads(a.to_json())  # strict JSON (no NaN/Infinity)
    assert d["most_sensitive"]["naive"][0] == BAD and d["layers"][2]["weight"]["channel_ratio"] > 50
    assert d["layers"][4]["weight"] is None and d["output"]["clip"] is None  # TensorRT keeps float logits


def test_activation_percentiles_match_numpy_within_a_bin(bad_analysis):
    plain, calib, _, a = bad_analysis
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        plain(calib.spec.normalize(calib.images), observe=lambda n, t: seen.append(t) if n == "convs.3" else None)
    x = seen[0].abs().reshape(-1).double().numpy()
    row = a.row("convs.3").activation
    stats = collect_stats(plain, calib, progress=False)
    width = stats.histograms["convs.3"].width
    assert row.max == pytest.approx(float(x.max())) and row.min == pytest.approx(float(seen[0].min()))
    ordered = np.sort(x)
    for value, p in ((row.p99_9, 99.9), (row.p99_99, 99.99)):  # the k-th smallest |x| lies in the same bin
        assert abs(value - ordered[math.ceil(p / 100 * len(x)) - 1]) <= width
    assert row.tail_ratio == pytest.approx(float(x.max()) / row.p99_99)
    # percentile 99.99 on the int8 symmetric grid: the quantizer covers [-p, p]
    assert row.clip == pytest.approx((-row.p99_99, row.p99_99))
    assert a.spec.layer("convs.3").input.scale[0] == pytest.approx(row.p99_99 / 127)
    scheme = constraints_for("tensorrt").activation
    scale, zp = qparams(*activation_range(stats.histograms["convs.3"], "minmax", scheme), scheme)
    minmax = activation_stats(stats, "convs.3", TensorQuant(scheme, (scale,), (zp,)))
    assert minmax.clip[1] == pytest.approx(float(x.max()))


# ---------------------------------------------------------------------------------------------
# Mixed precision


def test_mixed_precision_keeps_exactly_the_bad_layer_in_float(bad_analysis):
    plain, _, ev, a = bad_analysis
    spec, trace = keep_sensitive_layers(plain, a.naive_spec, ev, max_drop=3.0)
    assert [e["layer"] for e in trace] == [None, BAD]
    assert trace[0]["drop"] > 30 and trace[1]["drop"] <= 3.0
    assert [layer.name for layer in spec.layers if layer.precision == "float"] == [BAD]
    record = spec.calibration["mixed_precision"]
    assert record["status"] == "met" and [k["layer"] for k in record["kept_float"]] == [BAD]
    assert "rank 1" in record["kept_float"][0]["reason"]
    again = QuantSpec.from_json(spec.to_json())  # the record and the precision survive JSON
    assert again.layer(BAD).precision == "float" and again.calibration["mixed_precision"]["status"] == "met"
    assert integer_top1(plain, again, ev) >= 0.97


def test_mixed_precision_changes_nothing_when_the_gate_already_holds(bad_analysis):
    plain, _, ev, a = bad_analysis
    spec, trace = keep_sensitive_layers(plain, a.spec, ev, max_drop=5.0, sensitivity=a)
    assert len(trace) == 1 and all(layer.precision == "int" for layer in spec.layers)
    assert spec.calibration["mixed_precision"]["kept_float"] == []


def test_an_unreachable_gate_tries_every_layer_once_and_says_so(bad_analysis):
    plain, _, ev, a = bad_analysis
    # A pool quantizer whose step is far above every value: the logits become the head bias,
    # whatever stays in float, so no gate below ~70 pt can be met.
    pool = TensorQuant(a.spec.pool.scheme, (1e6,), (0,))
    broken = replace(a.spec, pool=pool)
    spec, trace = keep_sensitive_layers(plain, broken, ev, max_drop=0.5)
    assert len(trace) == 1 + len(broken.layers) and sorted(e["layer"] for e in trace[1:]) == sorted(l.name for l in broken.layers)
    record = spec.calibration["mixed_precision"]
    assert record["status"] == "unmet" and record["tried"] == len(broken.layers) and "even with all" in record["message"]
    assert record["drop"] == min(e["drop"] for e in trace)
    with pytest.raises(UserError, match="non-negative"):
        keep_sensitive_layers(plain, a.spec, ev, max_drop=-1.0)
    with pytest.raises(UserError, match="not a layer"):
        keep_sensitive_layers(plain, broken, ev, max_drop=0.5, sensitivity=["convs.9"])


# ---------------------------------------------------------------------------------------------
# Commands






def test_analyze_command_writes_json_and_png(cli, fmnist_ckpt, tmp_path):
    out_dir = tmp_path / "report"
    code, out, _ = cli("-q", "analyze", str(fmnist_ckpt), "--method", "percentile", "--eval-limit", "20", "-o", str(out_dir))
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("convs.", "pool", "head"))]
    assert len(rows) == 24 and "FP32 top-1" in out and "most sensitive, naive:" in out
    d = json.loads((out_dir / "analysis.json").read_text())
    assert len(d["layers"]) == 24 and d["evaluation"]["images"] == 20 and d["method"] == "percentile"
    with Image.open(out_dir / "analysis.png") as img:
        assert img.format == "PNG" and img.size[0] > 800
        img.verify()
    assert not list(out_dir.glob(".*.tmp"))


@pytest.mark.parametrize(
    "argv,words",
    [
        (["analyze", "{ckpt}", "--eval-limit", "0"], ["--eval-limit", "at least 1", "0"]),
        (["analyze", "{ckpt}", "-o", "{file}"], ["is not a folder"]),
        (["analyze", "{ckpt}", "--eval-images", "{missing}"], ["{missing}"]),
        (["calibrate", "{ckpt}", "--max-drop", "-1"], ["--max-drop", "-1"]),
    ],
)
def test_analyze_mistakes_are_one_line(cli, capsys, tmp_path, fmnist_ckpt, argv, words):
    """Exit code 2 and one error line naming the problem, whether argparse or the library catches it."""
    (tmp_path / "file.txt").write_text("x")
    subs = {"ckpt": str(fmnist_ckpt), "file": str(tmp_path / "file.txt"), "missing": str(tmp_path / "nope")}
    try:
        code, _, err = cli("-q", *[a.format(**subs) for a in argv])
    except SystemExit as exit_:  # argparse's own refusal
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err
    assert all(w.format(**subs).lower() in lines[0].lower() for w in words), lines[0]


def test_calibrate_with_a_gate_records_mixed_precision(cli, fmnist_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "spec.json"
    code, text, _ = cli("-q", "calibrate", str(fmnist_ckpt), "--method", "minmax", "--max-drop", "100",
                        "--eval-limit", "20", "-o", str(out))  # fmt: skip
    assert code == 0 and "gate met with 0 layer(s) in float" in text
    record = QuantSpec.from_json(out.read_text()).calibration["mixed_precision"]
    assert record["status"] == "met" and record["max_drop"] == 100 and record["eval_images"] == 20

    import edgerepvgg.quant.mixed as mixed

    def unmet(plain, spec, eval_set, max_drop, **kw):
        record = {"status": "unmet", "fp32_top1": 0.5, "message": "even with all 23 layers tried in float ..."}
        return replace(spec, calibration={**spec.calibration, "mixed_precision": record}), [
            {"layer": None, "float_layers": [], "top1": 0.1, "drop": 40.0}]  # fmt: skip

    monkeypatch.setattr(mixed, "keep_sensitive_layers", unmet)
    out2 = tmp_path / "spec2.json"
    code, _, err = cli("-q", "calibrate", str(fmnist_ckpt), "--method", "minmax", "--max-drop", "0",
                       "--eval-limit", "20", "-o", str(out2))  # fmt: skip
    assert code == 1 and "accuracy gate not met" in err and not out2.exists()


# ---------------------------------------------------------------------------------------------
# Sensitivity is measured on the integer emulation


def test_sensitivity_with_every_quantizer_on_is_the_integer_net():
    """One quantized forward pass: the sensitivity path is IntegerNet, int32 bias rounding included."""
    from edgerepvgg.quant.analysis import quantized_only, quantizers
    from edgerepvgg.quant.emulate import IntegerNet

    from quant_helpers import minmax_spec, tiny_plain

    plain = tiny_plain()
    x = plain.example_input(6)
    for name in ("openvino", "tflite", "tensorrt"):  # int32 bias, int32 bias + int output, float bias
        spec = minmax_spec(plain, constraints_for(name, weight_bits=8))
        assert torch.equal(quantized_only(plain, spec, quantizers(spec))(x), IntegerNet(plain, spec)(x)), name


def test_sensitivity_of_one_layer_quantizes_that_layer_alone():
    from edgerepvgg.quant.analysis import layer_sensitivity, quantized_only
    from edgerepvgg.quant.emulate import IntegerNet
    from edgerepvgg.quant.mixed import with_float_layers

    from quant_helpers import minmax_spec, self_labelled, tiny_plain

    plain = tiny_plain()
    spec = minmax_spec(plain, constraints_for("tflite"))
    x = plain.example_input(4)
    seen: dict[str, torch.Tensor] = {}
    quantized_only(plain, spec, {"convs.3"})(x, observe=seen.__setitem__)
    assert set(seen) == {"convs.3"}
    seen.clear()
    quantized_only(plain, spec, {"head"})(x, observe=seen.__setitem__)
    assert set(seen) == {"head", "output"}  # the output quantizer goes with the head
    others = [layer.name for layer in spec.layers if layer.name != "convs.3"]
    expected = IntegerNet(plain, with_float_layers(spec, others), keep_float=("pool", "output"))(x)
    assert torch.equal(quantized_only(plain, spec, {"convs.3"})(x), expected)
    with pytest.raises(UserError, match="no quantizer 'convs.99'"):
        quantized_only(plain, spec, {"convs.99"})
    ev = self_labelled(plain, n=16)
    (s,) = layer_sensitivity(plain, spec, ev, ["convs.3"])
    logits = IntegerNet(plain, with_float_layers(spec, others), keep_float=("pool", "output"))(
        torch.cat([b for b, _ in ev.batches(256)]))
    assert s.top1 == pytest.approx(float((logits.argmax(1) == ev.labels).float().mean()))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_the_accuracy_gate_is_validated_in_mixed_precision(bad):
    from quant_helpers import minmax_spec, self_labelled, tiny_plain

    plain = tiny_plain()
    spec = minmax_spec(plain, constraints_for("tensorrt"))
    with pytest.raises(UserError, match="--max-drop must be a non-negative") as err:
        keep_sensitive_layers(plain, spec, self_labelled(plain, n=4), max_drop=bad)
    assert "\n" not in str(err.value)


def test_an_unlabelled_or_empty_eval_set_is_refused_by_analysis_and_mixed_alike():
    from edgerepvgg.quant.analysis import layer_sensitivity, require_eval_set

    from quant_helpers import minmax_spec, self_labelled, tiny_plain

    plain = tiny_plain()
    spec = minmax_spec(plain, constraints_for("tensorrt"))
    ev = self_labelled(plain, n=4)
    unlabelled = replace(ev, labels=torch.full((4,), -1))
    empty = replace(ev, images=ev.images[:0], labels=ev.labels[:0])
    for bad in (unlabelled, empty):
        for call in (lambda: require_eval_set(bad), lambda: layer_sensitivity(plain, spec, bad),
                     lambda: keep_sensitive_layers(plain, spec, bad, max_drop=1.0)):  # fmt: skip
            with pytest.raises(UserError, match="must be labelled"):
                call()


def test_write_creates_the_folder_and_refuses_a_file(bad_analysis, tmp_path):
    from edgerepvgg.quant.analysis_report import write

    *_, a = bad_analysis
    json_path, png_path = write(a, tmp_path / "new" / "folder")
    assert json_path.is_file() and png_path.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder; pass -o a folder for analysis.json and analysis.png"):
        write(a, tmp_path / "file")
