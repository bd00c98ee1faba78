"""Running a device bundle where a profile says it runs: push it, run it, pull its result.

Two transports, one protocol. ``remote = "ssh user@host"`` uses the system's OpenSSH: the user's
ssh configuration, keys and known hosts decide authentication (nothing secret is stored here); the
bundle travels as one tar stream, is unpacked beside the old one and renamed into place, runs with
its own ``run.sh`` (which builds the TensorRT engine there first when the bundle needs one), and
its ``result/`` folder comes back as a tar stream. A ``[remote]`` table with ``push``, ``run`` and
``pull`` command templates covers ``adb`` and custom launchers. Either way the result is checked
(:func:`~edgerepvgg.device.results.read_result`) before it replaces ``BUNDLE/result`` on the host,
so a failed or interrupted round trip leaves no half-written result on either side.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgerepvgg.errors import UserError

log = logging.getLogger(__name__)

RESULT_DIR = "result"
DEFAULT_DIR = "edgerepvgg-bundles"  # on the device, relative to the login's home folder
DEFAULT_TIMEOUT_S = 1800.0  # a TensorRT engine build on a Jetson Nano takes minutes
_SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=15")  # never wait for a password prompt
_TEMPLATE_KEYS = ("push", "run", "pull")
_PLACEHOLDERS = {"bundle", "name", "result", "dir", "python"}
_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_UNREACHABLE = 255  # ssh's own exit status: it could not connect or authenticate
_MISSING_RUNTIME = 2  # runner.py: the bundle's runtime is not installed on the device
_NOT_FOUND = 127  # the shell: no such command (e.g. python3)


class RemoteError(UserError):
    """A round trip that failed: the host unreachable, a command failing or timing out, a runtime
    missing on the device. One line with the reason; the row becomes an error."""


@dataclass(frozen=True)
class Remote:
    """Where a profile's bundle runs. ``ssh``: the ssh command (argv) ending with the destination;
    or ``push``/``run``/``pull``: shell command templates with ``{bundle}`` (the local bundle),
    ``{name}``, ``{dir}``, ``{python}`` and ``{result}`` (a local path the pull command creates
    as the result folder), each substituted shell-quoted."""

    ssh: tuple[str, ...] | None = None
    push: str | None = None
    run: str | None = None
    pull: str | None = None
    dir: str = DEFAULT_DIR
    python: str = "python3"
    timeout_s: float = DEFAULT_TIMEOUT_S
    host: str | None = None  # how messages name the device (default: the ssh destination)

    @property
    def where(self) -> str:
        """The device as the user named it: ``host``, else the ssh destination."""
        return self.host or (self.ssh[-1] if self.ssh is not None else "the device")

    @property
    def transport(self) -> str:
        return "ssh" if self.ssh is not None else "command"


def parse_remote(value: object, where: str = "the profile") -> Remote:
    """A Remote from a profile's ``remote`` field: a string (``"ssh [options] user@host"``) or a
    table (``ssh = ...`` or ``push``/``run``/``pull``, plus ``dir``, ``python``, ``timeout_s``, ``host``)."""

    def bad(key: str, problem: str) -> UserError:
        return UserError(f"{where}: field '{key}' {problem}; fix the profile (see targets/README.md)")

    table = {"ssh": value} if isinstance(value, str) else value
    if not isinstance(table, dict):
        raise bad("remote", f"must be a string (\"ssh user@host\") or a table, got {value!r}")
    known = {"ssh", *_TEMPLATE_KEYS, "dir", "python", "timeout_s", "host"}
    for key, v in table.items():
        if key not in known:
            raise bad(f"remote.{key}", f"is unknown (known: {', '.join(sorted(known))})")
        if key == "timeout_s":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise bad("remote.timeout_s", f"must be a positive number of seconds, got {v!r}")
        elif not isinstance(v, str) or not v.strip():
            raise bad(f"remote.{key}", f"must be a non-empty string, got {v!r}")
    templates = [k for k in _TEMPLATE_KEYS if k in table]
    if "ssh" in table and templates:
        raise bad("remote", f"has both ssh and {', '.join(templates)}; use one transport")
    if "ssh" not in table and len(templates) != 3:
        raise bad("remote", "needs ssh = \"ssh user@host\", or all three of push, run and pull")
    ssh = None
    if "ssh" in table:
        try:
            ssh = tuple(shlex.split(table["ssh"]))
        except ValueError as exc:
            raise bad("remote", f"cannot be split into words ({exc})") from None
        if not ssh or Path(ssh[0]).name != "ssh" or len(ssh) < 2 or ssh[-1].startswith("-"):
            raise bad("remote", f"must be an ssh command ending with the destination, e.g. \"ssh user@jetson\", got {table['ssh']!r}")
    for key in templates:
        unknown = {m for m in re.findall(r"{(\w*)}", table[key])} - _PLACEHOLDERS
        if unknown:
            raise bad(f"remote.{key}", f"uses unknown placeholders {sorted(unknown)} (known: {sorted(_PLACEHOLDERS)})")
    options = {k: table[k] for k in ("dir", "python", "host") if k in table}
    return Remote(ssh, *(table.get(k) for k in _TEMPLATE_KEYS), **options,
                  timeout_s=float(table.get("timeout_s", DEFAULT_TIMEOUT_S)))  # fmt: skip


@dataclass(frozen=True)
class RoundTrip:
    """A finished round trip: the checked result folder and the seconds each step took (the run
    includes the runner's own evaluation and timing, and a TensorRT engine build)."""

    result: Path
    push_s: float
    run_s: float
    pull_s: float

    def __str__(self) -> str:
        return f"push {self.push_s:.1f} s, run {self.run_s:.1f} s, fetch {self.pull_s:.1f} s"


def run_remote(remote: Remote, bundle: str | Path, name: str | None = None) -> RoundTrip:
    """Run ``bundle`` on ``remote``; the round trip's result is ``bundle/result``, checked against
    the bundle.

    Raises RemoteError with the reason (unreachable, failed, timed out, runtime missing, a result
    that is not the bundle's); an earlier ``bundle/result`` is then left as it was."""
    bundle = Path(bundle).resolve()
    name = _NAME.sub("-", name or bundle.parent.name or "bundle").strip("-.") or "bundle"
    steps = _SshSteps(remote) if remote.ssh is not None else _CommandSteps(remote)
    with tempfile.TemporaryDirectory(prefix=".remote-", dir=bundle.parent) as tmp:
        staged = Path(tmp) / RESULT_DIR
        started = time.perf_counter()
        steps.push(bundle, name, Path(tmp))
        pushed = time.perf_counter()
        steps.run(name)
        ran = time.perf_counter()
        steps.pull(name, staged, Path(tmp))
        trip = RoundTrip(bundle / RESULT_DIR, pushed - started, ran - pushed, time.perf_counter() - ran)
        log.info("%s on %s: %s", name, remote.where, trip)
        from edgerepvgg.device.results import read_result  # numpy: only once a result is back

        try:
            read_result(staged, bundle)
        except UserError as exc:
            raise RemoteError(f"{remote.where} sent back a result that is not this bundle's: {exc}") from None
        _replace_dir(staged, bundle / RESULT_DIR)
    return trip


def _replace_dir(new: Path, dst: Path) -> None:
    """Move ``new`` to ``dst``, replacing an earlier folder there whole."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.rename(dst, old)
    os.rename(new, dst)
    shutil.rmtree(old, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _call(remote: Remote, what: str, argv: list[str] | str, *, stdin=None, stdout=None, shell: bool = False
          ) -> subprocess.CompletedProcess:  # fmt: skip
    """Run one step of the round trip with the remote's timeout; a failure is a RemoteError that
    names the step and the device and gives the command's last line of output."""
    try:
        proc = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                              stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                              shell=shell, timeout=remote.timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{what} on {remote.where} timed out after {remote.timeout_s:g} s; raise remote.timeout_s "
                          "in the profile or check the device") from None  # fmt: skip
    except OSError as exc:
        raise RemoteError(f"cannot start {what} for {remote.where}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        out = proc.stdout.decode(errors="replace") if isinstance(proc.stdout, bytes) else ""
        reason = _last_line(err or out)
        if remote.ssh is not None and proc.returncode == _UNREACHABLE:
            raise RemoteError(f"cannot reach {remote.where} over ssh: {reason}; check the host, your ssh keys and known_hosts")
        if what == "the run" and proc.returncode == _MISSING_RUNTIME:
            raise RemoteError(f"runtime missing on {remote.where}: {reason}")
        if proc.returncode == _NOT_FOUND:
            raise RemoteError(f"{what} on {remote.where}: command not found ({reason}); install it there or set remote.python")
        raise RemoteError(f"{what} failed on {remote.where} (exit {proc.returncode}): {reason}")
    return proc


class _SshSteps:
    """The round trip over OpenSSH: tar streams in and out, ``sh run.sh`` in between."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def _ssh(self, command: str) -> list[str]:
        ssh = self.remote.ssh
        return [ssh[0], *_SSH_OPTIONS, *ssh[1:], command]

    def _path(self, name: str) -> str:
        return f"{shlex.quote(self.remote.dir)}/{shlex.quote(name)}"

    def push(self, bundle: Path, name: str, tmp: Path) -> None:
        archive = tmp / "bundle.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(bundle, arcname=".", filter=lambda m: None if m.name.startswith(f"./{RESULT_DIR}") else m)
        d = self._path(name)
        unpack = f"set -e; mkdir -p {shlex.quote(self.remote.dir)}; rm -rf {d}.tmp; mkdir {d}.tmp; " \
                 f"tar -xf - -C {d}.tmp; rm -rf {d}; mv {d}.tmp {d}"  # fmt: skip
        with open(archive, "rb") as f:
            _call(self.remote, "copying the bundle", self._ssh(unpack), stdin=f)

    def run(self, name: str) -> None:
        command = f"cd {self._path(name)} && PYTHON={shlex.quote(self.remote.python)} sh run.sh"
        proc = _call(self.remote, "the run", self._ssh(command))
        log.debug("%s", proc.stderr.decode(errors="replace"))

    def pull(self, name: str, staged: Path, tmp: Path) -> None:
        archive = tmp / "result.tar"
        with open(archive, "wb") as f:
            _call(self.remote, "fetching the result", self._ssh(f"tar -cf - -C {self._path(name)} {RESULT_DIR}"), stdout=f)
        _extract(archive, staged.parent, self.remote)


def _extract(archive: Path, into: Path, remote: Remote) -> None:
    """Unpack the device's ``result/`` tar: plain files and folders under ``result/`` only."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if (not parts or parts[0] != RESULT_DIR or ".." in parts or Path(m.name).is_absolute()
                        or not (m.isfile() or m.isdir())):  # fmt: skip
                    raise RemoteError(f"{remote.where} sent back an unexpected entry {m.name!r} in its result")
            for m in members:
                target = into / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except tarfile.TarError as exc:
        raise RemoteError(f"{remote.where} sent back a damaged result ({exc}); run it again") from None


class _CommandSteps:
    """The round trip through the profile's own push/run/pull command templates (adb, launchers)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def _fill(self, template: str, **values: str) -> str:
        values = {"dir": self.remote.dir, "python": self.remote.python, **values}
        return re.sub(r"{(\w+)}", lambda m: shlex.quote(values.get(m.group(1), "")), template)

    def push(self, bundle: Path, name: str, tmp: Path) -> None:
        _call(self.remote, "copying the bundle", self._fill(self.remote.push, bundle=str(bundle), name=name), shell=True)

    def run(self, name: str) -> None:
        _call(self.remote, "the run", self._fill(self.remote.run, name=name), shell=True)

    def pull(self, name: str, staged: Path, tmp: Path) -> None:
        _call(self.remote, "fetching the result", self._fill(self.remote.pull, name=name, result=str(staged)), shell=True)
        if not (staged / "result.json").is_file() and (staged / RESULT_DIR / "result.json").is_file():
            os.rename(staged / RESULT_DIR, tmp / ".nested")  # e.g. `cp -r dir/result {result}` into an existing folder
            shutil.rmtree(staged)
            os.rename(tmp / ".nested", staged)
        if not (staged / "result.json").is_file():
            raise RemoteError(f"the pull command left no result.json in {{result}} for {self.remote.where}; "
                              "it must copy the bundle's result folder there")  # fmt: skip
