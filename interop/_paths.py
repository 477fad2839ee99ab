"""Untrusted paths: every file a checkpoint or adapter names is resolved inside its root and opened safely.

A directory read by interop is a *root*. A name found in a file (an index ``weight_map`` entry, an adapter
subfolder, an adapter name) is a relative path below it: absolute names, ``..`` components and NUL bytes are
refused, and so is every symbolic link on the way, unless ``allow_symlinks`` is set, and then only links whose
target stays inside the root. A Hugging Face cache snapshot (``<cache>/models--org--name/snapshots/<rev>``)
keeps its files as links into ``../../blobs``: its root is the repository folder ``models--org--name`` and
links inside it are followed. Only regular files are opened (FIFOs, devices and sockets are refused before
any ``open``, which could block or never end), with ``O_NONBLOCK`` so a file swapped for a FIFO meanwhile
cannot hang the reader either. Every error is an ``InteropError`` naming the file and what was expected.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from interop._io import InteropError

__all__ = ["Root", "open_regular", "read_regular"]


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _hf_cache_repo(real: Path) -> Path | None:
    """The repository folder of a Hugging Face cache snapshot directory, or None."""
    snapshots = real.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith(("models--", "datasets--")):
        return snapshots.parent
    return None


class Root:
    """A directory whose files are read as untrusted: names confined to it, links as ``allow_symlinks`` says.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "a.json").write_text("{}")
        ...     root = Root(tmp)
        ...     root.file("a.json").name, root.exists("b.json")
        ...     root.file("../etc/passwd", where="index.json: weight_map")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        interop._io.InteropError: index.json: weight_map: '../etc/passwd': ... inside ...
    """

    def __init__(self, path: str | os.PathLike, *, allow_symlinks: bool = False):
        self.path = Path(path)
        real = Path(os.path.realpath(self.path))
        repo = _hf_cache_repo(real)
        self.allow_symlinks = allow_symlinks or repo is not None
        self.real = repo if repo is not None else real

    def _check_name(self, name: object, where: str) -> PurePosixPath:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise InteropError(f"{where}{name!r}: expected a file name (a non-empty string)")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or "\\" in name:
            raise InteropError(
                f"{where}{name!r}: expected a relative path inside {self.path} (no '..', no absolute path)"
            )
        return rel

    def _walk(self, name: object, where: str) -> Path:
        """``self.path / name`` after checking the name and every component: a link is followed only where
        allowed and only inside the root; a missing component raises FileNotFoundError."""
        current = self.path
        for part in self._check_name(name, where).parts:
            if part == ".":
                continue
            current = current / part
            mode = os.lstat(current).st_mode
            if not stat.S_ISLNK(mode):
                continue
            target = os.path.realpath(current)
            if not _within(target, str(self.real)):
                raise InteropError(f"{where}{current} is a symbolic link to {target}, outside {self.real}")
            if not self.allow_symlinks:
                raise InteropError(
                    f"{where}{current} is a symbolic link; pass allow_symlinks=True (--allow-symlinks) to "
                    f"follow links that stay inside {self.path}"
                )
        return current

    def _resolve(self, name: object, where: str | None) -> tuple[Path, int] | None:
        """``(path, st_mode)`` of ``name`` (checked), or None when it does not exist."""
        prefix = f"{where}: " if where else ""
        try:
            path = self._walk(name, prefix)
            return path, os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, name: str, *, where: str | None = None) -> bool:
        """Whether ``name`` exists (checked as ``file``: a link not allowed raises)."""
        return self._resolve(name, where) is not None

    def file(self, name: str, *, where: str | None = None) -> Path:
        """The regular file ``name`` below the root (checked as the class docstring says).

        Args:
            name: a relative path, e.g. from an index file.
            where: what named it, for messages (e.g. ``"<dir>/model.safetensors.index.json: weight_map"``).

        Raises:
            InteropError: a bad name, a link not allowed or leaving the root, a missing or special file.
        """
        prefix = f"{where}: " if where else ""
        found = self._resolve(name, where)
        if found is None:
            raise InteropError(f"{prefix}{self.path / str(name)}: file not found")
        path, mode = found
        if not stat.S_ISREG(mode):
            raise InteropError(f"{prefix}{path} is {_kind(mode)}, not a regular file")
        return path

    def dir(self, name: str, *, where: str | None = None) -> Path | None:
        """The directory ``name`` below the root, or None when absent (checked as ``file``)."""
        found = self._resolve(name, where)
        if found is None:
            return None
        path, mode = found
        if not stat.S_ISDIR(mode):
            prefix = f"{where}: " if where else ""
            raise InteropError(f"{prefix}{path} is {_kind(mode)}, not a directory")
        return path

    def entries(self) -> list[tuple[str, int, bool]]:
        """``(name, st_mode, is_link)`` of the root's entries, sorted by name. The mode is the link's own for
        a link that may not be followed (any link without ``allow_symlinks``, or one leaving the root)."""
        out = []
        with os.scandir(self.path) as it:
            for entry in it:
                is_link = entry.is_symlink()
                mode = entry.stat(follow_symlinks=False).st_mode
                if is_link and self.allow_symlinks and _within(os.path.realpath(entry.path), str(self.real)):
                    try:
                        mode = os.stat(entry.path).st_mode
                    except FileNotFoundError:  # a dangling link keeps its own mode
                        pass
                out.append((entry.name, mode, is_link))
        return sorted(out)


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> int:
    """Open ``path`` read-only without blocking and return the descriptor, if it is a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once (a plain ``open`` waits for a writer forever); the
    descriptor is then checked with ``fstat`` and closed unless it is a regular file.

    Raises:
        InteropError: missing, or not a regular file (a FIFO, device, socket, directory).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InteropError(f"{path}: file not found") from None
    except OSError as e:
        raise InteropError(f"{path}: cannot open ({e.strerror})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InteropError(f"{path} is {_kind(mode)}, not a regular file")
    return fd


def read_regular(path: str | os.PathLike, *, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``open_regular``; larger files are refused
    before reading)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InteropError(f"{path}: {size} bytes; expected at most {limit}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InteropError(f"{path}: more than {limit} bytes")
    return data
