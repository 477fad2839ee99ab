"""``x BD_1 ... BD_n K`` computed by rotating either the inputs or the kernel, with the same gradients.

Rotating the inputs costs ``tokens * d_in * b`` per adapter; rotating the kernel ``d_in * d_out * b``. Plain
autodiff of the kernel-rotation path would also need the full weight gradient ``x^T g`` (``tokens * d_in *
d_out``) to reach the rotations, so ``rotated_matmul`` has a custom VJP that back-propagates the input-centric
way (``g K^T`` then the blockwise chain): the kernel path then costs no more than the input path in training.
``rotated_dequant_matmul`` is the same over a quantized weight: its residual is the packed weight, which the
backward dequantizes again (no float copy of the frozen weight is kept between the passes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from oftjax import oft, quant
from oftjax.nn._quant_linear import zero_cotangent


@jax.named_scope("oft_rotate")
def rotate_blocks(x: jax.Array, R: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """``x BD(R)`` (``oft.rotate_input``'s math) laid out batch-major for XLA's batched matmul.

    ``x[..., r*b]`` is cast to ``R.dtype`` and viewed as ``[tokens, r, b]``; transposing to ``[r, tokens, b]``
    makes the block index the leading batch dimension, which XLA:CPU runs ~1.3x faster forward and ~1.6x
    faster backward than the ``"...rk,rkc->...rc"`` einsum (tokens 512, d 2048, b 32). Same products and sums.
    """
    r, b = int(R.shape[0]), int(R.shape[1])
    if x.shape[-1] != r * b:
        raise ValueError(f"{r} rotation blocks of size {b} need x[..., {r * b}]; got x with shape {x.shape}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xb = x.astype(R.dtype).reshape(-1, r, b).transpose(1, 0, 2)
    y = jnp.matmul(xb, R).transpose(1, 0, 2)
    return y.reshape(x.shape).astype(out_dtype)


def rotate_chain(x: jax.Array, rotations: Sequence[jax.Array]) -> jax.Array:
    """``x BD(R_1) ... BD(R_n)``; between adapters the value stays in the rotation dtype (as PEFT)."""
    for R in rotations:
        x = rotate_blocks(x, R, out_dtype=R.dtype)
    return x


@jax.named_scope("oft_rotate")
def rotate_kernel(kernel: jax.Array, rotations: Sequence[jax.Array]) -> jax.Array:
    """``BD(R_1) ... BD(R_n) K`` for a kernel ``[in, out]``, block by block (result in ``kernel.dtype``)."""
    for R in reversed(rotations):
        kernel = oft.merge_rotation_kernel(kernel, R)
    return kernel


@jax.custom_vjp
def rotated_matmul(x: jax.Array, rotations: tuple[jax.Array, ...], kernel: jax.Array) -> jax.Array:
    """``(x BD_1 ... BD_n) @ K`` computed as ``x @ (BD_1 ... BD_n K)``; gradients as for the input path.

    Args:
      x: ``[..., d_in]`` in the compute dtype (``kernel.dtype``).
      rotations: rotation blocks per adapter in forward order, each ``[r_i, b_i, b_i]``, ``r_i b_i = d_in``.
      kernel: ``[d_in, d_out]``.

    Returns:
      ``[..., d_out]`` in ``kernel.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> R = (jnp.stack([jnp.array([[0.0, 1.0], [-1.0, 0.0]])] * 2),)
      >>> rotated_matmul(jnp.ones((1, 4)), R, jnp.eye(4)).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]
    """
    return _forward(x, rotations, kernel)


def _forward(x: jax.Array, rotations: tuple[jax.Array, ...], kernel: jax.Array) -> jax.Array:
    kernel = rotate_kernel(kernel, rotations)
    with jax.named_scope("gemm"):
        return jnp.matmul(x, kernel)


def _fwd(x, rotations, kernel):
    return _forward(x, rotations, kernel), (x, rotations, kernel)


def _bwd(res, g):
    x, rotations, kernel = res
    # dL/d(x BD...) = g K^T; the rest is the input-centric chain's own VJP (blockwise, cheap).
    with jax.named_scope("gemm"):
        gu = jnp.matmul(g, kernel.T)
    u, chain_vjp = jax.vjp(lambda x_, rs: rotate_chain(x_, rs).astype(kernel.dtype), x, rotations)
    dx, drot = chain_vjp(gu.astype(u.dtype))
    # The kernel's cotangent is dead code under jit unless someone differentiates the frozen kernel.
    dkernel = jnp.einsum("...i,...o->io", u, g).astype(kernel.dtype)
    return dx.astype(x.dtype), drot, dkernel


rotated_matmul.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def rotated_dequant_matmul(
    x: jax.Array, rotations: tuple[jax.Array, ...], q: Any, compute_dtype: Any
) -> jax.Array:
    """``rotated_matmul(x, rotations, dequantize(q, compute_dtype).T)`` for a frozen quantized ``q``.

    The backward dequantizes ``q`` again (``g W`` needs the weight) rather than keeping the forward's float
    copy alive, and gives ``q`` a zero cotangent.

    Example:
      >>> import jax.numpy as jnp
      >>> from oftjax import quant
      >>> R = (jnp.stack([jnp.eye(2)] * 2),)
      >>> rotated_dequant_matmul(jnp.ones((1, 4)), R, quant.quantize_int8(jnp.eye(4)), jnp.float32).shape
      (1, 4)
    """
    return _forward(x, rotations, quant.dequantize(q, compute_dtype).T)


def _dq_fwd(x, rotations, q, compute_dtype):
    return rotated_dequant_matmul(x, rotations, q, compute_dtype), (x, rotations, q)


def _dq_bwd(compute_dtype, res, g):
    x, rotations, q = res
    w = quant.dequantize(q, compute_dtype)  # [out, in]: g @ w is g K^T without a transpose
    with jax.named_scope("gemm"):
        gu = jnp.matmul(g, w)
    _, chain_vjp = jax.vjp(lambda x_, rs: rotate_chain(x_, rs).astype(compute_dtype), x, rotations)
    dx, drot = chain_vjp(gu)
    return dx.astype(x.dtype), drot, zero_cotangent(q)


rotated_dequant_matmul.defvjp(_dq_fwd, _dq_bwd)
