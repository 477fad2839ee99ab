"""What OFT needs from a base layer, by base type (PEFT's ``dispatch_bnb_8bit`` / ``dispatch_bnb_4bit``).

Three kinds of frozen base are supported:

* ``"float"``: ``nnx.Linear`` (or any module with a 2-D ``kernel`` variable ``[in, out]``, an optional
  ``bias`` and an ``__call__`` computing ``x @ kernel + bias``);
* ``"int8"``: ``Linear8bit`` (``weight``: ``QuantWeight`` holding an ``Int8Weight`` ``[out, in]``);
* ``"4bit"``: ``Linear4bit`` (``weight``: ``QuantWeight`` holding a ``FourBitWeight`` ``[out, in]``).

Each kind knows how to read its dense weight, write a merged one back, and (for the rotate-the-weight forward)
compute its matmul from a given kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax import quant
from oftjax.nn._quant_linear import Linear4bit, Linear8bit


def base_kind(module: Any) -> str:
    """The kind of base layer ``module`` is: "float", "int8" or "4bit"; TypeError when unsupported.

    Example:
      >>> from flax import nnx
      >>> base_kind(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      'float'
    """
    if isinstance(module, Linear8bit):
        return "int8"
    if isinstance(module, Linear4bit):
        return "4bit"
    kernel = getattr(module, "kernel", None)
    if isinstance(module, nnx.Module) and isinstance(kernel, nnx.Variable) and kernel[...].ndim == 2:
        return "float"
    raise TypeError(
        f"OFT supports nnx.Linear-like layers (a 2-D `kernel` [in, out]), oftjax.nn.Linear8bit and "
        f"oftjax.nn.Linear4bit; got {type(module).__name__}"
    )


def in_out_features(module: Any, kind: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base layer, read from its weight shape."""
    if kind == "float":
        d_in, d_out = module.kernel[...].shape
    else:
        d_out, d_in = module.weight.get_value().shape
    return int(d_in), int(d_out)


def weight_source(module: Any, kind: str) -> Any:
    """The array (float: kernel ``[in, out]``; embed: table ``[num, d]``) or quantized pytree of a weight."""
    if kind == "embed":
        return module.embedding[...]
    return module.kernel[...] if kind == "float" else module.weight.get_value()


def dense_from_source(source: Any, kind: str) -> jax.Array:
    """The base weight as a torch-layout ``[out, in]`` array, in the dtype merges start from (jit-able).

    float: the kernel transposed (its own dtype); embed: the table ``[num_embeddings, d]`` as is; int8: fp32
    (PEFT dequantizes with ``int8_vectorwise_dequant``, fp32); 4-bit: the original weight dtype
    (``quant_state.dtype``, what ``dequantize_4bit`` returns).
    """
    if kind == "float":
        return source.T
    if kind == "embed":  # nn.Embedding's weight layout [num_embeddings, d] is nnx.Embed's too
        return source
    return quant.dequantize(source, jnp.float32 if kind == "int8" else source.dtype)


def requantize(q: Any, w: jax.Array) -> Any:
    """Quantize ``w`` ``[out, in]`` with the same format options as ``q`` (bnb ``Int8Params``/``Params4bit``).

    The merged weight is cast to the dtype bnb would hand to its quantizer
    (``set_base_weight(w.to(orig_dtype))``): fp32 for int8 (PEFT's dequantized dtype), ``q.dtype`` for 4-bit.
    """
    if isinstance(q, quant.Int8Weight):
        out = quant.quantize_int8(w.astype(jnp.float32))
        return out if out.dtype == q.dtype else _with_dtype(out, q.dtype)
    return quant.quantize_4bit(
        w.astype(q.dtype),
        quant_type=q.quant_type,
        blocksize=q.blocksize,
        compress_statistics=q.compress_statistics,
        quant_storage=q.quant_storage,
    )


def _with_dtype(q: quant.Int8Weight, dtype: Any) -> quant.Int8Weight:
    # The int8 codes do not depend on the float dtype they came from beyond bnb's fp16 cast; keep the layer's
    # original dtype as the default dequantize dtype.
    return quant.Int8Weight(q.CB, q.SCB, dtype=dtype)


def set_dense_weight(module: Any, kind: str, w: jax.Array) -> None:
    """Write a torch-layout ``[out, in]`` weight back (float: cast to kernel dtype; quantized: requantize)."""
    if kind == "float":
        module.kernel[...] = w.T.astype(module.kernel[...].dtype)
    elif kind == "embed":
        module.embedding[...] = w.astype(module.embedding[...].dtype)
    else:
        module.weight.set_value(requantize(module.weight.get_value(), w))
