"""Which keys of an outside ``config.json`` oftjax reads, ignores, accepts at a neutral value, or refuses.

Published checkpoints carry more than the architecture: names and versions of the tools that wrote them, the
ids of special tokens, generation settings, flags of other libraries (``is_llama_config``,
``transformers.js_config``) and switches for math that other models use (``rope_interleaved``, ``use_mrope``).
The policy, applied by ``check_keys`` before ``ModelConfig.from_hf`` reads anything:

1. **Metadata** (``METADATA``, and every key ending in ``_token_id`` / ``_token_ids``) never changes the
   forward math: ignored.
2. **Read** keys (``READ``) are the architecture: ``ModelConfig.from_hf`` validates each value and refuses
   the ones it does not implement (``hidden_act='gelu'``, a rope type, ...).
3. **Neutral** keys (``NEUTRAL``) switch on math oftjax does not implement. At the value that switches it
   off (``rope_interleaved: false``, ``use_mrope: false``, ``attention_dropout: 0.0``) they are accepted;
   at any other value they are refused with what the math would have been.
4. **Anything else** is accepted with one warning naming all such keys (transformers stores unknown keys as
   attributes and most of them are bookkeeping); ``strict=True`` refuses them instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

# Generic PretrainedConfig fields, generation settings, names, versions, dtypes, and other tools' flags.
METADATA = frozenset({
    "_name_or_path", "_model_name_or_path", "name_or_path", "_commit_hash", "architectures", "model_type",
    "transformers_version", "transformers.js_config", "is_llama_config", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "quantization_config", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "task_specific_params", "problem_type", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "_attn_implementation_autoset", "_attn_implementation", "attn_implementation", "auto_map",
    "keys_to_ignore_at_inference", "base_model_tp_plan", "base_model_pp_plan",
    # transformers 4 split q/k/v, the MLP and lm_head into pretraining_tp slices and summed them: the same
    # math in another summation order; transformers 5 ignores the key.
    "pretraining_tp",
    # the KV-cache class generate() builds (Gemma's "hybrid"): decoding bookkeeping, not the forward
    "cache_implementation",
})  # fmt: skip
METADATA_SUFFIXES = ("_token_id", "_token_ids")

# Keys ModelConfig.from_hf reads and validates for every model type (use_sliding_window / max_window_layers:
# Qwen2 and Qwen3 only; transformers ignores them for the others). A family reads more keys
# (``Family.reads`` in ``_families.py``) and may ignore some (``Family.ignores``).
READ = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "partial_rotary_factor",
})  # fmt: skip

# key -> (the values that switch the math off, the math that any other value asks for).
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "rope_interleaved": (
        (False,),
        "rotary embedding on interleaved (GPT-J style) pairs; oftjax rotates the two halves of each head "
        "as transformers' Llama does",
    ),
    "use_mrope": ((False,), "multimodal rotary positions (Qwen2-VL M-RoPE)"),
    "attention_dropout": ((0, 0.0, None), "dropout on the attention probabilities"),
    "qk_norm": ((False, None), "RMS normalization of queries and keys"),
    "use_qk_norm": ((False, None), "RMS normalization of queries and keys"),
    "attn_logit_softcapping": ((None,), "soft-capping of the attention logits"),
    "final_logit_softcapping": ((None,), "soft-capping of the output logits"),
    "use_bidirectional_attention": ((False, None), "bidirectional (non-causal) attention"),
    "resid_pdrop": ((0, 0.0, None), "dropout on the residual branches"),
    "embd_pdrop": ((0, 0.0, None), "dropout on the embeddings"),
}


class UnsupportedConfigError(ValueError):
    """An HF config field that changes the model's math and is not implemented here."""


def is_metadata(key: str) -> bool:
    """True for keys that never change the forward math (names, versions, special-token ids, ...)."""
    return key in METADATA or key.endswith(METADATA_SUFFIXES)


def check_keys(
    config: Mapping[str, Any],
    model_type: str,
    *,
    strict: bool,
    reads: frozenset[str] = frozenset(),
    ignores: frozenset[str] = frozenset(),
) -> list[str]:
    """Apply the key policy to a ``config.json`` dict; return the unknown keys (already warned about).

    Args:
      config: the parsed ``config.json``.
      model_type: for the messages.
      strict: refuse unknown keys instead of warning.
      reads: keys this model type reads besides ``READ`` (a neutral key listed here is implemented).
      ignores: keys transformers ignores for this model type (treated as metadata).

    Raises:
      UnsupportedConfigError: a neutral key at another value (the key, the value and the math named), or,
        with ``strict``, the unknown keys.
    """
    for key, (neutral, math) in NEUTRAL.items():
        if key in config and key not in reads and config[key] not in neutral:
            allowed = " or ".join(repr(v) for v in neutral)
            raise UnsupportedConfigError(
                f"{key}={config[key]!r} asks for {math}, which is not implemented (only {key}={allowed})"
            )
    known = READ | NEUTRAL.keys() | reads | ignores
    unknown = sorted(k for k in config if not (is_metadata(k) or k in known))
    if unknown and strict:
        raise UnsupportedConfigError(
            f"unknown {model_type} config key(s) {unknown}: strict mode refuses keys oftjax does not know "
            "(they may change the math); without strict they are ignored with a warning"
        )
    if unknown:
        warnings.warn(
            f"unknown {model_type} config key(s) {unknown} are ignored; if one of them changes the math, "
            "this model will not compute what transformers computes (strict mode refuses them)",
            stacklevel=3,
        )
    return unknown
