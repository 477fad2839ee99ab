"""rounding="cuda" agrees with the CPU rules away from the documented corners and differs at them.

Corners (docs/bitsandbytes-formats.md, "CPU and CUDA rounding"): the ragged block (CUDA multiplies by the
reciprocal, the CPU divides), FP4 literal thresholds and the encoding of +-0, all-zero blocks (NaN codes on
CUDA), NaN input, the nested 8-bit quantizer (binary search vs the CPU's 65536-entry LUT), int8's scale
(127 / SCB).
The CUDA side itself is checked against bitsandbytes in tests/parity/test_quant_cuda_parity.py (GPU only).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import quant
from oftjax.quant._blockwise import quantize_blockwise


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def both(w, *args, **kw):
    w = jnp.asarray(w)
    return quant.quantize_4bit(w, *args, **kw), quant.quantize_4bit(w, *args, rounding="cuda", **kw)


@pytest.mark.parametrize("bs", [32, 256, 4096], ids=lambda b: f"bs{b}")
def test_nf4_agrees_on_full_blocks(bs):
    w = np.random.default_rng(bs).standard_normal((64, 256)).astype(np.float32)
    cpu, cuda = both(w, "nf4", bs)
    np.testing.assert_array_equal(bits(cpu.packed), bits(cuda.packed))
    np.testing.assert_array_equal(bits(cpu.absmax), bits(cuda.absmax))


def test_fp4_agrees_in_value_on_full_blocks_and_differs_in_zero_encoding():
    w = np.random.default_rng(7).standard_normal((64, 256)).astype(np.float32)
    w[0, :32] = np.float32(1e-4)  # tiny positive values: FP4 "zero", encoded 0b1000 on CPU, 0b0000 on CUDA
    w[0, 0] = 1.0
    cpu, cuda = both(w, "fp4", 64)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(cpu)), np.asarray(quant.dequantize(cuda)))
    assert np.asarray(cpu.packed)[0, 0] & 0xF == 0b1000 and np.asarray(cuda.packed)[0, 0] & 0xF == 0b0000


def test_fp4_literal_threshold_corner():
    # dQuantizeFP4 compares with the literal 0.583333f, 6 ulps below the true midpoint of 0.5 and 2/3
    literal = np.float32(0.583333)
    midpoint = np.float32((np.float32(0.5) + np.float32(2 / 3)) / np.float32(2))
    x = np.nextafter(literal, np.float32(1))
    assert literal < x < midpoint
    w = np.float32([1.0, x] + [0.0] * 62)
    cpu, cuda = both(w, "fp4", 64)
    assert quant.dequantize(cpu)[1] == 0.5 and quant.dequantize(cuda)[1] == np.float32(2 / 3)


def test_ragged_block_divides_on_cpu_and_multiplies_on_cuda():
    # x / 3 lands on an NF4 midpoint (a tie: lower code) while x * fl32(1/3) is one ulp below it
    x = np.float32(-1.8318986)
    assert np.float32(x / np.float32(3)) != np.float32(x * (np.float32(1) / np.float32(3)))
    w = np.float32([3.0, x, 0.5])  # one ragged block (n < blocksize)
    cpu, cuda = both(w, "nf4", 64)
    assert np.asarray(cpu.packed)[0, 0] & 0xF == 2 and np.asarray(cuda.packed)[0, 0] & 0xF == 1


def test_zero_blocks_and_nan():
    w = np.ones(64 * 2 + 5, np.float32)
    w[:64] = 0.0
    w[-5:] = 0.0
    cpu, cuda = both(w, "nf4", 64)
    np.testing.assert_array_equal(bits(cpu.absmax), bits(np.float32([0, 1, 1e-38])))
    np.testing.assert_array_equal(bits(cuda.absmax), bits(np.float32([0, 1, 0])))
    assert np.asarray(cpu.packed)[0, 0] == 0x77 and np.asarray(cuda.packed)[0, 0] == 0x00  # 0*inf = NaN -> 0
    np.testing.assert_array_equal(np.asarray(quant.dequantize(cuda)), np.asarray(quant.dequantize(cpu)))
    w = np.float32([np.nan, 1.0] * 32)
    cpu, cuda = both(w, "nf4", 64)
    assert np.asarray(cpu.packed)[0, 0] >> 4 == 15 and np.asarray(cuda.packed)[0, 0] >> 4 == 0


def test_nested_quantizer_lut_vs_binary_search():
    x = (np.random.default_rng(8).standard_normal(256 * 64) * 0.02).astype(np.float32)
    q_cpu, am_cpu = quantize_blockwise(jnp.asarray(x), rounding="cpu")
    q_cuda, am_cuda = quantize_blockwise(jnp.asarray(x), rounding="cuda")
    np.testing.assert_array_equal(bits(am_cpu), bits(am_cuda))
    diff = np.abs(np.asarray(q_cpu, np.int32) - np.asarray(q_cuda, np.int32))
    assert 0 < np.count_nonzero(diff) < 0.01 * x.size and diff.max() <= 2
    # the binary search is an exact nearest-code search (ties aside)
    code = quant.DYNAMIC.astype(np.float64)
    v = x.astype(np.float64) / np.repeat(np.asarray(am_cuda, np.float64), 256)
    best = np.min(np.abs(v[:, None] - code[None, :]), axis=1)
    assert np.all(np.abs(v - code[np.asarray(q_cuda)]) <= best + 1e-7)


def test_double_quant_cuda_mode_dequantizes_close():
    w = jnp.asarray(np.random.default_rng(9).standard_normal((64, 256)), jnp.float32)
    cpu, cuda = both(w, "nf4", 64, True)
    assert bits(cpu.offset) == bits(cuda.offset)  # same (emulated torch CPU) mean
    a, b = np.asarray(quant.dequantize(cpu)), np.asarray(quant.dequantize(cuda))
    assert np.mean(a == b) > 0.97


def test_int8_scale_division():
    w = np.random.default_rng(10).standard_normal((256, 256)).astype(np.float32)
    cpu = quant.quantize_int8(jnp.asarray(w))
    cuda = quant.quantize_int8(jnp.asarray(w), rounding="cuda")
    np.testing.assert_array_equal(bits(cpu.SCB), bits(cuda.SCB))
    diff = np.abs(np.asarray(cpu.CB, np.int32) - np.asarray(cuda.CB, np.int32))
    assert diff.max() <= 1 and np.count_nonzero(diff) < 1e-3 * w.size
