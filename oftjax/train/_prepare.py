"""Model preparation for training: quantize float linears in memory, as transformers + bitsandbytes would.

``quantize_model(model, "nf4", double_quant=True)`` replaces every float ``nnx.Linear`` except the skipped
ones (``lm_head``, as transformers never quantizes it) with ``oftjax.nn.Linear4bit`` / ``Linear8bit``,
quantized with bitsandbytes' CPU rounding from the same float weights, so the base equals what
``from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(...))`` builds in torch (blocksize 64).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from oftjax.nn import Linear4bit, Linear8bit, find_modules, path_str, replace_module

__all__ = ["QUANT_CHOICES", "quantize_model"]

QUANT_CHOICES = ("nf4", "fp4", "int8", "none")


def quantize_model(
    model: nnx.Module,
    quant: str,
    *,
    double_quant: bool = True,
    compute_dtype: Any = jnp.float32,
    skip: tuple[str, ...] = ("lm_head",),
) -> list[str]:
    """Quantize the float ``nnx.Linear`` layers of ``model`` in place; return their dotted paths.

    The base layers inside OFT layers are left alone (``oftjax.nn.find_modules`` does not enter them):
    quantize first, then apply OFT, as PEFT's QOFT recipe does.

    Args:
      model: an NNX model (e.g. ``LlamaForCausalLM``) with float linears.
      quant: "nf4" | "fp4" (4-bit, blocksize 64) | "int8" (LLM.int8 row-wise) | "none" (no change).
      double_quant: 4-bit only: compress the absmax statistics (bnb ``compress_statistics``).
      compute_dtype: the quantized layers' activation dtype (bnb ``bnb_4bit_compute_dtype``).
      skip: last path components never quantized.

    Raises:
      ValueError: unknown ``quant``, or nothing to quantize.

    Example:
      >>> paths = quantize_model(model, "nf4")  # doctest: +SKIP
    """
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if quant == "none":
        return []
    targets = [
        (path, module)
        for path, module in find_modules(model, lambda m: type(m) is nnx.Linear)
        if str(path[-1]) not in skip
    ]
    if not targets:
        raise ValueError("no float nnx.Linear layers to quantize (already quantized?)")
    done = []
    for path, lin in targets:
        weight = jnp.asarray(lin.kernel[...]).T  # NNX kernel [in, out] -> bnb/torch layout [out, in]
        bias = None if lin.bias is None else lin.bias[...]
        if quant == "int8":
            new = Linear8bit.from_float(weight, bias, compute_dtype=compute_dtype)
        else:
            new = Linear4bit.from_float(
                weight, bias, quant_type=quant, blocksize=64, compress_statistics=double_quant,
                compute_dtype=compute_dtype,
            )  # fmt: skip
        replace_module(model, path, new)
        done.append(path_str(path))
    return done
