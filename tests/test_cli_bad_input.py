"""Bad input on the command line ends in one line and exit 2, before anything is written.

The table of numeric options is read from the parser itself, so an option added later is walked
without editing this file. Parse errors are run through ``main`` in-process (argparse leaves via
``SystemExit(2)``); hypothesis draws values that are only parsed, never run (an accepted value
would start the command). The user mistakes from the issue (a NaN weight, an output folder that
cannot be created, ``--weight-bits 1``/``20``) run the real command. A bug exits 3 with the
traceback and then one "internal error" line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerepvgg import cli as cli_module
from edgerepvgg.cli import EXIT_INTERNAL, EXIT_USAGE, build_parser, main

# What a sub-command needs besides the option under test to get as far as running.
REQUIRED = {"fuse": ["-o", "out.safetensors"], "export": ["--target", "onnxruntime"]}
MALFORMED = ["abc", "", "1.5x", "nan", "inf"]
UNREADABLE = "/proc/edgerepvgg-test/x"  # /proc refuses new folders, even to root


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _numeric_options() -> list[tuple[str, str, object]]:
    """(sub-command, option, type) for every option of every sub-command that converts its value."""
    rows = []
    for name, sub in _subcommands(build_parser()).items():
        for action in sub._actions:
            if action.type is not None and action.type is not str and action.option_strings:
                rows.append((name, max(action.option_strings, key=len), action.type))
    return rows


NUMERIC = _numeric_options()
PARSER = build_parser()  # parsing does not change it: one for every parse-only check
CASES = [pytest.param(cmd, opt, id=f"{cmd} {opt}") for cmd, opt, _ in NUMERIC]


def _argv(command: str, option: str, value: str) -> list[str]:
    # --opt=VALUE: a value of "" or "-1" is then the option's value, never a new option
    return [command, f"{option}={value}", *REQUIRED.get(command, [])]


def _one_line(err: str) -> str:
    """The single non-empty stderr line (fails with the whole stderr otherwise)."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{err}"
    return lines[0]


def _parse_only(argv: list[str]) -> tuple[argparse.Namespace | None, int | None, str]:
    """(namespace, None, "") if the parser accepts ``argv``, else (None, exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return PARSER.parse_args(argv), None, ""
        except SystemExit as exc:
            return None, exc.code, err.getvalue()


def _main_usage_error(argv: list[str], capsys) -> str:
    """Run ``main(argv)`` expecting a parse-time refusal: exit 2, one line; returns that line."""
    ns, _, _ = _parse_only(argv)
    assert ns is None, f"the parser accepted {argv} (not running it: an accepted value starts the command)"
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == EXIT_USAGE, err
    assert out == ""
    return _one_line(err)


def _empty(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "something was written"


# ---------------------------------------------------------------------------------------------
# The table itself


def test_the_option_table_holds_the_numeric_options_of_every_quantizing_and_training_command():
    table = {(cmd, opt) for cmd, opt, _ in NUMERIC}
    for expected in [("info", "--size"), ("calibrate", "--weight-bits"), ("calibrate", "--percentile"),
                     ("analyze", "--eval-limit"), ("train", "--lr"), ("qat", "--distill-alpha"),
                     ("export", "--threads"), ("compare", "--threads")]:  # fmt: skip
        assert expected in table
    assert {cmd for cmd, _, _ in NUMERIC} == set(_subcommands(build_parser())) - {"targets"}


# ---------------------------------------------------------------------------------------------
# Every numeric option of every sub-command, through main


@pytest.mark.parametrize("value", MALFORMED)
@pytest.mark.parametrize(("command", "option"), CASES)
def test_a_malformed_number_is_one_line_naming_the_option_and_exit_2(command, option, value, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    line = _main_usage_error(_argv(command, option, value), capsys)
    assert option in line and line.startswith(f"edgerepvgg {command}: error:")
    _empty(tmp_path)


@pytest.mark.parametrize(("command", "option"), CASES)
def test_a_negative_number_is_one_line_naming_the_option_and_exit_2(command, option, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    line = _main_usage_error(_argv(command, option, "-1"), capsys)
    assert option in line and "-1" in line
    _empty(tmp_path)


@pytest.mark.parametrize(("command", "option"), CASES)
def test_zero_is_either_accepted_or_one_line_naming_the_option_and_exit_2(command, option):
    ns, code, err = _parse_only(_argv(command, option, "0"))
    if ns is None:
        assert code == EXIT_USAGE, err
        assert option in _one_line(err)


# ---------------------------------------------------------------------------------------------
# Drawn values (parse only): accepted as the number it reads, or refused in one line


def _accepts_or_refuses_in_one_line(command: str, option: str, text: str) -> None:
    ns, code, err = _parse_only(_argv(command, option, text))
    if ns is None:
        assert code == EXIT_USAGE, err
        assert option in _one_line(err), err
        return
    value = getattr(ns, option.lstrip("-").replace("-", "_"))
    if isinstance(value, list):  # a list option (--mean, --std) given one value
        (value,) = value
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{option}={text} accepted as {value!r}"
    assert value == float(text), f"{option}={text} read as {value!r}"


DRAWN = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("command", "option"), CASES)
@DRAWN
@given(number=st.one_of(st.integers(-3, 300), st.integers(-(10**12), 10**12)))
def test_a_drawn_whole_number_is_accepted_as_itself_or_refused_in_one_line(command, option, number):
    _accepts_or_refuses_in_one_line(command, option, str(number))


@pytest.mark.parametrize(("command", "option"), CASES)
@DRAWN
@given(number=st.one_of(st.floats(-2, 200), st.floats(allow_nan=True, allow_infinity=True)))
def test_a_drawn_number_is_accepted_as_itself_or_refused_in_one_line(command, option, number):
    _accepts_or_refuses_in_one_line(command, option, repr(number))


# ---------------------------------------------------------------------------------------------
# The user mistakes from the issue, run for real


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """An A0 checkpoint with one NaN in one conv weight deep in the net; (path, tensor key)."""
    import torch

    from edgerepvgg import create_model, save_checkpoint
    from edgerepvgg.checkpoints import meta_for
    from edgerepvgg.data import fashion_mnist_spec

    model = create_model("A0", num_classes=10, in_chans=1).eval()
    convs = [(name, p) for name, p in model.named_parameters() if p.dim() == 4]
    name, weight = convs[len(convs) // 2]
    with torch.no_grad():
        weight.view(-1)[3] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "a0-nan.safetensors"
    save_checkpoint(path, model, meta_for(model, fashion_mnist_spec()))
    return path, name


@pytest.mark.parametrize("rest", [["fuse", "-o", "out.safetensors"], ["calibrate", "-o", "spec.json"],
                                  ["export", "--target", "onnxruntime", "-o", "outdir"]],  # fmt: skip
                         ids=["fuse", "calibrate", "export"])
def test_a_checkpoint_with_a_nan_weight_is_one_line_naming_the_tensor(rest, nan_checkpoint, cli, monkeypatch, tmp_path):
    path, key = nan_checkpoint
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(rest[0], str(path), *rest[1:])
    assert code == EXIT_USAGE, err
    line = _one_line(err)
    assert line.startswith(f"edgerepvgg {rest[0]}: error:") and key in line and "NaN" in line
    _empty(tmp_path)


@pytest.mark.parametrize("argv", [["export", "--target", "onnxruntime", "--no-eval", "--no-latency"],
                                  ["analyze", "--eval-limit", "10"]],  # fmt: skip
                         ids=["export", "analyze"])
def test_an_output_folder_that_cannot_be_created_is_one_line_naming_it(argv, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*argv, "-o", UNREADABLE)
    assert code == EXIT_USAGE, err
    line = _one_line(err)
    assert line.startswith(f"edgerepvgg {argv[0]}: error:") and UNREADABLE in line
    _empty(tmp_path)


def test_compare_into_a_folder_that_cannot_be_created_is_one_line_naming_it(cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("compare", "--targets", "onnxruntime", "--eval-limit", "10", "-o", UNREADABLE)
    assert code == EXIT_USAGE, err
    line = _one_line(err)
    assert line.startswith("edgerepvgg compare: error:") and UNREADABLE in line
    _empty(tmp_path)


def test_compare_refuses_a_folder_that_cannot_be_created_before_any_work(cli, monkeypatch, tmp_path):
    import edgerepvgg._compare as compare_module

    def work(*args, **kwargs):
        raise AssertionError("compare calibrated or evaluated before checking -o")

    monkeypatch.setattr(compare_module, "calibration_set", work)
    monkeypatch.setattr(compare_module, "references", work)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("compare", "--targets", "onnxruntime", "--eval-limit", "10", "-o", UNREADABLE)
    assert code == EXIT_USAGE, err
    assert UNREADABLE in _one_line(err)


@pytest.mark.parametrize("bits", ["1", "20"])
def test_weight_bits_outside_2_to_8_is_refused_at_parse_time_in_one_line(bits, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    line = _main_usage_error(["calibrate", "--weight-bits", bits], capsys)
    assert "--weight-bits" in line and bits in line
    _empty(tmp_path)


# ---------------------------------------------------------------------------------------------
# A bug is not a user error


def test_an_internal_error_exits_3_with_the_traceback_then_one_internal_error_line(cli, monkeypatch, tmp_path):
    import edgerepvgg.targets

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(edgerepvgg.targets, "list_targets", boom)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("targets")
    assert code == EXIT_INTERNAL
    assert "Traceback" in err and "boom" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edgerepvgg targets: internal error") and last.endswith("RuntimeError: boom")
    assert cli_module.EXIT_INTERNAL == 3
    _empty(tmp_path)
