"""ModelConfig: reading HF config dicts (Llama / Mistral / Qwen2), refusing unsupported math, writing back.

The newer families (Qwen3, Gemma 2, Gemma 3, Phi-3) have their own file, tests/models/test_config_families.py.
"""

import warnings

import pytest

from oftjax.models import ModelConfig, UnsupportedConfigError

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def hf(model_type="llama", **kw):
    return {"model_type": model_type, **BASE, "num_key_value_heads": 2, **kw}


def test_llama_defaults_match_transformers():
    cfg = ModelConfig.from_hf(hf(num_key_value_heads=2))
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.num_kv_groups) == (16, 2, 2)
    assert (cfg.rope.rope_type, cfg.rope.theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (
        "default",
        10000.0,
        1e-6,
        2048,
    )
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.tie_word_embeddings)
    assert cfg.attention_types == ("full_attention", "full_attention") and cfg.window(0) is None


def test_llama_missing_kv_heads_means_mha():
    assert ModelConfig.from_hf({"model_type": "llama", **BASE}).num_key_value_heads == 4


def test_explicit_head_dim():
    cfg = ModelConfig.from_hf(hf(head_dim=32))
    assert cfg.head_dim == 32


def test_legacy_rope_spelling_transformers4():
    cfg = ModelConfig.from_hf(
        hf(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        )
    )
    assert (cfg.rope.rope_type, cfg.rope.theta, cfg.rope.factor) == ("llama3", 500000.0, 8.0)
    assert cfg.rope.original_max_position_embeddings == 8192


def test_llama3_original_max_defaults_to_max_positions():
    params = dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    cfg = ModelConfig.from_hf(hf(rope_parameters=params, max_position_embeddings=64))
    assert cfg.rope.original_max_position_embeddings == 64


def test_attention_and_mlp_bias_on_llama():
    cfg = ModelConfig.from_hf(hf(attention_bias=True, mlp_bias=True))
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias


def test_mistral_window_defaults_to_4096():
    cfg = ModelConfig.from_hf({"model_type": "mistral", **BASE, "num_attention_heads": 8})
    assert cfg.sliding_window == 4096 and cfg.num_key_value_heads == 8  # MistralConfig's class default
    assert cfg.attention_types == ("sliding_attention",) * 2 and cfg.window(1) == 4096
    assert ModelConfig.from_hf(hf("mistral", sliding_window=None, num_key_value_heads=4)).window(0) is None


def test_qwen2_bias_tied_and_window_per_layer():
    cfg = ModelConfig.from_hf(hf("qwen2", tie_word_embeddings=True, num_key_value_heads=2))
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings and cfg.window(0) is None
    windowed = ModelConfig.from_hf(
        hf("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    )
    assert windowed.attention_types == ("full_attention", "sliding_attention")
    assert (windowed.window(0), windowed.window(1)) == (None, 3)
    # transformers drops the window when use_sliding_window is false, whatever sliding_window says
    assert ModelConfig.from_hf(hf("qwen2", sliding_window=3, max_window_layers=0)).window(1) is None


def test_model_type_from_architectures():
    cfg = ModelConfig.from_hf({**BASE, "architectures": ["MistralForCausalLM"], "num_key_value_heads": 2})
    assert cfg.model_type == "mistral"


@pytest.mark.parametrize(
    "config,names",
    [
        (hf(hidden_act="gelu"), ["hidden_act", "gelu"]),
        (hf(rope_parameters=dict(rope_type="dynamic", factor=2.0)), ["rope_type", "dynamic"]),
        (hf(rope_parameters=dict(rope_type="yarn", factor=2.0)), ["rope_type", "yarn"]),
        (
            hf(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
            ["partial"],
        ),
        (hf(rope_parameters=dict(rope_type="linear", factor=2.0, beta=1.0)), ["beta"]),
        (hf(attention_dropout=0.1), ["attention_dropout"]),
        (hf(sliding_window=16), ["sliding_window"]),
        (hf("mistral", attention_bias=True, num_key_value_heads=2), ["attention_bias"]),
        (hf("qwen2", mlp_bias=True), ["mlp_bias"]),
        (hf("gemma"), ["gemma"]),
        (hf(qk_norm=True), ["qk_norm=True", "queries and keys"]),
        (hf(rope_interleaved=True), ["rope_interleaved=True", "interleaved"]),
        (hf("qwen2", use_mrope=True), ["use_mrope=True", "M-RoPE"]),
        (hf(final_logit_softcapping=30.0), ["final_logit_softcapping=30.0", "soft-capping"]),
        (hf("qwen2", layer_types=["full_attention", "chunked_attention"]), ["chunked_attention"]),
    ],
    ids=[
        "gelu",
        "rope-dynamic",
        "rope-yarn",
        "partial-rotary",
        "rope-unknown-key",
        "attn-dropout",
        "llama-window",
        "mistral-bias",
        "qwen2-mlp-bias",
        "gemma",
        "qk-norm",
        "rope-interleaved",
        "mrope",
        "logit-softcap",
        "chunked",
    ],
)
def test_refuses_unsupported_math_naming_it(config, names):
    with pytest.raises(UnsupportedConfigError) as err:
        ModelConfig.from_hf(config)
    for name in names:
        assert name in str(err.value)


def test_unknown_keys_warn_once_naming_them():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = ModelConfig.from_hf(hf(my_new_knob=1, other_knob="x"))
    assert cfg.vocab_size == 128
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "['my_new_knob', 'other_knob']" in message and "ignored" in message
    assert caught[0].filename == __file__  # the warning points at the caller of from_hf


def test_strict_refuses_unknown_keys_naming_them():
    with pytest.raises(
        UnsupportedConfigError, match=r"unknown llama config key\(s\) \['my_new_knob'\]: strict"
    ):
        ModelConfig.from_hf(hf(my_new_knob=1), strict=True)


@pytest.mark.parametrize(
    "extra",
    [
        {"_model_name_or_path": "Smollm2 135M", "unk_token_id": 0, "is_llama_config": True},
        {"transformers.js_config": {"kv_cache_dtype": {"fp16": "float16"}}, "torch_dtype": "bfloat16"},
        {"image_token_id": 5, "eos_token_id": [1, 2], "transformers_version": "4.45.0.dev0"},
        {"pretraining_tp": 2, "use_cache": False, "dtype": "float32", "_name_or_path": "/x"},
        {"rope_interleaved": False, "use_mrope": False, "attention_dropout": 0.0, "qk_norm": False},
    ],
    ids=["names-ids", "js-config", "token-ids", "tp-cache", "neutral"],
)
def test_metadata_and_neutral_keys_load_strictly_without_warning(extra):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_hf(hf(**extra), strict=True)
    assert cfg == ModelConfig.from_hf(hf(), strict=True)


def test_special_token_ids_survive_to_hf():
    cfg = ModelConfig.from_hf(hf(bos_token_id=1, eos_token_id=[2, 3], unk_token_id=0))
    out = cfg.to_hf()
    assert (out["bos_token_id"], out["eos_token_id"], out["unk_token_id"]) == (1, [2, 3], 0)


@pytest.mark.parametrize(
    "config,match",
    [
        ({"model_type": "llama", "vocab_size": 8}, "hidden_size"),
        (hf(num_key_value_heads=3), "multiple"),
        (hf(head_dim=15), "even"),
    ],
    ids=["missing", "gqa-divides", "odd-head-dim"],
)
def test_bad_values(config, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(config)


@pytest.mark.parametrize(
    "config",
    [
        hf(num_key_value_heads=2, bos_token_id=1, eos_token_id=2),
        hf(rope_parameters=dict(rope_type="linear", rope_theta=5e5, factor=4.0), tie_word_embeddings=True),
        hf(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=5e5,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            attention_bias=True,
            head_dim=8,
        ),
        hf("mistral", sliding_window=5, num_key_value_heads=2),
        hf("qwen2", tie_word_embeddings=True),
        hf("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ],
    ids=["llama", "linear-tied", "llama3-bias", "mistral", "qwen2", "qwen2-window"],
)
def test_to_hf_round_trip(config):
    cfg = ModelConfig.from_hf(config)
    out = cfg.to_hf(dtype="float32")
    again = ModelConfig.from_hf(out)
    assert again == cfg
    assert out["dtype"] == "float32" and out["architectures"][0].endswith("ForCausalLM")
    assert again.extra == cfg.extra
