"""NF4 / FP4 blockwise quantization, bit-exact with bitsandbytes 0.50.2 (CPU rules by default).

References: bitsandbytes ``backends/default/ops.py`` (``quantize_4bit``, the kernel bnb runs on the CPU),
``functional.py`` (``quantize_4bit``: double quantization), ``csrc/kernels.cu`` (``kQuantizeBlockwise``,
``dQuantizeNF4``, ``dQuantizeFP4``: the CUDA rules); docs/bitsandbytes-formats.md, "Quantization",
"Double quantization" and "CPU and CUDA rounding".

rounding="cpu" (bnb's default torch kernel):
  * x = w.astype(float32) flattened in C order, blocks of ``blocksize``; ``absmax = max|x|`` per block.
  * full blocks: ``clip(x * fl32(1 / max(absmax, 1e-38)), -1, 1)``; the ragged last block *divides*:
    ``clip(x / max(absmax, 1e-38), -1, 1)``, and stores the clamped absmax (1e-38 for an all-zero ragged
    block; an all-zero full block stores 0).
  * code = ``#{mids < s}`` over the fp32 midpoints of the sorted code (``torch.bucketize``, ties go down; NaN
    goes to the top bucket like torch), mapped back through ``argsort(code)`` for FP4.
  * odd n: a 0.0 is appended before packing; byte k = code[2k] << 4 | code[2k+1].
rounding="cuda" (from the kernel source; not verified on a GPU here):
  * every block, including the ragged one, multiplies by ``fl32(1/absmax)``; no clamp of absmax, so an
    all-zero block gives ``0 * inf = NaN``, which both CUDA trees send to code 0b0000.
  * NF4: strict ``x > t`` against the same fp32 midpoints; FP4: sign bit from ``x < 0``, then ``|x|`` against
    the kernel's literal thresholds (off the true midpoints by up to 14 ulps).
Double quantization: ``offset = torch.mean(absmax)`` (torch's CPU summation order, ``_torch_mean``), then the
8-bit blockwise quantizer on ``absmax - offset`` in blocks of 256 (``_blockwise``). Host side: with the CPU
rules this whole nested stage (n / blocksize values) runs in numpy through ``jax.pure_callback`` in exact
float32 arithmetic (``_host_f32``), as XLA flushes the subnormal statistics of near-zero weights; with the
CUDA rules only the mean does (CUDA's own mean order is not emulated: its offset can differ in the last bits).
Everything else is jnp; ``quantize_4bit`` is jit-able either way.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.quant._blockwise import double_quant_host, quantize_blockwise
from oftjax.quant._formats import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, FourBitWeight
from oftjax.quant._tables import code_table
from oftjax.quant._torch_mean import mean_bits

ROUNDINGS = ("cpu", "cuda")
QUANT_STORAGES = tuple(np.dtype(d) for d in (jnp.uint8, jnp.float16, jnp.bfloat16, jnp.float32))

# float32 1e-38 (a subnormal) as bits: bnb's clamp floor, stored as the absmax of an all-zero ragged block.
_TINY_BITS = np.float32(1e-38).view(np.uint32)
# dQuantizeFP4 (csrc/kernels.cu:64) literal thresholds on |x| and the magnitude code of each bucket.
_FP4_CUDA_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], np.float32
)
_FP4_CUDA_BUCKET_CODE = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], np.uint8)


def _sorted_code(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(fp32 midpoints of the sorted code, argsort order): bnb ``_get_4bit_quantize_bounds``."""
    code = code_table(quant_type)
    order = np.argsort(code, kind="stable")  # FP4's two zeros: +0 (index 0) sorts before -0 (index 8)
    s = code[order]
    mids = ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32)
    return mids, order.astype(np.uint8)


def _count_below(s: jax.Array, thresholds: np.ndarray) -> jax.Array:
    """``#{t < s}`` per element as int32 (== ``searchsorted(t, s, side="left")`` for sorted t)."""
    t = jnp.asarray(thresholds)
    return jnp.sum(s[..., None] > t, axis=-1, dtype=jnp.int32)


def _codes_cpu(s: jax.Array, quant_type: str) -> jax.Array:
    mids, order = _sorted_code(quant_type)
    idx = jnp.where(jnp.isnan(s), jnp.int32(len(mids)), _count_below(s, mids))  # torch.bucketize: NaN -> end
    return jnp.asarray(order)[idx]


def _codes_cuda(s: jax.Array, quant_type: str) -> jax.Array:
    if quant_type == "nf4":
        mids, _ = _sorted_code("nf4")
        return _count_below(s, mids).astype(jnp.uint8)  # NaN fails every `x > t`: code 0
    sign = jnp.where(s < 0, jnp.uint8(8), jnp.uint8(0))
    bucket = _count_below(jnp.abs(s), _FP4_CUDA_THRESHOLDS)
    return jnp.asarray(_FP4_CUDA_BUCKET_CODE)[bucket] + sign


def _scale_blocks(x: jax.Array, blocksize: int, rounding: str) -> tuple[jax.Array, jax.Array]:
    """(scaled values [n], stored absmax [nb]) for flattened float32 x."""
    n = x.shape[0]
    nb = -(-n // blocksize)
    rem = n % blocksize
    xp = jnp.pad(x, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = jnp.max(jnp.abs(xp), axis=1)
    if rounding == "cuda":
        return (xp * (jnp.float32(1.0) / absmax)[:, None]).reshape(-1)[:n], absmax
    # bnb divides by clamp(absmax, 1e-38). XLA:CPU flushes subnormals (1e-38 included) to zero, so the clamp
    # is spelled out: an all-zero block scales to its own zeros and the ragged one stores 1e-38 by its bits.
    zero = absmax == 0
    safe = jnp.where(zero, jnp.float32(1.0), absmax)
    scaled = jnp.where(zero[:, None], xp, xp * (jnp.float32(1.0) / safe)[:, None])
    if rem:
        # bnb's ragged block: `A_flat[full:] / am` (a true division) and the clamped absmax is stored.
        # XLA rewrites `row / broadcast(scalar)` into `row * (1 / scalar)`; a data-dependent select for the
        # denominator blocks that (NaN / 1 is NaN / am: the value is unchanged).
        row = xp[-1]
        den = jnp.where(jnp.isnan(row), jnp.float32(1.0), safe[-1])
        scaled = scaled.at[-1].set(jnp.where(zero[-1], row, row / den))
        # The select is done on the bits: LLVM may treat a subnormal float constant as zero under XLA's flags.
        bits = jax.lax.bitcast_convert_type(absmax, jnp.uint32)
        bits = bits.at[-1].set(jnp.where(zero[-1], jnp.uint32(_TINY_BITS), bits[-1]))
        absmax = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.clip(scaled, -1.0, 1.0).reshape(-1)[:n], absmax


def _pack(codes: jax.Array, quant_storage: np.dtype) -> jax.Array:
    """Pack uint8 codes (even length) two per byte, high nibble first, then view as quant_storage [m, 1]."""
    packed = (codes[0::2] << 4) | codes[1::2]
    if quant_storage == np.uint8:
        return packed[:, None]
    size = quant_storage.itemsize
    return jax.lax.bitcast_convert_type(packed.reshape(-1, size), quant_storage)[:, None]


def _check(
    w: Any, quant_type: str, blocksize: int, quant_storage: Any, rounding: str
) -> tuple[Any, np.dtype]:
    if not hasattr(w, "dtype") or not hasattr(w, "shape"):
        raise TypeError(f"quantize_4bit expects a float array, got {type(w).__name__}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"quantize_4bit expects a floating-point weight (float32/bfloat16/float16), got {w.dtype}"
        )
    if w.ndim < 1 or w.size == 0:
        raise ValueError(f"quantize_4bit expects a non-empty array of rank >= 1, got shape {tuple(w.shape)}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: expected one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}: expected one of {BLOCKSIZES}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}: expected one of {ROUNDINGS}")
    try:
        storage = np.dtype(quant_storage)
    except TypeError:
        raise TypeError(f"quant_storage must be a dtype, got {quant_storage!r}") from None
    if storage not in QUANT_STORAGES:
        names = [str(d) for d in QUANT_STORAGES]
        raise ValueError(f"unsupported quant_storage {storage}: expected one of {names}")
    nbytes = (int(w.size) + 1) // 2
    if nbytes % storage.itemsize:
        raise ValueError(
            f"quant_storage {storage} ({storage.itemsize} bytes) does not divide the {nbytes} packed bytes "
            f"of a weight with {w.size} elements; use uint8 or a shape with ceil(n/2) a multiple of "
            f"{storage.itemsize}"
        )
    return w, storage


def quantize_4bit(
    w: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: Any = jnp.uint8,
    rounding: str = "cpu",
    *,
    mean_threads: int | None = None,
) -> FourBitWeight:
    """Quantize a weight to NF4 or FP4 exactly as ``bitsandbytes.functional.quantize_4bit`` does.

    Args:
      w: floating-point weight of any shape (float32, bfloat16 or float16; computed in float32).
      quant_type: "nf4" or "fp4".
      blocksize: 32, 64, 128, 256, 512, 1024, 2048 or 4096 elements per absmax.
      compress_statistics: double quantization (8-bit dynamic codes of ``absmax - offset``, blocks of 256).
      quant_storage: dtype the packed bytes are viewed as: uint8, float16, bfloat16 or float32.
      rounding: "cpu" (bit-exact with bnb on the CPU, the default) or "cuda" (the CUDA kernels' rules).
      mean_threads: thread count of the emulated ``torch.mean`` for the double-quant offset; only sums of
        >= 32768 absmax values depend on it. Default: the cores available to this process, like torch.

    Returns:
      A ``FourBitWeight`` with the packed bytes, absmax (and nested statistics), ``shape=w.shape`` and
      ``dtype=w.dtype``.

    Non-finite input: mirrors bnb on the CPU. A NaN element gets the top code (NF4 1.0, FP4 +1.0) and makes
    its block's absmax NaN (every element of that block then codes as 1.0); an inf makes absmax inf, the inf
    element codes as 1.0 and the rest of its block as 0. With double quantization the offset becomes NaN and
    bnb's nested statistics are meaningless (codes 0, nested absmax 0); dequantizing gives NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_4bit(jnp.ones((4, 16), jnp.bfloat16), "nf4", blocksize=32)
      >>> q.packed.shape, q.absmax.tolist()
      ((32, 1), [1.0, 1.0])
    """
    w, storage = _check(w, quant_type, blocksize, quant_storage, rounding)
    return _quantize_4bit(
        jnp.asarray(w),
        quant_type=quant_type,
        blocksize=int(blocksize),
        compress_statistics=bool(compress_statistics),
        storage=storage,
        rounding=rounding,
        mean_threads=mean_threads,
    )


@functools.partial(
    jax.jit,
    static_argnames=("quant_type", "blocksize", "compress_statistics", "storage", "rounding", "mean_threads"),
)
def _quantize_4bit(
    w: jax.Array,
    *,
    quant_type: str,
    blocksize: int,
    compress_statistics: bool,
    storage: np.dtype,
    rounding: str,
    mean_threads: int | None,
) -> FourBitWeight:
    """The validated body of ``quantize_4bit``, compiled once per shape and format."""
    shape = tuple(int(d) for d in w.shape)
    x = w.astype(jnp.float32).reshape(-1)
    scaled, absmax = _scale_blocks(x, blocksize, rounding)
    if scaled.shape[0] % 2:
        scaled = jnp.pad(scaled, (0, 1))
    codes = _codes_cpu(scaled, quant_type) if rounding == "cpu" else _codes_cuda(scaled, quant_type)
    packed = _pack(codes.astype(jnp.uint8), storage)
    meta = dict(shape=shape, dtype=np.dtype(w.dtype), blocksize=blocksize, quant_type=quant_type)
    if not compress_statistics:
        return FourBitWeight(packed, absmax, **meta)
    if rounding == "cpu":
        qabsmax, absmax2, offset = _double_quant_cpu(absmax, mean_threads)
    else:
        offset = _bits_to_f32(
            _host(lambda a: mean_bits(a, num_threads=mean_threads), absmax, ((), jnp.uint32))
        )
        qabsmax, absmax2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE, rounding=rounding)
    return FourBitWeight(packed, qabsmax, absmax2, offset, **meta)


def _bits_to_f32(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _host(fn: Any, x: jax.Array, *out: tuple[tuple[int, ...], Any]) -> Any:
    """Run numpy ``fn`` on the host (jit-able); outputs described by (shape, dtype) pairs."""
    specs = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out)
    res = jax.pure_callback(fn, specs if len(specs) > 1 else specs[0], x)
    return res


def _double_quant_cpu(absmax: jax.Array, mean_threads: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bnb's CPU double quantization on the host, in exact float32 with subnormals (``_host_f32``)."""
    nb = absmax.shape[0]
    nb2 = -(-nb // NESTED_BLOCKSIZE)
    q, absmax2, offset = _host(
        lambda a: double_quant_host(np.asarray(a), num_threads=mean_threads),
        absmax,
        ((nb,), jnp.uint8),
        ((nb2,), jnp.uint32),
        ((), jnp.uint32),
    )
    return q, _bits_to_f32(absmax2), _bits_to_f32(offset)
