"""The family pieces of the NNX decoder alone (no torch): module names, fused = split projections, Gemma's
norm and embedding, soft-capped attention, what the attention kernel is asked to compute, LongRoPE's switch,
and the memory of a 262,144-row vocabulary (the compiled forward and train step hold at most one float copy
of the embedding table)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from interop.hf_model import load_model, save_model
from oftjax import OFTConfig, _registry, apply_oft
from oftjax.models import CausalLM, ModelConfig, RopeConfig, _attention, linear_modules, norm_modules
from oftjax.models._rope import rope_cos_sin
from oftjax.nn import OFTParam
from tests.models._family_configs import GEMMA_3_270M, two_layers
from tests.tolerances import TOL

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def config(model_type: str, **kw) -> ModelConfig:
    return ModelConfig.from_hf(
        {"model_type": model_type, **BASE, "num_key_value_heads": 2, "head_dim": 16, **kw}
    )


def ids(batch=2, seq=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, BASE["vocab_size"])


@nnx.jit
def run(m, x, mask=None, positions=None):
    return m(x, mask, positions)


def close(a, b, tol=TOL["fp32_forward"]):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol.rtol, atol=tol.atol
    )


def paths(m) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_module_paths_are_the_hf_names_listed_by_the_config(model_type):
    cfg = config(model_type, sliding_window=4)
    got = paths(CausalLM(cfg, rngs=nnx.Rngs(0)))
    want = {f"{p}.weight" for p in norm_modules(cfg)} | {"model.embed_tokens.embedding"}
    for path, bias in linear_modules(cfg):
        want |= {f"{path}.kernel"} | ({f"{path}.bias"} if bias else set())
    assert got == want
    layer0 = "model.layers.0."
    has = {
        "qwen3": [layer0 + "self_attn.q_norm.weight", layer0 + "self_attn.k_proj.kernel"],
        "gemma2": [layer0 + "pre_feedforward_layernorm.weight", layer0 + "post_feedforward_layernorm.weight"],
        "gemma3_text": [layer0 + "self_attn.k_norm.weight", layer0 + "pre_feedforward_layernorm.weight"],
        "phi3": [layer0 + "self_attn.qkv_proj.kernel", layer0 + "mlp.gate_up_proj.kernel", "lm_head.kernel"],
    }[model_type]
    assert set(has) <= got


def test_phi3_fused_projections_equal_split_ones():
    """qkv_proj rows are q, k, v; gate_up_proj rows are gate, up: the same model as separate projections."""
    phi = CausalLM(config("phi3", sliding_window=5, rms_norm_eps=1e-5), rngs=nnx.Rngs(0))
    split = CausalLM(config("mistral", sliding_window=5, rms_norm_eps=1e-5), rngs=nnx.Rngs(1))
    split.model.embed_tokens.embedding[...] = phi.model.embed_tokens.embedding[...]
    split.lm_head.kernel[...] = phi.lm_head.kernel[...]
    for a, b in zip(phi.model.layers, split.model.layers, strict=True):
        q, k, v = jnp.split(a.self_attn.qkv_proj.kernel[...], [64, 96], axis=1)
        b.self_attn.q_proj.kernel[...], b.self_attn.k_proj.kernel[...], b.self_attn.v_proj.kernel[...] = (
            q,
            k,
            v,
        )
        b.self_attn.o_proj.kernel[...] = a.self_attn.o_proj.kernel[...]
        gate, up = jnp.split(a.mlp.gate_up_proj.kernel[...], 2, axis=1)
        b.mlp.gate_proj.kernel[...], b.mlp.up_proj.kernel[...] = gate, up
        b.mlp.down_proj.kernel[...] = a.mlp.down_proj.kernel[...]
    close(run(phi, ids()), run(split, ids()))


def test_gemma_rmsnorm_multiplies_by_one_plus_weight_in_float32():
    cfg = config("gemma2")
    m = CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    norm = m.model.norm
    assert np.all(np.asarray(norm.weight[...]) == 0)  # the identity, as transformers initializes it
    norm.weight[...] = jnp.linspace(-0.5, 0.5, 64)
    x = jax.random.normal(jax.random.key(0), (3, 64)).astype(jnp.bfloat16)
    x32 = np.asarray(x, np.float64)
    want = (
        x32
        / np.sqrt(np.mean(x32**2, -1, keepdims=True) + cfg.rms_norm_eps)
        * (1 + np.linspace(-0.5, 0.5, 64))
    )
    got = norm(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8)


def test_gemma_embedding_is_scaled_by_sqrt_hidden_rounded_to_the_compute_dtype():
    m = CausalLM(config("gemma2"), rngs=nnx.Rngs(0))
    table = np.asarray(m.model.embed_tokens.embedding[...])
    x = ids(1, 5)
    np.testing.assert_array_equal(np.asarray(m.model.embed_tokens(x)), table[np.asarray(x)] * np.float32(8.0))
    g3 = CausalLM(config("gemma3_text", hidden_size=48), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    scale = jnp.asarray(np.float32(48**0.5), jnp.bfloat16)  # 6.9282 -> 6.9375 in bf16
    rows = g3.model.embed_tokens.embedding[...][np.asarray(x)].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(g3.model.embed_tokens(x)), np.asarray(rows * scale))


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window3"])
def test_softcapped_attention_blocks_equal_the_masked_full_matrix(window, monkeypatch):
    cfg = config(
        "gemma2", attn_logit_softcapping=0.5, final_logit_softcapping=3.0, sliding_window=window or 99
    )
    if window is None:
        cfg = dataclasses.replace(cfg, layer_types=("full_attention",) * 2)
    m = CausalLM(cfg, rngs=nnx.Rngs(0))
    x = ids(2, 40)
    monkeypatch.setattr(_attention, "CAUSAL_BLOCKS", 4)
    blocked = run(m, x)
    close(blocked, run(m, x, jnp.ones((2, 40), bool)))  # the masked path: full matrix, same softcap
    uncapped = CausalLM(dataclasses.replace(cfg, attn_logit_softcapping=None), rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(blocked), np.asarray(run(uncapped, x)))  # the cap binds at 0.5
    assert float(jnp.max(jnp.abs(blocked))) <= 3.0  # the final cap


def test_attention_kernel_is_asked_only_for_plain_attention():
    """The named operation ``causal_attention`` (which a CPU kernel may replace) is called for Gemma 3 (q/k
    norms applied before it, query_pre_attn_scalar as its scale), never for Gemma 2's soft-capped layers."""
    calls = []

    def spy(q, k, v, cos, sin, *, scale, window=None):
        calls.append((q.shape[-1], scale, window))
        return NotImplemented  # the default computes it

    previous = _registry.install({"causal_attention": spy})
    jax.clear_caches()
    try:
        CausalLM(config("gemma2", sliding_window=4), rngs=nnx.Rngs(0))(ids())
        assert calls == []
        g3 = config(
            "gemma3_text",
            sliding_window=4,
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "full_attention"],
        )
        CausalLM(g3, rngs=nnx.Rngs(0))(ids())
        assert calls == [(16, 32**-0.5, 4), (16, 32**-0.5, None)]
    finally:
        _registry.install(previous, replace=True)
        jax.clear_caches()


def test_longrope_switches_to_long_factors_past_the_original_length():
    rope = RopeConfig(
        "longrope", short_factor=[1.0] * 8, long_factor=[4.0] * 8, original_max_position_embeddings=32
    )
    cfg = dataclasses.replace(config("phi3"), rope=rope, max_position_embeddings=128)
    scale = np.float32(np.sqrt(1 + np.log(4) / np.log(32)))
    short, _ = rope_cos_sin(cfg, jnp.arange(32)[None], jnp.float32)  # max position 31: short
    long, _ = rope_cos_sin(
        cfg, jnp.arange(33)[None], jnp.float32
    )  # max position 32: long, for every position
    default = dataclasses.replace(cfg, rope=RopeConfig())
    plain, _ = rope_cos_sin(default, jnp.arange(33)[None], jnp.float32)
    np.testing.assert_allclose(np.asarray(short), np.asarray(plain[:, :32]) * scale, rtol=1e-6)
    assert not np.allclose(np.asarray(long[:, :32]), np.asarray(short))


def test_gemma3_sliding_and_global_layers_rotate_with_their_own_rope():
    cfg = config("gemma3_text", sliding_window=4)
    positions = jnp.arange(8)[None] + 1000
    local, _ = rope_cos_sin(cfg, positions, jnp.float32, "sliding_attention")
    glob, _ = rope_cos_sin(cfg, positions, jnp.float32, "full_attention")
    freq = 1 / 10000.0 ** (np.arange(0, 16, 2) / 16), 1 / 1e6 ** (np.arange(0, 16, 2) / 16)
    for got, f in zip((local, glob), freq, strict=True):
        np.testing.assert_allclose(
            np.asarray(got)[0, :, :8], np.cos(np.asarray(positions)[0, :, None] * f), atol=2e-4
        )


# ----------------------------------------------------------------------------------------------------------
# the embedding table of a 262,144-row vocabulary (Gemma 3): never widened, one float copy at most


def _gemma3(dtype, embed_dtype, oft: bool = False):
    cfg = ModelConfig.from_hf(two_layers(GEMMA_3_270M))

    def build():
        m = CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32, embed_dtype=embed_dtype)
        if oft:
            apply_oft(
                m, OFTConfig(r=0, oft_block_size=32, target_modules=["q_proj", "v_proj"]), rngs=nnx.Rngs(1)
            )
        return m

    return cfg, nnx.eval_shape(build)  # abstract: shapes and dtypes only, nothing allocated


def _table_copies(compiled, cfg) -> float:
    """Temporary bytes of a compiled function in units of one float32 embedding table."""
    return compiled.memory_analysis().temp_size_in_bytes / (cfg.vocab_size * cfg.hidden_size * 4)


@pytest.mark.parametrize("embed_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16-table", "f32-table"])
def test_forward_holds_at_most_one_float_copy_of_the_table(embed_dtype):
    cfg, model = _gemma3(jnp.float32, embed_dtype)
    graph, state = nnx.split(model)
    assert model.model.embed_tokens.embedding.dtype == embed_dtype
    x = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    compiled = jax.jit(lambda st, i: nnx.merge(graph, st)(i)).lower(state, x).compile()
    # bf16 table, float32 compute: the tied head's one cast of the table; float32 table: none
    assert _table_copies(compiled, cfg) < (1.1 if embed_dtype == jnp.bfloat16 else 0.1)


def test_train_step_holds_at_most_one_float_copy_of_the_table():
    cfg, model = _gemma3(jnp.float32, jnp.bfloat16, oft=True)
    graph, params, rest = nnx.split(model, OFTParam, ...)

    def loss(p, r, x):
        logits = nnx.merge(graph, p, r)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    x = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, rest, x).compile()
    assert _table_copies(compiled, cfg) < 1.25  # the cast table (kept for the backward) + small activations


def test_bf16_checkpoint_loaded_as_float32_keeps_its_table_bf16(tmp_path):
    cfg = config("gemma3_text", sliding_window=4, vocab_size=512)
    m = CausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    save_model(m, tmp_path / "bf16")
    wide = load_model(tmp_path / "bf16", dtype=jnp.float32)
    assert wide.model.embed_tokens.embedding.dtype == jnp.bfloat16
    assert (
        wide.model.norm.weight.dtype == jnp.float32
        and wide.model.layers[0].mlp.up_proj.kernel.dtype == jnp.float32
    )
    np.testing.assert_array_equal(
        np.asarray(wide.model.embed_tokens.embedding[...]), np.asarray(m.model.embed_tokens.embedding[...])
    )
    out = run(wide, ids())
    assert out.dtype == jnp.float32
    save_model(
        wide, tmp_path / "mixed"
    )  # a bf16 table beside float32 layers: transformers' "auto" is float32
    assert json.loads((tmp_path / "mixed" / "config.json").read_text())["dtype"] == "float32"
    same = load_model(tmp_path / "bf16", dtype=jnp.float32)  # the same numbers as an all-float32 model
    same.model.embed_tokens.embedding = nnx.Param(wide.model.embed_tokens.embedding[...].astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(run(same, ids())))
