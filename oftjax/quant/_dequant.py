"""Dequantization of bitsandbytes int8 and NF4/FP4 weights, bit-exact with bitsandbytes 0.50.2.

Follows bnb's pure-torch default kernels (``bitsandbytes/backends/default/ops.py``:
``_dequantize_4bit_compute``, ``dequantize_blockwise``; ``bitsandbytes/_ops.py``:
``int8_vectorwise_dequant``),
which CPU and CUDA agree with (../shared/notes/bitsandbytes-formats.md §4, §6):

  * 4-bit: ``out = dtype(fl32(code[nibble] * absmax[i // blocksize]))``, one float32 multiply then one
    round-to-nearest-even cast, no intermediate dtype.
  * double quantization: ``absmax = fl32(fl32(DYNAMIC[q] * nested_absmax[j // 256]) + offset)``, rounded after
    the multiply *and* after the add.
  * int8: ``fl32(fl32(CB * SCB) * fl32(1/127))`` with bnb's constant ``7.874015718698502e-3``.

Everything here is jnp and jit-able; shapes and format metadata are static, so a second call with the same
shapes does not recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.quant._formats import NESTED_BLOCKSIZE, FourBitWeight, Int8Weight
from oftjax.quant._tables import DYNAMIC, code_table

# bnb `int8_vectorwise_dequant`: `A * stats.view(-1, 1) * 7.874015718698502e-3` (float32 constant).
_INV_127 = np.float32(7.874015718698502e-3)


def dequantize(q: Int8Weight | FourBitWeight, dtype: Any = None) -> jax.Array:
    """Dequantize a bitsandbytes weight, bit for bit as bitsandbytes does.

    Args:
      q: an ``Int8Weight`` or a ``FourBitWeight``.
      dtype: output dtype; defaults to ``q.dtype`` (the dtype of the weight before quantization). The value is
        computed in float32 and rounded once to ``dtype`` (round to nearest even).

    Returns:
      The weight, shape ``q.shape`` (``[out, in]`` for int8).

    Example:
      >>> import jax.numpy as jnp
      >>> from oftjax import quant
      >>> w = jnp.linspace(-1.0, 1.0, 64 * 64, dtype=jnp.float32).reshape(64, 64)
      >>> q = quant.quantize_4bit(w, quant_type="nf4", blocksize=64)
      >>> quant.dequantize(q).shape
      (64, 64)
    """
    out_dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    if not isinstance(q, Int8Weight | FourBitWeight):
        raise TypeError(f"dequantize expects an Int8Weight or a FourBitWeight, got {type(q).__name__}")
    return _dequantize(q, out_dtype)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: Int8Weight | FourBitWeight, out_dtype: np.dtype) -> jax.Array:
    """The body of ``dequantize``, compiled once per format, shape and output dtype."""
    match q:
        case Int8Weight():
            return dequantize_int8(q.CB, q.SCB).astype(out_dtype)
        case FourBitWeight():
            absmax = q.absmax
            if q.compress_statistics:
                absmax = dequantize_nested_absmax(q.absmax, q.nested_absmax, q.offset)
            return dequantize_4bit_values(q.packed, absmax, q.shape, q.blocksize, q.quant_type).astype(
                out_dtype
            )
        case _:  # pragma: no cover - checked by the caller
            raise TypeError(type(q).__name__)


def dequantize_int8(CB: jax.Array, SCB: jax.Array) -> jax.Array:
    """float32 ``fl32(fl32(CB * SCB[:, None]) * fl32(1/127))`` (bnb ``int8_vectorwise_dequant``)."""
    if CB.ndim != 2 or CB.dtype != jnp.int8:
        raise ValueError(f"CB must be int8 [out, in], got {CB.dtype} {tuple(CB.shape)}")
    if SCB.shape != CB.shape[:1]:
        raise ValueError(
            f"SCB must be float32 [{CB.shape[0]}] (one scale per row of CB), got {tuple(SCB.shape)}"
        )
    return (CB.astype(jnp.float32) * SCB.astype(jnp.float32)[:, None]) * _INV_127


def packed_bytes(packed: jax.Array) -> jax.Array:
    """The packed 4-bit buffer in any quant_storage dtype, flattened in C order and viewed as uint8."""
    if packed.dtype == jnp.uint8:
        return packed.reshape(-1)
    if packed.dtype == jnp.int8:
        return jax.lax.bitcast_convert_type(packed, jnp.uint8).reshape(-1)
    # bitcast to a narrower type appends a trailing axis of bytes in memory (little-endian) order, like
    # torch's `Tensor.view(torch.uint8)`.
    return jax.lax.bitcast_convert_type(packed, jnp.uint8).reshape(-1)


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """uint8 codes ``[n]``: byte k holds element 2k in its high nibble and element 2k+1 in its low nibble."""
    b = packed_bytes(packed)
    if b.shape[0] * 2 < n:
        raise ValueError(f"packed holds {b.shape[0]} bytes, {2 * b.shape[0]} nibbles; expected at least {n}")
    return jnp.stack([b >> 4, b & 15], axis=-1).reshape(-1)[:n]


def dequantize_nested_absmax(qabsmax: jax.Array, nested_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """float32 absmax from double quantization: ``fl32(fl32(DYNAMIC[q] * nested_absmax[j // 256]) + offset)``.

    XLA:CPU contracts ``a * b + c`` into one FMA under jit (one rounding instead of two; notes §8.6), and
    ``optimization_barrier``/``reduce_precision``/bitcasts do not stop it. A select on the product that the
    algebraic simplifier cannot fold (NaN stays NaN, so the value is unchanged) does.
    """
    nb = qabsmax.shape[0]
    n2 = -(-nb // NESTED_BLOCKSIZE)
    if nested_absmax.shape != (n2,):
        raise ValueError(
            f"nested_absmax must be float32 [{n2}] (one per {NESTED_BLOCKSIZE} absmax codes), "
            f"got {tuple(nested_absmax.shape)}"
        )
    codes = jnp.asarray(DYNAMIC).at[qabsmax.astype(jnp.int32)].get(mode="promise_in_bounds")
    scale = jnp.repeat(nested_absmax.astype(jnp.float32), NESTED_BLOCKSIZE, total_repeat_length=n2 * 256)[:nb]
    p = codes * scale
    p = jnp.where(jnp.isnan(p), jnp.float32(jnp.nan), p)  # FMA guard: keeps the product rounded
    return p + jnp.asarray(offset, jnp.float32)


def dequantize_4bit_values(
    packed: jax.Array, absmax: jax.Array, shape: tuple[int, ...], blocksize: int, quant_type: str
) -> jax.Array:
    """float32 ``code[nibble] * absmax[i // blocksize]`` reshaped to ``shape`` (one multiply, no cast)."""
    n = int(np.prod(shape, dtype=np.int64))
    nb = -(-n // blocksize)
    if absmax.shape != (nb,):
        raise ValueError(
            f"absmax must have shape [{nb}] for {n} elements in blocks of {blocksize}, "
            f"got {tuple(absmax.shape)}"
        )
    idx = unpack_nibbles(packed, n)
    # nibbles are < 16 by construction: skip the gather's bounds clamp
    vals = jnp.asarray(code_table(quant_type)).at[idx.astype(jnp.int32)].get(mode="promise_in_bounds")
    pad = nb * blocksize - n
    if pad:
        vals = jnp.pad(vals, (0, pad))
    out = vals.reshape(nb, blocksize) * absmax.astype(jnp.float32)[:, None]
    return out.reshape(-1)[:n].reshape(shape)
