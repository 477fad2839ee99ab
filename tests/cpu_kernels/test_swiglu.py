"""The CPU SwiGLU kernels (csrc/swiglu.cc) against float64, torch's formulas and the pure-JAX default.

With ``oftjax.cpu_kernels`` enabled, ``swiglu`` runs them on CPU for float32 operands of one shape on an
AVX-512 machine; other dtypes and shapes, and GPUs, keep the default ``silu(gate) * up``. Their exp is a
polynomial (~1 ulp) and XLA has its own logistic, so the comparisons are to float32 rounding (TOL["swiglu"]);
where the math gives inf or nan both give the same. The backward kernel computes torch's ``silu_backward``
formula, which the tests write out in JAX (``silu_backward``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import cpu_kernels
from oftjax.cpu_kernels import _swiglu
from oftjax.models._layers import swiglu
from tests._cpu import has_avx512f
from tests.cpu_kernels._helpers import BUILT_HERE, lowered, require_loaded, skip_without_avx512
from tests.tolerances import TOL

pytestmark = skip_without_avx512(_swiglu.supports(np.float32), "tests/models/test_llama.py")

EDGES = [0.0, -0.0, 1e-30, -1e-30, 1e-40, 88.0, 89.0, 90.0, -87.0, -88.0, -89.0, -104.0, 1e4, -1e4, 3e38,
         -3e38, np.inf, -np.inf, np.nan]  # fmt: skip


@pytest.fixture(autouse=True)
def _loaded():
    require_loaded(_swiglu.LIBRARY)


def operands(shape, seed=0):
    rng = np.random.default_rng(seed)
    gate, up, g = (rng.standard_normal(shape).astype(np.float32) * 4 for _ in range(3))
    flat = gate.reshape(-1)
    flat[: min(len(EDGES), flat.size)] = EDGES[: flat.size]
    return gate, up, g


def silu_backward(gate, up, g):
    """torch's ``silu_backward`` times ``up`` (d gate) and ``g silu(gate)`` (d up), in float32 JAX."""
    s = jax.nn.sigmoid(gate)
    return (g * up) * (s * (1 + gate * (1 - s))), g * (gate * s)


def assert_same(got, expected):
    """Finite entries within TOL["swiglu"] (atol x max(1, max |expected|)); inf and nan where expected."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(got[np.isinf(expected)], expected[np.isinf(expected)])
    tol = TOL["swiglu"]
    scale = max(1.0, float(np.max(np.abs(expected[finite]))) if finite.any() else 0.0)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=tol.rtol, atol=tol.atol * scale)


def _lowerings(gate, up):
    fwd = lowered(swiglu, gate, up)
    bwd = lowered(jax.grad(lambda a, b: swiglu(a, b).sum(), (0, 1)), gate, up)
    return fwd, bwd


def test_the_kernels_are_built_and_loaded():
    info = cpu_kernels.info()["swiglu"]
    if BUILT_HERE:
        assert info["available"], info["reason"]
        assert info["runs"] == has_avx512f(), info
    x = jnp.ones((8, 48), jnp.float32)
    with cpu_kernels.enable():
        fwd, bwd = _lowerings(x, x)
        assert "@oftjax_swiglu(" in fwd and "@oftjax_swiglu_grad(" in bwd
        # bf16, and operands that only broadcast to one shape, keep the default
        assert "oftjax_swiglu" not in lowered(swiglu, x.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
        assert "oftjax_swiglu" not in lowered(swiglu, x, x[:1])


def test_disabled_by_default_no_kernel_is_called():
    assert not cpu_kernels.enabled()
    x = jnp.ones((8, 48), jnp.float32)
    for text in _lowerings(x, x):
        assert "oftjax_" not in text
    assert float(swiglu(jnp.float32(0.0), jnp.float32(3.0))) == 0.0


@pytest.mark.parametrize("shape", [(), (1,), (17,), (3, 5, 7), (4, 16384 + 5)], ids=str)
def test_forward_and_backward_match_the_default_and_torchs_formula(shape):
    # ragged vectors (masked loads and stores), a chunk boundary (16384 elements), the edge values
    gate, up, g = operands(shape, seed=len(shape))
    with cpu_kernels.enable():
        h, vjp = jax.vjp(jax.jit(swiglu), gate, up)
        grads = vjp(jnp.asarray(g))
    assert_same(h, swiglu(gate, up))  # the default, kernels disabled again
    for got, expected in zip(grads, silu_backward(gate, up, g), strict=True):
        assert_same(got, expected)


def test_backward_matches_the_defaults_autodiff():
    # away from |gate| ~ 1e38 (where autodiff of the default overflows gate * cotangent before multiplying by
    # sigmoid's zero derivative, and torch's formula does not) the kernel's gradient is the default's
    gate, up, g = operands((64, 96), seed=2)
    finite = [e for e in EDGES if np.isfinite(e) and abs(e) < 1e30]
    gate.reshape(-1)[: len(EDGES)] = np.resize(np.float32(finite), len(EDGES))
    _, default_vjp = jax.vjp(swiglu, gate, up)
    with cpu_kernels.enable():
        _, vjp = jax.vjp(jax.jit(swiglu), gate, up)
        grads = vjp(jnp.asarray(g))
    for got, expected in zip(grads, default_vjp(jnp.asarray(g)), strict=True):
        assert_same(got, expected)


def test_default_gradient_is_finite_where_torchs_is():
    # torch's silu_backward, and the kernel, multiply gate by (1 - sigmoid(gate)) first: finite for finite
    # operands; the default's gradient should be too
    gate = jnp.asarray([3e38, -3e38, 1e38, -1e38, 3.0], jnp.float32)
    up, g = jnp.full(5, 1.0, jnp.float32), jnp.full(5, 0.75, jnp.float32)  # d up = g silu(gate) stays finite
    expected = silu_backward(gate, up, g)
    assert all(bool(jnp.isfinite(a).all()) for a in expected)
    _, vjp = jax.vjp(swiglu, gate, up)
    for got, want in zip(vjp(g), expected, strict=True):
        assert_same(got, want)


def test_forward_and_backward_match_float64():
    gate, up, g = (
        np.random.default_rng(1).standard_normal((64, 96)).astype(np.float32) * 4 for _ in range(3)
    )
    with cpu_kernels.enable():
        h, vjp = jax.vjp(jax.jit(swiglu), gate, up)
        dgate, dup = vjp(jnp.asarray(g))
    x, u, c = (a.astype(np.float64) for a in (gate, up, g))
    s = 1 / (1 + np.exp(-x))
    assert_same(h, x * s * u)
    assert_same(dgate, c * u * s * (1 + x * (1 - s)))
    assert_same(dup, c * x * s)


@pytest.mark.parametrize("which", ["up", "h", "dh", "d gate", "d up"])
def test_kernels_reject_operands_of_other_shapes(which):
    # swiglu routes only operands of one shape here; the kernels check again, not to read out of bounds. The
    # output shapes are the caller's to give, so the FFI targets are called by name.
    gate, other = jnp.ones((4, 8), jnp.float32), jnp.ones((4, 9), jnp.float32)
    like = jax.ShapeDtypeStruct
    if which in ("up", "h"):
        out = like(gate.shape if which == "up" else other.shape, jnp.float32)
        args = (gate, other if which == "up" else gate)
        call = jax.ffi.ffi_call(_swiglu._FORWARD, out)
    else:
        shape_of = {w: other.shape if which == w else gate.shape for w in ("d gate", "d up")}
        outs = (like(shape_of["d gate"], jnp.float32), like(shape_of["d up"], jnp.float32))
        args = (gate, gate, other if which == "dh" else gate)
        call = jax.ffi.ffi_call(_swiglu._BACKWARD, outs)
    with pytest.raises(Exception, match=f"{which} must have gate's shape \\(32 elements\\)"):
        jax.block_until_ready(call(*args))
