"""rotated_matmul (rotate the kernel, input-centric VJP) == the input-rotation chain: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from oftjax import oft
from oftjax.nn._forward import rotate_chain, rotate_kernel, rotated_matmul
from tests.tolerances import TOL

PATHS, FWD = TOL["rotate_paths"], TOL["fp32_forward"]


def _blocks(key, r, b):
    vec = 0.3 * jax.random.normal(key, (r, b * (b - 1) // 2))
    return oft.rotation_blocks(vec, block_size=b, num_blocks=r, use_cayley_neumann=False, num_terms=5)


def _scaled_close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s = max(float(np.abs(b).max()), 1e-30)
    np.testing.assert_allclose(a / s, b / s, rtol=PATHS.rtol, atol=PATHS.atol)


@settings(max_examples=8, deadline=None)
@given(
    tokens=st.sampled_from([1, 3, 8]),
    blocks=st.sampled_from([(2, 4), (4, 2), (1, 8)]),
    second=st.booleans(),
    d_out=st.sampled_from([1, 5]),
    seed=st.integers(0, 2**16),
)
def test_kernel_rotation_matches_input_rotation(tokens, blocks, second, d_out, seed):
    r, b = blocks
    d = r * b
    keys = jax.random.split(jax.random.key(seed), 5)
    rots = (_blocks(keys[0], r, b),) + ((_blocks(keys[1], d // 2, 2),) if second else ())
    x = jax.random.normal(keys[2], (tokens, d))
    K = jax.random.normal(keys[3], (d, d_out))
    g = jax.random.normal(keys[4], (tokens, d_out))

    def via_kernel(x, rots, K):
        return jnp.sum(rotated_matmul(x, rots, K) * g)

    def via_input(x, rots, K):
        return jnp.sum((rotate_chain(x, rots) @ K) * g)

    vk, gk = jax.jit(jax.value_and_grad(via_kernel, argnums=(0, 1, 2)))(x, rots, K)
    vi, gi = jax.jit(jax.value_and_grad(via_input, argnums=(0, 1, 2)))(x, rots, K)
    _scaled_close(vk, vi)
    for a, c in zip(jax.tree.leaves(gk), jax.tree.leaves(gi), strict=True):
        _scaled_close(a, c)


def test_rotate_kernel_is_block_diag_product():
    R1, R2 = _blocks(jax.random.key(0), 2, 4), _blocks(jax.random.key(1), 4, 2)
    K = jax.random.normal(jax.random.key(2), (8, 3))
    want = np.asarray(oft.block_diag(R1)) @ np.asarray(oft.block_diag(R2)) @ np.asarray(K)
    np.testing.assert_allclose(np.asarray(rotate_kernel(K, (R1, R2))), want, rtol=FWD.rtol, atol=FWD.atol)


def test_rotate_blocks_equals_the_einsum():
    R = _blocks(jax.random.key(0), 4, 8)
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    from oftjax.oft import rotate_blocks

    np.testing.assert_allclose(
        np.asarray(jax.jit(rotate_blocks)(x, R)),
        np.asarray(jnp.einsum("...rk,rkc->...rc", x.reshape(2, 3, 4, 8), R).reshape(x.shape)),
        rtol=FWD.rtol,
        atol=FWD.atol,
    )
    eye = jnp.broadcast_to(jnp.eye(8), (4, 8, 8))
    np.testing.assert_array_equal(np.asarray(rotate_blocks(x, eye)), np.asarray(x))  # identity is exact
