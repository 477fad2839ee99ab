"""HF checkpoint directories (float, bnb 8-bit, bnb 4-bit) <-> oftjax weights, numpy + safetensors only.

Public surface:
  * ``read_checkpoint(path, *, lazy=False) -> (config, weights)`` and
    ``write_checkpoint(path, config, weights, *, force=False, max_shard_size="5GB", progress=False)``:
    ``weights`` is ``{module_path: {param_name: leaf}}``; a bnb-quantized linear layer is an
    ``oftjax.quant.Int8Weight`` / ``FourBitWeight`` under ``"weight"`` (never passed through float), every
    other tensor a numpy array (bf16 as ``ml_dtypes.bfloat16``) under its own name. Writing reproduces
    bitsandbytes' serialization byte for byte, so transformers ``from_pretrained`` loads the result.
  * ``checkpoint_to_jax`` / ``checkpoint_to_hf`` / ``read_jax_checkpoint`` / ``write_jax_checkpoint``: the JAX
    directory format (``oftjax_checkpoint.json`` + ``weights.safetensors``; see
    ``interop._jax_checkpoint_format``).
  * ``validate_quantization_config``, ``bnb_quantization_config``: the ``quantization_config`` of config.json.
  * ``load_model`` / ``save_model`` (models on top of these; ``interop.hf_model``).

Example:
  >>> from interop import hf
  >>> config, weights = hf.read_checkpoint("llama-nf4")               # doctest: +SKIP
  >>> hf.write_checkpoint("llama-nf4-copy", config, weights)          # doctest: +SKIP
  >>> hf.checkpoint_to_jax("llama-nf4", "llama-nf4-jax")            # doctest: +SKIP
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
from interop._jax_checkpoint_format import checkpoint_to_hf as checkpoint_to_hf
from interop._jax_checkpoint_format import checkpoint_to_jax as checkpoint_to_jax
from interop._jax_checkpoint_format import read_jax_checkpoint as read_jax_checkpoint
from interop._jax_checkpoint_format import write_jax_checkpoint as write_jax_checkpoint
from interop._safetensors import LazyTensor as LazyTensor

__all__ = [  # noqa: F822 - load_model/save_model come from __getattr__
    "LazyTensor",
    "Weights",
    "bnb_quantization_config",
    "checkpoint_to_jax",
    "load_model",
    "materialize",
    "checkpoint_to_hf",
    "read_checkpoint",
    "read_jax_checkpoint",
    "save_model",
    "validate_quantization_config",
    "write_checkpoint",
    "write_jax_checkpoint",
    "write_torch_state_dict",
]


def __getattr__(name: str) -> Any:
    # Models sit on top of this module (interop.hf_model imports it), so they are re-exported lazily.
    if name in ("load_model", "save_model"):
        from interop import hf_model

        return getattr(hf_model, name)
    raise AttributeError(f"module 'interop.hf' has no attribute {name!r}")
