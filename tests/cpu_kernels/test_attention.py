"""The CPU attention kernels (csrc/attention.cc) against float64 references and the pure-JAX default.

With ``oftjax.cpu_kernels`` enabled, ``causal_attention`` (unpadded batches) runs them for float32 q/k/v on an
AVX-512 CPU with head dims 16..128 (multiples of 16); everything else, and GPUs, keep the blocked pure-JAX
default (tests/models/test_attention_blocks.py). They sum in another order and compute exp by a polynomial,
so comparisons are to float32 rounding (TOL["native_attention"]); each result is one thread's sums in a fixed
order (the same bits every run).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax import cpu_kernels
from oftjax.cpu_kernels import _attention
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.models._attention import causal_attention
from tests._cpu import has_avx512f
from tests._tiny import TINY_LLAMA
from tests.cpu_kernels._helpers import (
    BUILT_HERE,
    assert_scaled_close,
    lowered,
    require_loaded,
    skip_without_avx512,
)
from tests.tolerances import TOL

HEAD_DIMS = list(range(16, 129, 16))
CFG = ModelConfig(**TINY_LLAMA, head_dim=16)

pytestmark = skip_without_avx512(_attention.supports(64, np.float32), "tests/models/test_attention_blocks.py")


@pytest.fixture(autouse=True)
def _loaded():
    require_loaded(_attention.LIBRARY)


def assert_close(got, expected, magnitude=0.0):
    """Within TOL["native_attention"]; atol times max(1, max |expected|, magnitude)."""
    assert_scaled_close(got, expected, "native_attention", magnitude)


def rope(x, cos, sin):
    """HF's apply_rotary_pos_emb in float64: x * cos + rotate_half(x) * sin, tables [b, s, d]."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def rope_transpose(g, cos, sin):
    half = g.shape[-1] // 2
    gs = g * sin[:, :, None]
    return g * cos[:, :, None] + np.concatenate([gs[..., half:], -gs[..., :half]], axis=-1)


def reference(q, k, v, do, scale, window, cos=None, sin=None):
    """Output, log-sum-exp and gradients in float64 (the textbook softmax-attention backward)."""
    q, k, v, do = (np.asarray(a, np.float64) for a in (q, k, v, do))
    if cos is not None:
        cos, sin = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    _, s, h, _ = q.shape
    groups = h // k.shape[2]
    kk, vv = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    sc = np.where(allowed, np.einsum("bihd,bjhd->bhij", q, kk) * scale, -np.inf)
    m = sc.max(-1, keepdims=True)
    e = np.exp(sc - m)
    lse = (m + np.log(e.sum(-1, keepdims=True)))[..., 0]
    p = e / e.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", p, vv)
    dp = np.einsum("bihd,bjhd->bhij", do, vv)
    ds = p * (dp - np.einsum("bihd,bihd->bhi", do, o)[..., None]) * scale
    dq = np.einsum("bhij,bjhd->bihd", ds, kk)
    dk = np.einsum("bhij,bihd->bjhd", ds, q)
    dv = np.einsum("bhij,bihd->bjhd", p, do)
    fold = lambda x: x.reshape(*x.shape[:2], k.shape[2], groups, x.shape[-1]).sum(3)  # noqa: E731
    dk = fold(dk)
    if cos is not None:
        dq, dk = rope_transpose(dq, cos, sin), rope_transpose(dk, cos, sin)
    return o, lse, dq, dk, fold(dv)


def data(b, s, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kv, d)).astype(np.float32) for _ in range(2))
    do = rng.standard_normal((b, s, h, d)).astype(np.float32)
    return q, k, v, do


def attend(q, k, v, scale, window=None, cos=None, sin=None):
    return causal_attention(q, k, v, cos, sin, scale=scale, window=window)


def test_the_kernels_are_built_and_loaded():
    # CI must not silently fall back: on Linux x86-64 with AVX-512 (what CI runs) the kernels must run
    info = cpu_kernels.info()["attention"]
    if BUILT_HERE:
        assert info["available"], info["reason"]
        assert info["head_dims"] == (HEAD_DIMS if has_avx512f() else []), info
    # enabled, causal_attention lowers to them for float32 and those head dims only
    for d in (8, 16, 24, 64, 128, 144):
        q, k, v, _ = data(1, 8, 2, 1, d)
        grad = jax.grad(lambda q, k, v: attend(q, k, v, 0.5).sum(), (0, 1, 2))
        with cpu_kernels.enable():
            fwd, bwd = lowered(lambda q, k, v: attend(q, k, v, 0.5), q, k, v), lowered(grad, q, k, v)
        runs = d in HEAD_DIMS
        assert ("@oftjax_attention(" in fwd and "@oftjax_attention_grad(" in bwd) == runs, d


def test_disabled_by_default_no_kernel_is_called():
    assert not cpu_kernels.enabled()
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    hlo = nnx.jit(lambda m, i: m(i)).lower(model, jnp.zeros((1, 8), jnp.int32)).as_text()
    assert "oftjax_" not in hlo
    q, k, v, _ = data(1, 8, 2, 1, 16)
    assert "oftjax_" not in lowered(jax.grad(lambda q, k, v: attend(q, k, v, 0.5).sum(), (0, 1, 2)), q, k, v)


@pytest.mark.parametrize(
    "b,s,h,kv,d,window",
    [
        (2, 37, 4, 2, 64, None),  # ragged last query tile, GQA 2
        (1, 256, 8, 4, 64, None),  # the train benchmark's shape (batch 1)
        (2, 100, 6, 3, 32, None),
        (1, 130, 2, 1, 128, None),  # head dim 128 (2-row micro-kernels), one kv head
        (1, 200, 4, 4, 16, 50),  # sliding window, no grouping
        (1, 70, 2, 2, 48, 1),  # window 1: each row sees only itself
        (1, 1, 2, 1, 64, None),  # one token
        (2, 65, 4, 1, 96, 17),
        (1, 300, 2, 2, 80, 200),  # window wider than a key step, tiles past it
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("with_rope", [False, True], ids=["plain", "rope"])
def test_forward_and_gradients_match_float64(b, s, h, kv, d, window, with_rope):
    q, k, v, do = data(b, s, h, kv, d, seed=s + d)
    scale = d**-0.5
    cos = sin = None
    if with_rope:  # llama's tables for positions 3.. (any offsets work: the tables are inputs)
        inv = 10000.0 ** (-np.arange(0, d, 2) / d)
        ang = (np.arange(s)[:, None] + 3 + np.arange(b)[:, None, None]) * np.concatenate([inv, inv])
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    f = lambda q, k, v: attend(q, k, v, scale, window, cos, sin)  # noqa: E731
    with cpu_kernels.enable():
        assert "@oftjax_attention_grad(" in lowered(lambda *a: jax.vjp(f, *a)[1](jnp.asarray(do)), q, k, v)
        out, vjp = jax.vjp(f, q, k, v)
        dq, dk, dv = vjp(jnp.asarray(do))
    empty = jnp.zeros((0,), jnp.float32)
    tables = (cos, sin) if with_rope else (empty, empty)
    kernel = jax.jit(lambda *a: _attention._cpu(*a, scale=scale, window=window, rope=with_rope))
    o, lse = kernel(q, k, v, *tables)
    ro, rlse, rdq, rdk, rdv = reference(q, k, v, do, scale, window, cos, sin)
    for got, expected in ((o, ro), (out, ro), (lse, rlse)):
        assert got.shape == expected.shape
        assert_close(got, expected)
    # the three gradients are sums of the same products: an entry that cancels to ~0 (window 1: dq, dk are
    # exactly 0) keeps rounding errors of the size of the largest gradient
    magnitude = max(float(np.max(np.abs(a))) for a in (rdq, rdk, rdv))
    for got, expected in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert got.shape == expected.shape
        assert_close(got, expected, magnitude)


def test_results_are_deterministic():
    q, k, v, do = data(2, 160, 8, 2, 64, seed=3)
    with cpu_kernels.enable():
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, 0.125) * do), (0, 1, 2)))
        assert "@oftjax_attention_grad(" in f.lower(q, k, v).as_text()
        first = [np.asarray(a) for a in f(q, k, v)]
        for _ in range(3):
            for a, b in zip(first, f(q, k, v), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))


def _loss_and_grad(model, ids, mask=None):
    def loss(m):
        return jnp.sum(jnp.sin(m(ids) if mask is None else m(ids, mask)))

    return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize("window", [None, 24], ids=["causal", "window24"])
def test_model_with_kernels_equals_the_default(window):
    cfg = dataclasses.replace(CFG, sliding_window=window)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 70), 0, cfg.vocab_size)
    with cpu_kernels.enable():
        assert "@oftjax_attention(" in nnx.jit(lambda m, i: m(i)).lower(model, ids).as_text()
        v_kernels, g_kernels = _loss_and_grad(model, ids)
    assert "oftjax_attention" not in nnx.jit(lambda m, i: m(i)).lower(model, ids).as_text()
    v_default, g_default = _loss_and_grad(model, ids)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(float(v_kernels), float(v_default), rtol=tol.rtol, atol=tol.atol)
    for a, b in zip(jax.tree.leaves(g_kernels), jax.tree.leaves(g_default), strict=True):
        assert_close(a, b)


def test_padding_masks_and_bf16_keep_the_default():
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 40), jnp.int32)
    mask = jnp.ones((1, 40), bool).at[0, :3].set(False)
    bf16 = LlamaForCausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with cpu_kernels.enable():
        assert "@oftjax_attention(" in nnx.jit(lambda m, i: m(i)).lower(model, ids).as_text()
        assert "oftjax_attention" not in nnx.jit(lambda m, i, a: m(i, a)).lower(model, ids, mask).as_text()
        assert "oftjax_attention" not in nnx.jit(lambda m, i: m(i)).lower(bf16, ids).as_text()


def test_sharded_batch_on_eight_devices():
    # the custom calls have no partitioning rule: XLA gathers their operands; results as on one device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, do = data(8, 48, 4, 2, 32, seed=5)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    qkv = [jax.device_put(jnp.asarray(a), shard) for a in (q, k, v)]
    with cpu_kernels.enable():
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, 0.2) * do), (0, 1, 2)))
        assert "@oftjax_attention_grad(" in f.lower(*qkv).as_text()
        for a, b in zip(f(*qkv), f(q, k, v), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_under_enable_gives_the_default_values():
    # the batching rule vectorizes the pure-JAX formulation: the values of the default
    q, k, v, _ = data(3, 20, 2, 1, 16, seed=6)
    one = jax.jit(jax.vmap(lambda q, k, v: attend(q[None], k[None], v[None], 0.5)[0]))
    expected = one(q, k, v)
    with cpu_kernels.enable():
        got = one(q, k, v)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert_close(got, reference(q, k, v, np.zeros_like(q), 0.5, None)[0])


def _outcome(f, *args):
    """The result, or the error's type and message."""
    try:
        return np.asarray(jax.jit(f)(*args))
    except Exception as e:  # noqa: BLE001 - the outcome compared, whatever it is
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("window", [0, -1])
def test_a_window_below_one_gives_the_defaults_outcome(window):
    # a replacement returns the default's result or NotImplemented, for every argument the default takes
    q, k, v, _ = data(1, 8, 2, 1, 16, seed=7)
    f = lambda q, k, v: attend(q, k, v, 0.25, window)  # noqa: E731
    expected = _outcome(f, q, k, v)
    with cpu_kernels.enable():
        got = _outcome(f, q, k, v)
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert_close(got, expected)


@pytest.mark.parametrize(
    "q_shape,kv_shape,message",
    [
        ((1, 8, 2, 8), (1, 8, 1, 8), "head dim 8 needs AVX-512 and a multiple of 16 up to 128"),
        ((1, 8, 3, 16), (1, 8, 2, 16), "query heads \\(3\\) must be a multiple of the kv heads \\(2\\)"),
        ((1, 8, 2, 16), (1, 9, 1, 16), "must agree on batch, sequence and head dim"),
        ((8, 2, 16), (8, 1, 16), "q must be \\[B, S, H, D\\]"),
        ((1, 8, 2, 16), (1, 8, 1, 16), "cos and sin must be \\[B, S, D\\] = 128 values"),
    ],
    ids=["head-dim", "groups", "seq", "rank", "rope-tables"],
)
def test_kernel_rejects_inconsistent_operands(q_shape, kv_shape, message):
    # causal_attention routes only supported operands here; the kernel checks again, not to read out of
    # bounds. The FFI target is called by name: _attention._cpu reads [B, S, H, D] from q in Python.
    q, kv = jnp.ones(q_shape, jnp.float32), jnp.ones(kv_shape, jnp.float32)
    b, s, h = (q_shape[0], q_shape[1], q_shape[2]) if len(q_shape) == 4 else (1, 1, 1)
    out = (jax.ShapeDtypeStruct(q_shape, jnp.float32), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    empty = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(_attention._FORWARD, out)
    with_rope = "cos" in message  # tables of the wrong size
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(call(q, kv, kv, empty, empty, **_attention._attrs(1.0, None, with_rope)))
