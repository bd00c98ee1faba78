"""Image folders at scale: subsets chosen among the files before decoding, and memory bounded by
counting decoded images (never by timing). Decoding is counted by wrapping ``data.load_image``."""

from __future__ import annotations

import io
import logging
import multiprocessing
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgerepvgg import data
from edgerepvgg.data import ImageFiles, InputSpec, TensorDataset, UserError
from edgerepvgg.evaluate import predict

GRAY = InputSpec(size=8, resize=8, channels=1, mean=(0.5,), std=(0.5,))
FORK = multiprocessing.get_start_method() == "fork"  # a patched decoder reaches worker processes only through fork
needs_fork = pytest.mark.skipif(not FORK, reason="counting decodes in worker processes needs the fork start method")


def _png(value: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


def _labelled(root: Path, counts: dict[str, int]) -> Path:
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _png(10 * k + i, root / name / f"{i:03d}.png")  # pixel value says class and index
    return root


def _flat(root: Path, n: int) -> Path:
    for i in range(n):
        _png(i % 256, root / f"{i:04d}.png")
    return root


@pytest.fixture
def decodes(monkeypatch):
    """Every file ``data.load_image`` decodes in this process, in order."""
    seen: list[str] = []
    real = data.load_image

    def counting(path, spec):
        seen.append(f"{Path(path).parent.name}/{Path(path).name}")
        return real(path, spec)

    monkeypatch.setattr(data, "load_image", counting)
    return seen


# ---------------------------------------------------------------------------------------------
# Choosing files: class-balanced where labelled, seeded, deterministic


def test_balanced_indices_are_balanced_seeded_and_deterministic():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 20)
    pick = data.balanced_indices(labels, 12, seed=3)
    assert np.bincount(labels[pick]).tolist() == [4, 4, 4] and pick.tolist() == sorted(set(pick.tolist()))
    assert data.balanced_indices(labels, 12, seed=3).tolist() == pick.tolist()  # same seed, same files
    assert any(data.balanced_indices(labels, 12, seed=s).tolist() != pick.tolist() for s in range(4, 8))
    # the same files stratified_subset picks when the classes divide evenly (--eval-limit keeps its subset)
    toy = TensorDataset(torch.arange(35, dtype=torch.uint8).reshape(35, 1, 1, 1), torch.from_numpy(labels), GRAY, "toy")
    assert data.stratified_subset(toy, 4, seed=3).images.flatten().tolist() == pick.tolist()
    # not divisible: exactly n, the classes within one of each other
    odd = np.bincount(labels[data.balanced_indices(labels, 13, seed=0)])
    assert odd.sum() == 13 and odd.max() - odd.min() == 1
    # a short class gives all it has, the others make up the rest
    assert np.bincount(labels[data.balanced_indices(labels, 27, seed=0)]).tolist() == [10, 5, 12]
    assert data.balanced_indices(labels, 35).tolist() == list(range(35))
    assert data.balanced_indices(labels, 99).tolist() == list(range(35))
    # fewer than the classes: n images, one from each of n classes
    assert sorted(np.bincount(labels[data.balanced_indices(labels, 2, seed=1)], minlength=3).tolist()) == [0, 1, 1]
    # unlabelled: a seeded uniform sample
    unknown = np.full(50, -1)
    a = data.balanced_indices(unknown, 7, seed=0)
    assert a.size == 7 and len(set(a.tolist())) == 7 and a.tolist() == data.balanced_indices(unknown, 7, seed=0).tolist()
    assert a.tolist() != data.balanced_indices(unknown, 7, seed=1).tolist()
    with pytest.raises(ValueError):
        data.balanced_indices(labels, 0)


def test_eval_limit_decodes_only_the_chosen_files(tmp_path, decodes):
    root = _labelled(tmp_path / "ev", {"a": 10, "b": 4, "c": 10})
    ds = data.evaluation_set(GRAY, root, limit=9, workers=0)
    assert len(decodes) == 9 and len(ds) == 9  # nothing else was decoded
    assert torch.bincount(ds.labels).tolist() == [3, 3, 3] and "3 per class (seed 0)" in ds.source
    chosen = sorted(decodes)
    again = data.image_folder(root, GRAY, limit=9, workers=0)  # deterministic: the same files
    assert sorted(decodes[9:]) == chosen and torch.equal(again.images, ds.images)
    other = data.image_folder(root, GRAY, limit=9, seed=1, workers=0)
    assert sorted(decodes[18:]) != chosen and torch.bincount(other.labels).tolist() == [3, 3, 3]
    # pixel values name the files: every image really is the file of its label
    assert all(int(img[0, 0, 0]) // 10 == int(label) for img, label in zip(ds.images, ds.labels))
    # 10 is not a multiple of 3 classes: exactly 10, balanced, said so
    ten = data.image_folder(root, GRAY, limit=10, workers=0)
    assert len(ten) == 10 and len(decodes) == 37 and "class-balanced sample of 24 (seed 0)" in ten.source


def test_calib_limit_decodes_only_the_sample_and_the_cli_reports_it(tmp_path, cli, fmnist_ckpt, decodes):
    from edgerepvgg.quant import load_spec

    root = _flat(tmp_path / "calib", 12)
    ds = data.calibration_images(data.fashion_mnist_spec(), root, limit=5, workers=0)
    assert len(ds) == 5 and len(decodes) == 5 and "a random sample of 12 (seed 0)" in ds.source
    out = tmp_path / "spec.json"
    code, stdout, err = cli("-q", "calibrate", str(fmnist_ckpt), "--images", str(root), "--calib-limit", "7", "--method", "minmax",
                            "--no-cache", "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert len(decodes) == 5 + 7  # the command decoded its 7 and no more
    spec = load_spec(out)
    assert spec.calibration["images"] == 7 and "random sample of 12" in spec.calibration["source"]
    assert "on 7 images from" in stdout


def test_default_calibration_sample_is_512_and_is_said(tmp_path, caplog):
    from quant_helpers import tiny_plain

    from edgerepvgg.quant.calibrate import calibrate

    plain = tiny_plain(size=8)
    root = _flat(tmp_path / "many", 600)
    with caplog.at_level(logging.INFO, logger="edgerepvgg.data"):
        ds = data.calibration_images(plain.input_spec, root, workers=0)
    assert data.DEFAULT_CALIB_LIMIT == 512 and len(ds) == 512
    assert any(r.getMessage().startswith("calibrating on 512 images of") and "random sample of 600" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    spec = calibrate(plain, ds, "tensorrt", "minmax", progress=False, cache=False)
    assert spec.calibration["images"] == 512 and "random sample of 600 (seed 0)" in spec.calibration["source"]
    # the bundled set (256 images) is under the default: all of it, as before
    bundled = data.calibration_images(data.fashion_mnist_spec())
    assert len(bundled) == 256 and "sample" not in bundled.source


# ---------------------------------------------------------------------------------------------
# Streaming: bounded memory, counted


def test_a_streamed_folder_holds_a_few_batches_of_decoded_images_whatever_its_size(tmp_path, monkeypatch):
    root = _labelled(tmp_path / "big", {"a": 20, "b": 20})
    decoded, alive, peak = [0], [0], [0]  # images decoded; decoded images alive (one by one, then in batches)
    real_load, real_collate = data.load_image, data._collate

    def track(t: torch.Tensor, images: int) -> torch.Tensor:
        alive[0] += images
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - images))  # counts down when it is freed
        return t

    def loading(path, spec):
        decoded[0] += 1
        return track(real_load(path, spec), 1)

    def collating(items):
        kept, x, failed = real_collate(items)
        return kept, track(x, x.shape[0]) if x is not None else None, failed

    monkeypatch.setattr(data, "load_image", loading)
    monkeypatch.setattr(data, "_collate", collating)
    ds = data.image_folder(root, GRAY, workers=0, preload_bytes=0)
    assert isinstance(ds, ImageFiles) and len(ds) == 40 and decoded[0] == 0  # headers only
    seen: list[tuple[int, int]] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append((decoded[0], alive[0]))
        return torch.zeros(x.shape[0], 2)

    for _ in range(2):  # every pass decodes again; nothing accumulates between passes
        logits = predict(model, ds, batch_size=4)
        assert logits.shape == (40, 2)
    assert decoded[0] == 80 and len(seen) == 20
    batch = 4
    assert [d for d, _ in seen] == [batch * (k + 1) for k in range(20)]  # decoded just in time, one batch at a time
    # in use: the batch the model reads; at most, while the next is stacked: that one, the next one's images and their stack
    assert max(a for _, a in seen) <= batch and peak[0] <= 3 * batch
    assert ds.labels.tolist() == [0] * 20 + [1] * 20


@needs_fork
def test_worker_processes_decode_at_most_their_prefetch_ahead(tmp_path, monkeypatch):
    root = _flat(tmp_path / "big", 64)
    count = multiprocessing.Value("i", 0)
    real = data.load_image

    def counting(path, spec):
        with count.get_lock():
            count.value += 1
        return real(path, spec)

    monkeypatch.setattr(data, "load_image", counting)
    workers, batch = 2, 4
    ds = data.image_files(root, GRAY, workers=workers, preload_bytes=0)
    assert isinstance(ds, ImageFiles) and count.value == 0
    bound = workers * data.PREFETCH * batch  # decoded beyond what was read, at most
    read, ahead = 0, []
    for x, _ in ds.batches(batch):
        read += x.shape[0]
        ahead.append(count.value - read)
    assert read == 64 and count.value == 64 and max(ahead) <= bound
    expected = data.image_files(root, GRAY, workers=0)  # decoded in this process, held in memory
    assert isinstance(expected, TensorDataset) and not isinstance(expected, ImageFiles)
    assert torch.equal(torch.cat([x for x, _ in ds.batches(5)]), torch.cat([x for x, _ in expected.batches(5)]))


def test_streamed_and_held_sets_agree_and_fingerprint_their_files(tmp_path):
    root = _labelled(tmp_path / "f", {"a": 5, "b": 6})
    held = data.image_folder(root, GRAY, workers=0)
    streamed = data.image_folder(root, GRAY, workers=0, preload_bytes=0)
    assert type(held) is TensorDataset and isinstance(streamed, ImageFiles)
    assert torch.equal(streamed.images, held.images) and torch.equal(streamed.labels, held.labels)
    assert (streamed.source, streamed.class_names, len(streamed)) == (held.source, held.class_names, len(held))
    first = streamed.fingerprint()
    assert first == data.image_folder(root, GRAY, workers=0, preload_bytes=0).fingerprint()
    _png(200, root / "a" / "000.png")  # one file changed: another fingerprint
    assert data.image_folder(root, GRAY, workers=0, preload_bytes=0).fingerprint() != first
    part = data.subset(streamed, [0, 6], "two")
    assert isinstance(part, ImageFiles) and part.labels.tolist() == [0, 1] and part.images.shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# Bad files: skipped when the header says so, one line naming the file when the body does


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=needs_fork)])
def test_a_file_only_decoding_finds_bad_stops_the_stream_naming_it(tmp_path, workers, caplog):
    root = _flat(tmp_path / "x", 6)
    (root / "text.png").write_text("not an image")  # the header check skips it, as the eager reader does
    cut = _truncated_png(root / "0003-cut.png")
    with caplog.at_level(logging.WARNING, logger="edgerepvgg.data"):
        ds = data.image_files(root, GRAY, workers=workers, preload_bytes=0)
    assert len(ds) == 7 and [Path(p).name for p in ds.skipped] == ["text.png"]
    assert any(r.getMessage().startswith("skipping") and "text.png" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match=re.escape(str(cut)) + r" cannot be decoded \(.*truncated.*\).*remove or replace"):
        list(ds.batches(2))


def test_the_cli_says_which_file_broke_a_streamed_pass_in_one_line(tmp_path, cli, fmnist_ckpt, monkeypatch):
    root = _flat(tmp_path / "x", 6)
    cut = _truncated_png(root / "0002-cut.png")
    monkeypatch.setattr(data, "PRELOAD_BYTES", 0)  # stream even this small folder
    workers = ["--workers", "2"] if FORK else ["--workers", "0"]
    code, _, err = cli("-q", "calibrate", str(fmnist_ckpt), "--images", str(root), "--calib-limit", "0", "--no-cache",
                       "--method", "minmax", *workers, "-o", str(tmp_path / "s.json"))  # fmt: skip
    assert code == 2 and "Traceback" not in err and "worker" not in err.lower()
    assert err.strip().count("\n") == 0 and str(cut) in err and "cannot be decoded" in err
    assert not (tmp_path / "s.json").exists()


def test_workers_and_calib_limit_must_be_whole_numbers(tmp_path, cli, fmnist_ckpt, capsys):
    for flag, bad in (("--workers", "-1"), ("--workers", "two"), ("--calib-limit", "-5")):
        with pytest.raises(SystemExit) as exit:
            cli("calibrate", str(fmnist_ckpt), flag, bad)
        assert exit.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(UserError, match="workers must be"):
        data.image_files(_flat(tmp_path / "w", 2), GRAY, workers=-1)



def test_export_and_compare_calibrate_on_the_limited_sample(tmp_path, decodes):
    from quant_helpers import tiny_plain

    from edgerepvgg._compare import compare
    from edgerepvgg._export import ExportOptions, export
    from edgerepvgg.profiles import Profile

    plain = tiny_plain()
    root = _flat(tmp_path / "calib", 12)
    report = export(plain, "onnxruntime", tmp_path / "out", "int8", images=root, calibration="minmax", cache=False,
                    options=ExportOptions(latency=False, weight_bits=8, calib_limit=5, workers=0))  # fmt: skip
    assert report.quant["calibration"]["images"] == 5 and "random sample of 12" in report.quant["origin"]
    assert len(decodes) == 5  # calibration and the agreement check (no labels) share the 5 decoded images
    result = compare(plain, [Profile("ort-int8", "onnxruntime", "int8", threads=1, weight_bits=8)], tmp_path / "cmp", root,
                     calibration="minmax", cache=False, progress=False, calib_limit=3, workers=0)  # fmt: skip
    assert result.eval_images == 3 and len(decodes) == 5 + 3
