"""bitsandbytes' 8-bit blockwise quantizer (``quantize_blockwise``), used for double-quantized 4-bit absmax.

Two rules, both jnp and jit-able (docs/bitsandbytes-formats.md, "Quantization"):

  * ``"cpu"``: bnb's C++ ``quantize_cpu_impl`` (csrc/cpu_ops.cpp): a 65536-entry lookup table, *not* an exact
    nearest-code search. ``mids[i] = fl32(0.5 * (c[i] + c[i+1]))``;
    ``lut[j] = #{mids < fl32(-1 + fl32(2j) / 65535)}``; ``q = lut[uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535
    + 0.5)]`` with ``v = x * fl32(1 / absmax)``. An all-zero block stores absmax 0 and codes 0.
  * ``"cuda"``: bnb's ``dQuantize<0>`` (csrc/kernels.cu): a binary search over the sorted code from pivot 127
    with halving steps, then a midpoint rule that breaks ties toward the probed pivot. All-zero blocks give
    ``0 * inf = NaN`` inputs, which CUDA maps through the same comparisons (code 0 here, see
    ``_search_cuda``). Written from the kernel source; not verified on a GPU here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.quant._host_f32 import decode, encode, r32
from oftjax.quant._tables import DYNAMIC
from oftjax.quant._torch_mean import mean_bits

_LUT_SIZE = 65536


@functools.lru_cache(maxsize=4)
def _lut(code_bytes: bytes) -> np.ndarray:
    """bnb ``build_quantize_lut``: uint8 [65536], the code index for each of 65536 points of [-1, 1]."""
    code = np.frombuffer(code_bytes, np.float32)
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    j = np.arange(_LUT_SIZE, dtype=np.float32)
    val = (np.float32(-1.0) + (np.float32(2.0) * j) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    lut = np.searchsorted(mids, val, side="left").astype(np.uint8)  # = #{mids < val}
    lut.flags.writeable = False
    return lut


def _no_contract(x: jax.Array) -> jax.Array:
    """A select the XLA simplifier cannot fold; keeps ``x`` rounded before a following add
    (docs/bitsandbytes-formats.md, "Dequantization")."""
    return jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)


def _lut_codes(v: jax.Array, code: np.ndarray) -> jax.Array:
    lut = jnp.asarray(_lut(code.tobytes()))
    t = (jnp.clip(v, -1.0, 1.0) + jnp.float32(1.0)) * jnp.float32(0.5)
    t = _no_contract(t * jnp.float32(_LUT_SIZE - 1)) + jnp.float32(0.5)
    # float -> uint16 truncates toward zero like the C++ static_cast; NaN (undefined in C++) maps to index 0.
    idx = jnp.where(jnp.isnan(t), jnp.float32(0.0), t).astype(jnp.int32)
    return lut[idx]


def _search_cuda(v: jax.Array, code: np.ndarray) -> jax.Array:
    """``dQuantize<0>`` (csrc/kernels.cu): binary search from pivot 127, then the nearer neighbour."""
    c = jnp.asarray(code)
    pivot = jnp.full(v.shape, 127, jnp.int32)
    upper = jnp.full(v.shape, 255, jnp.int32)
    lower = jnp.zeros(v.shape, jnp.int32)
    lower_val = jnp.full(v.shape, code[0], jnp.float32)
    upper_val = jnp.full(v.shape, code[255], jnp.float32)
    val = c[pivot]
    # for (int i = 64; i > 0; i >>= 1): if (x > val) {lower=pivot; lower_val=val; pivot+=i;}
    #                                   else {upper=pivot; upper_val=val; pivot-=i;}  val = code[pivot]
    i = 64
    while i > 0:
        gt = v > val
        lower = jnp.where(gt, pivot, lower)
        lower_val = jnp.where(gt, val, lower_val)
        upper = jnp.where(gt, upper, pivot)
        upper_val = jnp.where(gt, upper_val, val)
        pivot = jnp.where(gt, pivot + i, pivot - i)
        val = c[pivot]
        i >>= 1
    # if (upper_pivot == 255) upper_val = code[255]; if (x > val) { midpoint = (upper_val + val) * 0.5f;
    #   return x > midpoint ? upper_pivot : pivot } else { midpoint = (lower_val + val) * 0.5f;
    #   return x < midpoint ? lower_pivot : pivot }
    upper_val = jnp.where(upper == 255, jnp.float32(code[255]), upper_val)
    gt = v > val
    mid_up = (upper_val + val) * jnp.float32(0.5)
    mid_lo = (lower_val + val) * jnp.float32(0.5)
    return jnp.where(gt, jnp.where(v > mid_up, upper, pivot), jnp.where(v < mid_lo, lower, pivot)).astype(
        jnp.uint8
    )


def quantize_blockwise(
    x: jax.Array, *, blocksize: int = 256, code: np.ndarray = DYNAMIC, rounding: str = "cpu"
) -> tuple[jax.Array, jax.Array]:
    """8-bit blockwise quantization of a float32 vector as bitsandbytes does it.

    Args:
      x: float32 values (any shape; flattened in C order).
      blocksize: values per absmax block (double quantization uses 256).
      code: the sorted 256-entry float32 code (the dynamic map by default).
      rounding: "cpu" (bnb's LUT rule) or "cuda" (bnb's binary search).

    Returns:
      ``(q uint8 [n], absmax float32 [ceil(n / blocksize)])``.

    Example:
      >>> q, am = quantize_blockwise(jnp.array([0.5, -1.0, 0.0], jnp.float32))
      >>> am.tolist()
      [1.0]
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1)
    n = x.shape[0]
    nb = -(-n // blocksize)
    xp = jnp.pad(x, (0, nb * blocksize - n)).reshape(nb, blocksize)
    ax = jnp.abs(xp)
    # C++ `absmax = std::max(absmax, fabs(v))` from 0 skips NaN (the comparison is false).
    absmax = jnp.max(jnp.where(jnp.isnan(ax), jnp.float32(0.0), ax), axis=1)
    inv = jnp.float32(1.0) / absmax
    v = xp * inv[:, None]
    match rounding:
        case "cpu":
            q = jnp.where(absmax[:, None] == 0, jnp.uint8(0), _lut_codes(v, code))
        case "cuda":
            q = _search_cuda(v, code)
        case _:
            raise ValueError(f"unknown rounding {rounding!r}: expected 'cpu' or 'cuda'")
    return q.reshape(-1)[:n], absmax


def quantize_blockwise_host(x64: np.ndarray, *, blocksize: int = 256, code: np.ndarray = DYNAMIC):
    """The CPU LUT rule in exact host float32 arithmetic (``_host_f32``), subnormals included.

    Args:
      x64: float32 values carried as float64 (``_host_f32.decode``).

    Returns:
      ``(q uint8 [n], absmax [nb] as float64 carriers)``.
    """
    n = x64.shape[0]
    nb = -(-n // blocksize)
    xp = np.pad(x64, (0, nb * blocksize - n)).reshape(nb, blocksize)
    ax = np.abs(xp)
    absmax = np.max(np.where(np.isnan(ax), 0.0, ax), axis=1)
    zero = absmax == 0
    with np.errstate(all="ignore"):
        inv = r32(1.0 / np.where(zero, 1.0, absmax))
        v = r32(xp * inv[:, None])
        v = np.where(v < -1.0, -1.0, np.where(v > 1.0, 1.0, v))  # std::clamp: NaN passes through
        t = r32(r32(v + 1.0) * 0.5 * (_LUT_SIZE - 1))  # *0.5 is exact
        t = r32(t + 0.5)
        idx = np.where(np.isnan(t), 0, np.trunc(np.nan_to_num(t))).astype(np.int64)
    q = np.where(zero[:, None], np.uint8(0), _lut(code.tobytes())[idx])
    return q.reshape(-1)[:n].astype(np.uint8), absmax


def double_quant_host(absmax: np.ndarray, *, num_threads: int | None = None) -> tuple[np.ndarray, ...]:
    """bnb's CPU double quantization of float32 ``absmax``: ``(q uint8, nested_absmax bits, offset bits)``.

    ``offset = torch.mean(absmax)`` (``_torch_mean``), then the CPU LUT rule on ``absmax - offset`` in blocks
    of 256. Float32 results are returned as uint32 bits so no flush-to-zero can touch them on the way back.
    """
    a = decode(absmax)
    offset = decode(mean_bits(absmax, num_threads=num_threads))
    q, absmax2 = quantize_blockwise_host(r32(a - offset), blocksize=256)
    return q, encode(absmax2), encode(offset)
