"""Small file helpers shared by the stages: bundled resources, hashing, atomic writes.

Bundled files (``data/``, ``migrations/``, ``alembic.ini``) sit at the repository root in a source checkout
(editable install); in a wheel they are copied into the package directory (see
``[tool.hatch.build.targets.wheel.force-include]`` in pyproject.toml).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """Path of a bundled resource (``"data"``, ``"migrations"`` or ``"alembic.ini"``)."""
    for base in (_PACKAGE_DIR, _PACKAGE_DIR.parent):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"personavec resource {name!r} is missing from the installation ({_PACKAGE_DIR})")


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file (``hashlib.file_digest``)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's: the names in it) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place (both fsynced): a crash,
    a power cut or an error never leaves a half-written ``path`` (the temporary file is removed). The file gets the
    permissions a plain ``open(path, "w")`` would (0666 minus the umask), not ``mkstemp``'s private 0600.

    Raises :class:`InputFileError` when ``path`` is a directory or its directory cannot be written."""
    from personavec.errors import InputFileError

    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{path} is a directory: give a file name")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputFileError(f"cannot write {path}: {blocking} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as exc:
        raise InputFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(Path(tmp))
        # after the write: some writers replace the file they are given (safetensors' save_file makes it 0600)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync(Path(tmp))  # the bytes on disk before the name points at them: a power cut leaves old or new
        os.replace(tmp, path)
        if os.name != "nt":
            fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
