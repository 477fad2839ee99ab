"""The native CPU kernels for OFT's block-diagonal rotation of activations (``csrc/rotate.cc``), via jax.ffi.

``rotate_blocks`` (oftjax/nn/_rotated_matmul.py) uses them on CPU for float32 rotations whose block size is a
multiple of 16 up to 64 on a machine with AVX-512 (``supports``); other block sizes, dtypes and machines, and
GPU/TPU, take the XLA formulation. The two agree to float32 rounding (different summation order; fused
multiply-adds), not bit for bit (tests/nn/test_native_rotate.py). ``OFTJAX_NATIVE=0`` turns the kernels off.

Why they exist: XLA:CPU runs ``x BD(R)`` as a batched matmul over the blocks, which needs the activations
transposed to ``[r, tokens, b]`` and back; those copies made applying rotations ~12% of a CPU train step. The
kernels read and write token rows in place: ~3x faster forward and backward at the train benchmark's shapes
(benchmarks/bench_layer.py prints the comparison).

The same library builds the rotation blocks from the parameters (PEFT's Cayley-Neumann series, forward and
backward: ``cayley_neumann_cpu`` / ``cayley_neumann_grad_cpu``); ``oftjax.nn._adapters.rotation_from_vec``
uses them on CPU where the rotation kernels run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from oftjax import _ffi

_ROTATE = "oftjax_rotate"
_ROTATE_GRAD = "oftjax_rotate_grad"
_SERIES = "oftjax_cayley_neumann"
_SERIES_GRAD = "oftjax_cayley_neumann_grad"
_KERNELS = _ffi.Kernels(
    Path(__file__).parent,
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


def native_info() -> dict[str, Any]:
    """Whether the rotation kernels run on this machine, and for which block sizes.

    Returns:
      ``{"available": bool, "library": str | None, "block_sizes": list[int], "reason": str}``; ``block_sizes``
      is empty without AVX-512 (the XLA formulation then runs for every block size).

    Example:
      >>> from oftjax import nn
      >>> sorted(nn.rotation_native_info())
      ['available', 'block_sizes', 'library', 'reason']
    """
    return _KERNELS.info("block_sizes", range(1, 257))


def supports(block_size: int, dtype: Any) -> bool:
    """True when the kernels are loaded and rotate float32 blocks of ``block_size`` on this machine."""
    return np.dtype(dtype) == np.float32 and _KERNELS.supports(block_size)


def rotate_cpu(x: jax.Array, R: jax.Array) -> jax.Array:
    """``x BD(R)`` for float32 ``x [..., r*b]`` and ``R [r, b, b]``; CPU only."""
    _KERNELS.require()
    call = jax.ffi.ffi_call(_ROTATE, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")
    return call(x, R)


def rotate_grad_cpu(x: jax.Array, g: jax.Array, R: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(g BD(R)^T, dR)`` with ``dR[n] = sum_t x[t, n]^T g[t, n]`` (block ``n`` of token ``t``); CPU only."""
    _KERNELS.require()
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(R.shape, R.dtype))
    return jax.ffi.ffi_call(_ROTATE_GRAD, out, vmap_method="sequential")(x, g, R)


def cayley_neumann_cpu(vec: jax.Array, block_size: int, num_terms: int, legacy: bool) -> jax.Array:
    """Rotation blocks ``[n, b, b]`` from float32 parameters ``[n, b(b-1)/2]``: ``oft.cayley_neumann`` of
    ``oft.skew_from_vec(vec, b)`` (same series, same additions; matmul sums in k order); CPU only."""
    _KERNELS.require()
    out = jax.ShapeDtypeStruct((vec.shape[0], block_size, block_size), vec.dtype)
    call = jax.ffi.ffi_call(_SERIES, out, vmap_method="sequential")
    return call(vec, terms=np.int64(num_terms), legacy=bool(legacy))


def cayley_neumann_grad_cpu(vec: jax.Array, dR: jax.Array, num_terms: int, legacy: bool) -> jax.Array:
    """The parameters' cotangent ``[n, b(b-1)/2]`` of ``cayley_neumann_cpu`` for the blocks' ``dR``; CPU
    only."""
    _KERNELS.require()
    out = jax.ShapeDtypeStruct(vec.shape, vec.dtype)
    call = jax.ffi.ffi_call(_SERIES_GRAD, out, vmap_method="sequential")
    return call(vec, dR, terms=np.int64(num_terms), legacy=bool(legacy))
