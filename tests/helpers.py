"""Small synthetic data for tests: Fashion-MNIST-shaped IDX files with learnable classes, and
random normalized batches for a model's input spec."""

from __future__ import annotations

import contextlib
import gzip
import struct
from pathlib import Path
from typing import Iterator

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def synthetic_images(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class decides which horizontal band is bright (plus noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    band = 28 // classes
    for i, y in enumerate(labels):
        images[i, y * band : (y + 1) * band + 1, :] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_fake_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 64, classes: int = 10) -> Path:
    """Fashion-MNIST's four IDX files in ``root``, holding :func:`synthetic_images` (seeds 0 and 1)."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, classes=classes, seed=seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def random_batch(plain, n: int, seed: int = 0) -> np.ndarray:
    """``n`` standard-normal NCHW float32 images shaped for ``plain``'s input spec (what a
    runner takes: numpy, already normalized)."""
    s = plain.input_spec
    return np.random.default_rng(seed).standard_normal((n, *s.shape)).astype(np.float32)


# --- a device reached over real OpenSSH: tests/test_remote.py and benchmarks/remote_loopback.py ---

SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def openssh_missing() -> str:
    """Why a loopback SSH round trip cannot run here, or ''."""
    import shutil

    if not any(Path(p).exists() for p in SSHD_PATHS) and not shutil.which("sshd"):
        return "no OpenSSH server (apt-get install openssh-server)"
    if not (shutil.which("ssh") and shutil.which("ssh-keygen")):
        return "no OpenSSH client (apt-get install openssh-client)"
    return ""


@contextlib.contextmanager
def loopback_sshd(folder: Path) -> Iterator[Path]:
    """An OpenSSH server for one test or benchmark: 127.0.0.1, a free port, a throwaway host key
    and user key, no passwords. Yields an ssh_config file whose host ``loopback`` reaches it with
    that key, checking the host key strictly against a known_hosts file written here."""
    import os
    import shutil
    import socket
    import subprocess
    import time

    sshd = next((p for p in SSHD_PATHS if Path(p).exists()), None) or shutil.which("sshd")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder (root only)
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    (folder / "authorized_keys").chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {folder / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
    )  # fmt: skip
    host_key = " ".join((folder / "host_key.pub").read_text().split()[:2])
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}\n")
    config = folder / "ssh_config"
    config.write_text(
        f"Host loopback\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {folder / 'user_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
    )  # fmt: skip
    with open(folder / "sshd.log", "w") as log:
        server = subprocess.Popen([sshd, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(100):
                if server.poll() is not None:
                    raise RuntimeError(f"sshd did not start: {(folder / 'sshd.log').read_text()}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            yield config
        finally:
            server.terminate()
            server.wait(timeout=10)


def torch_free_python(folder: Path, *blocked: str) -> Path:
    """A 'device' interpreter: an executable wrapper around this venv's Python in which importing
    torch, edgerepvgg (and ``blocked``) fails, as on a device that has neither."""
    import sys

    from test_device import BLOCKER

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted({"torch", "edgerepvgg", *blocked})))
    wrapper = folder / "python3"
    wrapper.write_text(f'#!/bin/sh\nunset PYTHONHOME\nPYTHONPATH={folder} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper
