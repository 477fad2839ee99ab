"""The CPU 4-bit matmul kernel (csrc/matmul4.cc) against the pure-JAX default ``x @ dequantize(q).T``.

The kernel multiplies by the weight the dequantize kernel writes (the same float32 products) and sums in
another order: its results are the default's to float32 rounding (``TOL["matmul4"]``). Its AVX-512 path and
its portable scalar loop (forced with ``vectorize=False``) sum in the same order and give the same bits. It
runs for float32 inputs of 1 to 16 rows (decoding); more rows keep the default, and every JAX transformation
goes through the default's formulation. The operation uses the kernel only where its AVX-512 path runs
(the scalar loop is slower than the default); the tests call the kernel itself for the other shapes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import cpu_kernels, quant
from oftjax.cpu_kernels import _matmul4
from oftjax.cpu_kernels._dequant import _meta, _operands
from oftjax.nn._forward import dequant_matmul
from tests._cpu import cpu_flags
from tests.cpu_kernels._helpers import AVX512_DEQUANT, BUILT_HERE, assert_scaled_close, bits, lowered

TARGET = "@oftjax_matmul4"


@pytest.fixture(autouse=True)
def _loaded():
    lib, reason = _matmul4.LIBRARY.load()
    assert lib is not None or not BUILT_HERE, reason


def _weight(n, k, qt="nf4", blocksize=64, nested=False, seed=0):
    w = 0.1 * jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
    return quant.quantize_4bit(w, quant_type=qt, blocksize=blocksize, compress_statistics=nested)


def _x(m, k, seed=1):
    return jax.random.normal(jax.random.key(seed), (m, k), jnp.float32)


def default(x, q):
    """The pure-JAX default, kernels off."""
    with cpu_kernels.disable():
        return np.asarray(jax.jit(lambda x, q: x @ quant.dequantize(q, jnp.float32).T)(x, q))


def by_kernel(x, q, vectorize=True):
    """The kernel itself, for any shape (the AVX-512 path where it applies, else the scalar loop)."""

    def f(x, q):
        return _matmul4.MATMUL_4BIT(x, *_operands(q), precision=None, vectorize=vectorize, **_meta(q))[0]

    return np.asarray(jax.jit(f)(x, q))


def _runs_here():
    """Whether the operation is replaced by the kernel on this machine (library loaded, AVX-512)."""
    return _matmul4.LIBRARY.load()[0] is not None and _matmul4.has_avx512()


def _magnitude(x, q):
    """max over outputs of sum |x| |w|: the scale of the float32 rounding of a dot product."""
    w = np.abs(np.asarray(quant.dequantize(q, jnp.float32), np.float64))
    return float(np.max(np.abs(np.asarray(x, np.float64)) @ w.T))


def test_the_kernel_is_built_and_runs_for_up_to_16_rows():
    info = cpu_kernels.info()["matmul4"]
    if BUILT_HERE:
        assert info["available"], info["reason"]
        assert info["avx512"] == (AVX512_DEQUANT <= cpu_flags())
    q = _weight(24, 64)
    f = lambda x: dequant_matmul(x, q, jnp.float32)  # noqa: E731
    assert "oftjax_matmul4" not in lowered(f, _x(1, 64))
    with cpu_kernels.enable():
        for shape in [(1, 64), (16, 64), (2, 3, 64), (1, 1, 64)]:
            assert (TARGET in lowered(f, jnp.zeros(shape))) == _runs_here(), shape
        # a row length that is not a multiple of 32: the scalar loop, slower than the default, is not used
        ragged = _weight(24, 100)
        assert "oftjax_matmul4" not in lowered(lambda x: dequant_matmul(x, ragged, jnp.float32), _x(1, 100))
        for shape in [(17, 64), (3, 6, 64), (0, 64)]:  # more rows (or none): the default
            assert "oftjax_matmul4" not in lowered(f, jnp.zeros(shape)), shape
        # another compute dtype keeps the default
        bf16 = _x(1, 64).astype(jnp.bfloat16)
        assert "oftjax_matmul4" not in lowered(lambda x: dequant_matmul(x, q, jnp.bfloat16), bf16)


@pytest.mark.parametrize(
    "n,k,blocksize,qt,nested",
    [
        (65, 128, 64, "nf4", False),  # odd N
        (33, 96, 64, "nf4", True),  # K a multiple of 32, not of the blocksize: blocks straddle rows
        (7, 100, 64, "fp4", False),  # K not a multiple of 32: the scalar loop
        (5, 37, 32, "fp4", True),  # odd K: rows start mid-byte
        (301, 576, 64, "nf4", True),  # several work items (the thread pool)
        (40, 256, 128, "fp4", False),
        (9, 512, 256, "nf4", False),
    ],
    ids=lambda v: str(v),
)
def test_kernel_paths_agree_with_the_default(n, k, blocksize, qt, nested):
    q = _weight(n, k, qt, blocksize, nested, seed=n + k)
    for m in (1, 3, 8, 16):
        x = _x(m, k, seed=m)
        got = by_kernel(x, q)
        assert got.shape == (m, n)
        assert_scaled_close(got, default(x, q), "matmul4", _magnitude(x, q))
        np.testing.assert_array_equal(bits(by_kernel(x, q, vectorize=False)), bits(got))


def test_leading_dims_and_many_items():
    q = _weight(1536, 576, "nf4", 64, True)
    x = _x(6, 576).reshape(2, 3, 576)
    with cpu_kernels.enable():
        got = np.asarray(jax.jit(lambda x: dequant_matmul(x, q, jnp.float32))(x))
    assert got.shape == (2, 3, 1536)
    assert_scaled_close(got, default(x, q), "matmul4", _magnitude(x.reshape(6, 576), q))


@pytest.mark.parametrize("vectorize", [True, False], ids=["avx512", "scalar"])
def test_non_finite_inputs_propagate_as_in_the_default(vectorize):
    q = _weight(40, 128, "nf4", 64)
    absmax = np.asarray(q.absmax).copy()
    absmax[5] = np.inf  # row 2, columns 64..127: inf * code, and inf * 0 = NaN
    q = dataclasses.replace(q, absmax=jnp.asarray(absmax))
    x = np.asarray(_x(4, 128)).copy()
    x[0, 3] = np.nan
    x[1, 70] = np.inf
    x[3, 0] = -np.inf
    expected = default(jnp.asarray(x), q)
    got = by_kernel(jnp.asarray(x), q, vectorize)
    for mask in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(mask(got), mask(expected))
    assert np.isnan(got[0]).all() and np.isnan(got[:, 2]).all()
    finite = np.isfinite(expected)
    assert finite.sum() > 0
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_derivatives_and_transformations_are_the_defaults(nested):
    q = _weight(24, 64, "nf4", 64, nested)
    x = _x(3, 64)
    g = jax.random.normal(jax.random.key(9), (3, 24), jnp.float32)

    def loss(x, q):
        return jnp.sum(dequant_matmul(x, q, jnp.float32) * g)

    def run():
        grad_x = jax.jit(jax.grad(loss))(x, q)
        grad_q = jax.jit(jax.grad(loss, argnums=1, allow_int=True))(x, q)
        tangent = jax.jit(lambda x, t: jax.jvp(lambda x: loss(x, q), (x,), (t,))[1])(x, x)
        batched = jax.jit(jax.vmap(lambda x: dequant_matmul(x, q, jnp.float32)))(x.reshape(3, 1, 64))
        return grad_x, grad_q.nested_absmax if nested else grad_q.absmax, tangent, batched

    with cpu_kernels.enable():
        assert (TARGET in lowered(jax.value_and_grad(loss), x, q)) == _runs_here()
        on = run()
    with cpu_kernels.disable():
        off = run()
    for a, b in zip(on, off, strict=True):
        assert_scaled_close(a, b, "matmul4", 10.0)
