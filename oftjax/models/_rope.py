"""Rotary position embeddings as transformers computes them (``modeling_rope_utils.py``, transformers 5.24).

The inverse frequencies are static numpy constants built in float32 in the same operation order as torch
(``1 / base ** (arange(0, d, 2) / d)``, then the "linear", "llama3" or "longrope" rescaling), so positions
rotate by the same angles; cos/sin use HF's ``rotate_half`` convention (the two halves of a head, not
interleaved pairs). LongRoPE (Phi-3) picks its long factors when the largest position reaches the pretraining
length (``max(positions) + 1 > original_max_position_embeddings``, transformers' ``dynamic_rope_update``) and
scales cos and sin by its attention factor. Gemma 3 has one rope per layer type (``ModelConfig.rope_of``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.models._config import ModelConfig
from oftjax.models._config_rope import RopeConfig

_F32 = np.float32


def inv_freq(config: ModelConfig, layer_type: str = "full_attention", *, long: bool = False) -> np.ndarray:
    """float32 ``[head_dim // 2]`` inverse frequencies of a layer type's rope.

    Args:
      config: the model.
      layer_type: "full_attention" or "sliding_attention" (they differ in Gemma 3 only).
      long: longrope: the long-context frequencies (``long_factor``) instead of the short ones.

    Example:
      >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=2, head_dim=4)
      >>> inv_freq(cfg)
      array([1.  , 0.01], dtype=float32)
    """
    return _inv_freq(config.rope_of(layer_type), config.head_dim, long)


@functools.lru_cache(maxsize=64)
def _inv_freq(rope: RopeConfig, dim: int, long: bool) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)
    # `base ** t` correctly rounded to float32 (a float64 pow rounded once). torch's vectorized float32 pow
    # is within 1 ulp of it and differs in an entry or two for some head dims (96, 256): an angle error of
    # position * 1 ulp, far below the parity tolerance (tests/models/test_config_families.py).
    power = (np.float64(rope.theta) ** exponent.astype(np.float64)).astype(_F32)
    if rope.rope_type == "longrope":
        # transformers _compute_longrope_parameters: 1 / (ext_factors * base ** t), float32 throughout
        ext = np.asarray(rope.long_factor if long else rope.short_factor, _F32)
        return (_F32(1.0) / (ext * power)).astype(_F32)
    freq = _F32(1.0) / power
    if rope.rope_type == "linear":
        freq = freq / _F32(rope.factor)
    elif rope.rope_type == "llama3":
        freq = _llama3(freq, rope)
    return freq.astype(_F32)


def _llama3(freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # transformers _compute_llama3_parameters, step for step in float32 (python scalars act as float32).
    factor = _F32(rope.factor)
    low, high = _F32(rope.low_freq_factor), _F32(rope.high_freq_factor)
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor  # python floats, as in transformers
    high_wavelen = old / rope.high_freq_factor
    wavelen = _F32(2 * math.pi) / freq
    scaled = np.where(wavelen > _F32(low_wavelen), freq / factor, freq)
    smooth = (_F32(old) / wavelen - low) / (high - low)
    smoothed = (_F32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < _F32(high_wavelen)) & ~(wavelen > _F32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(_F32)


def long_factor_length(config: ModelConfig, layer_type: str = "full_attention") -> int | None:
    """The sequence length from which LongRoPE rotates by its long factors (None: a rope with one set).

    ``original_max_position_embeddings + 1``: a forward whose largest position reaches the pretraining length
    uses the long factors for every position (transformers' ``dynamic_rope_update``). Keys cached while the
    sequence was shorter were rotated by the short factors, and the layers above them saw those rotations:
    transformers' Phi-3 generation (``Phi3ForCausalLM.prepare_inputs_for_generation``) drops such a cache
    when the sequence reaches this length and recomputes the whole sequence, so generation gives the tokens
    of recomputing the sequence at every step.

    Example:
      >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=2, head_dim=4, model_type="phi3",
      ...     rope=RopeConfig("longrope", short_factor=[1.0, 1.0], long_factor=[2.0, 2.0],
      ...     original_max_position_embeddings=4096))
      >>> long_factor_length(cfg)
      4097
    """
    rope = config.rope_of(layer_type)
    if rope.rope_type != "longrope":
        return None
    return rope.original_max_position_embeddings + 1


def rope_cos_sin(
    config: ModelConfig, positions: jax.Array, dtype: jnp.dtype, layer_type: str = "full_attention"
) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[..., head_dim]`` for integer ``positions`` (computed in float32, cast to ``dtype``)."""
    rope = config.rope_of(layer_type)
    freq = jnp.asarray(inv_freq(config, layer_type))
    switch = long_factor_length(config, layer_type)
    if switch is not None:
        long = jnp.max(positions) + 1 >= switch
        freq = jnp.where(long, jnp.asarray(inv_freq(config, layer_type, long=True)), freq)
    freqs = positions.astype(jnp.float32)[..., None] * freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    scale = rope.scaling(config.max_position_embeddings)
    if scale != 1.0:
        cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (HF's convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` by ``cos``/``sin [batch, seq, head_dim]``.

    ``rotate_half(x) * sin`` is computed as ``roll(x, half) * [-sin_1, sin_2]``: the sign moves from the
    activations (``[batch, seq, heads, head_dim]``) to ``sin`` (no heads axis), and ``(-a) * b == a * (-b)``
    exactly: the same products as HF's, with one elementwise pass less forward and backward.
    """
    half = x.shape[-1] // 2
    sin_signed = jnp.concatenate([-sin[..., :half], sin[..., half:]], axis=-1)
    return x * cos[:, :, None, :] + jnp.roll(x, half, axis=-1) * sin_signed[:, :, None, :]
