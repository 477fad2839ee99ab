"""The model families oftjax implements: what differs between them, and how their HF configs are read.

One decoder (``_decoder.py``) computes every family; a ``Family`` names the structural pieces a model type
uses (transformers 5.24's modeling files, one per family):

============  =================================================================================
llama         pre-norm blocks, RMSNorm ``weight * x``, SwiGLU, q/k/v/o projections (Llama 2/3)
mistral       as llama; a sliding window on every layer
qwen2         as llama; q/k/v biases; windowed layers from ``max_window_layers``
qwen3         as qwen2 without the biases; per-head RMSNorm of q and k before RoPE (``q_norm``)
gemma2        RMSNorm ``x * (1 + weight)``; norms before *and after* attention and MLP; GeGLU (tanh GELU);
              embeddings times sqrt(hidden_size); ``query_pre_attn_scalar``; soft-capped attention and
              output logits; alternating sliding-window layers
gemma3_text   as gemma2 plus q/k norms; sliding and global layers with their own RoPE
phi3          as llama with fused ``qkv_proj`` and ``gate_up_proj``; LongRoPE
============  =================================================================================

The readers below turn a ``config.json`` dict into ``ModelConfig`` keyword arguments for the keys that
differ between families (biases, windows, RoPE, Gemma's scalars) and write them back (``family_to_hf``).
docs/model-families.md describes the math of each family and what is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from oftjax.models._config_keys import UnsupportedConfigError
from oftjax.models._config_rope import RopeConfig, flat_rope_params, read_rope, rope_to_hf

SILU = ("silu", "swish")
GELU_TANH = ("gelu_pytorch_tanh",)
_QWEN_WINDOW_KEYS = frozenset({"use_sliding_window", "max_window_layers"})
_GEMMA_KEYS = frozenset(
    {"hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"}
)


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model type computes beyond the Llama block, and transformers' defaults for absent keys.

    Attributes:
      architecture: the HF class name written to ``architectures``.
      defaults: transformers' class defaults for keys a config.json may omit.
      activations: implemented values of the MLP activation key (``hidden_act``; Gemma ``hidden_activation``).
      norm_unit_offset: RMSNorm multiplies by ``1 + weight`` in float32 (Gemma), not by ``weight``.
      qk_norm: per-head RMSNorm of queries and keys before RoPE (``self_attn.q_norm`` / ``k_norm``).
      sandwich_norms: four norms per layer: ``post_attention_layernorm`` on the attention output,
        ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP (Gemma).
      scaled_embedding: embeddings times sqrt(hidden_size) (Gemma).
      fused_projections: ``qkv_proj`` and ``gate_up_proj`` instead of q/k/v and gate/up (Phi-3).
      per_layer_rope: sliding and full-attention layers have their own RoPE (Gemma 3).
      reads: config keys this family reads besides the common ones.
      ignores: keys transformers does not read for this family (Gemma's ``hidden_act``).
    """

    architecture: str
    defaults: Mapping[str, Any]
    activations: tuple[str, ...] = SILU
    norm_unit_offset: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    scaled_embedding: bool = False
    fused_projections: bool = False
    per_layer_rope: bool = False
    reads: frozenset[str] = frozenset()
    ignores: frozenset[str] = frozenset()


_LLAMA_DEFAULTS = dict(max_position_embeddings=2048, num_key_value_heads=None, sliding_window=None)
_GEMMA_DEFAULTS = dict(
    num_key_value_heads=4,
    head_dim=256,
    tie_word_embeddings=True,
    sliding_window=4096,
    query_pre_attn_scalar=256,
)
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", _LLAMA_DEFAULTS),
    "mistral": Family(
        "MistralForCausalLM",
        dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, sliding_window=4096),
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        dict(max_position_embeddings=32768, num_key_value_heads=32, sliding_window=4096),
        reads=_QWEN_WINDOW_KEYS,
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128, sliding_window=4096),
        qk_norm=True,
        reads=_QWEN_WINDOW_KEYS,
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        dict(
            _GEMMA_DEFAULTS,
            max_position_embeddings=8192,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
        activations=GELU_TANH,
        norm_unit_offset=True,
        sandwich_norms=True,
        scaled_embedding=True,
        reads=_GEMMA_KEYS,
        ignores=frozenset({"hidden_act"}),
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        dict(_GEMMA_DEFAULTS, max_position_embeddings=131072),
        activations=GELU_TANH,
        norm_unit_offset=True,
        qk_norm=True,
        sandwich_norms=True,
        scaled_embedding=True,
        per_layer_rope=True,
        reads=_GEMMA_KEYS | {"rope_local_base_freq", "sliding_window_pattern"},
        # transformers 5 reads sliding_window_pattern only; later writers keep the private spelling too
        ignores=frozenset({"hidden_act", "_sliding_window_pattern"}),
    ),
    "phi3": Family(
        "Phi3ForCausalLM",
        dict(max_position_embeddings=4096, num_key_value_heads=None, sliding_window=None, rms_norm_eps=1e-5),
        fused_projections=True,
        reads=frozenset({"original_max_position_embeddings"}),
    ),
}
MODEL_TYPES = tuple(FAMILIES)


def model_type_of(config: Mapping[str, Any]) -> str | None:
    """``model_type``, or the family of the first known ``architectures`` entry."""
    if config.get("model_type"):
        return config["model_type"]
    archs = config.get("architectures")
    for model_type, family in FAMILIES.items():
        if isinstance(archs, list) and family.architecture in archs:
            return model_type
    return None


# ------------------------------------------------------------------------------------------------ reading


def read_family(model_type: str, c: Mapping[str, Any], *, max_position_embeddings: int) -> dict[str, Any]:
    """The ``ModelConfig`` keyword arguments that differ between families, read from config dict ``c``."""
    family = FAMILIES[model_type]
    key = "hidden_activation" if "hidden_activation" in family.reads else "hidden_act"
    act = c.get(key, family.activations[0])
    if act not in family.activations:
        raise UnsupportedConfigError(
            f"{key}={act!r} is not implemented for {model_type} (only {family.activations[0]})"
        )
    qkv_bias, o_bias, mlp_bias = _biases(model_type, c)
    window, layer_types = _sliding(model_type, c, family.defaults)
    rope, local_rope = _ropes(model_type, c, max_position_embeddings)
    out = dict(
        hidden_act="silu" if act in SILU else act,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_window=window,
        layer_types=layer_types,
        rope=rope,
        local_rope=local_rope,
    )
    if "query_pre_attn_scalar" in family.reads:
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = c.get(name, family.defaults.get(name))
            # kept as written (Gemma2Config types query_pre_attn_scalar as an int)
            out[name] = value if value is None or isinstance(value, int) else float(value)
    return out


def _biases(model_type: str, c: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v, o, MLP) biases. Llama: ``attention_bias`` (all four attention projections) and ``mlp_bias``;
    Qwen3 and Gemma: ``attention_bias``; Qwen2: q/k/v always. A key transformers ignores for the family
    must not ask for a bias."""
    if model_type == "llama":
        attention = bool(c.get("attention_bias", False))
        return attention, attention, bool(c.get("mlp_bias", False))
    reads_attention_bias = model_type in ("qwen3", "gemma2", "gemma3_text")
    for key in ("mlp_bias",) if reads_attention_bias else ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise UnsupportedConfigError(f"{key}=True is not part of {model_type} (transformers ignores it)")
    if model_type == "qwen2":
        return True, False, False
    attention = reads_attention_bias and bool(c.get("attention_bias", False))
    return attention, attention, False


def _sliding(
    model_type: str, c: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[Any, tuple[str, ...]]:
    """``(sliding_window, layer_types)`` as each family's config class derives them."""
    window = c.get("sliding_window", defaults.get("sliding_window"))
    n = int(c["num_hidden_layers"])
    if model_type == "llama":
        if window is not None:
            raise UnsupportedConfigError(
                f"sliding_window={window} is not part of llama (transformers ignores it)"
            )
        return None, ()
    if model_type in ("qwen2", "qwen3"):
        return _qwen_window(c, window, n)
    if model_type in ("gemma2", "gemma3_text"):
        types = c.get("layer_types")
        if types is None:
            period = 2 if model_type == "gemma2" else int(c.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
        return (None if window is None else int(window)), tuple(types)
    if c.get("layer_types") is not None:  # mistral, phi3: one window for every layer
        raise UnsupportedConfigError(f"layer_types is not part of {model_type}")
    return (int(window) if window is not None else None), ()


def _qwen_window(c: Mapping[str, Any], window: Any, n: int) -> tuple[Any, tuple[str, ...]]:
    # Qwen2Config / Qwen3Config: the window exists only with use_sliding_window, on the layers from
    # max_window_layers on.
    window = window if c.get("use_sliding_window", False) else None
    types = c.get("layer_types")
    if types is None:
        first = int(c.get("max_window_layers", 28))
        types = [
            "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)
        ]
    types = tuple(types)
    if window is None and "sliding_attention" in types:
        types = ("full_attention",) * n  # transformers builds no window mask without a window
    return window, types


def _ropes(model_type: str, c: Mapping[str, Any], max_pos: int) -> tuple[RopeConfig, RopeConfig | None]:
    """``(rope, local_rope)``: the rope of full-attention layers (of every layer but Gemma 3's sliding
    ones) and Gemma 3's sliding-layer rope (None for the other families)."""
    if model_type == "gemma3_text":
        return _gemma3_ropes(c, max_pos)
    params = flat_rope_params(c)
    theta = float(c.get("rope_theta", 10000.0))
    if model_type != "phi3":
        return read_rope(params, theta=theta, max_position_embeddings=max_pos), None
    if params.get("rope_type", params.get("type")) in ("su", "yarn"):
        params["rope_type"] = "longrope"  # Phi3Config's spelling of older checkpoints
        params.pop("type", None)
    orig = int(c.get("original_max_position_embeddings", 4096))  # Phi3Config's top-level key wins
    rope = read_rope(
        params,
        theta=theta,
        max_position_embeddings=max_pos,
        allowed=("default", "longrope"),
        original_max_position_embeddings=orig,
    )
    return rope, None


def _gemma3_ropes(c: Mapping[str, Any], max_pos: int) -> tuple[RopeConfig, RopeConfig]:
    # Gemma3TextConfig: rope_parameters per layer type, or the legacy rope_theta (global layers),
    # rope_local_base_freq (sliding layers) and rope_scaling (global layers only).
    params = c.get("rope_parameters")
    if params is not None and not ({"full_attention", "sliding_attention"} & set(params)):
        raise UnsupportedConfigError(
            "gemma3_text rope_parameters must be keyed by layer type ('full_attention', "
            f"'sliding_attention'); got keys {sorted(params)}"
        )
    params = dict(params or {})
    full = dict(params.get("full_attention") or c.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    rope = read_rope(
        full,
        theta=float(c.get("rope_theta", 1_000_000.0)),
        max_position_embeddings=max_pos,
        where="rope_parameters['full_attention']",
    )
    local_rope = read_rope(
        local,
        theta=float(c.get("rope_local_base_freq", 10_000.0)),
        max_position_embeddings=max_pos,
        where="rope_parameters['sliding_attention']",
    )
    return rope, local_rope


# ------------------------------------------------------------------------------------------------ writing


def family_to_hf(cfg: Any) -> dict[str, Any]:
    """The config.json keys of ``cfg`` (a ``ModelConfig``) that differ between families."""
    t = cfg.model_type
    out: dict[str, Any] = {}
    if t == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif t in ("qwen3", "gemma2", "gemma3_text"):
        out["attention_bias"] = cfg.qkv_bias
    if t in ("mistral", "phi3"):
        out["sliding_window"] = cfg.sliding_window
    elif t in ("qwen2", "qwen3"):
        types = cfg.attention_types
        sliding = "sliding_attention" in types
        out.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window if sliding else None,
            layer_types=list(types),
            max_window_layers=types.index("sliding_attention") if sliding else cfg.num_hidden_layers,
        )
    elif t in ("gemma2", "gemma3_text"):
        out.update(
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.attention_types),
            hidden_activation=cfg.hidden_act,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar,
            attn_logit_softcapping=cfg.attn_logit_softcapping,
            final_logit_softcapping=cfg.final_logit_softcapping,
        )
    if t == "gemma3_text":
        out["rope_parameters"] = {
            "full_attention": rope_to_hf(cfg.rope),
            "sliding_attention": rope_to_hf(cfg.local_rope),
        }
    else:
        out["rope_parameters"] = rope_to_hf(cfg.rope)
    if t == "phi3":
        out["original_max_position_embeddings"] = cfg.rope.original_max_position_embeddings or 4096
    if "hidden_activation" not in out:
        out["hidden_act"] = cfg.hidden_act
    return out
