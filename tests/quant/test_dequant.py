"""Exact tests of dequantize: nibble order, storage views, nested absmax rounding (FMA), dtypes, jit."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from oftjax import quant


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def four_bit(packed_u8, absmax, shape, qt="nf4", bs=64, **kw) -> quant.FourBitWeight:
    packed = jnp.asarray(np.asarray(packed_u8, np.uint8).reshape(-1, 1))
    return quant.FourBitWeight(
        packed, jnp.asarray(np.asarray(absmax, np.float32)), shape=shape, blocksize=bs, quant_type=qt, **kw
    )


@pytest.mark.parametrize("qt", ["nf4", "fp4"], ids=str)
def test_nibble_order_high_first(qt):
    # byte k = code[2k] << 4 | code[2k+1]
    code = quant.code_table(qt)
    q = four_bit([0x1F, 0x80, 0x3C], [2.0], (5,), qt=qt)
    expected = np.float32(2.0) * code[[1, 15, 8, 0, 3]]
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), expected)


def test_blocks_cross_rows():
    # blocks run over the flattened weight: with shape (2, 48) and blocksize 32, block 1 spans both rows
    packed = np.full(48, 0xFF, np.uint8)  # every element is code 15 = 1.0
    q = four_bit(packed, [1.0, 2.0, 4.0], (2, 48), bs=32)
    out = np.asarray(quant.dequantize(q)).reshape(-1)
    np.testing.assert_array_equal(out, np.repeat(np.float32([1, 2, 4]), 32))


@pytest.mark.parametrize("storage", [jnp.float16, jnp.bfloat16, jnp.float32], ids=lambda d: np.dtype(d).name)
def test_storage_is_a_view_of_the_bytes(storage):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 64, dtype=np.uint8)
    ref = quant.dequantize(four_bit(raw, [0.5, 3.0], (8, 16), bs=64))
    viewed = jnp.asarray(raw.view(np.dtype(storage)).reshape(-1, 1))
    q = quant.FourBitWeight(viewed, jnp.asarray([0.5, 3.0], jnp.float32), shape=(8, 16), blocksize=64)
    np.testing.assert_array_equal(bits(quant.dequantize(q)), bits(ref))


def test_odd_count_ignores_padding_nibble():
    q = four_bit([0xF0, 0xF3], [1.0], (3,))  # last low nibble (3) is padding
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), np.float32([1, quant.NF4[0], 1]))


def test_nested_absmax_rounds_twice_under_jit():
    # fl32(fl32(code * absmax2) + offset): XLA contracts this into one FMA under jit unless guarded.
    rng = np.random.default_rng(1)
    nb = 256 * 64
    qabs = rng.integers(0, 256, nb, dtype=np.uint8)
    absmax2 = (rng.random(nb // 256) * 0.1).astype(np.float32)
    offset = np.float32(0.0549545)
    expected = (quant.DYNAMIC[qabs] * np.repeat(absmax2, 256)).astype(np.float32) + offset
    packed = np.full(nb * 32 // 2, 0xFF, np.uint8)  # code 15 = 1.0 everywhere: output = absmax
    q = quant.FourBitWeight(
        jnp.asarray(packed.reshape(-1, 1)),
        jnp.asarray(qabs),
        jnp.asarray(absmax2),
        jnp.asarray(offset),
        shape=(nb * 32,),
        blocksize=32,
    )
    for f in (quant.dequantize, jax.jit(quant.dequantize)):
        out = np.asarray(f(q)).reshape(nb, 32)[:, 0]
        np.testing.assert_array_equal(bits(out), bits(expected))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: np.dtype(d).name)
def test_output_dtype_is_one_rounding_from_float32(dtype):
    # Small absmax: float16 results include subnormals, which must not be flushed.
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, 512, dtype=np.uint8)
    absmax = np.float32(
        [3e-4, 1.7, 5e-6, 0.02, 1.0, 7.0, 1e-3, 0.5, 2.0, 0.1, 9e-5, 0.3, 4.0, 6e-2, 1e-2, 8.0]
    )
    q = four_bit(raw, absmax, (1024,))
    f32 = np.asarray(quant.dequantize(q, jnp.float32))
    for f in (quant.dequantize, jax.jit(quant.dequantize, static_argnums=1)):
        out = np.asarray(f(q, dtype))
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(bits(out), bits(f32.astype(np.dtype(dtype))))


def test_default_dtype_is_the_original():
    q = quant.quantize_4bit(jnp.ones((4, 64), jnp.bfloat16))
    assert quant.dequantize(q).dtype == jnp.bfloat16
    q8 = quant.quantize_int8(jnp.ones((4, 64), jnp.float16))
    assert (
        quant.dequantize(q8).dtype == jnp.float16 and quant.dequantize(q8, jnp.float32).dtype == jnp.float32
    )


def test_int8_formula():
    CB = np.array([[127, -64, 0, 1]], np.int8)
    SCB = np.float32([0.37])
    expected = ((CB.astype(np.float32) * SCB[:, None]) * np.float32(7.874015718698502e-3)).astype(np.float32)
    out = quant.dequantize(quant.Int8Weight(jnp.asarray(CB), jnp.asarray(SCB)))
    np.testing.assert_array_equal(bits(out), bits(expected))


def test_second_call_does_not_recompile():
    traces = []

    def step(q):
        traces.append(type(q).__name__)  # runs only when jit traces (compiles) anew
        return quant.dequantize(q)

    jd = jax.jit(step)
    for seed in range(3):
        w = jnp.asarray(np.random.default_rng(seed).standard_normal((32, 64)), jnp.float32)
        for q in (quant.quantize_4bit(w, "fp4", 32, True), quant.quantize_int8(w)):
            jd(q).block_until_ready()
    assert traces == ["FourBitWeight", "Int8Weight"]  # one per format, whatever the values


def test_rejects_bad_inputs():
    with pytest.raises(TypeError, match="Int8Weight or a FourBitWeight"):
        quant.dequantize(jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"absmax must have shape \[2\]"):
        quant.dequantize(four_bit(np.zeros(64, np.uint8), [1.0], (128,)))
    with pytest.raises(ValueError, match="SCB must be float32"):
        quant.dequantize(quant.Int8Weight(jnp.zeros((3, 4), jnp.int8), jnp.zeros((4,), jnp.float32)))
    with pytest.raises(ValueError, match="packed holds 2 bytes"):
        quant.dequantize(four_bit(np.zeros(2, np.uint8), [1.0], (7,)))


def test_bf16_storage_dtype_metadata_roundtrip():
    w = jnp.asarray(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64))
    q = quant.quantize_4bit(w, quant_storage=jnp.bfloat16)
    assert q.packed.dtype == jnp.bfloat16 and q.packed.shape == (32, 1)
    assert q.quant_storage == ml_dtypes.bfloat16
