"""The fused 4-bit dequantize-and-rotate kernel (csrc/dequant4.cc, Dequant4Rotate) and where it runs.

With ``oftjax.cpu_kernels`` enabled, ``dequantize_rotate`` (the 4-bit weight path of an OFT layer: each row of
the dequantized weight rotated by the last adapter's blocks) runs one kernel pass for float32 output and
rotation blocks the rotation kernels take. It gives the bits of dequantizing and then rotating with those
kernels, so the comparison with the two steps is exact; further adapters, other block sizes and dtypes, and
int8 weights keep the two steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import cpu_kernels, quant
from oftjax.cpu_kernels import _dequant
from oftjax.nn._forward import dequantize_rotate_weight, rotate_weight, rotated_dequant_matmul
from tests.cpu_kernels._helpers import (
    ROTATE_BLOCK_SIZES,
    assert_scaled_close,
    bits,
    lowered,
    require_loaded,
    rotate_reference,
    skip_without_avx512,
)

pytestmark = skip_without_avx512(_dequant.LIBRARY.supports(32), "tests/nn/test_rotated_matmul.py")


@pytest.fixture(autouse=True)
def _loaded():
    require_loaded(_dequant.LIBRARY)


def _quantized(shape, quant_type, blocksize, nested, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    return quant.quantize_4bit(
        jnp.asarray(w), quant_type=quant_type, blocksize=blocksize, compress_statistics=nested
    )


_FUSED_SHAPES = {  # (rows, features), quantization blocksize
    "64x96": ((64, 96), 64),
    "512x512": ((512, 512), 64),
    "rows-straddle-blocks": ((37, 48), 128),
    "ragged-last-block": ((3, 96), 256),
    "one-row": ((1, 64), 32),
    "blocks-span-rows": ((16, 1536), 4096),
}


@pytest.mark.parametrize(
    "b,shape,blocksize",
    [
        pytest.param(b, shape, bs, id=f"b{b}-{name}")
        for name, (shape, bs) in _FUSED_SHAPES.items()
        for b in ROTATE_BLOCK_SIZES
        if shape[1] % b == 0
    ],
)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fused_dequantize_rotate_has_the_bits_of_the_two_steps(b, shape, blocksize, nested, quant_type):
    q = _quantized(shape, quant_type, blocksize, nested)
    R = jnp.asarray(np.random.default_rng(1).standard_normal((shape[1] // b, b, b)), jnp.float32)
    assert _dequant.fused_supported(q, R, jnp.float32)
    target = "@oftjax_dequant4_nested_rotate(" if nested else "@oftjax_dequant4_rotate("
    with cpu_kernels.enable():
        fused = jax.jit(lambda q, R: dequantize_rotate_weight(q, (R,), jnp.float32))
        assert target in fused.lower(q, R).as_text()
        two_steps = jax.jit(lambda q, R: rotate_weight(quant.dequantize(q, jnp.float32), (R,)))
        assert "@oftjax_rotate(" in two_steps.lower(q, R).as_text()
        got, want = fused(q, R), two_steps(q, R)
    np.testing.assert_array_equal(bits(got), bits(want))
    expected = rotate_reference(quant.dequantize(q, jnp.float32), R, transpose=True)
    assert_scaled_close(got, expected, "native_rotate")


def test_fused_path_chains_further_adapters_and_keeps_the_default_where_it_cannot_run():
    q = _quantized((64, 96), "nf4", 64, True)
    rng = np.random.default_rng(2)
    R1, R2 = (jnp.asarray(rng.standard_normal((3, 32, 32)), jnp.float32) for _ in range(2))
    R8 = jnp.asarray(rng.standard_normal((12, 8, 8)), jnp.float32)
    w = quant.dequantize(q, jnp.float32)
    q8 = quant.quantize_int8(w)
    step = jax.value_and_grad(lambda x, R: rotated_dequant_matmul(x, (R,), q, jnp.float32).sum(), (0, 1))
    x = jnp.ones((8, 96), jnp.float32)
    assert "oftjax_" not in lowered(step, x, R1)  # disabled (the default): no kernel
    with cpu_kernels.enable():
        # the OFT layer's forward over a 4-bit weight runs it (and its backward dequantizes on its own)
        hlo = lowered(step, x, R1)
        assert "oftjax_dequant4_nested_rotate" in hlo and "oftjax_rotate_grad" in hlo
        got = dequantize_rotate_weight(q, (R1, R2), jnp.float32)  # R2 fused, then R1 by rotate_blocks
        np.testing.assert_array_equal(bits(got), bits(rotate_weight(w, (R1, R2))))
        # no rotation, an 8-block (pure-JAX rotation), bf16 compute and int8 weights: the two steps
        assert not _dequant.fused_supported(q, R8, jnp.float32)
        assert not _dequant.fused_supported(q, R1, jnp.bfloat16)
        assert not _dequant.fused_supported(q8, R1, jnp.float32)
        assert "rotate(" not in lowered(lambda q, R: dequantize_rotate_weight(q, (R,), jnp.float32), q, R8)
        np.testing.assert_array_equal(bits(dequantize_rotate_weight(q, (), jnp.float32)), bits(w))
        np.testing.assert_array_equal(
            bits(dequantize_rotate_weight(q, (R8,), jnp.float32)), bits(rotate_weight(w, (R8,)))
        )
        np.testing.assert_array_equal(
            np.asarray(dequantize_rotate_weight(q8, (R1,), jnp.float32)),
            np.asarray(rotate_weight(quant.dequantize(q8, jnp.float32), (R1,))),
        )


@pytest.mark.parametrize(
    "R_shape,message",
    [((12, 8, 8), "block size 8 needs AVX-512"), ((2, 32, 32), "r \\* b = d"), ((3, 32, 16), "r \\* b = d")],
    ids=["b8", "width", "not-square"],
)
def test_fused_kernel_rejects_inconsistent_operands(R_shape, message):
    q = _quantized((64, 96), "nf4", 64, False)
    Rt = jnp.ones(R_shape, jnp.float32)
    operands, meta = _dequant._operands(q), _dequant._meta(q)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_dequant._fused_cpu(*operands, Rt, vectorize=True, **meta))
