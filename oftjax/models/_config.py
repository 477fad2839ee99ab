"""``ModelConfig``: the decoder architecture read from (and written back to) an HF ``config.json``.

Follows transformers 5.24's configuration classes of the families in ``_families.py`` (Llama, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3): field names, class defaults for absent keys,
``rope_parameters`` and the legacy ``rope_theta`` / ``rope_scaling`` spellings. Every field that changes the
forward math is either implemented or refused with an error naming it. Keys that are not architecture follow
the policy in ``_config_keys.py``: metadata ignored, switches of math we do not implement accepted at their
neutral value and refused at any other, anything else ignored with one warning (``strict=True`` refuses
those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from oftjax.models._config_keys import METADATA_SUFFIXES, UnsupportedConfigError, check_keys
from oftjax.models._config_rope import RopeConfig
from oftjax.models._families import FAMILIES, MODEL_TYPES, Family, family_to_hf, model_type_of, read_family

ARCHITECTURES = {t: f.architecture for t, f in FAMILIES.items()}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Extra keys kept verbatim for to_hf() (with every special-token id) so a round trip preserves them.
_KEEP = ("initializer_range", "use_cache")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder of one of the families in ``_families.py``: the fields the forward depends on.

    Attributes:
      model_type: "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text" or "phi3": the family
        (``family``: which norms, projections and embedding scaling) and the name ``to_hf`` writes.
      head_dim: explicit head size (may differ from hidden_size / num_attention_heads).
      rope: the rotary embedding (``RopeConfig``) of every layer, or of the full-attention layers when
        ``local_rope`` is set.
      local_rope: Gemma 3: the rotary embedding of the sliding-window layers (None elsewhere).
      qkv_bias / o_bias / mlp_bias: biases on q/k/v, o and the MLP projections (Qwen2: q/k/v only; Llama:
        ``attention_bias`` puts them on all four attention projections).
      sliding_window / layer_types: windowed causal attention; a token attends to the keys with
        ``q - window < k <= q`` on "sliding_attention" layers. Empty ``layer_types`` (Llama, Mistral,
        Phi-3): all layers are windowed exactly when ``sliding_window`` is set; see ``attention_types``.
      hidden_act: the MLP activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma).
      query_pre_attn_scalar: Gemma: the scores are scaled by ``query_pre_attn_scalar ** -0.5`` instead of
        ``head_dim ** -0.5``.
      attn_logit_softcapping / final_logit_softcapping: Gemma: ``cap * tanh(x / cap)`` of the attention
        scores / the output logits (None: off).
      extra: harmless HF keys (token ids, init range) kept for ``to_hf``; not compared.

    Example:
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
      ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      ...     "num_key_value_heads": 2})
      >>> cfg.head_dim, cfg.num_kv_groups
      (16, 2)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    hidden_act: str = "silu"
    query_pre_attn_scalar: int | float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {self.model_type!r} is not supported (one of {MODEL_TYPES})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self._check_family()
        self._check_layers()
        for rope in (self.rope, self.local_rope):
            if (
                rope is not None
                and rope.rope_type == "longrope"
                and len(rope.short_factor) != self.head_dim // 2
            ):
                raise ValueError(
                    f"longrope short_factor/long_factor have {len(rope.short_factor)} entries; head_dim "
                    f"{self.head_dim} needs {self.head_dim // 2}"
                )

    def _check_family(self) -> None:
        family = self.family
        if self.hidden_act not in family.activations:
            raise UnsupportedConfigError(
                f"hidden_act={self.hidden_act!r} is not implemented for {self.model_type} (only "
                f"{family.activations[0]})"
            )
        if (self.local_rope is not None) != family.per_layer_rope:
            want = "needs" if family.per_layer_rope else "has no"
            raise ValueError(f"{self.model_type} {want} a separate rope for its sliding layers (local_rope)")
        gemma = self.family.scaled_embedding
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, name) is not None and not gemma:
                raise UnsupportedConfigError(f"{name} is not part of {self.model_type}")

    def _check_layers(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise UnsupportedConfigError(f"layer_types {bad} are not implemented")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    @property
    def family(self) -> Family:
        """The structural pieces of this model type (``_families.FAMILIES``)."""
        return FAMILIES[self.model_type]

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        """The factor on the attention scores: ``query_pre_attn_scalar ** -0.5`` (Gemma) or ``head_dim **
        -0.5``, as transformers computes it in Python floats."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return base**-0.5

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Per-layer "full_attention" / "sliding_attention" (``layer_types``, or all layers alike)."""
        if self.layer_types:
            return self.layer_types
        kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
        return (kind,) * self.num_hidden_layers

    def window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: full causal attention)."""
        return self.sliding_window if self.attention_types[layer] == "sliding_attention" else None

    def rope_of(self, layer_type: str) -> RopeConfig:
        """The rotary embedding of a "full_attention" / "sliding_attention" layer."""
        if layer_type == "sliding_attention" and self.local_rope is not None:
            return self.local_rope
        return self.rope

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, strict: bool = False) -> ModelConfig:
        """Build from an HF ``config.json`` dict (transformers 4 or 5 spelling).

        Args:
          config: the parsed ``config.json``.
          strict: refuse keys oftjax does not know (default: ignore them with one warning naming them).
            Metadata keys are always ignored and unsupported math is always refused (``_config_keys.py``).

        Raises:
          UnsupportedConfigError: a field that changes the math and is not implemented, named.
          ValueError: missing required keys or inconsistent values.

        Example:
          >>> try:
          ...     ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
          ...         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          ...         "hidden_act": "gelu"})
          ... except UnsupportedConfigError as e:
          ...     print(e)
          hidden_act='gelu' is not implemented for llama (only silu)
        """
        c = dict(config)
        model_type = model_type_of(c)
        if model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(f"model_type {model_type!r} is not supported (one of {MODEL_TYPES})")
        family = FAMILIES[model_type]
        check_keys(c, model_type, strict=strict, reads=family.reads, ignores=family.ignores)
        missing = [k for k in _REQUIRED if c.get(k) is None]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        defaults = family.defaults
        heads = int(c["num_attention_heads"])
        kv = c.get("num_key_value_heads", defaults["num_key_value_heads"])
        head_dim = c.get("head_dim", defaults.get("head_dim"))
        max_pos = int(c.get("max_position_embeddings", defaults["max_position_embeddings"]))
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv is None else int(kv),
            head_dim=int(c["hidden_size"]) // heads if head_dim is None else int(head_dim),
            model_type=model_type,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(c.get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6))),
            tie_word_embeddings=bool(
                c.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))
            ),
            extra={k: c[k] for k in c if k in _KEEP or k.endswith(METADATA_SUFFIXES)},
            **read_family(model_type, c, max_position_embeddings=max_pos),
        )

    def to_hf(self, *, dtype: str | None = None) -> dict[str, Any]:
        """The transformers 5 ``config.json`` dict for this architecture (``from_hf`` inverts it).

        Args:
          dtype: the checkpoint's float dtype name written as ``dtype`` (e.g. "float32", "bfloat16").
        """
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=0.0,
        )
        out.update(family_to_hf(self))
        if dtype is not None:
            out["dtype"] = dtype
        return out
