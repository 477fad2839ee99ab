"""COFT projection: PEFT's radius eps/sqrt(R), per-block decisions, straight-through gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oftjax.oft import coft_eps, coft_project, num_elements
from tests.tolerances import TOL

_project_jit = jax.jit(coft_project, static_argnums=1)


def _skew_norm(vec):
    # ||Q||_F of the full skew matrix is sqrt(2) * ||vec||.
    return np.sqrt(2.0 * np.sum(np.asarray(vec, np.float64) ** 2, axis=-1))


def test_coft_eps_golden():
    # torch: eps * 1 / torch.sqrt(torch.tensor(4)) -> fp32 tensor
    assert coft_eps(1e-2, 4) == np.float32(1e-2) / np.float32(2.0)
    assert coft_eps(6e-5, 1) == np.float32(6e-5)


def test_projection_per_block():
    b, R, eps = 4, 4, 1e-2
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((R, num_elements(b))).astype(np.float32)
    vec[1] *= 1e-4  # inside the ball
    vec[3] = 0.0  # zero block: inside, no NaN
    out = np.asarray(_project_jit(jnp.asarray(vec), eps))
    radius = float(coft_eps(eps, R))
    np.testing.assert_array_equal(out[1], vec[1])
    np.testing.assert_array_equal(out[3], vec[3])
    tol = TOL["oft_coft_norm"]
    for k in (0, 2):
        np.testing.assert_allclose(_skew_norm(out[k]), radius, rtol=tol.rtol, atol=tol.atol)
        cos = out[k] @ vec[k] / (np.linalg.norm(out[k]) * np.linalg.norm(vec[k]))
        np.testing.assert_allclose(cos, 1.0, rtol=1e-6)  # same direction
    np.testing.assert_array_equal(np.asarray(coft_project(jnp.asarray(vec), eps)), out)  # eager == jit


def test_projection_is_idempotent_at_boundary():
    vec = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32))
    once = _project_jit(vec, 1e-2)
    twice = np.asarray(_project_jit(once, 1e-2))
    radius = float(coft_eps(1e-2, 2))
    np.testing.assert_allclose(_skew_norm(twice), radius, rtol=TOL["oft_coft_norm"].rtol)


def test_gradient_is_straight_through():
    # PEFT projects in place under no_grad: d f(project(v)) / dv == f'(project(v)).
    vec = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32))
    weights = jnp.arange(18.0, dtype=jnp.float32).reshape(3, 6)

    def f(v):
        return jnp.sum(jnp.sin(v) * weights)

    g = jax.jit(jax.grad(lambda v: f(coft_project(v, 1e-2))))(vec)
    g_at_projected = jax.grad(f)(_project_jit(vec, 1e-2))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_at_projected))
    assert np.isfinite(
        np.asarray(jax.grad(lambda v: jnp.sum(coft_project(v, 1e-2)))(jnp.zeros((2, 6))))
    ).all()


def test_low_precision_dtype_kept():
    vec = jnp.ones((2, 6), jnp.bfloat16)
    assert _project_jit(vec, 1e-2).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "args,err",
    [
        ((jnp.zeros(6), 1e-2), ValueError),
        ((jnp.zeros((1, 6)), -1.0), ValueError),
        ((jnp.zeros((1, 6), jnp.int32), 1.0), TypeError),
    ],
    ids=["rank1", "negative-eps", "int"],
)
def test_bad_inputs(args, err):
    with pytest.raises(err):
        coft_project(*args)


@settings(max_examples=15, deadline=None)
@given(
    rows=st.sampled_from([1, 3]),
    scale=st.sampled_from([1e-6, 1e-3, 1.0]),
    eps=st.sampled_from([6e-5, 1e-2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_projection_property(rows, scale, eps, seed):
    vec = (scale * np.random.default_rng(seed).standard_normal((rows, 6))).astype(np.float32)
    out = np.asarray(_project_jit(jnp.asarray(vec), eps))
    radius = float(coft_eps(eps, rows))
    norms_in, norms_out = _skew_norm(vec), _skew_norm(out)
    assert np.all(norms_out <= radius * (1 + TOL["oft_coft_norm"].rtol))
    inside = norms_in <= radius
    np.testing.assert_array_equal(out[inside], vec[inside])
