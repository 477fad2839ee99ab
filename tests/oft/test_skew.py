"""Skew <-> vector layout (PEFT's triu_indices order), exact goldens and round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oftjax.oft import block_size_from_param_shape, num_elements, skew_from_vec, triu_indices, vec_from_skew


def test_triu_order_golden_b4():
    # torch.triu_indices(4, 4, 1): row-major strict upper triangle.
    rows, cols = triu_indices(4)
    assert rows.tolist() == [0, 0, 0, 1, 1, 2]
    assert cols.tolist() == [1, 2, 3, 2, 3, 3]


def test_skew_golden_b4():
    vec = jnp.arange(1.0, 7.0, dtype=jnp.float32)
    expected = np.array(
        [[0, 1, 2, 3], [-1, 0, 4, 5], [-2, -4, 0, 6], [-3, -5, -6, 0]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(np.asarray(skew_from_vec(vec, 4)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(skew_from_vec, static_argnums=1)(vec, 4)), expected)


@pytest.mark.parametrize(
    "n,b", [(1, 2), (3, 3), (6, 4), (120, 16), (496, 32), (2016, 64)], ids=lambda v: str(v)
)
def test_block_size_from_param_shape(n, b):
    assert block_size_from_param_shape((5, n)) == b
    assert num_elements(b) == n


@pytest.mark.parametrize(
    "shape", [(4, 0), (4, 2), (4, 4), (1, 495), ()], ids=["0", "2", "4", "495", "scalar"]
)
def test_block_size_from_param_shape_rejects(shape):
    with pytest.raises(ValueError, match="b\\(b-1\\)/2"):
        block_size_from_param_shape(shape)


def test_skew_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"needs vec\[\.\.\., 6\]"):
        skew_from_vec(jnp.zeros((2, 5)), 4)


def test_vec_from_skew_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        vec_from_skew(jnp.zeros((2, 3, 4)))


@settings(max_examples=15, deadline=None)
@given(
    b=st.sampled_from([2, 3, 4, 8]),
    lead=st.sampled_from([(), (3,), (2, 3)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_skew_round_trip_and_antisymmetry(b, lead, seed):
    vec = jnp.asarray(np.random.default_rng(seed).standard_normal((*lead, num_elements(b)), dtype=np.float32))
    Q = jax.jit(skew_from_vec, static_argnums=1)(vec, b)
    assert Q.shape == (*lead, b, b)
    np.testing.assert_array_equal(np.asarray(Q), -np.swapaxes(np.asarray(Q), -1, -2))
    np.testing.assert_array_equal(np.diagonal(np.asarray(Q), axis1=-2, axis2=-1), 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(vec_from_skew)(Q)), np.asarray(vec))


def test_skew_keeps_dtype():
    vec = jnp.ones((2, 3), dtype=jnp.bfloat16)
    assert skew_from_vec(vec, 3).dtype == jnp.bfloat16
    assert vec_from_skew(skew_from_vec(vec, 3)).dtype == jnp.bfloat16
