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
import numpy as np

from oftjax import oft, quant
from oftjax.nn import _native_rotate
from oftjax.nn._settings import AdapterSettings
from oftjax.quant import _dequant as quant_dequant

DotGeneral = Any


def zero_cotangent(tree: Any) -> Any:
    """Zero cotangents for a frozen pytree: ``float0`` for integer leaves, zeros for float leaves."""

    def zero(a: Any) -> Any:
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros(a.shape, a.dtype)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dequant_matmul(
    x: jax.Array,
    q: Any,
    compute_dtype: Any,
    dot_general: DotGeneral = jax.lax.dot_general,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """``x @ dequantize(q, compute_dtype).T`` whose backward dequantizes ``q`` again instead of saving it.

    Args:
      x: ``[..., in]`` in ``compute_dtype``.
      q: an ``Int8Weight`` or ``FourBitWeight`` ``[out, in]`` (frozen: its cotangent is zero).
      compute_dtype: the dtype the weight is dequantized into (static).
      dot_general, precision: the matmul (static).

    Returns:
      ``[..., out]`` in ``compute_dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from oftjax import quant
      >>> q = quant.quantize_int8(jnp.eye(4))
      >>> dequant_matmul(jnp.ones((2, 4)), q, jnp.float32).shape
      (2, 4)
    """
    w = quant.dequantize(q, compute_dtype)
    with jax.named_scope("gemm"):  # profile label only
        return dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)


def _dequant_matmul_fwd(x, q, compute_dtype, dot_general, precision):
    # The residual is the packed weight (0.5-1 byte per parameter), not its float dequantization.
    return dequant_matmul(x, q, compute_dtype, dot_general, precision), q


def _dequant_matmul_bwd(compute_dtype, dot_general, precision, q, g):
    w = quant.dequantize(q, compute_dtype)
    with jax.named_scope("gemm"):  # profile label only
        dx = dot_general(g.astype(compute_dtype), w, (((g.ndim - 1,), (0,)), ((), ())), precision=precision)
    return dx, zero_cotangent(q)


dequant_matmul.defvjp(_dequant_matmul_fwd, _dequant_matmul_bwd)


@jax.named_scope("oft_rotate")
def rotate_blocks(x: jax.Array, R: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """``x BD(R)`` (``oft.rotate_input``'s math), by the native CPU kernel where it runs, else XLA.

    ``x[..., r*b]`` is cast to ``R.dtype``. On CPU, float32 rotations with a block size the kernel supports
    (``oftjax.nn.rotation_native_info()``) run ``csrc/rotate.cc`` forward and backward; elsewhere the XLA
    formulation ``_rotate_blocks_xla``. The choice is made at lowering time (``jax.lax.platform_dependent``),
    so the same jitted function runs the XLA path on GPU/TPU.
    """
    r, b = int(R.shape[0]), int(R.shape[1])
    if x.shape[-1] != r * b:
        raise ValueError(f"{r} rotation blocks of size {b} need x[..., {r * b}]; got x with shape {x.shape}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xr = x.astype(R.dtype)
    y = _rotate_blocks(xr, R) if _native_rotate.supports(b, R.dtype) else _rotate_blocks_xla(xr, R)
    return y.astype(out_dtype)


def _rotate_blocks_xla(x: jax.Array, R: jax.Array) -> jax.Array:
    """``x BD(R)`` laid out batch-major for XLA's batched matmul.

    ``x`` is viewed as ``[tokens, r, b]``; transposing to ``[r, tokens, b]`` makes the block index the leading
    batch dimension, which XLA:CPU runs ~1.3x faster forward and ~1.6x faster backward than the
    ``"...rk,rkc->...rc"`` einsum (tokens 512, d 2048, b 32). Same products and sums.
    """
    r, b = int(R.shape[0]), int(R.shape[1])
    xb = x.reshape(-1, r, b).transpose(1, 0, 2)
    return jnp.matmul(xb, R).transpose(1, 0, 2).reshape(x.shape)


@jax.custom_vjp
def _rotate_blocks(x: jax.Array, R: jax.Array) -> jax.Array:
    return jax.lax.platform_dependent(x, R, cpu=_native_rotate.rotate_cpu, default=_rotate_blocks_xla)


def _rotate_blocks_fwd(x, R):
    return _rotate_blocks(x, R), (x, R)


def _rotate_blocks_bwd(res, g):
    x, R = res

    def xla(x, g, R):
        return jax.vjp(_rotate_blocks_xla, x, R)[1](g)

    cpu = _native_rotate.rotate_grad_cpu
    return jax.lax.platform_dependent(x, g.astype(x.dtype), R, cpu=cpu, default=xla)


_rotate_blocks.defvjp(_rotate_blocks_fwd, _rotate_blocks_bwd)


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


@jax.named_scope("oft_rotate")
def rotate_weight(w: jax.Array, rotations: Sequence[jax.Array]) -> jax.Array:
    """``W BD(R_n)^T ... BD(R_1)^T`` for a weight ``[out, in]`` (``oft.merge_rotation``'s math, per adapter).

    The transpose of ``rotate_kernel``: ``x @ rotate_weight(W, Rs).T == x @ rotate_kernel(W.T, Rs)``. Each
    row of ``W`` is rotated like a token by ``rotate_blocks`` with the blocks transposed, so a dequantized
    ``[out, in]`` weight is rotated in place (the native CPU kernel where it runs) without first being
    transposed to ``[in, out]``. Result in ``w.dtype``.
    """
    for R in reversed(rotations):
        w = rotate_blocks(w, jnp.swapaxes(R, 1, 2))
    return w


def dequantize_rotate_weight(q: Any, rotations: Sequence[jax.Array], compute_dtype: Any) -> jax.Array:
    """``rotate_weight(quant.dequantize(q, compute_dtype), rotations)``, the same bits.

    On CPU a 4-bit weight and the first rotation ``rotate_weight`` applies (the last adapter's) run as one
    native kernel (``quant._dequant.dequantize_rotate_cpu``): the float32 weight is not written out and read
    back in between. Elsewhere, and for other formats and dtypes, the two steps.
    """
    if not rotations or not quant_dequant.fused_rotate_supported(q, rotations[-1], compute_dtype):
        return rotate_weight(quant.dequantize(q, compute_dtype), rotations)
    with jax.named_scope("oft_rotate"):
        Rt = jnp.swapaxes(rotations[-1], 1, 2)
        w = jax.lax.platform_dependent(
            Rt,
            cpu=lambda Rt: quant_dequant.dequantize_rotate_cpu(q, Rt),
            default=lambda Rt: rotate_blocks(quant.dequantize(q, compute_dtype), Rt),
        )
    return rotate_weight(w, rotations[:-1])


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
    w = dequantize_rotate_weight(q, rotations, compute_dtype)
    with jax.named_scope("gemm"):
        return jnp.matmul(x, w.T)


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


def rotation_from_vec(vec: jax.Array, s: AdapterSettings) -> jax.Array:
    """Rotation blocks ``[r, b, b]`` from (already COFT-projected) parameters, as ``s`` says.

    ``oft.rotation_blocks``'s math. On CPU, float32 Cayley-Neumann blocks of a size the native rotation
    kernels take are built by one native call per direction (``csrc/rotate.cc``; same series and additions,
    matmul sums in k order: float32 rounding apart from XLA's, tests/nn/test_native_rotate.py); elsewhere by
    XLA.
    """
    b, terms = s.block_size, s.num_cayley_neumann_terms
    if (
        s.use_cayley_neumann
        and terms >= 2
        and tuple(vec.shape) == s.param_shape
        and _native_rotate.supports(b, vec.dtype)
    ):
        R = _cayley_neumann_blocks(vec, b, terms, s.legacy_neumann)
        return jnp.broadcast_to(R, (s.r, b, b)) if s.block_share else R
    return oft.rotation_blocks(
        vec,
        block_size=s.block_size,
        num_blocks=s.r,
        use_cayley_neumann=s.use_cayley_neumann,
        num_terms=s.num_cayley_neumann_terms,
        legacy=s.legacy_neumann,
        block_share=s.block_share,
    )


def _cayley_neumann_xla(vec: jax.Array, b: int, terms: int, legacy: bool) -> jax.Array:
    return oft.cayley_neumann(oft.skew_from_vec(vec, b), terms, legacy=legacy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cayley_neumann_blocks(vec: jax.Array, b: int, terms: int, legacy: bool) -> jax.Array:
    """``cayley_neumann(skew_from_vec(vec, b), terms, legacy)``: the native kernels on CPU (chosen at lowering
    time, ``jax.lax.platform_dependent``), XLA elsewhere; float32 ``vec [n, b(b-1)/2]``."""
    return jax.lax.platform_dependent(
        vec,
        cpu=lambda v: _native_rotate.cayley_neumann_cpu(v, b, terms, legacy),
        default=lambda v: _cayley_neumann_xla(v, b, terms, legacy),
    )


def _cayley_neumann_fwd(vec, b, terms, legacy):
    return _cayley_neumann_blocks(vec, b, terms, legacy), vec


def _cayley_neumann_bwd(b, terms, legacy, vec, dR):
    def xla(v, g):
        return jax.vjp(lambda v_: _cayley_neumann_xla(v_, b, terms, legacy), v)[1](g)[0]

    def cpu(v, g):
        return _native_rotate.cayley_neumann_grad_cpu(v, g, terms, legacy)

    return (jax.lax.platform_dependent(vec, dR.astype(vec.dtype), cpu=cpu, default=xla),)


_cayley_neumann_blocks.defvjp(_cayley_neumann_fwd, _cayley_neumann_bwd)
