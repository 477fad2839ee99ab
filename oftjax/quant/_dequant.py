"""Dequantization of bitsandbytes int8 and NF4/FP4 weights, bit-exact with bitsandbytes 0.50.2.

Follows bnb's pure-torch default kernels (``bitsandbytes/backends/default/ops.py``:
``_dequantize_4bit_compute``, ``dequantize_blockwise``; ``bitsandbytes/_ops.py``:
``int8_vectorwise_dequant``), which CPU and CUDA agree with (docs/bitsandbytes-formats.md,
"Dequantization" and "CPU and CUDA rounding"):

  * 4-bit: ``out = dtype(fl32(code[nibble] * absmax[i // blocksize]))``, one float32 multiply then one
    round-to-nearest-even cast, no intermediate dtype.
  * double quantization: ``absmax = fl32(fl32(DYNAMIC[q] * nested_absmax[j // 256]) + offset)``, rounded after
    the multiply *and* after the add.
  * int8: ``fl32(fl32(CB * SCB) * fl32(1/127))`` with bnb's constant ``7.874015718698502e-3``.

Everything here is pure JAX and jit-able; shapes and format metadata are static, so a second call with the
same shapes does not recompile. The 4-bit lookup computes each block's 16 possible values once and selects
among them per nibble instead of gathering from the code table (``_dequantize_4bit_xla`` says why); the
bits are the same. ``dequantize_4bit`` is a named operation (``oftjax._registry``): ``oftjax.cpu_kernels``
may replace it on the CPU with a kernel giving the same bits. XLA:CPU flushes float32 subnormal *products*
to zero where bitsandbytes keeps them (docs/bitsandbytes-formats.md, "Dequantization").
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax._registry import operation
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
            return dequantize_4bit(q, out_dtype)
        case _:  # pragma: no cover - checked by the caller
            raise TypeError(type(q).__name__)


@operation("dequantize_4bit")
def dequantize_4bit(q: FourBitWeight, dtype: np.dtype) -> jax.Array:
    """A 4-bit weight dequantized into ``dtype``, shape ``q.shape`` (a named operation, see
    ``oftjax._registry``)."""
    if q.compress_statistics:
        stats = (q.absmax, q.nested_absmax, q.offset)
        return dequantize_4bit_nested(q.packed, *stats, q.shape, q.blocksize, q.quant_type, dtype)
    return dequantize_4bit_values(q.packed, q.absmax, q.shape, q.blocksize, q.quant_type, dtype)


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


def packed_bytes_for(packed: jax.Array, n: int) -> jax.Array:
    """``packed_bytes(packed)``, checked to hold at least ``n`` nibbles."""
    b = packed_bytes(packed)
    if b.shape[0] * 2 < n:
        raise ValueError(f"packed holds {b.shape[0]} bytes, {2 * b.shape[0]} nibbles; expected at least {n}")
    return b


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """uint8 codes ``[n]``: byte k holds element 2k in its high nibble and element 2k+1 in its low nibble."""
    b = packed_bytes_for(packed, n)
    return jnp.stack([b >> 4, b & 15], axis=-1).reshape(-1)[:n]


def dequantize_nested_absmax(qabsmax: jax.Array, nested_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """float32 absmax from double quantization: ``fl32(fl32(DYNAMIC[q] * nested_absmax[j // 256]) + offset)``.

    XLA:CPU contracts ``a * b + c`` into one FMA under jit (one rounding instead of two;
    docs/bitsandbytes-formats.md, "Dequantization"), and ``optimization_barrier``/``reduce_precision``/
    bitcasts do not stop it. A select on the product that the algebraic simplifier cannot fold (NaN stays
    NaN, so the value is unchanged) does.
    """
    nb = qabsmax.shape[0]
    n2 = -(-nb // NESTED_BLOCKSIZE)
    if nested_absmax.shape != (n2,):
        raise ValueError(
            f"nested_absmax must be float32 [{n2}] (one per {NESTED_BLOCKSIZE} absmax codes), "
            f"got {tuple(nested_absmax.shape)}"
        )
    # [n2, 256] layout: the nested scale broadcasts along the minor axis (a plain broadcast, where jnp.repeat
    # lowers to a scatter, cumulative sums and a gather)
    qabs = qabsmax.reshape(-1)
    if n2 * NESTED_BLOCKSIZE != nb:
        qabs = jnp.pad(qabs, (0, n2 * NESTED_BLOCKSIZE - nb))
    codes = jnp.asarray(DYNAMIC).at[qabs.reshape(n2, NESTED_BLOCKSIZE)].get(mode="promise_in_bounds")
    p = codes * nested_absmax.astype(jnp.float32)[:, None]
    p = jnp.where(jnp.isnan(p), jnp.float32(jnp.nan), p)  # FMA guard: keeps the product rounded
    absmax = (p + jnp.asarray(offset, jnp.float32)).reshape(-1)
    return absmax if absmax.shape[0] == nb else absmax[:nb]


_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def select_by_nibble(idx: jax.Array, leaves: list[jax.Array]) -> jax.Array:
    """``leaves[idx]`` for 4-bit ``idx`` (uint8 < 16) as a branch-free tree of 15 selects.

    XLA:CPU lowers a gather from a 16-entry table to one scalar load per element; a binary tree of ``where``
    selects on the four bits of ``idx`` vectorizes instead. The result is the chosen leaf itself, bit for bit.
    """
    level = list(leaves)
    for bit in range(4):  # bit 0 picks within pairs, bit 3 picks the half
        on = (idx & np.uint8(1 << bit)) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


# blocks per tile of the per-block value table (see _dequantize_4bit_xla): fastest of 1, 8, 16, 64 on XLA:CPU
_TILE = 8


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def dequantize_4bit_values(
    packed: jax.Array,
    absmax: jax.Array,
    shape: tuple[int, ...],
    blocksize: int,
    quant_type: str,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """``dtype(fl32(code[nibble] * absmax[i // blocksize]))`` reshaped to ``shape``: one multiply, one cast.

    Differentiable in ``absmax`` (forward and reverse mode: ``_dequantize_4bit_jvp``): the lookup works on raw
    bits, which carry no derivative, so the tangent ``code[nibble] * d absmax[block]`` is written out.
    """
    n = int(np.prod(shape, dtype=np.int64))
    nb = -(-n // blocksize)
    if absmax.shape != (nb,):
        raise ValueError(
            f"absmax must have shape [{nb}] for {n} elements in blocks of {blocksize}, "
            f"got {tuple(absmax.shape)}"
        )
    b = packed_bytes_for(packed, n)
    dtype = jax.dtypes.canonicalize_dtype(dtype)  # float64 is float32 unless x64 is enabled
    out = _dequantize_4bit_xla(b, absmax.astype(jnp.float32), n=n, blocksize=blocksize, quant_type=quant_type,
                               dtype=dtype)  # fmt: skip
    return out.reshape(shape)


def _dequantize_4bit_xla(
    b: jax.Array, scale: jax.Array, *, n: int, blocksize: int, quant_type: str, dtype: np.dtype
) -> jax.Array:
    """The XLA formulation (GPU/TPU, and CPU without the native kernel), flat ``[n]``; same bits.

    A block has only 16 possible outputs, so they are computed first (a quarter of the multiplies and casts
    of the direct formula at blocksize 64; the same float32 product and the same rounding, so the same bits)
    and each nibble then *selects* its block's value (``select_by_nibble``) on the raw bits, as unsigned
    integers of the output's width (XLA:CPU would widen bf16 selects to float32). The table is laid out
    ``[tiles, 16, _TILE]`` so that writing it is a contiguous vectorized loop and a block's 16 values are
    close together when read. The packed bytes are viewed as ``[tiles, _TILE, blocksize // 2]`` so the
    values broadcast along the minor axis; high and low nibbles are looked up separately and interleaved
    last, which XLA fuses into one vectorized loop per nibble that writes the output once. Blocks are
    zero-padded up to whole tiles (the ragged last block too) and the padding is sliced off.

    On XLA:CPU this is faster than a gather from the code table and than selecting among float32 codes
    (benchmarks/RESULTS.md, "4-bit dequantize, XLA formulations"); what remains is mostly the interleave,
    which XLA writes one element at a time.
    """
    uint = _UINT_OF_SIZE[dtype.itemsize]
    nb = -(-n // blocksize)
    tiles = -(-nb // _TILE)
    nbytes = tiles * _TILE * blocksize // 2  # blocksize is even: a block is whole bytes
    b = b[:nbytes] if b.shape[0] >= nbytes else jnp.pad(b, (0, nbytes - b.shape[0]))
    b = b.reshape(tiles, _TILE, blocksize // 2)
    if tiles * _TILE != nb:
        scale = jnp.pad(scale, (0, tiles * _TILE - nb))
    code = jnp.asarray(code_table(quant_type))
    values = (code[None, :, None] * scale.reshape(tiles, 1, _TILE)).astype(dtype)  # [tiles, 16, _TILE]
    # materialized (a quarter of the output at blocksize 64): XLA would otherwise fuse it into the lookup and
    # redo all 16 products for every element
    values = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(values, uint))
    leaves = [values[:, k, :, None] for k in range(16)]
    hi = select_by_nibble(b >> 4, leaves)  # element 2k: high nibble of byte k
    lo = select_by_nibble(b & 15, leaves)
    out = jax.lax.bitcast_convert_type(jnp.stack([hi, lo], axis=-1), dtype).reshape(-1)
    return out if out.shape[0] == n else out[:n]


def _code_of_each_element(packed: jax.Array, n: int, quant_type: str) -> jax.Array:
    """float32 ``code[nibble]`` of every element, flat ``[n]``."""
    return jnp.asarray(code_table(quant_type))[unpack_nibbles(packed, n).astype(jnp.int32)]


def _absmax_tangent(packed, d_absmax, shape, blocksize, quant_type, dtype) -> jax.Array:
    """The output's tangent for an absmax tangent: ``code[nibble] * d_absmax[block]`` (linear in it)."""
    n = int(np.prod(shape, dtype=np.int64))
    nb = d_absmax.shape[0]
    codes = _code_of_each_element(packed, n, quant_type)
    per_block = jnp.pad(codes, (0, nb * blocksize - n)).reshape(nb, blocksize)
    t = (per_block * d_absmax.astype(jnp.float32)[:, None]).reshape(-1)[:n]
    return t.reshape(shape).astype(dtype)


def _dequantize_4bit_jvp(shape, blocksize, quant_type, dtype, primals, tangents):
    packed, absmax = primals
    _, d_absmax = tangents
    out = dequantize_4bit_values(packed, absmax, shape, blocksize, quant_type, dtype)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    return out, _absmax_tangent(packed, d_absmax, shape, blocksize, quant_type, dtype)


dequantize_4bit_values.defjvp(_dequantize_4bit_jvp)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def dequantize_4bit_nested(
    packed: jax.Array,
    qabsmax: jax.Array,
    nested_absmax: jax.Array,
    offset: jax.Array,
    shape: tuple[int, ...],
    blocksize: int,
    quant_type: str,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """``dequantize_4bit_values`` with the absmax itself double-quantized (``dequantize_nested_absmax``).

    Differentiable in ``nested_absmax`` and ``offset`` (forward and reverse mode, through the absmax).
    """
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    nb = -(-n // blocksize)
    if qabsmax.shape != (nb,) or qabsmax.dtype != jnp.uint8:
        raise ValueError(
            f"absmax codes must be uint8 [{nb}] for {n} elements in blocks of {blocksize}, "
            f"got {qabsmax.dtype} {tuple(qabsmax.shape)}"
        )
    absmax = dequantize_nested_absmax(
        qabsmax, nested_absmax.astype(jnp.float32), jnp.asarray(offset, jnp.float32)
    )
    b = packed_bytes_for(packed, n)
    out = _dequantize_4bit_xla(b, absmax, n=n, blocksize=blocksize, quant_type=quant_type, dtype=dtype)
    return out.reshape(shape)


def _dequantize_4bit_nested_jvp(shape, blocksize, quant_type, dtype, primals, tangents):
    packed, qabsmax, nested_absmax, offset = primals
    _, _, d_nested, d_offset = tangents
    out = dequantize_4bit_nested(packed, qabsmax, nested_absmax, offset, shape, blocksize, quant_type, dtype)
    _, d_absmax = jax.jvp(
        lambda a2, off: dequantize_nested_absmax(
            qabsmax, a2.astype(jnp.float32), jnp.asarray(off, jnp.float32)
        ),
        (nested_absmax, offset),
        (d_nested, d_offset),
    )
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    return out, _absmax_tangent(packed, d_absmax, shape, blocksize, quant_type, dtype)


dequantize_4bit_nested.defjvp(_dequantize_4bit_nested_jvp)
