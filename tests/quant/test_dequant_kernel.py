"""The 4-bit dequantize kernel (select tree over per-block values) against a plain numpy reference.

The reference is the formula itself, ``dtype(fl32(code[nibble] * absmax[i // blocksize]))``, written with a
numpy gather and one ml_dtypes cast; everything is compared bit for bit, jitted.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from oftjax import quant
from oftjax.quant._dequant import (
    _TILE,
    _dequantize_4bit_xla,
    dequantize_4bit_values,
    dequantize_nested_absmax,
    packed_bytes,
    select_by_nibble,
)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def reference(raw: np.ndarray, absmax: np.ndarray, n: int, blocksize: int, qt: str, dtype) -> np.ndarray:
    idx = np.stack([raw >> 4, raw & 15], axis=-1).reshape(-1)[:n]
    with np.errstate(over="ignore", invalid="ignore"):  # inf * 0 and float16 overflow are intended
        vals = quant.code_table(qt)[idx] * np.repeat(absmax, blocksize)[:n]  # float32 * float32 -> float32
        assert vals.dtype == np.float32
        return vals.astype(dtype)


@pytest.mark.parametrize("qt", ["nf4", "fp4"], ids=str)
def test_select_by_nibble_is_the_table(qt):
    # all 16 entries, bit for bit: FP4 index 8 is +0.0 and index 0 is +0.0, NF4 index 7 is 0.0
    table = quant.code_table(qt)
    idx = jnp.arange(16, dtype=jnp.uint8)
    out = jax.jit(lambda i: select_by_nibble(i, [jnp.float32(v) for v in table]))(idx)
    np.testing.assert_array_equal(bits(out), bits(table))


@pytest.mark.parametrize(
    "shape,blocksize",
    [
        ((64, 64), 64),  # whole tiles of blocks
        ((8, 64), 64),  # one tile
        ((3, 64), 64),  # 3 blocks: the tile is padded
        ((33, 65), 32),  # ragged last block, odd count, padded tile
        ((7, 9), 4096),  # one ragged block larger than the weight
        ((1001,), 128),
        ((5, 4096), 256),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"bs{v}",
)
@pytest.mark.parametrize("qt", ["nf4", "fp4"], ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_matches_the_formula_bit_for_bit(shape, blocksize, qt, dtype):
    rng = np.random.default_rng(len(shape) * 1000 + blocksize)
    n = int(np.prod(shape))
    nb = -(-n // blocksize)
    raw = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    # a wide range of scales: float16 results include subnormals and overflow to inf
    absmax = (10.0 ** rng.uniform(-7, 5.5, nb)).astype(np.float32)
    f = jax.jit(dequantize_4bit_values, static_argnums=(2, 3, 4, 5))
    out = f(jnp.asarray(raw), jnp.asarray(absmax), shape, blocksize, qt, jnp.dtype(DTYPES[dtype]))
    expected = reference(raw, absmax, n, blocksize, qt, DTYPES[dtype]).reshape(shape)
    assert out.shape == shape and out.dtype == np.dtype(DTYPES[dtype])
    np.testing.assert_array_equal(bits(out), bits(expected))


def test_non_finite_absmax_propagates_like_the_formula():
    # inf * code 0 is NaN, inf * nonzero is +-inf, NaN stays NaN: as the direct multiply gives. (Subnormal
    # float32 products, which only the native CPU kernel keeps: tests/quant/test_native.py.)
    raw = np.arange(256, dtype=np.uint8)
    absmax = np.float32([np.inf, np.nan, 1.0, -0.0, 3.0e38, 1e-30, 2.0, 0.5])
    out = np.asarray(jax.jit(quant.dequantize)(quant.FourBitWeight(
        jnp.asarray(raw.reshape(-1, 1)), jnp.asarray(absmax), shape=(512,), blocksize=64, dtype=np.float32
    )))  # fmt: skip
    expected = reference(raw, absmax, 512, 64, "nf4", np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_array_equal(bits(out[ok]), bits(expected[ok]))


def test_tile_padding_does_not_leak():
    # nb = _TILE + 1 blocks: the second tile is padded with zero bytes and zero absmax, then sliced off
    nb = _TILE + 1
    raw = np.full(nb * 32, 0xFF, np.uint8)  # code 15 = 1.0: output = absmax per block
    absmax = np.arange(1, nb + 1, dtype=np.float32)
    out = quant.dequantize(
        quant.FourBitWeight(
            jnp.asarray(raw.reshape(-1, 1)), jnp.asarray(absmax), shape=(nb * 64,), blocksize=64
        )
    )
    np.testing.assert_array_equal(np.asarray(out), np.repeat(absmax, 64))


@pytest.mark.parametrize("nb", [256 * 3, 256 * 2 + 37, 5], ids=lambda v: f"nb{v}")
def test_nested_absmax_any_block_count(nb):
    # the [n2, 256] layout pads a ragged last group of 256 and slices it off; two roundings (no FMA)
    rng = np.random.default_rng(nb)
    qabs = rng.integers(0, 256, nb, dtype=np.uint8)
    n2 = -(-nb // 256)
    absmax2 = (rng.random(n2) * 0.1).astype(np.float32)
    offset = np.float32(0.0549545)
    expected = (quant.DYNAMIC[qabs] * np.repeat(absmax2, 256)[:nb]).astype(np.float32) + offset
    out = jax.jit(dequantize_nested_absmax)(jnp.asarray(qabs), jnp.asarray(absmax2), jnp.asarray(offset))
    np.testing.assert_array_equal(bits(out), bits(expected))


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_no_gather_over_the_elements(compress):
    # the point of the XLA formulation: XLA:CPU lowers a 16-entry table gather to scalar loads per element.
    # Only the nested absmax (one 256-entry gather per block, 1/blocksize of the elements) may gather.
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)
    q = quant.quantize_4bit(w, "nf4", 64, compress)

    def xla(q):
        absmax = dequantize_nested_absmax(q.absmax, q.nested_absmax, q.offset) if compress else q.absmax
        b = packed_bytes(q.packed)
        return _dequantize_4bit_xla(
            b, absmax, n=65536, blocksize=64, quant_type="nf4", dtype=np.dtype(np.float32)
        )

    for fn in (xla, quant.dequantize):
        hlo = jax.jit(fn).lower(q).compile().as_text()
        gathers = [line for line in hlo.splitlines() if " gather(" in line]
        assert all("f32[1024" in line for line in gathers), gathers
        assert len(gathers) == int(compress), gathers
