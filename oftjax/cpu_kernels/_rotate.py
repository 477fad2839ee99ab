"""Block-diagonal rotations and the Cayley-Neumann build of their blocks on the CPU (``csrc/rotate.cc``).

Replacements of the named operations ``rotate_blocks`` (``x BD(R)``, ``oftjax.oft.rotate_blocks``) and
``cayley_neumann_blocks`` (``oftjax.oft.cayley_neumann_blocks``), forward and backward, for float32 blocks
of 16, 32, 48 or 64 on an AVX-512 machine; anything else keeps the pure-JAX default. They agree with it to
float32 rounding (another summation order, fused multiply-adds), not bit for bit.

Why: XLA:CPU runs ``x BD(R)`` as a batched matmul over the blocks, which needs the activations transposed to
``[r, tokens, b]`` and back; the kernel reads and writes token rows in place. The series build is one call
per direction where XLA runs about sixteen small ops per adapter (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from oftjax import _registry
from oftjax.cpu_kernels._library import Library
from oftjax.cpu_kernels._primitive import KernelOp

_ROTATE, _ROTATE_GRAD = "oftjax_rotate", "oftjax_rotate_grad"
_SERIES, _SERIES_GRAD = "oftjax_cayley_neumann", "oftjax_cayley_neumann_grad"
LIBRARY = Library(
    "_rotate_cpu",
    (
        (_ROTATE, "OftjaxRotate"),
        (_ROTATE_GRAD, "OftjaxRotateGrad"),
        (_SERIES, "OftjaxCayleyNeumann"),
        (_SERIES_GRAD, "OftjaxCayleyNeumannGrad"),
    ),
    what="rotation",
    supports_symbol="OftjaxRotateSupports",
)


def supports(block_size: int, dtype: Any) -> bool:
    """True when the kernels rotate ``dtype`` blocks of ``block_size`` on this machine."""
    return np.dtype(dtype) == np.float32 and LIBRARY.supports(block_size)


# --- x BD(R)


def _rotate_xla(x: jax.Array, R: jax.Array) -> tuple[jax.Array]:
    return (_registry.default("rotate_blocks")(x, R),)


def rotate_cpu(x: jax.Array, R: jax.Array) -> tuple[jax.Array]:
    """``x BD(R)`` for float32 ``x [..., r*b]``, ``R [r, b, b]`` by the kernel (lowers for the CPU only)."""
    call = jax.ffi.ffi_call(_ROTATE, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return (call(x, R),)


def rotate_grad_cpu(x: jax.Array, R: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(g BD(R)^T, dR)`` with ``dR[n] = sum_t x[t, n]^T g[t, n]`` (block ``n`` of token ``t``)."""
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(R.shape, R.dtype))
    return jax.ffi.ffi_call(_ROTATE_GRAD, out)(x, g, R)


ROTATE = KernelOp(
    "oftjax_rotate_blocks",
    xla=_rotate_xla,
    cpu=rotate_cpu,
    num_results=1,
    diff=(0, 1),
    cpu_bwd=rotate_grad_cpu,
)


def rotate_blocks(x: jax.Array, R: jax.Array, precision: jax.lax.PrecisionLike = None) -> Any:
    """Replacement of ``oftjax.oft.rotate_blocks``: the kernels for float32 blocks they support."""
    if precision is not None or x.dtype != np.float32 or not supports(int(R.shape[1]), R.dtype):
        return NotImplemented
    return ROTATE(x, R)[0]


# --- rotation blocks from parameters (Cayley-Neumann series)


def _series_xla(vec: jax.Array, *, block_size: int, terms: int, legacy: bool) -> tuple[jax.Array]:
    return (_registry.default("cayley_neumann_blocks")(vec, block_size, terms, legacy),)


def series_cpu(vec: jax.Array, *, block_size: int, terms: int, legacy: bool) -> tuple[jax.Array]:
    """Blocks ``[n, b, b]`` from float32 parameters ``[n, b(b-1)/2]`` by the kernel (the same series and
    additions as ``oftjax.oft.cayley_neumann``; matmul sums in k order)."""
    out = jax.ShapeDtypeStruct((vec.shape[0], block_size, block_size), vec.dtype)
    return (jax.ffi.ffi_call(_SERIES, out)(vec, terms=np.int64(terms), legacy=bool(legacy)),)


def series_grad_cpu(vec: jax.Array, dR: jax.Array, *, block_size: int, terms: int, legacy: bool):
    """The parameters' cotangent ``[n, b(b-1)/2]`` for the blocks' cotangent ``dR``."""
    del block_size  # the kernel reads it from the operands' shapes
    out = jax.ShapeDtypeStruct(vec.shape, vec.dtype)
    return (jax.ffi.ffi_call(_SERIES_GRAD, out)(vec, dR, terms=np.int64(terms), legacy=bool(legacy)),)


SERIES = KernelOp(
    "oftjax_cayley_neumann_blocks",
    xla=_series_xla,
    cpu=series_cpu,
    num_results=1,
    diff=(0,),
    cpu_bwd=series_grad_cpu,
)


def cayley_neumann_blocks(vec: jax.Array, block_size: int, num_terms: int, legacy: bool) -> Any:
    """Replacement of ``oftjax.oft.cayley_neumann_blocks``: the kernels for float32 parameters of a supported
    block size and at least two terms (one term is the identity)."""
    if num_terms < 2 or vec.ndim != 2 or not supports(block_size, vec.dtype):
        return NotImplemented
    return SERIES(vec, block_size=int(block_size), terms=int(num_terms), legacy=bool(legacy))[0]


OPERATIONS = {"rotate_blocks": rotate_blocks, "cayley_neumann_blocks": cayley_neumann_blocks}
