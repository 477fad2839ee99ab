"""The native CPU SwiGLU kernels (csrc/swiglu.cc, jax.ffi) against float64 and the XLA formulation.

``swiglu`` runs them on CPU for float32 operands of one shape on an AVX-512 machine; other dtypes and shapes,
and GPUs, take XLA's formulation. Their exp is a polynomial (~1 ulp) and XLA has its own logistic, so the
comparisons are to float32 rounding (TOL["swiglu"]); where the math gives inf or nan both paths give the same.
"""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.models import _native_swiglu
from oftjax.models._llama import _swiglu_grad_xla, _swiglu_xla, swiglu
from tests._cpu import has_avx512f, run_without_native
from tests.tolerances import TOL

pytestmark = pytest.mark.skipif(
    not _native_swiglu.supports(np.float32) and not (sys.platform == "linux" and has_avx512f()),
    reason="no AVX-512 on this machine: SwiGLU takes XLA's formulation (tests/models/test_llama.py)",
)

EDGES = [0.0, -0.0, 1e-30, -1e-30, 1e-40, 88.0, 89.0, 90.0, -87.0, -88.0, -89.0, -104.0, 1e4, -1e4, 3e38,
         -3e38, np.inf, -np.inf, np.nan]  # fmt: skip


def operands(shape, seed=0):
    rng = np.random.default_rng(seed)
    gate, up, g = (rng.standard_normal(shape).astype(np.float32) * 4 for _ in range(3))
    flat = gate.reshape(-1)
    flat[: min(len(EDGES), flat.size)] = EDGES[: flat.size]
    return gate, up, g


def assert_same(got, expected):
    """Finite entries within TOL["swiglu"] (atol x max(1, max |expected|)); inf and nan where XLA has them."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(got[np.isinf(expected)], expected[np.isinf(expected)])
    tol = TOL["swiglu"]
    scale = max(1.0, float(np.max(np.abs(expected[finite]))) if finite.any() else 0.0)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=tol.rtol, atol=tol.atol * scale)


def test_the_kernels_are_built_and_loaded():
    info = _native_swiglu.native_info()
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert info["available"], info["reason"]
        assert info["runs"] == has_avx512f(), info
    x = jnp.ones((8, 48), jnp.float32)
    fwd = jax.jit(swiglu).lower(x, x).as_text()
    bwd = jax.jit(jax.grad(lambda a, b: swiglu(a, b).sum(), (0, 1))).lower(x, x).as_text()
    assert "@oftjax_swiglu(" in fwd and "@oftjax_swiglu_grad(" in bwd
    # bf16, and operands that only broadcast to one shape, take XLA's formulation
    assert (
        "oftjax_swiglu" not in jax.jit(swiglu).lower(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16)).as_text()
    )
    assert "oftjax_swiglu" not in jax.jit(swiglu).lower(x, x[:1]).as_text()


@pytest.mark.parametrize("shape", [(), (1,), (17,), (3, 5, 7), (4, 16384 + 5)], ids=str)
def test_forward_and_backward_match_the_xla_formulation(shape):
    # ragged vectors (masked loads and stores), a chunk boundary (16384 elements), the edge values
    gate, up, g = operands(shape, seed=len(shape))
    h, vjp = jax.vjp(jax.jit(swiglu), gate, up)
    assert_same(h, _swiglu_xla(gate, up))
    for got, expected in zip(vjp(jnp.asarray(g)), _swiglu_grad_xla(gate, up, g), strict=True):
        assert_same(got, expected)


def test_forward_and_backward_match_float64():
    gate, up, g = (
        np.random.default_rng(1).standard_normal((64, 96)).astype(np.float32) * 4 for _ in range(3)
    )
    h, vjp = jax.vjp(jax.jit(swiglu), gate, up)
    dgate, dup = vjp(jnp.asarray(g))
    x, u, c = (a.astype(np.float64) for a in (gate, up, g))
    s = 1 / (1 + np.exp(-x))
    assert_same(h, x * s * u)
    assert_same(dgate, c * u * s * (1 + x * (1 - s)))
    assert_same(dup, c * x * s)


@pytest.mark.parametrize("which", ["up", "h", "dh", "d gate", "d up"])
def test_kernels_reject_operands_of_other_shapes(which):
    from oftjax.models._native_swiglu import _BACKWARD, _FORWARD

    _native_swiglu._KERNELS.require()
    gate, other = jnp.ones((4, 8), jnp.float32), jnp.ones((4, 9), jnp.float32)
    like = jax.ShapeDtypeStruct
    if which in ("up", "h"):
        out = like(gate.shape if which == "up" else other.shape, jnp.float32)
        args = (gate, other if which == "up" else gate)
        call = jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")
    else:
        shape_of = {w: other.shape if which == w else gate.shape for w in ("d gate", "d up")}
        outs = (like(shape_of["d gate"], jnp.float32), like(shape_of["d up"], jnp.float32))
        args = (gate, gate, other if which == "dh" else gate)
        call = jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="sequential")
    with pytest.raises(Exception, match=f"{which} must have gate's shape \\(32 elements\\)"):
        jax.block_until_ready(call(*args))


def test_disabled_by_environment_falls_back_to_xla():
    code = (
        "import jax, jax.numpy as jnp\n"
        "from oftjax.models import _native_swiglu\n"
        "from oftjax.models._llama import swiglu\n"
        "info = _native_swiglu.native_info()\n"
        "assert not info['available'] and 'OFTJAX_NATIVE=0' in info['reason'], info\n"
        "x = jnp.ones((8, 48))\n"
        "assert 'oftjax_swiglu' not in jax.jit(swiglu).lower(x, x).as_text()\n"
        "print(float(swiglu(jnp.float32(0.0), jnp.float32(3.0))))\n"
    )
    assert float(run_without_native(code)) == 0.0
