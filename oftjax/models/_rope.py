"""Rotary position embeddings as transformers computes them (``modeling_rope_utils.py``, transformers 5.24).

The inverse frequencies are a static numpy constant built in float32 in the same operation order as torch
(``1 / base ** (arange(0, d, 2) / d)``, then the "linear" or "llama3" rescaling), so positions rotate by the
same angles; cos/sin use HF's ``rotate_half`` convention (the two halves of a head, not interleaved pairs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.models._config import ModelConfig

_F32 = np.float32


@functools.lru_cache(maxsize=32)
def inv_freq(config: ModelConfig) -> np.ndarray:
    """float32 ``[head_dim // 2]`` inverse frequencies (default / linear / llama3 rope types).

    Example:
      >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, num_key_value_heads=2, head_dim=4)
      >>> inv_freq(cfg)
      array([1.  , 0.01], dtype=float32)
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)
    # torch evaluates `base ** t` as a correctly rounded float32 pow: float64 pow rounded once matches it.
    freq = _F32(1.0) / (np.float64(config.rope_theta) ** exponent.astype(np.float64)).astype(_F32)
    if config.rope_type == "linear":
        freq = freq / _F32(config.rope_factor)
    elif config.rope_type == "llama3":
        freq = _llama3(freq, config)
    return freq.astype(_F32)


def _llama3(freq: np.ndarray, config: ModelConfig) -> np.ndarray:
    # transformers _compute_llama3_parameters, step for step in float32 (python scalars act as float32).
    factor = _F32(config.rope_factor)
    low, high = _F32(config.rope_low_freq_factor), _F32(config.rope_high_freq_factor)
    old = config.rope_original_max_position_embeddings
    low_wavelen = old / config.rope_low_freq_factor  # python floats, as in transformers
    high_wavelen = old / config.rope_high_freq_factor
    wavelen = _F32(2 * math.pi) / freq
    scaled = np.where(wavelen > _F32(low_wavelen), freq / factor, freq)
    smooth = (_F32(old) / wavelen - low) / (high - low)
    smoothed = (_F32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < _F32(high_wavelen)) & ~(wavelen > _F32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(_F32)


def rope_cos_sin(config: ModelConfig, positions: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[..., head_dim]`` for integer ``positions`` (computed in float32, cast to ``dtype``)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


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
