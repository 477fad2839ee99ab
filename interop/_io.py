"""File I/O at the interop boundary: safetensors reads with clear errors, atomic writes, output-dir guards.

Everything here is numpy + safetensors + json (no torch). Writers never overwrite without ``force`` and never
leave a half-written file: they write a temporary file in the destination directory, then ``os.replace`` it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class InteropError(ValueError):
    """A file or directory that cannot be converted; the message names the file, key and expectation."""


def _safetensors_numpy():
    from safetensors import numpy as st_numpy

    return st_numpy


def read_safetensors(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read (some) tensors of a safetensors file into numpy, bf16 as ``ml_dtypes.bfloat16``.

    Raises:
      InteropError: the file is missing, truncated or corrupt, or a requested key is absent.
    """
    path = Path(path)
    with open_safetensors(path) as f:
        names = list(f.keys())
        wanted = names if keys is None else keys
        missing = [k for k in wanted if k not in names]
        if missing:
            raise InteropError(f"{path}: missing tensor key(s) {missing[:5]} (file has {len(names)} keys)")
        return {k: f.get_tensor(k) for k in wanted}


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """Open a safetensors file lazily (tensor by tensor) with numpy output and clear errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: file not found")
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise InteropError(f"{path}: not a valid safetensors file ({e})") from e
    with handle as f:
        yield _CheckedHandle(f, path)


class _CheckedHandle:
    def __init__(self, handle: Any, path: Path):
        self._h = handle
        self._path = path

    def keys(self) -> list[str]:
        return list(self._h.keys())

    def metadata(self) -> dict[str, str]:
        return self._h.metadata() or {}

    def get_tensor(self, key: str) -> np.ndarray:
        try:
            return self._h.get_tensor(key)
        except TypeError:
            # safetensors' numpy backend cannot build bf16/fp8 arrays; read those with ml_dtypes instead.
            from interop._safetensors import SafetensorsFile

            return SafetensorsFile(self._path).get(key)
        except Exception as e:
            raise InteropError(f"{self._path}: cannot read tensor {key!r} ({e})") from e


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; refuse to overwrite an existing file unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists; pass force=True (--force) to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, force: bool = False) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), force=force)


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
) -> None:
    """Save numpy tensors as safetensors atomically (metadata ``{"format": "pt"}`` unless given)."""
    st = _safetensors_numpy()
    # np.require keeps 0-d tensors 0-d (np.ascontiguousarray would make them shape [1]).
    arrays = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    data = st.save(arrays, metadata=dict(metadata) if metadata is not None else {"format": "pt"})
    atomic_write_bytes(path, data, force=force)


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
