"""The safetensors reader and streaming writer of interop, in numpy (bf16 via ml_dtypes), for every file.

Why not ``safetensors.numpy``: it cannot read bf16 (numpy has no such dtype) and it builds the whole file in
memory before writing. The format is simple (https://github.com/huggingface/safetensors, "Format"): an 8-byte
little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` (padded with spaces), then the tensor bytes, contiguous, in offset order.

The reader treats the file as untrusted: it opens regular files only (``interop._paths.open_regular``), checks
every header field's type, computes sizes with Python integers (no overflow), and validates the header against
the file size before memory-mapping it, so a truncated or corrupt file is refused when opened, naming the file
and the tensor, and nothing is allocated for a tensor before its size is known to be backed by the file.

The writer streams tensor by tensor (a header computed from shapes first, then each tensor's bytes), so
converting a checkpoint holds one tensor in memory at a time, and it is deterministic: the metadata keeps its
insertion order (``safetensors.numpy.save`` serializes it from a hash map, in a different order from one
process to the next), the tensors are laid out as ``safetensors.save`` lays them out. Adapters and
checkpoints alike are read and written here.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from interop._io import InteropError, atomic_file, parse_json
from interop._paths import open_regular

# safetensors dtype names <-> numpy dtypes (safetensors/src/tensor.rs, enum Dtype).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the limit of the reference implementation
_MAX_NDIM = 64  # numpy's
_MAX_BYTES = 2**63 - 1  # sizes and offsets are int64 in the readers (numpy, torch)
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a numpy dtype (``"BF16"`` for ``ml_dtypes.bfloat16``)."""
    try:
        return NAMES[np.dtype(dtype)]
    except (KeyError, TypeError) as e:
        raise InteropError(f"dtype {dtype} cannot be stored in safetensors") from e


class LazyTensor:
    """A tensor of an open file, read on ``load()``; ``shape`` and ``dtype`` are known without reading."""

    __slots__ = ("file", "key", "shape", "dtype")

    def __init__(self, file: SafetensorsFile, key: str, shape: tuple[int, ...], dtype: np.dtype):
        self.file, self.key, self.shape, self.dtype = file, key, shape, dtype

    def load(self) -> np.ndarray:
        return self.file.get(self.key)

    def raw(self) -> memoryview:
        return self.file.raw(self.key)

    def __repr__(self) -> str:
        return f"LazyTensor({self.file.path.name}:{self.key}, {self.dtype}{list(self.shape)})"


class SafetensorsFile:
    """A memory-mapped safetensors file with a validated header.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = Path(tmp) / "model.safetensors"
      ...     _ = write_safetensors(path, {"lm_head.weight": np.ones((2, 3), ml_dtypes.bfloat16)})
      ...     f = SafetensorsFile(path)
      ...     f.lazy("lm_head.weight"), f.get("lm_head.weight").dtype  # numpy, bf16 as ml_dtypes.bfloat16
      (LazyTensor(model.safetensors:lm_head.weight, bfloat16[2, 3]), dtype(bfloat16))
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd = open_regular(self.path)
        try:
            self._size = os.fstat(fd).st_size
            header, self._base = self._read_header(fd)
        finally:
            os.close(fd)
        self._metadata = self._check_metadata(header.pop("__metadata__", None))
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self._entries[key] = self._check_entry(key, info)
        pos = 0
        for begin, end, key in sorted((e[2], e[3], k) for k, e in self._entries.items()):
            if begin != pos:
                raise InteropError(f"{self.path}: tensor {key!r} does not start where the previous one ends")
            pos = end
        if self._base + pos != self._size:
            raise InteropError(
                f"{self.path}: truncated or corrupt: the header describes {pos} data bytes, the file holds "
                f"{self._size - self._base}"
            )
        self._mmap: mmap.mmap | None = None

    def _read_header(self, fd: int) -> tuple[dict[str, Any], int]:
        size = self._size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise InteropError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise InteropError(
                f"{self.path}: truncated or not a safetensors file (header of {n} bytes, file of {size})"
            )
        blob = b""
        while len(blob) < n:
            chunk = os.pread(fd, n - len(blob), 8 + len(blob))
            if not chunk:
                raise InteropError(f"{self.path}: truncated while reading its header")
            blob += chunk
        header = parse_json(blob, f"{self.path}: safetensors header")
        if not isinstance(header, dict):
            raise InteropError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        return header, 8 + n

    def _check_metadata(self, metadata: Any) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InteropError(
                f"{self.path}: '__metadata__': expected an object of strings, got {metadata!r:.80}"
            )
        return metadata

    def _check_entry(self, key: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """``(dtype, shape, begin, end)`` of one header entry: every field type-checked, the byte count
        computed without overflow and compared with the offsets."""
        where = f"{self.path}: corrupt header entry for tensor {key!r}"
        if not isinstance(info, dict):
            raise InteropError(f"{where}: header entry must be an object, got {type(info).__name__}")
        if set(info) != _ENTRY_KEYS:
            raise InteropError(f"{where}: header entry keys {sorted(info)}; expected {sorted(_ENTRY_KEYS)}")
        name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(name, str) or name not in DTYPES:
            raise InteropError(f"{where}: dtype {name!r}: expected one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_size(s) for s in shape):
            raise InteropError(f"{where}: shape {shape!r:.80}: expected a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
            raise InteropError(f"{where}: data_offsets {offsets!r:.80}: expected [begin, end], integers >= 0")
        dtype, (begin, end) = DTYPES[name], offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or expected > _MAX_BYTES:
            raise InteropError(
                f"{self.path}: tensor {key!r}: {name} shape {shape} needs {expected} bytes, header gives "
                f"offsets [{begin}, {end}]"
            )
        return dtype, tuple(shape), begin, end

    def _buffer(self) -> mmap.mmap | bytes:
        if self._mmap is None:
            if self._size == 0:
                return b""
            fd = open_regular(self.path)
            try:
                size = os.fstat(fd).st_size
                if size != self._size:  # a shorter file would crash the reader (SIGBUS) when mapped
                    raise InteropError(f"{self.path}: changed size while open ({self._size} -> {size} bytes)")
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        return self._mmap

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def _entry(self, key: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise InteropError(f"{self.path}: missing tensor key {key!r}") from None

    def lazy(self, key: str) -> LazyTensor:
        dtype, shape, _, _ = self._entry(key)
        return LazyTensor(self, key, shape, dtype)

    def raw(self, key: str) -> memoryview:
        """The tensor's bytes in the file (no copy)."""
        _, _, begin, end = self._entry(key)
        return memoryview(self._buffer())[self._base + begin : self._base + end]

    def data_offset(self, key: str) -> int:
        """Absolute byte offset of the tensor in the file."""
        return self._base + self._entry(key)[2]

    def get(self, key: str) -> np.ndarray:
        """A (writable) numpy copy of one tensor."""
        dtype, shape, _, _ = self._entry(key)
        return np.frombuffer(self.raw(key), dtype=dtype).reshape(shape).copy()

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a live memoryview still points into the map; the GC closes it later
                return
            self._mmap = None


def _is_size(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def tensor_bytes(x: Any) -> memoryview | bytes:
    """The C-order bytes of an array-like (numpy, jax, LazyTensor) without copying where possible."""
    if isinstance(x, LazyTensor):
        return x.raw()
    arr = np.ascontiguousarray(np.asarray(x)).reshape(-1)
    # view as bytes first: ml_dtypes (bf16, fp8) do not support the buffer protocol
    return memoryview(arr.view(np.uint8)) if arr.size else b""


def _write_all(fh: Any, data: Any) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[fh.write(view) :]


def _copy_range(x: LazyTensor, fh: Any, n: int) -> bool:
    """Copy a tensor file-to-file inside the kernel (Linux ``copy_file_range``); False when unavailable."""
    if not hasattr(os, "copy_file_range") or n == 0:
        return False
    begin = x.file.data_offset(x.key)
    done = 0
    with os.fdopen(open_regular(x.file.path), "rb", buffering=0) as src:
        try:
            while done < n:
                k = os.copy_file_range(src.fileno(), fh.fileno(), n - done, begin + done)
                if k == 0:
                    raise InteropError(f"{x.file.path}: tensor {x.key!r} is shorter than its header says")
                done += k
        except OSError:
            if done:
                raise
            return False  # e.g. across filesystems on old kernels: fall back to read + write
    return True


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    on_bytes: Callable[[int], Any] | None = None,
) -> int:
    """Stream ``tensors`` (name -> numpy / jax / LazyTensor) into a new safetensors file at ``path``.

    Tensors are laid out like ``safetensors.save`` does (larger itemsize first, then by name) so every tensor
    is aligned to its dtype. Each tensor is read and written one at a time (a ``LazyTensor`` is copied file to
    file inside the kernel where the OS can). ``path`` is written directly and not fsynced (like
    ``safetensors.save``): callers write inside a temporary directory or file and rename (``interop._io``).

    Returns:
      The number of tensor bytes written.
    """
    specs = []
    for name, x in tensors.items():
        shape = tuple(int(s) for s in x.shape)
        dtype = np.dtype(x.dtype)
        if not isinstance(name, str) or name == "__metadata__" or len(shape) > _MAX_NDIM:
            raise InteropError(f"{path}: tensor {name!r}: not a tensor name, or more than {_MAX_NDIM} dims")
        if _nbytes(shape, dtype) > _MAX_BYTES:
            raise InteropError(f"{path}: tensor {name!r}: shape {list(shape)} overflows a 64-bit byte count")
        specs.append((name, shape, dtype, x))
    specs.sort(key=lambda s: (-s[2].itemsize, s[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata) if metadata is not None else {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in specs:
        n = _nbytes(shape, dtype)
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb", buffering=0) as fh:
        _write_all(fh, struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, x in specs:
            n = _nbytes(shape, dtype)
            if isinstance(x, LazyTensor) and _copy_range(x, fh, n):
                pass
            else:
                data = tensor_bytes(x)
                if len(data) != n:
                    raise InteropError(f"{path}: tensor {name!r} changed size while writing")
                _write_all(fh, data)
            if on_bytes is not None:
                on_bytes(n)
    return offset


def total_nbytes(tensors: Iterable[Any]) -> int:
    return sum(_nbytes(tuple(x.shape), np.dtype(x.dtype)) for x in tensors)


def read_safetensors(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read (some) tensors of a safetensors file into numpy arrays (bf16 as ``ml_dtypes.bfloat16``).

    Raises:
      InteropError: the file is missing, truncated or corrupt, or a requested key is absent.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     atomic_save_safetensors(Path(tmp) / "t.safetensors", {"a": np.zeros(2, ml_dtypes.bfloat16)})
      ...     read_safetensors(Path(tmp) / "t.safetensors")["a"].dtype
      dtype(bfloat16)
    """
    f = SafetensorsFile(path)
    try:
        names = f.keys()
        wanted = names if keys is None else keys
        missing = [k for k in wanted if k not in f]
        if missing:
            raise InteropError(f"{f.path}: missing tensor key(s) {missing[:5]} (file has {len(names)} keys)")
        return {k: f.get(k) for k in wanted}
    finally:
        f.close()


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
) -> None:
    """Write a safetensors file atomically (``write_safetensors`` into a temporary file, then rename).

    Metadata is ``{"format": "pt"}`` unless given (what transformers and PEFT expect).

    Raises:
      FileExistsError: ``path`` exists and ``force`` is False (nothing is written).
    """
    with atomic_file(path, force=force) as tmp:
        write_safetensors(tmp, tensors, metadata)
