"""The native CPU rotation kernels (csrc/rotate.cc, jax.ffi) against float64 references and the XLA path.

``rotate_blocks`` runs them on CPU for float32 rotations with block sizes 16, 32, 48, 64 on AVX-512 machines;
everything else takes the XLA formulation, which is what GPUs run. The kernels sum in another order than
XLA (and use fused multiply-adds), so the comparisons are to float32 rounding (TOL["native_rotate"]); their
own results are deterministic (same bits on every call, whatever thread ran which chunk).
"""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import nn, oft
from oftjax.nn import _native_rotate
from oftjax.nn._forward import _rotate_blocks_xla, rotate_blocks, rotate_kernel, rotate_weight
from tests._cpu import has_avx512f, run_without_native
from tests.tolerances import TOL

NATIVE_SIZES = [16, 32, 48, 64]


def assert_native_close(got, expected):
    tol = TOL["native_rotate"]
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol.rtol, atol=tol.atol * scale)


def reference(x, R, transpose=False):
    """x BD(R) (or BD(R)^T) in float64."""
    x, R = np.asarray(x, np.float64), np.asarray(R, np.float64)
    r, b = R.shape[0], R.shape[1]
    if transpose:
        R = R.transpose(0, 2, 1)
    return np.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], r, b), R).reshape(x.shape)


def data(shape, r, b, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    R = rng.standard_normal((r, b, b)).astype(np.float32)
    return x, R


pytestmark = pytest.mark.skipif(
    not _native_rotate.supports(32, np.float32) and not (sys.platform == "linux" and has_avx512f()),
    reason="no AVX-512 on this machine: rotations take the XLA path (tests/nn/test_rotated_matmul.py)",
)


def test_the_kernels_are_built_and_loaded():
    # CI must not silently fall back: on Linux x86-64 with AVX-512 (what CI runs) the kernels must run
    info = nn.rotation_native_info()
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert info["available"], info["reason"]
        assert info["block_sizes"] == (NATIVE_SIZES if has_avx512f() else []), info
    # and rotate_blocks lowers to them on CPU for float32 blocks of those sizes only
    x = jnp.ones((8, 64), jnp.float32)
    for b in (8, 16, 32, 64):
        R = jnp.ones((64 // b, b, b), jnp.float32)
        fwd = jax.jit(rotate_blocks).lower(x, R).as_text()
        bwd = jax.jit(jax.grad(lambda x, R: rotate_blocks(x, R).sum(), (0, 1))).lower(x, R).as_text()
        assert ("@oftjax_rotate(" in fwd and "@oftjax_rotate_grad(" in bwd) == (b in NATIVE_SIZES), b
    hlo = jax.jit(rotate_blocks).lower(x.astype(jnp.bfloat16), jnp.ones((2, 32, 32), jnp.bfloat16)).as_text()
    assert "oftjax_rotate" not in hlo


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
    got = jax.jit(_native_rotate.rotate_cpu)(x, R_in)
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert_native_close(got, reference(x, R, transpose))


@pytest.mark.parametrize("b", NATIVE_SIZES)
@pytest.mark.parametrize("tokens", [1, 5, 128, 129, 1000])
def test_gradients_match_float64(b, tokens):
    r = 2
    x, R = data((tokens, r * b), r, b, seed=tokens)
    g = np.random.default_rng(tokens + 1).standard_normal(x.shape).astype(np.float32)
    dx, dR = jax.jit(_native_rotate.rotate_grad_cpu)(x, g, R)
    assert_native_close(dx, reference(g, R, transpose=True))
    xb = x.astype(np.float64).reshape(tokens, r, b)
    gb = g.astype(np.float64).reshape(tokens, r, b)
    assert_native_close(dR, np.einsum("trk,trc->rkc", xb, gb))


def test_rotate_blocks_gradient_matches_the_xla_path():
    # what training differentiates: rotate_blocks (custom VJP -> the grad kernel) against autodiff of XLA
    x, R = data((4, 64, 96), 3, 32, seed=3)
    w = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)

    def loss(f):
        return lambda x, R: jnp.sum(jnp.tanh(f(x, R)) * w)

    got = jax.jit(jax.grad(loss(rotate_blocks), (0, 1)))(x, R)
    expected = jax.jit(jax.grad(loss(_rotate_blocks_xla), (0, 1)))(x, R)
    for a, e in zip(got, expected, strict=True):
        assert_native_close(a, e)


def test_results_are_deterministic():
    # dR sums 128-token chunks in chunk order: the same bits whichever thread ran which chunk
    x, R = data((2000, 128), 4, 32, seed=5)
    g = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    f = jax.jit(_native_rotate.rotate_grad_cpu)
    first = [np.asarray(a) for a in f(x, g, R)]
    for _ in range(3):
        for a, b in zip(first, f(x, g, R), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_rotate_weight_is_the_transpose_of_rotate_kernel():
    # the dequantized-weight path rotates W's rows in place; two adapters chained in forward order
    rng = np.random.default_rng(7)
    W = rng.standard_normal((40, 96)).astype(np.float32)
    Rs = tuple(oft.cayley(jnp.asarray(rng.standard_normal((3, 32, 32)) * 0.1, jnp.float32)) for _ in range(2))
    got = jax.jit(rotate_weight)(W, Rs)
    assert_native_close(got, np.asarray(rotate_kernel(jnp.asarray(W.T), Rs)).T)
    expected = W
    for R in Rs[::-1]:
        expected = oft.merge_rotation(jnp.asarray(expected), R)
    assert_native_close(got, expected)


def test_vmap_runs_the_kernel_per_element():
    x, R = data((5, 6, 64), 2, 32, seed=8)
    got = jax.jit(jax.vmap(rotate_blocks, in_axes=(0, None)))(x, R)
    assert_native_close(got, reference(x, R))
    Rs = np.stack([R, -R])
    got = jax.jit(jax.vmap(rotate_blocks, in_axes=(None, 0)))(x[0], Rs)
    assert_native_close(got, np.stack([reference(x[0], R), reference(x[0], -R)]))


def test_sharded_activations_on_eight_devices():
    # the custom call has no partitioning rule: XLA gathers its operands; results as on one device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, R = data((64, 96), 3, 32, seed=9)
    xs = jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    f = jax.jit(jax.grad(lambda x, R: jnp.sum(rotate_blocks(x, R) ** 2), (0, 1)))
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
    # rotate_blocks validates and routes first; the kernel checks again rather than read out of bounds
    x, R = jnp.ones(x_shape, jnp.float32), jnp.ones(R_shape, jnp.float32)
    with pytest.raises(Exception, match=message):
        _native_rotate.rotate_cpu(x, R).block_until_ready()
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_native_rotate.rotate_grad_cpu(x, x, R))


def test_zero_tokens():
    x, R = jnp.zeros((0, 64), jnp.float32), jnp.ones((2, 32, 32), jnp.float32)
    assert _native_rotate.rotate_cpu(x, R).shape == (0, 64)
    dx, dR = _native_rotate.rotate_grad_cpu(x, x, R)
    assert dx.shape == (0, 64)
    np.testing.assert_array_equal(np.asarray(dR), np.zeros((2, 32, 32), np.float32))


def test_disabled_by_environment_falls_back_to_xla():
    code = (
        "import jax, jax.numpy as jnp, numpy as np; from oftjax import nn\n"
        "from oftjax.nn._forward import rotate_blocks\n"
        "info = nn.rotation_native_info()\n"
        "assert not info['available'] and 'OFTJAX_NATIVE=0' in info['reason'], info\n"
        "x, R = jnp.ones((8, 64)), jnp.ones((2, 32, 32))\n"
        "assert 'oftjax_rotate' not in jax.jit(rotate_blocks).lower(x, R).as_text()\n"
        "print(float(rotate_blocks(x, R).sum()))\n"
    )
    assert float(run_without_native(code)) == 8 * 64 * 32


# --- a 4-bit weight dequantized and rotated in one pass (csrc/dequant4.cc, Dequant4Rotate) ------------------


def _quantized(shape, quant_type, blocksize, nested, seed=0):
    from oftjax import quant

    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    return quant.quantize_4bit(
        jnp.asarray(w), quant_type=quant_type, blocksize=blocksize, compress_statistics=nested
    )


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


_FUSED_SHAPES = {  # (rows, features), quantization blocksize
    "64x96": ((64, 96), 64),
    "512x512": ((512, 512), 64),
    "rows-straddle-blocks": ((37, 48), 128),
    "ragged-last-block": ((3, 96), 256),
    "one-row": ((1, 64), 32),
    "blocks-span-rows": ((16, 1536), 4096),
}


@pytest.mark.parametrize(
    "b,shape,blocksize",
    [
        pytest.param(b, shape, bs, id=f"b{b}-{name}")
        for name, (shape, bs) in _FUSED_SHAPES.items()
        for b in NATIVE_SIZES
        if shape[1] % b == 0
    ],
)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fused_dequantize_rotate_has_the_bits_of_the_two_steps(b, shape, blocksize, nested, quant_type):
    from oftjax import quant
    from oftjax.nn._forward import dequantize_rotate_weight

    q = _quantized(shape, quant_type, blocksize, nested)
    R = jnp.asarray(np.random.default_rng(1).standard_normal((shape[1] // b, b, b)), jnp.float32)
    assert quant._dequant.fused_rotate_supported(q, R, jnp.float32)
    fused = jax.jit(lambda q, R: dequantize_rotate_weight(q, (R,), jnp.float32))
    assert "oftjax_dequant4" in fused.lower(q, R).as_text() and "rotate" in fused.lower(q, R).as_text()
    two_steps = jax.jit(lambda q, R: rotate_weight(quant.dequantize(q, jnp.float32), (R,)))(q, R)
    np.testing.assert_array_equal(_bits(fused(q, R)), _bits(two_steps))
    expected = reference(quant.dequantize(q, jnp.float32), R, transpose=True)
    assert_native_close(fused(q, R), expected)


def test_fused_path_chains_further_adapters_and_falls_back_where_it_cannot_run():
    from oftjax import quant
    from oftjax.nn._forward import dequantize_rotate_weight, rotated_dequant_matmul

    q = _quantized((64, 96), "nf4", 64, True)
    rng = np.random.default_rng(2)
    R1, R2 = (jnp.asarray(rng.standard_normal((3, 32, 32)), jnp.float32) for _ in range(2))
    # the OFT layer's forward over a 4-bit weight runs it (and its backward dequantizes on its own)
    step = jax.jit(
        jax.value_and_grad(lambda x, R: rotated_dequant_matmul(x, (R,), q, jnp.float32).sum(), (0, 1))
    )
    hlo = step.lower(jnp.ones((8, 96), jnp.float32), R1).as_text()
    assert "oftjax_dequant4_nested_rotate" in hlo and "oftjax_rotate_grad" in hlo
    w = quant.dequantize(q, jnp.float32)
    got = dequantize_rotate_weight(q, (R1, R2), jnp.float32)  # R2 fused, then R1 by rotate_blocks
    np.testing.assert_array_equal(_bits(got), _bits(rotate_weight(w, (R1, R2))))
    # no rotation, an 8-block (XLA path), bf16 compute and int8 weights: the two steps, unchanged
    R8 = jnp.asarray(rng.standard_normal((12, 8, 8)), jnp.float32)
    assert not quant._dequant.fused_rotate_supported(q, R8, jnp.float32)
    assert not quant._dequant.fused_rotate_supported(q, R1, jnp.bfloat16)
    q8 = quant.quantize_int8(w)
    assert not quant._dequant.fused_rotate_supported(q8, R1, jnp.float32)
    np.testing.assert_array_equal(_bits(dequantize_rotate_weight(q, (), jnp.float32)), _bits(w))
    np.testing.assert_array_equal(
        _bits(dequantize_rotate_weight(q, (R8,), jnp.float32)), _bits(rotate_weight(w, (R8,)))
    )
    np.testing.assert_array_equal(
        np.asarray(dequantize_rotate_weight(q8, (R1,), jnp.float32)),
        np.asarray(rotate_weight(quant.dequantize(q8, jnp.float32), (R1,))),
    )


@pytest.mark.parametrize(
    "R_shape,message",
    [((12, 8, 8), "block size 8 needs AVX-512"), ((2, 32, 32), "r \\* b = d"), ((3, 32, 16), "r \\* b = d")],
    ids=["b8", "width", "not-square"],
)
def test_fused_kernel_rejects_inconsistent_operands(R_shape, message):
    from oftjax.quant import _dequant

    q = _quantized((64, 96), "nf4", 64, False)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_dequant.dequantize_rotate_cpu(q, jnp.ones(R_shape, jnp.float32)))


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
    tol = TOL["native_cayley"]
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol.rtol, atol=tol.atol * scale)


@pytest.mark.parametrize("b", NATIVE_SIZES)
@pytest.mark.parametrize("terms,legacy", SERIES, ids=[f"t{t}{'-legacy' if lg else ''}" for t, lg in SERIES])
def test_cayley_neumann_kernels_match_float64(b, terms, legacy):
    rng = np.random.default_rng(b + terms)
    n = 3  # an odd number of blocks: a work item of two and one of one
    vec = (rng.standard_normal((n, b * (b - 1) // 2)) * 0.05).astype(np.float32)
    dR = rng.standard_normal((n, b, b)).astype(np.float32)
    R_ref, vjp = series_reference(vec, b, terms, legacy)
    R = jax.jit(_native_rotate.cayley_neumann_cpu, static_argnums=(1, 2, 3))(vec, b, terms, legacy)
    assert R.shape == (n, b, b) and R.dtype == jnp.float32
    assert_series_close(R, R_ref)
    dvec = jax.jit(_native_rotate.cayley_neumann_grad_cpu, static_argnums=(2, 3))(vec, dR, terms, legacy)
    assert dvec.shape == vec.shape
    assert_series_close(dvec, vjp(dR))
    # and the XLA formulation agrees with the same float64 reference to the same tolerance
    assert_series_close(oft.cayley_neumann(oft.skew_from_vec(jnp.asarray(vec), b), terms, legacy), R_ref)


def test_cayley_neumann_at_zero_parameters_is_the_identity():
    vec = np.zeros((4, 32 * 31 // 2), np.float32)
    R = _native_rotate.cayley_neumann_cpu(vec, 32, 5, False)
    np.testing.assert_array_equal(np.asarray(R), np.broadcast_to(np.eye(32, dtype=np.float32), (4, 32, 32)))
    dR = np.random.default_rng(0).standard_normal((4, 32, 32)).astype(np.float32)
    # at Q = 0 only the linear term moves R: d vec = 2 (dR - dR^T) on the upper triangle, exactly
    rows, cols = oft.triu_indices(32)
    expected = 2 * (dR[:, rows, cols] - dR[:, cols, rows])
    got = _native_rotate.cayley_neumann_grad_cpu(vec, dR, 5, False)
    np.testing.assert_array_equal(np.asarray(got), expected)


def _adapter_settings(b, **kw):
    from oftjax.nn._settings import AdapterSettings

    return AdapterSettings(r=96 // b, block_size=b, **kw)


def _lowered(settings, vec):
    from oftjax.nn._forward import rotation_from_vec

    fwd = jax.jit(lambda v: rotation_from_vec(v, settings)).lower(vec).as_text()
    bwd = jax.jit(jax.grad(lambda v: rotation_from_vec(v, settings).sum())).lower(vec).as_text()
    return fwd, bwd


def test_rotation_blocks_are_built_by_the_kernel_where_it_runs():
    # float32 Cayley-Neumann with a native block size: one kernel call per direction; otherwise XLA's ops
    for b, kw, dtype, native in [
        (32, {}, jnp.float32, True),
        (48, {"num_cayley_neumann_terms": 3, "legacy_neumann": True}, jnp.float32, True),
        (32, {"block_share": True}, jnp.float32, True),
        (32, {"use_cayley_neumann": False}, jnp.float32, False),  # exact Cayley: a solve
        (32, {"num_cayley_neumann_terms": 1}, jnp.float32, False),  # the identity
        (8, {}, jnp.float32, False),  # block size the kernels do not take
        (32, {}, jnp.bfloat16, False),
    ]:
        s = _adapter_settings(b, **kw)
        fwd, bwd = _lowered(s, jnp.zeros(s.param_shape, dtype))
        assert ("@oftjax_cayley_neumann(" in fwd) == native, (b, kw, dtype)
        assert ("@oftjax_cayley_neumann_grad(" in bwd) == native, (b, kw, dtype)


@pytest.mark.parametrize("block_share", [False, True])
def test_native_build_matches_the_xla_build_and_its_gradient(monkeypatch, block_share):
    from oftjax.nn import _forward

    s = _adapter_settings(32, block_share=block_share)
    vec = (np.random.default_rng(9).standard_normal(s.param_shape) * 0.1).astype(np.float32)
    w = np.random.default_rng(10).standard_normal((s.r, 32, 32)).astype(np.float32)

    def value_and_grad():
        f = lambda v: jnp.sum(jnp.tanh(_forward.rotation_from_vec(v, s)) * w)  # noqa: E731
        both = jax.jit(lambda v: (_forward.rotation_from_vec(v, s), jax.grad(f)(v)))
        return [np.asarray(a) for a in both(vec)]

    native = value_and_grad()
    monkeypatch.setattr(_native_rotate, "supports", lambda b, dtype: False)
    xla = value_and_grad()
    assert native[0].shape == xla[0].shape == (s.r, 32, 32)
    for a, e in zip(native, xla, strict=True):
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
    # rotation_from_vec routes only consistent operands here; the kernels check again rather than read out
    # of bounds
    from oftjax.nn._native_rotate import _SERIES, _SERIES_GRAD

    _native_rotate._KERNELS.require()
    vec, dR = jnp.ones(vec_shape, jnp.float32), jnp.ones(R_shape, jnp.float32)
    fwd = jax.ffi.ffi_call(_SERIES, jax.ShapeDtypeStruct(R_shape, jnp.float32), vmap_method="sequential")
    d_vec = jax.ShapeDtypeStruct(vec_shape, jnp.float32)
    bwd = jax.ffi.ffi_call(_SERIES_GRAD, d_vec, vmap_method="sequential")
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(fwd(vec, terms=np.int64(terms), legacy=False))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(bwd(vec, dR, terms=np.int64(terms), legacy=False))
