"""LLM.int8 matmul (oftjax.quant.llm_int8_matmul and its steps) without the oracle: bits against a numpy
statement of bnb's CPU and CUDA rules, static shapes, derivatives, validation.

The torch oracle comparisons are in tests/parity/test_int8_eval_parity.py.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from oftjax import quant
from oftjax.quant._int8_matmul import OUTLIER_CAPACITY
from tests.nn._helpers import COMPILES
from tests.tolerances import TOL

F32 = np.float32


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def activations(shape, seed=0, outlier_col=None, scale=1.0, zero_row=False):
    x = np.random.default_rng(seed).standard_normal(shape).astype(F32) * F32(scale)
    if outlier_col is not None:
        x[..., outlier_col] *= F32(20.0)
    if zero_row:
        x[-1] = 0.0  # SCA = 0: 0 * inf = NaN, stored as 0
    return x


def ref_quantize(x, threshold, rounding="cpu"):
    """bnb int8_vectorwise_quant (CPU: backends/default/ops.py; CUDA: kInt8VectorQuant), in numpy."""
    x16 = np.asarray(x, np.float32).astype(np.float16)
    cols = np.zeros(x16.shape[1], bool)
    if threshold > 0:
        outliers = np.abs(x16) >= np.float16(threshold)
        cols = outliers.any(0)
        x16 = np.where(outliers, np.float16(0), x16)
    SCA = np.abs(x16).max(1).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (F32(1) / SCA) * F32(127) if rounding == "cpu" else F32(127) / SCA
        v = x16.astype(F32) * scale[:, None]
    CA = np.where(np.isnan(v), 0, np.rint(v)).astype(np.int8)
    zero = np.broadcast_to(cols[None, :], CA.shape)
    if rounding == "cuda" and threshold > 0:
        zero = zero | (np.abs(np.asarray(x, F32).astype(np.float16).astype(F32)) >= F32(threshold))
    return np.where(zero, np.int8(0), CA), SCA, cols


def ref_rescale(acc, SCA, SCB, bias, dtype, rounding="cpu"):
    """bnb int8_mm_dequant (CPU default kernel; CUDA kdequant_mm_int32_fp16 with fmaf as multiply + add)."""
    accf = acc.astype(F32)
    if rounding == "cpu":
        out = accf * (SCA[:, None] * SCB[None, :]) * F32(6.200124e-05)
        return (out if bias is None else out + bias.astype(F32)).astype(dtype)
    v = accf * SCA[:, None] * SCB[None, :] * F32(6.200012e-05)
    fused = bias is not None and bias.dtype == np.float16
    out = (v + bias.astype(F32) if fused else v).astype(np.float16)
    if bias is not None and not fused:
        out = (out.astype(F32) + bias.astype(F32)).astype(np.float16)
    return out.astype(dtype)


THRESHOLDS = {"thr0": 0.0, "thr6": 6.0, "thr2.5": 2.5, "thr3.3001": 3.3001}
CASES = {
    "normal": dict(shape=(6, 64), zero_row=True),
    "outlier-col": dict(shape=(6, 64), outlier_col=5, zero_row=True),
    "one-row": dict(shape=(1, 48), outlier_col=3),
    "tiny": dict(shape=(4, 32), scale=1e-5),
}


@pytest.mark.parametrize("rounding", quant.ROUNDINGS)
@pytest.mark.parametrize("threshold", list(THRESHOLDS.values()), ids=list(THRESHOLDS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_quantize_activations_bits(case, threshold, rounding):
    x = activations(**CASES[case])
    got = jax.jit(quant.quantize_activations, static_argnums=(1, 2))(jnp.asarray(x), threshold, rounding)
    CA, SCA, cols = ref_quantize(x, threshold, rounding)
    np.testing.assert_array_equal(np.asarray(got.CA), CA)
    np.testing.assert_array_equal(bits(got.SCA), bits(SCA))
    np.testing.assert_array_equal(np.asarray(got.outlier_cols), cols)
    if case == "outlier-col" and threshold > 0:
        assert cols[5] and (np.asarray(got.CA)[:, 5] == 0).all()


def test_threshold_is_rounded_to_float16_as_torch_compares():
    """float16(3.3009) == float16(3.3) == 3.30078125: a 3.3 activation is an outlier for 3.3009, not 3.302."""
    x = jnp.asarray([[3.3, 1.0], [0.5, 0.2]], jnp.float32)
    assert quant.quantize_activations(x, 3.3009).outlier_cols.tolist() == [True, False]
    assert quant.quantize_activations(x, 3.302).outlier_cols.tolist() == [False, False]


def test_all_outlier_and_zero_rows_quantize_to_zero():
    x = jnp.asarray([[7.0, 8.0, 9.0], [0.0, 0.0, 0.0], [0.5, 0.25, 1.0]], jnp.float32)
    qa = quant.quantize_activations(x, 6.0)
    assert qa.SCA.tolist() == [0.0, 0.0, 1.0]
    assert qa.CA.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]  # every column holds an outlier
    qa = quant.quantize_activations(x[1:], 0.0)
    assert qa.CA.tolist() == [[0, 0, 0], [64, 32, 127]]


def test_int8_matmul_is_exact_int32():
    rng = np.random.default_rng(0)
    CA = rng.integers(-127, 128, (5, 4096), dtype=np.int8)  # partial sums far beyond 2^24
    CB = rng.integers(-127, 128, (3, 4096), dtype=np.int8)
    CA[0], CB[0] = 127, 127
    got = jax.jit(quant.int8_matmul)(jnp.asarray(CA), jnp.asarray(CB))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), CA.astype(np.int64) @ CB.astype(np.int64).T)
    assert int(got[0, 0]) == 127 * 127 * 4096


RESCALE_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16}


@pytest.mark.parametrize("rounding", quant.ROUNDINGS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dt", list(RESCALE_DTYPES), ids=list(RESCALE_DTYPES))
def test_rescale_bits(dt, bias, rounding):
    dtype = RESCALE_DTYPES[dt]
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**21), 2**21, (7, 9), dtype=np.int32)
    SCA = rng.uniform(0.01, 30, 7).astype(np.float16).astype(F32)
    SCB = rng.uniform(0.01, 0.3, 9).astype(np.float16).astype(F32)
    b = rng.standard_normal(9).astype(dtype) if bias else None
    args = (jnp.asarray(acc), jnp.asarray(SCA), jnp.asarray(SCB), None if b is None else jnp.asarray(b))
    got = jax.jit(quant.rescale_int32, static_argnums=(4, 5))(*args, jnp.dtype(dtype), rounding)
    assert got.dtype == dtype
    np.testing.assert_array_equal(bits(got), bits(ref_rescale(acc, SCA, SCB, b, dtype, rounding)))


# outlier columns: none at threshold 0; one (gathered block); 80 > OUTLIER_CAPACITY (masked dense matmul)
STEP_CASES = {"thr0": (0.0, ()), "thr6-one-col": (6.0, (7,)), "thr6-80-cols": (6.0, tuple(range(3, 83)))}


@pytest.mark.parametrize("rounding", quant.ROUNDINGS)
@pytest.mark.parametrize("case", list(STEP_CASES), ids=list(STEP_CASES))
def test_llm_int8_matmul_equals_its_steps(case, rounding):
    """Steps 1-3 exactly; the outlier columns as the float matmul of those columns (fp32 order)."""
    threshold, outlier_cols = STEP_CASES[case]
    x = activations((2, 5, 128), scale=0.5)
    x[..., list(outlier_cols)] *= F32(40.0)
    q = quant.quantize_int8(jnp.asarray(activations((24, 128), seed=1, scale=0.05)))
    b = jnp.asarray(activations((24,), seed=2))
    y = quant.llm_int8_matmul(jnp.asarray(x), q, b, threshold=threshold, rounding=rounding)
    assert y.shape == (2, 5, 24) and y.dtype == jnp.float32
    x2 = x.reshape(10, 128)
    CA, SCA, cols = ref_quantize(x2, threshold, rounding)
    assert sorted(np.flatnonzero(cols)) == list(outlier_cols)
    acc = CA.astype(np.int64) @ np.asarray(q.CB, np.int64).T
    want = ref_rescale(acc.astype(np.int32), SCA, np.asarray(q.SCB), np.asarray(b), F32, rounding)
    if not outlier_cols:
        np.testing.assert_array_equal(bits(y.reshape(10, 24)), bits(want))
        return
    assert (len(outlier_cols) > OUTLIER_CAPACITY) == (case == "thr6-80-cols")  # the masked dense branch
    w = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    want = want + (x2 * cols).astype(np.float64) @ w.T
    tol = TOL["fp32_forward"]
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(y).reshape(10, 24), want, rtol=tol.rtol, atol=tol.atol * scale)


def test_outlier_mask_keeps_shapes_static():
    """Any number of outlier columns (none, one, beyond the gather capacity, all) runs through one
    compilation."""
    q = quant.quantize_int8(jnp.asarray(activations((8, 96), seed=1, scale=0.05)))
    f = jax.jit(lambda x: quant.llm_int8_matmul(x, q, threshold=6.0))
    f(jnp.asarray(activations((3, 96))))
    with COMPILES.counting() as c:
        for col in (None, 4, slice(0, 70), slice(None)):
            x = activations((3, 96), seed=2)
            if col is not None:
                x[:, col] = 9.0
            f(jnp.asarray(x))
    assert c.count == 0


def test_derivative_is_straight_through():
    """The tangent of x W^T + b with the dequantized W (bnb MatMul8bitLt.backward), for x and bias."""
    q = quant.quantize_int8(jnp.asarray(activations((8, 32), seed=1, scale=0.05)))
    x, b = jnp.asarray(activations((3, 32))), jnp.asarray(activations((8,), seed=2))
    dx, db = jnp.asarray(activations((3, 32), seed=3)), jnp.asarray(activations((8,), seed=4))
    f = jax.jit(lambda x, b: quant.llm_int8_matmul(x, q, b, threshold=6.0))
    _, t = jax.jvp(f, (x, b), (dx, db))
    w = quant.dequantize(q, jnp.float32)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(np.asarray(t), np.asarray(dx @ w.T + db), rtol=tol.rtol, atol=tol.atol)
    g = jax.grad(lambda x: f(x, b).sum())(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.ones((3, 8)) @ w), rtol=tol.rtol, atol=tol.atol)


def test_vmap_decides_outliers_per_mapped_slice():
    q = quant.quantize_int8(jnp.asarray(activations((8, 32), seed=1, scale=0.05)))
    x = activations((2, 3, 32))
    x[0, :, 4] = 9.0  # outlier column in the first slice only
    f = lambda x: quant.llm_int8_matmul(x, q, threshold=6.0)  # noqa: E731
    got = jax.vmap(f)(jnp.asarray(x))
    tol = TOL["fp32_forward"]
    first = np.asarray(f(jnp.asarray(x[0])))
    np.testing.assert_allclose(np.asarray(got[0]), first, rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(f(jnp.asarray(x[1]))))  # int8 only: exact
    pooled = np.asarray(f(jnp.asarray(x))[1])  # unmapped: all 6 rows decide, column 4 is an outlier
    assert not np.array_equal(pooled, np.asarray(got[1]))


def test_rows_left_out_choose_no_outlier_columns():
    """``outlier_rows``: an outlier in a row left out does not make its column an outlier column for the
    rows counted; those rows get what they get alone; every row is still computed."""
    q = quant.quantize_int8(jnp.asarray(activations((8, 32), seed=1, scale=0.05)))
    x = activations((4, 32))
    x[0, 4] = 9.0  # an outlier in the row that will be left out
    rows = np.array([False, True, True, True])
    f = lambda x, **kw: np.asarray(quant.llm_int8_matmul(jnp.asarray(x), q, threshold=6.0, **kw))  # noqa: E731
    got = f(x, outlier_rows=jnp.asarray(rows))
    np.testing.assert_array_equal(got[1:], f(x[1:]))  # int8 only, as alone: exact
    assert not np.array_equal(f(x)[1:], f(x[1:]))  # counted, row 0's outlier changes the others
    assert np.isfinite(got[0]).all()
    # in three dimensions (a [batch, seq] prefill) the same
    x3, rows3 = x.reshape(2, 2, 32), jnp.asarray(rows.reshape(2, 2))
    np.testing.assert_array_equal(f(x3, outlier_rows=rows3).reshape(4, -1), got)
    # all rows counted is the default
    np.testing.assert_array_equal(f(x, outlier_rows=jnp.ones(4, bool)), f(x))


BAD = [
    (
        "outlier-rows",
        lambda q: quant.llm_int8_matmul(jnp.ones((2, 4)), q, outlier_rows=jnp.ones(3, bool)),
        ValueError,
        r"outlier_rows must be bool \(2,\)",
    ),
    (
        "rounding",
        lambda q: quant.llm_int8_matmul(jnp.ones((1, 4)), q, rounding="tpu"),
        ValueError,
        "rounding",
    ),
    ("features", lambda q: quant.llm_int8_matmul(jnp.ones((1, 5)), q), ValueError, "5 features"),
    ("format", lambda q: quant.llm_int8_matmul(jnp.ones((1, 4)), q.CB), TypeError, "Int8Weight"),
    ("rank", lambda q: quant.quantize_activations(jnp.ones(4)), ValueError, r"\[M, K\]"),
    ("int-operands", lambda q: quant.int8_matmul(jnp.ones((1, 4)), q.CB), TypeError, "int8 operands"),
]


@pytest.mark.parametrize("name,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused(name, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(quant.quantize_int8(jnp.eye(4)))
