"""LLM.int8 row-wise weight quantization, bit-exact with bitsandbytes 0.50.2 on the CPU.

Reference: bitsandbytes ``nn/modules.py`` (``Int8Params._quantize``: the weight is cast to float16 first) and
``backends/default/ops.py`` (``int8_vectorwise_quant``); docs/bitsandbytes-formats.md, "Quantization" and
"CPU and CUDA rounding":

  * ``W16 = W.astype(float16)`` always (|w| > 65504 becomes inf and poisons its row: SCB = inf, CB = 0);
  * ``SCB = max |W16|`` per row, in float32;
  * ``CB = rne(W16 * fl32(fl32(1 / SCB) * 127))``: torch evaluates ``127.0 / t`` as ``t.reciprocal() * 127``;
    NaN (an all-zero or an inf row) becomes 0, as observed on x86.
rounding="cuda" uses ``fl32(127 / SCB)`` (a true division) for the scale: CUDA's ``__fdividef`` is within
2 ulp of it, so rare +-1 codes at exact .5 ties may still differ (not verifiable without a GPU).
The LLM.int8 forward quantizes its activations by the same rule, row by row
(``oftjax.quant.quantize_activations``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.quant._formats import Int8Weight


def quantize_int8(w: jax.Array, rounding: str = "cpu") -> Int8Weight:
    """Quantize a 2-D weight ``[out, in]`` to LLM.int8 row-wise format as bitsandbytes does.

    Args:
      w: floating-point weight, shape ``[out, in]`` (float32, bfloat16 or float16).
      rounding: "cpu" (bit-exact with bnb on the CPU, the default) or "cuda".

    Returns:
      ``Int8Weight(CB int8 [out, in], SCB float32 [out], dtype=w.dtype)``.

    Non-finite input: a row holding inf or |w| > 65504 gets SCB = inf and CB = 0; a NaN makes its row's SCB
    NaN and its CB 0 (bnb on x86 does the same; torch leaves NaN -> int8 undefined).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_int8(jnp.array([[0.5, -1.0], [0.0, 0.0]], jnp.float32))
      >>> q.CB.tolist(), q.SCB.tolist()
      ([[64, -127], [0, 0]], [1.0, 0.0])
    """
    _check(w, rounding)
    return _quantize_int8(jnp.asarray(w), rounding=rounding)


@functools.partial(jax.jit, static_argnames=("rounding",))
def _quantize_int8(w: jax.Array, *, rounding: str) -> Int8Weight:
    """The validated body of ``quantize_int8``, compiled once per shape and dtype."""
    w16 = w.astype(jnp.float16)
    SCB = jnp.max(jnp.abs(w16), axis=1).astype(jnp.float32)
    if rounding == "cpu":
        scale = (jnp.float32(1.0) / SCB) * jnp.float32(127.0)
    else:
        scale = jnp.float32(127.0) / SCB
    # SCB is the max of values exactly representable in float16: no subnormal float32 can appear here.
    v = w16.astype(jnp.float32) * scale[:, None]
    CB = jnp.where(jnp.isnan(v), jnp.float32(0.0), jnp.round(v)).astype(jnp.int8)
    return Int8Weight(CB, SCB, np.dtype(w.dtype))


def _check(w: Any, rounding: str) -> None:
    if not hasattr(w, "dtype") or not hasattr(w, "shape"):
        raise TypeError(f"quantize_int8 expects a float array, got {type(w).__name__}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"quantize_int8 expects a floating-point weight (float32/bfloat16/float16), got {w.dtype}"
        )
    if w.ndim != 2 or w.size == 0:
        raise ValueError(
            f"quantize_int8 expects a non-empty 2-D weight [out, in], got shape {tuple(w.shape)}"
        )
    if rounding not in ("cpu", "cuda"):
        raise ValueError(f"unknown rounding {rounding!r}: expected 'cpu' or 'cuda'")
