"""Causal block attention (no padding mask: keys past a query block are skipped) == the full score matrix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax.models import LlamaForCausalLM, ModelConfig, _attention
from tests.tolerances import TOL

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _loss_and_grad(model, ids):
    def loss(m):
        return jnp.sum(jnp.sin(m(ids)))

    return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize("window", [None, 40], ids=["causal", "window40"])
@pytest.mark.parametrize("seq", [64, 100], ids=["seq64", "seq100"])
def test_blocks_equal_full_matrix(monkeypatch, window, seq):
    cfg = dataclasses.replace(CFG, sliding_window=window)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, seq), 0, cfg.vocab_size)
    v_blocks, g_blocks = _loss_and_grad(model, ids)
    monkeypatch.setattr(_attention, "CAUSAL_BLOCKS", 1)
    v_full, g_full = _loss_and_grad(model, ids)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(float(v_blocks), float(v_full), rtol=tol.rtol, atol=tol.atol)
    tol = TOL["fp32_grad"]
    for a, b in zip(jax.tree.leaves(g_blocks), jax.tree.leaves(g_full), strict=True):
        # relative to the largest entry: summation order moves near-zero entries by ~1 ulp of the largest
        s = max(float(jnp.max(jnp.abs(b))), 1e-30)
        np.testing.assert_allclose(np.asarray(a) / s, np.asarray(b) / s, rtol=tol.rtol, atol=tol.atol)


def test_padding_mask_keeps_the_full_matrix(monkeypatch):
    """With a padding mask a fully masked query row is uniform over all keys (as HF), so no blocks."""
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (1, 64), 0, CFG.vocab_size)
    mask = jnp.ones((1, 64), bool).at[0, :4].set(False)  # left padding: rows 0..3 see no key
    run = nnx.jit(lambda m, i, a: m(i, a))
    with_blocks = np.asarray(run(model, ids, mask))
    monkeypatch.setattr(_attention, "CAUSAL_BLOCKS", 1)
    np.testing.assert_array_equal(with_blocks, np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask)))


def _reference(q, k, v, scale, window):
    """The full masked score matrix, projections layout [b, s, heads, d], HF's eager formulas."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    qi, ki = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = ki <= qi
    if window is not None:
        allowed &= ki > qi - window
    k_rep = jnp.repeat(k, h // kv, axis=2)
    v_rep = jnp.repeat(v, h // kv, axis=2)
    scores = jnp.einsum("bqhd,bthd->bhqt", q, k_rep) * jnp.asarray(scale, q.dtype)
    scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqt,bthd->bqhd", probs, v_rep)


@pytest.mark.parametrize("blocks", [1, 3], ids=["blocks1", "blocks3"])
@pytest.mark.parametrize("window", [None, 20], ids=["causal", "window20"])
@pytest.mark.parametrize("scale", [0.125, 0.3], ids=["power-of-two", "scale0.3"])
def test_causal_attention_matches_the_full_matrix(monkeypatch, blocks, window, scale):
    monkeypatch.setattr(_attention, "CAUSAL_BLOCKS", blocks)
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (2, 64, 6, 8))
    k = jax.random.normal(keys[1], (2, 64, 2, 8))
    v = jax.random.normal(keys[2], (2, 64, 2, 8))
    ct = jax.random.normal(keys[3], q.shape)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))

    ours = lambda q, k, v: _attention.causal_attention(q, k, v, None, None, scale=scale, window=window)  # noqa: E731
    v_ours, g_ours = loss(ours)(q, k, v)
    v_ref, g_ref = loss(lambda q, k, v: _reference(q, k, v, scale, window))(q, k, v)
    tol = TOL["fp32_forward"]
    np.testing.assert_allclose(float(v_ours), float(v_ref), rtol=tol.rtol, atol=tol.atol)
    tol = TOL["fp32_grad"]
    for name, a, b in zip("qkv", g_ours, g_ref, strict=True):
        s = max(float(jnp.max(jnp.abs(b))), 1e-30)
        np.testing.assert_allclose(
            np.asarray(a) / s, np.asarray(b) / s, rtol=tol.rtol, atol=tol.atol, err_msg=name
        )


def test_causal_attention_bf16_close_to_fp32():
    """bf16 inputs: scores and softmax stay fp32; the gradients track the fp32 ones to bf16 precision."""
    keys = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(keys[0], (1, 64, 4, 16))
    k = jax.random.normal(keys[1], (1, 64, 2, 16))
    v = jax.random.normal(keys[2], (1, 64, 2, 16))
    ct = jax.random.normal(keys[3], q.shape)

    def grads(dtype):
        def f(q, k, v):
            out = _attention.causal_attention(q, k, v, None, None, scale=0.25)
            return jnp.sum(out.astype(jnp.float32) * ct)

        cast = [x.astype(dtype) for x in (q, k, v)]
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*cast)

    tol = TOL["attention_grad_bf16"]
    for a, b in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
        assert a.dtype == jnp.bfloat16
        s = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(
            np.asarray(a, np.float32) / s, np.asarray(b) / s, rtol=tol.rtol, atol=tol.atol
        )
