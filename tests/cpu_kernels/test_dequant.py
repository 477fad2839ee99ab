"""The CPU 4-bit dequantize kernels (csrc/dequant4.cc) against the formula and the pure-JAX default.

Three implementations must give the same bits: the kernel's AVX-512 path, its portable scalar path (forced
with ``vectorize=False``; what machines without AVX-512 run) and the pure-JAX formulation (what GPUs run).
The one documented difference: float32 *subnormal* products, which the kernel keeps as bitsandbytes does and
XLA:CPU flushes to zero. Kernel calls go through ``_dequant``'s CPU functions, or straight to the FFI targets
where the operands must be inconsistent. The fused dequantize-and-rotate kernel: test_dequant_rotate.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oftjax import cpu_kernels, quant
from oftjax.cpu_kernels import _dequant
from oftjax.quant._dequant import _dequantize_4bit_xla, dequantize_4bit_values, dequantize_nested_absmax
from tests._cpu import cpu_flags
from tests.cpu_kernels._helpers import (
    AVX512_DEQUANT,
    BUILT_HERE,
    lowered,
    require_loaded,
)
from tests.quant.test_dequant_kernel import DTYPES, bits, reference
from tests.tolerances import TOL


@pytest.fixture(autouse=True)
def _loaded():
    require_loaded(_dequant.LIBRARY)


def _meta(n, blocksize, qt):
    return {"shape": (n,), "orig_dtype": np.dtype(np.float32), "blocksize": blocksize, "quant_type": qt}


def by_kernel(raw, absmax, n, blocksize, qt, dtype, vectorize):
    def f(b, a):
        meta = _meta(n, blocksize, qt)
        return _dequant._dequant_cpu(b, a, dtype=np.dtype(dtype), vectorize=vectorize, **meta)

    return np.asarray(jax.jit(f)(jnp.asarray(raw), jnp.asarray(absmax))[0])


def xla(raw, absmax, n, blocksize, qt, dtype):
    f = jax.jit(lambda b, a: _dequantize_4bit_xla(b, a, n=n, blocksize=blocksize, quant_type=qt, dtype=dtype))
    return np.asarray(f(jnp.asarray(raw), jnp.asarray(absmax)))


def test_the_kernel_is_built_and_loaded():
    # CI must not silently fall back to the slower pure-JAX path: on Linux x86-64 (what CI runs) the build is
    # expected, and the AVX-512 path must run exactly where the CPU has it
    info = cpu_kernels.info()["dequantize"]
    if BUILT_HERE:
        assert info["available"], info["reason"]
        assert info["avx512"] == (AVX512_DEQUANT <= cpu_flags())
        assert info["rotate_block_sizes"] == ([16, 32, 48, 64] if "avx512f" in cpu_flags() else [])
    # enabled, dequantize lowers to it on CPU; disabled (the default), never
    q = quant.quantize_4bit(jnp.ones((64, 64), jnp.float32))
    assert "oftjax_" not in lowered(quant.dequantize, q)
    with cpu_kernels.enable():
        assert ("@oftjax_dequant4(" in lowered(quant.dequantize, q)) == info["available"]
        with jax.enable_x64(True):  # float64 is not an output the kernel writes
            assert "oftjax_" not in lowered(lambda q: quant.dequantize(q, jnp.float64), q)


@pytest.mark.parametrize(
    "shape,blocksize",
    [
        ((64, 64), 64),
        ((33, 65), 32),  # ragged last block, odd count
        ((7, 9), 4096),  # one ragged block larger than the weight
        ((1001,), 128),
        ((256, 1024), 64),  # 4 chunks of 65536 values: the thread pool path
        ((517, 300), 2048),  # chunks of whole blocks, ragged last block in the last chunk
        ((3, 4096), 4096),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"bs{v}",
)
@pytest.mark.parametrize("qt", ["nf4", "fp4"], ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_vector_scalar_and_xla_paths_agree_with_the_formula(shape, blocksize, qt, dtype):
    rng = np.random.default_rng(blocksize + len(shape))
    n = int(np.prod(shape))
    nb = -(-n // blocksize)
    raw = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    # scales over 12 decades: float16 subnormals and overflow to inf, bf16 rounding everywhere
    absmax = (10.0 ** rng.uniform(-7, 5.5, nb)).astype(np.float32)
    dt = np.dtype(DTYPES[dtype])
    expected = bits(reference(raw, absmax, n, blocksize, qt, dt))
    np.testing.assert_array_equal(bits(by_kernel(raw, absmax, n, blocksize, qt, dt, True)), expected)
    np.testing.assert_array_equal(bits(by_kernel(raw, absmax, n, blocksize, qt, dt, False)), expected)
    np.testing.assert_array_equal(bits(xla(raw, absmax, n, blocksize, qt, dt)), expected)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("vectorize", [True, False], ids=["avx512", "scalar"])
def test_non_finite_and_subnormal_products_as_torch(dtype, vectorize):
    # bitsandbytes' default kernel: (code[idx] * absmax).to(dtype) in torch. inf * 0 is NaN, NaN stays NaN
    # (compared as NaN: payloads are not part of the contract), huge * code overflows float16, and
    # 1e-38 * code is a float32 subnormal that torch keeps and the kernel keeps (MXCSR FTZ/DAZ cleared)
    raw = np.arange(256, dtype=np.uint8).repeat(2)
    absmax = np.float32(
        [np.inf, np.nan, 1.0, -0.0, 3.0e38, 1e-38, 2.0e-39, 0.5, -np.inf, 65504.0, 1e-30, 7.0]
    )
    absmax = np.resize(absmax, 1024 // 64)
    dt = np.dtype(DTYPES[dtype])
    code = torch.from_numpy(quant.code_table("nf4").copy())
    idx = torch.from_numpy(np.stack([raw >> 4, raw & 15], -1).reshape(-1).astype(np.int64))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ref = (code[idx] * torch.from_numpy(absmax).repeat_interleave(64)).to(torch_dtype)
    ref = ref.float().numpy() if dtype == "bfloat16" else ref.numpy()
    out = by_kernel(raw, absmax, 1024, 64, "nf4", dt, vectorize).astype(np.float32)
    ref = ref.astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(bits(out[~nan]), bits(ref[~nan]))
    assert (np.abs(ref[~nan]) < np.finfo(np.float32).tiny).any() and (ref[~nan] != 0).any()


def test_xla_path_flushes_float32_subnormal_products():
    # the documented difference (XLA:CPU runs with FTZ/DAZ): where the product is a float32 subnormal, the XLA
    # path writes 0 and the kernel writes the subnormal, as bitsandbytes does
    raw = np.full(32, 0xFF, np.uint8)  # code 15 = 1.0
    absmax = np.float32([1e-39])  # subnormal itself
    kept = by_kernel(raw, absmax, 64, 64, "nf4", np.dtype(np.float32), True)
    np.testing.assert_array_equal(kept, np.full(64, np.float32(1e-39)))
    np.testing.assert_array_equal(
        xla(raw, absmax, 64, 64, "nf4", np.dtype(np.float32)), np.zeros(64, np.float32)
    )


def by_kernel_nested(raw, qabs, nested, offset, n, blocksize, qt, dtype, vectorize):
    def f(*operands):
        meta = _meta(n, blocksize, qt)
        return _dequant._dequant_cpu(*operands, dtype=np.dtype(dtype), vectorize=vectorize, **meta)[0]

    return np.asarray(jax.jit(f)(*map(jnp.asarray, (raw, qabs, nested, offset))))


@pytest.mark.parametrize(
    "n,blocksize",
    [(4096, 64), (256 * 64 * 3 + 37, 64), (1001, 32), (300_000, 128), (5 * 4096, 4096)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_nested_absmax_in_the_kernel(n, blocksize, dtype):
    # absmax = fl32(fl32(DYNAMIC[q] * nested[j // 256]) + offset), two roundings, computed per block in the
    # kernel: the same bits as the pure-JAX statistics followed by the formula; several nested groups, a
    # ragged last group and block, and the thread-pool path at 300,000 values
    rng = np.random.default_rng(n)
    nb = -(-n // blocksize)
    raw = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    qabs = rng.integers(0, 256, nb, dtype=np.uint8)
    nested = (rng.random(-(-nb // 256)) * 0.2).astype(np.float32)
    offset = np.float32(0.0549545)
    absmax = np.asarray(jax.jit(dequantize_nested_absmax)(qabs, nested, offset))
    expected = (quant.DYNAMIC[qabs] * np.repeat(nested, 256)[:nb]).astype(np.float32) + offset
    np.testing.assert_array_equal(bits(absmax), bits(expected))  # the statistics themselves
    dt = np.dtype(DTYPES[dtype])
    want = bits(reference(raw, absmax, n, blocksize, "nf4", dt))
    for vectorize in (True, False):
        got = by_kernel_nested(raw, qabs, nested, offset, n, blocksize, "nf4", dt, vectorize)
        np.testing.assert_array_equal(bits(got), want)


def test_nested_subnormal_statistics_kept():
    # an all-zero weight with a ragged block stores absmax 1e-38 (subnormal) and subnormal nested statistics;
    # bnb's dequantize keeps the subnormal products, and so does the kernel (XLA:CPU would flush them)
    qabs = np.full(2, 255, np.uint8)  # DYNAMIC[255] = 1.0
    nested = np.float32([1e-38])
    out = by_kernel_nested(
        np.full(64, 0xFF, np.uint8), qabs, nested, np.float32(0), 128, 64, "nf4", np.float32, True
    )
    np.testing.assert_array_equal(bits(out), bits(np.full(128, np.float32(1e-38))))


def test_gradient_through_the_nested_path():
    # d nested_absmax and d offset with the kernel enabled (its JVP is the pure-JAX tangent) equal autodiff
    # through the pure-JAX statistics and values, bit for bit
    rng = np.random.default_rng(4)
    shape = (256, 128)
    raw = jnp.asarray(rng.integers(0, 256, 2048 * 8, dtype=np.uint8))
    qabs = jnp.asarray(rng.integers(0, 256, 512, dtype=np.uint8))
    nested = jnp.asarray(rng.random(2).astype(np.float32))
    offset = jnp.asarray(np.float32(0.03))
    g = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    q = quant.FourBitWeight(raw, qabs, nested, offset, shape=shape, blocksize=64, quant_type="nf4")

    def through_dequantize(a2, off):
        return jnp.sum(quant.dequantize(dataclasses.replace(q, nested_absmax=a2, offset=off)) * g)

    def two_steps(a2, off):
        absmax = dequantize_nested_absmax(qabs, a2, off)
        return jnp.sum(dequantize_4bit_values(raw, absmax, shape, 64, "nf4", jnp.float32) * g)

    want = jax.jit(jax.grad(two_steps, argnums=(0, 1)))(nested, offset)
    with cpu_kernels.enable():
        # the loss runs the kernel (a gradient alone needs only the tangent: the forward is dead code there)
        both = jax.value_and_grad(through_dequantize, argnums=(0, 1))
        assert "@oftjax_dequant4_nested(" in lowered(both, nested, offset)
        got = jax.jit(jax.grad(through_dequantize, argnums=(0, 1)))(nested, offset)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_through_the_kernel():
    # d absmax[j] = sum over block j of code[nibble] * g (the kernel works on raw bits; the tangent is written
    # out by the pure-JAX formulation)
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, 2048, dtype=np.uint8)
    absmax = rng.random(64).astype(np.float32)
    g = rng.standard_normal((64, 64)).astype(np.float32)
    q = quant.FourBitWeight(jnp.asarray(raw), jnp.asarray(absmax), shape=(64, 64), blocksize=64)

    def loss(a):
        return jnp.sum(quant.dequantize(dataclasses.replace(q, absmax=a)) * jnp.asarray(g))

    codes = quant.code_table("nf4")[np.stack([raw >> 4, raw & 15], -1).reshape(-1)]
    expected = (codes.astype(np.float64) * g.reshape(-1)).reshape(64, 64).sum(axis=1)
    with cpu_kernels.enable():
        assert "@oftjax_dequant4(" in lowered(jax.value_and_grad(loss), jnp.asarray(absmax))
        got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(absmax)))
    tol = TOL["dequant_absmax_grad"]
    np.testing.assert_allclose(got, expected, rtol=tol.rtol, atol=tol.atol)


def test_sharded_weight_on_eight_devices():
    # the custom call has no partitioning rule: XLA gathers its operands; the result is the same bits
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 128)), jnp.float32)
    q = quant.quantize_4bit(w, "nf4", 64, True)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    qs = jax.tree.map(lambda x: jax.device_put(x, shard) if x.ndim and x.shape[0] % 8 == 0 else x, q)
    with cpu_kernels.enable():
        assert "@oftjax_dequant4_nested(" in lowered(quant.dequantize, qs)
        sharded, whole = jax.jit(quant.dequantize)(qs), quant.dequantize(q)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(quant.dequantize(q)))  # = the default


@pytest.mark.parametrize("dtype,n", [("bfloat16", 1 << 23), ("float32", 1 << 22)], ids=["bf16", "f32"])
def test_outputs_over_16_mib_use_streaming_stores_same_bits(dtype, n):
    # from 16 MiB of output the kernel writes with non-temporal stores (its kStreamBytes): same values
    rng = np.random.default_rng(n)
    raw = rng.integers(0, 256, n // 2, dtype=np.uint8)
    absmax = rng.random(n // 64).astype(np.float32)
    dt = np.dtype(DTYPES[dtype])
    expected = bits(xla(raw, absmax, n, 64, "fp4", dt))
    np.testing.assert_array_equal(bits(by_kernel(raw, absmax, n, 64, "fp4", dt, True)), expected)


def test_huge_page_advice_off_gives_the_same_bits(monkeypatch):
    raw = np.random.default_rng(1).integers(0, 256, 1 << 21, dtype=np.uint8)  # 4 MiB of bf16 output
    absmax = np.random.default_rng(2).random((1 << 22) // 64).astype(np.float32)
    dt = np.dtype(DTYPES["bfloat16"])
    on = by_kernel(raw, absmax, 1 << 22, 64, "nf4", dt, True)
    monkeypatch.setenv("OFTJAX_HUGEPAGES", "0")  # read at trace time: a new jit traces again
    off = by_kernel(raw, absmax, 1 << 22, 64, "nf4", dt, True)
    np.testing.assert_array_equal(bits(on), bits(off))


def _call_plain(raw, absmax, n, blocksize):
    # the FFI target by name: _dequant_cpu checks the packed length in Python before the kernel would
    call = jax.ffi.ffi_call(_dequant._PLAIN, jax.ShapeDtypeStruct((n,), jnp.float32))
    code = jnp.zeros(16, jnp.float32)
    return call(raw, absmax, code, blocksize=np.int64(blocksize), vectorize=True, hugepages=True)


def _call_nested(raw, nested, n, blocksize):
    call = jax.ffi.ffi_call(_dequant._NESTED, jax.ShapeDtypeStruct((n,), jnp.float32))
    stats = (jnp.zeros(2, jnp.uint8), nested, jnp.float32(0))
    code = (jnp.asarray(quant.DYNAMIC), jnp.zeros(16, jnp.float32))
    return call(raw, *stats, *code, blocksize=np.int64(blocksize), vectorize=True, hugepages=True)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"absmax_len": 3}, "absmax has 3 values, expected 2"),
        ({"bytes_len": 10}, "packed holds 10 bytes, expected at least 64"),
        ({"blocksize": 63}, "blocksize must be even and positive, got 63"),
        ({"nested_len": 2}, "nested_absmax has 2 values, expected 1"),
    ],
    ids=["absmax", "packed", "blocksize", "nested"],
)
def test_kernel_rejects_inconsistent_operands(kwargs, message):
    # the Python callers validate first; the kernel checks again rather than read out of bounds
    raw = jnp.zeros(kwargs.get("bytes_len", 64), jnp.uint8)
    with pytest.raises(Exception, match=message):
        if "nested_len" in kwargs:
            jax.block_until_ready(_call_nested(raw, jnp.ones(kwargs["nested_len"], jnp.float32), 128, 64))
        else:
            absmax = jnp.ones(kwargs.get("absmax_len", 2), jnp.float32)
            jax.block_until_ready(_call_plain(raw, absmax, 128, kwargs.get("blocksize", 64)))


def test_disabled_by_default_no_kernel_is_called():
    assert not cpu_kernels.enabled()
    q = quant.quantize_4bit(jnp.linspace(-1, 1, 4096, dtype=jnp.float32).reshape(64, 64))
    assert "oftjax_" not in lowered(quant.dequantize, q)
    default = np.asarray(quant.dequantize(q))
    with cpu_kernels.enable():
        np.testing.assert_array_equal(bits(np.asarray(quant.dequantize(q))), bits(default))


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_enabled_dequantize_has_the_defaults_bits_for_every_storage(nested):
    # bnb stores the packed bytes in any quant_storage dtype; the kernel reads them as bytes, as the default
    w = jnp.asarray(np.random.default_rng(5).standard_normal((48, 80)), jnp.float32)
    cases = [  # four storages, each output dtype at least once
        (quant.quantize_4bit(w, "fp4", 64, nested, quant_storage=jnp.dtype(storage)), DTYPES[dtype])
        for storage, dtype in [
            ("uint8", "bfloat16"),
            ("float16", "float32"),
            ("bfloat16", "float16"),
            ("float32", "float32"),
        ]
    ]
    f = jax.jit(quant.dequantize, static_argnums=1)
    expected = [bits(np.asarray(f(q, dt))) for q, dt in cases]
    with cpu_kernels.enable():
        for (q, dt), want in zip(cases, expected, strict=True):
            assert "@oftjax_dequant4" in f.lower(q, dt).as_text()
            np.testing.assert_array_equal(bits(np.asarray(f(q, dt))), want)
