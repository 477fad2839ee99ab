"""The shape every tensor of a checkpoint must have when its config.json describes an ``oftjax.models``
architecture: checked from the headers alone, before a tensor is read, copied or converted.

A safetensors header can declare a tensor of any size that the file (a sparse file costs no disk) backs; the
config says what the architecture needs. Reading or converting such a file must refuse the tensor by its
header, not after gigabytes of memory or disk. The expected shapes come from the model itself, built
abstractly (``nnx.eval_shape``: no memory): every ``nnx.Linear``'s weight ``[out, in]`` (torch layout) and
bias, every ``nnx.Embed``'s table, every other module's ``weight`` (the norms), under their HF names
(``interop._nnx_names``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from interop._io import InteropError

__all__ = ["check_known_architecture", "expected_tensors"]


def expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (torch layout) of the tensors a checkpoint of ``config`` (a ``ModelConfig``)
    holds.

    Example:
        >>> from oftjax.models import ModelConfig
        >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
        ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> shapes = expected_tensors(cfg)
        >>> shapes["model.embed_tokens.weight"], shapes["model.layers.0.mlp.up_proj.weight"]
        ((8, 8), (16, 8))
    """
    from flax import nnx

    from interop._nnx_names import module_table
    from oftjax.models import LlamaForCausalLM

    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    out: dict[str, tuple[int, ...]] = {}
    for name, (_, module) in module_table(model).items():
        if isinstance(module, nnx.Linear):
            out[f"{name}.weight"] = tuple(module.kernel.shape[::-1])
            if module.bias is not None:
                out[f"{name}.bias"] = tuple(module.bias.shape)
        elif isinstance(module, nnx.Embed):
            out[f"{name}.weight"] = tuple(module.embedding.shape)
        elif isinstance(getattr(module, "weight", None), nnx.Variable):
            out[f"{name}.weight"] = tuple(module.weight.shape)
    return out


def _model_config(config: Mapping[str, Any]) -> Any:
    """The ``ModelConfig`` of a config.json dict, or None when oftjax does not model it."""
    from oftjax.models import ModelConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys: the loader warns about them, conversion ignores them
        try:
            return ModelConfig.from_hf(config)
        except (TypeError, ValueError, KeyError, OverflowError):
            return None


def check_known_architecture(
    config: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], *, source: str
) -> None:
    """Refuse a tensor whose shape disagrees with the architecture config.json describes, from its header.

    Only configs of an ``oftjax.models`` architecture are checked, and only the tensors the model has (a
    converter keeps the others as they are). Quantized layers are compared by their logical shape.

    Raises:
        InteropError: naming the tensor, its shape and the config's.
    """
    model_config = _model_config(config)
    if model_config is None:
        return
    try:
        expected = expected_tensors(model_config)
    except (TypeError, ValueError):  # sizes no model can have: the loader says which
        return
    for module, params in weights.items():
        for name, leaf in params.items():
            key = f"{module}.{name}" if module else name
            want = expected.get(key)
            if want is not None and tuple(leaf.shape) != want:
                raise InteropError(
                    f"{source}: tensor {key} has shape {list(leaf.shape)}, the config expects {list(want)}"
                )
