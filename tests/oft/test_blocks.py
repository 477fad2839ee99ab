"""Block rotations: building, applying to inputs, dense form, merge/unmerge, module dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oftjax.oft import (
    block_diag,
    coft_project,
    dropout_blocks,
    inverse_blocks,
    merge_rotation,
    merge_rotation_kernel,
    num_elements,
    rotate_input,
    rotation_blocks,
    unmerge_rotation,
    unmerge_rotation_kernel,
)
from tests.tolerances import TOL

_rotation_jit = jax.jit(
    rotation_blocks,
    static_argnames=("block_size", "num_blocks", "use_cayley_neumann", "num_terms", "legacy", "block_share"),
)
_rotate_jit = jax.jit(rotate_input, static_argnames=("out_dtype", "precision"))
_block_diag_jit = jax.jit(block_diag)
_merge_jit = jax.jit(merge_rotation)
_unmerge_jit = jax.jit(unmerge_rotation)
_merge_k_jit = jax.jit(merge_rotation_kernel)
_unmerge_k_jit = jax.jit(unmerge_rotation_kernel)
_dropout_jit = jax.jit(dropout_blocks, static_argnames=("p", "block_share"))


def _rng(seed):
    return np.random.default_rng(seed)


def _blocks(seed, r, b, neumann=False, scale=0.2):
    vec = scale * _rng(seed).standard_normal((r, num_elements(b)), dtype=np.float32)
    return _rotation_jit(
        jnp.asarray(vec), block_size=b, num_blocks=r, use_cayley_neumann=neumann, num_terms=5
    )


@pytest.mark.parametrize("neumann", [False, True], ids=["exact", "neumann"])
@pytest.mark.parametrize("share", [False, True], ids=["per-block", "block_share"])
def test_rotation_blocks_identity_at_init(neumann, share):
    vec = jnp.zeros((1 if share else 4, 6), jnp.float32)
    R = _rotation_jit(
        vec, block_size=4, num_blocks=4, use_cayley_neumann=neumann, num_terms=5, block_share=share
    )
    np.testing.assert_array_equal(np.asarray(R), np.broadcast_to(np.eye(4, dtype=np.float32), (4, 4, 4)))


def test_block_share_repeats_one_block():
    vec = jnp.asarray(0.3 * _rng(0).standard_normal((1, 6), dtype=np.float32))
    R = _rotation_jit(vec, block_size=4, num_blocks=3, use_cayley_neumann=True, num_terms=5, block_share=True)
    single = _rotation_jit(vec, block_size=4, num_blocks=1, use_cayley_neumann=True, num_terms=5)
    assert R.shape == (3, 4, 4)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(R[k]), np.asarray(single[0]))


def test_rotation_blocks_dtype():
    vec = jnp.full((2, 6), 0.1, jnp.bfloat16)
    for neumann in (False, True):
        R = _rotation_jit(vec, block_size=4, num_blocks=2, use_cayley_neumann=neumann, num_terms=5)
        assert R.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(vec=jnp.zeros((3, 6)), num_blocks=2), r"expected parameters \[2, 6\]"),
        (dict(vec=jnp.zeros((2, 6)), num_blocks=2, block_share=True), r"expected parameters \[1, 6\]"),
        (dict(vec=jnp.zeros((2, 10)), num_blocks=2), "holds blocks of size 5"),
    ],
    ids=["rows", "block_share-rows", "block-size"],
)
def test_rotation_blocks_rejects_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rotation_blocks(block_size=4, use_cayley_neumann=True, num_terms=5, **kwargs)


def test_rotation_blocks_rejects_int_params():
    with pytest.raises(TypeError, match="floating"):
        rotation_blocks(
            jnp.zeros((2, 6), jnp.int32), block_size=4, num_blocks=2, use_cayley_neumann=True, num_terms=5
        )


def test_block_diag_golden():
    R = jnp.arange(8.0, dtype=jnp.float32).reshape(2, 2, 2)
    expected = np.array([[0, 1, 0, 0], [2, 3, 0, 0], [0, 0, 4, 5], [0, 0, 6, 7]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(_block_diag_jit(R)), expected)


@settings(max_examples=8, deadline=None)
@given(
    rb=st.sampled_from([(1, 4), (3, 2), (2, 8)]),
    lead=st.sampled_from([(5,), (2, 3)]),
    neumann=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotate_input_equals_dense(rb, lead, neumann, seed):
    r, b = rb
    R = _blocks(seed, r, b, neumann)
    x = _rng(seed + 1).standard_normal((*lead, r * b), dtype=np.float32)
    dense = x.astype(np.float64) @ np.asarray(_block_diag_jit(R), np.float64)
    tol = TOL["oft_blockwise_vs_dense"]
    np.testing.assert_allclose(
        np.asarray(_rotate_jit(jnp.asarray(x), R)), dense, rtol=tol.rtol, atol=tol.atol
    )


def test_rotate_input_dtypes():
    R = _blocks(0, 2, 4)
    x = jnp.ones((3, 8), jnp.bfloat16)
    assert _rotate_jit(x, R).dtype == jnp.bfloat16  # cast back to the input dtype, as PEFT
    assert _rotate_jit(x, R, out_dtype=jnp.float32).dtype == jnp.float32
    ref = np.asarray(_rotate_jit(x.astype(jnp.float32), R))
    np.testing.assert_array_equal(np.asarray(_rotate_jit(x, R, out_dtype=jnp.float32)), ref)


def test_rotate_input_rejects_width():
    with pytest.raises(ValueError, match=r"need x\[\.\.\., 8\]"):
        rotate_input(jnp.ones((3, 6)), jnp.ones((2, 4, 4)))


@settings(max_examples=6, deadline=None)
@given(
    rb=st.sampled_from([(3, 2), (2, 8)]),
    out=st.just(3),
    neumann=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_matches_dense_and_forward(rb, out, neumann, seed):
    r, b = rb
    R = _blocks(seed, r, b, neumann)
    W = _rng(seed + 1).standard_normal((out, r * b), dtype=np.float32)
    x = _rng(seed + 2).standard_normal((4, r * b), dtype=np.float32)
    BD = np.asarray(_block_diag_jit(R), np.float64)
    merged = np.asarray(_merge_jit(jnp.asarray(W), R))
    tol = TOL["oft_blockwise_vs_dense"]
    np.testing.assert_allclose(merged, W.astype(np.float64) @ BD.T, rtol=tol.rtol, atol=tol.atol)
    # x W'^T == (x BD) W^T: merging gives the OFT forward.
    rotated = np.asarray(_rotate_jit(jnp.asarray(x), R), np.float64)
    np.testing.assert_allclose(x @ merged.T, rotated @ W.T, rtol=1e-5, atol=1e-5)
    # kernel layout is the transpose
    np.testing.assert_array_equal(np.asarray(_merge_k_jit(jnp.asarray(W.T), R)), merged.T)
    # unmerge uses a true inverse, so it also undoes the non-orthogonal Neumann blocks
    ut = TOL["oft_unmerge_roundtrip"]
    np.testing.assert_allclose(
        np.asarray(_unmerge_jit(jnp.asarray(merged), R)), W, rtol=ut.rtol, atol=ut.atol
    )
    np.testing.assert_allclose(
        np.asarray(_unmerge_k_jit(jnp.asarray(merged.T), R)), W.T, rtol=ut.rtol, atol=ut.atol
    )


def test_unmerge_needs_true_inverse_for_neumann():
    R = _blocks(3, 2, 4, neumann=True, scale=0.5)
    W = jnp.asarray(_rng(4).standard_normal((3, 8), dtype=np.float32))
    merged = _merge_jit(W, R)
    by_transpose = np.asarray(_merge_jit(merged, jnp.swapaxes(R, -1, -2)))  # PEFT <= 0.17 unmerge
    assert np.abs(by_transpose - np.asarray(W)).max() > 1e-3
    inv = np.asarray(jax.jit(inverse_blocks)(R), np.float64)
    np.testing.assert_allclose(
        inv @ np.asarray(R, np.float64), np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-5
    )


def test_merge_keeps_weight_dtype():
    R = _blocks(0, 2, 4)
    W = jnp.ones((3, 8), jnp.bfloat16)
    assert _merge_jit(W, R).dtype == jnp.bfloat16
    assert _unmerge_jit(W, R).dtype == jnp.bfloat16


def test_merge_rejects_shapes():
    with pytest.raises(ValueError, match="in_features=8"):
        merge_rotation(jnp.ones((3, 6)), jnp.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="in_features=8"):
        merge_rotation_kernel(jnp.ones((6, 3)), jnp.ones((2, 4, 4)))
    with pytest.raises(ValueError, match=r"\[r, b, b\]"):
        merge_rotation(jnp.ones((3, 8)), jnp.ones((8, 8)))


@pytest.mark.parametrize("r,p", [(8, 0.5), (8, 0.3), (5, 0.99), (4, 1.0)], ids=lambda v: str(v))
def test_dropout_blocks_count_and_rest_unchanged(r, p):
    R = _blocks(1, r, 4, scale=0.5)
    out = np.asarray(_dropout_jit(R, p=p, key=jax.random.key(7)))
    is_eye = np.all(out == np.eye(4, dtype=np.float32), axis=(1, 2))
    assert is_eye.sum() == int(p * r)
    np.testing.assert_array_equal(out[~is_eye], np.asarray(R)[~is_eye])
    again = np.asarray(_dropout_jit(R, p=p, key=jax.random.key(7)))
    np.testing.assert_array_equal(out, again)  # deterministic per key


def test_dropout_blocks_picks_differ_by_key():
    R = _blocks(1, 16, 2, scale=0.5)
    picks = {
        tuple(np.all(np.asarray(_dropout_jit(R, p=0.5, key=jax.random.key(k))) == np.eye(2), axis=(1, 2)))
        for k in range(6)
    }
    assert len(picks) > 1


@pytest.mark.parametrize(
    "r,p,share",
    [(4, 0.0, False), (4, 0.2, False), (1, 0.9, False), (4, 0.5, True)],
    ids=["p0", "p-small", "r1", "share"],
)
def test_dropout_blocks_noop_cases(r, p, share):
    R = _blocks(2, r, 4, scale=0.5)
    np.testing.assert_array_equal(
        np.asarray(_dropout_jit(R, p=p, key=jax.random.key(0), block_share=share)), np.asarray(R)
    )


def test_dropout_blocks_rejects_p():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dropout_blocks(jnp.ones((2, 2, 2)), 1.5, jax.random.key(0))


def test_second_call_compiles_nothing():
    def step(v, x):
        R = rotation_blocks(
            coft_project(v, 1e-2), block_size=4, num_blocks=2, use_cayley_neumann=True, num_terms=5
        )
        return jnp.sum(rotate_input(x, R) ** 2)

    f = jax.jit(jax.value_and_grad(step))
    v, x = jnp.asarray(0.1 * _rng(0).standard_normal((2, 6), dtype=np.float32)), jnp.ones((3, 8), jnp.float32)
    f(v, x)
    f(v + 1.0, x * 2.0)
    assert f._cache_size() == 1
