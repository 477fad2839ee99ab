"""The tensors a checkpoint must hold when its config.json describes an ``oftjax.models`` architecture,
checked from the headers alone, before a tensor is read, copied or converted.

A safetensors header can declare a tensor of any size that the file backs (a sparse file costs no disk); the
config says what the architecture needs. Reading or converting such a file must refuse the tensor by its
header, not after gigabytes of memory or disk; and a converter must not write a checkpoint that the loader
then refuses (a tensor missing, renamed or extra). The expected names and shapes come from the model itself,
built abstractly (``nnx.eval_shape``: no memory): every parameter under its HF name (a module's path; an
``nnx.Linear`` kernel is HF's ``weight`` transposed, an ``nnx.Embed`` table its ``weight``), so every
architecture ``oftjax.models`` builds is covered the way ``interop.hf_model`` maps it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from interop._io import InteropError
from oftjax.quant import FourBitWeight, Int8Weight

__all__ = ["check_known_architecture", "expected_tensors"]


@functools.lru_cache(maxsize=8)
def expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (torch layout) of every parameter of a ``ModelConfig``'s model.

    Example:
        >>> from oftjax.models import ModelConfig
        >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
        ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> shapes = expected_tensors(cfg)
        >>> shapes["model.embed_tokens.weight"], shapes["model.layers.0.mlp.up_proj.weight"]
        ((8, 8), (16, 8))
    """
    from flax import nnx

    from oftjax.models import LlamaForCausalLM

    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    out: dict[str, tuple[int, ...]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *module, attr = (str(p) for p in path)
        shape = tuple(var.get_value().shape)
        if attr == "kernel":  # nnx.Linear [in, out]; HF stores [out, in]
            attr, shape = "weight", shape[::-1]
        elif attr == "embedding":
            attr = "weight"
        out[".".join([*module, attr])] = shape
    return out


def _model_config(config: Mapping[str, Any], where: str) -> Any:
    """The ``ModelConfig`` of a config.json whose ``model_type`` oftjax models, or None for another; an
    invalid one is an InteropError (or the ``UnsupportedConfigError`` naming the math oftjax lacks) naming
    ``where``."""
    from oftjax.models import MODEL_TYPES, ModelConfig
    from oftjax.models._config_keys import UnsupportedConfigError

    if config.get("model_type") not in MODEL_TYPES:
        return None  # a converter keeps the tensors of other architectures as they are
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys: the loader warns about them once
        try:
            return ModelConfig.from_hf(config)
        except UnsupportedConfigError as e:
            raise UnsupportedConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise InteropError(f"{where}: {type(e).__name__}: {e}") from None


def _is_float(dtype: Any) -> bool:
    """numpy's floats and ml_dtypes' (bfloat16, float8)."""
    try:
        ml_dtypes.finfo(np.dtype(dtype))
    except (TypeError, ValueError):
        return False
    return True


def check_known_architecture(
    config: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], *, source: str, where: str = ""
) -> None:
    """Refuse a checkpoint whose tensors disagree with the architecture its config.json describes: a tensor
    missing, one the model has no place for, or a shape other than the model's (from the headers: nothing is
    read), or a float parameter stored as integers. Quantized layers are compared by their logical shape.
    Configs of architectures oftjax does not model are not checked.

    Raises:
        InteropError: naming the tensor, its shape and the config's (or the config's invalid value).
    """
    from interop.hf_model import _IGNORED_SUFFIXES

    model_config = _model_config(config, where or f"{source}: config")
    if model_config is None:
        return
    try:
        expected = expected_tensors(model_config)
    except (TypeError, ValueError, OverflowError) as e:
        raise InteropError(
            f"{where or source}: no model has this architecture ({type(e).__name__}: {e})"
        ) from e
    found = {f"{m}.{n}" if m else n: leaf for m, params in weights.items() for n, leaf in params.items()}
    wrong = [
        f"tensor {key} has shape {list(leaf.shape)}, the config expects {list(expected[key])}"
        for key, leaf in sorted(found.items())
        if key in expected and tuple(leaf.shape) != expected[key]
    ]
    wrong += [
        f"tensor {key} has dtype {np.dtype(leaf.dtype)}, the model's parameter is a float"
        for key, leaf in sorted(found.items())
        if key in expected and not isinstance(leaf, (Int8Weight, FourBitWeight)) and not _is_float(leaf.dtype)
    ]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise InteropError(f"{source}: {'; '.join(wrong[:3])}{more}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise InteropError(f"{source}: missing tensor(s) {missing[:5]} that the config's model has")
    extra = sorted(
        k
        for k in set(found) - set(expected)
        if not k.endswith(_IGNORED_SUFFIXES)
        and not (model_config.tie_word_embeddings and k.startswith("lm_head."))
    )
    if extra:
        raise InteropError(
            f"{source}: unexpected tensor(s) {extra[:5]} for this {model_config.model_type} config"
        )
