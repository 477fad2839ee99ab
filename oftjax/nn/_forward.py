"""The computations the OFT layers run, in pure JAX: rotation blocks, rotated inputs and weights, and matmuls
over frozen quantized weights.

OFTv2's forward is input-centric: ``y = (x BD_1 ... BD_n) W^T`` (PEFT). It can be computed by rotating the
inputs (``tokens * d_in * b`` per adapter) or the weight (``d_in * d_out * b``); the layer picks the cheaper
one from static shapes. Whichever way the forward goes, the derivative is written the input-centric way
(custom JVPs): ``dy = d(x BD_1 ... BD_n) W^T``, whose transpose costs ``g W`` and then the blockwise chain.
Plain autodiff of the weight path would pass through the full weight gradient ``x^T g`` (``tokens * d_in *
d_out``) to reach the rotations.

Matmuls over a frozen quantized weight are rematerialized (``jax.checkpoint``): the backward pass
dequantizes the packed weight again rather than keeping the forward's float copy alive, so training memory
does not grow by 2-4 bytes per frozen parameter (bitsandbytes' ``MatMul4Bit`` backward does the same).

Everything here works under every JAX transformation (``grad``, ``jvp``, ``vmap``, ``jit``, ``remat``,
sharding). ``oft.rotate_blocks``, ``oft.cayley_neumann_blocks``, ``quant``'s 4-bit dequantize,
``dequantize_rotate`` and ``dequant_matmul_4bit`` below are named operations (``oftjax._registry``):
``oftjax.cpu_kernels`` may replace them on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from oftjax import oft, quant
from oftjax._registry import operation
from oftjax.nn._settings import AdapterSettings

__all__ = [
    "DotGeneral",
    "dequant_matmul",
    "dequant_matmul_4bit",
    "dequantize_rotate",
    "dequantize_rotate_weight",
    "rotate_chain",
    "rotate_kernel",
    "rotate_weight",
    "rotated_dequant_matmul",
    "rotated_matmul",
    "rotation_from_vec",
]

DotGeneral = Any


def rotation_from_vec(vec: jax.Array, s: AdapterSettings) -> jax.Array:
    """Rotation blocks ``[r, b, b]`` from (already COFT-projected) parameters, as the settings ``s`` say.

    Example:
      >>> import jax.numpy as jnp
      >>> rotation_from_vec(jnp.zeros((2, 6)), AdapterSettings(r=2, block_size=4)).shape
      (2, 4, 4)
    """
    return oft.rotation_blocks(
        vec,
        block_size=s.block_size,
        num_blocks=s.r,
        use_cayley_neumann=s.use_cayley_neumann,
        num_terms=s.num_cayley_neumann_terms,
        legacy=s.legacy_neumann,
        block_share=s.block_share,
    )


@jax.named_scope("oft_rotate")
def rotate_chain(x: jax.Array, rotations: Sequence[jax.Array]) -> jax.Array:
    """``x BD(R_1) ... BD(R_n)``; between adapters the value stays in the rotation dtype (as PEFT).

    Example:
      >>> import jax.numpy as jnp
      >>> rotate_chain(jnp.ones((3, 4)), [jnp.stack([jnp.eye(2)] * 2)]).shape
      (3, 4)
    """
    for R in rotations:
        x = oft.rotate_input(x, R, out_dtype=R.dtype)
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
    row of ``W`` is rotated like a token with the blocks transposed, so a dequantized ``[out, in]`` weight is
    rotated without first being transposed to ``[in, out]``. Result in ``w.dtype``.
    """
    for R in reversed(rotations):
        w = oft.rotate_input(w, jnp.swapaxes(R, 1, 2))
    return w


@operation("dequantize_rotate")
def dequantize_rotate(q: Any, Rt: jax.Array, dtype: Any) -> jax.Array:
    """``dequantize(q, dtype) BD(Rt)``: each row of a frozen ``[out, in]`` weight rotated by blocks ``Rt``.

    A named operation: ``oftjax.cpu_kernels`` fuses the two steps for 4-bit weights on the CPU (the float
    weight is then never written out and read back).
    """
    return oft.rotate_input(quant.dequantize(q, dtype), Rt)


def dequantize_rotate_weight(q: Any, rotations: Sequence[jax.Array], compute_dtype: Any) -> jax.Array:
    """``rotate_weight(quant.dequantize(q, compute_dtype), rotations)``; the last adapter's rotation (the
    first ``rotate_weight`` applies) goes through ``dequantize_rotate``."""
    if not rotations:
        return quant.dequantize(q, compute_dtype)
    with jax.named_scope("oft_rotate"):
        w = dequantize_rotate(q, jnp.swapaxes(rotations[-1], 1, 2), compute_dtype)
    return rotate_weight(w, rotations[:-1])


def _is_zero(t: Any) -> bool:
    return isinstance(t, SymbolicZero)


def _instantiate(t: SymbolicZero) -> Any:
    if t.dtype == jax.dtypes.float0:
        return np.zeros(t.shape, jax.dtypes.float0)
    return jnp.zeros(t.shape, t.dtype)


def _chain_tangent(
    x: jax.Array, rotations: Sequence[jax.Array], dx: Any, drots: Sequence[Any]
) -> jax.Array | None:
    """The tangent of ``rotate_chain(x, rotations)`` (None when both tangents are symbolic zeros)."""
    if _is_zero(dx) and all(_is_zero(t) for t in drots):
        return None
    dx = jnp.zeros_like(x) if _is_zero(dx) else dx
    drots = tuple(jnp.zeros_like(R) if _is_zero(t) else t for R, t in zip(rotations, drots, strict=True))
    return jax.jvp(rotate_chain, (x, tuple(rotations)), (dx, drots))[1]


def _sum_or_zeros(terms: list[jax.Array], like: jax.Array) -> jax.Array:
    if not terms:
        return jnp.zeros_like(like)
    return functools.reduce(jnp.add, terms).astype(like.dtype)


@jax.custom_jvp
def rotated_matmul(x: jax.Array, rotations: tuple[jax.Array, ...], kernel: jax.Array) -> jax.Array:
    """``(x BD_1 ... BD_n) @ K`` computed as ``x @ (BD_1 ... BD_n K)``; derivatives as for the input path.

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
    kernel_r = rotate_kernel(kernel, rotations)
    with jax.named_scope("gemm"):
        return jnp.matmul(x, kernel_r)


def _rotated_matmul_jvp(primals, tangents):
    x, rotations, kernel = primals
    dx, drots, dkernel = tangents
    y = rotated_matmul(x, rotations, kernel)
    terms = []
    du = _chain_tangent(x, rotations, dx, drots)
    with jax.named_scope("gemm"):
        if du is not None:
            terms.append(jnp.matmul(du.astype(kernel.dtype), kernel))
        if not _is_zero(dkernel):
            terms.append(jnp.matmul(rotate_chain(x, rotations).astype(kernel.dtype), dkernel))
    return y, _sum_or_zeros(terms, y)


rotated_matmul.defjvp(_rotated_matmul_jvp, symbolic_zeros=True)


def dequant_matmul(
    x: jax.Array,
    q: Any,
    compute_dtype: Any,
    dot_general: DotGeneral = jax.lax.dot_general,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """``x @ dequantize(q, compute_dtype).T``, rematerialized: the backward dequantizes ``q`` again.

    Args:
      x: ``[..., in]`` in ``compute_dtype``.
      q: an ``Int8Weight`` or ``FourBitWeight`` ``[out, in]``.
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

    def matmul(x: jax.Array, q: Any) -> jax.Array:
        if isinstance(q, quant.FourBitWeight):
            return dequant_matmul_4bit(x, q, compute_dtype, dot_general, precision)
        return _matmul_transposed(x, quant.dequantize(q, compute_dtype), dot_general, precision)

    return jax.checkpoint(matmul)(x, q)


def _matmul_transposed(
    x: jax.Array, w: jax.Array, dot_general: DotGeneral, precision: jax.lax.PrecisionLike
) -> jax.Array:
    """``x @ w.T`` for ``x [..., in]`` and ``w [out, in]`` with ``dot_general``."""
    with jax.named_scope("gemm"):
        return dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)


@operation("dequant_matmul_4bit")
def dequant_matmul_4bit(
    x: jax.Array,
    q: Any,
    compute_dtype: Any,
    dot_general: DotGeneral = jax.lax.dot_general,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """``x @ dequantize(q, compute_dtype).T`` for a 4-bit ``q [out, in]`` (``dequant_matmul``'s 4-bit case).

    A named operation: ``oftjax.cpu_kernels`` computes it straight from the packed bytes on the CPU for the
    few rows of ``x`` a decoding step has (the float weight is then never written out and read back).
    """
    return _matmul_transposed(x, quant.dequantize(q, compute_dtype), dot_general, precision)


def rotated_dequant_matmul(
    x: jax.Array, rotations: Sequence[jax.Array], q: Any, compute_dtype: Any
) -> jax.Array:
    """``rotated_matmul(x, rotations, dequantize(q, compute_dtype).T)`` for a frozen quantized ``q``.

    Rematerialized like ``dequant_matmul`` (no float copy of the weight kept for the backward pass).

    Example:
      >>> import jax.numpy as jnp
      >>> from oftjax import quant
      >>> R = (jnp.stack([jnp.eye(2)] * 2),)
      >>> rotated_dequant_matmul(jnp.ones((1, 4)), R, quant.quantize_int8(jnp.eye(4)), jnp.float32).shape
      (1, 4)
    """
    matmul = functools.partial(_rotated_dequant_matmul, compute_dtype=compute_dtype)
    return jax.checkpoint(matmul)(x, tuple(rotations), q)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _rotated_dequant_matmul(
    x: jax.Array, rotations: tuple[jax.Array, ...], q: Any, compute_dtype: Any
) -> jax.Array:
    w = dequantize_rotate_weight(q, rotations, compute_dtype)
    with jax.named_scope("gemm"):
        return jnp.matmul(x, w.T)


def _rotated_dequant_matmul_jvp(compute_dtype, primals, tangents):
    x, rotations, q = primals
    dx, drots, dq = tangents
    y = _rotated_dequant_matmul(x, rotations, q, compute_dtype)
    terms = []
    du = _chain_tangent(x, rotations, dx, drots)
    if du is not None:
        w = quant.dequantize(q, compute_dtype)
        with jax.named_scope("gemm"):
            terms.append(jnp.matmul(du.astype(compute_dtype), w.T))
    dq_leaves = jax.tree.leaves(dq, is_leaf=_is_zero)
    # a tangent of the quantization state (absmax, nested statistics): differentiate the dequantize too
    if not all(_is_zero(t) or t.dtype == jax.dtypes.float0 for t in dq_leaves):
        dq = jax.tree.map(lambda t: _instantiate(t) if _is_zero(t) else t, dq, is_leaf=_is_zero)
        dw = jax.jvp(lambda q_: quant.dequantize(q_, compute_dtype), (q,), (dq,))[1]
        u = rotate_chain(x, rotations).astype(compute_dtype)
        with jax.named_scope("gemm"):
            terms.append(jnp.matmul(u, dw.T))
    return y, _sum_or_zeros(terms, y)


_rotated_dequant_matmul.defjvp(_rotated_dequant_matmul_jvp, symbolic_zeros=True)
