"""Atomic file writes: an artifact is either complete on disk or absent, never half written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgerepvgg.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``,
    on any error (including KeyboardInterrupt) it is removed and ``path`` is untouched."""
    path = Path(path)
    output_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; pass an output path in a writable folder") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; artifacts get normal modes
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def fsync(path: str | Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def output_dir(path: str | Path, what: str = "the output") -> Path:
    """Create the folder ``path`` (and its parents) for ``what``; a path that exists and is not a
    folder, or a folder that cannot be created, is a one-line ``UserError`` naming the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; pass -o a folder for {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder {path} for {what}: {exc.strerror or exc}; pass -o a writable folder") from None
    return path


@contextlib.contextmanager
def claimed_output_dir(path: str | Path, what: str = "the output") -> Iterator[Path]:
    """:func:`output_dir` before any work starts (a folder that cannot be created fails at once),
    and, if the work then fails, the folders created here removed again while still empty: a
    failed command leaves nothing behind."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    output_dir(path, what)
    try:
        yield path
    except BaseException:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (something was written) or not ours to remove
                break
        raise
