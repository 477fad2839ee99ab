"""The CPU rotation kernels (csrc/rotate.cc) against float64 references and the pure-JAX default.

With ``oftjax.cpu_kernels`` enabled, ``oft.rotate_blocks`` runs them for float32 blocks of 16, 32, 48 or 64
on an AVX-512 machine and ``oft.cayley_neumann_blocks`` builds float32 blocks of those sizes with them;
everything else keeps the pure-JAX default, which is what GPUs run. The kernels sum in another order than
XLA (and use fused multiply-adds), so the comparisons are to float32 rounding (TOL["native_rotate"],
TOL["native_cayley"]); their own results are deterministic (same bits on every call, whatever thread ran
which chunk). Kernel calls with inconsistent operands go straight to the FFI targets (``_rotate.rotate_cpu``
and friends), past the checks of the layers above.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import cpu_kernels, oft
from oftjax.cpu_kernels import _rotate
from oftjax.nn._forward import rotate_kernel, rotate_weight, rotation_from_vec
from oftjax.nn._settings import AdapterSettings
from tests._cpu import has_avx512f
from tests.cpu_kernels._helpers import (
    BUILT_HERE,
    ROTATE_BLOCK_SIZES,
    assert_scaled_close,
    lowered,
    require_loaded,
    skip_without_avx512,
)
from tests.cpu_kernels._helpers import rotate_reference as reference

NATIVE_SIZES = ROTATE_BLOCK_SIZES

pytestmark = skip_without_avx512(_rotate.supports(32, np.float32), "tests/nn/test_rotated_matmul.py")


@pytest.fixture(autouse=True)
def _loaded():
    require_loaded(_rotate.LIBRARY)


def assert_kernel_close(got, expected):
    assert_scaled_close(got, expected, "native_rotate")


def data(shape, r, b, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    R = rng.standard_normal((r, b, b)).astype(np.float32)
    return x, R


def _rotate_lowerings(x, R):
    fwd = lowered(oft.rotate_blocks, x, R)
    bwd = lowered(jax.grad(lambda x, R: oft.rotate_blocks(x, R).sum(), (0, 1)), x, R)
    return fwd, bwd


def test_the_kernels_are_built_and_loaded():
    # CI must not silently fall back: on Linux x86-64 with AVX-512 (what CI runs) the kernels must run
    info = cpu_kernels.info()["rotation"]
    if BUILT_HERE:
        assert info["available"], info["reason"]
        assert info["block_sizes"] == (NATIVE_SIZES if has_avx512f() else []), info
    # enabled, rotate_blocks lowers to them on CPU for float32 blocks of those sizes only
    x = jnp.ones((8, 64), jnp.float32)
    with cpu_kernels.enable():
        for b in (8, 16, 32, 64):
            fwd, bwd = _rotate_lowerings(x, jnp.ones((64 // b, b, b), jnp.float32))
            assert ("@oftjax_rotate(" in fwd and "@oftjax_rotate_grad(" in bwd) == (b in NATIVE_SIZES), b
        hlo = lowered(oft.rotate_blocks, x.astype(jnp.bfloat16), jnp.ones((2, 32, 32), jnp.bfloat16))
        assert "oftjax_rotate" not in hlo


def test_disabled_by_default_no_kernel_is_called():
    assert not cpu_kernels.enabled()
    x, R = jnp.ones((8, 64), jnp.float32), jnp.ones((2, 32, 32), jnp.float32)
    for text in _rotate_lowerings(x, R):
        assert "oftjax_" not in text
    assert float(oft.rotate_blocks(x, R).sum()) == 8 * 64 * 32


@pytest.mark.parametrize("b", NATIVE_SIZES)
@pytest.mark.parametrize(
    "shape_of",
    [
        lambda d: (1, d),
        lambda d: (7, d),  # fewer rows than one pass over a block
        lambda d: (33, d),  # ragged last pass and chunk
        lambda d: (3, 45, d),  # leading dimensions
        lambda d: (1000, d),  # several chunks on the thread pool
        lambda d: (d,),
    ],
    ids=["1", "7", "33", "3x45", "1000", "vector"],
)
@pytest.mark.parametrize("transpose", [False, True], ids=["BD", "BDT"])
def test_forward_matches_float64(b, shape_of, transpose):
    r = 3
    x, R = data(shape_of(r * b), r, b, seed=b)
    # BD(R)^T is BD of the transposed blocks (what rotate_weight passes)
    R_in = R.transpose(0, 2, 1) if transpose else R
    (got,) = jax.jit(_rotate.rotate_cpu)(x, R_in)
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert_kernel_close(got, reference(x, R, transpose))


@pytest.mark.parametrize("b", NATIVE_SIZES)
@pytest.mark.parametrize("tokens", [1, 5, 128, 129, 1000])
def test_gradients_match_float64(b, tokens):
    r = 2
    x, R = data((tokens, r * b), r, b, seed=tokens)
    g = np.random.default_rng(tokens + 1).standard_normal(x.shape).astype(np.float32)
    dx, dR = jax.jit(_rotate.rotate_grad_cpu)(x, R, g)
    assert_kernel_close(dx, reference(g, R, transpose=True))
    xb = x.astype(np.float64).reshape(tokens, r, b)
    gb = g.astype(np.float64).reshape(tokens, r, b)
    assert_kernel_close(dR, np.einsum("trk,trc->rkc", xb, gb))


def test_rotate_blocks_gradient_matches_the_default():
    # what training differentiates: rotate_blocks (the transpose rule runs the grad kernel) against autodiff
    # of the pure-JAX default
    x, R = data((4, 64, 96), 3, 32, seed=3)
    w = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)

    def loss(f):
        return lambda x, R: jnp.sum(jnp.tanh(f(x, R)) * w)

    expected = jax.jit(jax.grad(loss(oft.rotate_blocks), (0, 1)))(x, R)
    with cpu_kernels.enable():
        assert "@oftjax_rotate_grad(" in lowered(jax.grad(loss(oft.rotate_blocks), (0, 1)), x, R)
        got = jax.jit(jax.grad(loss(oft.rotate_blocks), (0, 1)))(x, R)
    for a, e in zip(got, expected, strict=True):
        assert_kernel_close(a, e)


def test_results_are_deterministic():
    # dR sums 128-token chunks in chunk order: the same bits whichever thread ran which chunk
    x, R = data((2000, 128), 4, 32, seed=5)
    g = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    f = jax.jit(_rotate.rotate_grad_cpu)
    first = [np.asarray(a) for a in f(x, R, g)]
    for _ in range(3):
        for a, b in zip(first, f(x, R, g), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_rotate_weight_is_the_transpose_of_rotate_kernel():
    # the dequantized-weight path rotates W's rows in place; two adapters chained in forward order
    rng = np.random.default_rng(7)
    W = rng.standard_normal((40, 96)).astype(np.float32)
    Rs = tuple(oft.cayley(jnp.asarray(rng.standard_normal((3, 32, 32)) * 0.1, jnp.float32)) for _ in range(2))
    with cpu_kernels.enable():
        assert "@oftjax_rotate(" in lowered(rotate_weight, W, Rs)
        got = jax.jit(rotate_weight)(W, Rs)
    assert_kernel_close(got, np.asarray(rotate_kernel(jnp.asarray(W.T), Rs)).T)
    expected = W
    for R in Rs[::-1]:
        expected = oft.merge_rotation(jnp.asarray(expected), R)
    assert_kernel_close(got, expected)


def test_vmap_under_enable_gives_the_default_values():
    # the batching rule vectorizes the pure-JAX formulation: the values of the default, over either operand
    x, R = data((5, 6, 64), 2, 32, seed=8)
    Rs = np.stack([R, -R])
    over_x = jax.jit(jax.vmap(oft.rotate_blocks, in_axes=(0, None)))
    over_R = jax.jit(jax.vmap(oft.rotate_blocks, in_axes=(None, 0)))
    expected = (over_x(x, R), over_R(x[0], Rs))
    with cpu_kernels.enable():
        got = (over_x(x, R), over_R(x[0], Rs))
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert_kernel_close(got[0], reference(x, R))
    assert_kernel_close(got[1], np.stack([reference(x[0], R), reference(x[0], -R)]))


def test_sharded_activations_on_eight_devices():
    # the custom call has no partitioning rule: XLA gathers its operands; results as on one device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, R = data((64, 96), 3, 32, seed=9)
    xs = jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    with cpu_kernels.enable():
        f = jax.jit(jax.grad(lambda x, R: jnp.sum(oft.rotate_blocks(x, R) ** 2), (0, 1)))
        assert "@oftjax_rotate_grad(" in f.lower(xs, R).as_text()
        for a, b in zip(f(xs, R), f(jnp.asarray(x), R), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "x_shape,R_shape,message",
    [
        ((4, 64), (8, 8, 8), "block size 8 needs AVX-512 and a multiple of 16 up to 64"),
        ((4, 256), (2, 128, 128), "block size 128 needs"),
        ((4, 60), (2, 32, 32), "last dimension must be r \\* b = 64"),
        ((4, 64), (2, 32, 16), "rotation blocks must be \\[r, b, b\\]"),
    ],
    ids=["b8", "b128", "width", "not-square"],
)
def test_kernel_rejects_inconsistent_operands(x_shape, R_shape, message):
    # rotate_blocks routes only supported operands here; the kernel checks again, not to read out of bounds
    x, R = jnp.ones(x_shape, jnp.float32), jnp.ones(R_shape, jnp.float32)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_rotate.rotate_cpu(x, R))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_rotate.rotate_grad_cpu(x, R, x))


def test_zero_tokens():
    x, R = jnp.zeros((0, 64), jnp.float32), jnp.ones((2, 32, 32), jnp.float32)
    assert _rotate.rotate_cpu(x, R)[0].shape == (0, 64)
    dx, dR = _rotate.rotate_grad_cpu(x, R, x)
    assert dx.shape == (0, 64)
    np.testing.assert_array_equal(np.asarray(dR), np.zeros((2, 32, 32), np.float32))
    with cpu_kernels.enable():
        assert "@oftjax_rotate(" in lowered(oft.rotate_blocks, x, R)
        assert oft.rotate_blocks(x, R).shape == (0, 64)


# --- rotation blocks built from the parameters (csrc/rotate.cc, OftjaxCayleyNeumann / ...Grad) --------------

# (num_cayley_neumann_terms, legacy): PEFT's series for t = 2 (one term), 3 and 4 (the same series), the
# default 5, a longer one, and the PEFT 0.16-0.17 series
SERIES = [(2, False), (3, False), (4, False), (5, False), (7, False), (3, True), (5, True)]


def series_reference(vec, b, terms, legacy):
    """R = I + sum_k c_k Q^k and a function dR -> d vec, in float64 (coefficients as in oft/_cayley.py)."""
    vec = np.asarray(vec, np.float64)
    rows, cols = oft.triu_indices(b)
    S = np.zeros((vec.shape[0], b, b))
    S[:, rows, cols] = vec
    Q = S - S.transpose(0, 2, 1)
    if legacy:
        coef = [2.0] * (terms - 1)
    elif terms == 2:
        coef = [2.0]
    else:
        coef = [2.0] * (max(terms - 1, 3) - 1) + [1.0]
    powers = [Q]
    for _ in coef[1:]:
        powers.append(powers[-1] @ Q)
    R = np.eye(b) + sum(c * P for c, P in zip(coef, powers, strict=True))

    def vjp(dR):
        dR = np.asarray(dR, np.float64)
        dQ = np.zeros_like(Q)
        for k, c in enumerate(coef, start=1):  # d/dQ <dR, Q^k> = sum_j (Q^T)^j dR (Q^T)^(k-1-j)
            for j in range(k):
                left = np.linalg.matrix_power(Q.transpose(0, 2, 1), j)
                right = np.linalg.matrix_power(Q.transpose(0, 2, 1), k - 1 - j)
                dQ += c * left @ dR @ right
        dS = dQ - dQ.transpose(0, 2, 1)
        return dS[:, rows, cols]

    return R, vjp


def assert_series_close(got, expected):
    assert_scaled_close(got, expected, "native_cayley")


def _series(vec, b, terms, legacy):
    return _rotate.series_cpu(vec, block_size=b, terms=terms, legacy=legacy)[0]


def _series_grad(vec, dR, b, terms, legacy):
    return _rotate.series_grad_cpu(vec, dR, block_size=b, terms=terms, legacy=legacy)[0]


@pytest.mark.parametrize("b", NATIVE_SIZES)
@pytest.mark.parametrize("terms,legacy", SERIES, ids=[f"t{t}{'-legacy' if lg else ''}" for t, lg in SERIES])
def test_cayley_neumann_kernels_match_float64(b, terms, legacy):
    rng = np.random.default_rng(b + terms)
    n = 3  # an odd number of blocks: a work item of two and one of one
    vec = (rng.standard_normal((n, b * (b - 1) // 2)) * 0.05).astype(np.float32)
    dR = rng.standard_normal((n, b, b)).astype(np.float32)
    R_ref, vjp = series_reference(vec, b, terms, legacy)
    R = jax.jit(_series, static_argnums=(1, 2, 3))(vec, b, terms, legacy)
    assert R.shape == (n, b, b) and R.dtype == jnp.float32
    assert_series_close(R, R_ref)
    dvec = jax.jit(_series_grad, static_argnums=(2, 3, 4))(vec, dR, b, terms, legacy)
    assert dvec.shape == vec.shape
    assert_series_close(dvec, vjp(dR))
    # and the pure-JAX default agrees with the same float64 reference to the same tolerance
    assert_series_close(oft.cayley_neumann_blocks(jnp.asarray(vec), b, terms, legacy), R_ref)


def test_cayley_neumann_at_zero_parameters_is_the_identity():
    vec = np.zeros((4, 32 * 31 // 2), np.float32)
    R = _series(vec, 32, 5, False)
    np.testing.assert_array_equal(np.asarray(R), np.broadcast_to(np.eye(32, dtype=np.float32), (4, 32, 32)))
    dR = np.random.default_rng(0).standard_normal((4, 32, 32)).astype(np.float32)
    # at Q = 0 only the linear term moves R: d vec = 2 (dR - dR^T) on the upper triangle, exactly
    rows, cols = oft.triu_indices(32)
    expected = 2 * (dR[:, rows, cols] - dR[:, cols, rows])
    np.testing.assert_array_equal(np.asarray(_series_grad(vec, dR, 32, 5, False)), expected)


def _adapter_settings(b, **kw):
    return AdapterSettings(r=96 // b, block_size=b, **kw)


def _lowered_build(settings, vec):
    fwd = lowered(lambda v: rotation_from_vec(v, settings), vec)
    bwd = lowered(jax.grad(lambda v: rotation_from_vec(v, settings).sum()), vec)
    return fwd, bwd


@pytest.mark.parametrize(
    "b,kw,dtype,by_kernel",
    [
        (32, {}, jnp.float32, True),
        (48, {"num_cayley_neumann_terms": 3, "legacy_neumann": True}, jnp.float32, True),
        (32, {"block_share": True}, jnp.float32, True),
        (32, {"use_cayley_neumann": False}, jnp.float32, False),  # exact Cayley: a solve
        (32, {"num_cayley_neumann_terms": 1}, jnp.float32, False),  # the identity
        (8, {}, jnp.float32, False),  # block size the kernels do not take
        (32, {}, jnp.bfloat16, False),
    ],
    ids=["b32", "b48-legacy", "shared", "exact", "t1", "b8", "bf16"],
)
def test_rotation_blocks_are_built_by_the_kernel_where_it_runs(b, kw, dtype, by_kernel):
    # float32 Cayley-Neumann with a kernel block size: one kernel call per direction; otherwise XLA's ops
    s = _adapter_settings(b, **kw)
    vec = jnp.zeros(s.param_shape, dtype)
    with cpu_kernels.enable():
        fwd, bwd = _lowered_build(s, vec)
    assert ("@oftjax_cayley_neumann(" in fwd) == by_kernel
    assert ("@oftjax_cayley_neumann_grad(" in bwd) == by_kernel
    assert not any("oftjax_" in text for text in _lowered_build(s, vec))  # disabled: never


@pytest.mark.parametrize("block_share", [False, True])
def test_kernel_build_matches_the_default_build_and_its_gradient(block_share):
    s = _adapter_settings(32, block_share=block_share)
    vec = (np.random.default_rng(9).standard_normal(s.param_shape) * 0.1).astype(np.float32)
    w = np.random.default_rng(10).standard_normal((s.r, 32, 32)).astype(np.float32)

    def value_and_grad():
        f = lambda v: jnp.sum(jnp.tanh(rotation_from_vec(v, s)) * w)  # noqa: E731
        both = jax.jit(lambda v: (rotation_from_vec(v, s), jax.grad(f)(v)))
        return [np.asarray(a) for a in both(vec)]

    with cpu_kernels.enable():
        kernels = value_and_grad()
    default = value_and_grad()
    assert kernels[0].shape == default[0].shape == (s.r, 32, 32)
    for a, e in zip(kernels, default, strict=True):
        assert_series_close(a, e)


@pytest.mark.parametrize(
    "vec_shape,R_shape,terms,message",
    [
        ((2, 121), (2, 16, 16), 5, "parameters must be \\[2, 120\\] for blocks of size 16"),
        ((3, 120), (2, 16, 16), 5, "parameters must be \\[2, 120\\]"),
        ((2, 28), (2, 8, 8), 5, "block size 8 needs AVX-512 and a multiple of 16 up to 64"),
        ((2, 120), (2, 16, 8), 5, "rotation blocks must be \\[n, b, b\\]"),
        ((2, 120), (2, 16, 16), 0, "terms must be >= 1; got 0"),
    ],
    ids=["width", "count", "b8", "not-square", "terms"],
)
def test_cayley_neumann_kernels_reject_inconsistent_operands(vec_shape, R_shape, terms, message):
    # cayley_neumann_blocks routes only consistent operands here; the kernels check again rather than read out
    # of bounds. The forward's output shape is the blocks' (series_cpu derives it from vec, so the FFI target
    # is called by name to give it another); the backward through series_grad_cpu.
    vec, dR = jnp.ones(vec_shape, jnp.float32), jnp.ones(R_shape, jnp.float32)
    fwd = jax.ffi.ffi_call(_rotate._SERIES, jax.ShapeDtypeStruct(R_shape, jnp.float32))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(fwd(vec, terms=np.int64(terms), legacy=False))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_series_grad(vec, dR, R_shape[1], terms, False))
