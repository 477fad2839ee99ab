"""The NNX Llama-family model alone (no torch): names, masks, GQA, padding, jit, remat, dtypes, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from oftjax.models import (
    AXIS_DATA,
    AXIS_FSDP,
    LlamaForCausalLM,
    ModelConfig,
    RopeConfig,
    causal_mask,
    segment_mask,
)
from oftjax.models._layers import swiglu
from oftjax.models._rope import inv_freq
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL

CFG = ModelConfig(**TINY_LLAMA, head_dim=16)


def ids(batch=2, seq=9, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, CFG.vocab_size)


def make(cfg, seed, **kw):
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed), **kw)


@nnx.jit
def run(m, x, mask=None, positions=None):
    # jitted: eager op-by-op dispatch compiles every op per shape, which is slower on a busy CPU
    return m(x, mask, positions)


def close(a, b, tol):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol.rtol, atol=tol.atol
    )


@pytest.fixture(scope="module")
def model():
    return make(CFG, 0)


def paths(m):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def test_module_paths_are_hf_names(model):
    got = paths(model)
    for name in [
        "model.embed_tokens.embedding",
        "model.layers.0.self_attn.q_proj.kernel",
        "model.layers.1.self_attn.o_proj.kernel",
        "model.layers.1.mlp.gate_proj.kernel",
        "model.layers.0.mlp.down_proj.kernel",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.kernel",
    ]:
        assert name in got
    assert len(got) == 1 + 2 * 9 + 1 + 1
    assert model.model.layers[0].self_attn.k_proj.kernel.shape == (64, 32)  # [in, out]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_qwen2_style_bias_and_tied_head(tied):
    cfg = dataclasses.replace(CFG, model_type="qwen2", qkv_bias=True, tie_word_embeddings=tied)
    m = make(cfg, 1)
    got = paths(m)
    assert ("lm_head.kernel" in got) != tied and m.lm_head is None if tied else m.lm_head is not None
    assert "model.layers.0.self_attn.q_proj.bias" in got and "model.layers.0.self_attn.o_proj.bias" not in got
    assert run(m, ids()).shape == (2, 9, 128)


def test_mask_causal_window_padding():
    m = np.asarray(causal_mask(5, jnp.array([[0, 1, 1, 1, 1]]), window=2))[0]
    want = np.array(
        [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=bool
    )
    np.testing.assert_array_equal(m, want)
    np.testing.assert_array_equal(np.asarray(causal_mask(3, None, None))[0], np.tril(np.ones((3, 3), bool)))


def test_sliding_window_limits_what_a_token_sees():
    cfg = dataclasses.replace(CFG, model_type="mistral", num_hidden_layers=1, sliding_window=3)
    m = make(cfg, 2)
    x = ids(1, 8)
    y = x.at[0, 2].set((x[0, 2] + 1) % 128)  # token 2 is outside the window of positions >= 5
    a, b = run(m, x), run(m, y)
    np.testing.assert_array_equal(np.asarray(a[0, 5:]), np.asarray(b[0, 5:]))
    assert not np.allclose(np.asarray(a[0, 2:5]), np.asarray(b[0, 2:5]))


def test_gqa_equals_mha_with_repeated_kv_heads(model):
    """Query head h reads kv head h // groups (transformers' repeat_kv)."""
    mha = make(dataclasses.replace(CFG, num_key_value_heads=4), 9)
    _copy_state_except_kv(model, mha)
    for src, dst in zip(model.model.layers, mha.model.layers, strict=True):
        for name in ("k_proj", "v_proj"):
            k = getattr(src.self_attn, name).kernel[...].reshape(64, 2, 1, 16)
            getattr(dst.self_attn, name).kernel[...] = jnp.repeat(k, 2, axis=2).reshape(64, 64)
    close(run(model, ids()), run(mha, ids()), TOL["fp32_forward"])


def _copy_state_except_kv(src, dst):
    flat = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(dst, nnx.Param)):
        if path[-2] not in ("k_proj", "v_proj"):
            var.set_value(flat[path][...])


def test_right_padding_does_not_change_the_prefix(model):
    x = ids(1, 6)
    padded = jnp.concatenate([x, jnp.zeros((1, 3), x.dtype)], axis=1)
    mask = jnp.array([[1] * 6 + [0] * 3])
    close(run(model, padded, mask)[:, :6], run(model, x), TOL["fp32_forward"])


def test_left_padding_masks_the_pad_keys(model):
    x = ids(1, 6)
    pad = jnp.concatenate([jnp.full((1, 3), 5, x.dtype), x], axis=1)
    other = jnp.concatenate([jnp.full((1, 3), 7, x.dtype), x], axis=1)
    mask = jnp.array([[0] * 3 + [1] * 6])
    np.testing.assert_array_equal(
        np.asarray(run(model, pad, mask)[:, 3:]), np.asarray(run(model, other, mask)[:, 3:])
    )


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window3"])
def test_packed_examples_equal_each_run_alone(window):
    """Two examples in one row, a [b, s, s] segment mask and positions restarting per example: every token's
    logits equal those of its example run alone (and the window still applies within an example)."""
    cfg = dataclasses.replace(CFG, model_type="mistral", sliding_window=window)
    m = make(cfg, 3)
    a, b = ids(1, 5, seed=1), ids(1, 4, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[0] * 5 + [1] * 4])
    positions = jnp.array([list(range(5)) + list(range(4))])
    got = run(m, packed, segment_mask(segments), positions)
    close(got[:, :5], run(m, a), TOL["fp32_forward"])
    close(got[:, 5:], run(m, b), TOL["fp32_forward"])
    whole = run(m, packed)  # without the mask the second example sees the first
    assert not np.allclose(np.asarray(whole[:, 5:]), np.asarray(got[:, 5:]))


def test_full_mask_combines_with_causal_and_window():
    allowed = jnp.ones((1, 4, 4), bool).at[0, 3, 1].set(False)
    m = np.asarray(causal_mask(4, allowed, window=3))[0]
    want = np.tril(np.ones((4, 4), bool)) & ~np.tril(np.ones((4, 4), bool), -3)
    want[3, 1] = False
    np.testing.assert_array_equal(m, want)


def test_attention_mask_of_another_shape_is_refused(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 9, 8\)"):
        model(ids(), jnp.ones((2, 9, 8), bool))


def test_positions_default_and_shift(model):
    x = ids()
    np.testing.assert_array_equal(
        np.asarray(run(model, x)), np.asarray(run(model, x, positions=jnp.arange(9)))
    )
    assert not np.allclose(np.asarray(run(model, x)), np.asarray(run(model, x, positions=jnp.arange(9) + 3)))


def test_jitted_forward_compiles_once(model):
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, x, mask: nnx.merge(graph, state)(x, mask))
    x, mask = ids(), jnp.ones((2, 9), jnp.int32)
    close(forward(state, x, mask), run(model, x, mask), TOL["fp32_forward"])
    forward(state, ids(seed=3), mask)
    assert forward._cache_size() == 1


def test_remat_same_logits_and_grads():
    one = dataclasses.replace(CFG, num_hidden_layers=1)  # compile time: one layer shows the same thing
    plain = make(one, 4)
    remat = make(one, 4, remat=True)

    def loss(m, x):
        return jnp.mean(m(x).astype(jnp.float32) ** 2)

    x = ids()
    g1 = nnx.jit(nnx.grad(loss))(plain, x)
    g2 = nnx.jit(nnx.grad(loss))(remat, x)
    for (_, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2), strict=True):
        close(a[...], b[...], TOL["fp32_grad"])


def test_bf16_compute_fp32_params():
    m = make(CFG, 5, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ref = make(CFG, 5)
    out = run(m, ids())
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
    close(out, run(ref, ids()), TOL["bf16_model_forward"])


def test_inv_freq_closed_form():
    want = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(inv_freq(CFG), want, rtol=1e-6)
    linear = dataclasses.replace(CFG, rope=RopeConfig("linear", factor=4.0))
    np.testing.assert_allclose(inv_freq(linear), want / 4, rtol=1e-6)


def test_every_param_has_fsdp_partitioning_and_shards_on_a_mesh(model):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    flat = dict(nnx.to_flat_state(specs))
    assert flat[("model", "layers", 0, "mlp", "up_proj", "kernel")].get_value() == jax.sharding.PartitionSpec(
        AXIS_FSDP, None
    )
    assert flat[("model", "norm", "weight")].get_value() == jax.sharding.PartitionSpec(None)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), (AXIS_DATA, AXIS_FSDP))
    graph, state = nnx.split(model)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.get_partition_spec(state))
    sharded = nnx.merge(graph, jax.device_put(state, shardings))
    x = jax.device_put(ids(), NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_DATA)))
    close(run(sharded, x), run(model, ids()), TOL["fp32_forward"])


def test_swiglu_values_and_gradients_match_float64_and_autodiff():
    """The hand-written backward is torch's silu_backward: against a float64 evaluation and plain autodiff."""
    rng = np.random.default_rng(0)
    gate, up, g = (rng.standard_normal((64, 96)).astype(np.float32) * 4 for _ in range(3))
    gate[0, :4] = [0.0, -90.0, 90.0, -1e-30]  # zero, saturated sigmoid both ways, a subnormal-sized input
    y, vjp = jax.vjp(swiglu, gate, up)
    dgate, dup = vjp(jnp.asarray(g))
    x, u, c = (a.astype(np.float64) for a in (gate, up, g))
    s = 1 / (1 + np.exp(-x))
    tol = TOL["swiglu"]
    close(y, x * s * u, tol)
    close(dgate, c * u * s * (1 + x * (1 - s)), tol)
    close(dup, c * x * s, tol)
    auto = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)[1](jnp.asarray(g))
    close(dgate, auto[0], tol)
    close(dup, auto[1], tol)
    assert all(np.isfinite(np.asarray(t)).all() for t in (y, dgate, dup))
