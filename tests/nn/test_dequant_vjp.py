"""The quantized matmuls' custom VJPs (re-dequantize in the backward, no float residual) == plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import oft, quant
from oftjax.nn._forward import dequant_matmul, rotate_chain, rotated_dequant_matmul
from tests.tolerances import TOL

FWD, GRAD = TOL["fp32_forward"], TOL["fp32_grad"]


def _weight(kind: str) -> quant.Int8Weight | quant.FourBitWeight:
    w = 0.1 * jax.random.normal(jax.random.key(0), (24, 64))
    if kind == "int8":
        return quant.quantize_int8(w)
    return quant.quantize_4bit(w, quant_type=kind, blocksize=64, compress_statistics=kind == "nf4")


def _rotations():
    vec = 0.3 * jax.random.normal(jax.random.key(1), (4, 16 * 15 // 2))
    return (oft.rotation_blocks(vec, block_size=16, num_blocks=4, use_cayley_neumann=False, num_terms=5),)


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"], ids=["int8", "nf4-dq", "fp4"])
def test_dequant_matmul_value_and_input_grad(kind):
    q = _weight(kind)
    x = jax.random.normal(jax.random.key(2), (3, 5, 64))
    g = jax.random.normal(jax.random.key(3), (3, 5, 24))

    def ours(x):
        return jnp.sum(dequant_matmul(x, q, jnp.float32) * g)

    def plain(x):
        return jnp.sum((x @ quant.dequantize(q, jnp.float32).T) * g)

    v1, g1 = jax.jit(jax.value_and_grad(ours))(x)
    v2, g2 = jax.jit(jax.value_and_grad(plain))(x)
    _close(v1, v2, FWD)
    _close(g1, g2, GRAD)


@pytest.mark.parametrize("kind", ["int8", "nf4"], ids=["int8", "nf4-dq"])
def test_rotated_dequant_matmul_matches_input_chain(kind):
    q = _weight(kind)
    rots = _rotations()
    x = jax.random.normal(jax.random.key(4), (7, 64))
    g = jax.random.normal(jax.random.key(5), (7, 24))
    w = quant.dequantize(q, jnp.float32)

    def ours(x, rots):
        return jnp.sum(rotated_dequant_matmul(x, rots, q, jnp.float32) * g)

    def plain(x, rots):
        return jnp.sum((rotate_chain(x, rots) @ w.T) * g)

    v1, g1 = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(x, rots)
    v2, g2 = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(x, rots)
    _close(v1, v2, FWD)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        _close(a, b, GRAD)


def test_no_float_weight_is_a_residual():
    """The linearization keeps the packed bytes, not a dense [out, in] float copy of the weight."""
    q = _weight("nf4")
    x = jax.random.normal(jax.random.key(6), (4, 64))
    _, f_vjp = jax.vjp(lambda x: dequant_matmul(x, q, jnp.float32), x)
    shapes = {(tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(f_vjp)}
    assert ((24, 64), jnp.dtype(jnp.float32)) not in shapes
    assert any(d == jnp.uint8 for _, d in shapes)
