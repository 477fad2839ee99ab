"""Hypothesis properties of the pure quantization functions (fixed shapes: one compilation each)."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oftjax import quant
from oftjax.quant._dequant import unpack_nibbles
from oftjax.quant._host_f32 import decode, encode, r32
from oftjax.quant._quant4 import _pack
from oftjax.quant._torch_mean import torch_mean_f32

FAST = settings(max_examples=30, deadline=None)
finite = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)


@FAST
@given(
    codes=hnp.arrays(np.uint8, 32, elements=st.integers(0, 15)),
    storage=st.sampled_from(quant.QUANT_STORAGES),
)
def test_pack_then_unpack_is_identity(codes, storage):
    packed = _pack(jnp.asarray(codes), storage)
    assert packed.dtype == storage and packed.shape == (16 // storage.itemsize, 1)
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed, 32)), codes)


@FAST
@given(
    w=hnp.arrays(np.float32, (3, 40), elements=finite),
    qt=st.sampled_from(["nf4", "fp4"]),
)
def test_each_value_gets_a_nearest_code(w, qt):
    # blocksize 32 over 120 values: three full blocks and a ragged one of 24
    q = quant.quantize_4bit(jnp.asarray(w), qt, 32)
    absmax = np.asarray(q.absmax).astype(np.float64)
    x = w.reshape(-1).astype(np.float64)
    blk = np.arange(x.size) // 32
    s = np.divide(x, absmax[blk], out=np.zeros_like(x), where=absmax[blk] > 0)
    chosen = np.asarray(quant.dequantize(q)).reshape(-1).astype(np.float64)
    chosen = np.divide(chosen, absmax[blk], out=np.zeros_like(x), where=absmax[blk] > 0)
    code = quant.code_table(qt).astype(np.float64)
    best = np.min(np.abs(s[:, None] - code[None, :]), axis=1)
    assert np.all(np.abs(s - chosen) <= best + 1e-6)
    # and the stored absmax is the block's max |w| (exact)
    np.testing.assert_array_equal(absmax[:3], np.abs(w.reshape(-1)[:96]).reshape(3, 32).max(1))


@FAST
@given(w=hnp.arrays(np.float32, (4, 24), elements=finite))
def test_int8_codes_and_error_bound(w):
    q = quant.quantize_int8(jnp.asarray(w))
    CB, SCB = np.asarray(q.CB).astype(np.int32), np.asarray(q.SCB).astype(np.float64)
    w16 = w.astype(np.float16).astype(np.float64)
    nonzero = SCB > 0
    assert np.all(np.abs(CB) <= 127)
    assert np.all(np.abs(CB[nonzero]).max(axis=1) == 127)
    err = np.abs(np.asarray(quant.dequantize(q, jnp.float32), np.float64) - w16)
    assert np.all(err <= (SCB / 127 * (0.5 + 1e-5))[:, None])


@FAST
@given(u=hnp.arrays(np.uint32, 64, elements=st.integers(0, 2**32 - 1)))
def test_host_float32_decode_encode_round_trip(u):
    e = (u >> 23) & 0xFF
    u = u[(e != 255)]  # inf/NaN payloads aside
    np.testing.assert_array_equal(encode(decode(u)), u)


@FAST
@given(a=hnp.arrays(np.float64, 64, elements=st.floats(-1e30, 1e30, allow_nan=False)))
def test_r32_is_float32_rounding(a):
    normal = np.abs(a) >= 2.0**-126
    np.testing.assert_array_equal(r32(a)[normal], a[normal].astype(np.float32).astype(np.float64))


@FAST
@given(v=hnp.arrays(np.float32, st.integers(1, 3000), elements=st.integers(0, 255).map(float)))
def test_mean_of_small_integers_is_the_rounded_quotient(v):
    # integer sums below 2**24 are exact in any order: the mean is fl32(sum / n)
    expected = np.float32(np.float64(v.sum(dtype=np.float64)) / v.size)
    assert torch_mean_f32(v) == expected
