"""HF checkpoint directories (float, bnb 8-bit, bnb 4-bit) <-> oftjax weights, numpy + safetensors only.

Public surface:
  * ``read_checkpoint(path, *, lazy=False) -> (config, weights)`` and
    ``write_checkpoint(path, config, weights, *, force=False, max_shard_size="5GB", progress=False)``:
    ``weights`` is ``{module_path: {param_name: leaf}}``; a bnb-quantized linear layer is an
    ``oftjax.quant.Int8Weight`` / ``FourBitWeight`` under ``"weight"`` (never passed through float), every
    other tensor a numpy array (bf16 as ``ml_dtypes.bfloat16``) under its own name. Writing reproduces
    bitsandbytes' serialization byte for byte, so transformers ``from_pretrained`` loads the result.
  * ``checkpoint_to_native`` / ``native_to_checkpoint`` / ``read_native`` / ``write_native``: the JAX-native
    directory format (``oftjax_checkpoint.json`` + ``weights.safetensors``; see
    ``interop._native_checkpoint``).
  * ``validate_quantization_config``, ``bnb_quantization_config``: the ``quantization_config`` of config.json.
  * ``load_model`` / ``save_model`` (models on top of these; ``interop.hf_model``).

Example:
  >>> from interop import hf
  >>> config, weights = hf.read_checkpoint("llama-nf4")               # doctest: +SKIP
  >>> hf.write_checkpoint("llama-nf4-copy", config, weights)          # doctest: +SKIP
  >>> hf.checkpoint_to_native("llama-nf4", "llama-nf4-jax")            # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from interop._hf_checkpoint import Weights as Weights
from interop._hf_checkpoint import bnb_quantization_config as bnb_quantization_config
from interop._hf_checkpoint import materialize as materialize
from interop._hf_checkpoint import read_checkpoint as read_checkpoint
from interop._hf_checkpoint import validate_quantization_config as validate_quantization_config
from interop._hf_checkpoint import write_checkpoint as write_checkpoint
from interop._hf_checkpoint import write_torch_state_dict as write_torch_state_dict
from interop._native_checkpoint import checkpoint_to_native as checkpoint_to_native
from interop._native_checkpoint import native_to_checkpoint as native_to_checkpoint
from interop._native_checkpoint import read_native as read_native
from interop._native_checkpoint import write_native as write_native
from interop._safetensors import LazyTensor as LazyTensor

__all__ = [  # noqa: F822 - load_model/save_model come from __getattr__
    "LazyTensor",
    "Weights",
    "bnb_quantization_config",
    "checkpoint_to_native",
    "load_model",
    "materialize",
    "native_to_checkpoint",
    "read_checkpoint",
    "read_native",
    "save_model",
    "validate_quantization_config",
    "write_checkpoint",
    "write_native",
    "write_torch_state_dict",
]


def __getattr__(name: str) -> Any:
    # Models sit on top of this module (interop.hf_model imports it), so they are re-exported lazily.
    if name in ("load_model", "save_model"):
        from interop import hf_model

        return getattr(hf_model, name)
    raise AttributeError(f"module 'interop.hf' has no attribute {name!r}")
