"""File I/O at the interop boundary: the error type, JSON reads with clear errors, atomic writes.

Writers never overwrite without ``force`` and never leave a half-written file or directory: they write a
temporary file (or directory) beside the destination, then ``os.replace`` it. Safetensors files are read and
written by ``interop._safetensors``, on top of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class InteropError(ValueError):
    """A file or directory that cannot be converted; the message names the file, key and expectation."""


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object file; raises InteropError naming the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed to ``path``.

    Raises FileExistsError when ``path`` exists and ``force`` is False (nothing is written). On error the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists; pass force=True (--force) to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; refuse to overwrite an existing file unless ``force``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +ELLIPSIS
        ...     atomic_write_bytes(Path(tmp) / "a.bin", b"1")
        ...     atomic_write_bytes(Path(tmp) / "a.bin", b"2")
        Traceback (most recent call last):
        FileExistsError: ...a.bin: exists; pass force=True (--force) to overwrite
    """
    with atomic_file(path, force=force) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, force: bool = False) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically (``atomic_write_bytes``)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), force=force)


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build a directory atomically: yields a temporary sibling directory, renamed to ``path`` on success.

    Raises FileExistsError when ``path`` exists and ``force`` is False (nothing is written). On error the
    temporary directory is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists; pass force=True (--force) to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
