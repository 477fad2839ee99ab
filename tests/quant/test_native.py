"""The native CPU 4-bit dequantize kernel (csrc/dequant4.cc, jax.ffi) against the formula and the XLA path.

Three implementations must give the same bits: the kernel's AVX-512 path, its portable scalar path (forced
with ``vectorize=False``; what machines without AVX-512 run) and the XLA formulation (what GPUs run). The one
documented difference: float32 *subnormal* products, which the kernel keeps as bitsandbytes does and XLA:CPU
flushes to zero.
"""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oftjax import quant
from oftjax.quant import _native
from oftjax.quant._dequant import (
    _dequantize_4bit_xla,
    dequantize_4bit_nested,
    dequantize_4bit_values,
    dequantize_nested_absmax,
)
from tests._cpu import cpu_flags, run_without_native
from tests.quant.test_dequant_kernel import DTYPES, bits, reference


def native(raw, absmax, n, blocksize, qt, dtype, vectorize):
    f = jax.jit(
        lambda b, a: _native.dequantize_4bit_cpu(
            b, a, jnp.asarray(quant.code_table(qt)), n, blocksize, dtype, vectorize=vectorize
        )
    )
    return np.asarray(f(jnp.asarray(raw), jnp.asarray(absmax)))


def xla(raw, absmax, n, blocksize, qt, dtype):
    f = jax.jit(lambda b, a: _dequantize_4bit_xla(b, a, n=n, blocksize=blocksize, quant_type=qt, dtype=dtype))
    return np.asarray(f(jnp.asarray(raw), jnp.asarray(absmax)))


def test_the_kernel_is_built_and_loaded():
    # CI must not silently fall back to the slower XLA path: on Linux x86-64 (what CI runs) the build is
    # expected, and the AVX-512 path must run exactly where the CPU has it
    info = quant.native_info()
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert info["available"], info["reason"]
        assert info["avx512"] == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags())
        assert info["rotate_block_sizes"] == ([16, 32, 48, 64] if "avx512f" in cpu_flags() else [])
    # and dequantize actually lowers to it on CPU
    q = quant.quantize_4bit(jnp.ones((64, 64), jnp.float32))
    hlo = jax.jit(quant.dequantize).lower(q).as_text()
    assert ('custom_call_target="oftjax_dequant4"' in hlo or "oftjax_dequant4" in hlo) == info["available"]


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
    np.testing.assert_array_equal(bits(native(raw, absmax, n, blocksize, qt, dt, True)), expected)
    np.testing.assert_array_equal(bits(native(raw, absmax, n, blocksize, qt, dt, False)), expected)
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
    out = native(raw, absmax, 1024, 64, "nf4", dt, vectorize).astype(np.float32)
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
    kernel = native(raw, absmax, 64, 64, "nf4", np.dtype(np.float32), True)
    np.testing.assert_array_equal(kernel, np.full(64, np.float32(1e-39)))
    np.testing.assert_array_equal(
        xla(raw, absmax, 64, 64, "nf4", np.dtype(np.float32)), np.zeros(64, np.float32)
    )


def native_nested(raw, qabs, nested, offset, n, blocksize, qt, dtype, vectorize):
    f = jax.jit(
        lambda *args: _native.dequantize_4bit_nested_cpu(
            *args,
            dynamic=jnp.asarray(quant.DYNAMIC),
            code=jnp.asarray(quant.code_table(qt)),
            n=n,
            blocksize=blocksize,
            dtype=dtype,
            vectorize=vectorize,
        )
    )
    return np.asarray(f(*map(jnp.asarray, (raw, qabs, nested, offset))))


@pytest.mark.parametrize(
    "n,blocksize",
    [(4096, 64), (256 * 64 * 3 + 37, 64), (1001, 32), (300_000, 128), (5 * 4096, 4096)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_nested_absmax_in_the_kernel(n, blocksize, dtype):
    # absmax = fl32(fl32(DYNAMIC[q] * nested[j // 256]) + offset), two roundings, computed per block in the
    # kernel: the same bits as the XLA statistics path followed by the formula; several nested groups, a
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
        got = native_nested(raw, qabs, nested, offset, n, blocksize, "nf4", dt, vectorize)
        np.testing.assert_array_equal(bits(got), want)


def test_nested_subnormal_statistics_kept():
    # an all-zero weight with a ragged block stores absmax 1e-38 (subnormal) and subnormal nested statistics;
    # bnb's dequantize keeps the subnormal products, and so does the kernel (XLA:CPU would flush them)
    qabs = np.full(2, 255, np.uint8)  # DYNAMIC[255] = 1.0
    nested = np.float32([1e-38])
    out = native_nested(
        np.full(64, 0xFF, np.uint8), qabs, nested, np.float32(0), 128, 64, "nf4", np.float32, True
    )
    np.testing.assert_array_equal(bits(out), bits(np.full(128, np.float32(1e-38))))


def test_gradient_through_the_nested_path():
    # d nested_absmax and d offset through the kernel's custom VJP equal autodiff through the XLA statistics
    rng = np.random.default_rng(4)
    raw = jnp.asarray(rng.integers(0, 256, 2048 * 8, dtype=np.uint8))
    qabs = jnp.asarray(rng.integers(0, 256, 512, dtype=np.uint8))
    nested = jnp.asarray(rng.random(2).astype(np.float32))
    offset = jnp.asarray(np.float32(0.03))
    g = jnp.asarray(rng.standard_normal((256, 128)).astype(np.float32))

    def fused(a2, off):
        return jnp.sum(dequantize_4bit_nested(raw, qabs, a2, off, (256, 128), 64, "nf4", jnp.float32) * g)

    def two_steps(a2, off):
        absmax = dequantize_nested_absmax(qabs, a2, off)
        return jnp.sum(dequantize_4bit_values(raw, absmax, (256, 128), 64, "nf4", jnp.float32) * g)

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(nested, offset)
    want = jax.jit(jax.grad(two_steps, argnums=(0, 1)))(nested, offset)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_through_the_kernel():
    # dequantize_4bit_values' custom VJP: d absmax[j] = sum over block j of code[nibble] * g (the forward that
    # ran - kernel or XLA - works on raw bits and carries no gradient itself)
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, 2048, dtype=np.uint8)
    absmax = rng.random(64).astype(np.float32)
    g = rng.standard_normal((64, 64)).astype(np.float32)

    def loss(a):
        out = dequantize_4bit_values(jnp.asarray(raw), a, (64, 64), 64, "nf4", jnp.float32)
        return jnp.sum(out * jnp.asarray(g))

    codes = quant.code_table("nf4")[np.stack([raw >> 4, raw & 15], -1).reshape(-1)]
    expected = (codes * g.reshape(-1)).reshape(64, 64).sum(axis=1)
    got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(absmax)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sharded_weight_on_eight_devices():
    # the custom call has no partitioning rule: XLA gathers its operands; the result is the same bits
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 128)), jnp.float32)
    q = quant.quantize_4bit(w, "nf4", 64, True)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    qs = jax.tree.map(lambda x: jax.device_put(x, shard) if x.ndim and x.shape[0] % 8 == 0 else x, q)
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(qs)), np.asarray(quant.dequantize(q)))


@pytest.mark.parametrize("dtype,n", [("bfloat16", 1 << 23), ("float32", 1 << 22)], ids=["bf16", "f32"])
def test_outputs_over_16_mib_use_streaming_stores_same_bits(dtype, n):
    # from 16 MiB of output the kernel writes with non-temporal stores (its kStreamBytes): same values
    rng = np.random.default_rng(n)
    raw = rng.integers(0, 256, n // 2, dtype=np.uint8)
    absmax = rng.random(n // 64).astype(np.float32)
    dt = np.dtype(DTYPES[dtype])
    expected = bits(xla(raw, absmax, n, 64, "fp4", dt))
    np.testing.assert_array_equal(bits(native(raw, absmax, n, 64, "fp4", dt, True)), expected)


def test_huge_page_advice_off_gives_the_same_bits(monkeypatch):
    raw = np.random.default_rng(1).integers(0, 256, 1 << 21, dtype=np.uint8)  # 4 MiB of bf16 output
    absmax = np.random.default_rng(2).random((1 << 22) // 64).astype(np.float32)
    dt = np.dtype(DTYPES["bfloat16"])
    on = native(raw, absmax, 1 << 22, 64, "nf4", dt, True)
    monkeypatch.setenv("OFTJAX_HUGEPAGES", "0")  # read at trace time: a new jit traces again
    off = native(raw, absmax, 1 << 22, 64, "nf4", dt, True)
    np.testing.assert_array_equal(bits(on), bits(off))


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
    absmax = jnp.ones(kwargs.get("absmax_len", 2), jnp.float32)
    if "nested_len" in kwargs:
        with pytest.raises(Exception, match=message):
            _native.dequantize_4bit_nested_cpu(
                raw,
                jnp.zeros(2, jnp.uint8),
                jnp.ones(kwargs["nested_len"], jnp.float32),
                jnp.float32(0),
                dynamic=jnp.asarray(quant.DYNAMIC),
                code=jnp.zeros(16, jnp.float32),
                n=128,
                blocksize=64,
                dtype=jnp.float32,
            ).block_until_ready()
        return
    with pytest.raises(Exception, match=message):
        _native.dequantize_4bit_cpu(
            raw, absmax, jnp.zeros(16, jnp.float32), 128, kwargs.get("blocksize", 64), jnp.float32
        ).block_until_ready()


def test_disabled_by_environment_falls_back_to_xla():
    code = (
        "import jax, jax.numpy as jnp, numpy as np; from oftjax import quant\n"
        "info = quant.native_info()\n"
        "assert not info['available'] and 'OFTJAX_NATIVE=0' in info['reason'], info\n"
        "assert info['rotate_block_sizes'] == [], info\n"
        "q = quant.quantize_4bit(jnp.linspace(-1, 1, 4096, dtype=jnp.float32).reshape(64, 64))\n"
        "assert 'oftjax_dequant4' not in jax.jit(quant.dequantize).lower(q).as_text()\n"
        "import sys; np.save(sys.stdout.buffer, np.asarray(quant.dequantize(q)))\n"
    )
    out = run_without_native(code)
    fallback = np.load(__import__("io").BytesIO(out))
    q = quant.quantize_4bit(jnp.linspace(-1, 1, 4096, dtype=jnp.float32).reshape(64, 64))
    np.testing.assert_array_equal(fallback, np.asarray(quant.dequantize(q)))
