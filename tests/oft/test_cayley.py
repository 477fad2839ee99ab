"""Exact Cayley and PEFT's Cayley-Neumann series (>= 0.18 and the 0.16-0.17 legacy series)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oftjax.oft import cayley, cayley_neumann, num_elements, skew_from_vec
from tests.tolerances import TOL

_neumann_jit = jax.jit(cayley_neumann, static_argnums=(1, 2))
_cayley_jit = jax.jit(cayley)


_skew_jit = jax.jit(skew_from_vec, static_argnums=1)


def _random_skew(seed, r, b, scale, dtype=jnp.float32):
    vec = scale * np.random.default_rng(seed).standard_normal((r, num_elements(b)), dtype=np.float32)
    return _skew_jit(jnp.asarray(vec, dtype=dtype), b)


def _series_f64(Q, t, legacy):
    """Independent float64 evaluation of PEFT's documented series (docs/peft-oft.md, "The OFT math")."""
    Q = np.asarray(Q, dtype=np.float64)
    eye = np.broadcast_to(np.eye(Q.shape[-1]), Q.shape)
    power = lambda k: functools.reduce(np.matmul, [Q] * k) if k else eye  # noqa: E731
    if legacy:
        return eye + 2 * sum((power(k) for k in range(1, t)), np.zeros_like(Q))
    if t == 1:
        return eye
    if t == 2:
        return eye + 2 * Q
    if t in (3, 4):
        return eye + 2 * Q + 2 * power(2) + power(3)
    return eye + 2 * sum((power(k) for k in range(1, t - 1)), np.zeros_like(Q)) + power(t - 1)


@settings(max_examples=8, deadline=None)
@given(
    b=st.sampled_from([2, 4, 8]),
    r=st.sampled_from([1, 3]),
    scale=st.sampled_from([0.01, 0.3, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_cayley_orthogonal_and_solves(b, r, scale, seed):
    Q = _random_skew(seed, r, b, scale)
    R = np.asarray(_cayley_jit(Q), dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    tol = TOL["oft_orthogonality_fp32"]
    eye = np.broadcast_to(np.eye(b), R.shape)
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), eye, rtol=tol.rtol, atol=tol.atol)
    # PEFT's definition: linalg.solve(I + Q, I - Q, left=False), i.e. R (I + Q) = I - Q.
    np.testing.assert_allclose(R @ (eye + Q), eye - Q, rtol=tol.rtol, atol=tol.atol * (1 + scale))


@pytest.mark.parametrize("fn", ["exact", "neumann"], ids=["exact", "neumann"])
def test_zero_is_identity_exactly(fn):
    Q = jnp.zeros((3, 4, 4), jnp.float32)
    R = _cayley_jit(Q) if fn == "exact" else _neumann_jit(Q, 5, False)
    np.testing.assert_array_equal(np.asarray(R), np.broadcast_to(np.eye(4, dtype=np.float32), (3, 4, 4)))


@pytest.mark.parametrize("legacy", [False, True], ids=["peft018", "peft016_017"])
@pytest.mark.parametrize("t", range(1, 9), ids=lambda t: f"t{t}")
def test_neumann_formulas(t, legacy):
    Q = _random_skew(t, 3, 6, 0.1)
    R = _neumann_jit(Q, t, legacy)
    tol = TOL["oft_neumann_vs_f64"]
    np.testing.assert_allclose(np.asarray(R), _series_f64(Q, t, legacy), rtol=tol.rtol, atol=tol.atol)
    if t in (1, 5):  # eager == jitted
        np.testing.assert_array_equal(np.asarray(R), np.asarray(cayley_neumann(Q, t, legacy=legacy)))


def test_neumann_t3_equals_t4_and_legacy_differs():
    Q = _random_skew(0, 2, 4, 0.2)
    np.testing.assert_array_equal(
        np.asarray(_neumann_jit(Q, 3, False)), np.asarray(_neumann_jit(Q, 4, False))
    )
    # t=1, 2 agree between the series; from t=3 on they differ.
    for t in (1, 2):
        np.testing.assert_array_equal(
            np.asarray(_neumann_jit(Q, t, False)), np.asarray(_neumann_jit(Q, t, True))
        )
    assert np.abs(np.asarray(_neumann_jit(Q, 5, False)) - np.asarray(_neumann_jit(Q, 5, True))).max() > 1e-3


@pytest.mark.parametrize("legacy", [False, True], ids=["peft018", "peft016_017"])
def test_neumann_limit_is_exact_transposed(legacy):
    # The series approximates (I+Q)(I-Q)^-1 = cayley(Q)^T, not cayley(Q).
    Q = _random_skew(1, 4, 8, 1.0)
    Qn = np.asarray(Q)
    Q = jnp.asarray(Qn * (0.5 / np.sqrt(np.sum(Qn * Qn, axis=(-2, -1), keepdims=True))))  # ||Q||_F = 0.5
    exact = np.asarray(_cayley_jit(Q))
    series = np.asarray(_neumann_jit(Q, 40, legacy))
    tol = TOL["oft_neumann_limit"]
    np.testing.assert_allclose(series, np.swapaxes(exact, -1, -2), rtol=tol.rtol, atol=tol.atol)
    assert np.abs(series - exact).max() > 0.1  # flipping the flag rotates the other way


def test_exact_cayley_low_precision_solves_in_fp32():
    Q = _random_skew(2, 2, 4, 0.3, dtype=jnp.bfloat16)
    R = _cayley_jit(Q)
    assert R.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(R.astype(jnp.float32)),
        np.asarray(cayley(Q.astype(jnp.float32)).astype(jnp.bfloat16), np.float32),
    )


def test_neumann_keeps_low_precision():
    Q = _random_skew(3, 2, 4, 0.3, dtype=jnp.bfloat16)
    assert _neumann_jit(Q, 5, False).dtype == jnp.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_terms must be >= 1"):
        cayley_neumann(jnp.zeros((2, 2)), 0)
    with pytest.raises(ValueError, match="square"):
        cayley(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="square"):
        cayley_neumann(jnp.zeros((3,)), 5)


def test_batch_dims():
    Q = _skew_jit(jnp.full((2, 3, 6), 0.1, jnp.float32), 4)
    assert _cayley_jit(Q).shape == (2, 3, 4, 4)
    assert _neumann_jit(Q, 5, False).shape == (2, 3, 4, 4)
