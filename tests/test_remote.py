"""Remote profiles: compare sends a bundle to where the profile runs, runs it there, fetches the
result and scores it like a host row.

The "device" is this machine reached two ways: through a real OpenSSH server that the test starts
on 127.0.0.1 with a throwaway host key and user key (Debian's ``openssh-server``; skipped with the
reason where it is missing), and through the command transport's push/run/pull templates in a
local shell. Its Python is this venv's with torch and edgerepvgg blocked, as on a device.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edgerepvgg._compare import DEVICE_TIMER, HOST_TIMER, compare
from edgerepvgg.device.remote import Remote, RemoteError, parse_remote, run_remote
from edgerepvgg.errors import UserError
from edgerepvgg.profiles import Profile, load_profile

from helpers import loopback_sshd, openssh_missing, torch_free_python
from quant_helpers import self_labelled, tiny_plain

needs_sshd = pytest.mark.skipif(bool(openssh_missing()), reason=openssh_missing() or "OpenSSH is installed")


@pytest.fixture(scope="module")
def plain():
    return tiny_plain(classes=5).eval()


@pytest.fixture(scope="module")
def data(plain):
    return self_labelled(plain, 24, seed=3)


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> str:
    """A 'device' interpreter: this venv's Python in which importing torch or edgerepvgg fails."""
    wrapper = torch_free_python(tmp_path_factory.mktemp("device-python"))
    probe = subprocess.run([str(wrapper), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "is blocked" in probe.stderr  # the blocker works
    return str(wrapper)


def host_profile(name: str = "ort-int8") -> Profile:
    return Profile(name, "onnxruntime", "int8", threads=1, batch=4, weight_bits=7)


def local_remote(device_dir: Path, python: str, **changes) -> Remote:
    """The command transport to a 'device' that is a folder on this machine."""
    remote = Remote(push=f"mkdir -p {device_dir} && rm -rf {device_dir}/{{name}} && cp -r {{bundle}} {device_dir}/{{name}}",
                    run=f"cd {device_dir}/{{name}} && PYTHON={{python}} sh run.sh",
                    pull=f"cp -r {device_dir}/{{name}}/result {{result}}", python=python, timeout_s=300)  # fmt: skip
    return replace(remote, **changes)


def run_compare(plain, data, tmp_path: Path, *profiles: Profile, out: str = "cmp"):
    return compare(plain, list(profiles), tmp_path / out, data, data, calibration="minmax", progress=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith((".remote-", ".result")))


# --- the profile field -----------------------------------------------------------------------


def test_remote_string_is_an_ssh_command_and_a_table_sets_the_rest(tmp_path):
    path = tmp_path / "jetson.toml"
    path.write_text('backend = "tensorrt"\nremote = "ssh -p 2222 nvidia@orin.local"\n')
    remote = load_profile(path).remote
    assert remote.ssh == ("ssh", "-p", "2222", "nvidia@orin.local") and remote.where == "nvidia@orin.local"
    path.write_text('backend = "tflite"\n[remote]\npush = "adb push {bundle} /data/local/tmp/{name}"\n'
                    'run = "adb shell sh /data/local/tmp/{name}/run.sh"\npull = "adb pull /data/local/tmp/{name}/result {result}"\n'
                    'timeout_s = 60\npython = "/data/local/tmp/py/bin/python3"\n')  # fmt: skip
    remote = load_profile(path).remote
    assert remote.transport == "command" and remote.where == "the device" and remote.timeout_s == 60.0


@pytest.mark.parametrize(
    "value, problem",
    [
        ('"scp host"', "must be an ssh command"),
        ('"ssh"', "must be an ssh command"),
        ('"ssh host -v"', "must be an ssh command"),
        ("3", "must be a string"),
        ('{ push = "cp {bundle} x" }', "all three of push, run and pull"),
        ('{ ssh = "ssh h", run = "x" }', "use one transport"),
        ('{ ssh = "ssh h", timeout_s = 0 }', "positive number of seconds"),
        ('{ ssh = "ssh h", password = "x" }', "'remote.password' is unknown"),
        ('{ push = "cp {bundel} x", run = "r", pull = "p" }', "unknown placeholders ['bundel']"),
    ],
)
def test_malformed_remote_is_one_line_naming_the_field(tmp_path, value, problem):
    path = tmp_path / "bad.toml"
    path.write_text(f'backend = "onnxruntime"\nremote = {value}\n')
    with pytest.raises(UserError) as err:
        load_profile(path)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_loading_a_remote_profile_imports_no_torch():
    code = "import sys, edgerepvgg.profiles as p; p.parse_remote('ssh a@b'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# --- the command transport, through a local shell ---------------------------------------------


def test_a_remote_row_is_measured_there_and_scored_like_the_host_row(plain, data, tmp_path, device_python):
    remote = local_remote(tmp_path / "device", device_python)
    device = Profile("dev-int8", "onnxruntime", "int8", device="a device", threads=1, batch=4, weight_bits=7, remote=remote)
    result = run_compare(plain, data, tmp_path, host_profile(), device)
    rows = {r.name: r for r in result.rows}
    host, dev = rows["ort-int8"], rows["dev-int8@device"]
    assert dev.status == "ok" and not result.failed, dev.why
    assert (dev.top1, dev.agree_fp32, dev.agree_emulation) == (host.top1, host.agree_fp32, host.agree_emulation)
    assert dev.agree_emulation == 1.0  # the same integers as the referee
    assert dev.timer == DEVICE_TIMER and host.timer == HOST_TIMER and dev.throughput_batch == 4
    assert socket.gethostname() in dev.device and "over command to the device" in dev.why
    bundle = tmp_path / "cmp" / "dev-int8" / "bundle"
    recorded = json.loads((bundle / "result" / "result.json").read_text())["latency"]
    assert dev.p50_ms == next(r["p50_ms"] for r in recorded if r["batch"] == 1)  # the device's figure, not the host's
    assert (tmp_path / "device" / "dev-int8" / "run.sh").is_file()
    assert leftovers(tmp_path / "cmp") == []


def test_run_remote_replaces_an_earlier_result_whole(plain, data, tmp_path, device_python):
    remote = local_remote(tmp_path / "device", device_python)
    profile = Profile("dev", "onnxruntime", "fp32", threads=1, batch=2, remote=remote)
    run_compare(plain, data, tmp_path, profile)
    bundle = tmp_path / "cmp" / "dev" / "bundle"
    (bundle / "result" / "stale.txt").write_text("from an earlier run")
    first = (bundle / "result" / "result.json").read_text()
    run_remote(remote, bundle, "dev")
    assert not (bundle / "result" / "stale.txt").exists()
    assert (bundle / "result" / "result.json").read_text() != first  # new samples, new file
    assert leftovers(bundle.parent) == []


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"run": "echo the board is off >&2; exit 7"}, "the run failed on the device (exit 7): the board is off"),
        ({"push": "exit 3"}, "copying the bundle failed on"),
        ({"run": "sleep 20", "timeout_s": 1.0}, "timed out after 1 s"),
        ({"pull": "true"}, "left no result.json"),
        ({"pull": "mkdir -p {result} && echo '{{}}' > {result}/result.json"}, "sent back a result that is not this bundle's"),
    ],
)
def test_a_failing_round_trip_is_an_error_row_and_leaves_nothing_half_written(plain, data, tmp_path, device_python,
                                                                                change, reason):  # fmt: skip
    remote = local_remote(tmp_path / "device", device_python, **change)
    result = run_compare(plain, data, tmp_path, Profile("dev", "onnxruntime", "fp32", threads=1, batch=2, remote=remote))
    row = {r.name: r for r in result.rows}["dev"]
    assert row.status == "error" and reason in row.why and result.failed
    assert not (tmp_path / "cmp" / "dev" / "bundle" / "result").exists()
    assert leftovers(tmp_path / "cmp") == []


def test_a_runtime_missing_on_the_device_is_said_so(plain, data, tmp_path, device_python):
    python = torch_free_python(tmp_path / "no-ort", "onnxruntime")
    remote = local_remote(tmp_path / "device", str(python))
    result = run_compare(plain, data, tmp_path, Profile("dev", "onnxruntime", "fp32", threads=1, remote=remote))
    row = {r.name: r for r in result.rows}["dev"]
    assert row.status == "error" and "runtime missing on" in row.why and "pip install onnxruntime" in row.why


def test_cli_compare_with_a_remote_profile_measures_there_and_fails_on_a_fault(tmp_path, device_python, cli, fmnist_ckpt):
    device = tmp_path / "device"
    good = tmp_path / "dev.toml"
    good.write_text(f'backend = "onnxruntime"\nprecision = "fp32"\nthreads = 1\nbatch = 2\n[remote]\n'
                    f'push = "mkdir -p {device} && rm -rf {device}/{{name}} && cp -r {{bundle}} {device}/{{name}}"\n'
                    f'run = "cd {device}/{{name}} && PYTHON={{python}} sh run.sh"\n'
                    f'pull = "cp -r {device}/{{name}}/result {{result}}"\npython = "{device_python}"\n')  # fmt: skip
    rc, out, err = cli("-q", "compare", str(fmnist_ckpt), "--profiles", str(good), "--eval-limit", "20", "-o", str(tmp_path / "ok"))
    assert rc == 0 and "dev@device" in out and "device, python" in out, err
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("sh run.sh", "exit 9"))
    rc, out, err = cli("-q", "compare", str(fmnist_ckpt), "--profiles", str(bad), "--eval-limit", "20", "-o", str(tmp_path / "bad"))
    assert rc == 1 and "failed on" in out + err and "Traceback" not in err


# --- a real OpenSSH server on 127.0.0.1 ---------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """The ssh_config of a throwaway OpenSSH server on 127.0.0.1 (tests/helpers.py)."""
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as config:
        yield config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_sshd
def test_a_remote_ssh_profile_produces_a_row_measured_through_a_real_ssh_server(plain, data, tmp_path, sshd, device_python):
    remote = parse_remote({"ssh": f"ssh -F {sshd} loopback", "dir": str(tmp_path / "device-home"), "python": device_python})
    profile = Profile("ssh-int8", "onnxruntime", "int8", device="loopback", threads=1, batch=4, weight_bits=7, remote=remote)
    result = run_compare(plain, data, tmp_path, host_profile(), profile)
    rows = {r.name: r for r in result.rows}
    dev, host = rows["ssh-int8@device"], rows["ort-int8"]
    assert dev.status == "ok" and not result.failed, dev.why
    assert (dev.top1, dev.agree_emulation) == (host.top1, host.agree_emulation) and dev.agree_emulation == 1.0
    assert dev.timer == DEVICE_TIMER and "over ssh to loopback" in dev.why
    assert (tmp_path / "device-home" / "ssh-int8" / "result" / "result.json").is_file()  # it ran over there
    assert leftovers(tmp_path / "cmp") == [] and not list((tmp_path / "device-home").glob("*.tmp"))


@needs_sshd
def test_an_unreachable_ssh_host_is_an_error_row(plain, data, tmp_path, sshd):
    config = sshd.read_text().replace("HostName 127.0.0.1", "HostName 127.0.0.1\n  ConnectTimeout 3")
    port = next(line.split()[1] for line in config.splitlines() if line.strip().startswith("Port"))
    closed = tmp_path / "ssh_config"
    closed.write_text(config.replace(f"Port {port}", f"Port {_free_port()}"))
    remote = parse_remote({"ssh": f"ssh -F {closed} loopback", "dir": str(tmp_path / "device-home"), "timeout_s": 60})
    result = run_compare(plain, data, tmp_path, Profile("gone", "onnxruntime", "fp32", threads=1, remote=remote))
    row = {r.name: r for r in result.rows}["gone"]
    assert row.status == "error" and "cannot reach loopback over ssh" in row.why and result.failed
    with pytest.raises(RemoteError, match="cannot reach loopback"):
        run_remote(remote, tmp_path / "cmp" / "gone" / "bundle")


def test_the_vendor_tool_that_ran_on_the_device_is_shown_beside_the_runner_figure(plain, data, tmp_path, device_python):
    """OpenVINO's benchmark_app is in this venv, so the 'device' finds it beside its Python."""
    pytest.importorskip("openvino")
    remote = local_remote(tmp_path / "device", device_python)
    result = run_compare(plain, data, tmp_path, Profile("ov", "openvino", "fp32", threads=1, batch=2, remote=remote))
    row = {r.name: r for r in result.rows}["ov@device"]
    assert row.status == "ok", row.why
    assert "(benchmark_app)" in row.native and " ms " in row.native and row.timer == DEVICE_TIMER
    assert float(row.native.split()[0]) > 0
