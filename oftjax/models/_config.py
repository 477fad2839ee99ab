"""``ModelConfig``: the Llama-family architecture read from (and written back to) an HF ``config.json``.

Follows transformers 5.24's ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` (field names, class defaults
for absent keys, ``rope_parameters`` and the legacy ``rope_theta`` / ``rope_scaling`` spellings). Every field
that changes the forward math is either implemented or refused with an error naming it. Keys that are not
architecture follow the policy in ``_config_keys.py``: metadata ignored, switches of math we do not implement
accepted at their neutral value and refused at any other, anything else ignored with one warning
(``strict=True`` refuses those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from oftjax.models._config_keys import METADATA_SUFFIXES, UnsupportedConfigError, check_keys

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# transformers' class defaults for keys a config.json may omit (configuration_{llama,mistral,qwen2}.py).
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, sliding_window=None),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, sliding_window=4096),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Extra keys kept verbatim for to_hf() (with every special-token id) so a round trip preserves them.
_KEEP = ("initializer_range", "use_cache")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2): the architecture fields the forward depends on.

    Attributes:
      model_type: "llama", "mistral" or "qwen2" (selects defaults and the name written back by ``to_hf``).
      head_dim: explicit head size (may differ from hidden_size / num_attention_heads).
      rope_type: "default", "linear" (positions / factor) or "llama3" (Llama 3.1 frequency smoothing).
      qkv_bias / o_bias / mlp_bias: biases on q/k/v, o and the MLP projections (Qwen2: q/k/v only; Llama:
        ``attention_bias`` puts them on all four attention projections).
      sliding_window / layer_types: windowed causal attention; a token attends to the keys with
        ``q - window < k <= q`` on "sliding_attention" layers. Empty ``layer_types`` (Llama, Mistral): all
        layers are windowed exactly when ``sliding_window`` is set; see ``attention_types``.
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
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
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
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedConfigError(
                f"rope_type {self.rope_type!r} is not implemented (one of {ROPE_TYPES})"
            )
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise UnsupportedConfigError(f"layer_types {bad} are not implemented")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

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
          >>> ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
          ...     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          ...     "hidden_act": "gelu"})
          Traceback (most recent call last):
          UnsupportedConfigError: hidden_act='gelu' is not implemented (only silu)
        """
        c = dict(config)
        model_type = c.get("model_type") or _type_from_architectures(c.get("architectures"))
        if model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(f"model_type {model_type!r} is not supported (one of {MODEL_TYPES})")
        check_keys(c, model_type, strict=strict)
        missing = [k for k in _REQUIRED if c.get(k) is None]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        defaults = _CLASS_DEFAULTS[model_type]

        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedConfigError(f"hidden_act={act!r} is not implemented (only silu)")

        heads = int(c["num_attention_heads"])
        kv = c.get("num_key_value_heads", defaults["num_key_value_heads"])
        kv = heads if kv is None else int(kv)
        head_dim = c.get("head_dim")
        head_dim = int(c["hidden_size"]) // heads if head_dim is None else int(head_dim)

        if model_type == "llama":
            attention_bias = bool(c.get("attention_bias", False))
            qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, bool(c.get("mlp_bias", False))
        else:
            for key in ("attention_bias", "mlp_bias"):
                if c.get(key):
                    raise UnsupportedConfigError(
                        f"{key}=True is not part of {model_type} (transformers ignores it)"
                    )
            qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False

        window, layer_types = _sliding(model_type, c, defaults)
        rope = _rope(c)
        max_pos = int(c.get("max_position_embeddings", defaults["max_position_embeddings"]))
        if rope["rope_type"] == "llama3" and rope["rope_original_max_position_embeddings"] is None:
            rope["rope_original_max_position_embeddings"] = max_pos
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            model_type=model_type,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            layer_types=layer_types,
            extra={k: c[k] for k in c if k in _KEEP or k.endswith(METADATA_SUFFIXES)},
            **rope,
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
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=0.0,
            rope_parameters=self._rope_parameters(),
        )
        if self.model_type == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            out.update(sliding_window=self.sliding_window)
        else:  # qwen2: the window is switched on by use_sliding_window, per layer by layer_types
            types = self.attention_types
            sliding = "sliding_attention" in types
            first = types.index("sliding_attention") if sliding else self.num_hidden_layers
            out.update(
                use_sliding_window=sliding,
                sliding_window=self.sliding_window if sliding else None,
                layer_types=list(types),
                max_window_layers=first,
            )
        if dtype is not None:
            out["dtype"] = dtype
        return out

    def _rope_parameters(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        elif self.rope_type == "llama3":
            rope.update(
                factor=self.rope_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        return rope


def _type_from_architectures(archs: Any) -> str | None:
    for model_type, arch in ARCHITECTURES.items():
        if isinstance(archs, list) and arch in archs:
            return model_type
    return None


def _sliding(
    model_type: str, c: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[Any, tuple[str, ...]]:
    window = c.get("sliding_window", defaults["sliding_window"])
    n = int(c["num_hidden_layers"])
    if model_type == "llama":
        if window is not None:
            raise UnsupportedConfigError(
                f"sliding_window={window} is not part of llama (transformers ignores it)"
            )
        return None, ()
    if model_type == "qwen2":
        # Qwen2Config: the window exists only with use_sliding_window, on layers >= max_window_layers.
        window = window if c.get("use_sliding_window", False) else None
        types = c.get("layer_types")
        if types is None:
            first = int(c.get("max_window_layers", 28))
            types = [
                "sliding_attention" if window is not None and i >= first else "full_attention"
                for i in range(n)
            ]
        types = tuple(types)
        if window is None and "sliding_attention" in types:
            types = ("full_attention",) * n  # transformers builds no window mask without a window
        return window, types
    if c.get("layer_types") is not None:
        raise UnsupportedConfigError("layer_types is not part of mistral")
    return (int(window) if window is not None else None), ()


def _rope(c: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(f"partial_rotary_factor={partial} is not implemented (only 1.0)")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope_parameters rope_type={rope_type!r} is not implemented (one of {ROPE_TYPES})"
        )
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if rope_type == "linear":
        known |= {"factor"}
    elif rope_type == "llama3":
        known |= {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise UnsupportedConfigError(
            f"rope_parameters key(s) {unknown} are not implemented for {rope_type!r}"
        )
    out: dict[str, Any] = dict(rope_type=rope_type, rope_theta=float(theta))
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ValueError(f"rope_parameters of type {rope_type!r} needs 'factor'")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        orig = params.get("original_max_position_embeddings")
        out["rope_original_max_position_embeddings"] = None if orig is None else int(orig)
    return out
