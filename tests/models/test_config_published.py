"""Published ``config.json`` files load: SmolLM2 (the real checkpoint), Qwen2.5, Llama 3.2, Mistral.

The dicts are the files as published on the Hugging Face Hub (no network here). Every key they carry is
metadata, architecture or a neutral switch, so they load even in strict mode and without a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from oftjax.models import ModelConfig
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture

SMOLLM2_135M_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "is_llama_config": True,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_interleaved": False,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3",
    "use_cache": True,
    "vocab_size": 49152,
}
QWEN2_5_0_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN2_5_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
LLAMA_3_2_1B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
MISTRAL_7B_INSTRUCT_V0_3 = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.0.dev0",
    "use_cache": True,
    "vocab_size": 32768,
}
MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

# name -> (config, what it must read as: model_type, heads, kv heads, head_dim, rope, tied, window of layer 0)
PUBLISHED = {
    "smollm2-135m-instruct": (SMOLLM2_135M_INSTRUCT, ("llama", 9, 3, 64, "default", 100000.0, True, None)),
    "qwen2.5-0.5b": (QWEN2_5_0_5B, ("qwen2", 14, 2, 64, "default", 1e6, True, None)),
    "qwen2.5-7b-instruct": (QWEN2_5_7B_INSTRUCT, ("qwen2", 28, 4, 128, "default", 1e6, False, None)),
    "llama-3.2-1b-instruct": (LLAMA_3_2_1B_INSTRUCT, ("llama", 32, 8, 64, "llama3", 5e5, True, None)),
    "mistral-7b-instruct-v0.3": (
        MISTRAL_7B_INSTRUCT_V0_3,
        ("mistral", 32, 8, 128, "default", 1e6, False, None),
    ),
    "mistral-7b-v0.1": (MISTRAL_7B_V0_1, ("mistral", 32, 8, 128, "default", 1e4, False, 4096)),
}


def _summary(cfg: ModelConfig) -> tuple:
    return (
        cfg.model_type,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rope.rope_type,
        cfg.rope.theta,
        cfg.tie_word_embeddings,
        cfg.window(0),
    )


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_loads_strictly_without_warning(name):
    config, expected = PUBLISHED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_hf(config, strict=True)
    assert _summary(cfg) == expected
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_llama_3_2_rope_scaling_is_read():
    cfg = ModelConfig.from_hf(LLAMA_3_2_1B_INSTRUCT, strict=True)
    rope = cfg.rope
    assert (rope.factor, rope.low_freq_factor, rope.high_freq_factor) == (32.0, 1.0, 4.0)
    assert rope.original_max_position_embeddings == 8192


def test_qwen2_5_mrope_switched_on_is_refused():
    with pytest.raises(ValueError, match=r"use_mrope=True asks for multimodal rotary positions"):
        ModelConfig.from_hf({**QWEN2_5_0_5B, "use_mrope": True})


def test_the_real_smollm2_config_loads_strictly(smollm2_dir: Path):  # noqa: F811
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {"_model_name_or_path", "unk_token_id", "pretraining_tp"} <= set(config)  # the keys that broke it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_hf(config, strict=True)
    assert _summary(cfg) == PUBLISHED["smollm2-135m-instruct"][1]
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (
        49152,
        30,
        576,
        1536,
    )
    assert cfg.extra["unk_token_id"] == 0 and cfg.extra["eos_token_id"] == 2
