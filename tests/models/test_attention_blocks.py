"""Causal block attention (no padding mask: keys past a query block are skipped) == the full score matrix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.models._llama import Attention
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
    monkeypatch.setattr(Attention, "causal_blocks", 1)
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
    monkeypatch.setattr(Attention, "causal_blocks", 1)
    np.testing.assert_array_equal(with_blocks, np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask)))
