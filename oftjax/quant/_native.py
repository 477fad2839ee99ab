"""The native CPU kernel for 4-bit dequantization (``csrc/dequant4.cc``), called from jitted code via jax.ffi.

``pip install`` builds the kernel as ``oftjax/quant/_dequant4_cpu*.so`` (setup.py); ``oftjax._ffi`` loads
it and registers it for the ``cpu`` platform once, on first use. ``dequantize`` uses it on CPU and the
pure-XLA formulation elsewhere (GPU/TPU) or when the library is missing; both give the same bits
(tests/quant/test_native.py).

Environment switches: ``OFTJAX_NATIVE=0`` (read once, at the first dequantize) forces the XLA path, for
comparison or debugging; ``OFTJAX_HUGEPAGES=0`` (read when a computation is traced) stops the kernel from
advising transparent huge pages for its output (csrc/dequant4.cc ``AdviseHugePages`` says why it does).

Why it exists: XLA:CPU stores the two interleaved nibble halves of the output one element at a time, which
left the XLA path at ~0.85x bitsandbytes' AVX-512 CPU kernel (issue 2); the native kernel permutes 32 outputs
per instruction (benchmarks/bench_quant.py has the figures).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from oftjax import _ffi

_TARGET = "oftjax_dequant4"
_TARGET_NESTED = "oftjax_dequant4_nested"
_TARGET_ROTATE = "oftjax_dequant4_rotate"
_TARGET_NESTED_ROTATE = "oftjax_dequant4_nested_rotate"
# what the kernel can write (others, e.g. float64 under x64, take the XLA path)
_OUT_DTYPES = (np.dtype(np.float32), np.dtype(jax.numpy.float16), np.dtype(jax.numpy.bfloat16))
_KERNELS = _ffi.Kernels(
    Path(__file__).parent,
    "_dequant4_cpu",
    (
        (_TARGET, "OftjaxDequant4"),
        (_TARGET_NESTED, "OftjaxDequant4Nested"),
        (_TARGET_ROTATE, "OftjaxDequant4Rotate"),
        (_TARGET_NESTED_ROTATE, "OftjaxDequant4NestedRotate"),
    ),
    what="dequantize",
    supports_symbol="OftjaxDequant4RotateSupports",
)


def native_info() -> dict[str, Any]:
    """Which 4-bit dequantize runs on CPU, and why.

    Returns:
      ``{"available": bool, "library": str | None, "avx512": bool, "rotate_block_sizes": list[int],
      "reason": str}``: ``available`` is True when the native kernel is loaded (CPU dequantize uses it),
      ``avx512`` when this machine runs its AVX-512 path (otherwise a portable scalar loop with the same
      results), ``rotate_block_sizes`` the OFT block sizes for which a 4-bit weight is dequantized and
      rotated in one pass (``dequantize_4bit_rotate_cpu``; empty without AVX-512).

    Example:
      >>> from oftjax import quant
      >>> sorted(quant.native_info())
      ['available', 'avx512', 'library', 'reason', 'rotate_block_sizes']
    """
    lib, reason = _KERNELS.load()
    path = _ffi.library_path(_KERNELS.directory, _KERNELS.stem)
    return {
        "available": lib is not None,
        "library": str(path) if path else None,
        "avx512": bool(lib is not None and lib.OftjaxDequant4HasAvx512()),
        "rotate_block_sizes": [b for b in range(1, 257) if lib is not None and supports_rotate(b)],
        "reason": reason,
    }


def supports(dtype: Any) -> bool:
    """True when the native kernel is loaded and writes ``dtype``."""
    return _KERNELS.load()[0] is not None and np.dtype(dtype) in _OUT_DTYPES


def dequantize_4bit_cpu(
    packed: jax.Array,
    absmax: jax.Array,
    code: jax.Array,
    n: int,
    blocksize: int,
    dtype: Any,
    *,
    vectorize: bool = True,
) -> jax.Array:
    """``dtype(fl32(code[nibble] * absmax[i // blocksize]))`` for ``i < n``, flat, by the native CPU kernel.

    Args:
      packed: uint8 bytes, at least ``ceil(n / 2)`` (high nibble first).
      absmax: float32 ``[ceil(n / blocksize)]``.
      code: float32 ``[16]``, the code table.
      n: number of outputs.
      blocksize: elements per absmax block (even).
      dtype: float32, float16 or bfloat16.
      vectorize: False runs the portable scalar loop even where AVX-512 is available (tests use it).

    Only lowers for the CPU platform; callers choose it with ``jax.lax.platform_dependent``.
    """
    return _call(_TARGET, n, dtype, blocksize, vectorize)(packed, absmax, code)


def dequantize_4bit_nested_cpu(
    packed: jax.Array,
    qabsmax: jax.Array,
    nested_absmax: jax.Array,
    offset: jax.Array,
    *,
    dynamic: jax.Array,
    code: jax.Array,
    n: int,
    blocksize: int,
    dtype: Any,
    vectorize: bool = True,
) -> jax.Array:
    """``dequantize_4bit_cpu`` with a double-quantized absmax, computed per block inside the kernel.

    ``absmax[j] = fl32(fl32(dynamic[qabsmax[j]] * nested_absmax[j // 256]) + offset)`` (bnb's
    ``dequantize_blockwise`` of the statistics, then ``+ offset``; two roundings, no FMA).

    Args:
      packed: uint8 bytes, at least ``ceil(n / 2)``.
      qabsmax: uint8 ``[ceil(n / blocksize)]``, the 8-bit absmax codes.
      nested_absmax: float32 ``[ceil(len(qabsmax) / 256)]``.
      offset: float32 scalar.
      dynamic: float32 ``[256]``, bnb's dynamic 8-bit code.
      code: float32 ``[16]``; n, blocksize, dtype, vectorize: as ``dequantize_4bit_cpu``.
    """
    call = _call(_TARGET_NESTED, n, dtype, blocksize, vectorize)
    return call(packed, qabsmax, nested_absmax, offset, dynamic, code)


def supports_rotate(block_size: int) -> bool:
    """True when the fused dequantize + rotate kernel runs rotation blocks of ``block_size`` (AVX-512)."""
    return _KERNELS.supports(block_size)


def dequantize_4bit_rotate_cpu(
    *operands: jax.Array, shape: tuple[int, int], blocksize: int, nested: bool, vectorize: bool = True
) -> jax.Array:
    """float32 ``dequantize(W) BD(R)`` row by row for a 4-bit ``W [rows, d]``, in one pass (no float W).

    Args:
      operands: ``dequantize_4bit_cpu``'s (packed, absmax, code) or, with ``nested``,
        ``dequantize_4bit_nested_cpu``'s (packed, qabsmax, nested_absmax, offset, dynamic, code), then the
        rotation blocks ``R`` float32 ``[d / b, b, b]`` (``b`` with ``supports_rotate(b)``).
      shape: ``(rows, d)``; blocksize, vectorize: as ``dequantize_4bit_cpu``.

    The same bits as the native rotation (``oftjax.nn._native_rotate.rotate_cpu``) of
    ``dequantize_4bit_cpu``'s output. Only lowers for the CPU platform.
    """
    _KERNELS.require()
    target = _TARGET_NESTED_ROTATE if nested else _TARGET_ROTATE
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(shape), np.float32), vmap_method="sequential")
    return call(*operands, blocksize=np.int64(blocksize), vectorize=bool(vectorize))


def _call(target: str, n: int, dtype: Any, blocksize: int, vectorize: bool):
    _KERNELS.require()
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((n,), dtype), vmap_method="sequential")
    hugepages = os.environ.get("OFTJAX_HUGEPAGES", "1") != "0"
    attrs = {"blocksize": np.int64(blocksize), "vectorize": bool(vectorize), "hugepages": hugepages}
    return functools.partial(call, **attrs)
