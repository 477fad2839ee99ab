"""ModelConfig of the newer families (Qwen3, Gemma 2, Gemma 3 text, Phi-3): published configs, defaults, what
transformers derives from them, what is refused; their RoPE against transformers' rotary modules."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from oftjax.models import ModelConfig, UnsupportedConfigError
from oftjax.models._rope import inv_freq, rope_cos_sin
from tests.models._family_configs import PUBLISHED, two_layers

SLIDING, FULL = "sliding_attention", "full_attention"
# (model_type, heads, kv heads, head_dim, tied, window, first two layer types, rope types, attention scale)
EXPECTED = {
    "qwen3-0.6b": ("qwen3", 16, 8, 128, True, None, (FULL, FULL), ("default",), 128**-0.5),
    "gemma-2-2b": ("gemma2", 8, 4, 256, True, 4096, (SLIDING, FULL), ("default",), 256**-0.5),
    "gemma-3-270m": ("gemma3_text", 4, 1, 256, True, 512, (SLIDING, SLIDING), ("default", "default"), 1 / 16),
    "gemma-3-1b": ("gemma3_text", 4, 1, 256, True, 512, (SLIDING, SLIDING), ("default", "default"), 1 / 16),
    "phi-3-mini-4k": ("phi3", 32, 32, 96, False, 2047, (SLIDING, SLIDING), ("default",), 96**-0.5),
    "phi-3-mini-128k": ("phi3", 32, 32, 96, False, 262144, (SLIDING, SLIDING), ("longrope",), 96**-0.5),
}


def _summary(cfg: ModelConfig) -> tuple:
    ropes = (
        (cfg.rope.rope_type,) if cfg.local_rope is None else (cfg.rope.rope_type, cfg.local_rope.rope_type)
    )
    return (
        cfg.model_type,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.tie_word_embeddings,
        cfg.sliding_window,
        cfg.attention_types[:2],
        ropes,
        cfg.attention_scale,
    )


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_loads_strictly_without_warning(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_hf(PUBLISHED[name], strict=True)
    assert _summary(cfg) == EXPECTED[name]
    assert ModelConfig.from_hf(cfg.to_hf(), strict=True) == cfg


def test_gemma_details():
    g2 = ModelConfig.from_hf(PUBLISHED["gemma-2-2b"])
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.hidden_act) == (
        50.0,
        30.0,
        "gelu_pytorch_tanh",
    )
    assert g2.attention_types[:4] == (SLIDING, FULL, SLIDING, FULL) and g2.rope.theta == 10000.0
    g3 = ModelConfig.from_hf(PUBLISHED["gemma-3-1b"])
    assert g3.attention_types[:6] == (SLIDING,) * 5 + (FULL,)  # sliding_window_pattern 6
    assert (g3.rope.theta, g3.local_rope.theta) == (1e6, 1e4)
    assert g3.attn_logit_softcapping is None and g3.final_logit_softcapping is None
    assert ModelConfig.from_hf(PUBLISHED["gemma-3-270m"]).attention_types == g3.attention_types[:18]


def test_two_layer_cuts_keep_a_global_gemma3_layer():
    for name in ("gemma-3-270m", "gemma-3-1b"):
        assert ModelConfig.from_hf(two_layers(PUBLISHED[name])).attention_types == (SLIDING, FULL)


def test_class_defaults_for_absent_keys():
    base = dict(
        vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=3, num_attention_heads=32
    )
    g2 = ModelConfig.from_hf({"model_type": "gemma2", **base})
    got = (
        g2.head_dim,
        g2.num_key_value_heads,
        g2.query_pre_attn_scalar,
        g2.sliding_window,
        g2.tie_word_embeddings,
    )
    assert got == (256, 4, 256, 4096, True)
    assert (g2.final_logit_softcapping, g2.attn_logit_softcapping) == (30.0, 50.0)
    g3 = ModelConfig.from_hf({"model_type": "gemma3_text", **base})
    assert (g3.final_logit_softcapping, g3.max_position_embeddings) == (None, 131072)
    q3 = ModelConfig.from_hf({"model_type": "qwen3", **base})
    assert (q3.head_dim, q3.num_key_value_heads, q3.qkv_bias, q3.window(2)) == (128, 32, False, None)
    p3 = ModelConfig.from_hf({"model_type": "phi3", **base})
    assert (p3.head_dim, p3.num_key_value_heads, p3.rms_norm_eps, p3.window(0)) == (8, 32, 1e-5, None)


def test_qwen3_attention_bias_is_on_all_four_projections():
    cfg = ModelConfig.from_hf({**two_layers(PUBLISHED["qwen3-0.6b"]), "attention_bias": True})
    assert cfg.qkv_bias and cfg.o_bias and not cfg.mlp_bias


def test_phi3_longrope_spellings():
    legacy = two_layers(PUBLISHED["phi-3-mini-128k"])
    cfg = ModelConfig.from_hf(legacy)
    assert cfg.rope.original_max_position_embeddings == 4096 and cfg.rope.factor is None
    assert len(cfg.rope.long_factor) == 48
    su = {**legacy, "rope_scaling": {**legacy["rope_scaling"], "type": "su"}}
    assert ModelConfig.from_hf(su) == cfg  # Phi3Config's older name of longrope
    # Phi3Config: the top-level original_max_position_embeddings wins over the rope dict's
    inner = {**legacy, "rope_scaling": {**legacy["rope_scaling"], "original_max_position_embeddings": 2048}}
    assert ModelConfig.from_hf(inner).rope.original_max_position_embeddings == 4096


def _hf(name: str, **changes) -> dict:
    return {**two_layers(PUBLISHED[name]), **changes}


@pytest.mark.parametrize(
    "config,names",
    [
        (_hf("gemma-2-2b", use_bidirectional_attention=True), ["use_bidirectional_attention=True"]),
        (_hf("gemma-2-2b", hidden_activation="gelu"), ["hidden_activation='gelu'", "gemma2"]),
        (_hf("phi-3-mini-4k", rope_scaling={"rope_type": "linear", "factor": 2.0}), ["linear"]),
        (_hf("phi-3-mini-4k", partial_rotary_factor=0.75), ["partial_rotary_factor=0.75"]),
        (_hf("gemma-3-1b", rope_parameters={"rope_type": "default", "rope_theta": 1e4}), ["layer type"]),
        (_hf("gemma-3-1b", rope_scaling={"rope_type": "yarn", "factor": 8.0}), ["full_attention", "yarn"]),
        (_hf("qwen3-0.6b", mlp_bias=True), ["mlp_bias=True", "qwen3"]),
        (_hf("phi-3-mini-4k", attention_bias=True), ["attention_bias=True", "phi3"]),
        (_hf("phi-3-mini-4k", resid_pdrop=0.1), ["resid_pdrop=0.1", "dropout"]),
        (_hf("qwen3-0.6b", final_logit_softcapping=30.0), ["final_logit_softcapping=30.0"]),
        (_hf("qwen3-0.6b", attn_logit_softcapping=50.0), ["attn_logit_softcapping"]),
        ({**_hf("gemma-3-1b"), "model_type": "gemma3"}, ["'gemma3' is not supported"]),
        ({**_hf("phi-3-mini-4k"), "model_type": "phi3small"}, ["'phi3small' is not supported"]),
    ],
    ids=[
        "bidirectional",
        "gemma-gelu-erf",
        "phi3-linear-rope",
        "phi3-partial-rotary",
        "gemma3-flat-rope",
        "gemma3-yarn",
        "qwen3-mlp-bias",
        "phi3-attn-bias",
        "phi3-dropout",
        "qwen3-final-softcap",
        "qwen3-attn-softcap",
        "gemma3-multimodal",
        "phi3-small",
    ],
)
def test_refuses_unsupported_math_naming_it(config, names):
    with pytest.raises(UnsupportedConfigError) as err:
        ModelConfig.from_hf(config)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_to_hf_reads_back_in_transformers(name):
    """What to_hf writes means the same architecture to transformers' own config class."""
    ours = ModelConfig.from_hf(PUBLISHED[name])
    theirs = transformers.AutoConfig.for_model(**ours.to_hf())
    want = transformers.AutoConfig.for_model(**PUBLISHED[name])
    keys = ["layer_types", "sliding_window", "num_key_value_heads", "tie_word_embeddings"]
    keys += [
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "hidden_activation",
    ]
    for key in keys:
        assert getattr(theirs, key, None) == getattr(want, key, None), key
    assert _without_type(theirs.rope_parameters) == _without_type(want.rope_parameters)
    for c in (theirs, want):  # the modeling files' rule
        assert (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) == ours.head_dim


def _without_type(params: dict) -> dict:
    # transformers keeps a legacy "type" beside the "rope_type" it derives from it
    if "rope_type" not in params:
        return {k: _without_type(v) for k, v in params.items()}
    return {k: v for k, v in params.items() if k != "type"}


def _hf_rotary(name: str, **changes):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    cfg = transformers.AutoConfig.for_model(**_hf(name, **changes))
    return (Phi3RotaryEmbedding if cfg.model_type == "phi3" else Gemma3RotaryEmbedding)(cfg)


@pytest.mark.parametrize(
    "name,changes,layer_type,start",
    [
        ("phi-3-mini-128k", {}, None, 0),  # short factors
        ("phi-3-mini-128k", {}, None, 4090),  # the largest position passes 4096: long factors
        ("gemma-3-270m", {}, "sliding_attention", 1024),
        ("gemma-3-270m", {}, "full_attention", 1024),
        ("gemma-3-1b", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "full_attention", 1024),
    ],
    ids=["longrope-short", "longrope-long", "gemma3-local", "gemma3-global", "gemma3-global-linear"],
)
def test_rope_cos_sin_match_transformers(name, changes, layer_type, start):
    """cos/sin at positions past 1,024 (and past Phi-3's 4,096) against the transformers module, bit for bit
    up to float32 sin/cos rounding."""
    rotary = _hf_rotary(name, **changes)
    cfg = ModelConfig.from_hf(_hf(name, **changes))
    positions = np.arange(start, start + 16)[None]
    x = torch.zeros(1, 16, 8)
    with torch.no_grad():
        args = (x, torch.as_tensor(positions)) + (() if layer_type is None else (layer_type,))
        want_cos, want_sin = (t.numpy() for t in rotary(*args))
    got_cos, got_sin = rope_cos_sin(cfg, jnp.asarray(positions), jnp.float32, layer_type or FULL)
    np.testing.assert_allclose(np.asarray(got_cos), want_cos, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_sin), want_sin, rtol=0, atol=2e-6)
    long = start + 16 > 4096 and name.startswith("phi")
    want_freq = getattr(rotary, "inv_freq" if layer_type is None else f"{layer_type}_inv_freq").numpy()
    # torch's vectorized float32 pow is within 1 ulp, ours correctly rounded (oftjax/models/_rope.py)
    np.testing.assert_array_max_ulp(inv_freq(cfg, layer_type or FULL, long=long), want_freq, maxulp=1)
