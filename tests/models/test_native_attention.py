"""The native CPU attention kernels (csrc/attention.cc, jax.ffi) against float64 references and the XLA path.

``Attention`` runs them for unpadded float32 batches on an AVX-512 CPU with head dims 16..128 (multiples of
16); everything else, and GPUs, take the blocked XLA path (tests/models/test_attention_blocks.py). They sum in
another order and compute exp by a polynomial, so comparisons are to float32 rounding
(TOL["native_attention"]); each result is one thread's sums in a fixed order (the same bits every run).
"""

import dataclasses
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax import models
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.models import _native_attention as na
from oftjax.models._llama import Attention
from tests._cpu import has_avx512f, run_without_native
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL

pytestmark = pytest.mark.skipif(
    not na.supports(64, np.float32) and not (sys.platform == "linux" and has_avx512f()),
    reason="no AVX-512 on this machine: attention takes the XLA path (tests/models/test_attention_blocks.py)",
)


def assert_close(got, expected, magnitude=0.0):
    """Within TOL["native_attention"]; atol times max(1, max |expected|, magnitude)."""
    tol = TOL["native_attention"]
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, magnitude, float(np.max(np.abs(expected))) if expected.size else 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol.rtol, atol=tol.atol * scale)


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


def test_the_kernels_are_built_and_loaded():
    # CI must not silently fall back: on Linux x86-64 with AVX-512 (what CI runs) the kernels must run
    info = models.attention_native_info()
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert info["available"], info["reason"]
        assert info["head_dims"] == (list(range(16, 129, 16)) if has_avx512f() else []), info


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
    attend = lambda q, k, v: na.fused_causal_attention(q, k, v, scale, window, cos=cos, sin=sin)  # noqa: E731
    out, vjp = jax.vjp(attend, q, k, v)
    dq, dk, dv = vjp(jnp.asarray(do))
    empty = jnp.zeros((0,), jnp.float32)
    tables = (cos, sin) if with_rope else (empty, empty)
    o, lse = jax.jit(lambda q, k, v: na._forward(q, k, v, *tables, scale, window, with_rope))(q, k, v)
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
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(na.fused_causal_attention(q, k, v, 0.125) * do), (0, 1, 2)))
    first = [np.asarray(a) for a in f(q, k, v)]
    for _ in range(3):
        for a, b in zip(first, f(q, k, v), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


CFG = ModelConfig(**TINY_LLAMA, head_dim=16)


def _loss_and_grad(model, ids, mask=None):
    def loss(m):
        return jnp.sum(jnp.sin(m(ids) if mask is None else m(ids, mask)))

    return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize("window", [None, 24], ids=["causal", "window24"])
def test_model_native_equals_xla_path(monkeypatch, window):
    cfg = dataclasses.replace(CFG, sliding_window=window)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 70), 0, cfg.vocab_size)
    hlo = nnx.jit(lambda m, i: m(i)).lower(model, ids).as_text()
    assert "@oftjax_attention(" in hlo
    v_native, g_native = _loss_and_grad(model, ids)
    monkeypatch.setattr(Attention, "_native", lambda self, dtype: False)
    assert "oftjax_attention" not in nnx.jit(lambda m, i: m(i)).lower(model, ids).as_text()
    v_xla, g_xla = _loss_and_grad(model, ids)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(float(v_native), float(v_xla), rtol=tol.rtol, atol=tol.atol)
    for a, b in zip(jax.tree.leaves(g_native), jax.tree.leaves(g_xla), strict=True):
        assert_close(a, b)


def test_padding_masks_and_bf16_take_the_xla_path():
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 40), jnp.int32)
    mask = jnp.ones((1, 40), bool).at[0, :3].set(False)
    assert "oftjax_attention" not in nnx.jit(lambda m, i, a: m(i, a)).lower(model, ids, mask).as_text()
    bf16 = LlamaForCausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert "oftjax_attention" not in nnx.jit(lambda m, i: m(i)).lower(bf16, ids).as_text()


def test_sharded_batch_on_eight_devices():
    # the custom calls have no partitioning rule: XLA gathers their operands; results as on one device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, do = data(8, 48, 4, 2, 32, seed=5)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(na.fused_causal_attention(q, k, v, 0.2) * do), (0, 1, 2)))
    sharded = f(*(jax.device_put(jnp.asarray(a), shard) for a in (q, k, v)))
    for a, b in zip(sharded, f(q, k, v), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_runs_the_kernel_per_element():
    q, k, v, _ = data(3, 20, 2, 1, 16, seed=6)
    one = lambda q, k, v: na.fused_causal_attention(q[None], k[None], v[None], 0.5)[0]  # noqa: E731
    got = jax.jit(jax.vmap(one))(q, k, v)
    assert_close(got, reference(q, k, v, np.zeros_like(q), 0.5, None)[0])


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
    q, kv = jnp.ones(q_shape, jnp.float32), jnp.ones(kv_shape, jnp.float32)
    b, s, h = (q_shape[0], q_shape[1], q_shape[2]) if len(q_shape) == 4 else (1, 1, 1)
    out = (jax.ShapeDtypeStruct(q_shape, jnp.float32), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    with pytest.raises(Exception, match=message):
        empty = jnp.zeros((0,), jnp.float32)
        call = jax.ffi.ffi_call(na._FORWARD, out)
        with_rope = "cos" in message  # tables of the wrong size
        jax.block_until_ready(call(q, kv, kv, empty, empty, **na._attrs(1.0, None, with_rope)))


def test_disabled_by_environment_falls_back_to_xla():
    code = (
        "import jax, jax.numpy as jnp; from flax import nnx\n"
        "from oftjax import models\n"
        "from oftjax.models import LlamaForCausalLM, ModelConfig\n"
        "info = models.attention_native_info()\n"
        "assert not info['available'] and 'OFTJAX_NATIVE=0' in info['reason'], info\n"
        "cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)\n"
        "m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))\n"
        "hlo = nnx.jit(lambda m, i: m(i)).lower(m, jnp.zeros((1, 8), int)).as_text()\n"
        "assert 'oftjax_attention' not in hlo\n"
    )
    run_without_native(code)
