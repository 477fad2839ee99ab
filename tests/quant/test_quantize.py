"""quantize_4bit / quantize_int8 without the oracle: validation, layout, corners, error-budget goldens."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax import quant
from oftjax.quant import _quant4
from tests.tolerances import TOL


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


W = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32)

BAD_4BIT = [
    ("rank0", dict(w=jnp.float32(1.0)), ValueError, "non-empty array of rank >= 1"),
    ("int", dict(w=jnp.ones((4, 64), jnp.int32)), TypeError, "floating-point weight"),
    ("list", dict(w=[[1.0, 2.0]]), TypeError, "expects a float array, got list"),
    ("qtype", dict(quant_type="int4"), ValueError, "unknown quant_type 'int4'"),
    ("blocksize", dict(blocksize=48), ValueError, "unsupported blocksize 48"),
    ("storage", dict(quant_storage=jnp.int32), ValueError, "unsupported quant_storage int32"),
    (
        "storage_divide",
        dict(w=jnp.ones((9,)), quant_storage=jnp.float32),
        ValueError,
        "does not divide the 5",
    ),
    ("rounding", dict(rounding="tpu"), ValueError, "unknown rounding 'tpu'"),
]


@pytest.mark.parametrize("kw,exc,msg", [b[1:] for b in BAD_4BIT], ids=[b[0] for b in BAD_4BIT])
def test_quantize_4bit_rejects(kw, exc, msg):
    kw = {"w": W, **kw}
    with pytest.raises(exc, match=msg):
        quant.quantize_4bit(**kw)


BAD_INT8 = [
    ("rank1", jnp.ones((8,)), ValueError, r"2-D weight \[out, in\], got shape \(8,\)"),
    ("rank3", jnp.ones((2, 2, 2)), ValueError, "2-D weight"),
    ("int", jnp.ones((2, 2), jnp.int8), TypeError, "floating-point weight"),
]


@pytest.mark.parametrize("w,exc,msg", [b[1:] for b in BAD_INT8], ids=[b[0] for b in BAD_INT8])
def test_quantize_int8_rejects(w, exc, msg):
    with pytest.raises(exc, match=msg):
        quant.quantize_int8(w)
    with pytest.raises(ValueError, match="unknown rounding"):
        quant.quantize_int8(W, rounding="gpu")


@pytest.mark.parametrize("storage", quant.QUANT_STORAGES, ids=lambda d: d.name)
def test_layout(storage):
    q = quant.quantize_4bit(jnp.ones((33, 64), jnp.bfloat16), "fp4", 128, True, storage)
    n = 33 * 64
    assert q.packed.shape == (n // 2 // storage.itemsize, 1) and q.packed.dtype == storage
    assert q.absmax.shape == (17,) and q.absmax.dtype == jnp.uint8
    assert q.nested_absmax.shape == (1,) and q.offset.shape == () and q.offset.dtype == jnp.float32
    assert (q.shape, q.dtype, q.blocksize, q.quant_type) == ((33, 64), jnp.bfloat16, 128, "fp4")
    assert q.compress_statistics and q.numel == n


def test_zero_blocks():
    w = np.ones(64 * 3 + 5, np.float32)
    w[:64] = 0.0  # all-zero full block: absmax 0
    w[-5:] = 0.0  # all-zero ragged block: absmax 1e-38 (a float32 subnormal), as bnb clamps it
    for f in (quant.quantize_4bit, jax.jit(quant.quantize_4bit)):
        q = f(jnp.asarray(w))
        np.testing.assert_array_equal(bits(q.absmax), bits(np.float32([0, 1, 1, 1e-38])))
        out = np.asarray(quant.dequantize(q))
        np.testing.assert_array_equal(out, np.where(w == 0, 0, 1).astype(np.float32))


def test_odd_count_pads_with_zero_code():
    q = quant.quantize_4bit(jnp.ones((3,), jnp.float32), "nf4")
    assert np.asarray(q.packed).ravel().tolist() == [0xFF, 0xF7]  # NF4 code 7 is 0.0
    q = quant.quantize_4bit(jnp.ones((3,), jnp.float32), "fp4")
    assert np.asarray(q.packed).ravel().tolist() == [0x33, 0x30]  # FP4 code 0 is +0.0


@pytest.mark.parametrize("qt", ["nf4", "fp4"], ids=str)
def test_representable_values_round_trip(qt):
    # w = code * scale with one +-scale per block (so absmax = scale, a power of two): exact round trip
    rng = np.random.default_rng(4)
    code = quant.code_table(qt)
    scale = np.float32(2.0) ** rng.integers(-8, 4, 16).astype(np.float32)
    w = (code[rng.integers(0, 16, (16, 64))] * scale[:, None]).astype(np.float32)
    w[:, 0] = scale
    q = quant.quantize_4bit(jnp.asarray(w), qt, 64)
    np.testing.assert_array_equal(np.asarray(q.absmax), scale)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), w)  # FP4 +-0 compare equal by value


def test_int8_zero_and_overflow_rows():
    w = np.ones((3, 4), np.float32)
    w[1] = 0.0
    w[2, 1] = 70000.0  # > 65504: inf in float16
    q = quant.quantize_int8(jnp.asarray(w))
    assert np.asarray(q.SCB).tolist() == [1.0, 0.0, np.inf]
    assert np.asarray(q.CB).tolist() == [[127] * 4, [0] * 4, [0] * 4]


def test_quantize_compiles_once_per_format():
    traces = []

    def step(w):
        traces.append(1)
        return quant.quantize_4bit(w, "nf4", 64, True)

    jq = jax.jit(step)
    for seed in range(3):
        jq(
            jnp.asarray(np.random.default_rng(seed).standard_normal((16, 64)), jnp.float32)
        ).packed.block_until_ready()
    assert len(traces) == 1


def test_mean_threads_only_matters_for_large_sums():
    w = jnp.asarray(np.random.default_rng(5).standard_normal((64, 64)), jnp.float32)
    a = quant.quantize_4bit(w, compress_statistics=True, mean_threads=1)
    b = quant.quantize_4bit(w, compress_statistics=True, mean_threads=4)
    assert bits(a.offset) == bits(b.offset)


GOLDEN = {  # relative RMS error on N(0, 0.02^2) data, 256 x 1024, seed 0
    ("nf4", 64, False): 0.091894,
    ("nf4", 64, True): 0.091915,
    ("nf4", 4096, False): 0.110197,
    ("fp4", 64, False): 0.122028,
    ("fp4", 64, True): 0.122047,
    ("fp4", 4096, False): 0.158003,
    ("int8", None, False): 0.0078794,
}


@pytest.fixture(scope="module")
def golden_weight():
    return np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32) * 0.02


@pytest.mark.parametrize("fmt", list(GOLDEN), ids=lambda f: "-".join(map(str, f)))
def test_error_budget_golden(fmt, golden_weight):
    qt, bs, dq = fmt
    w = jnp.asarray(golden_weight)
    q = quant.quantize_int8(w) if qt == "int8" else quant.quantize_4bit(w, qt, bs, dq)
    err = np.asarray(quant.dequantize(q), np.float64) - golden_weight
    rel = np.sqrt(np.mean(err**2) / np.mean(golden_weight.astype(np.float64) ** 2))
    np.testing.assert_allclose(rel, GOLDEN[fmt], rtol=TOL["quant_rms_golden"].rtol)


MODULES = [
    "oftjax.quant._tables",
    "oftjax.quant._dequant",
    "oftjax.quant._quant4",
    "oftjax.quant._quant8",
    "oftjax.quant._blockwise",
    "oftjax.quant._torch_mean",
]


@pytest.mark.parametrize("name", MODULES, ids=MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_storages_listed():
    assert [d.name for d in _quant4.QUANT_STORAGES] == ["uint8", "float16", "bfloat16", "float32"]
