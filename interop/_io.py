"""File I/O at the interop boundary: the error type, JSON reads with clear errors, atomic writes.

Writers never overwrite without ``force`` and never leave a half-written file or directory: they write a
temporary file (or directory) beside the destination, then ``os.replace`` it. A destination may be an empty
directory; a non-empty one (or a file) needs ``force``. Temporaries are named ``.<name>.<pid>.<random>.tmp``
so the next writer of the same destination removes those of a process that died (a crash, ``kill -9``), and a
``.<name>.old`` left between the two renames of a replacement is restored (when ``<name>`` is missing) or
removed. Safetensors files are read and written by ``interop._safetensors``, on top of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class InteropError(ValueError):
    """A file or directory that cannot be converted; the message names the file, key and expectation."""


_MAX_JSON = 100_000_000  # bytes of one JSON file or safetensors header (the safetensors header limit)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(data: bytes, where: str) -> Any:
    """Parse untrusted JSON bytes: invalid UTF-8 or JSON, duplicate keys, nesting too deep for the parser and
    integers too long to convert are one ``InteropError`` naming ``where``."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InteropError(f"{where}: invalid JSON ({reason})") from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object file; raises InteropError naming the file when it is missing, not a regular file,
    too large or invalid (see ``parse_json``)."""
    from interop._paths import read_regular

    path = Path(path)
    data = parse_json(read_regular(path, limit=_MAX_JSON), str(path))
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_leftovers(path: str | os.PathLike) -> None:
    """Remove what a writer of ``path`` that died left beside it: its ``.<name>.<pid>.*.tmp`` temporaries
    (of processes that no longer run), and ``.<name>.old`` (put back as ``<name>`` when that is missing: the
    writer died between the two renames of a replacement, and the old output is the complete one)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    stale = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^/]*\.tmp$")
    for entry in os.scandir(parent):
        m = stale.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _remove(Path(entry.path))
    old = parent / f".{path.name}.old"
    if os.path.lexists(old):
        if not os.path.lexists(path):
            os.replace(old, path)
        else:
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_destination(path: Path, force: bool, *, directory: bool) -> None:
    """Refuse to replace an existing ``path`` without ``force``; an empty directory is free to take."""
    if not os.path.lexists(path) or force:
        return
    if directory and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    what = "exists and is not empty" if path.is_dir() else "exists"
    raise FileExistsError(f"{path}: {what}; pass force=True (--force) to overwrite")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed to ``path``.

    Raises FileExistsError when ``path`` exists and ``force`` is False (nothing is written). On error the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    clean_leftovers(path)
    check_destination(path, force, directory=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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

    Raises FileExistsError when ``path`` exists (other than as an empty directory) and ``force`` is False
    (nothing is written). On error the temporary directory is removed and an existing ``path`` is left
    untouched. A replaced ``path`` (file or directory) goes to ``.<name>.old`` between the two renames and
    is removed after them.
    """
    path = Path(path)
    clean_leftovers(path)
    check_destination(path, force, directory=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if os.path.lexists(path):
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
