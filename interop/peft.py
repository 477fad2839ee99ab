"""PEFT OFT adapter directories <-> oftjax adapters and NNX models (torch is never imported here).

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.oft_R.weight`` of shape ``[r or 1, b(b-1)/2]`` (``oft_embedding_R.weight``
for embeddings, with the base table ``<module>.base_layer.weight`` when PEFT saves embedding layers;
``<module>.base_layer.bias`` with ``bias="oft_only"``). A non-default adapter is saved by PEFT
in a subfolder named after it (docs/peft-oft.md, "Adapter files"). File format versions
(``interop._peft_format``; docs/peft-oft.md, "Versions of the OFT parameterization"): PEFT >= 0.18 is read as
is; 0.16-0.17 Cayley-Neumann adapters are evaluated with the series they were trained with
(``OFTConfig.legacy_neumann``), with a warning; 0.14-0.15 adapters (``oft_r`` + ``oft_s``) are converted
exactly when ``oft_s == 1`` and refused otherwise; <= 0.13 adapters are refused. Unlike PEFT 0.21, which
silently drops 0.15 weights, nothing is ever dropped without an error.

Config keys: every ``OFTConfig`` field is handled under PEFT's name (r, oft_block_size, module_dropout,
target_modules, exclude_modules, layers_to_transform, layers_pattern, bias, init_weights, coft, eps,
block_share, use_cayley_neumann, num_cayley_neumann_terms, fan_in_fan_out, modules_to_save, task_type,
base_model_name_or_path, revision, inference_mode, peft_version); ``peft_type`` must be "OFT";
``auto_mapping`` (torch class names) is knowingly ignored and written back verbatim on round trips
(``_peft_format.IGNORED_CONFIG_KEYS``). Any other key is an error naming it (PEFT would warn and drop it).

The pieces, lowest first (imports go one way, this module on top):
  * files: ``read_adapter`` / ``write_adapter`` / ``list_adapters`` (``interop._peft_files``);
  * the JAX adapter format, one directory holding several adapters under NNX state paths:
    ``read_jax_adapter`` / ``write_jax_adapter``, and the file-to-file conversions ``adapter_to_jax`` /
    ``adapter_to_peft`` (``interop._jax_adapter_format``; ``oftjax convert adapter-to-jax|adapter-to-peft``);
  * NNX models: ``attach_adapter`` / ``load_adapter`` (``interop._peft_attach``), ``collect_adapter`` /
    ``save_adapter`` (``interop._peft_save``), and here ``save_jax_adapter`` / ``load_jax_adapter``.

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from oftjax import OFTConfig
    >>> config = OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"])
    >>> tensors = {"base_model.model.lin0.oft_R.weight": np.zeros((1, 6), np.float32)}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = write_adapter(tmp, config, tensors)
    ...     _ = adapter_to_peft(adapter_to_jax(tmp, tmp + "/jax"), tmp + "/back")
    ...     back_config, back = read_adapter(tmp + "/back")
    >>> back_config.oft_block_size, list(back)
    (4, ['base_model.model.lin0.oft_R.weight'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oftjax.config import OFTConfig
from oftjax.nn import OFTAdapters

from ._io import InteropError as InteropError
from ._jax_adapter_format import CONFIG_FILE, WEIGHTS_FILE, peft_tensors, state_tensors
from ._jax_adapter_format import adapter_to_jax as adapter_to_jax
from ._jax_adapter_format import adapter_to_peft as adapter_to_peft
from ._jax_adapter_format import read_jax_adapter as read_jax_adapter
from ._jax_adapter_format import write_jax_adapter as write_jax_adapter
from ._peft_attach import attach_adapter as attach_adapter
from ._peft_attach import load_adapter as load_adapter
from ._peft_attach import module_table
from ._peft_files import list_adapters as list_adapters
from ._peft_files import read_adapter as read_adapter
from ._peft_files import write_adapter as write_adapter
from ._peft_save import collect_adapter as collect_adapter
from ._peft_save import save_adapter as save_adapter

__all__ = [
    "InteropError",
    "adapter_to_jax",
    "adapter_to_peft",
    "attach_adapter",
    "collect_adapter",
    "list_adapters",
    "load_adapter",
    "load_jax_adapter",
    "read_adapter",
    "read_jax_adapter",
    "save_adapter",
    "save_jax_adapter",
    "write_adapter",
    "write_jax_adapter",
]


def save_jax_adapter(
    model: Any,
    path: str | os.PathLike,
    adapter_names: list[str] | None = None,
    *,
    configs: Mapping[str, OFTConfig] | None = None,
    force: bool = False,
) -> Path:
    """Save adapters of an NNX model (default: all of them) as one JAX adapter directory.

    Args:
        model: an NNX model with OFT layers.
        path: the output directory; must not exist unless ``force``.
        adapter_names: which adapters; default: every adapter of every OFT layer, in order of appearance.
        configs: adapter name -> the OFTConfig to write (checked against the model); inferred otherwise, as
            ``collect_adapter`` does.
        force: replace an existing ``path``.

    Example:
        >>> import tempfile
        >>> from flax import nnx
        >>> from oftjax import OFTConfig, apply_oft
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.lin0 = nnx.Linear(8, 8, rngs=rngs)
        >>> model = MLP(nnx.Rngs(0))
        >>> apply_oft(model, OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"]), rngs=nnx.Rngs(1))
        ['lin0']
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_jax_adapter(model, Path(tmp) / "jax")
        ...     load_jax_adapter(MLP(nnx.Rngs(0)), path)
        ['lin0']
    """
    if adapter_names is None:
        found = [n for _, m in module_table(model).values() if isinstance(m, OFTAdapters) for n in m.adapters]
        adapter_names = list(dict.fromkeys(found))
    adapters = {}
    for name in adapter_names:
        config, tensors = collect_adapter(model, name, (configs or {}).get(name))
        adapters[name] = (config, state_tensors(tensors, name, config))
    return write_jax_adapter(path, adapters, force=force)


def load_jax_adapter(
    model: Any, path: str | os.PathLike, adapter_names: list[str] | None = None, **kwargs: Any
) -> list[str]:
    """Attach adapters from a JAX adapter directory (default: all) to an NNX model; return the module paths.

    Args:
        model: an NNX model whose module paths match the adapters' (see ``load_adapter``).
        path: the JAX adapter directory (``save_jax_adapter``, ``adapter_to_jax``).
        adapter_names: which adapters; default: all of them.
        **kwargs: ``activate``, ``rngs`` and ``strict``, as ``load_adapter`` takes them.

    Raises:
        InteropError: a named adapter is not in the directory, or ``attach_adapter`` refuses one.

    Example: see ``save_jax_adapter``.
    """
    adapters, _ = read_jax_adapter(path)
    names = list(adapters) if adapter_names is None else adapter_names
    missing = [n for n in names if n not in adapters]
    if missing:
        where = Path(path) / CONFIG_FILE
        raise InteropError(f"{where}: no adapter(s) {missing}; it holds {sorted(adapters)}")
    paths: set[str] = set()
    for name in names:
        config, arrays = adapters[name]
        source = Path(path) / WEIGHTS_FILE
        paths.update(attach_adapter(model, config, peft_tensors(arrays, name), name, source=source, **kwargs))
    return sorted(paths)
