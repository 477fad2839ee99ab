"""oftjax.quant against bitsandbytes 0.50.2 on the CPU: quantize and dequantize, bit for bit.

Matrix: shapes x blocksizes x nf4/fp4 x double quant x quant_storage x input dtype x data kind.
The default run takes a covering subset in which every option appears at least once (and every shape with
several blocksizes); the full cross product is marked slow. FP4's code 8 is +0.0 in bnb's torch kernel and
ours; values are compared as float32 (so -0.0 == +0.0) *and* bits are compared away from zero.
"""

from __future__ import annotations

import itertools

import bitsandbytes as bnb
import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from interop.oracle import use_default_cpu_dequant
from oftjax import quant

use_default_cpu_dequant()

SHAPES = [(64, 64), (96, 200), (33, 65), (7, 9), (1001,), (256, 1024), (5, 4096)]
BLOCKSIZES = list(quant.BLOCKSIZES)
QTYPES = ["nf4", "fp4"]
STORAGES = ["uint8", "float16", "bfloat16", "float32"]
DTYPES = ["float32", "bfloat16", "float16"]
KINDS = ["normal", "heavy", "ties", "zeros"]

TORCH = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
}
JAX = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "uint8": jnp.uint8}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def make_data(shape, kind, qt, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    match kind:
        case "normal":
            x = rng.standard_normal(n) * 0.05
        case "heavy":
            x = rng.standard_t(2, n) * 0.05
        case "ties":
            # Exact midpoints of the sorted code, with a 1.0 in every 64-element stretch so block absmax = 1
            # (scaling by 1 keeps the ties exact for every blocksize, ragged blocks included).
            code = np.sort(quant.code_table(qt))
            mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
            x = rng.choice(np.concatenate([mids, [1.0, -1.0, 0.0]]), n)
            x[::64] = 1.0
        case "zeros":
            x = rng.standard_normal(n)
            x[:4096] = 0.0  # the first block(s): all-zero full blocks
            x[-(n % 64 or 64) :] = 0.0  # the last stretch: an all-zero ragged block for most blocksizes
    return x.astype(np.float32).reshape(shape)


def storage_fits(shape, storage) -> bool:
    return ((int(np.prod(shape)) + 1) // 2) % np.dtype(JAX[storage]).itemsize == 0


def assert_bits_equal(ours, ref) -> None:
    """Bit equality, except that any NaN equals any NaN (XLA canonicalizes NaN payloads, torch keeps them)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    nan = np.isnan(ref.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(ours.astype(np.float32)), nan)
    np.testing.assert_array_equal(bits(ours)[~nan], bits(ref)[~nan])


def assert_same_values(ours, ref) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    a, b = ours.astype(np.float32), ref.astype(np.float32)
    np.testing.assert_array_equal(a, b)  # value equality: FP4's +-0 compare equal
    nz = b != 0
    np.testing.assert_array_equal(bits(ours)[nz], bits(ref)[nz])


def run_4bit_case(shape, bs, qt, dq, storage, dtype, kind, outer_jit=True):
    x = make_data(shape, kind, qt, seed=hash((shape, bs, kind)) % 2**32)
    w_t = torch.from_numpy(x).to(TORCH[dtype])
    p, st = F.quantize_4bit(
        w_t, blocksize=bs, quant_type=qt, compress_statistics=dq, quant_storage=TORCH[storage]
    )
    ref = F.dequantize_4bit(p, st)
    w = jnp.asarray(to_numpy(w_t))
    jq = jax.jit(quant.quantize_4bit, static_argnums=(1, 2, 3, 4))
    qs = [quant.quantize_4bit(w, qt, bs, dq, JAX[storage])]
    if outer_jit:
        qs.append(jq(w, qt, bs, dq, JAX[storage]))
    for q in qs:
        assert q.packed.dtype == JAX[storage] and q.packed.shape == tuple(p.shape)
        np.testing.assert_array_equal(bits(q.packed), bits(to_numpy(p)))
        np.testing.assert_array_equal(bits(q.absmax), bits(to_numpy(st.absmax)))
        if dq:
            np.testing.assert_array_equal(bits(q.nested_absmax), bits(to_numpy(st.state2.absmax)))
            np.testing.assert_array_equal(bits(q.offset), bits(to_numpy(st.offset)))
        else:
            assert q.nested_absmax is None and q.offset is None
        assert q.shape == shape and q.dtype == np.dtype(JAX[dtype]) and q.blocksize == bs
        assert_same_values(quant.dequantize(q), to_numpy(ref))
        if outer_jit:
            assert_same_values(jax.jit(quant.dequantize)(q), to_numpy(ref))


def covering_cases():
    """Every option at least once; each shape meets several blocksizes, both types and both DQ settings."""
    cases = []
    for i in range(32):
        shape = SHAPES[i % len(SHAPES)]
        storage = STORAGES[(i // 2) % len(STORAGES)]
        if not storage_fits(shape, storage):
            storage = "uint8"
        cases.append(
            (
                shape,
                BLOCKSIZES[i % 8],
                QTYPES[i % 2],
                bool((i // 4) % 2),
                storage,
                DTYPES[i % 3],
                KINDS[i % 4],
            )
        )
    return cases


def case_id(c) -> str:
    shape, bs, qt, dq, storage, dtype, kind = c
    return f"{'x'.join(map(str, shape))}-bs{bs}-{qt}-{'dq' if dq else 'nodq'}-{storage}-{dtype}-{kind}"


COVER = covering_cases()


def test_cover_has_every_option():
    for k, options in enumerate([SHAPES, BLOCKSIZES, QTYPES, [False, True], STORAGES, DTYPES, KINDS]):
        assert {c[k] for c in COVER} == set(options)


@pytest.mark.parametrize("case", COVER, ids=[case_id(c) for c in COVER])
def test_4bit_matches_bnb(case):
    run_4bit_case(*case)


FULL = [
    c
    for c in itertools.product(SHAPES, BLOCKSIZES, QTYPES, [False, True], STORAGES, DTYPES)
    if storage_fits(c[0], c[4])
]


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL, ids=[case_id((*c, "all")) for c in FULL])
def test_4bit_matches_bnb_full(case):
    # One compilation per format and shape serves the four data kinds (the default cover also runs jitted).
    for kind in KINDS:
        run_4bit_case(*case, kind, outer_jit=False)


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"], ids=str)
def test_storage_that_does_not_divide_fails_like_bnb(storage):
    w = np.ones((1001,), np.float32)
    with pytest.raises(RuntimeError):
        F.quantize_4bit(torch.from_numpy(w), quant_storage=TORCH[storage])
    with pytest.raises(ValueError, match="does not divide the 501 packed bytes"):
        quant.quantize_4bit(jnp.asarray(w), quant_storage=JAX[storage])


@pytest.mark.parametrize("qt", QTYPES, ids=QTYPES)
def test_non_finite_input_mirrors_bnb(qt):
    x = make_data((4, 64), "normal", qt, seed=3)
    x[0, 3], x[1, 5], x[2, 0] = np.nan, np.inf, -np.inf
    p, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=qt)
    q = quant.quantize_4bit(jnp.asarray(x), qt, 64)
    np.testing.assert_array_equal(bits(q.packed), bits(p.numpy()))
    np.testing.assert_array_equal(bits(q.absmax), bits(st.absmax.numpy()))


@pytest.mark.parametrize("shape", [(3, 65), (1, 65), (5, 300), (7, 9)], ids=str)
def test_all_zero_weight_double_quant_subnormal_statistics(shape):
    # An all-zero weight with a ragged block stores absmax 1e-38 and subnormal nested statistics: XLA flushes
    # subnormals, so this checks the host-side exact float32 path.
    w = np.zeros(shape, np.float32)
    p, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    for fn in (quant.quantize_4bit, jax.jit(quant.quantize_4bit, static_argnums=(1, 2, 3))):
        q = fn(jnp.asarray(w), "nf4", 64, True)
        np.testing.assert_array_equal(bits(q.packed), bits(p.numpy()))
        np.testing.assert_array_equal(bits(q.absmax), bits(st.absmax.numpy()))
        np.testing.assert_array_equal(bits(q.nested_absmax), bits(st.state2.absmax.numpy()))
        np.testing.assert_array_equal(bits(q.offset), bits(st.offset.numpy()))


# ----------------------------------------------------------------------------------------------- int8

INT8_SHAPES = [s for s in SHAPES if len(s) == 2]
INT8_KINDS = ["normal", "heavy", "zero_rows", "half_ties", "over_fp16", "non_finite"]


def make_int8_data(shape, kind, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    match kind:
        case "heavy":
            x = rng.standard_t(2, shape) * 10
        case "zero_rows":
            x[::3] = 0.0
        case "half_ties":
            x = rng.integers(-127, 127, shape) + 0.5  # with row absmax 127: W * 1 lands on .5 exactly
            x[:, 0] = 127.0
        case "over_fp16":
            x[0, 0] = 70000.0  # becomes inf in float16: SCB = inf, CB = 0 for the row
        case "non_finite":
            x[0, 2], x[1, 1] = np.nan, -np.inf  # SCB NaN / inf, CB 0 (NaN -> int8 is 0 on x86, and ours)
    return x.astype(np.float32)


def run_int8_case(shape, dtype, kind):
    w_t = torch.from_numpy(make_int8_data(shape, kind, seed=len(kind) + shape[0])).to(TORCH[dtype])
    p = bnb.nn.Int8Params(w_t.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    ref = F.int8_vectorwise_dequant(p.CB, p.SCB)
    w = jnp.asarray(to_numpy(w_t))
    for q in (quant.quantize_int8(w), jax.jit(quant.quantize_int8)(w)):
        np.testing.assert_array_equal(np.asarray(q.CB), p.CB.numpy())
        assert_bits_equal(q.SCB, p.SCB.numpy())  # a NaN row's SCB: NaN, payload aside
        assert q.dtype == np.dtype(JAX[dtype])
        for dq in (
            quant.dequantize(q, jnp.float32),
            jax.jit(quant.dequantize, static_argnums=1)(q, jnp.float32),
        ):
            assert_bits_equal(dq, ref.numpy())
        # default output dtype: the original one, rounded once from float32 (what `.to(dtype)` does)
        assert_bits_equal(quant.dequantize(q), to_numpy(ref.to(TORCH[dtype])))


INT8_COVER = [(INT8_SHAPES[i % 6], DTYPES[(i // 6 + i) % 3], INT8_KINDS[(i + i // 6) % 6]) for i in range(12)]
INT8_FULL = list(itertools.product(INT8_SHAPES, DTYPES, INT8_KINDS))


def int8_id(c) -> str:
    return f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}"


@pytest.mark.parametrize("case", INT8_COVER, ids=[int8_id(c) for c in INT8_COVER])
def test_int8_matches_bnb(case):
    run_int8_case(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", INT8_FULL, ids=[int8_id(c) for c in INT8_FULL])
def test_int8_matches_bnb_full(case):
    run_int8_case(*case)


def lognormal_blocks(n, seed) -> np.ndarray:
    """Blocks of 32 with log-normal scales: their absmax mean depends on torch's summation order."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal(n // 32) * 1.5).astype(np.float32)
    return (rng.standard_normal(n).astype(np.float32) * np.repeat(scale, 32)).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2, 3], ids=lambda t: f"T{t}")
def test_double_quant_offset_of_large_weight_follows_torch_threads(threads):
    # 3072 x 1024 at blocksize 32: 98304 absmax values, split by torch's mean into min(T, 3) chunks; with this
    # seed the offsets for 1, 2 and 3 threads are 1088909199, 1088909197 and 1088909199 (bits)
    w = lognormal_blocks(3072 * 1024, seed=2).reshape(3072, 1024)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, st = F.quantize_4bit(torch.from_numpy(w), blocksize=32, quant_type="nf4", compress_statistics=True)
    finally:
        torch.set_num_threads(before)
    q = quant.quantize_4bit(jnp.asarray(w), "nf4", 32, True, mean_threads=threads)
    assert int(bits(q.offset)) == {1: 1088909199, 2: 1088909197, 3: 1088909199}[threads]
    np.testing.assert_array_equal(bits(q.offset), bits(st.offset.numpy()))
    np.testing.assert_array_equal(bits(q.absmax), bits(st.absmax.numpy()))
    np.testing.assert_array_equal(bits(q.nested_absmax), bits(st.state2.absmax.numpy()))
