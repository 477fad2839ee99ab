"""HF checkpoint directories (float, bnb 8-bit, bnb 4-bit) <-> oftjax weights and models (no torch).

The pieces, lowest first (imports go one way, this module on top):
  * ``read_checkpoint(path, *, lazy=False) -> (config, weights)`` and
    ``write_checkpoint(path, config, weights, *, force=False, max_shard_size="5GB", progress=False)``
    (``interop._hf_checkpoint``): ``weights`` is ``{module_path: {param_name: leaf}}``; a bnb-quantized
    linear layer is an ``oftjax.quant.Int8Weight`` / ``FourBitWeight`` under ``"weight"`` (never passed
    through float), every other tensor a numpy array (bf16 as ``ml_dtypes.bfloat16``) under its own name.
    Writing reproduces bitsandbytes' serialization byte for byte (docs/bitsandbytes-formats.md, "Serialized
    layout"), so transformers ``from_pretrained`` loads the result. ``write_torch_state_dict`` writes the same
    tensors as one torch file (needs torch).
  * ``validate_quantization_config``, ``bnb_quantization_config``: the ``quantization_config`` of config.json
    (``interop._hf_config``).
  * The JAX checkpoint format (``oftjax_checkpoint.json`` + ``weights.safetensors``):
    ``read_jax_checkpoint`` / ``write_jax_checkpoint``, and the directory-to-directory conversions
    ``checkpoint_to_jax`` / ``checkpoint_to_hf`` (``interop._jax_checkpoint_format``; ``oftjax convert
    checkpoint-to-jax|checkpoint-to-hf``).
  * ``load_model`` / ``save_model``: Llama-family NNX models on top of these (``interop.hf_model``).

Example:
  >>> import tempfile
  >>> import numpy as np
  >>> from oftjax import quant
  >>> config = {"quantization_config": bnb_quantization_config("4bit", quant_type="nf4")}
  >>> weights = {"lin": {"weight": quant.quantize_4bit(np.ones((4, 64), np.float32)), "bias": np.zeros(4)}}
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...     _ = write_checkpoint(tmp + "/hf", config, weights)
  ...     _ = checkpoint_to_hf(checkpoint_to_jax(tmp + "/hf", tmp + "/jax"), tmp + "/back")
  ...     _, back = read_checkpoint(tmp + "/back")
  >>> back["lin"]["weight"].quant_type, back["lin"]["bias"].shape
  ('nf4', (4,))
"""

from __future__ import annotations

from interop._hf_checkpoint import Weights as Weights
from interop._hf_checkpoint import materialize as materialize
from interop._hf_checkpoint import read_checkpoint as read_checkpoint
from interop._hf_checkpoint import write_checkpoint as write_checkpoint
from interop._hf_checkpoint import write_torch_state_dict as write_torch_state_dict
from interop._hf_config import bnb_quantization_config as bnb_quantization_config
from interop._hf_config import validate_quantization_config as validate_quantization_config
from interop._jax_checkpoint_format import checkpoint_to_hf as checkpoint_to_hf
from interop._jax_checkpoint_format import checkpoint_to_jax as checkpoint_to_jax
from interop._jax_checkpoint_format import read_jax_checkpoint as read_jax_checkpoint
from interop._jax_checkpoint_format import write_jax_checkpoint as write_jax_checkpoint
from interop._safetensors import LazyTensor as LazyTensor
from interop.hf_model import load_model as load_model
from interop.hf_model import save_model as save_model

__all__ = [
    "LazyTensor",
    "Weights",
    "bnb_quantization_config",
    "checkpoint_to_hf",
    "checkpoint_to_jax",
    "load_model",
    "materialize",
    "read_checkpoint",
    "read_jax_checkpoint",
    "save_model",
    "validate_quantization_config",
    "write_checkpoint",
    "write_jax_checkpoint",
    "write_torch_state_dict",
]
