"""LLM.int8 matrix multiplication as bitsandbytes 0.50.2 runs it in eval mode (``MatMul8bitLt``), pure JAX.

Reference: Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022), and
bitsandbytes ``autograd/_functions.py`` (``MatMul8bitLt.forward``), ``backends/default/ops.py`` (the kernels
bnb runs on the CPU: ``int8_vectorwise_quant``, ``int8_linear_matmul``, ``int8_mm_dequant``,
``int8_scaled_mm``, ``int8_mixed_scaled_mm``), ``backends/cuda/ops.py`` and ``csrc`` (``kInt8VectorQuant``,
``kdequant_mm_int32_fp16``: the CUDA rules). What each step computes, and where CPU and CUDA differ:
docs/bitsandbytes-formats.md, "int8 paths".

For ``y = x W^T + b`` with ``W`` an ``Int8Weight`` (``CB`` int8 ``[N, K]``, ``SCB`` float32 ``[N]``) and ``x``
flattened to ``[M, K]`` (every leading dimension is a row, as bnb flattens ``[batch, seq, K]``):

1. ``quantize_activations``: ``x16 = x.astype(float16)``; with ``threshold > 0`` the elements with
   ``|x16| >= float16(threshold)`` are outliers and their columns outlier columns (a boolean mask ``[K]``,
   never a gather of data-dependent size); outlier elements are zeroed, ``SCA = max |x16|`` per row,
   ``CA = round_half_even(x16 * fl32(fl32(1 / SCA) * 127))`` (``127 / SCA`` with ``rounding="cuda"``), NaN
   (an all-zero row) -> 0, then ``CA[:, outlier_cols] = 0``.
2. ``int8_matmul``: ``CA @ CB^T`` with int32 accumulation (exact).
3. ``rescale_int32``: ``fl32(fl32(float32(acc) * fl32(SCA SCB^T)) * 6.200124e-05) + b``, cast to ``x.dtype``
   (bnb's CPU constant; CUDA: ``float16(fma(acc * SCA * SCB, 6.200012e-05, b))`` with ``rounding="cuda"``).
4. outlier columns, when any: ``y += x[:, cols] @ float(dequantize(W)[:, cols]).astype(x.dtype)^T``, with
   static shapes (``lax.switch``): nothing without outliers, a fixed-size gather of up to
   ``OUTLIER_CAPACITY`` columns, else a dense matmul of the masked input (masked columns add exact zeros).

Steps 1-3 are bit-exact with bitsandbytes on the CPU; step 4 is a float matmul whose summation order is
XLA's, not MKL's (float32 rounding differences, and one rounding step of a 16-bit output dtype).
Everything is jit-able, with static shapes; ``threshold`` and ``rounding`` are static. The derivative is the
straight-through one, that of ``x dequantize(W)^T + b`` (bnb's ``MatMul8bitLt.backward``); under ``vmap``
each mapped slice decides its own outlier columns.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.quant._dequant import dequantize_int8
from oftjax.quant._formats import Int8Weight
from oftjax.quant._quant4 import ROUNDINGS

__all__ = [
    "QuantizedActivations",
    "int8_matmul",
    "llm_int8_matmul",
    "quantize_activations",
    "rescale_int32",
]

# int8_mm_dequant's 1/127^2: bnb's CPU kernel writes 6.200124e-05 (1/127^2 is 6.2000124e-05, so +1.8e-5
# relative), the CUDA kernel MM_DEQUANT_CONST 6.200012e-05f.
_MM_DEQUANT = {"cpu": np.float32(6.200124e-05), "cuda": np.float32(6.200012e-05)}
# Outlier columns multiplied as a gathered block up to this many (LLM.int8 reports a handful of systematic
# outlier features per layer); more fall back to a masked dense matmul. Shapes are static either way.
OUTLIER_CAPACITY = 64


class QuantizedActivations(NamedTuple):
    """Row-wise int8 activations (bnb ``int8_vectorwise_quant``'s ``CA``, ``SCA``, outlier columns).

    Attributes:
      CA: int8 ``[M, K]``; zero in every outlier column.
      SCA: float32 ``[M]``, the row absmax of the float16 activations without their outlier elements.
      outlier_cols: bool ``[K]``, True where some row holds ``|x16| >= float16(threshold)`` (all False when
        ``threshold == 0``). bnb returns the indices of the True entries.
    """

    CA: jax.Array
    SCA: jax.Array
    outlier_cols: jax.Array


def quantize_activations(x: jax.Array, threshold: float = 0.0, rounding: str = "cpu") -> QuantizedActivations:
    """Quantize activations ``[M, K]`` row-wise to int8 as bitsandbytes' LLM.int8 does.

    Args:
      x: float activations ``[M, K]`` (any float dtype; cast to float16 first, as bnb does).
      threshold: ``llm_int8_threshold``; > 0 turns on the outlier decomposition.
      rounding: "cpu" (bnb's CPU kernel, bit-exact) or "cuda" (``kInt8VectorQuant``: ``127 / SCA`` and the
        element test ``|x| < threshold`` against the float32 threshold).

    Returns:
      ``QuantizedActivations(CA, SCA, outlier_cols)``.

    Example:
      >>> import jax.numpy as jnp
      >>> qa = quantize_activations(jnp.array([[0.5, -1.0, 8.0], [0.25, 0.5, 1.0]]), threshold=6.0)
      >>> qa.CA.tolist(), qa.SCA.tolist(), qa.outlier_cols.tolist()
      ([[64, -127, 0], [32, 64, 0]], [1.0, 1.0], [False, False, True])
    """
    _check_rounding(rounding)
    if x.ndim != 2:
        raise ValueError(f"quantize_activations expects activations [M, K]; got shape {tuple(x.shape)}")
    return _quantize_activations(x, float(threshold), rounding)


def _quantize_activations(
    x: jax.Array, threshold: float, rounding: str, rows: jax.Array | None = None
) -> QuantizedActivations:
    x16 = x.astype(jnp.float16)
    if threshold > 0.0:
        # torch compares the float16 tensor with the threshold rounded to float16 (CPU and CUDA alike)
        outliers = jnp.abs(x16) >= np.float16(threshold)
        counted = outliers if rows is None else outliers & rows[:, None]
        cols = jnp.any(counted, axis=0)
        x16 = jnp.where(outliers, jnp.float16(0.0), x16)
    else:
        outliers, cols = None, jnp.zeros(x.shape[-1], jnp.bool_)
    SCA = jnp.max(jnp.abs(x16), axis=1).astype(jnp.float32)
    if rounding == "cpu":
        scale = (jnp.float32(1.0) / SCA) * jnp.float32(127.0)  # torch: 127.0 / t is t.reciprocal() * 127
    else:
        scale = jnp.float32(127.0) / SCA
    v = x16.astype(jnp.float32) * scale[:, None]
    CA = jnp.where(jnp.isnan(v), jnp.float32(0.0), jnp.round(v)).astype(jnp.int8)
    if outliers is not None:
        zero = cols[None, :]
        if rounding == "cuda":
            # kInt8VectorQuant zeroes |x| >= threshold in float32; it differs from the float16 test only
            # for |x| between threshold and float16(threshold)
            zero = zero | (jnp.abs(x.astype(jnp.float16).astype(jnp.float32)) >= np.float32(threshold))
        CA = jnp.where(zero, jnp.int8(0), CA)
    return QuantizedActivations(CA, SCA, cols)


def int8_matmul(CA: jax.Array, CB: jax.Array) -> jax.Array:
    """``CA @ CB^T`` for int8 ``CA [M, K]`` and ``CB [N, K]``, accumulated in int32 (bnb
    ``int8_linear_matmul``; exact, where bnb's CPU fallback without AVX-512 is a float32 matmul, exact while
    the partial sums stay below 2^24).

    Example:
      >>> import jax.numpy as jnp
      >>> int8_matmul(jnp.full((1, 4), 127, jnp.int8), jnp.full((2, 4), -127, jnp.int8)).tolist()
      [[-64516, -64516]]
    """
    if CA.dtype != jnp.int8 or CB.dtype != jnp.int8:
        raise TypeError(f"int8_matmul expects int8 operands; got {CA.dtype} and {CB.dtype}")
    dims = (((CA.ndim - 1,), (1,)), ((), ()))
    with jax.named_scope("int8_gemm"):
        return jax.lax.dot_general(CA, CB, dims, preferred_element_type=jnp.int32)


def rescale_int32(
    acc: jax.Array,
    SCA: jax.Array,
    SCB: jax.Array,
    bias: jax.Array | None = None,
    dtype: Any = jnp.float32,
    rounding: str = "cpu",
) -> jax.Array:
    """The int32 products back to floats with bias (bnb ``int8_mm_dequant``), in ``dtype``.

    CPU: ``fl32(fl32(float32(acc) * fl32(SCA[:, None] * SCB[None, :])) * 6.200124e-05)``, plus ``bias`` (as
    float32), cast to ``dtype``. CUDA (``kdequant_mm_int32_fp16``): ``v = fl32(fl32(acc * SCA) * SCB)``,
    ``float16(v * 6.200012e-05 + bias)`` (bias fused only when it is float16; another bias is added to the
    float16 result, rounding to float16 again), then cast to ``dtype``. The kernel's ``fmaf`` is computed as
    a float32 multiply and add here, which can move the float16 result by one float16 step in rare ties.

    Example:
      >>> import jax.numpy as jnp
      >>> acc = jnp.array([[16129]], jnp.int32)   # 127 * 127
      >>> rescale_int32(acc, jnp.array([2.0]), jnp.array([0.5])).tolist()   # bnb's CPU constant
      [[1.0000180006027222]]
      >>> rescale_int32(acc, jnp.array([2.0]), jnp.array([0.5]), rounding="cuda").tolist()
      [[1.0]]
    """
    _check_rounding(rounding)
    k = jnp.float32(_MM_DEQUANT[rounding])
    accf = acc.astype(jnp.float32)
    if rounding == "cpu":
        out = accf * (SCA[:, None] * SCB[None, :]) * k
        if bias is not None:
            out = _no_fma(out) + bias.astype(jnp.float32)
        return out.astype(dtype)
    v = _no_fma(accf * SCA[:, None] * SCB[None, :] * k)
    fused = bias is not None and bias.dtype == jnp.float16
    out = (v + bias.astype(jnp.float32) if fused else v).astype(jnp.float16)
    if bias is not None and not fused:
        out = (out.astype(jnp.float32) + bias.astype(jnp.float32)).astype(jnp.float16)
    return out.astype(dtype)


def llm_int8_matmul(
    x: jax.Array,
    q: Int8Weight,
    bias: jax.Array | None = None,
    *,
    threshold: float = 0.0,
    rounding: str = "cpu",
    outlier_rows: jax.Array | None = None,
) -> jax.Array:
    """``y = x W^T + bias`` the LLM.int8 way (bnb ``MatMul8bitLt.forward``), in ``x.dtype``.

    Args:
      x: ``[..., K]`` activations; all leading dimensions together are the rows whose outliers decide the
        outlier columns (bnb flattens ``[batch, seq, K]`` the same way).
      q: the ``Int8Weight`` ``[N, K]``.
      bias: ``[N]``, added as bnb adds it (``Linear8bitLt`` casts it to ``x.dtype`` first; so should the
        caller).
      threshold: ``llm_int8_threshold`` (0: every column through int8).
      rounding: "cpu" or "cuda" (see ``quantize_activations`` and ``rescale_int32``).
      outlier_rows: optional bool ``x.shape[:-1]``: only rows marked True choose the outlier columns (every
        row is still computed, with those columns). ``oftjax.generate`` leaves out the left padding it adds
        beyond the longest prompt, which transformers' batches do not have (docs/generation.md, "int8 layers:
        LLM.int8 in eval mode").

    Returns:
      ``[..., N]`` in ``x.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from oftjax.quant import quantize_int8
      >>> q = quantize_int8(jnp.eye(3))
      >>> llm_int8_matmul(jnp.array([[1.0, -0.25, 7.0]]), q, threshold=6.0).tolist()  # 7.0: an outlier
      [[1.0000180006027222, -0.25197306275367737, 7.0]]
    """
    _check_rounding(rounding)
    if not isinstance(q, Int8Weight):
        raise TypeError(f"llm_int8_matmul expects an Int8Weight, got {type(q).__name__}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(
            f"llm_int8_matmul: x has {x.shape[-1]} features, the weight {q.shape} expects {q.shape[1]}"
        )
    if outlier_rows is not None:
        outlier_rows = jnp.asarray(outlier_rows)
        if outlier_rows.shape != x.shape[:-1] or outlier_rows.dtype != jnp.bool_:
            raise ValueError(
                f"llm_int8_matmul: outlier_rows must be bool {tuple(x.shape[:-1])} (x's rows); "
                f"got {outlier_rows.dtype} {tuple(outlier_rows.shape)}"
            )
    return _llm_int8_matmul(x, q, bias, outlier_rows, float(threshold), rounding)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _llm_int8_matmul(
    x: jax.Array,
    q: Int8Weight,
    bias: jax.Array | None,
    rows: jax.Array | None,
    threshold: float,
    rounding: str,
) -> jax.Array:
    return _llm_int8(x, q, bias, rows, threshold, rounding)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _llm_int8(
    x: jax.Array,
    q: Int8Weight,
    bias: jax.Array | None,
    rows: jax.Array | None,
    threshold: float,
    rounding: str,
) -> jax.Array:
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    qa = _quantize_activations(x2, threshold, rounding, None if rows is None else rows.reshape(-1))
    acc = int8_matmul(qa.CA, q.CB)
    y = rescale_int32(acc, qa.SCA, q.SCB, bias, x.dtype, rounding)
    if threshold > 0.0:
        y = _add_outlier_columns(y, x2, qa.outlier_cols, q)
    return y.reshape(*lead, q.shape[0])


def _llm_int8_jvp(threshold: float, rounding: str, primals: tuple, tangents: tuple) -> tuple:
    # Straight-through, as bnb's MatMul8bitLt.backward: the derivative of x W^T + b with the dequantized W
    # (rounding to int8 has a zero derivative almost everywhere, which would stop every gradient).
    y = _llm_int8(*primals, threshold, rounding)
    dy = jax.jvp(_dense, primals[:3], tangents[:3])[1]
    return y, dy.astype(y.dtype)


_llm_int8.defjvp(_llm_int8_jvp)


def _dense(x: jax.Array, q: Int8Weight, bias: jax.Array | None) -> jax.Array:
    """``x dequantize(W)^T + bias`` in ``x.dtype``: the map whose derivative LLM.int8 is given."""
    w = dequantize_int8(q.CB, q.SCB).astype(x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
    return y if bias is None else y + bias.astype(x.dtype)


def _add_outlier_columns(y: jax.Array, x2: jax.Array, cols: jax.Array, q: Int8Weight) -> jax.Array:
    """``y + x[:, cols] @ W[:, cols]^T`` in ``y.dtype`` (torch ``addmm``: float32 accumulation, one rounding).

    The weight columns are ``int8_vectorwise_dequant`` (float32) cast to ``x.dtype``, as bnb's
    ``int8_mixed_scaled_mm`` takes them. Shapes stay static: with no outlier column nothing runs; up to
    ``OUTLIER_CAPACITY`` columns are gathered into a fixed-size block (unused slots multiply zeros); beyond
    that the whole masked input multiplies the whole dequantized weight (the other columns add exact zeros).
    """
    count = jnp.sum(cols, dtype=jnp.int32)
    capacity = min(OUTLIER_CAPACITY, cols.shape[0])
    branch = jnp.where(count == 0, 0, jnp.where(count <= capacity, 1, 2))
    return jax.lax.switch(
        branch,
        (
            lambda y, x2, cols: y,
            functools.partial(_gathered, q=q, capacity=capacity),
            functools.partial(_masked, q=q),
        ),
        y,
        x2,
        cols,
    )


def _gathered(y: jax.Array, x2: jax.Array, cols: jax.Array, *, q: Int8Weight, capacity: int) -> jax.Array:
    idx = jnp.nonzero(cols, size=capacity, fill_value=0)[0]
    used = jnp.arange(capacity) < jnp.sum(cols, dtype=jnp.int32)
    xo = jnp.where(used[None, :], x2[:, idx], jnp.zeros((), x2.dtype))
    return _accumulate(y, xo, dequantize_int8(q.CB[:, idx], q.SCB).astype(x2.dtype))


def _masked(y: jax.Array, x2: jax.Array, cols: jax.Array, *, q: Int8Weight) -> jax.Array:
    xo = jnp.where(cols[None, :], x2, jnp.zeros((), x2.dtype))
    return _accumulate(y, xo, dequantize_int8(q.CB, q.SCB).astype(x2.dtype))


def _accumulate(y: jax.Array, xo: jax.Array, w: jax.Array) -> jax.Array:
    # float32 operands: products of 16-bit floats are exact in float32, so this is addmm's float32
    # accumulation (and XLA:CPU has no bf16 x bf16 -> f32 dot for every shape); full float32 precision on
    # accelerators too (no TF32 / bf16 passes), as torch's addmm by default: these are the precise columns
    dims = (((1,), (1,)), ((), ()))
    with jax.named_scope("gemm"):
        extra = jax.lax.dot_general(
            xo.astype(jnp.float32), w.astype(jnp.float32), dims, precision=jax.lax.Precision.HIGHEST
        )
    return (y.astype(jnp.float32) + extra).astype(y.dtype)


def _no_fma(p: jax.Array) -> jax.Array:
    """Keep ``p`` rounded before a following add: XLA:CPU contracts ``a * b + c`` into one fused
    multiply-add under jit, and a select the simplifier cannot fold stops it (NaN stays NaN)."""
    return jnp.where(jnp.isnan(p), jnp.float32(jnp.nan), p)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}: expected one of {ROUNDINGS}")
